"""Exact kNN graph against its peers, k=15 neighbours, self excluded.

CPU (N=20000, d=384): ``knn_graph`` (tiled GEMM + top-k + exact re-ranking) against pynndescent's
``NNDescent`` (the approximate search umap-learn runs; its recall against the exact graph is
recorded) and scikit-learn's brute-force ``NearestNeighbors``. Baseline: pynndescent.

CUDA (N=67k and 105k, the sizes of the SST-2 / QNLI training sets; d=2, the loss map, first: the
case the fused kernel serves; d=768 pooled embeddings; d=64 where the fused kernel also applies): the
GEMM path with its candidate search in fp32, TF32 and bf16 (the rows the low-precision search could
not prove and recomputed in fp32 are recorded as ``uncertified_rows``), the fused distance + select
kernel, and ``torch.cdist`` + ``topk`` over the full N x N matrix (the baseline; not at 105k, where
that matrix alone is 44 GB and its time would be most of the suite's).
Flops: ``2 N^2 d`` for the distances (the selection is extra).
"""
import pytest
import torch
from harness import DEVICE, measure, scaled

from sage_fast.regions import knn
from sage_fast.regions.knn import knn_graph

K = 15
if DEVICE.type == "cuda":
    CASES = [(scaled(67_349), 2), (scaled(67_349), 768), (scaled(104_743), 768), (scaled(67_349), 64)]
else:  # d=2 too, so that the GPU check's selections by dimension name cases here as well
    CASES = [(scaled(20_000), 2), (scaled(20_000), 384)]
#: Above this many points the fp32 cdist baseline is left out (its N x N matrix dominates the suite).
CDIST_MAX_POINTS = 100_000


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"N{c[0]}_d{c[1]}")
def points(request):
    n, d = request.param
    torch.manual_seed(0)
    # clustered, like pooled sentence embeddings, rather than uniform noise
    centres = torch.randn(64, d) * 2
    x = centres[torch.randint(0, 64, (n,))] + torch.randn(n, d)
    return x.to(DEVICE)


def cdist_topk(x, k):
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    return dist.topk(k, dim=1, largest=False)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist()))
    return hits / exact.numel()


IMPLS = (["sage_fast", "sklearn_brute", "pynndescent"] if DEVICE.type == "cpu"
         else ["cdist_topk", "gemm", "gemm_tf32", "gemm_bf16", "fused"])
PRECISION = {"gemm": "fp32", "gemm_tf32": "tf32", "gemm_bf16": "bf16"}


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_graph(benchmark, points, impl):
    x = points
    n, d = x.shape
    group = f"knn N={n} d={d} k={K} {DEVICE.type}"
    flops = 2.0 * n * n * d
    extra = {}

    if impl == "sage_fast":
        def fn():
            return knn_graph(x, K)
    elif impl == "fused":
        if not knn.fused_kernel_applies(n, d, K):
            pytest.skip(f"the fused kernel needs d <= {knn.FUSED_MAX_DIM}")
        from sage_fast.regions import _gpu

        if not _gpu.fused_knn_loadable()[0]:
            pytest.skip(_gpu.fused_knn_loadable()[1])

        def fn():
            return knn_graph(x, K, path="fused")
    elif impl in PRECISION:
        stats = {}
        knn_graph(x, K, path="gemm", precision=PRECISION[impl], stats=stats)
        if stats.get("uncertified_rows") is not None:
            extra["uncertified_rows"] = stats["uncertified_rows"]

        def fn():
            return knn_graph(x, K, path="gemm", precision=PRECISION[impl])
    elif impl == "cdist_topk":
        if n > CDIST_MAX_POINTS:
            pytest.skip(f"no fp32 cdist above {CDIST_MAX_POINTS} points: its N x N matrix alone is {4 * n * n / 1e9:.0f} GB")

        def fn():
            return cdist_topk(x, K)
    elif impl == "pynndescent":
        pynndescent = pytest.importorskip("pynndescent")
        data = x.numpy()

        def fn():
            # k + 1 because NN-descent lists the point itself first; umap-learn's own settings otherwise
            index = pynndescent.NNDescent(data, n_neighbors=K + 1, metric="euclidean", random_state=0,
                                          low_memory=True, n_jobs=-1, compressed=True)
            return index.neighbor_graph

        found = fn()[0][:, 1:]
        extra["recall"] = recall(torch.from_numpy(found.astype("int64")), knn_graph(x, K)[1])
    elif impl == "sklearn_brute":
        neighbors = pytest.importorskip("sklearn.neighbors")
        data = x.numpy()

        def fn():
            nn = neighbors.NearestNeighbors(n_neighbors=K + 1, algorithm="brute", metric="euclidean", n_jobs=-1)
            return nn.fit(data).kneighbors(data)

    measure(benchmark, group, impl, fn, flops=flops, baseline=impl in ("pynndescent", "cdist_topk"),
            memory=impl not in ("pynndescent", "sklearn_brute"), **extra)
