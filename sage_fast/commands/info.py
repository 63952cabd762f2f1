"""Print versions, the devices torch sees, and which implementation each op runs on each device and why."""
from __future__ import annotations

import importlib
import importlib.metadata
import platform

from .. import __version__
from .._backend import decide, interpreter_enabled

# fused_linear_kd_loss runs its head GEMMs in torch and each chunk's loss on kd_loss's path
OPS = ("kd_loss", "fused_linear_kd_loss", "align_loss", "interpolate")
PACKAGES = ("torch", "triton", "numpy", "transformers", "datasets", "umap-learn", "cupy-cuda12x", "cuml-cu12",
            "cupy-cuda13x", "cuml-cu13", "matplotlib", "liger-kernel", "trl")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    import torch

    lines = [f"sage_fast {__version__}  (python {platform.python_version()}, {platform.machine()})", "", "packages:"]
    lines += [f"  {name:<14} {_version(name)}" for name in PACKAGES]
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        lines += ["", "devices:"] + [f"  cuda:{i}  {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        lines += ["", "devices:", "  no CUDA device visible: ops run on the CPU"]
    lines += ["", f"TRITON_INTERPRET={'1' if interpreter_enabled() else 'unset'}", "", "op paths:"]
    for device in devices:
        d = decide(device)
        for op in OPS:
            lines.append(f"  {op:<20} {device:<7} -> {d.backend:<6} ({d.reason})")
    try:
        regions = importlib.import_module("sage_fast.regions")
        describe = getattr(regions, "describe_backends", None)
        if describe is not None:
            lines += ["", "loss-region analysis:"] + [f"  {line}" for line in describe()]
    except ImportError:
        pass
    return "\n".join(lines)


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    print(report())
    return 0
