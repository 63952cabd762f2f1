"""The bounded pool of synthetic examples.

Each synthetic example exists as input vectors (``[L, d_t]``, the teacher's embedding space) with
a mask, plus what the teacher said about it (logits, and the mapped hidden layers when the loss
aligns hidden states) and its gold label where it has one (-1 where it has none). Rows of a
generator that makes real text also keep their token ids (``[L]``), so a student that does not
read the teacher's vectors can read them: a pool holds token ids for every row or for none. The pool holds at
most ``capacity`` of them. When full, ``fifo`` overwrites the oldest; ``reservoir`` keeps a uniform
sample of everything ever offered (Vitter's algorithm R), so early rounds are not forgotten entirely.

Rows are padded sequences. New rows narrower than the pool (fewer tokens ``L``) are padded with
zeros and mask 0; wider ones widen the pool the same way. Padding is masked out everywhere it is
read (attention, the alignment term), so a training loop whose batches vary in width can keep
one pool.

The pool also keeps each row's used width (the last unmasked token + 1) on the host, taken once
when rows are added: a training step trims the padding its batch shares from ``width_of(index)``
without reading the device's masks back, which on CUDA would make every step wait.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import _checks

POLICIES = ("fifo", "reservoir")


def used_lengths(masks: torch.Tensor) -> torch.Tensor:
    """Tokens each row of ``masks`` [M, L] uses: the position of its last non-zero entry + 1 (0 for
    a row with none), so trimming to the largest keeps every unmasked token, padded left or right."""
    positions = torch.arange(1, masks.shape[1] + 1, device=masks.device)
    return torch.where(masks != 0, positions, 0).amax(dim=1) if masks.shape[1] else masks.new_zeros(masks.shape[0])


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` [M, L, ...] with zeros appended along the token axis up to ``length`` (``t`` itself when
    it is that long already)."""
    if t.shape[1] == length:
        return t
    out = t.new_zeros((t.shape[0], length, *t.shape[2:]))
    out[:, : t.shape[1]] = t
    return out


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """A list of positions as an index on ``device``; on CUDA by a pinned, asynchronous copy, so the
    host does not wait for the device."""
    index = torch.tensor(values)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


