"""Analysis rounds beside training, with the same result as if training had waited for them.

A round made inline stops training for its whole duration: the kNN graph, UMAP, the draw, the
interpolation and the teacher's labels. ``BackgroundRounds`` moves all of it off the critical path:

1. at the step ``s`` a round is due, ``start(s)`` takes ``SAGESynthesizer.snapshot()`` (copies of
   the seen rows of the profile, the round number, the analysis generator's state) and hands it to a
   worker thread, which runs :func:`plan_round` on the snapshot alone, then
   ``SAGESynthesizer.synthesize`` (the generator's rows and the teacher's labels; no state of the
   synthesizer changes) and, when asked, draws the loss map. A generator that reads the student
   (boundary steps) reads a frozen copy of it (``FrozenStudent``), refreshed from the student at
   the snapshot, so training goes on changing the student meanwhile;
2. training goes on with the current pool;
3. after step ``s + lag`` (``due(step)``), ``finish()`` waits for the worker if it is not done yet
   (the only time training stands still for the round) and ``commit``s its rows to the pool.

**Reproducible for a fixed seed, whatever the timing.** What the worker computes is a pure function
of the snapshot, the settings and frozen inputs (the teacher, the teacher-space vectors of real
rows, the student's copy): it reads no state that training changes and draws no random number
from a shared generator (UMAP and the noise are seeded from ``seed * 1000 + round``, the draw uses
a generator restored from the snapshot). The snapshot is taken at step ``s`` and the rows join the
pool after step ``s + lag``, both fixed by the step count alone; the pool's own generator is only
used on the training thread, in ``commit``. So a slow worker makes training wait at ``s + lag``, never changes
what it trains on. ``lag`` steps later than an inline round is the only difference from training
that waits (with ``lag = 0`` a ``SynthesisSession`` makes its rounds inline).

**Checkpoints with a round in flight** store the snapshot (``state_dict``), and the student's copy
when the generator reads it; on resume the worker makes the round again, which gives the same rows,
since it is a pure function of what was stored.

**Where it runs.** On the CPU a thread: torch and numba (umap-learn's layout) release the GIL for
most of the work, so it proceeds beside the training step. On CUDA the worker's kernels go to a
side stream: it starts after the snapshot's copies (an event on the training stream), and the
training stream waits for the worker's last kernel (an event) before the rows join the pool, so
the host never waits on the device for this; the rows are marked as used on the training stream,
so the caching allocator does not hand their memory to the next round early. What the host still
waits for, once per round and never per step: the snapshot learns which rows have been seen
(``nonzero``), and the worker's own reads (the kNN graph, UMAP's host side) wait on its stream only.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _checks
from .._backend import decide
from .generators import FrozenStudent
from .synthesizer import (Label, ProfileSnapshot, RoundRecord, SAGESynthesizer, SynthesisPlan, SynthesizedRound,
                          VectorsOf, plan_round)

STATE_FORMAT = 1


@dataclass
class PendingRound:
    """A round in flight: its snapshot, the step it was taken after and the step after which its
    rows join the pool."""
    snapshot: ProfileSnapshot
    step: int
    due_step: int


class _Worker:
    """One round made on a thread. Not a daemon, so the interpreter waits for it at exit: a daemon
    thread ended by the interpreter's finalisation inside a torch call aborts the process. A run
    that stops writes its checkpoint first, so waiting for the round in flight loses nothing."""

    def __init__(self, target: Callable[[], tuple[SynthesizedRound, tuple]], device: torch.device,
                 inputs: list[torch.Tensor]):
        self.result: tuple[SynthesizedRound, tuple] | None = None
        self.error: BaseException | None = None
        self.stream = self.ready = self.done = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(device))  # after the snapshot's copies
            self.done = torch.cuda.Event()
            for tensor in inputs:  # made on the training stream, read on the side stream
                if tensor.is_cuda:
                    tensor.record_stream(self.stream)
        self._target = target
        self._thread = threading.Thread(target=self._run, name="sage-fast analysis round", daemon=False)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.stream is None:
                self.result = self._target()
                return
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.ready)
                self.result = self._target()
                self.done.record(self.stream)
        except BaseException as error:  # handed to the training thread, which raises it in finish()
            self.error = error

    def wait(self) -> tuple[SynthesizedRound, tuple]:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class BackgroundRounds:
    """Rounds of ``synthesizer`` made beside training, each joining the pool ``lag`` steps after
    its snapshot (see the module docstring).

    Args:
        synthesizer: the run's :class:`SAGESynthesizer`.
        vectors_of, label: as for ``SAGESynthesizer.build``; called on the worker thread, so they
            must only read state that training does not change (the frozen teacher, the data).
        lag: steps between the snapshot and the rows joining the pool (at least 1).
        plot_path: as for ``SAGESynthesizer.round``: the loss map is drawn by the worker.
    """

    def __init__(self, synthesizer: SAGESynthesizer, vectors_of: VectorsOf, label: Label, *, lag: int,
                 plot_path: str | Path | Callable[[int], str | Path] | None = None):
        if not isinstance(synthesizer, SAGESynthesizer):
            raise ValueError(f"synthesizer must be a SAGESynthesizer, got {type(synthesizer).__name__}")
        self.synthesizer = synthesizer
        self.vectors_of, self.label = vectors_of, label
        self.lag = _checks.integer("lag", lag, minimum=1)
        self.plot_path = plot_path
        self.pending: PendingRound | None = None
        self._worker: _Worker | None = None
        # the student as at the pending round's snapshot, for a generator that reads it (made once)
        self._student: FrozenStudent | None = None

    def __repr__(self) -> str:
        pending = "none" if self.pending is None else (f"round {self.pending.snapshot.round} from step "
                                                       f"{self.pending.step}, due after {self.pending.due_step}")
        return f"BackgroundRounds(lag={self.lag}, pending={pending})"

    # ------------------------------------------------------------------ the schedule
    def start(self, step: int, lag: int | None = None) -> bool:
        """Take the snapshot after ``step`` and start its round on the worker, to join the pool
        after step ``step + lag`` (default: the ``lag`` given at construction); False (nothing
        started) when too few rows have been seen. A round still in flight must be finished first."""
        _checks.integer("step", step, minimum=0)
        lag = self.lag if lag is None else _checks.integer("lag", lag, minimum=1)
        if self.pending is not None:
            raise RuntimeError(f"round {self.pending.snapshot.round} is still in flight: finish() it before "
                               "starting the next (rounds join the pool in order)")
        snapshot = self.synthesizer.snapshot()
        if snapshot is None:
            return False
        if self.synthesizer.generator.reads_student:  # on the training stream, before the worker starts
            self._frozen_student().load(self.synthesizer.inputs.student)
        self.pending = PendingRound(snapshot, step, step + lag)
        self._launch()
        return True

    def due(self, step: int) -> bool:
        """Whether the round in flight joins the pool after ``step``."""
        return self.pending is not None and step >= self.pending.due_step

    def finish(self, step: int | None = None) -> RoundRecord:
        """Wait for the round in flight (only if the worker is not done yet) and add its rows to the
        pool. ``step``: the step it joins after (recorded; default its due step)."""
        if self.pending is None:
            raise RuntimeError("no round is in flight: start() one first")
        pending = self.pending
        if self._worker is None:  # resumed from a checkpoint taken while the round was in flight
            self._launch()
        waiting = time.perf_counter()
        made, plot = self._worker.wait()
        wait_seconds = time.perf_counter() - waiting
        worker = self._worker
        self.pending, self._worker = None, None
        committing = time.perf_counter()
        if isinstance(made, SynthesisPlan):  # planned only (see _launch): synthesised here
            made = self.synthesizer.synthesize(made, self.vectors_of, self.label, student=self._student_copy())
        if worker.done is not None:
            # The training stream waits for the worker's last kernel, the host does not; the rows'
            # memory is marked as used there, so it is not handed out again before the pool's copy.
            training = torch.cuda.current_stream(self.synthesizer.device)
            training.wait_event(worker.done)
            for tensor in _tensors(made.rows):
                if tensor.is_cuda:
                    tensor.record_stream(training)
        record = self.synthesizer.commit(made)
        record.step = pending.due_step if step is None else step
        record.snapshot_step = pending.step
        record.wait_seconds = wait_seconds
        record.commit_seconds = time.perf_counter() - committing
        record.png, record.plot_error, record.plot_seconds = plot
        return record

    def close(self) -> None:
        """Wait for a worker in flight and drop its result (the snapshot stays pending, so a later
        ``finish`` plans it again)."""
        if self._worker is not None:
            try:
                self._worker.wait()
            except Exception:  # the result is dropped; finish() would plan it again and raise there
                pass
            self._worker = None

    # ------------------------------------------------------------------ the worker
    def _launch(self) -> None:
        pending, synthesizer = self.pending, self.synthesizer
        vectors_of, label, plot_path = self.vectors_of, self.label, self.plot_path
        # Triton's interpreter (CPU tensors with TRITON_INTERPRET=1, how kernels are tested without a
        # GPU) swaps triton.language's functions module-wide while a kernel runs, so kernels
        # interpreted on two threads at once break each other: there the worker only plans, and the
        # generator runs on the training thread in finish(). Same rows either way.
        planned_only = synthesizer.device.type == "cpu" and decide(synthesizer.device).backend == "triton"
        student = self._student_copy()

        def make() -> tuple[SynthesizedRound | SynthesisPlan, tuple]:
            # Everything here reads the snapshot, the settings, the student's copy and frozen inputs only.
            plan = plan_round(pending.snapshot, synthesizer.config, step=pending.step)
            made = plan if planned_only else synthesizer.synthesize(plan, vectors_of, label, student=student)
            return made, synthesizer.plot_round(plan, plot_path)

        snapshot = pending.snapshot
        inputs = [snapshot.ids, snapshot.embeddings, snapshot.losses,
                  *([] if snapshot.classes is None else [snapshot.classes])]
        self._worker = _Worker(make, synthesizer.device, inputs)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict | None:
        """The round in flight (its snapshot and steps, and the student's copy when the generator
        reads it), or None; what the worker computed is not saved: it is a pure function of these,
        so a resumed run makes it again."""
        if self.pending is None:
            return None
        state = {"format": STATE_FORMAT, "snapshot": self.pending.snapshot.state_dict(), "step": self.pending.step,
                 "due_step": self.pending.due_step}
        if self._student is not None:
            state["student"] = {name: t.clone() for name, t in self._student.state().items()}
        return state

    def load_state_dict(self, state: Mapping | None) -> None:
        """Restore the round in flight (None: none); its worker starts when first needed."""
        self.close()
        if state is None:
            self.pending = None
            return
        if not isinstance(state, Mapping) or not {"snapshot", "step", "due_step"} <= set(state):
            raise ValueError("state must be None or a dict from BackgroundRounds.state_dict()")
        if state.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"state has format {state['format']}, this version reads format {STATE_FORMAT}")
        snapshot = ProfileSnapshot.from_state(state["snapshot"], self.synthesizer.device)
        if snapshot.round != self.synthesizer.rounds + 1:
            raise ValueError(f"the round in flight is round {snapshot.round} but the synthesizer is at round "
                             f"{self.synthesizer.rounds}: load the synthesizer's state of the same checkpoint first")
        if self.synthesizer.generator.reads_student:
            if "student" not in state:
                raise ValueError(f"the round in flight is made with generator {self.synthesizer.generator.name!r}, "
                                 "which reads the student as it was at the round's snapshot, and this state does not "
                                 "hold it: it was written by a version that read the student when the round joined "
                                 "the pool. Resume with that version, or start the run again")
            self._frozen_student().load(state["student"])
        self.pending = PendingRound(snapshot, _checks.integer("step", state["step"], minimum=0),
                                    _checks.integer("due_step", state["due_step"], minimum=0))
        self._worker = None

    def _frozen_student(self) -> FrozenStudent:
        if self._student is None:
            self._student = FrozenStudent(self.synthesizer.inputs.student)
        return self._student

    def _student_copy(self) -> torch.nn.Module | None:
        """The module the pending round's generator reads for the student (None: it reads none)."""
        return None if self._student is None or not self.synthesizer.generator.reads_student else self._student.module


def _tensors(rows) -> list[torch.Tensor]:
    return [rows.vectors, rows.mask, rows.logits, *rows.hidden.values(),
            *(t for t in (rows.labels, rows.tokens) if t is not None)]


__all__ = ["BackgroundRounds"]
