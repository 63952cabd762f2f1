"""The ``sage-fast`` command line (also ``python -m sage_fast``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UsageError

# Each command lives in sage_fast/commands/<name>.py with add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "info": "versions, devices, and which implementation each op runs",
    "assets": "install and check the offline models and data",
    "teacher": "fine-tune a teacher on a task and cache it",
    "export": "export a trained student as a standard Hugging Face model",
    "distill": "distil a teacher into a student with SAGE, with KD / random baselines",
    "analyze": "loss map of a trained student (checkpoint or run folder)",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when it says something: not for unset (None) values or off switches, and
    not a second time when the help text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage-fast",
        description="SAGE knowledge distillation: fused losses, loss-region analysis and a training driver.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        module = importlib.import_module(f"sage_fast.commands.{name}")
        p = sub.add_parser(name, help=summary, description=(module.__doc__ or summary).strip(),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Hugging Face's own per-file loading and saving bars would bury ours; a user's setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UsageError as err:
        print(f"sage-fast {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # The system refused (disk full, no permission, a folder where a file belongs): say what and
        # where in one paragraph; a traceback would add nothing the user can act on.
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"sage-fast {args.command}: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except Exception as err:
        if not _refused_write(err):
            raise
        # safetensors reports a failed write (a full disk) as its own error, not an OSError
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sage-fast {args.command}: writing a weights file failed ({text})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nsage-fast {args.command}: interrupted", file=sys.stderr)
        return 130


def _refused_write(err: Exception) -> bool:
    """Whether ``err`` is safetensors' error for a file it could not write or read (imported only
    when an error occurred: the command line must not pay for it)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return False
    return isinstance(err, SafetensorError)


if __name__ == "__main__":
    raise SystemExit(main())
