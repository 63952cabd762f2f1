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
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

GENERATORS = ("interpolate", "substitute", "boundary")

TokensOf = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
StudentForward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GeneratorInputs:
    """What a training loop knows and the synthesizer does not, for the generators that need it.

    ``tokens_of(ids) -> (input_ids [n, L] int64, mask [n, L])``: the token ids of real training rows
    (by example id), for ``substitute``. ``embedding_table`` ``[V, d_t]``: the teacher's frozen
    input-embedding table, whose rows are the vectors of the tokens (``substitute`` finds each word
    piece's neighbours in it and embeds its rows with it). ``replaceable`` ``[V]`` bool: the tokens
    a substitution may replace and put in (not the special tokens; default every token).
    ``student`` and ``student_forward(student, vectors, mask) -> [n, C]``: the module being trained
    and its logits through the vector interface, with gradients to ``vectors`` (``boundary``). The
    forward takes the module as an argument so that a round made beside training can run it on a
    frozen copy (:class:`FrozenStudent`) taken with the round's snapshot, while training goes on
    changing ``student``. ``decode(ids [L]) -> str``: text of a row's tokens, for the few examples a
    round shows. ``batch_size``: rows per student pass. ``temperature``: of the student-teacher
    disagreement the boundary steps increase.
    """
    tokens_of: TokensOf | None = None
    embedding_table: torch.Tensor | None = None
    replaceable: torch.Tensor | None = None
    student: torch.nn.Module | None = None
    student_forward: StudentForward | None = None
    decode: Callable[[torch.Tensor], str] | None = None
    batch_size: int = 128
    temperature: float = 1.0

    def student_logits(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``student_forward`` on ``student``."""
        return self.student_forward(self.student, vectors, mask)


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
    student being trained, which changes as training goes on; a round made beside training hands it
    a frozen copy of the student taken with the round's snapshot (``BackgroundRounds``).
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


class FrozenStudent:
    """A copy of the student that training does not change, for a round made beside training.

    It shares the parameters that do not train (``requires_grad`` off: a frozen embedding table, a
    teacher held inside the module) and owns copies of the others and of the buffers, with no
    gradients, in eval mode. ``load(student)`` copies the student's trained tensors into it (at a
    round's snapshot); ``state()`` is what a checkpoint keeps of it, and ``load(state)`` restores it.
    It costs one more copy of the student's trainable parameters.
    """

    def __init__(self, student: torch.nn.Module):
        shared = {id(p): p for p in student.parameters() if not p.requires_grad}
        gradients = {p: p.grad for p in student.parameters() if p.grad is not None}
        for p in gradients:  # the copy carries no gradients: set aside while copying
            p.grad = None
        try:  # deepcopy adds every object it copies to its memo: hand it a copy of ``shared``
            self.module = copy.deepcopy(student, dict(shared)).eval()
        finally:
            for p, gradient in gradients.items():
                p.grad = gradient
        for p in self.module.parameters():
            if id(p) not in shared:
                p.requires_grad_(False)
        # what a checkpoint of the student holds, less what is shared: the trained parameters and
        # the persistent buffers (non-persistent ones, such as position ids, are constants)
        self.names = {name for name, t in student.state_dict(keep_vars=True).items() if id(t) not in shared}

    def state(self) -> dict[str, torch.Tensor]:
        """The copy's trained tensors, by name (shared storage: save them, do not change them)."""
        tensors = self.module.state_dict()
        return {name: tensors[name] for name in sorted(self.names)}

    @torch.no_grad()
    def load(self, source) -> None:
        """Copy the trained tensors of ``source`` (the student, or a ``state()``) into the copy."""
        values = source.state_dict() if isinstance(source, torch.nn.Module) else source
        missing = self.names - set(values)
        if missing:
            raise ValueError(f"the student's state lacks {len(missing)} of the tensors its frozen copy takes, "
                             f"e.g. {sorted(missing)[0]!r}: it is not this student's")
        targets = self.module.state_dict()  # views of the copy's own storage
        for name in self.names:
            targets[name].copy_(values[name])


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
