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
  gets squared distances from one GEMM, ``||a||^2 + ||b||^2 - 2 a.b`` on the centred rows (distances
  do not change under translation, and centring removes a large common component that would swamp
  the differences), a ``topk`` per column tile, and a merge across column tiles. The tile height comes
  from a memory budget (``TILE_BUDGET_BYTES``), so ``N x N`` is never allocated. The GEMM form loses
  precision for near points (it subtracts large, nearly equal numbers), so more candidates than ``k``
  are kept and their distances recomputed directly from the vectors before the final sort.

  The GEMM only nominates candidates, so it may run in a lower precision (``precision``): ``"fp32"``
  (torch's GEMM), or ``"tf32"`` / ``"bf16"`` (tensor cores, a Triton kernel on CUDA that sets the
  precision per call rather than through torch's global TF32 flag; on CPU the rounding is emulated,
  for tests). A lower precision keeps more candidates and then proves each row: with ``u`` a bound on
  the relative error of a dot product, ``|A(i,j) - D(i,j)| <= 2 u |c_i| max_j |c_j|`` (``A`` the GEMM
  estimate, ``D`` the true squared distance, ``c`` the centred rows), so when the k-th exact distance
  among the candidates is below the largest kept estimate minus that bound, no row left out can be
  nearer. Rows that fail this are recomputed with the fp32 GEMM. The result is the same graph as in
  fp32; the cost is one host synchronisation per call (to size the rows to redo). ``"auto"`` is
  ``"tf32"`` on CUDA for ``d >= 32`` and ``"fp32"`` otherwise (and on CPU, where tensor cores are
  only emulated).
- ``"fused"`` (CUDA, small ``d`` and ``k``): one CUDA kernel (``kernels/knn_topk.cu``) streams the
  database through shared memory, computes each distance directly from the vectors and keeps a sorted
  top-k per query in registers; see ``fused_kernel_applies`` for the rule.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from .. import _checks

METRICS = ("euclidean", "cosine")
PATHS = ("auto", "gemm", "fused")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")

# Bound on the relative error of one product of two operands rounded to the GEMM's input precision
# (tf32: 10 stored mantissa bits, allowing truncation rather than rounding; bf16: 7 bits, rounded),
# before the fp32 accumulation, which adds d * 2^-24 (doubled here for safety).
_OPERAND_ERROR = {"tf32": 2.0 * 2.0**-10 + 2.0**-20, "bf16": 2.0 * 2.0**-8 + 2.0**-16}

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
    precision: str = "fp32"  # of the GEMM that nominates candidates (gemm path)

    def tile_bytes(self, dim: int) -> int:
        return _tile_bytes(self.block_rows, self.block_cols, self.candidates, dim)


