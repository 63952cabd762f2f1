import os

import torch

# Without a GPU the Triton kernels run through the interpreter; this must be set before any module
# that defines a @triton.jit function is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sage_fast.assets import cache_root  # noqa: E402
from sage_fast.regions import use_compilation_cache  # noqa: E402

# umap-learn's and pynndescent's numba compilations, loaded from disk after the first run
use_compilation_cache(cache_root() / "numba")

SEEDS = (0, 1, 2)


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def seed(request):
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def cuda_by_default():
    """Tensors made without an explicit device land on the GPU when there is one, so that tests written
    for CPU tensors (the interpreter in CI) exercise the compiled kernels on a GPU machine."""
    if not torch.cuda.is_available():
        yield
        return
    with torch.device("cuda"):
        yield
