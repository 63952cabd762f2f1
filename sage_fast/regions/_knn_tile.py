"""Squared-distance tiles for the kNN GEMM path on CUDA, in a GEMM precision chosen per call.

``||q_i - x_j||^2 = |q_i|^2 + |x_j|^2 - 2 q_i.x_j`` for a tile of queries against a tile of columns,
the dot products on tensor cores in TF32 or bf16 (fp32 accumulation) and the norms added in fp32, the
query's own column set to +inf. The precision is a constexpr of this kernel, so choosing it never
touches torch's global ``allow_tf32`` flag (which an analysis running beside training would flip
for the training thread too). The kNN takes these distances only to pick candidates; it re-ranks
them exactly and proves the result (see ``knn.py``).
"""
from __future__ import annotations

import torch

from .._backend import interpreter_enabled

try:  # triton is optional: without it the GEMM path runs in fp32 through torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

PRECISIONS = ("tf32", "bf16")
# One tile shape: 128 x 128 outputs, K steps of 32 (fp32 operands: 16 KB per operand stage).
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 32
NUM_WARPS, NUM_STAGES = 8, 3
# Under the interpreter each program costs milliseconds: small tiles keep the tests on small inputs fast.
BLOCK_INTERPRETER = 32


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _sq_distance_tile_kernel(q_ptr, x_ptr, qsq_ptr, xsq_ptr, qrow_ptr, out_ptr, M, N, D, col0,
                                 stride_q, stride_x, stride_out,
                                 PRECISION: tl.constexpr, EMULATE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        q_rows = q_ptr + rm.to(tl.int64)[:, None] * stride_q
        x_cols = x_ptr + rn.to(tl.int64)[None, :] * stride_x
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + rk) < D
            a = tl.load(q_rows + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(x_cols + (k0 + rk)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if PRECISION == "bf16":
                if EMULATE:
                    # the interpreter cannot dot bf16; bf16 x bf16 products are exact in fp32, so this
                    # is the same arithmetic
                    acc += tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                                  input_precision="ieee")
                else:
                    acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
            else:
                acc = tl.dot(a, b, acc, input_precision="tf32")
        qsq = tl.load(qsq_ptr + rm, mask=m_ok, other=0.0)
        xsq = tl.load(xsq_ptr + rn, mask=n_ok, other=0.0)
        dist = qsq[:, None] + xsq[None, :] - 2.0 * acc
        own = tl.load(qrow_ptr + rm, mask=m_ok, other=-1)
        dist = tl.where(own[:, None] == (col0 + rn)[None, :], float("inf"), dist)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_out + rn[None, :], dist,
                 mask=m_ok[:, None] & n_ok[None, :])


def sq_distance_tile(queries: torch.Tensor, query_sq: torch.Tensor, query_rows: torch.Tensor, cols: torch.Tensor,
                     col_sq: torch.Tensor, col0: int, precision: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[r, c]`` fp32: squared distances from ``queries`` (``[r, d]``, rows ``query_rows`` of the data)
    to ``cols`` (``[c, d]``, rows ``col0..col0+c``), the dot products in ``precision`` ("tf32" or
    "bf16"), +inf where a query meets its own row. Inputs are fp32 with unit inner stride."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    r, d = queries.shape
    c = cols.shape[0]
    if queries.stride(1) != 1 or cols.stride(1) != 1:
        raise ValueError("queries and cols must have unit inner stride")
    if out is None:
        out = torch.empty(r, c, dtype=torch.float32, device=queries.device)
    interpreting = interpreter_enabled()
    block_m, block_n, block_k = ((BLOCK_INTERPRETER, BLOCK_INTERPRETER, 16) if interpreting
                                 else (BLOCK_M, BLOCK_N, BLOCK_K))
    grid = (triton.cdiv(r, block_m), triton.cdiv(c, block_n))
    _sq_distance_tile_kernel[grid](
        queries, cols, query_sq, col_sq, query_rows, out, r, c, d, col0,
        queries.stride(0), cols.stride(0), out.stride(0),
        PRECISION=precision, EMULATE=interpreting, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out
