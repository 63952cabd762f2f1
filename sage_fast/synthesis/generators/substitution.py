"""The substitution generator: a variant of each anchor in which a share of its word pieces is
replaced by one of their nearest neighbours in the teacher's input-embedding table (cosine
similarity, top-k), optionally with a span of its partner's word pieces in place of as many of its
own. The rows are real token ids, so the teacher's label on them is a label on text, and they can
be decoded and read.

Per anchor, with ``n`` its replaceable word pieces (unmasked, not special):

1. span (``substitute_span`` > 0): ``s = round(span * n_partner)`` (at most ``n``) consecutive
   replaceable pieces of the partner, from a uniform start, overwrite as many consecutive
   replaceable pieces of the anchor, from a uniform start; the row keeps the anchor's length and mask;
2. substitution: ``round(share * (n - s))`` of the remaining pieces, drawn uniformly without
   replacement, each become one of their ``top_k`` nearest replaceable tokens (never themselves),
   drawn uniformly.

Neighbour lists are computed for the tokens a round needs only, in blocks, and kept: the table is
frozen, so they never change.
"""
from __future__ import annotations

import torch

from .base import GeneratedRows, Generator, GeneratorInputs, unique_rows

# Query tokens per block of the cosine search (a block is [BLOCK, V] similarities).
BLOCK = 1024


