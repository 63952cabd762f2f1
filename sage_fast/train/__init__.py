"""The training driver's foundation: task data, Hugging Face models behind a vector interface,
teacher fine-tuning and export. Importing this package is cheap; transformers and datasets are
imported by the functions that need them."""
from __future__ import annotations

from ..errors import UsageError


class DataError(UsageError):
    """The task data cannot be read or does not fit what was asked for."""


class ModelError(UsageError):
    """A model cannot be found, loaded or combined as asked."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("this needs Hugging Face transformers: pip install 'sage-fast[train]'") from None
    return transformers


__all__ = ["DataError", "ModelError", "UsageError", "require_transformers"]
