"""SAGE distillation inside a Hugging Face ``transformers.Trainer``.

``SAGEDistillTrainer`` trains the ``model`` it is given (the student) against a frozen ``teacher``
with :class:`sage_fast.nn.SAGELoss`: each step runs the teacher without gradients, in eval mode, on
the student's device, then the student, both with ``output_hidden_states=True`` when the loss aligns
hidden states (``beta > 0``). The student and teacher must read the same inputs (same tokenizer).

With ``synthesis=SynthesisConfig(...)`` it is real SAGE: a :class:`sage_fast.synthesis.SAGESynthesizer`
observes every training step's per-example losses and pooled student embeddings, runs an analysis
round every ``analysis_every`` optimizer steps (default: three rounds an epoch, as ``sage-fast distill``),
and ``synthetic_per_batch`` rows from its pool join each training batch. Synthetic rows exist only
as input vectors in the teacher's word-embedding space (interpolations of real rows'
``E_t[input_ids]``), so the teacher labels them and the student trains on them through
``inputs_embeds``. For real and synthetic rows to live in one space, the student reads the teacher's
table: at construction it is copied into the student's input embeddings, which are then frozen
(students built from the teacher's layers start from that table anyway). The student therefore needs
the teacher's tokenizer and embedding width; the saved student stays a standard model.

The batches need an ``example_id`` column holding each row's position in ``train_dataset`` (the
synthesizer indexes its error profile by it and fetches the rows it interpolates with
``train_dataset[i]``). The trainer keeps that column even with ``remove_unused_columns=True``, and
never passes it to the models.

Per-example losses can also be handed to a callable ``on_per_example(ids, losses)`` on every
training step: ``losses`` is the detached ``[B]`` float32 ``SAGELossOutput.per_example`` of the real
rows; ``ids`` is the batch's ``example_id`` column (``None`` when the batch has none).

``synthetic_per_batch`` counts the synthetic rows of one optimizer step, over every process and
gradient-accumulation micro-batch: they are drawn once a step and dealt out, micro-batch ``k`` of
rank ``r`` taking rows ``j::size*K`` with ``j = r*K + k`` (``K`` the step's micro-batches). So one
process with ``gradient_accumulation_steps=K`` trains on the rows ``K`` processes would, and the
synthetic share of the global batch does not change with the number of processes.

Checkpoints: each checkpoint folder the Trainer writes also gets ``sage_fast_state.pt`` with the
synthesizer's state (profile, pool, generators, round count) and the loss's projections; resuming
(``trainer.train(resume_from_checkpoint=...)``) loads it, so the pool survives and, on CPU, a resumed
run continues as the uninterrupted one would.

The loss is a per-batch mean over real and synthetic rows, so the Trainer divides it by the
gradient-accumulation steps, as it does for any mean loss. When the hidden sizes differ,
``SAGELoss`` owns learned projections; they are trained with the student (an extra optimizer group;
add ``trainer.sage_loss.parameters()`` to an optimizer you pass in yourself).

Several processes (``torchrun``, ``accelerate launch``; the Trainer's process group, any backend):
every rank ends each step with the same student, projections and synthesizer.

- The student is the Trainer's: it wraps it in ``DistributedDataParallel``.
- The projections' gradients are averaged over the ranks by the trainer itself, once a step, right
  after the backward of the step's last micro-batch (where DDP averages the student's): the
  projections stay out of the model the Trainer wraps and saves, so the saved student is a
  standard Hugging Face model with nothing of the loss in its weights. Rank 0's projections are
  sent to every rank when ``train`` starts, as DDP does for the student.
- The synthesizer is built for the process group's world (``sage_fast.distributed.current_world``):
  every micro-batch each rank's ids, losses and embeddings are gathered (with the ranks' row counts,
  gathered first since a sampler may give ranks batches of different sizes), so every rank holds
  the same profile; rounds run on every rank at the same step and make the same plan, each rank
  labels its share of the rows and every rank's pool gets them all; every rank draws the same
  synthetic rows and trains on its part. Loss maps are drawn by rank 0.
- ``sage_examples_seen`` counts the rows of every rank; ``on_per_example`` gets this rank's rows.
- ``sage_fast_state.pt`` is the same on every rank: the process that saves the model writes it
  (``args.should_save``) and every rank reads it on resume.
- A rank that dies, or stops answering for ``args.ddp_timeout`` seconds (the trainer gives the
  process group that timeout, which transformers leaves at gloo's 30 minutes with ``use_cpu=True``),
  makes the others' next collective fail: ``train`` then raises :class:`sage_fast.distributed.PeerLost`,
  whose message names this rank, the global step, the last checkpoint and how to resume, instead of
  a bare backend error.

The teacher is not wrapped or synchronised: every rank must load the same teacher.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import math
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

from .. import _checks
from ..distributed import PeerLost, collective_failed, current_world
from ..nn.sage_loss import SAGELoss, SAGELossConfig
from ..regions import pooled_embedding
from ..synthesis import (GeneratorInputs, RoundRecord, SAGESynthesizer, SynthesisConfig, SyntheticRows,
                         default_analysis_interval, pad_tokens, partner_classes)
from ..synthesis.generators import replaceable_tokens

__all__ = ["STATE_FILE", "SAGEDistillTrainer", "SAGESynthesisCallback"]

logger = logging.getLogger(__name__)

#: What the trainer adds to each checkpoint folder.
STATE_FILE = "sage_fast_state.pt"
# Keys a batch may hold when synthetic rows are mixed in: the rows are joined through inputs_embeds.
_MIXABLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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

    def _round_due(self, state) -> bool:
        return self.trainer.synthesizer is not None and state.global_step < state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.analysis_every
        if every is None:  # the driver's default schedule (a run shorter than an epoch: its steps)
            every = default_analysis_interval(state.max_steps // max(1, math.ceil(state.num_train_epochs)))
        # No round after the last step: nothing would train on what it makes.
        if state.global_step % every == 0 and self._round_due(state):
            self.trainer.synthesis_round(state.global_step)

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
        analysis_every: optimizer steps between rounds (default ``None``: a third of an epoch, none
            after the last step).
        loss_maps: write each round's loss map to ``<output_dir>/loss_maps/round<NNN>.png``.
        *args, **kwargs: passed to ``transformers.Trainer`` (``model`` is the student).

    After training, ``trainer.synthesizer`` holds the synthesizer, ``trainer.sage_rounds`` each
    round's :class:`RoundRecord`, and ``trainer.sage_examples_seen`` the real and synthetic rows the
    loss saw (on every process together). ``trainer.world`` is this process's place in the run.
    """

    def __init__(self, *args, teacher: torch.nn.Module, loss: SAGELoss | SAGELossConfig | None = None,
                 on_per_example: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None,
                 example_id_column: str = "example_id", synthesis: SynthesisConfig | SAGESynthesizer | None = None,
                 synthetic_per_batch: int = 16, analysis_every: int | None = None, loss_maps: bool = False,
                 **kwargs):
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
        _checks.integer("synthetic_per_batch", synthetic_per_batch, minimum=0)
        if analysis_every is not None:
            _checks.integer("analysis_every", analysis_every, minimum=1)
        super().__init__(*args, **kwargs)
        # The Trainer's arguments have joined torchrun's process group by now (if there is one).
        self.world = current_world()
        self._wait_at_most_ddp_timeout()
        self.teacher = teacher.requires_grad_(False).eval().to(self.args.device)
        self.sage_loss = loss.to(self.args.device)
        self.on_per_example = on_per_example
        self.example_id_column = example_id_column
        self.synthetic_per_batch = synthetic_per_batch
        self.analysis_every = analysis_every
        self.loss_maps = bool(loss_maps)
        self.sage_rounds: list[RoundRecord] = []
        self.sage_examples_seen = {"real": 0, "synthetic": 0}
        # This optimizer step's synthetic rows still to train on, one entry a micro-batch (see _synthetic_part).
        self._synthetic_parts: list[SyntheticRows | None] = []
        # The checkpoint folder a resumed run would start from (this run's last, or the one it resumed).
        self._last_checkpoint: Path | None = None
        self.synthesizer = None if synthesis is None else self._make_synthesizer(synthesis)
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
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("synthesis needs a train_dataset with a length whose rows are found by position "
                             "(train_dataset[example_id])")
        student_table, teacher_table = self.model.get_input_embeddings(), self.teacher.get_input_embeddings()
        if student_table.weight.shape != teacher_table.weight.shape:
            raise ValueError(
                "synthesis needs a student that reads the teacher's tokens at the teacher's embedding width: the "
                f"student's input table is {tuple(student_table.weight.shape)}, the teacher's "
                f"{tuple(teacher_table.weight.shape)} (the sage-fast distill driver learns an adapter for that case)")
        # One vector space for real and synthetic rows: the student reads the teacher's frozen table.
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
    def _wait_at_most_ddp_timeout(self) -> None:
        """Collectives give up on a silent peer after ``args.ddp_timeout`` seconds, as the Trainer
        documents: transformers gives the process group that timeout when it creates it, except with
        ``use_cpu=True``, where gloo would wait its default 30 minutes."""
        import torch.distributed as dist

        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # no public setter
        if self.world.distributed and set_timeout is not None and dist.get_backend() in ("gloo", "nccl"):
            set_timeout(datetime.timedelta(seconds=self.args.ddp_timeout))

    def _share_projections(self) -> None:
        """Rank 0's projections on every rank, as DDP starts every rank from rank 0's student (each
        process built its loss with its own random state)."""
        if not self.world.distributed or not self.sage_loss.state_dict():
            return
        state = {name: value.detach().cpu() for name, value in self.sage_loss.state_dict().items()}
        self.sage_loss.load_state_dict(self.world.broadcast_object(state))

    def _average_projection_gradients(self) -> None:
        """The projections' gradients averaged over the ranks, as DDP averages the student's: one
        all-reduce of all of them, flattened. A projection without a gradient on a rank counts as zero
        there, so every rank issues the same collective."""
        projections = [p for p in self.sage_loss.parameters() if p.requires_grad]
        if not projections:
            return
        for p in projections:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in projections])
        self.world.all_reduce_sum(flat).div_(self.world.size)
        for p, averaged in zip(projections, flat.split([p.numel() for p in projections])):
            p.grad.copy_(averaged.view_as(p.grad))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The step's last micro-batch (the Trainer lets DDP reduce the student's gradients on it):
        # before gradient clipping and the optimizer step.
        if self.world.distributed and self.accelerator.sync_gradients:
            self._average_projection_gradients()
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
            self._share_projections()
            self.sage_loss.zero_grad(set_to_none=True)  # as the Trainer clears the model's before its first step
            self._synthetic_parts = []
            return super().train(resume_from_checkpoint or None, *args, **kwargs)
        except RuntimeError as error:  # a failed collective is one (torch.distributed.DistError among them)
            if not self.world.distributed or isinstance(error, PeerLost) or not collective_failed(error):
                raise
            raise self._peer_lost(error) from error

    def _peer_lost(self, error: BaseException) -> PeerLost:
        """What this rank says when a collective failed: where it stopped, what is kept, how to go on."""
        if self._last_checkpoint is None:
            kept, resume = "no checkpoint was written yet", "(there is nothing to resume from)"
        else:
            kept = f"the last checkpoint is {self._last_checkpoint}"
            resume = "with the script calling trainer.train(resume_from_checkpoint=True)"
        cause = str(error).strip().splitlines()
        return PeerLost(
            f"rank {self.world.rank}: another process of this run stopped or stopped answering (no reply within "
            f"ddp_timeout {self.args.ddp_timeout:g} s) at global step {self.state.global_step}; {kept}; see that "
            f"process's own message for why, then start the same torchrun command again {resume}. "
            f"({cause[0] if cause else type(error).__name__})")

    def sage_state_dict(self) -> dict:
        return {"synthesizer": None if self.synthesizer is None else self.synthesizer.state_dict(),
                "sage_loss": self.sage_loss.state_dict(), "examples_seen": dict(self.sage_examples_seen)}

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
        if self.synthesizer is not None:
            self.synthesizer.load_state_dict(state["synthesizer"])
        self.sage_examples_seen = dict(state["examples_seen"])

    # ------------------------------------------------------------------ synthesis
    def _vector_inputs(self, model, vectors, mask, token_type_ids=None) -> dict:
        """Keyword arguments that feed ``model`` vectors instead of token ids. Models that number
        positions from the padding (RoBERTa, MPNet) get the position ids ``input_ids`` would give."""
        inputs = {"inputs_embeds": vectors, "attention_mask": mask}
        embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
        if embeddings is not None and hasattr(embeddings, "create_position_ids_from_inputs_embeds"):
            valid = mask.long()
            inputs["position_ids"] = torch.cumsum(valid, dim=1) * valid + embeddings.padding_idx
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def _vectors_of(self, ids: torch.Tensor):
        """Teacher-space vectors and masks of training rows, fetched by position, padded to the
        longest (the synthesizer's ``vectors_of``)."""
        input_ids, mask = self._tokens_of(ids)
        with torch.no_grad():
            return self.teacher.get_input_embeddings()(input_ids), mask

    def _tokens_of(self, ids: torch.Tensor):
        """Token ids and masks of training rows, fetched by position, padded to the longest."""
        rows = []
        for i in ids.tolist():
            row = self.train_dataset[i]
            if self.example_id_column in row and int(row[self.example_id_column]) != i:
                raise ValueError(f"train_dataset[{i}] has {self.example_id_column} {int(row[self.example_id_column])}: "
                                 f"with synthesis, {self.example_id_column} must be each row's position in "
                                 "train_dataset")
            rows.append(row)
        tokens = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        masks = [torch.as_tensor(row["attention_mask"], dtype=torch.long) if "attention_mask" in row
                 else torch.ones_like(t) for t in tokens]
        width = max(t.shape[0] for t in tokens)
        pad = self.teacher.config.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (t, m) in enumerate(zip(tokens, masks)):
            input_ids[j, : t.shape[0]], mask[j, : m.shape[0]] = t, m
        return input_ids.to(self.args.device), mask.to(self.args.device)

    def _student_logits(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The student's logits on teacher-space vectors, with gradients to them (boundary steps), in
        eval mode: no dropout, so no random number is drawn from training's streams."""
        training = self.model.training
        self.model.eval()
        try:
            return self.model(**self._vector_inputs(self.model, vectors, mask)).logits.float()
        finally:
            self.model.train(training)

    def _generator_inputs(self) -> GeneratorInputs:
        """What the synthesis generators read besides vectors: the rows' tokens, the teacher's table,
        the tokens a substitution may use (the tokenizer's non-special ones), the student."""
        table = self.teacher.get_input_embeddings().weight.detach()
        tokenizer = getattr(self, "processing_class", None)
        if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
            replaceable = replaceable_tokens(tokenizer, table.shape[0])

            def decode(ids: torch.Tensor) -> str:
                return tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        else:  # without a tokenizer: every token but the special ones the teacher's config names
            replaceable, decode = torch.ones(table.shape[0], dtype=torch.bool), None
            for name in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
                index = getattr(self.teacher.config, name, None)
                if isinstance(index, int) and 0 <= index < table.shape[0]:
                    replaceable[index] = False
        # Through a weak reference, as the callback: the synthesizer holding the trainer would make a cycle.
        trainer = weakref.ref(self)
        return GeneratorInputs(tokens_of=lambda ids: trainer()._tokens_of(ids), embedding_table=table,
                               replaceable=replaceable.to(table.device), decode=decode,
                               student_logits=lambda vectors, mask: trainer()._student_logits(vectors, mask),
                               batch_size=self.args.per_device_eval_batch_size,
                               temperature=self.sage_loss.config.temperature)

    @torch.no_grad()
    def _label(self, vectors: torch.Tensor, mask: torch.Tensor):
        """The teacher's logits (float32) and the hidden layers the loss reads (float16, to halve the
        pool's memory) on synthetic vectors (the synthesizer's ``label``)."""
        layers = self.sage_loss.teacher_layers_needed
        logits, hidden = [], {k: [] for k in layers}
        chunk = self.args.per_device_eval_batch_size
        for start in range(0, vectors.shape[0], chunk):
            out = self.teacher(**self._vector_inputs(self.teacher, vectors[start:start + chunk],
                                                     mask[start:start + chunk]),
                               output_hidden_states=bool(layers), return_dict=True)
            logits.append(out.logits.float())
            for k in layers:
                hidden[k].append(out.hidden_states[k].to(torch.float16))
        return torch.cat(logits), {k: torch.cat(v) for k, v in hidden.items()}

    def synthesis_round(self, step: int | None = None) -> RoundRecord | None:
        """One analysis round now (the callback calls this on schedule); logged as ``sage_*``."""
        plot_path = None
        if self.loss_maps and self.world.is_main:  # every rank's map is the same: one draws it
            plot_path = lambda number: Path(self.args.output_dir) / "loss_maps" / f"round{number:03d}.png"  # noqa: E731
        record = self.synthesizer.round(self._vectors_of, self._label, step=step, plot_path=plot_path)
        if record is not None:
            self.sage_rounds.append(record)
            for line in record.decoded if self.world.is_main else ():  # rows of real tokens, for a person to judge
                logger.info("sage round %d: %s", record.round, line)
            self.log({"sage_round": record.round, "sage_synthetic": record.synthetic, "sage_pool": record.pool_size,
                      "sage_threshold": record.threshold, "sage_analysis_seconds": record.analysis_seconds,
                      "sage_synthesis_seconds": record.synthesis_seconds,
                      "sage_labelling_seconds": record.labelling_seconds})
        return record

    def _synthetic_part(self) -> SyntheticRows | None:
        """This micro-batch's synthetic rows: at a step's first micro-batch ``synthetic_per_batch``
        rows are drawn (the same on every rank) and dealt out to every rank's micro-batches of the
        step; each later micro-batch takes the next part. None when the pool is empty."""
        if not self._synthetic_parts:
            micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            drawn = self.synthesizer.sample(self.synthetic_per_batch, parts=micro_batches)
            if drawn is None:
                drawn = [None] * micro_batches
            else:
                self.sage_examples_seen["synthetic"] += min(self.synthetic_per_batch, len(self.synthesizer.pool))
            self._synthetic_parts = drawn
        return self._synthetic_parts.pop(0)

    def _mixed_batch(self, model_inputs: dict, teacher_outputs, labels, synthetic: SyntheticRows):
        """Real rows (as the teacher's vectors) and synthetic rows in one batch, padded to one width:
        the student's inputs, the teacher's outputs, the labels (synthetic rows': their gold label where
        they carry one, ``partners='same-label'``, otherwise none), the mask."""
        unknown = sorted(set(model_inputs) - set(_MIXABLE_INPUTS))
        if unknown or "input_ids" not in model_inputs:
            raise ValueError(f"synthetic rows join a batch through input_ids, attention_mask and token_type_ids; this "
                             f"batch has {sorted(model_inputs)}")
        input_ids = model_inputs["input_ids"]
        real_mask = model_inputs.get("attention_mask")
        if real_mask is None:
            real_mask = torch.ones_like(input_ids)
        width = max(input_ids.shape[1], synthetic.vectors.shape[1])
        with torch.no_grad():
            real_vectors = self.teacher.get_input_embeddings()(input_ids)
        vectors = torch.cat([pad_tokens(real_vectors, width), pad_tokens(synthetic.vectors.to(real_vectors), width)])
        mask = torch.cat([pad_tokens(real_mask, width), pad_tokens(synthetic.mask.to(real_mask), width)])
        token_types = model_inputs.get("token_type_ids")
        if token_types is not None:  # synthetic rows were labelled with token type 0 throughout
            zeros = token_types.new_zeros(synthetic.mask.shape[0], width)
            token_types = torch.cat([pad_tokens(token_types, width), zeros])
        logits = torch.cat([teacher_outputs["logits"], synthetic.logits.to(teacher_outputs["logits"])])
        hidden = None
        if self.sage_loss.config.beta > 0:
            real_hidden = teacher_outputs["hidden_states"]
            hidden = {k: torch.cat([pad_tokens(real_hidden[k], width),
                                    pad_tokens(synthetic.hidden[k].to(real_hidden[k]), width)])
                      for k in self.sage_loss.teacher_layers_needed}
        ignore = self.sage_loss.config.ignore_index
        if labels is None:
            labels = torch.full((input_ids.shape[0],), ignore, dtype=torch.long, device=input_ids.device)
        labels = torch.cat([labels, synthetic.loss_labels(ignore).to(labels)])
        return vectors, mask, token_types, {"logits": logits, "hidden_states": hidden}, labels

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
        synthetic = self._synthetic_part() if observing else None
        if synthetic is None:
            student_outputs = model(**model_inputs, output_hidden_states=aligning or observing)
            result = self.sage_loss(student_outputs, teacher_outputs, labels=labels, attention_mask=attention_mask)
        else:
            vectors, attention_mask, token_types, teacher_outputs, labels = self._mixed_batch(
                model_inputs, teacher_outputs, labels, synthetic)
            # self.model, not model, is asked how it numbers positions: model may be a wrapper.
            student_outputs = model(**self._vector_inputs(self.model, vectors, attention_mask, token_types),
                                    output_hidden_states=True)
            result = self.sage_loss(student_outputs, teacher_outputs, labels=labels, attention_mask=attention_mask)

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
                with torch.no_grad():
                    real_mask = None if attention_mask is None else attention_mask[:n_real]
                    embeddings = pooled_embedding(student_outputs["hidden_states"][-1][:n_real].detach(), real_mask)
                    classes = partner_classes(self.synthesizer.config.partners, teacher_outputs["logits"][:n_real],
                                              None if labels is None else labels[:n_real])
                self.synthesizer.observe(ids, per_example, embeddings, classes, sizes=sizes)
        if return_outputs:
            # Only the real rows' logits: evaluation gathers every output across batches.
            return result.loss, {"logits": student_outputs["logits"][:n_real]}
        return result.loss
