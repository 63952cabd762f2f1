"""A Trainer's real rows and a step's synthetic rows as one batch, for the loss and the student.

Synthetic rows are vectors in the teacher's word-embedding space. A student that reads the
teacher's table (the trainer copies it in and freezes it) reads real and synthetic rows alike as
vectors, through ``inputs_embeds``. Rows of a generator that makes real text (``substitute``) also
keep their token ids, so they need no shared table: the student keeps its own, at any width, and
reads real and synthetic rows alike as token ids. It must read the teacher's vocabulary.
"""
from __future__ import annotations

import dataclasses

import torch

from ..synthesis import Batch, SyntheticRows, mix
from .processes import vector_inputs

#: Keys a batch may hold when synthetic rows are mixed in.
MIXABLE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: The generators whose rows are real token ids.
TOKEN_GENERATORS = ("substitute",)


def reads_tokens(generator: str, student: torch.nn.Module, teacher: torch.nn.Module) -> bool:
    """Whether ``student`` reads synthetic rows as token ids (True) or as the teacher's vectors
    (False, after the trainer shares the teacher's table with it). Token ids need a generator that
    makes them and a student of the teacher's vocabulary; vectors need the teacher's width."""
    student_table = student.get_input_embeddings().weight
    teacher_table = teacher.get_input_embeddings().weight
    if generator in TOKEN_GENERATORS:
        if student_table.shape[0] != teacher_table.shape[0]:
            raise ValueError(
                f"generator {generator!r} makes token ids of the teacher's vocabulary ({teacher_table.shape[0]} "
                f"tokens), and the student's input table has {student_table.shape[0]}: use a student with the "
                "teacher's tokenizer")
        return True
    if student_table.shape != teacher_table.shape:
        raise ValueError(
            "synthesis needs a student that reads the teacher's tokens at the teacher's embedding width: the "
            f"student's input table is {tuple(student_table.shape)}, the teacher's {tuple(teacher_table.shape)} "
            f"(generator {generator!r} makes vectors; generator 'substitute' makes token ids, which a student of "
            "any width reads, and the sage-fast distill driver learns an adapter)")
    return False


def mixed_batch(model_inputs: dict, teacher: torch.nn.Module, teacher_outputs, labels, synthetic: SyntheticRows,
                teacher_layers, ignore_index: int, *, tokens: bool) -> Batch:
    """Real rows and synthetic rows in one batch, padded to one width: as the teacher's vectors,
    or with ``tokens`` as token ids (``Batch.vectors`` then holds ids [B, L])."""
    unknown = sorted(set(model_inputs) - set(MIXABLE_INPUTS))
    if unknown or "input_ids" not in model_inputs:
        raise ValueError(f"synthetic rows join a batch through input_ids, attention_mask and token_type_ids; this "
                         f"batch has {sorted(model_inputs)}")
    input_ids = model_inputs["input_ids"]
    real_mask = model_inputs.get("attention_mask")
    if real_mask is None:
        real_mask = torch.ones_like(input_ids)
    if tokens:
        if synthetic.tokens is None:
            raise ValueError("the synthetic rows have no token ids: the student reads token ids, so the pool must "
                             "hold rows of a generator that makes them")
        real_rows, synthetic = input_ids, dataclasses.replace(synthetic, vectors=synthetic.tokens)
    else:
        with torch.no_grad():
            real_rows = teacher.get_input_embeddings()(input_ids)
    hidden = {k: teacher_outputs["hidden_states"][k] for k in teacher_layers}
    real = Batch(real_rows, real_mask, teacher_outputs["logits"], hidden, labels, model_inputs.get("token_type_ids"))
    return mix(real, synthetic, ignore_index)


def student_inputs(model: torch.nn.Module, batch: Batch, *, tokens: bool) -> dict:
    """What ``model`` (the student, unwrapped) is called with on a mixed batch: token ids with the
    padding at its pad id, or the teacher's vectors with the position ids token ids would give."""
    if not tokens:
        return vector_inputs(model, batch.vectors, batch.mask, batch.token_types)
    pad = getattr(model.config, "pad_token_id", None) or 0
    inputs = {"input_ids": torch.where(batch.mask.bool(), batch.vectors, torch.full_like(batch.vectors, pad)),
              "attention_mask": batch.mask}
    if batch.token_types is not None:
        inputs["token_type_ids"] = batch.token_types
    return inputs
