"""sage_fast: fast SAGE (Synthetic Adaptive Guided Embeddings) knowledge distillation.

- ``sage_fast.ops`` / ``sage_fast.functional``: fused distillation losses and synthetic
  interpolation (Triton on CUDA, plain torch on CPU).
- ``sage_fast.nn``: ``SAGELoss``, the module that turns Hugging Face outputs into the SAGE loss.
- ``sage_fast.regions``: the loss-region analysis (error profile, kNN, UMAP, anchor sampling).
"""
from ._backend import decide, use_backend

__version__ = "0.1.0"
__all__ = ["__version__", "check_values", "decide", "use_backend"]


def __getattr__(name: str):
    # check_values lives with the checks, which import torch: resolved on first use so that
    # ``import sage_fast`` (and ``sage-fast --help``) stays free of torch.
    if name == "check_values":
        from ._checks import check_values

        return check_values
    raise AttributeError(f"module 'sage_fast' has no attribute {name!r}")
