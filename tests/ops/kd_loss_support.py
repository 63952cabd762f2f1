"""What the kd_loss test files share: the op on a backend against its float64 composition, and outputs
poisoned before the op writes them."""
import importlib

import pytest
import torch

from sage_fast import use_backend
from sage_fast.ops.kd_loss import kd_loss, kd_loss_reference

kd_module = importlib.import_module("sage_fast.ops.kd_loss")


def run(backend, student, teacher, labels, **kw):
    """(per-row losses, d(sum of losses)/d student) from kd_loss on ``backend``."""
    s = student.detach().clone().requires_grad_(True)
    with use_backend(backend):
        loss = kd_loss(s, teacher, labels, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def reference(student, teacher, labels, **kw):
    s = student.detach().double().requires_grad_(True)
    loss = kd_loss_reference(s, teacher.double(), labels, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def poison_outputs(monkeypatch):
    """Outputs filled with NaN before the op writes them, so that an element it leaves unwritten shows."""
    empty_outputs = kd_module._empty_outputs

    def poisoned(*args, **kwargs):
        per_row, grad = empty_outputs(*args, **kwargs)
        per_row.fill_(float("nan"))
        if grad is not None:
            grad.fill_(float("nan"))
        return per_row, grad

    monkeypatch.setattr(kd_module, "_empty_outputs", poisoned)


def assert_refused_before_launch(monkeypatch, name, call):
    """``call`` raises a ValueError naming ``name`` before either path of the op runs."""
    def no_launch(*args, **kwargs):
        raise AssertionError("launched before validating")

    monkeypatch.setattr(kd_module, "_forward_triton", no_launch)
    monkeypatch.setattr(kd_module, "_forward_torch", no_launch)
    with pytest.raises(ValueError, match=name):
        call()


def assert_no_host_sync(step):
    """``step`` a second time makes the host wait for the device nowhere (the first call for a key
    tunes the kernel, which synchronises)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
