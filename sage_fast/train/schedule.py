"""The learning-rate schedule of every optimizer the driver runs: the student's and the teacher's."""
from __future__ import annotations

from . import require_transformers


def linear_schedule(optimizer, total_steps: int, warmup_ratio: float, *, done_steps: int = 0):
    """Linear warm-up over ``int(warmup_ratio * total_steps)`` steps, then linear decay to 0, for an
    optimizer that has taken ``done_steps`` steps (a resumed or stretched run).

    This is transformers' ``get_linear_schedule_with_warmup`` one step ahead (``warmup + 1`` and
    ``total_steps + 1`` steps, started at step 1): theirs gives step ``s`` the factor ``s / warmup``,
    so the first step trains at a learning rate of 0; here step ``s`` gets ``(s + 1) / (warmup + 1)``
    in the warm-up and ``(total - s) / (total - warmup)`` after it."""
    transformers = require_transformers()  # imported on use: the driver's optional dependency
    warmup = int(warmup_ratio * total_steps)
    for group in optimizer.param_groups:  # a scheduler started past step 0 needs the base rate
        group.setdefault("initial_lr", group["lr"])
    return transformers.get_linear_schedule_with_warmup(optimizer, warmup + 1, total_steps + 1,
                                                        last_epoch=done_steps)
