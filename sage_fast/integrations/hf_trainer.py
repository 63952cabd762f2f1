"""SAGE distillation inside a Hugging Face ``transformers.Trainer``.

``SAGEDistillTrainer`` trains the ``model`` it is given (the student) against a frozen ``teacher``
with :class:`sage_fast.nn.SAGELoss`: each step runs the teacher without gradients, in eval mode, on
the student's device, then the student, both with ``output_hidden_states=True`` when the loss aligns
hidden states (``beta > 0``). The student and teacher must read the same inputs (same tokenizer).

Per-example losses can be handed to a callable ``on_per_example(ids, losses)`` on every training
step, for instance to fill an error profile: ``losses`` is the detached ``[B]`` float32
``SAGELossOutput.per_example``; ``ids`` is the batch's ``example_id`` column (``None`` when the batch
has none). The trainer keeps that column even with ``remove_unused_columns=True``, and never passes
it to the models.

The loss is a per-batch mean, so the Trainer divides it by the gradient-accumulation steps, as it
does for any mean loss. When the hidden sizes differ, ``SAGELoss`` owns learned projections; they
are trained with the student (an extra optimizer group) and live in ``trainer.sage_loss``, not in
the student's checkpoint: save ``trainer.sage_loss.state_dict()`` yourself if you need them (and
add ``trainer.sage_loss.parameters()`` to an optimizer you pass in yourself). Under
several processes those projections are not wrapped for gradient all-reduce: use equal hidden sizes
or ``beta = 0`` there.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sage_fast.integrations.hf_trainer needs transformers: pip install 'sage-fast[train]'"
    ) from err

from ..nn.sage_loss import SAGELoss, SAGELossConfig

__all__ = ["SAGEDistillTrainer"]


class SAGEDistillTrainer(Trainer):
    """A ``Trainer`` whose loss is the SAGE distillation loss against a frozen teacher.

    Args:
        teacher: the teacher model (a Hugging Face model returning ``logits``, and ``hidden_states``
            when asked). It is frozen: ``requires_grad`` off, eval mode, moved to the trainer's device.
        loss: a :class:`SAGELossConfig` or a built :class:`SAGELoss` (default: ``SAGELossConfig()``,
            plain KD with ``alpha=0.5, temperature=2``).
        on_per_example: optional ``callable(ids, losses)`` called on every training step.
        example_id_column: the batch key that holds example ids.
        *args, **kwargs: passed to ``transformers.Trainer`` (``model`` is the student).
    """

    def __init__(self, *args, teacher: torch.nn.Module, loss: SAGELoss | SAGELossConfig | None = None,
                 on_per_example: Callable[[torch.Tensor | None, torch.Tensor], None] | None = None,
                 example_id_column: str = "example_id", **kwargs):
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
        super().__init__(*args, **kwargs)
        self.teacher = teacher.requires_grad_(False).eval().to(self.args.device)
        self.sage_loss = loss.to(self.args.device)
        self.on_per_example = on_per_example
        self.example_id_column = example_id_column
        # The loss is a per-batch mean: have the Trainer scale it for gradient accumulation and not
        # pass num_items_in_batch to the models (the attribute names differ across versions).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = dict(inputs)
        labels = model_inputs.pop("labels", None)
        ids = model_inputs.pop(self.example_id_column, None)
        attention_mask = model_inputs.get("attention_mask")
        if self.sage_loss.config.beta > 0:
            model_inputs["output_hidden_states"] = True

        if self.teacher.training:  # something switched it back; the teacher is always evaluated
            self.teacher.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher(**model_inputs)
        student_outputs = model(**model_inputs)

        result = self.sage_loss(student_outputs, teacher_outputs, labels=labels, attention_mask=attention_mask)
        if self.on_per_example is not None and model.training:
            self.on_per_example(ids, result.per_example)
        if return_outputs:
            # Only the logits: evaluation gathers every output across batches.
            return result.loss, {"logits": student_outputs["logits"]}
        return result.loss
