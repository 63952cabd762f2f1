"""What the driver hands the synthesis generators (``sage_fast.synthesis.GeneratorInputs``): the
training rows' tokens, the teacher's embedding table and which of its tokens a substitution may
use, the student (the vector interface, whose frozen teacher a round's copy of it shares) and its
logits on vectors for boundary steps, and the tokenizer's text for the rows a round shows."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..synthesis import GeneratorInputs
from ..synthesis.generators import replaceable_tokens
from ..synthesis.generators.base import eval_mode, token_decoder
from .models import VectorInterface


def generator_inputs(interface: VectorInterface, tokenizer, train: dict, autocast: Callable[[], object], *,
                     batch_size: int, temperature: float) -> GeneratorInputs:
    """``train``: the encoded training split (``input_ids``, ``attention_mask``, indexed by example
    id); ``autocast()``: a new autocast context for a student pass (the driver's, on CUDA)."""
    table = interface.teacher_embeddings.weight.detach()
    device = table.device

    def tokens_of(ids: torch.Tensor):
        rows = ids.cpu()  # example ids are positions in the encoded training split
        return train["input_ids"][rows].to(device), train["attention_mask"][rows].to(device)

    def student_forward(module: VectorInterface, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # autocast is the calling thread's own: a round's worker enters it for itself
        with eval_mode(module), autocast():
            return module.student_forward(vectors, mask).logits.float()

    return GeneratorInputs(tokens_of=tokens_of, embedding_table=table,
                           replaceable=replaceable_tokens(tokenizer, table.shape[0]).to(device),
                           student=interface, student_forward=student_forward, decode=token_decoder(tokenizer),
                           batch_size=batch_size, temperature=temperature)
