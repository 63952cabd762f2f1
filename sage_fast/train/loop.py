"""The SAGE training driver (the README's "The driver"): one mode's optimizer step, evaluation and
checkpoints, and the run of every mode.

Per step: a batch of real examples, whose teacher outputs come from the on-disk cache, mixed with
synthetic rows from the synthesis session's pool; ``SAGELoss`` on both; the real rows' profile
signal and pooled student embeddings go to the session (``SynthesisSession``), which runs the
rounds on its schedule (by default three an epoch, each beside training): the analysis on the rows
seen so far, anchors in high-loss regions (mode ``sage``) or uniform ones (mode ``random``), rows
made from them by the configured generator (``--generator``: interpolation, word-piece
substitution or boundary steps), labels from the teacher through the vector interface, the pool.
Mode ``kd`` has no session. What a run shares is built in ``setup``, the student in ``student``,
stopping on a signal in ``stopping``.

Evaluation is on real text only: validation accuracy each epoch, test accuracy at the end. Each
epoch ends with an atomic checkpoint; Ctrl-C or SIGTERM stops at the end of the current step,
writes a checkpoint and says how to resume. One process at a time trains in a run folder
(``run_lock``). A non-finite training loss, checked where the loss is logged anyway (no host
synchronisation per step), stops the run and never overwrites the last checkpoint with a
non-finite state. On CPU with a fixed seed, a resumed run gives the same final metrics as an
uninterrupted one: data order depends only on (seed, epoch), and every random stream (torch's
global one for dropout, the synthesizer's generators) is checkpointed.

``callbacks``: callables ``callback(mode_run)`` called after every optimizer step, once the
step's rounds are done (to watch a run, or stop it: a stop signal they send is taken at this step).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..assets import cache_root
from ..distributed import (SINGLE, DistributedError, PeerLost, World, close_world, collective_failed, init_world,
                           launched_world)
from ..distributed import split_sizes as part_sizes  # how a step's rows[j::parts] are dealt out
from ..errors import UsageError
from ..regions import use_compilation_cache, warm_up_in_background
from ..synthesis import Batch, RoundRecord, RoundSchedule, SAGESynthesizer, SynthesisSession, mix
from . import DataError
from . import checkpoint as ckpt
from . import run_identity
from .config import DistillConfig
from .metrics import MetricsLog, Timer, format_table, notes, one_class_warning
from .models import _first_line, save_interface
from .run_lock import RunLock
from .schedule import linear_schedule
from .setup import Setup, build_setup, rank_device, session_settings, synthesis_config
from .stopping import StopRequest, TrainingInterrupted, sigterm_stops
from .student import Student, StudentStep, no_buffer_sync_per_forward

RESULTS_FILE = "results.json"
RANK_SEED_STRIDE = 1_000_003  # rank r's torch / numpy / python streams start at seed + r * this


class NonFiniteTraining(RuntimeError):
    """The training loss or the weights became non-finite: the run stopped and kept its last
    checkpoint; the message names the mode and the step."""



# ------------------------------------------------------------------------------------------ one mode
class ModeRun:
    """One mode (sage, kd or random) trained from ``setup``, in ``out_dir``."""

    def __init__(self, setup: Setup, mode: str, out_dir: Path, log=print, read_only: bool = False,
                 callbacks: Iterable[Callable[["ModeRun"], None]] = ()):
        self.setup, self.config, self.mode, self.out_dir, self.log = setup, setup.config, mode, Path(out_dir), log
        config = self.config
        self.world = world = setup.world
        self.callbacks = list(callbacks)
        # Every rank starts the same weights (DDP also broadcasts rank 0's); dropout differs by rank.
        ckpt.seed_everything(config.seed + RANK_SEED_STRIDE * world.rank)
        self.model = Student(setup)
        self.interface = self.model.interface
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.step_module = StudentStep(self.interface, self.model.loss_fn)
        self.ddp = self._wrap_for_processes()
        self._count_steps()
        self.scheduler = linear_schedule(self.optimizer, self.total_steps, config.warmup_ratio)
        self.timer = Timer()
        self.session = None if mode == "kd" else self._session()
        self.epoch = 0            # completed epochs
        self.step_in_epoch = 0    # completed steps of the current epoch
        self.global_step = 0
        self.examples_seen = {"real": 0, "synthetic": 0}
        self.done = False
        # Nothing is written to the file before the first record: a failed resume leaves it whole.
        # Every rank keeps the records (they are the same); rank 0 writes them.
        self.read_only = read_only or not self.world.is_main
        self.metrics = MetricsLog(None if self.read_only else self.out_dir / "metrics.jsonl")
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk, if this run has one

    def _wrap_for_processes(self):
        if not self.world.distributed:
            return None
        from torch.nn.parallel import DistributedDataParallel

        device = self.setup.device
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self.step_module, self.step_module.ignored_by_ddp())
        return DistributedDataParallel(self.step_module, device_ids=[device] if device.type == "cuda" else None,
                                       **no_buffer_sync_per_forward(DistributedDataParallel))

    def _count_steps(self) -> None:
        config, world = self.config, self.world
        # A step's rows are dealt out to world.size * grad_accumulation parts; part j = rank * K + k.
        self.accumulation = config.grad_accumulation
        self.parts = world.size * self.accumulation
        if config.batch_size % self.parts:
            raise DistributedError(
                f"batch-size ({config.batch_size}) must split evenly over {world.size} process(es) x "
                f"{self.accumulation} micro-batch(es): use a multiple of {self.parts}")
        self.n_train = self.model.n_train
        # A last batch too small to give every part a row is left out (its rows come back next epoch).
        full, rest = divmod(self.n_train, config.batch_size)
        self.steps_per_epoch = full + (rest >= self.parts)
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.n_train} training rows cannot give each of the {self.parts} parts of a step a row")
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

    def _session(self) -> SynthesisSession:
        config, settings = self.config, session_settings(self.config)
        # A volume per epoch sets each round's rows from the run's rows and round schedule.
        interval = RoundSchedule.resolve(settings, self.steps_per_epoch, self.total_steps).interval
        synthesizer = SAGESynthesizer(
            synthesis_config(config, self.mode, self.setup.device, num_examples=self.n_train,
                             steps_per_epoch=self.steps_per_epoch, interval=interval),
            num_examples=self.n_train, embedding_dim=self.model.embedding_dim, world=self.world,
            inputs=self.model.generator_inputs())
        session = SynthesisSession(synthesizer, self.model.vectors_of, self.model.label, settings,
                                   plot_path=self._loss_map_path if self.world.is_main else None,
                                   profile_batches=self.model.profile_batches, on_round=self._log_round,
                                   seconds=self.timer.seconds)
        session.start(self.steps_per_epoch, self.total_steps)
        return session

    @property
    def analysis_rounds(self) -> int:
        return 0 if self.session is None else self.session.rounds

    @property
    def pool_size(self) -> int:
        return 0 if self.session is None else self.session.pool_size

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / ckpt.CHECKPOINT_NAME

    def state_dict(self) -> dict:
        synthesis = {"synthesizer": None, "round_in_flight": None}
        if self.session is not None:
            synthesis = self.session.state_dict()
        return {
            "format": ckpt.FORMAT_VERSION, "mode": self.mode, "config": self.config.to_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "examples_seen": dict(self.examples_seen), "done": self.done,
            **self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(), **synthesis,
            "metrics": self.metrics.records, "timer": dict(self.timer.seconds),
            "total_steps": self.total_steps, "world_size": self.world.size, **run_identity.record(self.setup.data),
        }

    def save(self) -> Path:
        """The checkpoint, written once (rank 0), atomically, with every rank's random state; every
        rank calls it at the same step (it gathers those states)."""
        self._check_finite_weights()  # a non-finite state never replaces the last good checkpoint
        state = self.state_dict()
        if self.world.distributed:
            state["rank_rng"] = self.world.all_gather_objects(state["rng"])
        if self.world.is_main:
            ckpt.save_atomic(state, self.checkpoint_path)
        self.checkpoint_step = self.global_step
        return self.checkpoint_path

    def load(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ckpt.CheckpointError(f"{self.checkpoint_path} holds a {state['mode']!r} run, not {self.mode!r}")
        run_identity.check_checkpoint(state, self.config, self.setup.data, self.total_steps, self.checkpoint_path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.world.size:
            raise ckpt.CheckpointError(
                f"{self.checkpoint_path} was written by a run of {saved_world} process(es), and this one has "
                f"{self.world.size}: each process's random state is saved, so resume with {saved_world} "
                f"(torchrun --nproc-per-node {saved_world}, or no torchrun for 1)")
        self.model.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["total_steps"] != self.total_steps:  # more epochs or steps asked for: stretch the schedule
            self.scheduler = linear_schedule(self.optimizer, self.total_steps, self.config.warmup_ratio,
                                             done_steps=state["global_step"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.examples_seen = dict(state["examples_seen"])
        self.done = state["done"] and self.global_step >= self.total_steps
        self._load_synthesis(state)
        ckpt.set_rng_state(state["rank_rng"][self.world.rank] if self.world.distributed else state["rng"])
        self.timer.seconds.clear()  # the session adds to this same dict
        self.timer.seconds.update(state["timer"])
        self.metrics = MetricsLog(None if self.read_only else self.out_dir / "metrics.jsonl", state["metrics"])
        self.checkpoint_step = self.global_step

    def _load_synthesis(self, state: dict) -> None:
        if self.session is None:
            return
        try:
            self.session.load_state_dict(state)
        except ValueError as error:
            raise ckpt.CheckpointError(f"{self.checkpoint_path}: {error}") from None

    # ------------------------------------------------------------------ one step
    def train_step(self, rows: torch.Tensor) -> torch.Tensor:
        """One optimiser step on the real rows ``rows`` (a host index: the whole step's, over every
        process) and a draw from the pool. The rows are dealt out to ``world.size * grad_accumulation``
        parts, ``rows[j::parts]``, and so is the draw; this process trains on its parts, part
        ``rank * K + k`` as micro-batch ``k``, each loss scaled by ``1 / K`` (DDP averages over the
        processes). Returns the mean loss of this process's parts as a detached 0-d tensor on the
        device: the caller reads it only where it logs, so on CUDA the host queues the next step
        without waiting for this one."""
        k_parts = self.accumulation
        first = self.world.rank * k_parts
        synthetic = [None] * k_parts if self.session is None else self.session.draw(k_parts)
        drawn = 0 if self.session is None else self.session.drawn_count()
        # every rank's row count in each part, from the step's size alone: no device read
        counts = part_sizes(rows.shape[0], self.parts)
        total_loss = None
        for k in range(k_parts):
            last = k == k_parts - 1
            # DDP all-reduces the gradients once, in the last micro-batch's backward
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                loss = self._micro_batch(rows[first + k::self.parts], synthetic[k],
                                         [counts[r * k_parts + k] for r in range(self.world.size)])
                (loss / k_parts).backward()
            total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.examples_seen["real"] += rows.shape[0]
        self.examples_seen["synthetic"] += drawn
        return total_loss / k_parts

    def _micro_batch(self, rows: torch.Tensor, synthetic, sizes: list[int]) -> torch.Tensor:
        """Forward and loss of one micro-batch (real ``rows``, ``synthetic`` rows or None); its real
        rows go to the session's profile (``sizes``: every rank's count of them). Returns the loss."""
        real = self.model.real_batch(rows)
        batch = Batch(self.interface.embed(real["input_ids"]), real["mask"], real["logits"], dict(real["hidden"]),
                      real["labels"], real.get("token_type_ids"))
        # Trim the padding every row of this batch shares; the widths are known on the host.
        width = real["width"] if synthetic is None else max(real["width"], synthetic.width)
        batch = mix(batch, synthetic, self.model.loss_fn.config.ignore_index, width)
        teacher_outputs = {"logits": batch.logits,
                           "hidden_states": {k: v.float() for k, v in batch.hidden.items()} or None}
        self.interface.train()
        with self.model.autocast:
            student_out, result = (self.ddp or self.step_module)(batch.vectors, batch.mask, batch.token_types,
                                                                 teacher_outputs, batch.labels)
        if self.session is not None:
            n = batch.n_real
            self.session.observe(real["ids"], result.per_example[:n], student_out.logits[:n], real["logits"],
                                 batch.labels[:n], student_out.hidden_states[-1][:n], batch.mask[:n], sizes)
        return result.loss

    # ------------------------------------------------------------------ analysis and synthesis
    def _loss_map_path(self, number: int) -> Path:
        return self.out_dir / f"loss_map_round{number:03d}.png"

    def _log_round(self, record: RoundRecord) -> None:
        if record.plot_error:
            self.log(f"no loss map: {record.plot_error}")
        for line in record.decoded:  # rows of real tokens, for a person to judge
            self.log(f"[{self.mode}] round {record.round}: {line}")
        self.metrics.log(kind="analysis", mode=self.mode, round=record.round, step=self.global_step,
                         epoch=self.epoch, examples=record.examples, synthetic=record.synthetic, pool=record.pool_size,
                         threshold=record.threshold, png=record.png, analysis_seconds=record.analysis_seconds,
                         synthesis_seconds=record.synthesis_seconds, labelling_seconds=record.labelling_seconds,
                         snapshot_step=record.snapshot_step, wait_seconds=record.wait_seconds,
                         **({"decoded": record.decoded} if record.decoded else {}))

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end (or to a stop request); under several processes a failed collective (a
        rank that died or hung past ``dist_timeout``) ends this rank with :class:`PeerLost`."""
        if not self.world.distributed:
            return self._train()
        try:
            return self._train()
        except RuntimeError as error:
            if isinstance(error, PeerLost) or not collective_failed(error):
                raise
            kept = (f"the last checkpoint, of step {self.checkpoint_step}, is in {self.checkpoint_path}"
                    if self.checkpoint_step is not None else "no checkpoint was written yet")
            raise PeerLost(
                f"[{self.mode}] rank {self.world.rank}: another process of this run stopped or stopped answering "
                f"(no reply within --dist-timeout {self.config.dist_timeout:g} s) at step {self.global_step}; "
                f"{kept}. See that process's own message for why; then start the same torchrun command with "
                f"--resume --output-dir {self.out_dir.parent}. ({_first_line(error)})") from error

    def _stop_agreed(self, stop: "StopRequest", logging_point: bool) -> bool:
        """Whether to stop after this step. One process stops as soon as asked; several agree first,
        at logging points (where the host reads the loss anyway), so all stop at the same step."""
        if not self.world.distributed:
            return stop.requested
        return logging_point and self.world.any(stop.requested, self.setup.device)

    def _train(self) -> dict:
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=f"distill [{self.mode}]", unit="step",
                   disable=not config.progress or not self.world.is_main)
        with StopRequest() as stop:
            while not self.done and self.global_step < self.total_steps:
                order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(
                    config.seed * 100_003 + self.epoch))
                started = time.perf_counter()
                with self.timer.measure("train"):
                    while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                        s = self.step_in_epoch * config.batch_size
                        loss = self.train_step(order[s:s + config.batch_size])
                        self.step_in_epoch += 1
                        self.global_step += 1
                        bar.update(1)
                        logging_point = self.global_step % config.log_every == 0 or self.global_step == 1
                        if logging_point:
                            self._log_loss(loss, bar)
                        if self.session is not None:
                            self.session.end_step(self.global_step)
                        for callback in self.callbacks:
                            callback(self)
                        if self._stop_agreed(stop, logging_point):
                            bar.close()
                            self.save()
                            raise TrainingInterrupted(self._resume_hint())
                self._end_epoch(started)
        bar.close()
        return self.results()

    def _log_loss(self, loss: torch.Tensor, bar) -> None:
        if self.world.distributed:  # the step's loss over every process's parts
            loss = self.world.all_reduce_sum(loss.clone()) / self.world.size
        loss = float(loss)  # the step's only host read of the loss, where it is logged
        self._check_finite_loss(loss)
        bar.set_postfix(loss=f"{loss:.4f}", pool=self.pool_size)
        self.metrics.log(kind="train", mode=self.mode, epoch=self.epoch, step=self.global_step,
                         loss=loss, lr=self.scheduler.get_last_lr()[0], pool=self.pool_size)

    def _end_epoch(self, started: float) -> None:
        accuracy = self.model.evaluate("validation")
        self.metrics.log(kind="eval", mode=self.mode, split="validation", epoch=self.epoch + 1,
                         step=self.global_step, accuracy=accuracy,
                         epoch_seconds=time.perf_counter() - started, warning=self._one_class("validation"))
        self.epoch += 1
        self.step_in_epoch = 0
        self.done = self.global_step >= self.total_steps
        if self.done:
            self._finish()
        self.save()

    def _finish(self) -> None:
        self._check_finite_weights()  # neither test nor export a student that diverged
        train_seconds = self.timer.seconds.get("train", 0.0)
        self.metrics.log(
            kind="final", mode=self.mode, split="test", accuracy=self.model.evaluate("test"),
            validation_accuracy=self.metrics.last("eval")["accuracy"], steps=self.global_step, epochs=self.epoch,
            real_examples=self.examples_seen["real"], synthetic_examples=self.examples_seen["synthetic"],
            train_seconds=train_seconds,
            examples_per_second=self.examples_seen["real"] / train_seconds if train_seconds > 0 else None,
            analysis_share=self.timer.share("analysis"), synthesis_share=self.timer.share("synthesis"),
            labelling_share=self.timer.share("labelling"), analysis_rounds=self.analysis_rounds,
            warning=self._one_class("test"))
        teacher_dir = Path(self.setup.teacher_name)
        if self.world.is_main:
            save_interface(self.interface, self.trained_dir, tokenizer=self.setup.tokenizer,
                           teacher_path=str(teacher_dir) if teacher_dir.is_dir() else None)

    def _one_class(self, split: str) -> str | None:
        """The warning, logged, when the student predicted one class for every row of ``split``."""
        warning = one_class_warning(self.model.predicted_counts.get(split, []), self.setup.data.label_names, split,
                                    f"the {self.mode} student")
        if warning:
            self.log(f"[{self.mode}] warning: {warning}")
        return warning

    @property
    def trained_dir(self) -> Path:
        """The trained student, adapter, and teacher location: what ``sage-fast export`` reads."""
        return self.out_dir / "trained"

    def results(self) -> dict:
        final = self.metrics.last("final") or {}
        return {"mode": self.mode, "out_dir": str(self.out_dir), **{k: v for k, v in final.items() if k != "kind"}}

    # ------------------------------------------------------------------ non-finite values
    # Checked where the host reads values anyway: the loss at each logging point (every log_every
    # steps), the weights once before each checkpoint and before the final test, so a CUDA step never
    # waits on the host for this.
    def _check_finite_loss(self, loss) -> None:
        finite = math.isfinite(float(loss))
        if self.world.distributed:  # every rank stops together, whichever rank's loss it was
            finite = not self.world.any(not finite, self.setup.device)
        if not finite:
            self._stop_non_finite(f"the training loss is {float(loss)} at step {self.global_step}"
                                  + (f" on rank {self.world.rank}" if self.world.distributed else ""))

    def _check_finite_weights(self) -> None:
        params = [p.detach() for p in self.model.parameters()]
        if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
            self._stop_non_finite(f"the weights hold non-finite values after step {self.global_step}")

    def _stop_non_finite(self, what: str) -> None:
        if self.checkpoint_step is None:
            kept = "no checkpoint was written before it"
        else:
            kept = f"the last checkpoint, of step {self.checkpoint_step}, is kept unchanged in {self.checkpoint_path}"
        message = (f"[{self.mode}] {what}: training diverged, so it stopped; {kept}. Usual causes: a learning rate "
                   f"too high for this model (--lr), or non-finite values in the data or the teacher's outputs. "
                   f"Start again with other settings in a new --output-dir.")
        self.metrics.log(kind="error", mode=self.mode, step=self.global_step, message=message)
        raise NonFiniteTraining(message)

    def _resume_hint(self) -> str:
        return (f"interrupted at step {self.global_step}/{self.total_steps}; a checkpoint is in {self.checkpoint_path}. "
                f"Resume with: sage-fast distill --resume --output-dir {self.out_dir.parent}")


