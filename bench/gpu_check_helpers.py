"""Helpers of ``bench/gpu_check.sh``.

As a pytest plugin (``-p gpu_check_helpers``, with ``bench/`` on ``PYTHONPATH``): with
``SAGE_FAST_GPU_CHECK_MAX_TESTS=N`` only the first N selected tests run, the rest deselected. The
dry run uses it so that each step proves its plumbing with a few tests rather than timing out.

As a script, ``python bench/gpu_check_helpers.py selections NAME FILE EXPR [NAME FILE EXPR ...]``
collects each benchmark selection for a CUDA device (collection needs none) in one process and prints
``NAME COUNT`` per selection: a selection the GPU run would find empty shows up on any machine.
"""
from __future__ import annotations

import os
import sys

import pytest


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config, items):
    limit = os.environ.get("SAGE_FAST_GPU_CHECK_MAX_TESTS")
    if not limit or len(items) <= int(limit):
        return
    kept, dropped = items[:int(limit)], items[int(limit):]
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


class _Count:
    def __init__(self):
        self.count = 0

    def pytest_collection_finish(self, session):
        self.count = len(session.items)


def selections(args: list[str]) -> int:
    if len(args) % 3:
        print("usage: gpu_check_helpers.py selections NAME FILE EXPR [NAME FILE EXPR ...]", file=sys.stderr)
        return 2
    # The suites choose their shapes from the device when imported: a CUDA device, before any import.
    os.environ["SAGE_FAST_BENCH_DEVICE"] = "cuda"
    empty = 0
    for name, path, expr in zip(args[0::3], args[1::3], args[2::3]):
        counter = _Count()
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                pytest.main(["-q", "--collect-only", "-p", "no:cacheprovider", path, "-k", expr], plugins=[counter])
            finally:
                sys.stdout = stdout
        print(name, counter.count, flush=True)
        empty += counter.count == 0
    return 1 if empty else 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "selections":
        sys.exit("usage: python bench/gpu_check_helpers.py selections NAME FILE EXPR [...]")
    sys.exit(selections(sys.argv[2:]))
