"""Synthesis at the scale of a transfer set: how many rows a round makes when the volume is given
per epoch, as a multiple of the real training rows."""
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
