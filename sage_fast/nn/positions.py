"""Position ids for a model fed vectors (``inputs_embeds``) instead of token ids.

BERT and DistilBERT number positions 0..L-1 either way. RoBERTa-style models (RoBERTa, MPNet, ...)
number them from the token ids, ``padding_idx + cumsum(ids != pad)`` with pads at ``padding_idx``,
but from ``inputs_embeds`` alone they can only count 0..L-1 past the padding index, so a padded row
would get other positions than its token ids give. These give such a model the ids its token ids
would: the driver's vector interface and the Trainer integration both use them.
"""
from __future__ import annotations

import torch

__all__ = ["padding_offset", "position_ids"]


def padding_offset(model) -> int | None:
    """``padding_idx`` for a model that numbers positions from the padding (RoBERTa style), else None."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "create_position_ids_from_inputs_embeds"):
        return int(embeddings.padding_idx)
    return None


def position_ids(attention_mask: torch.Tensor, offset: int) -> torch.Tensor:
    """``offset + cumsum(mask) * mask``: the ids ``input_ids`` would give, pads at ``offset``."""
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) * mask + offset