class SyntheticPool:
    def __init__(self, capacity: int, policy: str = "fifo"):
        _checks.integer("capacity", capacity, minimum=1)
        _checks.choice("policy", policy, POLICIES)
        self.capacity = capacity
        self.policy = policy
        self.vectors: torch.Tensor | None = None   # [capacity, L, d]
        self.masks: torch.Tensor | None = None     # [capacity, L]
        self.logits: torch.Tensor | None = None    # [capacity, C]
        self.hidden: dict[int, torch.Tensor] = {}  # teacher layer -> [capacity, L, d_t]
        self.labels: torch.Tensor | None = None    # [capacity] int64 gold label, -1: none
        self.tokens: torch.Tensor | None = None    # [capacity, L] int64 token ids, when rows are real text
        self.lengths = torch.zeros(capacity, dtype=torch.int64)  # used width of each slot, on the host
        self.size = 0
        self.offered = 0  # examples ever offered, for the reservoir and the FIFO cursor

    def __len__(self) -> int:
        return self.size

    def _allocate(self, vectors, masks, logits, hidden, tokens=None) -> None:
        cap = self.capacity
        self.tokens = None if tokens is None else tokens.new_zeros((cap, *tokens.shape[1:]))
        self.vectors = vectors.new_zeros((cap, *vectors.shape[1:]))
        self.masks = masks.new_zeros((cap, *masks.shape[1:]))
        self.logits = logits.new_zeros((cap, *logits.shape[1:]))
        self.hidden = {int(k): v.new_zeros((cap, *v.shape[1:])) for k, v in hidden.items()}
        self.labels = torch.full((cap,), -1, dtype=torch.int64, device=vectors.device)

    def _check(self, vectors, masks, logits, hidden, tokens) -> None:
        for name, value in (("vectors", vectors), ("masks", masks), ("logits", logits)):
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        n = vectors.shape[0]
        if vectors.dim() != 3 or masks.shape != vectors.shape[:2] or logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(
                "expected vectors [M, L, d], masks [M, L], logits [M, C]; got "
                f"{tuple(vectors.shape)}, {tuple(masks.shape)}, {tuple(logits.shape)}")
        for layer, value in hidden.items():
            if value.shape[:2] != vectors.shape[:2]:
                raise ValueError(f"hidden[{layer}] must have shape [M, L, d_t] with M, L = {tuple(vectors.shape[:2])}, "
                                 f"got {tuple(value.shape)}")
        if tokens is not None and (not isinstance(tokens, torch.Tensor) or tokens.shape != masks.shape
                                   or tokens.dtype != torch.int64):
            raise ValueError(f"tokens must be int64 token ids [M, L] = {list(masks.shape)}, got "
                             f"{tuple(getattr(tokens, 'shape', ()))} {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if self.vectors is not None:
            if (tokens is None) != (self.tokens is None):
                raise ValueError("a pool holds token ids for every row or for none: these rows "
                                 f"{'have none' if tokens is None else 'have them'}, the pool's "
                                 f"{'have them' if tokens is None else 'have none'}")
            if vectors.shape[2:] != self.vectors.shape[2:] or logits.shape[1:] != self.logits.shape[1:]:
                raise ValueError(
                    f"new examples have width {vectors.shape[2]} and {logits.shape[1]} logits, the pool holds width "
                    f"{self.vectors.shape[2]} and {self.logits.shape[1]} logits")
            if set(int(k) for k in hidden) != set(self.hidden):
                raise ValueError(f"hidden layers {sorted(hidden)} differ from the pool's {sorted(self.hidden)}")
            for layer, value in hidden.items():
                if value.shape[2:] != self.hidden[int(layer)].shape[2:]:
                    raise ValueError(f"hidden[{layer}] has width {value.shape[2]}, the pool holds "
                                     f"{self.hidden[int(layer)].shape[2]}")

    def _widen(self, length: int) -> None:
        """Pad every stored row with masked zeros up to ``length`` tokens."""
        self.vectors, self.masks = pad_tokens(self.vectors, length), pad_tokens(self.masks, length)
        self.hidden = {k: pad_tokens(v, length) for k, v in self.hidden.items()}
        if self.tokens is not None:
            self.tokens = pad_tokens(self.tokens, length)

    @torch.no_grad()
    def add(self, vectors: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor,
            hidden: Mapping[int, torch.Tensor] | None = None, *, generator: torch.Generator | None = None,
            lengths: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> None:
        """Offer ``M`` new examples. ``generator`` drives the reservoir's choices (CPU generator).
        ``lengths``: the new rows' ``used_lengths(masks)`` on the host, when the caller has them
        (otherwise they are read from ``masks`` here: on CUDA the host waits for the device once).
        ``labels``: [M] int64 gold labels, -1 for a row without one (default: none has one).
        ``tokens``: [M, L] int64 token ids of rows that are real text (see the module docstring)."""
        hidden = dict(hidden or {})
        self._check(vectors, masks, logits, hidden, tokens)
        if labels is not None:
            _checks.tensor("labels", labels, ndim=1)
            if labels.shape[0] != vectors.shape[0] or labels.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"labels must be [M] = [{vectors.shape[0]}] integers (-1: none), got "
                                 f"{tuple(labels.shape)} {labels.dtype}")
        if lengths is not None:
            _checks.tensor("lengths", lengths, ndim=1)
            if lengths.shape[0] != vectors.shape[0] or lengths.device.type != "cpu":
                raise ValueError(f"lengths must be a host tensor with one value per row ({vectors.shape[0]}), got "
                                 f"shape {tuple(lengths.shape)} on {lengths.device}")
        if self.vectors is None:
            self._allocate(vectors, masks, logits, hidden, tokens)
        length = self.vectors.shape[1]
        if vectors.shape[1] > length:
            self._widen(vectors.shape[1])
        elif vectors.shape[1] < length:
            vectors, masks = pad_tokens(vectors, length), pad_tokens(masks, length)
            hidden = {k: pad_tokens(v, length) for k, v in hidden.items()}
            tokens = None if tokens is None else pad_tokens(tokens, length)
        slots, rows = [], []
        for i in range(vectors.shape[0]):
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            elif self.policy == "fifo":
                slot = self.offered % self.capacity
            else:
                j = int(torch.randint(0, self.offered + 1, (1,), generator=generator))
                slot = j if j < self.capacity else -1
            self.offered += 1
            if slot >= 0:
                slots.append(slot)
                rows.append(i)
        if not slots:
            return
        # Once per add (a round), never per step: the new rows' widths are kept on the host.
        if lengths is None:
            lengths = used_lengths(masks).cpu()
        self.lengths[torch.tensor(slots)] = lengths[torch.tensor(rows)]
        slots_t, rows_t = _index(slots, self.vectors.device), _index(rows, vectors.device)
        self.vectors[slots_t] = vectors[rows_t].to(self.vectors)
        self.masks[slots_t] = masks[rows_t].to(self.masks)
        self.logits[slots_t] = logits[rows_t].to(self.logits)
        for layer, value in hidden.items():
            self.hidden[int(layer)][slots_t] = value[rows_t].to(self.hidden[int(layer)])
        self.labels[slots_t] = -1 if labels is None else labels.to(self.labels.device, torch.int64)[
            rows_t.to(self.labels.device)]
        if tokens is not None:
            self.tokens[slots_t] = tokens[rows_t.to(tokens.device)].to(self.tokens.device)

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``min(n, len(self))`` slots drawn without replacement (a CPU index tensor), or None when
        the pool is empty or ``n`` is 0. ``generator``: a CPU generator."""
        _checks.integer("n", n, minimum=0)
        if self.size == 0 or n == 0:
            return None
        return torch.randperm(self.size, generator=generator)[: min(n, self.size)]

    def width_of(self, index: torch.Tensor) -> int:
        """The most tokens any of the slots ``index`` (a CPU index from ``draw``) uses, read on the host."""
        return int(self.lengths[index].max()) if index.numel() else 0

    def take(self, index: torch.Tensor):
        """The rows at ``index`` (a CPU index from ``draw``): (vectors, masks, logits, hidden, labels)."""
        index = self._on_device(index)
        return (self.vectors[index], self.masks[index], self.logits[index],
                {layer: value[index] for layer, value in self.hidden.items()}, self.labels[index])

    def tokens_at(self, index: torch.Tensor) -> torch.Tensor | None:
        """Token ids of the rows at ``index`` (a CPU index from ``draw``), None when the pool's rows have none."""
        return None if self.tokens is None else self.tokens[self._on_device(index)]

    def _on_device(self, index: torch.Tensor) -> torch.Tensor:
        if self.vectors.is_cuda:  # this runs every step: a pinned, asynchronous copy keeps the host from waiting
            return index.pin_memory().to(self.vectors.device, non_blocking=True)
        return index

    def sample(self, n: int, generator: torch.Generator | None = None):
        """``min(n, len(self))`` examples drawn without replacement: (vectors, masks, logits, hidden, labels),
        or None when the pool is empty or ``n`` is 0. ``generator``: a CPU generator."""
        index = self.draw(n, generator)
        return None if index is None else self.take(index)

    def state_dict(self) -> dict:
        def cut(t):
            return None if t is None else t[: self.size].cpu().clone()

        return {"capacity": self.capacity, "policy": self.policy, "size": self.size, "offered": self.offered,
                "vectors": cut(self.vectors), "masks": cut(self.masks), "logits": cut(self.logits),
                "hidden": {k: cut(v) for k, v in self.hidden.items()}, "labels": cut(self.labels),
                "tokens": cut(self.tokens)}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise ValueError(f"the saved pool has capacity {state['capacity']} and policy {state['policy']!r}, "
                             f"this one {self.capacity} and {self.policy!r}")
        self.vectors = self.masks = self.logits = self.labels = self.tokens = None
        self.hidden = {}
        self.lengths.zero_()
        self.size = 0
        if state["size"] > 0:
            move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
            vectors, masks, logits = move(state["vectors"]), move(state["masks"]), move(state["logits"])
            hidden = {int(k): move(v) for k, v in state["hidden"].items()}
            tokens = None if state.get("tokens") is None else move(state["tokens"])
            self._allocate(vectors, masks, logits, hidden, tokens)
            n = state["size"]
            self.vectors[:n], self.masks[:n], self.logits[:n] = vectors, masks, logits
            for k, v in hidden.items():
                self.hidden[k][:n] = v
            if state.get("labels") is not None:  # pools saved before rows had labels have none
                self.labels[:n] = move(state["labels"])
            if tokens is not None:
                self.tokens[:n] = tokens
            self.lengths[:n] = used_lengths(state["masks"]).cpu()  # the saved masks are on the host
            self.size = n
        self.offered = state["offered"]
