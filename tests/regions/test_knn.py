import math

import pytest
import torch

from sage_fast.regions import knn
from sage_fast.regions.knn import knn_graph, knn_graph_reference, plan_knn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_matches_reference(x, k, metric, dist, idx, *, rtol=1e-5, atol=1e-5):
    n = x.shape[0]
    ref_d, ref_i = knn_graph_reference(x.cpu(), k, metric=metric)
    dist, idx = dist.cpu(), idx.cpu()
    assert dist.shape == (n, k) and idx.shape == (n, k)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    rows = torch.arange(n)[:, None]
    assert not (idx == rows).any(), "a point is listed as its own neighbour"
    assert (idx >= 0).all() and (idx < n).all()
    assert (idx.sort(dim=1).values.diff(dim=1) != 0).all(), "a neighbour is listed twice"
    assert (dist.diff(dim=1) >= 0).all(), "rows are not sorted by distance"
    # the k smallest distances are found...
    torch.testing.assert_close(dist.double(), ref_d, rtol=rtol, atol=atol)
    # ...each returned index really is at the distance reported for it...
    xd = x.cpu().double()
    if metric == "cosine":
        xd = xd / xd.norm(dim=1, keepdim=True)
    true_sq = ((xd[idx] - xd[:, None, :]) ** 2).sum(dim=2)
    true_d = true_sq.sqrt() if metric == "euclidean" else true_sq / 2
    torch.testing.assert_close(dist.double(), true_d, rtol=rtol, atol=atol)
    # ...and where a neighbour's distance is clearly apart from the others', it is the reference's index.
    scale = ref_d.abs().max().item() + 1e-12
    gap = 1e-4 * scale
    padded = torch.cat([torch.full((n, 1), -math.inf, dtype=ref_d.dtype), ref_d,
                        torch.full((n, 1), math.inf, dtype=ref_d.dtype)], dim=1)
    distinct = (padded[:, 1:-1] - padded[:, :-2] > gap) & (padded[:, 2:] - padded[:, 1:-1] > gap)
    assert torch.equal(idx[distinct], ref_i[distinct])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,d,k", [(2, 3, 1), (3, 1, 2), (37, 5, 4), (129, 16, 15), (200, 33, 1)])
