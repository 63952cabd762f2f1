"""The error profile: each training example's running-mean loss and pooled student embedding.

For example ``i`` seen ``c_i`` times with losses ``l_i^(1..c_i)`` and pooled embeddings
``e_i^(1..c_i)`` the profile holds ``loss[i] = mean_t l_i^(t)``, ``embedding[i] = mean_t e_i^(t)``
and ``count[i] = c_i``. A batch that holds ``i`` ``n`` times folds in exactly like ``n`` single
updates: ``mean' = mean + sum_j (x_j - mean) / (c + n)``, one ``index_add_`` per buffer, so the
update costs O(batch) whatever ``num_examples`` is and never synchronises with the host beyond the
argument checks.

With ``decay`` set, old visits fade: each visit moves the statistics by
``w = max(decay, 1 / c_i)`` of the way to the new value, so the first ``1/decay`` visits still form an
exact mean and later ones an exponential moving average over about the last ``1/decay`` visits. A
profile read at the end of an epoch then says where the student is wrong *now*, not where it was
wrong on average since the start (a running mean over epochs keeps the first epoch's losses, which
are high everywhere, for ever). ``decay=None`` (the default) is the plain running mean.

A refresh (``refreshing()`` / ``refresh()``) recomputes the profile in one no-grad pass: the first
time an id is written during the refresh its old statistics are dropped, so it ends up as the mean
over the refresh pass alone; ids the pass does not visit keep their old values.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .. import _checks

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def pooled_embedding(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``last_hidden_state`` [B, L, H] over the tokens where ``attention_mask`` [B, L] is
    non-zero ([B, H]), accumulated in float32 (float64 stays float64). Rows with no valid token pool
    to zeros. Differentiable."""
    _checks.tensor("last_hidden_state", last_hidden_state, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    hidden = last_hidden_state.to(torch.promote_types(last_hidden_state.dtype, torch.float32))
    if attention_mask is None:
        return hidden.mean(dim=1)
    _checks.tensor("attention_mask", attention_mask, ndim=2)
    if attention_mask.shape != last_hidden_state.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape {tuple(last_hidden_state.shape[:2])} (batch, tokens) to match "
            f"last_hidden_state, got {tuple(attention_mask.shape)}"
        )
    _checks.same_device("last_hidden_state", last_hidden_state, "attention_mask", attention_mask)
    weights = (attention_mask != 0).to(hidden.dtype).unsqueeze(-1)
    total = (hidden * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp_min(1.0)


class ErrorProfile:
    """Device buffers of per-example running-mean loss and pooled embedding.

    Attributes: ``loss`` [num_examples] float32, ``embedding`` [num_examples, dim] float32,
    ``count`` [num_examples] int64, and ``seen`` (``count > 0``).
    """

    def __init__(self, num_examples: int, dim: int, device: torch.device | str = "cpu", decay: float | None = None):
        _checks.integer("num_examples", num_examples, minimum=1)
        _checks.integer("dim", dim, minimum=1)
        if decay is not None:
            decay = _checks.in_range("decay", decay, 0.0, 1.0, lo_open=True)
        self.num_examples = num_examples
        self.dim = dim
        self.decay = decay
        self.device = torch.device(device)
        self.loss = torch.zeros(num_examples, dtype=torch.float32, device=self.device)
        self.embedding = torch.zeros(num_examples, dim, dtype=torch.float32, device=self.device)
        self.count = torch.zeros(num_examples, dtype=torch.int64, device=self.device)
        self._refreshed: torch.Tensor | None = None

    @property
    def seen(self) -> torch.Tensor:
        return self.count > 0

    def _check_batch(self, ids, losses, embeddings) -> torch.Tensor:
        _checks.tensor("ids", ids, ndim=1, dtypes=INDEX_DTYPES)
        _checks.tensor("losses", losses, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.tensor("embeddings", embeddings, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.non_empty("ids", ids)
        if losses.shape[0] != ids.shape[0]:
            raise ValueError(f"losses must have one value per id: got {losses.shape[0]} losses for {ids.shape[0]} ids")
        if embeddings.shape[0] != ids.shape[0]:
            raise ValueError(
                f"embeddings must have one row per id: got {embeddings.shape[0]} rows for {ids.shape[0]} ids"
            )
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have {self.dim} columns (the profile's dim), got {embeddings.shape[1]}")
        for name, value in (("losses", losses), ("embeddings", embeddings)):
            if value.device != self.device:
                raise ValueError(f"{name} must be on the profile's device {self.device}, got {value.device}")
        ids = ids.to(self.device, torch.int64)
        if not _checks.values_checked(losses):
            return ids  # on CUDA the value checks below would stall the step on the host
        # every data check in one device round trip: this runs at each training step
        low, high, losses_ok, embeddings_ok = torch.stack([
            ids.min().double(), ids.max().double(),
            torch.isfinite(losses).all().double(), torch.isfinite(embeddings).all().double(),
        ]).tolist()
        if low < 0 or high >= self.num_examples:
            raise ValueError(f"ids must lie in [0, {self.num_examples}), got values in [{int(low)}, {int(high)}]")
        if not losses_ok:
            _checks.finite("losses", losses)
        if not embeddings_ok:
            _checks.finite("embeddings", embeddings)
        return ids

    @torch.no_grad()
    def update(self, ids: torch.Tensor, losses: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Fold one batch into the running means. ``ids`` may repeat and may live on any device
        (they are moved to the profile's); ``losses`` [B] and ``embeddings`` [B, dim] must be on
        the profile's device. Inputs are not modified."""
        ids = self._check_batch(ids, losses, embeddings)
        losses = losses.detach().float()
        embeddings = embeddings.detach().float()
        if self._refreshed is not None:
            first_visit = ~self._refreshed[ids]
            self.count[ids] = torch.where(first_visit, 0, self.count[ids])
            self._refreshed[ids] = True
        # Gather the old means before any write so every duplicate sees the same starting point.
        old_loss = self.loss[ids]
        old_embedding = self.embedding[ids]
        ones = torch.ones_like(ids)
        self.count.index_add_(0, ids, ones)
        total = self.count[ids].float()
        if self.decay is None:
            step = 1.0 / total  # n copies of an id each add 1/(c+n) of their difference: the exact mean
        else:
            # the id's n visits in this batch move it by w = max(decay, n/(c+n)) toward their mean
            # copies of each id in this batch, by binary search in the sorted batch: O(B log B), no
            # N-long buffer per step and no host read (torch.unique's output size would need one)
            ordered = ids.sort().values
            copies = (torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)).float()
            step = torch.maximum(torch.full_like(total, self.decay), copies / total) / copies
        self.loss.index_add_(0, ids, (losses - old_loss) * step)
        self.embedding.index_add_(0, ids, (embeddings - old_embedding) * step.unsqueeze(1))

    @contextlib.contextmanager
    def refreshing(self):
        """Inside the block, ``update`` overwrites: each id's statistics restart at its first
        update in the block."""
        if self._refreshed is not None:
            raise RuntimeError("refreshing() blocks cannot be nested")
        self._refreshed = torch.zeros(self.num_examples, dtype=torch.bool, device=self.device)
        try:
            with torch.no_grad():
                yield self
        finally:
            self._refreshed = None

    def refresh(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Recompute the profile from ``(ids, losses, embeddings)`` batches (one no-grad pass)."""
        with self.refreshing():
            for ids, losses, embeddings in batches:
                self.update(ids, losses, embeddings)

    def state_dict(self) -> dict:
        return {
            "num_examples": self.num_examples,
            "dim": self.dim,
            "loss": self.loss.clone(),
            "embedding": self.embedding.clone(),
            "count": self.count.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"loss", "embedding", "count"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        expected = {
            "loss": (self.num_examples,),
            "embedding": (self.num_examples, self.dim),
            "count": (self.num_examples,),
        }
        for name, shape in expected.items():
            value = _checks.tensor(f"state[{name!r}]", state[name])
            if tuple(value.shape) != shape:
                raise ValueError(f"state[{name!r}] must have shape {shape}, got {tuple(value.shape)}")
        self.loss.copy_(state["loss"])
        self.embedding.copy_(state["embedding"])
        self.count.copy_(state["count"])

    def __repr__(self) -> str:
        decay = "" if self.decay is None else f", decay={self.decay}"
        return f"ErrorProfile(num_examples={self.num_examples}, dim={self.dim}, device={str(self.device)!r}{decay})"
