"""SAGE distillation inside a Hugging Face ``transformers.Trainer``.

``SAGEDistillTrainer`` trains the ``model`` it is given (the student) against a frozen ``teacher``
with :class:`sage_fast.nn.SAGELoss`; the teacher runs without gradients, in eval mode, on the
student's device, on the same inputs (same tokenizer). With ``synthesis=SynthesisConfig(...)`` it is
real SAGE: a :class:`sage_fast.synthesis.SynthesisSession`, the one ``sage-fast distill`` drives,
observes each step's real rows, runs the rounds on the same schedule with the same options
(``analysis_every``, ``analysis_lag``, ``profile_signal``, ``refresh_profile``) and deals
``synthetic_per_batch`` pool rows a step to the micro-batches of every process. Synthetic rows are
vectors in the teacher's word-embedding space, so the student reads the teacher's table: it is
copied into the student's input embeddings at construction and frozen (the student needs the
teacher's tokenizer and embedding width; the saved student stays a standard model). Rows of the
``substitute`` generator are real token ids: the student reads them as such and keeps its own
table, at any width (``sage_fast.integrations.batches``).

Batches need an ``example_id`` column: each row's position in ``train_dataset``, kept even with
``remove_unused_columns=True`` and never passed to the models. ``on_per_example(ids, losses)`` is
called on every training step with the real rows' detached per-example losses.

Each checkpoint folder also gets ``sage_fast_state.pt`` (the session's state, the loss's
projections, the counts), read back on ``train(resume_from_checkpoint=...)``, so a resumed run
continues as the uninterrupted one would (on CPU, bit for bit). Projections, when the hidden sizes
differ, are trained as an extra optimizer group; under several processes the trainer averages their
gradients and starts every rank from rank 0's, as DDP does for the student, and a rank that dies
makes the others raise :class:`sage_fast.distributed.PeerLost` within ``args.ddp_timeout``.
docs/other-distillers.md has the details.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sage_fast.integrations.hf_trainer needs transformers: pip install 'sage-fast[train]'"
    ) from err

from ..assets import cache_root
from ..distributed import PeerLost, collective_failed, current_world
from ..nn.sage_loss import SAGELoss, SAGELossConfig
from ..regions import use_compilation_cache
from ..synthesis import (GeneratorInputs, RoundRecord, SAGESynthesizer, SessionSettings, SynthesisConfig,
                         SynthesisSession, label_in_chunks)
from .generator_inputs import dataset_tokens, student_logits_on_vectors, trainer_generator_inputs
from .batches import mixed_batch, reads_tokens, student_inputs
from .processes import average_gradients, peer_lost, share_from_rank_zero, vector_inputs, wait_at_most
from .scale import check_scale, schedule_epoch, scaled

__all__ = ["STATE_FILE", "SAGEDistillTrainer", "SAGESynthesisCallback"]

logger = logging.getLogger(__name__)

#: What the trainer adds to each checkpoint folder.
STATE_FILE = "sage_fast_state.pt"


def _weak(method):
    """``method`` of an object, held without keeping the object alive."""
    held = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        return held()(*args, **kwargs)

    return call


class SAGESynthesisCallback(TrainerCallback):
    """Runs the synthesizer's rounds on the trainer's schedule, clears the loss projections'
    gradients after each optimizer step (the Trainer clears only the model's), and writes SAGE's
    state (synthesizer, loss projections, counts) into each checkpoint folder.
    ``SAGEDistillTrainer`` adds it, and reads that state back when it resumes."""

    def __init__(self, trainer: "SAGEDistillTrainer"):
        # A weak reference: the trainer holds its callbacks, so a strong one back would make a cycle,
        # and the trainer (its model, its DDP wrapper and the process group that one holds) would
        # outlive its last name until a garbage collection, possibly at interpreter exit, where
        # freeing a gloo group's threads aborts the process.
        self._trainer = weakref.ref(trainer)

    @property
    def trainer(self) -> "SAGEDistillTrainer":
        return self._trainer()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Otherwise each step's projection gradients would add to all earlier steps' (and a resumed
        # run, which starts from none, would not continue the uninterrupted one).
        self.trainer.sage_loss.zero_grad(set_to_none=True)

    def on_train_begin(self, args, state, control, **kwargs):
        session = self.trainer.session
        if session is not None:
            session.start(schedule_epoch(state.max_steps, state.num_train_epochs), state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.session is not None:
            self.trainer.session.end_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        # Every rank knows where the run's last checkpoint is, for the message of a lost peer.
        self.trainer._last_checkpoint = folder
        # The state is the same on every rank: written by the process that writes the model (rank 0,
        # or each node's first with save_on_each_node).
        if not args.should_save:
            return
        if not folder.is_dir():  # a hyperparameter-search trial keeps its checkpoints elsewhere
            raise RuntimeError(f"SAGE's state belongs in the checkpoint folder {folder}, which does not exist")
        self.trainer.save_sage_state(folder)


class SAGEDistillTrainer(Trainer):
    """A ``Trainer`` whose loss is the SAGE distillation loss against a frozen teacher, and which
    synthesises training rows where the student's loss is high when ``synthesis`` is given.

    Args:
        teacher: the teacher model (a Hugging Face model returning ``logits``, and ``hidden_states``
            when asked). It is frozen: ``requires_grad`` off, eval mode, moved to the trainer's device.
        loss: a :class:`SAGELossConfig` or a built :class:`SAGELoss` (default: ``SAGELossConfig()``,
            plain KD with ``alpha=0.5, temperature=2``).
        on_per_example: optional ``callable(ids, losses)`` called on every training step.
        example_id_column: the batch key that holds example ids.
        synthesis: ``None`` (plain distillation), a :class:`SynthesisConfig` (its ``device`` is
            replaced by the trainer's), or a built :class:`SAGESynthesizer` on the trainer's device.
        synthetic_per_batch: synthetic rows added to each optimizer step once the pool has some, over
            every process and accumulation micro-batch (each takes its part).
        synthetic_share, synthetic_volume, label_batch_size: synthesis at scale, as the driver's flags
            (:mod:`sage_fast.integrations.scale`): the synthetic share of each step's rows (sets
            ``synthetic_per_batch``), rows made per epoch as a multiple of the training rows (sets the
            ``SynthesisConfig``'s round and pool sizes), rows per teacher forward when labelling.
        analysis_every, analysis_lag, profile_signal, refresh_profile: the round schedule and the
            profile, as :class:`sage_fast.synthesis.SessionSettings` (and ``sage-fast distill``): by
            default three rounds an epoch, each made beside training and joining the pool one step
            before the next.
        loss_maps: write each round's loss map to ``<output_dir>/loss_maps/round<NNN>.png``.
        *args, **kwargs: passed to ``transformers.Trainer`` (``model`` is the student).

    After training, ``trainer.session`` holds the session, ``trainer.synthesizer`` its synthesizer,
    ``trainer.sage_rounds`` each round's :class:`RoundRecord`, ``trainer.sage_examples_seen`` the real
    and synthetic rows the loss saw (every process together), ``trainer.world`` this process's place."""

    def __init__(self, *args, teacher: torch.nn.Module, loss: SAGELoss | SAGELossConfig | None = None,
                 on_per_example: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None,
                 example_id_column: str = "example_id", synthesis: SynthesisConfig | SAGESynthesizer | None = None,
                 synthetic_per_batch: int = 16, synthetic_share: float | None = None,
                 synthetic_volume: float | None = None, label_batch_size: int | None = None,
                 analysis_every: int | None = None, analysis_lag: int | None = None,
                 profile_signal: str = "loss", refresh_profile: bool = False, loss_maps: bool = False, **kwargs):
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if loss is None:
            loss = SAGELossConfig()
        if isinstance(loss, SAGELossConfig):
            loss = SAGELoss(loss)
        if not isinstance(loss, SAGELoss):
            raise ValueError(f"loss must be a SAGELossConfig or a SAGELoss, got {type(loss).__name__}")
        if on_per_example is not None and not callable(on_per_example):
            raise ValueError(f"on_per_example must be callable(ids, losses), got {type(on_per_example).__name__}")
        if not isinstance(example_id_column, str) or not example_id_column:
            raise ValueError(f"example_id_column must be a non-empty str, got {example_id_column!r}")
        if synthesis is not None and not isinstance(synthesis, (SynthesisConfig, SAGESynthesizer)):
            raise ValueError(f"synthesis must be None, a SynthesisConfig or a SAGESynthesizer, got "
                             f"{type(synthesis).__name__}")
        settings = SessionSettings(synthetic_per_batch, analysis_every, analysis_lag, profile_signal, refresh_profile,
                                   temperature=loss.config.temperature)
        scale = check_scale(synthesis, synthetic_share, synthetic_volume, label_batch_size)
        super().__init__(*args, **kwargs)
        # The Trainer's arguments have joined torchrun's process group by now (if there is one).
        self.world = current_world()
        wait_at_most(self.world, self.args.ddp_timeout)
        self.teacher = teacher.requires_grad_(False).eval().to(self.args.device)
        self.sage_loss = loss.to(self.args.device)
        self.on_per_example = on_per_example
        self.example_id_column = example_id_column
        self.loss_maps = bool(loss_maps)
        self.sage_examples_seen = {"real": 0, "synthetic": 0}
        # The checkpoint folder a resumed run would start from (this run's last, or the one it resumed).
        self._last_checkpoint: Path | None = None
        self.label_batch_size = scale.label_batch_size or self.args.per_device_eval_batch_size
        self.reads_tokens = False  # whether the student reads synthetic rows as token ids (set with synthesis)
        if synthesis is not None:
            settings, synthesis = scaled(scale, settings, synthesis, self.args, self.train_dataset, self.world.size)
        self.session = None if synthesis is None else self._make_session(self._make_synthesizer(synthesis), settings)
        # The loss is a per-batch mean: have the Trainer scale it for gradient accumulation and not
        # pass num_items_in_batch to the models (the attribute names differ across versions).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.add_callback(SAGESynthesisCallback(self))

    # ------------------------------------------------------------------ set-up
    def _make_synthesizer(self, synthesis) -> SAGESynthesizer:
        device = torch.device(self.args.device)
        if device.type == "cpu":  # the Trainer says cpu:0 under torchrun; there is one CPU device
            device = torch.device("cpu")
        config = synthesis.config if isinstance(synthesis, SAGESynthesizer) else synthesis
        self.reads_tokens = reads_tokens(config.generator, self.model, self.teacher)
        if not self.reads_tokens:  # one vector space for real and synthetic rows: the teacher's frozen table
            student_table, teacher_table = self.model.get_input_embeddings(), self.teacher.get_input_embeddings()
            with torch.no_grad():
                student_table.weight.copy_(teacher_table.weight)
            student_table.weight.requires_grad_(False)
        if isinstance(synthesis, SynthesisConfig):
            synthesis = SAGESynthesizer(dataclasses.replace(synthesis, device=device),
                                        num_examples=len(self.train_dataset),
                                        embedding_dim=self.model.config.hidden_size, world=self.world,
                                        inputs=self._generator_inputs())
        elif synthesis.world != self.world:
            raise ValueError(f"the synthesizer was built for {synthesis.world} but the trainer runs as {self.world}; "
                             "build it with world=sage_fast.distributed.current_world(), or pass a SynthesisConfig")
        elif synthesis.device != device:
            raise ValueError(f"the synthesizer lives on {synthesis.device} but the trainer trains on {device}; build "
                             "it with SynthesisConfig(device=...) set to the trainer's device")
        return synthesis

    def _make_session(self, synthesizer: SAGESynthesizer, settings: SessionSettings) -> SynthesisSession:
        use_compilation_cache(cache_root() / "numba")
        plot_path = None
        if self.loss_maps and self.world.is_main:  # every rank's map is the same: one draws it
            plot_path = lambda number: Path(self.args.output_dir) / "loss_maps" / f"round{number:03d}.png"  # noqa: E731
        # Weak references back to the trainer, as the callback's: the trainer holds the session.
        return SynthesisSession(synthesizer, _weak(self._vectors_of), _weak(self._label), settings,
                                plot_path=plot_path, profile_batches=_weak(self._profile_batches),
                                on_round=_weak(self._log_round))

    @property
    def synthesizer(self) -> SAGESynthesizer | None:
        return None if self.session is None else self.session.synthesizer

    @property
    def sage_rounds(self) -> list[RoundRecord]:
        return [] if self.session is None else self.session.records

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.example_id_column not in self._signature_columns:
            self._signature_columns.append(self.example_id_column)

    def create_optimizer(self, *args, **kwargs):
        # A user-supplied optimizer is left as it is: include trainer.sage_loss.parameters() in it.
        creating = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        projections = [p for p in self.sage_loss.parameters() if p.requires_grad]
        if creating and projections:
            optimizer.add_param_group({"params": projections, "weight_decay": self.args.weight_decay})
        return optimizer

    # ------------------------------------------------------------------ several processes
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The step's last micro-batch (the Trainer lets DDP reduce the student's gradients on it):
        # before gradient clipping and the optimizer step.
        if self.world.distributed and self.accelerator.sync_gradients:
            average_gradients(self.world, self.sage_loss)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``, with SAGE's state restored from the checkpoint it resumes. Under several
        processes, a collective that fails because another rank died or did not answer within
        ``args.ddp_timeout`` seconds ends this rank with :class:`PeerLost`."""
        # Resolved here as the Trainer does, so that SAGE's state is read from the same folder.
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._last_checkpoint = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        if resume_from_checkpoint:
            # Before the Trainer's own loading, so a checkpoint of another kind of run is named as such.
            self.load_sage_state(resume_from_checkpoint)
        try:
            share_from_rank_zero(self.world, self.sage_loss)
            self.sage_loss.zero_grad(set_to_none=True)  # as the Trainer clears the model's before its first step
            return super().train(resume_from_checkpoint or None, *args, **kwargs)
        except RuntimeError as error:  # a failed collective is one (torch.distributed.DistError among them)
            if not self.world.distributed or isinstance(error, PeerLost) or not collective_failed(error):
                raise
            raise peer_lost(self.world, error, self._last_checkpoint, self.args.ddp_timeout,
                            self.state.global_step) from error

    def sage_state_dict(self) -> dict:
        synthesis = {"synthesizer": None} if self.session is None else self.session.state_dict()
        return {**synthesis, "sage_loss": self.sage_loss.state_dict(), "examples_seen": dict(self.sage_examples_seen)}

    def save_sage_state(self, folder: str | Path) -> Path:
        """Write ``sage_state_dict()`` to ``folder/sage_fast_state.pt`` (whole or not at all). Under
        several processes the state is the same on every rank: one process writes it."""
        path = Path(folder) / STATE_FILE
        partial = path.with_name(f".{STATE_FILE}.partial")
        torch.save(self.sage_state_dict(), partial)
        os.replace(partial, path)
        return path

    def load_sage_state(self, folder: str | Path) -> None:
        """Restore what ``save_sage_state`` wrote into a checkpoint folder (every rank reads it)."""
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise ValueError(f"{folder} holds no {STATE_FILE}: it was not written by a SAGEDistillTrainer, so the "
                             "synthetic pool and the loss projections cannot be restored")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if (state["synthesizer"] is None) != (self.synthesizer is None):
            raise ValueError(f"{path} was saved {'without' if state['synthesizer'] is None else 'with'} synthesis; "
                             "resume with the same setting")
        self.sage_loss.load_state_dict(state["sage_loss"])
        if self.session is not None:
            self.session.load_state_dict(state)
        self.sage_examples_seen = dict(state["examples_seen"])

    # ------------------------------------------------------------------ synthesis
    def _vectors_of(self, ids: torch.Tensor):
        """Teacher-space vectors and masks of training rows (the synthesizer's ``vectors_of``)."""
        input_ids, mask = self._tokens_of(ids)
        with torch.no_grad():
            return self.teacher.get_input_embeddings()(input_ids), mask

    def _tokens_of(self, ids: torch.Tensor):
        """Token ids and masks of training rows, fetched by position, padded to the longest."""
        return dataset_tokens(self.train_dataset, ids, self.example_id_column, self.teacher.config.pad_token_id or 0,
                              self.args.device)

    def _generator_inputs(self) -> GeneratorInputs:
        """What the synthesis generators read besides vectors (the callables that read the Trainer
        hold it weakly; the student is held as it is)."""
        return trainer_generator_inputs(self.teacher, getattr(self, "processing_class", None),
                                        tokens_of=_weak(self._tokens_of), student=self.model,
                                        student_forward=student_logits_on_vectors,
                                        batch_size=self.args.per_device_eval_batch_size,
                                        temperature=self.sage_loss.config.temperature)

    @torch.no_grad()
    def _label(self, vectors: torch.Tensor, mask: torch.Tensor):
        """The teacher's logits and the hidden layers the loss reads on synthetic vectors (the
        session's ``label``)."""
        def forward(vectors, mask, output_hidden_states):
            return self.teacher(**vector_inputs(self.teacher, vectors, mask),
                                output_hidden_states=output_hidden_states, return_dict=True)

        return label_in_chunks(forward, vectors, mask, self.sage_loss.teacher_layers_needed, self.label_batch_size)

    def _log_round(self, record: RoundRecord) -> None:
        for line in record.decoded if self.world.is_main else ():  # rows of real tokens, for a person to judge
            logger.info("sage round %d: %s", record.round, line)
        self.log({"sage_pool": record.pool_size, **{f"sage_{name}": getattr(record, name) for name in (
            "round", "synthetic", "threshold", "analysis_seconds", "synthesis_seconds", "labelling_seconds",
            "wait_seconds")}})

    @torch.no_grad()
    def _profile_batches(self):
        """``(ids, signal, embeddings)`` of every training row, one no-grad pass of the student in
        eval mode, in the dataset's order (the session's ``refresh_profile``)."""
        dataset = self.train_dataset
        if self.args.remove_unused_columns and hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="training")
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.data_collator)
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            for inputs in loader:
                inputs = dict(self._prepare_inputs(inputs))
                labels, ids = inputs.pop("labels", None), inputs.pop(self.example_id_column)
                teacher_outputs = self.teacher(**inputs, output_hidden_states=self.sage_loss.config.beta > 0)
                out = model(**inputs, output_hidden_states=True)
                mask = inputs.get("attention_mask")
                result = self.sage_loss(out, teacher_outputs, labels=labels, attention_mask=mask)
                signal, embeddings = self.session.profile_rows(result.per_example, out["logits"],
                                                               teacher_outputs["logits"], labels,
                                                               out["hidden_states"][-1], mask)
                yield ids, signal, embeddings
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = dict(inputs)
        labels = model_inputs.pop("labels", None)
        ids = model_inputs.pop(self.example_id_column, None)
        attention_mask = model_inputs.get("attention_mask")
        training = model.training
        aligning = self.sage_loss.config.beta > 0
        observing = training and self.synthesizer is not None
        if observing and ids is None:
            raise ValueError(f"synthesis needs the batch's {self.example_id_column!r} column (each row's position in "
                             "train_dataset)")

        if self.teacher.training:  # something switched it back; the teacher is always evaluated
            self.teacher.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher(**model_inputs, output_hidden_states=aligning)
        n_real = int(teacher_outputs["logits"].shape[0])
        synthetic = None
        if observing:
            micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            synthetic, drawn = self.session.next_part(micro_batches)
            self.sage_examples_seen["synthetic"] += drawn
        if synthetic is None:
            student_outputs = model(**model_inputs, output_hidden_states=aligning or observing)
            result = self.sage_loss(student_outputs, teacher_outputs, labels=labels, attention_mask=attention_mask)
        else:
            layers = self.sage_loss.teacher_layers_needed if aligning else ()
            batch = mixed_batch(model_inputs, self.teacher, teacher_outputs, labels, synthetic, layers,
                                self.sage_loss.config.ignore_index, tokens=self.reads_tokens)
            attention_mask, labels = batch.mask, batch.labels
            # self.model, not model, is asked how it reads rows: model may be a wrapper.
            student_outputs = model(**student_inputs(self.model, batch, tokens=self.reads_tokens),
                                    output_hidden_states=True)
            result = self.sage_loss(student_outputs, {"logits": batch.logits, "hidden_states": batch.hidden or None},
                                    labels=labels, attention_mask=attention_mask)

        if training:
            # every rank's real rows in this micro-batch (a small gather over a CPU group, no device
            # wait): equal under accelerate's even batches, but a sampler of varying batch sizes, or
            # even_batches=False at an epoch's end, gives ranks different counts
            sizes = self.world.row_counts(n_real)
            self.sage_examples_seen["real"] += sum(sizes)
            per_example = result.per_example[:n_real]
            if self.on_per_example is not None:
                self.on_per_example(ids, per_example)
            if observing:
                self.session.observe(ids, per_example, student_outputs["logits"][:n_real],
                                     teacher_outputs["logits"][:n_real], None if labels is None else labels[:n_real],
                                     student_outputs["hidden_states"][-1][:n_real],
                                     None if attention_mask is None else attention_mask[:n_real], sizes)
        if return_outputs:
            # Only the real rows' logits: evaluation gathers every output across batches.
            return result.loss, {"logits": student_outputs["logits"][:n_real]}
        return result.loss
