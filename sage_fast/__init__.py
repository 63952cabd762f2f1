"""sage_fast: fast SAGE (Synthetic Adaptive Guided Embeddings) knowledge distillation.

- ``sage_fast.ops`` / ``sage_fast.functional``: fused distillation losses and synthetic
  interpolation (Triton on CUDA, plain torch on CPU).
- ``sage_fast.nn``: ``SAGELoss``, the module that turns Hugging Face outputs into the SAGE loss.
- ``sage_fast.regions``: the loss-region analysis (error profile, kNN, UMAP, anchor sampling).
"""
from ._backend import decide, use_backend

__version__ = "0.1.0"
__all__ = ["__version__", "decide", "use_backend"]