def _candidates(n: int, k: int, precision: str = "fp32") -> int:
    # A margin beyond k so that a true neighbour pushed just past rank k by GEMM rounding is recovered
    # by the exact re-ranking; wider for the lower precisions, whose rows must also pass the proof.
    margin = {"fp32": max(8, k // 4), "tf32": max(16, k // 2), "bf16": max(32, k)}[precision]
    return min(n - 1, k + margin)


# "auto" takes tensor cores from this width on: below it the GEMM is cheap anyway (and the fused kernel
# usually runs instead), while the rows are so crowded that the proof fails for many of them (2-D
# maps: about half the rows in TF32), each costing an fp32 redo.
AUTO_TF32_MIN_DIM = 32


def _resolve_precision(precision: str, device: torch.device, dim: int) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and dim >= AUTO_TF32_MIN_DIM:
        from . import _knn_tile

        return "tf32" if _knn_tile.available() else "fp32"
    return "fp32"


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
             path: str = "auto", budget_bytes: int | None = None, precision: str = "auto") -> KnnPlan:
    """Choose the path, the GEMM precision and the tile shape for an ``[n, dim]`` input; no data is touched."""
    device = torch.device(device)
    budget = TILE_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    precision = _resolve_precision(precision, device, dim)
    if precision in ("tf32", "bf16") and device.type == "cuda":
        from . import _knn_tile

        if not _knn_tile.available():
            raise ValueError(f"precision={precision!r} on CUDA needs triton (its tensor-core GEMM); use 'fp32'")
    candidates = _candidates(n, k, precision)
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
    return KnnPlan(chosen, int(block_rows), int(block_cols), candidates, reason, precision)


def _check(x, k, metric, block_rows, precision="auto") -> None:
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
    _checks.choice("precision", precision, PRECISIONS)
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


def _round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` rounded to the GEMM's input precision, to emulate tensor-core inputs on the CPU."""
    if precision == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    # tf32: round to nearest even on 10 stored mantissa bits (13 of fp32's 23 dropped)
    bits = x.contiguous().view(torch.int32)
    drop = 13
    bias = ((bits >> drop) & 1) + ((1 << (drop - 1)) - 1)
    return ((bits + bias) & ~((1 << drop) - 1)).view(torch.float32)


def _mask_own_column(tile: torch.Tensor, query_rows: torch.Tensor, col0: int) -> None:
    """Sets ``tile[r, query_rows[r] - col0]`` to +inf where that column is in the tile, without a
    host synchronisation (a gather and a scatter of one element per row)."""
    local = query_rows - col0
    inside = (local >= 0) & (local < tile.shape[1])
    local = local.clamp(0, tile.shape[1] - 1).unsqueeze(1)
    tile.scatter_(1, local, torch.where(inside.unsqueeze(1), math.inf, tile.gather(1, local)))


def _tile_topk(queries: torch.Tensor, query_sq: torch.Tensor, query_rows: torch.Tensor, operands: torch.Tensor,
               sq: torch.Tensor, plan: KnnPlan):
    """``(estimates, indices)`` of the ``plan.candidates`` nearest non-self columns of each query row
    (rows ``query_rows`` of the data), from GEMM distances in ``plan.precision``."""
    n = operands.shape[0]
    tensor_cores = plan.precision in ("tf32", "bf16") and operands.device.type == "cuda"
    if tensor_cores:
        from . import _knn_tile
    best_d = best_i = None
    for col0 in range(0, n, plan.block_cols):
        cols = operands[col0:col0 + plan.block_cols]
        if tensor_cores:
            tile = _knn_tile.sq_distance_tile(queries, query_sq, query_rows, cols, sq[col0:col0 + cols.shape[0]],
                                              col0, plan.precision)
        else:
            tile = torch.addmm(sq[None, col0:col0 + cols.shape[0]], queries, cols.T, beta=1.0, alpha=-2.0)
            tile.add_(query_sq[:, None])
            _mask_own_column(tile, query_rows, col0)
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
    return best_d, best_i


def _rank_rows(rows: torch.Tensor, xf: torch.Tensor, operands: torch.Tensor, sq: torch.Tensor, plan: KnnPlan,
               k: int, metric: str):
    """For the query rows ``rows``: the k nearest by exact distance among the GEMM's candidates,
    ``(distances, indices, candidate estimates, exact squared distances of the candidates)``."""
    estimates, cand = _tile_topk(operands.index_select(0, rows), sq.index_select(0, rows), rows, operands, sq, plan)
    # index_select, not xf[cand]: the advanced-indexing gather is several times slower on CPU
    diff = xf.index_select(0, cand.reshape(-1)).view(*cand.shape, -1)
    diff.sub_(xf.index_select(0, rows).unsqueeze(1))
    exact = torch.linalg.vector_norm(diff, dim=2)
    exact_sq = exact.square()
    if metric == "cosine":
        exact = (exact_sq * 0.5).clamp_(max=2.0)
    d, i = _sort_by_distance_then_index(exact, cand, k)
    return d, i, estimates, exact_sq


def _knn_gemm(xf: torch.Tensor, k: int, metric: str, plan: KnnPlan, stats: dict | None = None):
    n, dim = xf.shape
    # Differences of the uncentred rows are exact for near points; the centred copy is for the GEMM.
    centred = xf - xf.mean(dim=0, keepdim=True)
    sq = torch.linalg.vector_norm(centred, dim=1).square_()
    out_d = torch.empty(n, k, dtype=torch.float32, device=xf.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=xf.device)
    low = plan.precision in ("tf32", "bf16")
    prove = low and plan.candidates < n - 1  # with every other row a candidate there is nothing to prove
    operands = _round_operand(centred, plan.precision) if low and xf.device.type != "cuda" else centred
    if prove:
        norms = sq.sqrt()
        largest = norms.max()
        u = _OPERAND_ERROR[plan.precision] + dim * 2.0**-23
        certified = torch.empty(n, dtype=torch.bool, device=xf.device)
    for row0 in range(0, n, plan.block_rows):
        rows = torch.arange(row0, min(n, row0 + plan.block_rows), device=xf.device)
        d, i, estimates, exact_sq = _rank_rows(rows, xf, operands, sq, plan, k, metric)
        out_d[row0:row0 + rows.shape[0]] = d
        out_i[row0:row0 + rows.shape[0]] = i
        if prove:
            # Every row left out has an estimate >= the largest kept one, so a true squared distance
            # >= that estimate minus the error bound; the k-th exact candidate must be below it. The
            # bound also covers the fp32 rounding of the norms, the epilogue and the centring.
            kth = exact_sq.kthvalue(k, dim=1).values * (1.0 + (dim + 4) * 2.0**-23)
            bound = 2.0 * u * norms[rows] * largest + 2.0**-20 * (sq[rows] + largest * largest)
            certified[rows] = kth + bound < estimates.max(dim=1).values
    if stats is not None:
        stats.update(precision=plan.precision, candidates=plan.candidates, uncertified_rows=0 if low else None)
    if prove:
        redo = (~certified).nonzero().squeeze(1)  # the one host synchronisation of a low-precision call
        if stats is not None:
            stats["uncertified_rows"] = int(redo.numel())
        if redo.numel():
            exact_plan = dataclasses.replace(plan, precision="fp32", candidates=_candidates(n, k, "fp32"))
            for start in range(0, redo.numel(), plan.block_rows):
                rows = redo[start:start + plan.block_rows]
                d, i, _, _ = _rank_rows(rows, xf, centred, sq, exact_plan, k, metric)
                out_d.index_copy_(0, rows, d)
                out_i.index_copy_(0, rows, i)
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
              path: str = "auto", precision: str = "auto", stats: dict | None = None):
    """Exact kNN graph of the rows of ``x`` (``[N, d]``, any float type, computed in fp32).

    Returns ``(distances [N, k] float32, indices [N, k] int64)`` on the device of ``x``; each row sorted by
    ascending distance, ties by ascending index, the row itself excluded. ``block_rows`` overrides the
    query-tile height chosen from ``TILE_BUDGET_BYTES``. ``path`` ("auto", "gemm", "fused") forces an
    implementation on CUDA, for comparisons. ``precision`` ("auto", "fp32", "tf32", "bf16") is the GEMM
    precision of the candidate search on the gemm path (see the module docstring: the graph is the same).
    ``stats``, a dict, receives what ran: ``path``, and on the gemm path ``precision``, ``candidates``
    and ``uncertified_rows`` (rows recomputed in fp32; None in fp32, which proves nothing).
    """
    _check(x, k, metric, block_rows, precision)
    _checks.choice("path", path, PATHS)
    n, dim = x.shape
    plan = plan_knn(n, dim, k, device=x.device, block_rows=block_rows, path=path, precision=precision)
    xf = _prepare(x, metric)
    if plan.path == "fused":
        from . import _gpu

        try:
            squared_d, idx = _gpu.fused_knn(xf, k)
            if stats is not None:
                stats.update(path="fused")
            return _finish(squared_d, metric), idx
        except _gpu.KernelUnavailable as err:
            if path == "fused":
                raise
            # no cubin fits and NVRTC is missing or fails: the GEMM path gives the same graph
            warnings.warn(f"the fused kNN kernel is unavailable, using the GEMM path: {err}", RuntimeWarning,
                          stacklevel=2)
            plan = plan_knn(n, dim, k, device=x.device, block_rows=block_rows, path="gemm", precision=precision)
    if stats is not None:
        stats.update(path="gemm")
    return _knn_gemm(xf, k, metric, plan, stats)


def describe_backends() -> list[str]:
    """A few lines for ``sage-fast info``: GPU packages, kernels found, and which kNN path runs where."""
    from . import _gpu

    lines = _gpu.describe()
    lines.append("kNN on cpu: tiled GEMM + top-k in torch, exact re-ranking")
    if torch.cuda.is_available():
        fused_ok, why = _gpu.fused_knn_available()
        from . import _knn_tile

        gemm = (f"tiled GEMM + top-k, candidates from TF32 tensor cores when d >= {AUTO_TF32_MIN_DIM} (each row "
                "proved exact or redone in fp32)" if _knn_tile.available() else "tiled GEMM + top-k in fp32")
        if fused_ok:
            lines.append(f"kNN on cuda: fused kernel when d <= {FUSED_MAX_DIM} and k <= {FUSED_MAX_K}, else {gemm}")
        else:
            lines.append(f"kNN on cuda: {gemm} (fused kernel unavailable: {why})")
    return lines
