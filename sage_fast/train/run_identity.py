"""What a run folder holds belongs to one run: the settings and data each mode was trained with are
recorded in its checkpoint and checked before it is continued or reported.

- A fresh run into a folder that holds another run is refused (``--overwrite`` replaces that run):
  it would write its settings and results over the other run's, and a later ``--resume`` or
  ``--compare`` would continue or report a baseline trained with other settings.
- A checkpoint is continued only with the settings it was made with (``RESUMABLE_CHANGES`` aside),
  on the same data (its fingerprint: a data file edited since gives other rows, or as many rows
  meaning other things), and only when the steps asked for are not fewer than the steps done.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import DataError
from .checkpoint import CHECKPOINT_NAME, CheckpointError
from .config import MODES, canonical

# Settings a resumed run may change: how long it trains, where and how it runs; the rest decide
# what a step computes, so a checkpoint continues only under the settings it was made with.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "device", "progress", "compare", "cache_dir", "output_dir",
                               "dist_timeout", "grad_accumulation"})
RUN_FILES = ("config.json", "config.yaml", "results.json", "results.txt")
MODE_FILES = (CHECKPOINT_NAME, "metrics.jsonl", "trained")


def run_entries(out_dir: Path) -> list[Path]:
    """What of a sage-fast run ``out_dir`` holds: its files and the folders of its modes."""
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    found += [out_dir / mode for mode in MODES if any((out_dir / mode / name).exists() for name in MODE_FILES)]
    return found


def check_fresh_folder(out_dir: Path, *, overwrite: bool = False, log=print) -> None:
    """Refuse a fresh run into a folder that holds another run; with ``overwrite``, remove that
    run's files and mode folders first (nothing else in the folder), so nothing of it mixes in."""
    used = run_entries(Path(out_dir))
    if not used:
        return
    if not overwrite:
        names = ", ".join(p.name for p in used)
        raise DataError(f"{out_dir} already holds a run ({names}): a new run there would write over its settings "
                        "and results, and a later --resume or --compare would mix the two runs. Pass --resume to "
                        "continue it, --overwrite to delete it and start over, or choose another --output-dir")
    for path in used:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    log(f"--overwrite: removed the earlier run in {out_dir} ({', '.join(p.name for p in used)})")


def record(data) -> dict:
    """What a checkpoint keeps of the data it was trained on."""
    return {"data_fingerprint": data.fingerprint(), "data_rows": {name: len(split) for name, split in
                                                                  data.splits().items()}}


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


def check_checkpoint(state: dict, config, data, total_steps: int, path: Path) -> None:
    """Refuse to continue (or report) the checkpoint ``state`` under other settings, on other data,
    or with fewer steps than it has done; a CheckpointError says which and what to do."""
    saved = canonical(state.get("config") or {})
    current = config.to_dict()
    changed = [f"{key.replace('_', '-')} {_shown(saved[key])} there, {_shown(current[key])} here"
               for key in sorted(saved)
               if key in current and key not in RESUMABLE_CHANGES and saved[key] != current[key]]
    if changed:
        raise CheckpointError(f"{path} was trained with other settings than this run's ({'; '.join(changed)}): "
                              "continuing or reporting it would mix two runs. Start a new run in another "
                              "--output-dir, or resume with the settings it was made with")
    fingerprint = state.get("data_fingerprint")
    if fingerprint is not None and fingerprint != data.fingerprint():
        rows = state.get("data_rows") or {}
        then = ", ".join(f"{name} {count}" for name, count in rows.items())
        now = ", ".join(f"{name} {len(split)}" for name, split in data.splits().items())
        raise CheckpointError(f"{path} was trained on other data than this run reads (rows then: {then or 'unknown'}; "
                              f"now: {now}): the data files changed since. Restore them, or start a new run in "
                              "another --output-dir")
    done = state.get("global_step", 0)
    if done > total_steps:
        raise CheckpointError(f"{path} has done {done} steps, more than the {total_steps} this run asks for "
                              f"(--max-steps {config.max_steps}, --epochs {config.epochs}): ask for at least "
                              f"{done}, or leave --max-steps unset")


__all__ = ["MODE_FILES", "RESUMABLE_CHANGES", "RUN_FILES", "check_checkpoint", "check_fresh_folder", "record",
           "run_entries"]
