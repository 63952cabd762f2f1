"""The one device resolver of the command line and the training driver: ``auto``, ``cpu``, ``cuda``
or ``cuda:N``, everywhere, with one message."""
from __future__ import annotations

import re

from .errors import UsageError

DEVICE_HELP = "auto (CUDA when visible, else CPU), cpu, cuda, or cuda:N"
# "cpu:0" is how torch (and a Trainer under torchrun) names the CPU too
_DEVICE_NAME = re.compile(r"(auto|cpu(:0)?|cuda(:\d+)?)")


class DeviceError(UsageError, ValueError):
    """A device name that is not one of auto, cpu, cuda, cuda:N, or a device torch cannot use."""


def check_device(device) -> str:
    """``device`` if it is a device name we accept, else a DeviceError. Needs no torch, so a config
    is checked before anything heavy is imported; whether the device exists is ``resolve_device``'s."""
    if not isinstance(device, str) or not _DEVICE_NAME.fullmatch(device):
        raise DeviceError(f"device must be {DEVICE_HELP}; got {device!r}")
    return device


def resolve_device(device):
    """``device`` (None or "auto": CUDA when visible) as a ``torch.device``, refused when torch cannot use it."""
    # torch is imported here, not at module import: the command line checks device names while
    # parsing, and importing torch costs seconds there.
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        device = str(device)
    chosen = torch.device(check_device(device))
    if chosen.type == "cpu":
        return torch.device("cpu")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (chosen.index or 0) >= count:
            raise DeviceError(f"device {device} was asked for but torch sees {count} CUDA device(s); "
                              "use --device cpu, or auto (the default) to take CUDA when it is there")
    return chosen


__all__ = ["DEVICE_HELP", "DeviceError", "check_device", "resolve_device"]