def replaceable_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` bool: the tokens a substitution may replace or put in. Special tokens are out
    (``[CLS]``, ``[SEP]``, ``<s>``, padding), and so are the placeholders some vocabularies keep
    (BERT's ``[unused17]``, any bracketed name), whose vectors were never trained; so are ids the
    tokenizer does not know (rows a table may keep for padding)."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token, index in tokenizer.get_vocab().items():
        if index >= vocab_size or index in special:
            continue
        bracketed = len(token) > 2 and (token[0], token[-1]) in (("[", "]"), ("<", ">"))
        allowed[index] = not bracketed
    return allowed


def nearest_tokens(table: torch.Tensor, queries: torch.Tensor, k: int, allowed: torch.Tensor | None = None,
                   block: int = BLOCK) -> torch.Tensor:
    """``[q, k]`` the ``k`` rows of ``table`` [V, d] with the highest cosine similarity to each of
    the rows ``queries`` [q] (token ids), among ``allowed`` [V] and never the query itself; in blocks
    of ``block`` queries, so memory stays at ``block * V`` similarities."""
    unit = torch.nn.functional.normalize(table.detach().float(), dim=1)
    out = []
    for start in range(0, queries.shape[0], block):
        q = queries[start:start + block]
        sims = unit[q] @ unit.T                                          # [b, V]
        if allowed is not None:
            sims.masked_fill_(~allowed.to(sims.device).unsqueeze(0), float("-inf"))
        sims.scatter_(1, q.unsqueeze(1), float("-inf"))                  # never the token itself
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out) if out else queries.new_zeros((0, k))


class Substitution(Generator):
    name = "substitute"
    needs = ("tokens_of", "embedding_table")

    def __init__(self, config):
        super().__init__(config)
        self.uses_partners = config.substitute_span > 0
        self._neighbours: torch.Tensor | None = None  # [V, top_k] nearest tokens, -1 where not computed yet

    def why_needed(self) -> str:
        return ("its rows are real token ids, so it reads the training rows' tokens and the teacher's input-embedding "
                "table (the driver and SAGEDistillTrainer hand both over)")

    def check(self, inputs: GeneratorInputs) -> None:
        super().check(inputs)
        table = inputs.embedding_table
        if not isinstance(table, torch.Tensor) or table.dim() != 2:
            raise ValueError(f"embedding_table must be a [V, d] tensor, got {tuple(getattr(table, 'shape', ()))}")
        allowed = inputs.replaceable
        if allowed is not None and (not isinstance(allowed, torch.Tensor) or tuple(allowed.shape) != (table.shape[0],)
                                    or allowed.dtype != torch.bool):
            raise ValueError(f"replaceable must be a [{table.shape[0]}] bool tensor (one entry per row of the "
                             f"embedding table), got {tuple(getattr(allowed, 'shape', ()))}")
        count = table.shape[0] if allowed is None else int(allowed.sum())
        if count <= self.config.substitute_top_k:
            raise ValueError(f"substitute_top_k ({self.config.substitute_top_k}) must be below the number of "
                             f"replaceable tokens ({count}): each token needs that many neighbours besides itself")

    def neighbours(self, tokens: torch.Tensor, inputs: GeneratorInputs) -> torch.Tensor:
        """``[n, top_k]`` the nearest replaceable tokens of each of ``tokens`` [n]."""
        table, k = inputs.embedding_table, self.config.substitute_top_k
        if self._neighbours is None or self._neighbours.device != table.device:
            self._neighbours = torch.full((table.shape[0], k), -1, dtype=torch.int64, device=table.device)
        tokens = tokens.to(table.device)
        wanted = torch.unique(tokens)
        todo = wanted[self._neighbours[wanted, 0] < 0]
        if todo.numel():
            self._neighbours[todo] = nearest_tokens(table, todo, k, inputs.replaceable)
        return self._neighbours[tokens]

    def generate(self, plan, vectors_of, label, inputs: GeneratorInputs) -> GeneratedRows:
        span = self.config.substitute_span
        rows, anchors, partners = unique_rows(plan.anchor_ids, plan.partner_ids if span > 0 else None)
        tokens, mask = inputs.tokens_of(rows)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != rows.shape[0] \
                or tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"tokens_of must return input_ids [n, L] and a mask [n, L] with n = {rows.shape[0]}, got "
                             f"{tuple(getattr(tokens, 'shape', ()))} and {tuple(getattr(mask, 'shape', ()))}")
        table = inputs.embedding_table
        tokens = tokens.to(table.device, torch.int64)
        mask = mask.to(table.device)
        allowed = (torch.ones(table.shape[0], dtype=torch.bool, device=table.device) if inputs.replaceable is None
                   else inputs.replaceable.to(table.device))
        random = self.random(plan, table.device)
        source = tokens[anchors.to(table.device)]
        row_mask = mask[anchors.to(table.device)]
        eligible = row_mask.bool() & allowed[source]
        variant, in_span = source.clone(), torch.zeros_like(eligible)
        if span > 0:
            partner_ids = tokens[partners.to(table.device)]
            variant, in_span = take_span(variant, eligible, partner_ids,
                                         mask[partners.to(table.device)].bool() & allowed[partner_ids], span, random)
        chosen = pick_share(eligible & ~in_span, self.config.substitute_share, random)
        draw = torch.randint(0, self.config.substitute_top_k, source.shape, generator=random, device=table.device)
        if bool(chosen.any()):
            neighbours = self.neighbours(variant[chosen], inputs)
            variant[chosen] = neighbours.gather(1, draw[chosen].unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            vectors = torch.nn.functional.embedding(variant, table.detach())
        return GeneratedRows(vectors, row_mask, tokens=variant, source_tokens=source)


def pick_share(eligible: torch.Tensor, share: float, random: torch.Generator) -> torch.Tensor:
    """``[m, L]`` bool: ``round(share * n_i)`` of each row's ``n_i`` eligible positions, drawn
    uniformly without replacement."""
    count = torch.floor(share * eligible.sum(1).double() + 0.5).long()       # [m]
    score = torch.rand(eligible.shape, generator=random, device=eligible.device)
    score = torch.where(eligible, score, torch.full_like(score, 2.0))         # ineligible rank last
    rank = score.argsort(dim=1).argsort(dim=1)
    return eligible & (rank < count.unsqueeze(1))


def take_span(tokens: torch.Tensor, eligible: torch.Tensor, partner: torch.Tensor, partner_eligible: torch.Tensor,
              share: float, random: torch.Generator):
    """``tokens`` with a span of ``partner``'s eligible pieces in place of as many consecutive
    eligible pieces of its own (module docstring, step 1), and the ``[m, L]`` positions it wrote."""
    m, length = tokens.shape
    n_own, n_partner = eligible.sum(1), partner_eligible.sum(1)
    size = torch.minimum(torch.floor(share * n_partner.double() + 0.5).long(), n_own)     # [m]
    u = torch.rand((2, m), generator=random, device=tokens.device, dtype=torch.float64)
    own_start = torch.floor(u[0] * (n_own - size + 1)).long()
    partner_start = torch.floor(u[1] * (n_partner - size + 1)).long()
    own_rank = eligible.long().cumsum(1) - 1                                  # rank among eligible positions
    # The partner's eligible pieces packed to the front of each row, in order.
    position = torch.arange(length, device=tokens.device).expand(m, length)
    packed = partner.gather(1, torch.where(partner_eligible, position, position + length).argsort(dim=1))
    offset = own_rank - own_start.unsqueeze(1)
    in_span = eligible & (offset >= 0) & (offset < size.unsqueeze(1))
    source = (offset + partner_start.unsqueeze(1)).clamp(0, length - 1)
    return torch.where(in_span, packed.gather(1, source), tokens), in_span