def test_matches_float64_brute_force(seed, metric, n, d, k):
    x = torch.randn(n, d) * 3 + 1
    dist, idx = knn_graph(x, k, metric=metric)
    assert_matches_reference(x, k, metric, dist, idx)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_several_row_and_column_tiles(seed, metric, monkeypatch):
    # a tiny budget forces narrow column tiles, block_rows forces several query tiles
    monkeypatch.setattr(knn, "MIN_BLOCK_COLS", 8)
    monkeypatch.setattr(knn, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(knn, "TILE_BUDGET_BYTES", 4 * 23)
    x = torch.randn(101, 7)
    plan = plan_knn(101, 7, 5)
    assert plan.block_cols == 23 and plan.block_rows == 1
    dist, idx = knn_graph(x, 5, metric=metric, block_rows=17)
    assert_matches_reference(x, 5, metric, dist, idx)


def test_duplicates_excluded_by_index_not_distance(seed):
    base = torch.randn(20, 6)
    x = torch.cat([base, base, base[:3]])  # rows i, i+20 (and i+40 for i < 3) coincide
    dist, idx = knn_graph(x, 3, block_rows=7)
    n = x.shape[0]
    assert not (idx == torch.arange(n)[:, None]).any()
    for i in range(20):
        twins = {i, i + 20} | ({i + 40} if i < 3 else set())
        twins.discard(i)
        assert twins <= set(idx[i].tolist())
        assert dist[i, : len(twins)].eq(0).all()
        assert set(idx[i, : len(twins)].tolist()) == twins
    assert_matches_reference(x, 3, "euclidean", dist, idx)


def test_all_points_equal_ties_broken_by_index():
    x = torch.ones(6, 4)
    dist, idx = knn_graph(x, 5)
    assert dist.eq(0).all()
    for i in range(6):
        assert idx[i].tolist() == [j for j in range(6) if j != i]


def test_near_points_accurate_despite_large_norms(seed):
    # a large common offset (norms ~1e4, gaps ~1e-2) would swamp GEMM distances; centring removes it
    x = torch.randn(1, 16) * 1e4 + torch.randn(50, 16) * 1e-2
    dist, idx = knn_graph(x, 4)
    assert_matches_reference(x, 4, "euclidean", dist, idx, rtol=1e-5, atol=1e-7)


def test_tight_far_apart_clusters_ranked_exactly(seed):
    # GEMM distances within a cluster are pure rounding noise (~1e-1 against ~1e-3); every cluster
    # member is a candidate, and the exact re-ranking orders them
    centres = torch.randn(8, 16) * 1e3
    x = (centres[:, None, :] + torch.randn(8, 6, 16) * 1e-2).reshape(48, 16)
    dist, idx = knn_graph(x, 3)
    assert_matches_reference(x, 3, "euclidean", dist, idx, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_types_computed_in_fp32(dtype):
    torch.manual_seed(3)
    x = torch.randn(64, 12).to(dtype)
    before = x.clone()
    dist, idx = knn_graph(x, 6, metric="cosine")
    assert torch.equal(x, before)
    assert_matches_reference(x.float(), 6, "cosine", dist, idx)


def test_input_not_modified_and_noncontiguous_input():
    torch.manual_seed(4)
    x = torch.randn(12, 40)[:, ::3]
    before = x.clone()
    dist, idx = knn_graph(x, 3, metric="cosine")
    assert torch.equal(x, before)
    assert_matches_reference(x, 3, "cosine", dist, idx)


def test_tile_memory_bounded_for_a_million_rows(monkeypatch):
    plan = plan_knn(1_000_000, 768, 15)
    assert plan.tile_bytes(768) <= knn.TILE_BUDGET_BYTES
    assert plan.block_rows * plan.block_cols < 1_000_000 * 1_000_000 // 1000
    monkeypatch.setattr(knn, "TILE_BUDGET_BYTES", 64 * 1024 * 1024)
    small = plan_knn(1_000_000, 768, 15)
    assert small.tile_bytes(768) <= 64 * 1024 * 1024 and small.block_rows < plan.block_rows


def test_tiles_actually_used_stay_within_budget(monkeypatch):
    budget = 64 * 1024
    monkeypatch.setattr(knn, "TILE_BUDGET_BYTES", budget)
    monkeypatch.setattr(knn, "MIN_BLOCK_COLS", 64)
    seen = []
    real = knn._tile_topk

    def recording(queries, query_sq, query_rows, operands, sq, plan):
        seen.append((queries.shape[0], plan.block_cols))
        return real(queries, query_sq, query_rows, operands, sq, plan)

    monkeypatch.setattr(knn, "_tile_topk", recording)
    x = torch.randn(3000, 8)
    dist, idx = knn_graph(x, 2)
    assert len(seen) > 1
    assert all(_rows * 4 * cols <= budget for _rows, cols in seen)
    assert max(cols for _rows, cols in seen) < 3000
    # spot-check a few rows against a brute force on them only
    sample = torch.tensor([0, 1234, 2999])
    full = torch.cdist(x[sample].double(), x.double())
    full[torch.arange(3), sample] = math.inf
    torch.testing.assert_close(dist[sample].double(), full.topk(2, largest=False).values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,kwargs,match", [
    (torch.randn(5), {}, "x must have 2 dimensions"),
    (torch.randn(2, 3, 4), {}, "x must have 2 dimensions"),
    (torch.zeros(0, 3), {}, "x is empty"),
    (torch.zeros(4, 0), {}, "at least one column"),
    (torch.arange(12).view(4, 3), {}, "x must have dtype"),
    ([[1.0, 2.0]], {}, "x must be a torch.Tensor"),
    (torch.randn(4, 3), {"k": 0}, "k must satisfy"),
    (torch.randn(4, 3), {"k": 4}, "k must satisfy"),
    (torch.randn(1, 3), {"k": 1}, "k must satisfy"),
    (torch.randn(4, 3), {"k": 2.0}, "k must be an int"),
    (torch.randn(4, 3), {"k": True}, "k must be an int"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]]), {}, "x has 1 non-finite"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0], [1.0, 1.0]]), {}, "x has 1 non-finite"),
    (torch.randn(4, 3), {"metric": "manhattan"}, "metric must be one of"),
    (torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), {"metric": "cosine"}, "zero rows"),
    (torch.randn(4, 3), {"block_rows": 0}, "block_rows must be"),
    (torch.randn(4, 3), {"path": "magic"}, "path must be one of"),
    (torch.randn(4, 3), {"path": "fused"}, "needs a CUDA tensor"),
])
def test_bad_input_raises_value_error_naming_the_argument(bad, kwargs, match):
    kwargs = {"k": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        knn_graph(bad, **kwargs)


def test_zero_row_is_fine_for_euclidean():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    dist, idx = knn_graph(x, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0]]
    torch.testing.assert_close(dist, torch.tensor([[1.0, 5.0], [1.0, 18 ** 0.5], [18 ** 0.5, 5.0]]))


