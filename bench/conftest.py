import os
import sys

# Benchmarks time the real paths: the Triton interpreter would time Python, not kernels.
if os.environ.pop("TRITON_INTERPRET", None) == "1":
    print("bench: ignoring TRITON_INTERPRET=1 (benchmarks time compiled kernels or the CPU path)", file=sys.stderr)

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import torch  # noqa: E402

if harness.DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("SAGE_FAST_BENCH_THREADS", "1")))


def pytest_terminal_summary(terminalreporter):
    text = harness.table()
    if not text:
        return
    terminalreporter.section("sage_fast: ratios against the baseline of each group (same run)")
    terminalreporter.write_line(text)
    path = os.environ.get("SAGE_FAST_BENCH_TABLE")
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")
