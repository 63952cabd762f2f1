"""Which implementation an op runs, and why.

CUDA tensors run the Triton kernels. CPU tensors run the plain-torch path, unless
``TRITON_INTERPRET=1`` is set, in which case the Triton kernels run through Triton's interpreter
(this is how the kernels are tested on machines without a GPU). ``SAGE_FAST_BACKEND=torch`` or
``use_backend("torch")`` forces the plain-torch path everywhere, for comparisons.

triton is optional: without it the package imports and CPU tensors take the plain-torch path, while
an op on CUDA tensors raises an ``ImportError`` that names the package to install (a silent fall back
to the slow path would hide a broken install), unless the plain-torch path is forced.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "torch")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sage_fast_backend", default=None)


@dataclass(frozen=True)
class Decision:
    backend: str  # "triton", "torch", or "unavailable" (CUDA tensors without triton)
    reason: str


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton imports here (an install that fails to import counts as absent)."""
    try:
        import triton  # noqa: F401 - imported only to learn whether it can be; the ops hold their own
    except Exception:  # noqa: BLE001 - ImportError, or whatever a broken install raises
        return False
    return True


MISSING_TRITON = ("sage_fast runs CUDA tensors through Triton kernels, and triton is not installed here: "
                  "pip install triton (or force the plain-torch path with SAGE_FAST_BACKEND=torch or "
                  "sage_fast.use_backend('torch'))")


def requested_backend() -> str:
    name = _forced.get() or os.environ.get("SAGE_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"SAGE_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``"triton"``, ``"torch"`` or ``"auto"`` for the ops called inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def decide(device: torch.device | str) -> Decision:
    import torch  # here, not at import: `sage-fast --help` should not wait for torch

    device = torch.device(device)
    requested = requested_backend()
    if requested == "torch":
        return Decision("torch", "plain-torch path forced")
    runnable = (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())) and triton_available()
    if requested == "triton":
        if not runnable:
            raise ValueError(
                f"the Triton backend was forced but cannot run on {device.type} tensors: it needs CUDA "
                "tensors, or CPU tensors with TRITON_INTERPRET=1 set before sage_fast is imported, "
                "and the triton package installed"
            )
        return Decision("triton", "Triton forced")
    if device.type == "cuda":
        if runnable:
            return Decision("triton", "CUDA tensor: fused Triton kernel")
        return Decision("unavailable", MISSING_TRITON)
    if runnable:
        return Decision("triton", "CPU tensor with TRITON_INTERPRET=1: Triton kernel in the interpreter")
    if device.type == "cpu":
        return Decision("torch", "CPU tensor: plain-torch path")
    return Decision("torch", f"{device.type} tensor: plain-torch path")


def use_triton(device: torch.device | str) -> bool:
    """Whether an op on ``device`` runs its Triton kernel; raises ``ImportError`` for CUDA tensors
    where triton is missing."""
    decision = decide(device)
    if decision.backend == "unavailable":
        raise ImportError(decision.reason)
    return decision.backend == "triton"
