"""Argument checks shared by the ops. Each raises ``ValueError`` naming the argument, before any
kernel launch, and never modifies what it checks."""
from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(name: str, value, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def same_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def non_empty(name: str, value: torch.Tensor, dim: int = 0) -> None:
    if value.shape[dim] == 0:
        raise ValueError(f"{name} is empty (size 0 along dimension {dim}); pass at least one row")


def finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf); they must all be finite")


def in_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    lo_ok = value > lo if lo_open else value >= lo
    hi_ok = value < hi if hi_open else value <= hi
    if not (lo_ok and hi_ok) or value != value:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")
    return value


def choice(name: str, value, options: Iterable) -> None:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, never a count to us)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value}")
    return value


# ------------------------------------------------------------------------------ value checks
# Checks of tensor *values* (finiteness, label ranges, mask values) need the values on the host: on
# CUDA that is a device synchronisation per call, which a training step must not pay. So they run
# where they are free (CPU tensors) and, on CUDA, only when asked: SAGE_FAST_CHECK_VALUES=1 or
# ``sage_fast.check_values(True)``. Shape, dtype and device checks always run: they cost nothing.
_VALUE_CHECKS: bool | None = None  # None: follow the environment variable


def check_values(enabled: bool | None) -> None:
    """Turn value checks on CUDA tensors on (``True``), off (``False``), or back to the environment
    variable ``SAGE_FAST_CHECK_VALUES`` (``None``). CPU tensors are always checked."""
    global _VALUE_CHECKS
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True, False or None, got {enabled!r}")
    _VALUE_CHECKS = enabled


def values_checked(value: torch.Tensor) -> bool:
    """Whether value checks run for ``value``: always on the CPU, on other devices when asked."""
    if value.device.type == "cpu":
        return True
    if _VALUE_CHECKS is not None:
        return _VALUE_CHECKS
    import os

    return os.environ.get("SAGE_FAST_CHECK_VALUES", "") not in ("", "0")
