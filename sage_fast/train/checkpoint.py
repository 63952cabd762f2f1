"""Checkpoints that a crash cannot corrupt, and the random-number state that makes resuming exact.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then moved
over the previous one with ``os.replace`` (atomic on POSIX and Windows) and the directory fsync'ed.
A crash at any moment leaves either the old checkpoint or the new one, never a torn file. A writer
killed mid-write leaves its temporary behind; the name of each temporary carries its writer's process
id, so ``remove_stale_temporaries`` can delete those of writers that are gone (the driver does, on
start and resume) without touching one a live process is still writing.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .config import MODES
from .run_lock import process_alive

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def save_atomic(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise fully first: a failure here never touches the disk
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(directory: str | Path, name: str = CHECKPOINT_NAME, *, older_than: float = 0.0
                             ) -> list[Path]:
    """Delete the temporaries that ``save_atomic`` left in ``directory`` for ``name`` (a file name, or
    a glob of file names) when its writer was killed mid-write; returns them. One whose writer
    (named in the file name) still runs on this host is kept: it may be a write in progress. One
    without a writer in its name was left by an earlier version of this module and is removed too:
    call this where no such version can be writing (the driver does while it holds the run folder's
    lock). With ``older_than``, only temporaries untouched for that many seconds go: in a cache
    that processes of other hosts may share, a writer's process id says nothing there."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for tmp in directory.glob(f".{name}.*.tmp"):
        # ".<name>.<pid>.<random>.tmp", and mkstemp's random part holds no dot: the writer is the
        # second part from the end, whatever ``name`` is (a glob such as "teacher-*.pt" too).
        writer = tmp.name[:-len(".tmp")].split(".")[-2]
        if (writer.isdigit() and process_alive(int(writer))) or not _untouched_for(tmp, older_than):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and harmless to skip there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointError(UsageError, ValueError):
    """A checkpoint that is missing, unreadable, or not one sage-fast wrote; the message says which."""


# What every checkpoint of the training driver holds, whatever its mode, with the type each entry
# must have. A dict lacking one (another program's file, a hand-edited one) is refused when loaded,
# not with a KeyError in the middle of a resume.
REQUIRED = {"mode": str, "config": dict, "global_step": int, "epoch": int, "step_in_epoch": int,
            "total_steps": int, "done": bool, "examples_seen": dict, "student": dict, "adapter": dict, "loss": dict,
            "optimizer": dict, "scheduler": dict, "rng": dict, "metrics": list, "timer": dict}


def load(path: str | Path, map_location="cpu", required: dict[str, type] | None = None) -> dict:
    """The checkpoint at ``path`` (a file, or a folder holding ``checkpoint.pt``), checked to hold
    every ``required`` entry (default ``REQUIRED``) with its type; a CheckpointError otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a foreign or damaged file: say so plainly
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a sage-fast checkpoint of format {FORMAT_VERSION}")
    required = REQUIRED if required is None else required
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a whole sage-fast checkpoint: it lacks {', '.join(missing)}")
    wrong = [f"{key} ({type(state[key]).__name__}, expected {kind.__name__})" for key, kind in required.items()
             if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool))]
    if wrong:
        raise CheckpointError(f"{path} is not a whole sage-fast checkpoint: wrong entries {', '.join(wrong)}")
    problem = _driver_problem(state) if required is REQUIRED else None
    if problem:
        raise CheckpointError(f"{path} is not a whole sage-fast checkpoint: {problem}")
    return state


def _driver_problem(state: dict) -> str | None:
    """What is wrong inside the entries the driver reads first, or None."""
    if state["mode"] not in MODES:
        return f"mode {state['mode']!r} is none of {', '.join(MODES)}"
    negative = [key for key in ("global_step", "epoch", "step_in_epoch", "total_steps") if state[key] < 0]
    if negative:
        return f"{', '.join(negative)} below 0"
    lacking = [key for key in ("python", "numpy", "torch") if key not in state["rng"]]
    if lacking:
        return f"its random-number states lack {', '.join(lacking)}"
    if not all(isinstance(record, dict) for record in state["metrics"]):
        return "its metrics are not records"
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ folders
# A folder written whole (a cached teacher, an export) is made in a staging sibling named
# ".<name>.<pid>.<random>" and renamed into place when complete; a killed writer's staging folder is
# found by its process id and removed.
def staging_prefix(folder: Path) -> str:
    return f".{Path(folder).name}.{os.getpid()}."


def _untouched_for(path: Path, seconds: float) -> bool:
    if seconds <= 0:
        return True
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


# What a shared cache waits before it takes a writer for dead: another host's live writer has a
# process id that means nothing here, but it touches its staging folder far more often than this.
CACHE_STALE_SECONDS = 3600.0


def remove_stale_staging(root: str | Path, name: str = "*", *, log=print, what: str = "",
                         older_than: float = 0.0) -> list[Path]:
    """Remove the staging folders in ``root`` (of ``name``, or of any name) whose writer is gone
    (and, with ``older_than``, untouched for that many seconds); one whose writer still runs on this
    host is kept."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for staging in root.glob(f".{name}.*.*"):
        parts = staging.name.split(".")
        if not staging.is_dir() or len(parts) < 4 or not parts[-2].isdigit() or process_alive(int(parts[-2])):
            continue
        if not _untouched_for(staging, older_than):
            continue
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    if removed:
        log(f"removed {len(removed)} unfinished {what + ' ' if what else ''}folder(s) that killed processes left "
            f"in {root}")
    return removed


def publish_folder(staging: Path, folder: Path, *, replace: bool = True, keep=None) -> None:
    """Move the finished ``staging`` folder to ``folder``. When ``folder`` is there and ``keep(folder)``
    says it is already what ``staging`` holds (another process made the same thing meanwhile), it is
    kept unless ``replace``. A folder replaced is first renamed aside, in one step, and only then
    deleted: a reader finds the old folder or the new one, never a half-written or half-deleted one,
    files it has open stay readable, and a kill at any moment loses neither."""
    for _ in range(3):
        try:
            os.rename(staging, folder)  # fails while a folder with files is there
            return
        except OSError:
            if not folder.exists():
                continue  # removed meanwhile: try again
        if not replace and keep is not None and keep(folder):
            shutil.rmtree(staging, ignore_errors=True)
            return
        aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=staging_prefix(folder)))
        try:
            try:
                os.rename(folder, aside / "old")
            except FileNotFoundError:
                pass
            try:
                os.rename(staging, folder)
                return
            except OSError:
                continue  # another writer got in between: look again
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    raise UsageError(f"could not move the finished folder into {folder}: other processes keep writing there")
