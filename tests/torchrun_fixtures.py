"""Launching real `torchrun` runs from tests: start, wait, find a rank's process, and never leave
workers behind (torchrun starts each worker in its own session, so ending the launcher's process
group does not end them)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LAUNCH_LIMIT = 300  # seconds one launch may take on a loaded two-core machine


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    """The command that runs ``python -m <args>`` (or a script) under torchrun on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--monitor-interval", "0.2", *args]


def launch(command: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), **kwargs)


def rank_pids(agent_pid: int) -> dict[int, int]:
    """The worker processes torchrun started, by their RANK (empty once they have ended)."""
    pids = {}
    try:
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                pids[int(entry[5:])] = int(child)
    return pids


def kill_run(process: subprocess.Popen) -> None:
    """End a launch and every worker it started."""
    for pid in rank_pids(process.pid).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.kill()


def finish(process: subprocess.Popen, limit: float = LAUNCH_LIMIT) -> tuple[int, str, str]:
    """Wait for a launch; past ``limit`` seconds it is killed, workers and all, and the test fails."""
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_run(process)
        out, err = process.communicate()
        raise AssertionError(f"the run took more than {limit} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return process.returncode, out, err


def run_to_end(command: list[str]) -> tuple[str, str]:
    code, out, err = finish(launch(command))
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def wait_for(path: Path, process: subprocess.Popen, limit: float = LAUNCH_LIMIT) -> None:
    """Until ``path`` exists; fails if the run ends first or ``limit`` passes."""
    deadline = time.monotonic() + limit
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before {path.name} appeared:\n"
                                 + process.stderr.read()[-3000:])
        if time.monotonic() > deadline:
            kill_run(process)
            raise AssertionError(f"no {path} after {limit} s")
        time.sleep(0.05)
