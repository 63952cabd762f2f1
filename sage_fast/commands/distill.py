"""Distil a teacher classifier into a smaller student with SAGE, and measure whether SAGE helped.

With no arguments this runs offline on a CPU in a few minutes: the packaged MiniLM-L6 is fine-tuned
on Rotten Tomatoes as the teacher (cached after the first run), a 2-layer student is made of every
3rd teacher layer, and SAGE is compared with plain KD on the same data; a table of teacher, KD and
SAGE test accuracy ends the run. Settings come from the defaults, then --config FILE, then the flags
given here. Everything lands in --output-dir (default runs/<timestamp>): config, metrics.jsonl,
loss maps, checkpoints, results. Several GPUs or machines: the same command under torchrun
(torchrun --nproc-per-node N -m sage_fast.cli distill ...); --batch-size stays the global batch."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import typing

from ..train.config import TRAINING_ARGUMENTS_NAMES, DistillConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser) -> None:
    defaults = DistillConfig()
    hints = typing.get_type_hints(DistillConfig)
    for field in dataclasses.fields(DistillConfig):
        help_text = field.metadata.get("help", "")
        default = getattr(defaults, field.name)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{help_text} (default: {shown})" if default is not None and default is not False else help_text
        # SUPPRESS keeps flags the user did not give out of the namespace, so a --config file is
        # overridden only by what was actually typed.
        kwargs = {"default": argparse.SUPPRESS, "help": help_text.replace("%", "%%"), "dest": field.name}
        hint = hints[field.name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.name == "compare":
            kwargs["metavar"] = "MODES"
        elif int in typing.get_args(hint) or hint is int:
            kwargs["type"] = int
        elif float in typing.get_args(hint) or hint is float:
            kwargs["type"] = float
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        parser.add_argument(_flag(field.name), **kwargs)
    for name, ours in TRAINING_ARGUMENTS_NAMES.items():  # for users who bring transformers' names
        parser.add_argument(_flag(name), dest=ours, default=argparse.SUPPRESS, help=f"the same as {_flag(ours)}",
                            type=type(getattr(defaults, ours)))
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="YAML or JSON file of settings (keys as above, with - or _); flags given here win")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its checkpoints (its saved config is the base; "
                             "--epochs / --max-steps may extend it)")


RESUMABLE_CHANGES = {"epochs", "max_steps", "device", "progress", "compare", "cache_dir", "output_dir", "dist_timeout",
                     "grad_accumulation"}


def resolve_config(args) -> DistillConfig:
    from pathlib import Path

    from ..errors import UsageError
    from ..train.config import ConfigError, canonical, read_config_file, resolve

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if hasattr(args, f.name)}
    if not args.resume:
        return resolve(flags, args.config_file)
    if not flags.get("output_dir"):
        raise UsageError("--resume needs --output-dir, the folder of the run to continue")
    saved = Path(flags["output_dir"]) / "config.json"
    if not saved.is_file():
        raise UsageError(f"--resume: {flags['output_dir']} holds no config.json, so it is not a run to continue")
    base = DistillConfig().updated(read_config_file(saved), source=str(saved))
    changes = dict(read_config_file(args.config_file)) if args.config_file else {}
    changes.update(flags)
    changes = canonical(changes)
    fixed = sorted(k for k, v in changes.items() if k not in RESUMABLE_CHANGES and getattr(base, k, v) != v)
    if fixed:
        raise ConfigError(f"--resume cannot change {', '.join(fixed)} of a run (only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))}); start a new run in another --output-dir")
    return base.updated(changes, source="the command line").validate()


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..distributed import PeerLost, launched_world
    from ..errors import UsageError
    from ..train import checkpoint
    from ..train.loop import NonFiniteTraining, run as run_distillation
    from ..train.stopping import TrainingInterrupted

    config = resolve_config(args)
    main = launched_world().is_main  # under torchrun, rank 0 speaks for the run
    try:
        summary = run_distillation(config, resume=args.resume)
    except checkpoint.CheckpointError as err:
        raise UsageError(f"{err}; delete it to start over, or pass another --output-dir") from None
    except PeerLost as err:
        print(f"sage-fast distill: {err}", file=sys.stderr)
        return 1
    except NonFiniteTraining as err:
        # Exit 1, not 2: the command was valid, the training failed (as any crash would).
        print(f"sage-fast distill: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        if main:
            print(f"\nsage-fast distill: {_signal_name(stop)}{stop}", file=sys.stderr)
        return _exit_code(stop)
    except KeyboardInterrupt as stop:
        # Before the first checkpoint (data, teacher, teacher outputs) or at a second Ctrl-C.
        out = config.output_dir
        if out and (Path(out) / "config.json").is_file():
            hint = f"continue with: sage-fast distill --resume --output-dir {out}"
        else:
            hint = "nothing was saved yet; run the same command again"
        print(f"\nsage-fast distill: {_signal_name(stop)}interrupted; {hint}", file=sys.stderr)
        return _exit_code(stop)
    if not main:
        return 0
    print()
    print(summary["table"])
    out = summary["output_dir"]
    main_mode = config.mode
    print(f"\nresults: {out}/results.json, metrics: {out}/<mode>/metrics.jsonl")
    print(f"next: sage-fast export {summary['trained'][main_mode]} --out {out}/{main_mode}/student   "
          f"(a standard Hugging Face model)")
    if main_mode != "kd":
        print(f"      sage-fast analyze {out}/{main_mode}   (the loss map of the trained student)")
    return 0


def _signal_name(stop: KeyboardInterrupt) -> str:
    signum = getattr(stop, "signum", signal.SIGINT)
    return "" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received; "


def _exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number, the status a shell reports for a process a signal ended: 130 after
    Ctrl-C, 143 after SIGTERM, so schedulers and scripts read a pre-empted run as they expect, even
    though it stopped cleanly and wrote a checkpoint."""
    return 128 + int(getattr(stop, "signum", signal.SIGINT))
