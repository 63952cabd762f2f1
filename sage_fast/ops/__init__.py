"""Fused ops: each dispatches to a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) or to its
plain-torch reference (CPU). Import them from here or from ``sage_fast.functional``.

triton is optional: each module defines its kernels only when triton imports, so without it CPU
tensors take the plain-torch path and CUDA tensors raise an ImportError naming the package."""
__all__: list[str] = []

from .interpolate import interpolate, interpolate_reference  # noqa: E402

__all__ += ["interpolate", "interpolate_reference"]

from .align_loss import align_loss, align_loss_reference  # noqa: E402

__all__ += ["align_loss", "align_loss_reference"]

from .kd_loss import kd_loss, kd_loss_reference  # noqa: E402

__all__ += ["kd_loss", "kd_loss_reference"]

from .fused_linear_kd_loss import fused_linear_kd_loss, fused_linear_kd_loss_reference  # noqa: E402

__all__ += ["fused_linear_kd_loss", "fused_linear_kd_loss_reference"]
