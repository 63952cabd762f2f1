"""Static checks of the kNN distance-tile Triton kernel compiled for sm_90, without a GPU: the dot
products run on Hopper's tensor cores (wgmma) in the precision asked for, the operand tiles stream
through cp.async in 16-byte copies, the distance tile is stored with 128-bit stores, and nothing spills."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from sm90 import compile_sm90  # noqa: E402

from sage_fast.regions import _knn_tile  # noqa: E402

if not _knn_tile.available():
    pytest.skip("triton is not installed", allow_module_level=True)


def compile_tile(precision: str, dim: int, n: int = 65536):
    args = dict(q_ptr="*fp32", x_ptr="*fp32", qsq_ptr="*fp32", xsq_ptr="*fp32", qrow_ptr="*i64", out_ptr="*fp32",
                M=1024, N=n, D=dim, col0=0, stride_q=dim, stride_x=dim, stride_out=n)
    constexprs = dict(PRECISION=precision, EMULATE=False, BLOCK_M=_knn_tile.BLOCK_M, BLOCK_N=_knn_tile.BLOCK_N,
                      BLOCK_K=_knn_tile.BLOCK_K)
    return compile_sm90(_knn_tile._sq_distance_tile_kernel, args, constexprs, num_warps=_knn_tile.NUM_WARPS,
                        num_stages=_knn_tile.NUM_STAGES)


@pytest.mark.parametrize("precision,mma", [("tf32", r"^wgmma\.mma_async\..*\.f32\.tf32\.tf32"),
                                           ("bf16", r"^wgmma\.mma_async\..*\.f32\.bf16\.bf16")])
@pytest.mark.parametrize("dim", [64, 384, 768])
def test_tensor_cores_vector_copies_no_spills(precision, mma, dim):
    k = compile_tile(precision, dim)
    assert k.count(mma) > 0, f"no {precision} wgmma: {k.summary()}"
    # the epilogue (norms - 2 dot) takes about one FMA per output element; a dot product on CUDA cores
    # would take BLOCK_K of them per element and step
    per_thread = _knn_tile.BLOCK_M * _knn_tile.BLOCK_N // (32 * _knn_tile.NUM_WARPS)
    assert k.count(r"^fma\.rn\.f32") <= 2 * per_thread, f"the dot product fell back to CUDA-core FMAs: {k.summary()}"
    assert set(k.cp_async) == {128}, f"operand tiles not copied in 16-byte pieces: {k.cp_async}"
    assert k.st_global_bits == 128, k.summary()
    assert k.n_spills == 0, k.summary()


def test_narrow_rows_still_compile_without_spills():
    # d = 2 (a 2-D map forced onto this path): rows are 8 bytes, so the copies narrow, but it must compile
    k = compile_tile("tf32", 2)
    assert k.n_spills == 0 and k.count(r"^wgmma") > 0, k.summary()
