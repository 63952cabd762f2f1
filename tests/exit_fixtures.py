"""Programs that end while one of the package's threads is inside torch calls. The interpreter ends
a daemon thread there by aborting the whole process ("terminate called without an active
exception"); these run such a program in a fresh interpreter and report how it ended."""
import subprocess
import sys
from pathlib import Path

BUSY_SECONDS = 1.5  # the thread's work, inside torch calls; the program leaves after 0.3 s


def busy_function(name: str, done: Path, then: str = "None") -> str:
    """Source of ``def name(*args, **kwargs)``: torch calls for BUSY_SECONDS, then ``done`` is
    created and ``then`` (an expression over args and kwargs) returned."""
    return (f"def {name}(*args, **kwargs):\n"
            "    import time, torch\n"
            f"    a, until = torch.randn(200, 200), time.perf_counter() + {BUSY_SECONDS}\n"
            "    while time.perf_counter() < until:\n"
            "        a = torch.tanh(a @ a)\n"
            f"    result = {then}\n"
            f"    open({str(done)!r}, 'w').close()\n"
            "    return result\n")


def run_until_exit(script: str) -> subprocess.CompletedProcess:
    """``script``, then 0.3 s later the end of the program, with the thread still busy."""
    script += "import time\ntime.sleep(0.3)\nprint('leaving')\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def assert_waited_and_exited_cleanly(out: subprocess.CompletedProcess, done: Path) -> None:
    assert out.returncode == 0 and "terminate" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.strip() == "leaving" and done.exists(), "the program did not wait for the thread"