# ---------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("path", ["gemm", "fused"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,d,k", [(2, 3, 1), (257, 31, 7), (1000, 64, 15), (700, 128, 32), (3000, 2, 15),
                                   (513, 3, 8), (600, 9, 16)])
def test_cuda_paths_match_reference(seed, path, metric, n, d, k):
    from sage_fast.regions import _gpu

    if path == "fused" and not _gpu.fused_knn_loadable()[0]:
        pytest.skip(_gpu.fused_knn_loadable()[1])
    x = torch.randn(n, d, device="cuda")
    dist, idx = knn_graph(x, k, metric=metric, path=path)
    assert dist.device == x.device and idx.device == x.device
    assert_matches_reference(x, k, metric, dist, idx, rtol=1e-4, atol=1e-4)


@cuda
def test_cuda_duplicates_and_ties_on_fused_path():
    from sage_fast.regions import _gpu

    if not _gpu.fused_knn_loadable()[0]:
        pytest.skip(_gpu.fused_knn_loadable()[1])
    x = torch.ones(40, 8, device="cuda")
    dist, idx = knn_graph(x, 5, path="fused")
    assert dist.eq(0).all()
    for i in range(40):
        assert idx[i].tolist() == [j for j in range(40) if j != i][:5]


def test_zero_copy_guard_and_cupy_views_on_gpu():
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from sage_fast.regions import _gpu

    x = torch.randn(300, 48, device="cuda")
    view = _gpu.as_cupy(x)
    assert int(view.data.ptr) == x.data_ptr()
    back = _gpu.as_torch(view)
    assert back.data_ptr() == x.data_ptr()
    xf = knn._prepare(x, "euclidean")
    plan = plan_knn(300, 48, 5, device=x.device, path="gemm", block_rows=64, precision="fp32")
    fused_ok = _gpu.fused_knn_loadable()[0]  # loading (an NVRTC build) happens outside the guarded block
    with _gpu.no_host_transfers():
        knn._knn_gemm(xf, 5, "euclidean", plan)
        if fused_ok:
            _gpu.fused_knn(xf, 5)
    # a tensor-core candidate search pays one synchronisation per call: sizing the rows it must redo
    tf32 = plan_knn(300, 48, 5, device=x.device, path="gemm", block_rows=64, precision="tf32")
    with _gpu.no_host_transfers(allowed=1):
        knn._knn_gemm(xf, 5, "euclidean", tf32)
    with pytest.raises(AssertionError, match="device-to-host"):
        with _gpu.no_host_transfers():
            x.sum().item()


# ---------------------------------------------------------------- GPU interop, without a GPU


def test_missing_cupy_names_the_extra(monkeypatch):
    import sys

    from sage_fast.regions import _gpu

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"sage-fast\[gpu\]"):
        _gpu.import_cupy()


def test_cuda_runtime_error_is_explained():
    from sage_fast.regions import _gpu

    fake = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})
    with pytest.raises(RuntimeError, match="allocating failed in CUDA .*CUDA device visible"):
        with _gpu.cuda_errors_explained("allocating"):
            raise fake("cudaErrorNoDevice: no CUDA-capable device is detected")
    with pytest.raises(RuntimeError, match="^unrelated$"):
        with _gpu.cuda_errors_explained("allocating"):
            raise RuntimeError("unrelated")


