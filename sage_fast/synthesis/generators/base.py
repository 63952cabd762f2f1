"""What every generator shares: the inputs a training loop hands it, the rows it returns, and the
interface a round's build step calls.

A generator turns a round's plan (anchor and partner example ids, the mixing weights, the round's
seed) into synthetic rows: teacher-space vectors ``[M, L, d_t]`` with a mask, and the token ids they
are made of when they are real tokens. The synthesizer then has the teacher label them and adds
them to the pool, whatever made them. Every random number a generator draws comes from a generator
seeded with the plan's ``noise_seed`` (``seed * 1000 + round``), so a round gives the same rows on
any thread and after a resume.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

GENERATORS = ("interpolate", "substitute", "boundary")

TokensOf = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
StudentLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GeneratorInputs:
    """What a training loop knows and the synthesizer does not, for the generators that need it.

    ``tokens_of(ids) -> (input_ids [n, L] int64, mask [n, L])``: the token ids of real training rows
    (by example id), for ``substitute``. ``embedding_table`` ``[V, d_t]``: the teacher's frozen
    input-embedding table, whose rows are the vectors of the tokens (``substitute`` finds each word
    piece's neighbours in it and embeds its rows with it). ``replaceable`` ``[V]`` bool: the tokens
    a substitution may replace and put in (not the special tokens; default every token).
    ``student_logits(vectors, mask) -> [n, C]``: the student through the vector interface, with
    gradients to ``vectors`` (``boundary``). ``decode(ids [L]) -> str``: text of a row's tokens, for
    the few examples a round shows. ``batch_size``: rows per student pass. ``temperature``: of the
    student-teacher disagreement the boundary steps increase.
    """
    tokens_of: TokensOf | None = None
    embedding_table: torch.Tensor | None = None
    replaceable: torch.Tensor | None = None
    student_logits: StudentLogits | None = None
    decode: Callable[[torch.Tensor], str] | None = None
    batch_size: int = 128
    temperature: float = 1.0


@dataclass
class GeneratedRows:
    """A round's synthetic rows before the teacher labels them. ``tokens``: ``[M, L]`` token ids
    when the rows are real tokens (else None), with ``source_tokens``, the anchors' own, so a round
    can show what changed."""
    vectors: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor | None = None
    source_tokens: torch.Tensor | None = None


class Generator:
    """The interface of a generator. ``needs``: the fields of :class:`GeneratorInputs` it reads
    (checked when the synthesizer is built, before any work). ``reads_student``: it reads the
    student being trained, so it must run on the training thread, never beside training (a round
    made beside training plans there and generates on the training thread when it joins the pool).
    ``uses_partners``: whether the plan's partners change its rows."""
    name = ""
    needs: tuple[str, ...] = ()
    reads_student = False
    uses_partners = True

    def __init__(self, config):
        self.config = config

    def check(self, inputs: GeneratorInputs) -> None:
        """A ``ValueError`` naming what this generator lacks in ``inputs``."""
        missing = [name for name in self.needs if getattr(inputs, name) is None]
        if missing:
            raise ValueError(f"generator {self.name!r} needs {', '.join(missing)} in the synthesizer's inputs "
                             f"(GeneratorInputs): {self.why_needed()}")

    def why_needed(self) -> str:
        return ""

    def generate(self, plan, vectors_of, label, inputs: GeneratorInputs) -> GeneratedRows:
        raise NotImplementedError

    @staticmethod
    def random(plan, device: torch.device) -> torch.Generator:
        """The round's own random stream."""
        return torch.Generator(device=device).manual_seed(int(plan.noise_seed))


def check_vectors(vectors, mask, rows: int, who: str = "vectors_of") -> None:
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 3 or vectors.shape[0] != rows:
        raise ValueError(f"{who} must return vectors [n, L, d] with n = {rows} (one per id asked for), got "
                         f"{tuple(getattr(vectors, 'shape', ())) or type(vectors).__name__}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(vectors.shape[:2]):
        raise ValueError(f"{who} must return a mask [n, L] = {list(vectors.shape[:2])}, got "
                         f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")


def unique_rows(anchor_ids: torch.Tensor, partner_ids: torch.Tensor | None = None):
    """The distinct example ids of a plan and each pair member's position among them, so each real
    row is fetched once however many pairs it is in: ``(rows, anchor_position, partner_position)``."""
    m = anchor_ids.shape[0]
    ids = anchor_ids if partner_ids is None else torch.cat([anchor_ids, partner_ids])
    rows, position = torch.unique(ids, return_inverse=True)
    return rows, position[:m], (None if partner_ids is None else position[m:])


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block, then back as it was: a generator's pass through the
    student (boundary steps) uses no dropout, so it draws nothing from training's random streams."""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def token_decoder(tokenizer) -> Callable[[torch.Tensor], str]:
    """A row's token ids as the tokenizer's text, special tokens left out (the rows a round shows)."""

    def decode(ids: torch.Tensor) -> str:
        return tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    return decode
