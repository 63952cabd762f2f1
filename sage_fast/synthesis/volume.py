"""Synthesis at the scale of a transfer set: how many rows a round makes when the volume is given
per epoch, as a multiple of the real training rows, and how many synthetic rows a step takes when
their share of the step is given."""
from __future__ import annotations

import math

from .. import _checks


def rows_per_round(volume: float, num_examples: int, steps_per_epoch: int, interval: int) -> int:
    """Rows each round makes so that the rounds of an epoch (one every ``interval`` of its
    ``steps_per_epoch`` steps) make ``volume`` times the ``num_examples`` real rows together."""
    volume = _checks.in_range("volume", volume, 0.0, math.inf, lo_open=True, hi_open=True)
    _checks.integer("num_examples", num_examples, minimum=1)
    _checks.integer("steps_per_epoch", steps_per_epoch, minimum=1)
    _checks.integer("interval", interval, minimum=1)
    rounds = max(1.0, steps_per_epoch / interval)
    return max(1, math.ceil(volume * num_examples / rounds))


def synthetic_rows_per_step(batch_size: int, share: float) -> int:
    """Synthetic rows added to a step of ``batch_size`` real rows so that ``share`` of the step's
    rows are synthetic: ``share / (1 - share)`` of them per real row, rounded to the nearest."""
    _checks.integer("batch_size", batch_size, minimum=1)
    share = _checks.in_range("share", share, 0.0, 1.0, hi_open=True)
    return int(math.floor(batch_size * share / (1.0 - share) + 0.5))