def test_same_memory_check_rejects_copies():
    from types import SimpleNamespace

    from sage_fast.regions import _gpu

    t = torch.zeros(3)
    fake = SimpleNamespace(data=SimpleNamespace(ptr=t.data_ptr() + 4), device=SimpleNamespace(id=0))
    with pytest.raises(AssertionError, match="do not share memory"):
        _gpu.assert_same_memory(t, fake)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        _gpu.as_cupy(t)


def test_cubin_lookup_order_and_architecture(tmp_path, monkeypatch):
    from sage_fast.regions import _gpu

    env_dir, pkg_dir = tmp_path / "env", tmp_path / "pkg"
    (pkg_dir / "_cubins").mkdir(parents=True)
    env_dir.mkdir()
    for arch in ("80", "90"):
        (pkg_dir / "_cubins" / f"knn_topk.sm_{arch}.cubin").write_bytes(b"")
    monkeypatch.setattr(_gpu, "_PACKAGE_DIR", pkg_dir)
    monkeypatch.delenv("SAGE_FAST_CUBIN_DIR", raising=False)
    assert _gpu.find_cubin("knn_topk", (9, 0)).name == "knn_topk.sm_90.cubin"
    assert _gpu.find_cubin("knn_topk", (8, 9)).name == "knn_topk.sm_80.cubin"  # same major, older minor
    assert _gpu.find_cubin("knn_topk", (7, 5)) is None
    assert _gpu.find_cubin("knn_topk", (10, 0)) is None  # never across majors
    (env_dir / "knn_topk.sm_90.cubin").write_bytes(b"")
    monkeypatch.setenv("SAGE_FAST_CUBIN_DIR", str(env_dir))
    assert _gpu.find_cubin("knn_topk", (9, 0)).parent == env_dir
    # an install built with nvcc has its own cubins in site-packages too: count only these
    assert len([p for p in _gpu.cubins_found() if tmp_path in p.parents]) == 3


def test_kernel_source_found_beside_the_package():
    from sage_fast.regions import _gpu

    source = _gpu.find_kernel_source("knn_topk")
    assert source is not None and (source.parent / "knn_select.cuh").is_file()
    assert _gpu.find_kernel_source("no_such_kernel") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallbacks")
def test_without_a_gpu_cuda_plans_fall_back_and_report_why():
    from sage_fast.regions import _gpu, describe_backends

    ok, why = _gpu.fused_knn_available()
    assert not ok and why
    plan = plan_knn(1000, 64, 15, device="cuda")
    assert plan.path == "gemm" and "fused kernel unavailable" in plan.reason
    lines = describe_backends()
    assert any(line.startswith("cupy:") for line in lines)
    assert any(line.startswith("kNN on cpu:") for line in lines)
    with pytest.raises(ValueError, match="path='fused' cannot run here"):
        plan_knn(1000, 64, 15, device="cuda", path="fused")
    with pytest.raises(ValueError, match="needs d <= 128"):
        plan_knn(1000, 768, 15, device="cuda", path="fused")


def test_cuml_umap_gets_the_graph_and_brute_force_build(monkeypatch):
    """cuML's UMAP is given our kNN graph and build_algo="brute_force_knn" (so it never switches to
    NN-descent, which may stage the data on the host); checked with a stand-in cuML, without a GPU."""
    import sys
    import types

    from sage_fast.regions import _gpu
    from sage_fast.regions.analyzer import LossRegionAnalyzer

    seen = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def fit_transform(self, x, knn_graph=None):
            seen["graph"] = knn_graph
            return x[:, :2]

    manifold = types.ModuleType("cuml.manifold")
    manifold.UMAP = FakeUMAP
    cuml = types.ModuleType("cuml")
    cuml.manifold = manifold
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.manifold", manifold)
    fake_cupy = types.SimpleNamespace(float32=torch.float32, ascontiguousarray=lambda a, dtype: a.to(dtype).contiguous())
    monkeypatch.setattr(_gpu, "import_cupy", lambda: fake_cupy)
    monkeypatch.setattr(_gpu, "as_cupy", lambda t: t)
    monkeypatch.setattr(_gpu, "as_torch", lambda a: a)

    x = torch.randn(30, 5)
    analyzer = LossRegionAnalyzer(n_neighbors=4, random_state=0, umap_kwargs={"n_epochs": 10})
    analyzer.knn_distances_, analyzer.knn_indices_ = knn_graph(x, 4)
    indices, distances = analyzer._graph_with_self()
    reducer, embedding = analyzer._umap_cuml(x, indices, distances)
    assert seen["kwargs"]["build_algo"] == "brute_force_knn"
    assert seen["kwargs"]["n_neighbors"] == 4 and seen["kwargs"]["random_state"] == 0
    assert seen["graph"][0] is indices and seen["graph"][1] is distances
    assert embedding.shape == (30, 2)


