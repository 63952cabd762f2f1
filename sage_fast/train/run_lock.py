"""One training process per run folder: an advisory lock file that names its holder.

Two ``sage-fast distill`` processes writing the same ``--output-dir`` would interleave their metrics
and overwrite each other's config, checkpoints and results. The driver therefore holds
``<output-dir>/.sage-fast.lock`` while it runs. The file holds the process id and host of its holder,
so a refused second process can say who holds the folder.

The lock itself is the kernel's (``fcntl.flock``): it is released whenever its holder ends, even
killed with SIGKILL, so a lock file left by a dead process is taken over (with a message naming it)
and never needs removing by hand. Where the file system has no such locks (``flock`` fails with
ENOLCK or EOPNOTSUPP, as on some network mounts, or the platform lacks ``fcntl``), the file itself is
the lock: created with O_EXCL, and taken over only when it names a process of this host that is gone
(two processes taking over the same dead holder's file in the same instant could both succeed there;
the kernel's lock has no such gap).
"""
from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from ..errors import UsageError

try:
    import fcntl
except ImportError:  # Windows: only the lock-file fallback
    fcntl = None

LOCK_NAME = ".sage-fast.lock"


class RunFolderBusy(UsageError):
    """Another live process holds the run folder; the message names it."""


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (when unknown, assume it does)."""
    if pid <= 0:
        return False
    if os.name != "posix":  # os.kill(pid, 0) would not just probe there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"


class RunLock:
    """``with RunLock(folder, log=print):`` holds ``folder`` for this process or raises RunFolderBusy.

    ``log`` receives the message when a stale lock of a dead process is taken over."""

    def __init__(self, folder: str | Path, log=print):
        self.folder, self.log = Path(folder), log
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def _me(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def _busy(self, holder: dict, lock_file_only: bool = False) -> RunFolderBusy:
        if holder:
            who = _describe(holder)
        elif lock_file_only:  # no kernel lock to vouch for a holder: the file may be a crash's leftover
            who = f"a process {self.path} does not name; remove that file if no run uses the folder"
        else:  # the holder has locked the file and not yet written its name
            who = "a process that is starting"
        return RunFolderBusy(
            f"{self.folder} is in use by another run ({who}): two runs in one folder would mix their metrics and "
            f"overwrite each other's checkpoints and results. Wait for it to end or stop it (Ctrl-C or SIGTERM "
            f"writes a checkpoint; then continue with --resume), or choose another --output-dir.")

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # each pass starts over after a holder left between our steps
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            try:
                taken = self._take(fd, created)
            except BaseException:
                os.close(fd)
                raise
            if taken:
                self._fd = fd
                return self
            os.close(fd)
        raise self._busy(self._read(), lock_file_only=True)

    def _take(self, fd: int, created: bool) -> bool:
        """Lock the open file ``fd``: True when held now, False to start over, RunFolderBusy when
        another process holds it."""
        if self._kernel_lock(fd):
            # The holder before us may have removed the file between our open and our lock: then
            # we locked a file nobody else can see; start again on the one at the path now.
            try:
                if not os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return False
            except FileNotFoundError:
                return False
            previous = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            if previous:  # a holder that ended without removing the file: killed, or its machine went down
                self._taking_over(previous)
        elif not created:  # no kernel locks here: the file is the lock, and it exists
            holder = self._read()
            pid = holder.get("pid")
            if not (holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_alive(pid)):
                raise self._busy(holder, lock_file_only=True)
            self._taking_over(holder)
            self.path.unlink(missing_ok=True)
            return False
        self._write(fd)
        return True

    def _kernel_lock(self, fd: int) -> bool:
        """Whether ``fd`` now holds the kernel's lock; False where this file system has none."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(_holder(os.pread(fd, 4096, 0).decode(errors="replace"))) from None
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise
        return True

    def _taking_over(self, holder: dict) -> None:
        self.log(f"{self.folder}: taking over the lock left by {_describe(holder)}, which is no longer running")

    def _read(self) -> dict:
        try:
            return _holder(self.path.read_text(errors="replace"))
        except FileNotFoundError:
            return {}

    def _write(self, fd: int) -> None:
        data = json.dumps(self._me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held, so a process waiting on this file finds it gone and starts over.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
