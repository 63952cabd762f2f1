"""Which implementation an op runs, and why.

CUDA tensors run the Triton kernels. CPU tensors run the plain-torch path, unless
``TRITON_INTERPRET=1`` is set, in which case the Triton kernels run through Triton's interpreter
(this is how the kernels are tested on machines without a GPU). ``SAGE_FAST_BACKEND=torch`` or
``use_backend("torch")`` forces the plain-torch path everywhere, for comparisons.

Under ``torch.compile`` the decision is made while tracing and is part of the compiled code: the
forced backend is a thread-local value that dynamo reads and guards, so a compiled function called
inside a different ``use_backend`` block than before compiles once more for it, and a
``use_backend`` block inside a compiled function applies to the ops it encloses. The environment
variables are read when a function is compiled (set them before that, as for ``TRITON_INTERPRET``).

triton is optional: without it the package imports and CPU tensors take the plain-torch path, while
an op on CUDA tensors raises an ``ImportError`` that names the package to install (a silent fall back
to the slow path would hide a broken install), unless the plain-torch path is forced.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "torch")


class _ForcedBackend(threading.local):
    """The backend ``use_backend`` forces in this thread; ``None`` where none is forced. A thread-local
    rather than a ``ContextVar`` because dynamo can read and guard it (a ``ContextVar`` splits the
    graph). The attribute is set in ``__init__``, so that every thread holds it from the start:
    dynamo guards an attribute's value, but mishandles one that appears inside a compiled block."""

    def __init__(self):
        self.name: str | None = None


_forced = _ForcedBackend()


@dataclass(frozen=True)
class Decision:
    backend: str  # "triton", "torch", or "unavailable" (CUDA tensors without triton)
    reason: str


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether triton imports, once known. A module value rather than functools.lru_cache, which dynamo
# traces through with a warning each time a function is compiled.
_triton_imports: bool | None = None


def triton_available() -> bool:
    """Whether triton imports here (an install that fails to import counts as absent)."""
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401 - imported only to learn whether it can be; the ops hold their own
            _triton_imports = True
        except Exception:  # noqa: BLE001 - ImportError, or whatever a broken install raises
            _triton_imports = False
    return _triton_imports


MISSING_TRITON = ("sage_fast runs CUDA tensors through Triton kernels, and triton is not installed here: "
                  "pip install triton (or force the plain-torch path with SAGE_FAST_BACKEND=torch or "
                  "sage_fast.use_backend('torch'))")


def requested_backend() -> str:
    name = _forced.name or os.environ.get("SAGE_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"SAGE_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``"triton"``, ``"torch"`` or ``"auto"`` for the ops this thread calls inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = _forced.name
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


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
