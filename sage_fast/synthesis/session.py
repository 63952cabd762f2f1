"""One synthesis session: everything a training loop does for SAGE besides its own step.

A training loop hands the session what only it knows (how to get the teacher-space vectors of real
rows, how to have the teacher label vectors, the number of steps) and, each step,

1. ``draw(parts)``: the step's synthetic rows from the pool, dealt out to its micro-batches;
2. ``mix(real, synthetic)``: each micro-batch's real and synthetic rows as one batch;
3. ``observe(...)``: the real rows' per-example losses and student outputs, from which the session
   takes the profile signal, the pooled embeddings and the partner classes;
4. ``end_step(step)``: the step's observations go to the synthesizer, and the round schedule runs:
   a round is due every ``interval`` steps (none after the last step); it is made inline
   (``lag`` 0) or beside training, joining the pool ``lag`` steps after its snapshot
   (:class:`BackgroundRounds`), with the loss map and a :class:`RoundRecord` per round.

The session keeps the synthesizer, the round in flight and the seconds each stage cost training;
``state_dict`` holds the first two, so a resumed run continues as an uninterrupted one would. The
driver (``sage_fast.train``) and ``SAGEDistillTrainer`` are both adapters around it, so every
synthesis option means the same in both.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _checks
from ..regions import pooled_embedding
from .background import BackgroundRounds
from .generators.boundary import disagreement
from .pool import pad_tokens
from .synthesizer import (Label, RoundRecord, SAGESynthesizer, SyntheticRows, VectorsOf, default_analysis_interval,
                          partner_classes)

PROFILE_SIGNALS = ("loss", "disagreement", "trusted")
# What a round costs training, by category; a round beside training adds "background" (the
# worker's own seconds, spent beside the step).
ROUND_SECONDS = ("analysis", "synthesis", "labelling", "plot")


@dataclass
class SessionSettings:
    """How a training loop drives its synthesizer (the driver's flags of the same names).

    ``synthetic_per_batch``: synthetic rows of one optimizer step, over every process and
    micro-batch. ``analysis_every``: steps between rounds (None: ``default_analysis_interval``).
    ``analysis_lag``: steps a round runs beside training before its rows join the pool (0: inline;
    None: every step between rounds but the last). ``profile_signal``: what the profile records of a
    real row (see :func:`profile_signal`), with ``temperature`` for ``disagreement``.
    ``refresh_profile``: recompute the whole profile in one no-grad pass before each round."""
    synthetic_per_batch: int = 16
    analysis_every: int | None = None
    analysis_lag: int | None = None
    profile_signal: str = "loss"
    refresh_profile: bool = False
    temperature: float = 2.0

    def __post_init__(self):
        _checks.integer("synthetic_per_batch", self.synthetic_per_batch, minimum=0)
        if self.analysis_every is not None:
            _checks.integer("analysis_every", self.analysis_every, minimum=1)
        if self.analysis_lag is not None:
            _checks.integer("analysis_lag", self.analysis_lag, minimum=0)
        _checks.choice("profile_signal", self.profile_signal, PROFILE_SIGNALS)
        if not isinstance(self.refresh_profile, bool):
            raise ValueError(f"refresh_profile must be True or False, got {self.refresh_profile!r}")
        self.temperature = _checks.in_range("temperature", self.temperature, 0.0, math.inf, lo_open=True,
                                            hi_open=True)


@dataclass(frozen=True)
class RoundSchedule:
    """When rounds come: after every ``interval``-th step but the last, each joining the pool ``lag``
    steps after its snapshot, or before the last step when fewer remain (inline when none does): a
    rule of step counts alone, so every loop and every resume plans the same rounds."""
    interval: int
    lag: int
    total_steps: int

    @classmethod
    def resolve(cls, settings: SessionSettings, steps_per_epoch: int, total_steps: int) -> "RoundSchedule":
        """``analysis_every`` or three rounds an epoch; ``analysis_lag`` or every step between
        rounds but the last (at least 1). With three rounds an epoch the offline default has 10
        steps between rounds, and a round that joins one step before the next leaves training
        waiting for none of its time (docs/results.md); the pool keeps earlier rounds' rows meanwhile."""
        interval = settings.analysis_every
        if interval is None:
            interval = default_analysis_interval(steps_per_epoch)
        lag = settings.analysis_lag
        if lag is None:
            lag = max(1, interval - 1)
        return cls(interval, lag, total_steps)

    def due(self, step: int) -> bool:
        """Whether a round starts after ``step``; none after the last step, where nothing would
        train on what it makes."""
        return 0 < step < self.total_steps and step % self.interval == 0

    def lag_at(self, step: int) -> int:
        return min(self.lag, self.total_steps - 1 - step)

    def planned(self) -> list[tuple[int, int]]:
        """``(snapshot step, join step)`` of every round the schedule makes (equal for inline rounds)."""
        return [(step, step + self.lag_at(step)) for step in range(self.interval, self.total_steps, self.interval)]


def profile_signal(kind: str, per_example: torch.Tensor, student_logits: torch.Tensor,
                   teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """What the error profile records for each real row: its SAGE loss (``loss``); only the part
    synthetic rows can teach, the student's disagreement with the teacher ``T^2 KL(p_t || p_s)`` at
    the distillation temperature (``disagreement``: the cross-entropy on gold labels also rises where
    the labels are noisy, which the teacher's labels on synthetic rows cannot fix); or the loss where
    the teacher's prediction is the gold label and 0 where it is not (``trusted``: where the
    student's hardest rows are rows the teacher gets wrong, loss regions there collect synthetic rows
    under wrong labels; see docs/results.md)."""
    if kind == "loss":
        return per_example
    if kind == "trusted":
        if labels is None:
            raise ValueError("profile_signal 'trusted' needs the gold labels of the training rows")
        return torch.where(teacher_logits.argmax(-1) == labels, per_example, torch.zeros_like(per_example))
    return disagreement(student_logits, teacher_logits, temperature)


@torch.no_grad()
def label_in_chunks(forward: Callable, vectors: torch.Tensor, mask: torch.Tensor, layers: Iterable[int],
                    chunk: int):
    """The teacher's logits (float32) and hidden layers ``layers`` (float16, to halve the pool's
    memory) on ``vectors``, ``chunk`` rows at a time; ``forward(vectors, mask, output_hidden_states)``
    runs the teacher and returns its outputs (``logits``, ``hidden_states``)."""
    layers = list(layers)
    logits, hidden = [], {k: [] for k in layers}
    for start in range(0, vectors.shape[0], chunk):
        out = forward(vectors[start:start + chunk], mask[start:start + chunk], bool(layers))
        logits.append(out.logits.float())
        for k in layers:
            hidden[k].append(out.hidden_states[k].to(torch.float16))
    return torch.cat(logits), {k: torch.cat(v) for k, v in hidden.items()}


@dataclass
class Batch:
    """A micro-batch as the loss sees it: teacher-space ``vectors`` [B, L, d_t] and ``mask``, the
    teacher's ``logits`` and ``hidden`` layers, ``labels`` (``ignore_index`` where a row has none),
    ``token_types`` or None; the first ``n_real`` rows are real."""
    vectors: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    hidden: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None
    token_types: torch.Tensor | None = None
    n_real: int = 0


def mix(real: Batch, synthetic: SyntheticRows | None, ignore_index: int, width: int | None = None) -> Batch:
    """``real`` and ``synthetic`` rows in one batch, padded to one width and trimmed to ``width``
    tokens when given (a width known on the host, so no mask is read back from the device).
    Synthetic rows carry their gold label where they have one (``partners='same-label'``),
    ``ignore_index`` elsewhere, and token type 0 (they were labelled so)."""
    n_real = real.vectors.shape[0]
    labels = real.labels
    if labels is None:
        labels = torch.full((n_real,), ignore_index, dtype=torch.long, device=real.vectors.device)
    vectors, mask, logits, token_types = real.vectors, real.mask, real.logits, real.token_types
    hidden = dict(real.hidden)
    if synthetic is not None:
        full = max(vectors.shape[1], synthetic.vectors.shape[1])
        vectors = torch.cat([pad_tokens(vectors, full), pad_tokens(synthetic.vectors.to(vectors), full)])
        mask = torch.cat([pad_tokens(mask, full), pad_tokens(synthetic.mask.to(mask), full)])
        logits = torch.cat([logits, synthetic.logits.to(logits)])
        hidden = {k: torch.cat([pad_tokens(v, full), pad_tokens(synthetic.hidden[k].to(v), full)])
                  for k, v in hidden.items()}
        labels = torch.cat([labels, synthetic.loss_labels(ignore_index).to(labels)])
        if token_types is not None:
            token_types = torch.cat([pad_tokens(token_types, full),
                                     token_types.new_zeros(synthetic.mask.shape[0], full)])
    if width is not None:
        vectors, mask = vectors[:, :width], mask[:, :width]
        hidden = {k: v[:, :width] for k, v in hidden.items()}
        if token_types is not None:
            token_types = token_types[:, :width]
    return Batch(vectors, mask, logits, hidden, labels, token_types, n_real)


class SynthesisSession:
    """A synthesizer driven on a round schedule, for any training loop (see the module docstring).

    Args:
        synthesizer: the run's :class:`SAGESynthesizer`.
        vectors_of, label: as for ``SAGESynthesizer.round``; for rounds beside training they run on a
            worker thread and must only read what training does not change (the frozen teacher, the data).
        settings: a :class:`SessionSettings`.
        plot_path: where each round's loss map goes (a callable from the round number), or None.
        profile_batches: for ``refresh_profile``, a callable giving ``(ids, signal, embeddings)``
            batches over every training row (see :meth:`profile_rows`).
        on_round: called with each round's :class:`RoundRecord` as its rows join the pool.
        seconds: the dict each category's seconds are added to (the loop's timer).
    """

    def __init__(self, synthesizer: SAGESynthesizer, vectors_of: VectorsOf, label: Label, settings: SessionSettings,
                 *, plot_path: Callable[[int], str | Path] | None = None,
                 profile_batches: Callable[[], Iterable] | None = None,
                 on_round: Callable[[RoundRecord], None] | None = None, seconds: dict | None = None):
        if not isinstance(synthesizer, SAGESynthesizer):
            raise ValueError(f"synthesizer must be a SAGESynthesizer, got {type(synthesizer).__name__}")
        if not isinstance(settings, SessionSettings):
            raise ValueError(f"settings must be a SessionSettings, got {type(settings).__name__}")
        if settings.refresh_profile and profile_batches is None:
            raise ValueError("refresh_profile needs profile_batches: a pass over every training row")
        self.synthesizer, self.settings = synthesizer, settings
        self.vectors_of, self.label = vectors_of, label
        self.plot_path, self.profile_batches, self.on_round = plot_path, profile_batches, on_round
        self.seconds = {} if seconds is None else seconds
        self.schedule: RoundSchedule | None = None
        # Whether rounds run beside training follows from the settings alone (the lag is 0 only when
        # asked for), so a checkpoint's round in flight can be loaded before the schedule is known.
        self.background = None if settings.analysis_lag == 0 else BackgroundRounds(
            synthesizer, vectors_of, label, lag=settings.analysis_lag or 1, plot_path=plot_path)
        self.records: list[RoundRecord] = []
        self._parts: list[SyntheticRows | None] = []
        self._observed: list[tuple] = []
        self._sizes: list[int] | None = None

    def start(self, steps_per_epoch: int, total_steps: int) -> RoundSchedule:
        """Fix the schedule once the loop knows its length, at the start of training (again on resume)."""
        _checks.integer("steps_per_epoch", steps_per_epoch, minimum=1)
        _checks.integer("total_steps", total_steps, minimum=0)
        self.schedule = RoundSchedule.resolve(self.settings, steps_per_epoch, total_steps)
        if self.background is not None:
            self.background.lag = self.schedule.lag
        self._parts, self._observed, self._sizes = [], [], None
        return self.schedule

    @property
    def pool_size(self) -> int:
        return len(self.synthesizer.pool)

    @property
    def rounds(self) -> int:
        return self.synthesizer.rounds

    # ------------------------------------------------------------------ a step
    def draw(self, parts: int) -> list[SyntheticRows | None]:
        """The step's ``synthetic_per_batch`` rows, the same on every rank, dealt out to every
        rank's ``parts`` micro-batches (micro-batch ``k`` of rank ``r`` takes rows ``j::size*parts``,
        ``j = r*parts + k``); None for a part that gets none."""
        drawn = self.synthesizer.sample(self.settings.synthetic_per_batch, parts=parts)
        return [None] * parts if drawn is None else drawn

    def drawn_count(self) -> int:
        """Rows a draw takes now, over every rank (no device read)."""
        return min(self.settings.synthetic_per_batch, self.pool_size)

    def next_part(self, parts: int) -> tuple[SyntheticRows | None, int]:
        """For a loop that sees one micro-batch at a time: at a step's first micro-batch the step's
        rows are drawn; each call returns the next micro-batch's part and the rows drawn by this
        call over every rank (0 but at a step's first micro-batch)."""
        drawn = 0
        if not self._parts:
            drawn = self.drawn_count()
            self._parts = self.draw(parts)
        return self._parts.pop(0), drawn

    @torch.no_grad()
    def profile_rows(self, per_example: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: torch.Tensor | None, last_hidden: torch.Tensor, mask: torch.Tensor | None):
        """The profile's view of real rows: ``(signal, pooled embedding)``."""
        signal = profile_signal(self.settings.profile_signal, per_example.detach().float(), student_logits,
                                teacher_logits, labels, self.settings.temperature)
        return signal, pooled_embedding(last_hidden.detach(), mask)

    @torch.no_grad()
    def observe(self, ids: torch.Tensor, per_example: torch.Tensor, student_logits: torch.Tensor,
                teacher_logits: torch.Tensor, labels: torch.Tensor | None, last_hidden: torch.Tensor,
                mask: torch.Tensor | None, sizes: list[int]) -> None:
        """One micro-batch's real rows (every argument of those rows only); ``sizes``: every rank's
        count of them. Kept until ``end_step`` hands the step's rows to the synthesizer at once."""
        signal, embeddings = self.profile_rows(per_example, student_logits, teacher_logits, labels, last_hidden,
                                               mask)
        classes = partner_classes(self.synthesizer.config.partners, teacher_logits, labels)
        self._observed.append((ids, signal, embeddings, classes))
        self._sizes = list(sizes) if self._sizes is None else [a + b for a, b in zip(self._sizes, sizes)]

    def end_step(self, step: int) -> list[RoundRecord]:
        """After optimizer step ``step``: the step's rows to the profile, then the rounds due."""
        if self._observed:
            ids, signal, embeddings, classes = (torch.cat(parts) if parts[0] is not None else None
                                                for parts in zip(*self._observed))
            self.synthesizer.observe(ids, signal, embeddings, classes=classes, sizes=self._sizes)
            self._observed, self._sizes = [], None
        self._parts = []
        made = []
        if self.background is not None and self.background.due(step):
            made.append(self.finish_round(step))
        if self.schedule is not None and self.schedule.due(step):
            record = self.round_now(step)
            if record is not None:
                made.append(record)
        return made

    # ------------------------------------------------------------------ rounds
    def round_now(self, step: int) -> RoundRecord | None:
        """The round due after ``step``. Inline, training waits for it and gets its record;
        beside training its snapshot goes to the worker and None is returned (its record comes when
        it joins the pool), as when too few rows have been seen."""
        if self.background is not None and self.background.pending is not None:
            self.finish_round(step)  # rounds join the pool in order: the one in flight first
        if self.settings.refresh_profile:
            with self._measure("analysis"):
                self.synthesizer.refresh(self.profile_batches())
        lag = 0 if self.schedule is None else self.schedule.lag_at(step)
        if self.background is not None and lag > 0:
            with self._measure("analysis"):  # the snapshot: what training pays to start a round
                self.background.start(step, lag)
            return None
        record = self.synthesizer.round(self.vectors_of, self.label, step=step, plot_path=self.plot_path)
        if record is None:  # too few examples seen yet
            return None
        for category in ROUND_SECONDS:
            self._add(category, getattr(record, f"{category}_seconds"))
        self._joined(record)
        return record

    def finish_round(self, step: int) -> RoundRecord:
        """Add the round in flight to the pool, waiting for its worker if it is not done yet. The
        wait counts as analysis time and the pool's copy as synthesis time, what training paid;
        the worker's own seconds count as ``background``."""
        record = self.background.finish(step=step)
        self._add("analysis", record.wait_seconds)
        self._add("synthesis", record.commit_seconds)
        self._add("background", sum(getattr(record, f"{c}_seconds") for c in ROUND_SECONDS) - record.commit_seconds)
        self._joined(record)
        return record

    def _joined(self, record: RoundRecord) -> None:
        self.records.append(record)
        if self.on_round is not None:
            self.on_round(record)

    def _add(self, category: str, seconds: float) -> None:
        self.seconds[category] = self.seconds.get(category, 0.0) + seconds

    @contextlib.contextmanager
    def _measure(self, category: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self._add(category, time.perf_counter() - started)

    def close(self) -> None:
        """Wait for a worker in flight (its round stays pending)."""
        if self.background is not None:
            self.background.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"synthesizer": self.synthesizer.state_dict(),
                "round_in_flight": None if self.background is None else self.background.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the synthesizer and the round in flight."""
        if not isinstance(state, Mapping) or "synthesizer" not in state:
            raise ValueError("state must be a dict from SynthesisSession.state_dict()")
        self.synthesizer.load_state_dict(state["synthesizer"])
        in_flight = state.get("round_in_flight")
        if self.background is not None:
            self.background.load_state_dict(in_flight)
        elif in_flight is not None:
            raise ValueError("the state holds a round made beside training (analysis_lag > 0), but this session "
                             "makes rounds inline (analysis_lag 0): resume with the settings it was started with")


__all__ = ["Batch", "PROFILE_SIGNALS", "RoundSchedule", "SessionSettings", "SynthesisSession", "label_in_chunks",
           "mix", "profile_signal"]
