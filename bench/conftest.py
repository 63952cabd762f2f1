import os
import sys

# Benchmarks time the real paths: the Triton interpreter would time Python, not kernels.
if os.environ.pop("TRITON_INTERPRET", None) == "1":
    print("bench: ignoring TRITON_INTERPRET=1 (benchmarks time compiled kernels or the CPU path)", file=sys.stderr)

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if harness.DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("SAGE_FAST_BENCH_THREADS", "1")))

#: pytest-benchmark's default timer, as its option holds it.
_DEFAULT_TIMER = "time.perf_counter"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """pytest-benchmark times with the harness's clock (one clock for every table and for
    --benchmark-compare-fail), unless --benchmark-timer names another; the harness's table then reads
    pytest-benchmark's medians, so the two still agree."""
    if getattr(config.option, "benchmark_timer", None) == _DEFAULT_TIMER:
        config.option.benchmark_timer = "harness.benchmark_clock"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The settings that decide what the numbers mean, beside them in the JSON."""
    output_json["sage_fast"] = {"scale": harness.SCALE, "clock": harness.CLOCK, "rounds": harness.ROUNDS,
                                "device": str(harness.DEVICE), "timer": str(config.option.benchmark_timer)}


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
