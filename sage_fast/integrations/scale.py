"""Synthesis at the scale of a transfer set inside a ``transformers.Trainer``: the trainer's
``synthetic_share``, ``synthetic_volume`` and ``label_batch_size``, as the driver's flags of the
same names (``sage_fast.synthesis.volume`` holds the rules both follow).

A volume per epoch sizes each round from the run's rows and round schedule, and the synthesizer is
built with the trainer, before training begins; the schedule itself is fixed when training begins,
from the Trainer's own count of steps. Both must count alike, so :func:`trainer_steps` follows the
Trainer's rule: the rows each process reads (a distributed sampler gives each ``ceil(rows /
processes)``, or ``floor`` when the last batch is dropped), its batches, and optimizer steps of
``gradient_accumulation_steps`` batches, a last partial one counted."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import _checks
from ..synthesis import RoundSchedule, SAGESynthesizer, SessionSettings
from ..synthesis.volume import rows_per_round, synthetic_rows_per_step


@dataclass(frozen=True)
class Scale:
    """The trainer's scale options, checked (None: unset)."""
    share: float | None = None
    volume: float | None = None
    label_batch_size: int | None = None


def check_scale(synthesis, share, volume, label_batch_size) -> Scale:
    """The options checked before the trainer does any work: each in range, and each only with
    synthesis; a volume sizes the synthesizer, so it needs a ``SynthesisConfig``, not a built one."""
    given = [name for name, value in (("synthetic_share", share), ("synthetic_volume", volume),
                                      ("label_batch_size", label_batch_size)) if value is not None]
    if synthesis is None and given:
        raise ValueError(f"{', '.join(given)} set how synthesis scales, and synthesis is None: pass "
                         "synthesis=SynthesisConfig(...), or leave them unset")
    if share is not None:
        share = _checks.in_range("synthetic_share", share, 0.0, 1.0, hi_open=True)
    if volume is not None:
        volume = _checks.in_range("synthetic_volume", volume, 0.0, math.inf, lo_open=True, hi_open=True)
        if isinstance(synthesis, SAGESynthesizer):
            raise ValueError("synthetic_volume sizes the synthesizer's rounds, and a built SAGESynthesizer has its "
                             "size: pass a SynthesisConfig, or set the synthesizer's synthetic_per_round yourself")
    if label_batch_size is not None:
        label_batch_size = _checks.integer("label_batch_size", label_batch_size, minimum=1)
    return Scale(share, volume, label_batch_size)


def scaled(scale: Scale, settings: SessionSettings, synthesis, args, dataset, processes: int):
    """``(settings, synthesis)`` with the share and the volume applied, for a Trainer with
    ``args`` over ``dataset`` on ``processes`` processes."""
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError("synthesis needs a train_dataset with a length whose rows are found by position "
                         "(train_dataset[example_id])")
    num_rows = len(dataset)
    if scale.share is not None:  # of the global batch: every process and accumulation micro-batch
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
        settings = dataclasses.replace(settings, synthetic_per_batch=synthetic_rows_per_step(batch, scale.share))
    if scale.volume is not None:  # a SynthesisConfig: check_scale refused a volume with a built synthesizer
        per_epoch, total = trainer_steps(num_rows, args.per_device_train_batch_size, processes,
                                         args.gradient_accumulation_steps, epochs=args.num_train_epochs,
                                         max_steps=args.max_steps, drop_last=args.dataloader_drop_last)
        interval = RoundSchedule.resolve(settings, per_epoch, total).interval
        per_round = rows_per_round(scale.volume, num_rows, per_epoch, interval)
        synthesis = dataclasses.replace(synthesis, synthetic_per_round=per_round,
                                        pool_size=max(synthesis.pool_size, per_round))
    return settings, synthesis


def trainer_steps(num_rows: int, per_device_batch_size: int, processes: int, accumulation: int, *,
                  epochs: float, max_steps: int = -1, drop_last: bool = False) -> tuple[int, int]:
    """``(steps an epoch as the round schedule counts them, total optimizer steps)`` of a Trainer
    run over ``num_rows`` rows: the total is ``max_steps`` when it is positive, else
    ``ceil(epochs * steps an epoch)``; the schedule's epoch is the total over whole epochs begun
    (a run shorter than an epoch makes its own)."""
    _checks.integer("num_rows", num_rows, minimum=1)
    _checks.integer("per_device_batch_size", per_device_batch_size, minimum=1)
    _checks.integer("processes", processes, minimum=1)
    _checks.integer("accumulation", accumulation, minimum=1)
    rounding = math.floor if drop_last else math.ceil
    batches = rounding(rounding(num_rows / processes) / per_device_batch_size)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if max_steps > 0:
        total, epochs_begun = max_steps, math.ceil(max_steps / per_epoch)
    else:
        total, epochs_begun = math.ceil(epochs * per_epoch), math.ceil(epochs)
    return schedule_epoch(total, epochs_begun), total


def schedule_epoch(total_steps: int, epochs_begun: float) -> int:
    """The steps of an epoch as the round schedule counts them: the run's steps over the epochs it
    begins (the Trainer's ``state.max_steps`` and ``state.num_train_epochs``), so a run shorter than
    an epoch makes its own."""
    return max(1, total_steps // max(1, math.ceil(epochs_begun)))
