"""The SAGE training loss over Hugging Face model outputs.

Per example ``i`` (real or synthetic)::

    l_i = alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) CE(z_s, y_i)
          + beta * sum_l w_l * align(P_l h_s^l, h_t^m(l))

CE is skipped where ``y_i == ignore_index`` (synthetic examples have no label). ``align`` is the
mask-aware MSE and/or cosine term of :func:`sage_fast.ops.align_loss`; ``P_l`` is a learned projection
when the hidden sizes differ; ``m`` maps student hidden-state indices to teacher ones (index 0 is
the embedding output, as in Hugging Face ``hidden_states``). The teacher is a constant.

Causal language models (logits ``[B, T, V]``): position ``t`` predicts token ``t + 1``, so the
logits of positions ``0..T-2`` meet the labels and attention mask of positions ``1..T-1`` (the
shift Hugging Face's causal-LM loss makes; ``shift_labels=False`` for token classification, where
position ``t`` has label ``t``). A token counts where that shifted attention mask is 1: it has the
KL term, and the cross-entropy to its next token unless that label is ``ignore_index``. So padding
counts in nothing, and a synthetic sequence (no gold tokens: every label ``ignore_index``) keeps the
teacher's soft labels on all its tokens; to leave prompt tokens out entirely, as TRL's trainers do,
zero them in the mask given to the loss. A sequence's ``l_i`` (its error-profile entry) is the mean
over its counted tokens (0 when none counts), the alignment term's mean over tokens as before; the
batch loss is the mean of the ``l_i``, so every sequence weighs the same whatever its length.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import _checks
from ..ops.align_loss import align_loss
from ..ops.kd_loss import kd_loss

__all__ = ["SAGELoss", "SAGELossConfig", "SAGELossOutput"]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class SAGELossConfig:
    alpha: float = 0.5
    temperature: float = 2.0
    beta: float = 0.0
    mse_weight: float = 1.0
    cosine_weight: float = 0.0
    #: Student hidden-state index -> teacher hidden-state index. Default: evenly spaced, student layer
    #: ``i`` (1..S) -> teacher layer ``round(i * T / S)`` (halves round up).
    layer_map: dict[int, int] | None = None
    #: Weight per student index of ``layer_map``; missing entries weigh 1.
    layer_weights: dict[int, float] | None = None
    num_student_layers: int | None = None
    num_teacher_layers: int | None = None
    student_hidden_size: int | None = None
    teacher_hidden_size: int | None = None
    ignore_index: int = -100
    #: For ``[B, T, V]`` logits: position t predicts token t + 1 (a causal LM). False: position t
    #: has label t (token classification).
    shift_labels: bool = True

    def __post_init__(self):
        _checks.in_range("alpha", self.alpha, 0.0, 1.0)
        _checks.in_range("temperature", self.temperature, 0.0, float("inf"), lo_open=True, hi_open=True)
        _checks.in_range("beta", self.beta, 0.0, float("inf"), hi_open=True)
        _checks.in_range("mse_weight", self.mse_weight, 0.0, float("inf"), hi_open=True)
        _checks.in_range("cosine_weight", self.cosine_weight, 0.0, float("inf"), hi_open=True)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not isinstance(self.shift_labels, bool):
            raise ValueError(f"shift_labels must be True or False, got {self.shift_labels!r}")
        for name in ("num_student_layers", "num_teacher_layers", "student_hidden_size", "teacher_hidden_size"):
            value = getattr(self, name)
            if value is not None and not _is_count(value):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.layer_map is not None:
            self._check_layer_map()
        if self.beta == 0:
            return
        if self.mse_weight == 0 and self.cosine_weight == 0:
            raise ValueError("mse_weight and cosine_weight are both 0 while beta > 0; at least one must be positive")
        if (self.student_hidden_size is None) != (self.teacher_hidden_size is None):
            raise ValueError("student_hidden_size and teacher_hidden_size must be given together (or both None, "
                             "meaning the hidden sizes are equal)")
        if self.layer_map is None:
            if self.num_student_layers is None or self.num_teacher_layers is None:
                raise ValueError("layer_map is None, so num_student_layers and num_teacher_layers are needed for "
                                 "the default evenly spaced map")
        if self.layer_weights is not None:
            self._check_layer_weights()

    def _check_layer_map(self):
        if not isinstance(self.layer_map, Mapping) or not self.layer_map:
            raise ValueError(f"layer_map must be a non-empty dict {{student index: teacher index}}, got {self.layer_map!r}")
        for key, value in self.layer_map.items():
            for side, index, count in (("student", key, self.num_student_layers),
                                       ("teacher", value, self.num_teacher_layers)):
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(f"layer_map {side} indices must be non-negative ints, got {index!r}")
                if count is not None and index > count:
                    raise ValueError(f"layer_map {side} index {index} is out of range: hidden_states has "
                                     f"{count + 1} entries (0 = embeddings, 1..{count} = layers)")

    def _check_layer_weights(self):
        if not isinstance(self.layer_weights, Mapping):
            raise ValueError(f"layer_weights must be a dict {{student index: weight}}, got {self.layer_weights!r}")
        unknown = set(self.layer_weights) - set(self.resolved_layer_map())
        if unknown:
            raise ValueError(f"layer_weights has student indices {sorted(unknown)} that are not in the layer map "
                             f"{self.resolved_layer_map()}")
        for key, weight in self.layer_weights.items():
            _checks.in_range(f"layer_weights[{key}]", weight, 0.0, float("inf"), hi_open=True)

    def resolved_layer_map(self) -> dict[int, int]:
        """The layer map in use: ``layer_map``, or the evenly spaced default."""
        if self.layer_map is not None:
            return dict(self.layer_map)
        s, t = self.num_student_layers, self.num_teacher_layers
        return {i: int(math.floor(i * t / s + 0.5)) for i in range(1, s + 1)}


@dataclass
class SAGELossOutput:
    #: Scalar training loss: mean over the batch of ``per_example`` (differentiable).
    loss: torch.Tensor
    #: ``[N]`` float32, detached: ``kd_per_example + beta * align_per_example`` (``[B]``, one per
    #: sequence, for ``[B, T, V]`` logits).
    per_example: torch.Tensor
    #: ``[N]`` float32, detached: the KL + CE part.
    kd_per_example: torch.Tensor
    #: ``[N]`` float32, detached: the alignment part before ``beta``; ``None`` when ``beta == 0``.
    align_per_example: torch.Tensor | None


def _field(outputs, name: str, which: str):
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if value is None:
        hint = " (run the model with output_hidden_states=True)" if name == "hidden_states" else ""
        raise ValueError(f"{which} has no {name!r}{hint}")
    return value


class SAGELoss(nn.Module):
    """``l_i`` over student and teacher outputs; owns the student-to-teacher hidden projections."""

    def __init__(self, config: SAGELossConfig):
        super().__init__()
        if not isinstance(config, SAGELossConfig):
            raise ValueError(f"config must be a SAGELossConfig, got {type(config).__name__}")
        self.config = config
        self.layer_map = config.resolved_layer_map() if config.beta > 0 else {}
        weights = config.layer_weights or {}
        self.layer_weights = {s: float(weights.get(s, 1.0)) for s in self.layer_map}
        self.projections = nn.ModuleDict()
        if config.beta > 0 and config.student_hidden_size != config.teacher_hidden_size:
            for s in self.layer_map:
                self.projections[str(s)] = nn.Linear(config.student_hidden_size, config.teacher_hidden_size)

    @property
    def teacher_layers_needed(self) -> tuple[int, ...]:
        """Teacher hidden-state indices the loss reads (the ones to cache); empty when ``beta == 0``."""
        return tuple(sorted(set(self.layer_map.values())))

    def forward(self, student_outputs, teacher_outputs, labels=None, attention_mask=None) -> SAGELossOutput:
        cfg = self.config
        student_logits = _field(student_outputs, "logits", "student_outputs")
        # a cached teacher may live on another device; its dtype stays its own: kd_loss reads each input
        # in its dtype and computes in float32, so float32 teacher logits beyond float16's range (1e5,
        # say) are not turned into infinities for a float16 student
        teacher_logits = _field(teacher_outputs, "logits", "teacher_outputs").detach()
        teacher_logits = teacher_logits.to(device=student_logits.device)
        if student_logits.dim() == 3:
            kd, kd_per_example = self._token_level(student_logits, teacher_logits, labels, attention_mask)
        else:
            # rows labelled ignore_index here have no gold label (synthetic rows) but keep the teacher's
            # soft labels and their place in the mean: kd_loss calls such rows soft-label rows, and
            # leaves none out
            kd, kd_per_example = kd_loss(student_logits, teacher_logits, labels, temperature=cfg.temperature,
                                         alpha=cfg.alpha, ignore_index=None, soft_label_index=cfg.ignore_index,
                                         return_per_example=True)
        if cfg.beta == 0:
            return SAGELossOutput(kd, kd_per_example, kd_per_example, None)

        student_states, teacher_states = self._aligned_states(student_outputs, teacher_outputs)
        align, align_per_example = align_loss(
            student_states, teacher_states, attention_mask, mse_weight=cfg.mse_weight,
            cosine_weight=cfg.cosine_weight, layer_weights=[self.layer_weights[s] for s in self.layer_map],
            return_per_example=True)
        if align_per_example.shape != kd_per_example.shape:
            raise ValueError(f"the hidden states hold {align_per_example.shape[0]} examples but the logits hold "
                             f"{kd_per_example.shape[0]}")
        loss = kd + cfg.beta * align.to(kd.dtype)
        return SAGELossOutput(loss, kd_per_example + cfg.beta * align_per_example, kd_per_example, align_per_example)

    def _token_level(self, student_logits, teacher_logits, labels, attention_mask):
        """``(loss, per-sequence losses)`` of ``[B, T, V]`` logits: kd_loss per token, then each
        sequence's mean over its counted tokens, and the mean over sequences."""
        cfg = self.config
        batch, length = student_logits.shape[:2]
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher_outputs.logits must have the student's shape {tuple(student_logits.shape)}, "
                             f"got {tuple(teacher_logits.shape)}")
        for name, value in (("labels", labels), ("attention_mask", attention_mask)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
            if value.shape != (batch, length):
                raise ValueError(f"{name} must have shape ({batch}, {length}), one entry per token of the logits "
                                 f"{tuple(student_logits.shape)}, got {tuple(value.shape)}")
        if cfg.shift_labels:
            if length < 2:
                raise ValueError(f"causal-LM logits need at least 2 positions to predict a next token, got shape "
                                 f"{tuple(student_logits.shape)} (set shift_labels=False for per-position labels)")
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
            labels = None if labels is None else labels[:, 1:]
            attention_mask = None if attention_mask is None else attention_mask[:, 1:]
        counted = (torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
                   if attention_mask is None else attention_mask.to(student_logits.device) != 0)
        # tokens outside the mask get a label of their own, kd_loss's ignore_index: they count in no
        # term; cfg.ignore_index (no gold token) keeps the KL term
        masked = min(cfg.ignore_index, 0) - 1
        if labels is None:
            labels = torch.full(counted.shape, cfg.ignore_index, dtype=torch.long, device=counted.device)
        token_labels = torch.where(counted, labels.to(counted.device), masked)
        token_loss, token_per_example = kd_loss(
            student_logits, teacher_logits, token_labels, temperature=cfg.temperature, alpha=cfg.alpha,
            ignore_index=masked, soft_label_index=cfg.ignore_index, reduction="none", return_per_example=True)
        tokens = counted.sum(dim=1)
        weight = counted.to(token_loss.dtype) / tokens.clamp_min(1).to(token_loss.dtype)[:, None]
        loss = (token_loss * weight).sum() / batch
        per_example = (token_per_example * weight.float()).sum(dim=1)
        return loss, per_example

    def _aligned_states(self, student_outputs, teacher_outputs):
        student_hidden = _field(student_outputs, "hidden_states", "student_outputs")
        teacher_hidden = _field(teacher_outputs, "hidden_states", "teacher_outputs")
        if not isinstance(student_hidden, Sequence):
            raise ValueError(f"student_outputs.hidden_states must be the tuple of hidden states, "
                             f"got {type(student_hidden).__name__}")
        student_states, teacher_states = [], []
        for s_index, t_index in self.layer_map.items():
            if s_index >= len(student_hidden):
                raise ValueError(f"layer_map reads student hidden state {s_index}, but student_outputs.hidden_states "
                                 f"has {len(student_hidden)} entries")
            if isinstance(teacher_hidden, Mapping):
                if t_index not in teacher_hidden:
                    raise ValueError(f"teacher_outputs.hidden_states has no entry for teacher index {t_index} "
                                     f"(cached indices: {sorted(teacher_hidden)}); cache teacher_layers_needed")
            elif isinstance(teacher_hidden, Sequence):
                if t_index >= len(teacher_hidden):
                    raise ValueError(f"layer_map reads teacher hidden state {t_index}, but "
                                     f"teacher_outputs.hidden_states has {len(teacher_hidden)} entries")
            else:
                raise ValueError("teacher_outputs.hidden_states must be the tuple of hidden states or a mapping "
                                 f"{{teacher index: tensor}}, got {type(teacher_hidden).__name__}")
            state = student_hidden[s_index]
            if str(s_index) in self.projections:
                state = self.projections[str(s_index)](state)
            teacher_state = teacher_hidden[t_index].detach()
            student_states.append(state)
            teacher_states.append(teacher_state.to(device=state.device))
        # align_loss takes one dtype: the student's, unless that is float16 and the teacher's is wider
        # (float32, bfloat16, float64), whose values float16 may not hold: then both in float32
        dtype = functools.reduce(torch.promote_types, (s.dtype for s in student_states))
        if dtype == torch.float16 and any(t.dtype != torch.float16 for t in teacher_states):
            dtype = torch.float32
        return [s.to(dtype) for s in student_states], [t.to(dtype) for t in teacher_states]
