"""Exact k-nearest-neighbour graph of a set of vectors, on the device that holds them.

For ``x`` of shape ``[N, d]`` and each row ``i``, the ``k`` rows ``j != i`` closest to ``x_i``, sorted
by ascending distance (ties by ascending index):

- ``"euclidean"``: ``dist(i, j) = ||x_i - x_j||`` (the true distance, not its square);
- ``"cosine"``: ``dist(i, j) = 1 - <x_i, x_j> / (||x_i|| ||x_j||)``, computed as ``||u_i - u_j||^2 / 2``
  on the unit vectors ``u``, which keeps its precision for near neighbours. A zero row has no
  direction, so cosine with a zero row is an error.

The point itself is excluded by index, so a duplicate of ``x_i`` elsewhere is still a neighbour at
distance 0. All arithmetic is fp32 whatever the input float type.

Paths:

- ``"gemm"`` (CPU, and CUDA when the fused kernel does not apply): the query rows are tiled; each tile
  gets squared distances from one GEMM, ``||a||^2 + ||b||^2 - 2 a.b`` (clamped at 0) on the centred
  rows (distances do not change under translation, and centring removes a large common component
  that would swamp the differences), a ``topk`` per column tile, and a merge across column tiles. The tile height comes from a memory budget
  (``TILE_BUDGET_BYTES``), so ``N x N`` is never allocated. The GEMM form loses precision for near
  points (it subtracts large, nearly equal numbers), so a few more candidates than ``k`` are kept and
  their distances recomputed directly from the vectors before the final sort.
- ``"fused"`` (CUDA, small ``d`` and ``k``): one CUDA kernel (``kernels/knn_topk.cu``) streams the
  database through shared memory, computes each distance directly from the vectors and keeps a sorted
  top-k per query in registers; see ``fused_kernel_applies`` for the rule.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .. import _checks

METRICS = ("euclidean", "cosine")
PATHS = ("auto", "gemm", "fused")

# Bytes one query tile may use (distance tile, top-k workspace, candidate vectors).
TILE_BUDGET_BYTES = 256 * 1024 * 1024
# Column tiles are never narrower than this unless N is smaller, and never so wide that fewer than
# MIN_BLOCK_ROWS query rows fit in the budget.
MIN_BLOCK_COLS = 1024
MIN_BLOCK_ROWS = 16
# Taller tiles gain nothing in GEMM efficiency and spill the candidate gather out of cache.
MAX_BLOCK_ROWS = 1024

# The fused kernel holds a query in registers and the top-k list there too: it is built for these.
FUSED_MAX_DIM = 128
FUSED_MAX_K = 32


@dataclass(frozen=True)
class KnnPlan:
    """How ``knn_graph`` will run: the path, the tile shape and the number of GEMM candidates."""

    path: str  # "gemm" or "fused"
    block_rows: int
    block_cols: int
    candidates: int  # neighbours kept per row before the exact re-ranking (gemm path)
    reason: str

    def tile_bytes(self, dim: int) -> int:
        return _tile_bytes(self.block_rows, self.block_cols, self.candidates, dim)


def _candidates(n: int, k: int) -> int:
    # A margin beyond k so that a true neighbour pushed just past rank k by GEMM rounding is recovered
    # by the exact re-ranking.
    return min(n - 1, k + max(8, k // 4))


def _tile_bytes(block_rows: int, block_cols: int, candidates: int, dim: int) -> int:
    # distance tile + top-k values/indices of the tile and of the running merge + candidate vectors
    per_row = 4 * block_cols + 24 * 2 * candidates + 4 * candidates * dim
    return block_rows * per_row


def fused_kernel_applies(n: int, dim: int, k: int) -> bool:
    """The documented rule for CUDA: the fused distance + select kernel runs when ``d <= 128`` and
    ``k <= 32`` (the query and its list fit in registers, and a GEMM of so small an inner size is
    bound by writing and re-reading the distance tile rather than by flops); otherwise the GEMM path,
    whose cuBLAS GEMM wins once ``d`` is large. ``bench/test_bench_knn.py`` measures both."""
    return dim <= FUSED_MAX_DIM and k <= FUSED_MAX_K and n < 2**31 - 1


def plan_knn(n: int, dim: int, k: int, *, device: torch.device | str = "cpu", block_rows: int | None = None,
             path: str = "auto", budget_bytes: int | None = None) -> KnnPlan:
    """Choose the path and the tile shape for an ``[n, dim]`` input; no data is touched."""
    device = torch.device(device)
    budget = TILE_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    candidates = _candidates(n, k)
    chosen, reason = "gemm", "CPU tensor: tiled GEMM + top-k in torch"
    if device.type == "cuda":
        from . import _gpu

        fused_ok, why = _gpu.fused_knn_available()
        if path == "fused" and not fused_kernel_applies(n, dim, k):
            raise ValueError(f"path='fused' needs d <= {FUSED_MAX_DIM} and k <= {FUSED_MAX_K}, got d={dim}, k={k}")
        if path == "fused" and not fused_ok:
            raise ValueError(f"path='fused' cannot run here: {why}")
        if path == "fused" or (path == "auto" and fused_ok and fused_kernel_applies(n, dim, k)):
            chosen, reason = "fused", f"CUDA tensor, d={dim} <= {FUSED_MAX_DIM} and k={k} <= {FUSED_MAX_K}: fused kernel"
        elif path == "gemm":
            reason = "CUDA tensor: tiled GEMM + top-k forced"
        elif not fused_ok:
            reason = f"CUDA tensor: tiled GEMM + top-k (fused kernel unavailable: {why})"
        else:
            reason = f"CUDA tensor, d={dim}, k={k}: tiled GEMM + top-k (fused kernel needs d <= {FUSED_MAX_DIM}, k <= {FUSED_MAX_K})"
    elif path == "fused":
        raise ValueError("path='fused' needs a CUDA tensor x; CPU tensors use the 'gemm' path")

    max_cols = max(MIN_BLOCK_COLS, budget // (4 * MIN_BLOCK_ROWS))
    block_cols = min(n, max_cols)
    if block_rows is None:
        per_row = _tile_bytes(1, block_cols, candidates, dim)
        block_rows = max(1, min(n, MAX_BLOCK_ROWS, budget // per_row))
    return KnnPlan(chosen, int(block_rows), int(block_cols), candidates, reason)


def _check(x, k, metric, block_rows) -> None:
    _checks.tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.non_empty("x", x, 0)
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one column (feature), got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < N (the number of rows of x, {n}): the point itself is "
                         f"never its own neighbour; got k={k}")
    _checks.choice("metric", metric, METRICS)
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be a positive int or None, got {block_rows!r}")
    _checks.finite("x", x)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = norms.squeeze(1) == 0
    if bool(zero.any()):
        rows = zero.nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"x has {int(zero.sum())} zero rows (first: {rows}); the cosine metric is undefined "
                         "for zero vectors: drop them or use metric='euclidean'")
    return x / norms


def _prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    """fp32, contiguous, unit rows for cosine; always a new tensor or an untouched view of x."""
    xf = x.to(torch.float32).contiguous()
    if metric == "cosine":
        xf = _unit_rows(xf)
    return xf


def _finish(squared: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return (squared * 0.5).clamp_(0.0, 2.0)
    return squared.clamp_(min=0.0).sqrt_()


def _sort_by_distance_then_index(dist: torch.Tensor, idx: torch.Tensor, k: int):
    idx, order = idx.sort(dim=1)
    dist = dist.gather(1, order)
    dist, order = dist.sort(dim=1, stable=True)
    return dist[:, :k].contiguous(), idx.gather(1, order)[:, :k].contiguous()


def _tile_topk(queries: torch.Tensor, query_sq: torch.Tensor, row0: int, xf: torch.Tensor, sq: torch.Tensor,
               plan: KnnPlan):
    """Indices of the ``plan.candidates`` nearest non-self columns for the query tile (GEMM distances)."""
    n = xf.shape[0]
    best_d = best_i = None
    for col0 in range(0, n, plan.block_cols):
        cols = xf[col0:col0 + plan.block_cols]
        tile = torch.addmm(sq[None, col0:col0 + cols.shape[0]], queries, cols.T, beta=1.0, alpha=-2.0)
        tile.add_(query_sq[:, None])
        # The query rows whose own column falls in this tile form one range, known on the host: no sync.
        first, last = max(row0, col0), min(row0 + queries.shape[0], col0 + cols.shape[0])
        if first < last:
            own = torch.arange(first, last, device=xf.device)
            tile[own - row0, own - col0] = math.inf
        take = min(plan.candidates, cols.shape[0])
        tile_d, tile_i = tile.topk(take, dim=1, largest=False, sorted=False)
        tile_i += col0
        if best_d is None:
            best_d, best_i = tile_d, tile_i
        else:
            merged_d = torch.cat([best_d, tile_d], dim=1)
            merged_i = torch.cat([best_i, tile_i], dim=1)
            take = min(plan.candidates, merged_d.shape[1])
            best_d, pos = merged_d.topk(take, dim=1, largest=False, sorted=False)
            best_i = merged_i.gather(1, pos)
    return best_i


def _knn_gemm(xf: torch.Tensor, k: int, metric: str, plan: KnnPlan):
    n = xf.shape[0]
    # Differences of the uncentred rows are exact for near points; the centred copy is for the GEMM.
    centred = xf - xf.mean(dim=0, keepdim=True)
    sq = torch.linalg.vector_norm(centred, dim=1).square_()
    out_d = torch.empty(n, k, dtype=torch.float32, device=xf.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=xf.device)
    for row0 in range(0, n, plan.block_rows):
        queries = centred[row0:row0 + plan.block_rows]
        cand = _tile_topk(queries, sq[row0:row0 + queries.shape[0]], row0, centred, sq, plan)
        # index_select, not xf[cand]: the advanced-indexing gather is several times slower on CPU
        diff = xf.index_select(0, cand.reshape(-1)).view(*cand.shape, -1)
        diff.sub_(xf[row0:row0 + queries.shape[0], None, :])
        exact = torch.linalg.vector_norm(diff, dim=2)
        if metric == "cosine":
            exact = exact.square_().mul_(0.5).clamp_(max=2.0)
        d, i = _sort_by_distance_then_index(exact, cand, k)
        out_d[row0:row0 + queries.shape[0]] = d
        out_i[row0:row0 + queries.shape[0]] = i
    return out_d, out_i


def knn_graph_reference(x: torch.Tensor, k: int, *, metric: str = "euclidean"):
    """Float64 brute force over the full ``N x N`` matrix: for tests on small inputs only."""
    _check(x, k, metric, None)
    xd = x.to(torch.float64)
    if metric == "cosine":
        xd = _unit_rows(xd)
    diff = xd[:, None, :] - xd[None, :, :]
    squared = (diff * diff).sum(dim=2)
    squared.fill_diagonal_(math.inf)
    dist = squared.clamp(min=0).sqrt() if metric == "euclidean" else squared * 0.5
    idx = torch.arange(x.shape[0], device=x.device).expand(x.shape[0], -1)
    return _sort_by_distance_then_index(dist, idx, k)


def knn_graph(x: torch.Tensor, k: int, *, metric: str = "euclidean", block_rows: int | None = None,
              path: str = "auto"):
    """Exact kNN graph of the rows of ``x`` (``[N, d]``, any float type, computed in fp32).

    Returns ``(distances [N, k] float32, indices [N, k] int64)`` on the device of ``x``; each row sorted by
    ascending distance, ties by ascending index, the row itself excluded. ``block_rows`` overrides the
    query-tile height chosen from ``TILE_BUDGET_BYTES``. ``path`` ("auto", "gemm", "fused") forces an
    implementation on CUDA, for comparisons.
    """
    _check(x, k, metric, block_rows)
    _checks.choice("path", path, PATHS)
    n, dim = x.shape
    plan = plan_knn(n, dim, k, device=x.device, block_rows=block_rows, path=path)
    xf = _prepare(x, metric)
    if plan.path == "fused":
        from . import _gpu

        try:
            squared_d, idx = _gpu.fused_knn(xf, k)
            return _finish(squared_d, metric), idx
        except _gpu.KernelUnavailable as err:
            if path == "fused":
                raise
            # no cubin fits and NVRTC is missing or fails: the GEMM path gives the same graph
            warnings.warn(f"the fused kNN kernel is unavailable, using the GEMM path: {err}", RuntimeWarning,
                          stacklevel=2)
            plan = plan_knn(n, dim, k, device=x.device, block_rows=block_rows, path="gemm")
    return _knn_gemm(xf, k, metric, plan)


def describe_backends() -> list[str]:
    """A few lines for ``sage-fast info``: GPU packages, kernels found, and which kNN path runs where."""
    from . import _gpu

    lines = _gpu.describe()
    lines.append("kNN on cpu: tiled GEMM + top-k in torch, exact re-ranking")
    if torch.cuda.is_available():
        fused_ok, why = _gpu.fused_knn_available()
        if fused_ok:
            lines.append(f"kNN on cuda: fused kernel when d <= {FUSED_MAX_DIM} and k <= {FUSED_MAX_K}, "
                         "else tiled GEMM + top-k")
        else:
            lines.append(f"kNN on cuda: tiled GEMM + top-k (fused kernel unavailable: {why})")
    return lines
