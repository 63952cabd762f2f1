"""What ``SAGEDistillTrainer`` hands the synthesis generators (``sage_fast.synthesis.GeneratorInputs``):
the training rows' tokens, fetched from the dataset by position; the teacher's embedding table and
which of its tokens a substitution may use; the student and its logits on vectors for boundary
steps; and the tokenizer's text for the rows a round shows."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..synthesis import GeneratorInputs
from ..synthesis.generators import replaceable_tokens
from ..synthesis.generators.base import eval_mode, token_decoder
from .processes import vector_inputs

# The teacher's config names for the special tokens a substitution leaves alone without a tokenizer.
_SPECIAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")


def dataset_tokens(dataset, ids: torch.Tensor, id_column: str, pad_token_id: int, device):
    """Token ids and masks of the rows of ``dataset`` at positions ``ids``, padded to the longest;
    a row whose ``id_column`` is not its position is refused."""
    rows = []
    for i in ids.tolist():
        row = dataset[i]
        if id_column in row and int(row[id_column]) != i:
            raise ValueError(f"train_dataset[{i}] has {id_column} {int(row[id_column])}: with synthesis, "
                             f"{id_column} must be each row's position in train_dataset")
        rows.append(row)
    tokens = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
    masks = [torch.as_tensor(row["attention_mask"], dtype=torch.long) if "attention_mask" in row
             else torch.ones_like(t) for t in tokens]
    width = max(t.shape[0] for t in tokens)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (t, m) in enumerate(zip(tokens, masks)):
        input_ids[j, : t.shape[0]], mask[j, : m.shape[0]] = t, m
    return input_ids.to(device), mask.to(device)


def student_logits_on_vectors(model: torch.nn.Module, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``model``'s float32 logits on teacher-space ``vectors`` (the generators' ``student_forward``),
    with gradients to them (boundary steps), in eval mode: no dropout, so no random number is drawn
    from training's streams. ``model`` is the Trainer's student or a round's frozen copy of it."""
    with eval_mode(model):
        return model(**vector_inputs(model, vectors, mask)).logits.float()


def trainer_generator_inputs(teacher: torch.nn.Module, tokenizer, *, tokens_of: Callable, student: torch.nn.Module,
                             student_forward: Callable, batch_size: int, temperature: float) -> GeneratorInputs:
    """The generators' inputs for a Trainer run. With a tokenizer, a substitution uses its
    non-special tokens and a round's rows are decoded; without one, every token but the special ones
    the teacher's config names, and nothing is decoded."""
    table = teacher.get_input_embeddings().weight.detach()
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        replaceable, decode = replaceable_tokens(tokenizer, table.shape[0]), token_decoder(tokenizer)
    else:
        replaceable, decode = torch.ones(table.shape[0], dtype=torch.bool), None
        for name in _SPECIAL_TOKEN_IDS:
            index = getattr(teacher.config, name, None)
            if isinstance(index, int) and 0 <= index < table.shape[0]:
                replaceable[index] = False
    return GeneratorInputs(tokens_of=tokens_of, embedding_table=table, replaceable=replaceable.to(table.device),
                           decode=decode, student=student, student_forward=student_forward, batch_size=batch_size,
                           temperature=temperature)
