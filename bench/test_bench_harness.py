"""The harness itself: a copy measured against a clone, so the table's columns are exercised."""
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