# ------------------------------------------------------------------------------------------ driver
def default_output_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run(config: DistillConfig, *, resume: bool = False, log=print, overwrite: bool = False,
        callbacks: Iterable[Callable[[ModeRun], None]] = ()) -> dict:
    """Train the main mode and every baseline in ``config.compare``; returns the summary that is
    also written to ``<output_dir>/results.json``.

    The run folder is locked for the whole call (``RunFolderBusy`` when another live process holds
    it), and temporaries that killed checkpoint writes left in it are removed first.

    Under ``torchrun`` every process calls this with the same config: each trains on its share of
    every step (DDP), rank 0 writes the files (lock, config, metrics, checkpoints, pictures, results)
    and logs; the others stay quiet. On one process nothing of this applies. ``callbacks``: see the
    module docstring."""
    use_compilation_cache(cache_root() / "numba")
    world = launched_world()
    device = rank_device(config, world)
    world = init_world(device, timeout=config.dist_timeout)
    try:
        if not world.is_main:
            log = _quiet
        out_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
        out_dir = Path(world.broadcast_object(str(out_dir)))  # one folder, whatever each clock said
        config.output_dir = str(out_dir)
        modes = [config.mode, *config.compare]
        with (RunLock(out_dir, log=log) if world.is_main else contextlib.nullcontext()), sigterm_stops():
            refusal = None
            if world.is_main:
                try:
                    _prepare_folder(config, out_dir, modes, resume, log, overwrite)
                except UsageError as error:
                    refusal = error
            # a folder rank 0 refused stops every rank now, with rank 0's message
            said = world.broadcast_object(None if refusal is None else str(refusal))
            if refusal is not None:
                raise refusal
            if said is not None:
                raise DistributedError(f"rank 0 refused the run: {said}")
            return _run_modes(config, out_dir, modes, resume, log, world, device, callbacks)
    finally:
        close_world(world)


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 says everything once."""


def _prepare_folder(config: DistillConfig, out_dir: Path, modes: list[str], resume: bool, log,
                    overwrite: bool = False) -> None:
    if not resume:
        run_identity.check_fresh_folder(out_dir, overwrite=overwrite, log=log)
    for mode in modes:
        stale = [*ckpt.remove_stale_temporaries(out_dir / mode),
                 *ckpt.remove_stale_temporaries(out_dir / mode, "metrics.jsonl")]
        if stale:
            log(f"[{mode}] removed {len(stale)} temporary file(s) of writes a killed run left unfinished")
    config.save(out_dir)


def _run_modes(config: DistillConfig, out_dir: Path, modes: list[str], resume: bool, log,
               world: World = SINGLE, device: torch.device | None = None, callbacks=()) -> dict:
    if any(mode != "kd" for mode in modes):  # numba compiles (or loads) UMAP while the models are prepared
        warm_up_in_background()
    setup = build_setup(config, log=log, world=world, device=device)
    rows, trained = [], {}
    for mode in modes:
        mode_run = ModeRun(setup, mode, out_dir / mode, log=log, callbacks=callbacks)
        if resume and mode_run.checkpoint_path.exists():
            mode_run.load(ckpt.load(mode_run.checkpoint_path))  # on the CPU: RNG states must stay there
            log(f"[{mode}] resuming at step {mode_run.global_step}/{mode_run.total_steps}")
        rows.append(mode_run.train())
        trained[mode] = str(mode_run.trained_dir)
        log(f"[{mode}] test accuracy {rows[-1]['accuracy']:.4f}; trained student in {mode_run.trained_dir}")
    summary = {"output_dir": str(out_dir), "teacher": setup.teacher_name, "task": setup.data.task,
               "teacher_validation_accuracy": setup.teacher_metrics.get("validation_accuracy_vector"),
               "teacher_test_accuracy": setup.teacher_metrics.get("test_accuracy_vector"), "modes": rows,
               "trained": trained, "warnings": list(setup.warnings)}
    table = results_table(summary)
    if world.is_main:
        (out_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "results.txt").write_text(table + "\n")
    summary["table"] = table
    return summary


def results_table(summary: dict) -> str:
    rows = [{"name": "teacher", "validation_accuracy": summary["teacher_validation_accuracy"],
             "accuracy": summary["teacher_test_accuracy"]}]
    rows += [{"name": r["mode"], **r} for r in summary["modes"]]
    return format_table(rows, [
        ("name", "model", "{}"), ("validation_accuracy", "val acc", "{:.4f}"), ("accuracy", "test acc", "{:.4f}"),
        ("examples_per_second", "real ex/s", "{:.1f}"), ("synthetic_examples", "synthetic seen", "{:d}"),
        ("analysis_share", "analysis", "{:.1%}"), ("synthesis_share", "synthesis", "{:.1%}"),
        ("labelling_share", "labelling", "{:.1%}"),
    ]) + "".join(f"\nwarning: {note}" for note in notes(summary))