# ---------------------------------------------------------------- low-precision candidate search


def clustered(n, d, *, clusters=8, spread=1.0, seed=0):
    """Points around a few centres, like pooled sentence embeddings: many near-equal distances."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 2
    return centres[torch.randint(0, clusters, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,d,k", [(300, 64, 15), (120, 384, 10), (120, 3, 5), (64, 17, 1)])
def test_low_precision_candidates_give_the_exact_graph(seed, precision, metric, n, d, k):
    x = clustered(n, d, seed=seed) + 5  # an offset that centring must remove
    stats = {}
    dist, idx = knn_graph(x, k, metric=metric, precision=precision, block_rows=64, stats=stats)
    assert stats["precision"] == precision and stats["path"] == "gemm"
    assert 0 <= stats["uncertified_rows"] <= n
    assert_matches_reference(x, k, metric, dist, idx)
    exact_d, exact_i = knn_graph(x, k, metric=metric, precision="fp32", block_rows=64)
    torch.testing.assert_close(dist, exact_d, rtol=1e-6, atol=1e-6)


def test_rows_that_fail_the_proof_are_recomputed(monkeypatch):
    # Too few candidates for bf16 on concentrated data: most rows cannot be proved and take the fp32
    # path; the graph must still be exact, and the count reported.
    monkeypatch.setattr(knn, "_candidates", lambda n, k, precision="fp32": min(n - 1, k + 1))
    x = clustered(400, 256, clusters=2, seed=1)
    stats = {}
    dist, idx = knn_graph(x, 10, precision="bf16", block_rows=128, stats=stats)
    assert stats["uncertified_rows"] > 100
    assert_matches_reference(x, 10, "euclidean", dist, idx)


def test_without_the_fallback_bf16_alone_would_be_wrong(monkeypatch):
    # The same setting with the recomputation disabled loses neighbours: the proof is what makes the
    # low-precision search exact, so this test shows it is not vacuous.
    monkeypatch.setattr(knn, "_candidates", lambda n, k, precision="fp32": min(n - 1, k + 1))
    # two tight clusters far apart: bf16 rounding of the centred rows (~2^-8 of their norm) swamps
    # the distances inside a cluster
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.full((1, 32), 50.0), torch.full((1, 32), -50.0)]).repeat_interleave(200, 0)
    x = x + 0.01 * torch.randn(400, 32, generator=g)
    exact_i = knn_graph(x, 10, precision="fp32")[1]
    assert torch.equal(knn_graph(x, 10, precision="bf16", block_rows=128)[1], exact_i)  # with the proof
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self: torch.empty(0, 1, dtype=torch.int64))
    idx = knn_graph(x, 10, precision="bf16", block_rows=128)[1]
    assert not torch.equal(idx, exact_i)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_gemm_estimate_error_stays_within_the_bound(precision):
    # the error model the proof rests on: |estimate - true squared distance| <= 2 u |c_i| max|c_j| + slack
    x = torch.cat([clustered(200, 96, seed=2), torch.randn(5, 96) * 40])  # a few far outliers
    centred = x - x.mean(dim=0)
    ops = knn._round_operand(centred, precision)
    sq = centred.norm(dim=1).square()
    estimate = sq[:, None] + sq[None, :] - 2 * ops @ ops.T
    truth = torch.cdist(x.double(), x.double()).square()
    u = knn._OPERAND_ERROR[precision] + 96 * 2.0**-23
    norms = sq.sqrt()
    bound = 2 * u * norms[:, None] * norms.max() + 2.0**-20 * (sq[:, None] + norms.max() ** 2)
    err = (estimate.double() - truth).abs()
    assert (err <= bound.double()).all()
    assert err.max() > 0.05 * bound.max()  # and it is not absurdly loose


def test_tf32_rounding_emulation():
    x = torch.tensor([1.0, 1.0 + 2.0**-10, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -3.0 - 2.0**-12, 0.0, 1e-30])
    out = knn._round_operand(x, "tf32")
    assert out.tolist()[:5] == [1.0, 1.0 + 2.0**-10, 1.0, 1.0 + 2 * 2.0**-10, -3.0]  # ties to even
    assert out[5] == 0 and out[6] != 0
    assert torch.equal(knn._round_operand(x, "bf16"), x.bfloat16().float())


def test_precision_is_checked_and_resolved():
    with pytest.raises(ValueError, match="precision must be one of"):
        knn_graph(torch.randn(5, 3), 2, precision="fp16")
    assert plan_knn(100, 8, 4).precision == "fp32"  # CPU: fp32 GEMM
    assert plan_knn(1000, 8, 4, precision="bf16").candidates == 4 + 32
    assert plan_knn(20, 8, 4, precision="bf16").candidates == 19  # never more than the other rows
    assert plan_knn(1000, 8, 15, precision="tf32").candidates == 15 + 16
    # CUDA: tensor cores for the wide embeddings, fp32 for narrow maps (planning touches no device)
    assert plan_knn(1000, 768, 15, device="cuda", path="gemm").precision == "tf32"
    assert plan_knn(1000, 2, 15, device="cuda", path="gemm").precision == "fp32"
    assert plan_knn(1000, 2, 15, device="cuda", path="gemm", precision="bf16").precision == "bf16"


@cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("n,d,k", [(1000, 64, 15), (2000, 384, 15), (513, 130, 8), (300, 2, 4)])
def test_cuda_tensor_core_candidates_give_the_exact_graph(seed, precision, metric, n, d, k):
    x = clustered(n, d, seed=seed).cuda() + 5
    stats = {}
    dist, idx = knn_graph(x, k, metric=metric, path="gemm", precision=precision, stats=stats)
    assert stats["precision"] == precision
    assert_matches_reference(x, k, metric, dist, idx, rtol=1e-4, atol=1e-4)
    exact_d, exact_i = knn_graph(x, k, metric=metric, path="gemm", precision="fp32")
    assert torch.equal(idx, exact_i) or torch.allclose(dist, exact_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("r,c,d,col0", [(37, 50, 5, 20), (64, 33, 40, 0), (1, 70, 130, 60)])
def test_tensor_core_tile_kernel_in_the_interpreter(precision, r, c, d, col0):
    # the Triton kernel the CUDA path uses for tf32 / bf16 tiles, run on CPU tensors by the interpreter
    # (tf32 runs as fp32 there; bf16 rounds its operands exactly as the tensor cores do)
    import os

    from sage_fast.regions import _knn_tile

    if not _knn_tile.available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton and TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
    torch.manual_seed(r + c)
    x = torch.randn(200, d) * 3
    centred = x - x.mean(dim=0)
    sq = centred.norm(dim=1).square()
    query_rows = torch.randperm(200)[:r].sort().values
    queries = centred[query_rows]
    out = torch.full((r, c), float("nan"))  # poisoned: every element must be written
    _knn_tile.sq_distance_tile(queries, sq[query_rows], query_rows, centred[col0:col0 + c], sq[col0:col0 + c], col0,
                               precision, out=out)
    truth = torch.cdist(x[query_rows].double(), x[col0:col0 + c].double()).square()
    own = query_rows[:, None] == torch.arange(col0, col0 + c)[None, :]
    assert torch.isinf(out[own]).all() and (out[own] > 0).all()
    assert torch.isfinite(out[~own]).all()
    u = knn._OPERAND_ERROR[precision] + d * 2.0**-23
    bound = 2 * u * sq[query_rows].sqrt()[:, None] * sq.sqrt().max() + 2.0**-20 * (sq[query_rows][:, None] + sq.max())
    assert ((out.double() - truth).abs()[~own] <= bound.double().expand(r, c)[~own]).all()
