"""The harness itself: a copy measured against a clone, so the table's columns are exercised."""
import harness
import pytest
import torch
from harness import DEVICE, measure, scaled


@pytest.mark.parametrize("impl", ["clone", "copy_"])
def test_copy(benchmark, impl):
    x = torch.randn(scaled(1 << 22), device=DEVICE)
    out = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()
    fn = (lambda: x.clone()) if impl == "clone" else (lambda: out.copy_(x))
    measure(benchmark, "harness: copy 16 MB", impl, fn, bytes_moved=nbytes, baseline=impl == "clone")


def test_table_and_pytest_benchmark_read_one_clock(benchmark, request):
    x = torch.randn(scaled(1 << 16), device=DEVICE)
    result = measure(benchmark, "harness: one clock", "clone", lambda: x.clone(), baseline=True)
    # what the numbers mean travels with them
    assert benchmark.extra_info["clock"] == harness.CLOCK and benchmark.extra_info["scale"] == harness.SCALE
    if not benchmark.disabled:  # with statistics: the table's time is pytest-benchmark's median
        assert request.config.option.benchmark_timer == "harness.benchmark_clock"
        assert result.seconds == benchmark.stats.stats.median
