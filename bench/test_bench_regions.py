"""One loss-region analysis round, stage by stage and whole, against a bare umap-learn fit.

CPU, N=20000 pooled embeddings of d=384, k=15 (``SAGE_FAST_BENCH_SCALE`` scales N; each UMAP fit
takes seconds, so ``SAGE_FAST_BENCH_REPS=1`` or 3 is the sensible setting here).

- stages: the kNN graph (exact ``knn_graph`` / pynndescent, with its recall), UMAP fed with each
  graph, the map kNN + region scores (k-d tree, and the tiled ``knn_graph`` on the 2-D map for
  comparison), and drawing 4096 pairs;
- rounds: ``LossRegionAnalyzer.fit`` + ``sample_pairs`` with ``knn="exact"`` / ``"approximate"``
  against ``umap.UMAP(n_neighbors=15).fit(X)`` with its own NN-descent (the baseline). Target: a
  round within 1.2x of the baseline.

No ``random_state`` anywhere: umap-learn runs single-threaded when one is set, which would skew the
comparison.

CUDA: the same rounds with ``knn="exact"`` (cuML UMAP when installed, otherwise umap-learn on host).
"""
import pytest
import torch
from harness import DEVICE, measure, scaled

from sage_fast.regions import analyzer as analyzer_module
from sage_fast.regions.analyzer import LossRegionAnalyzer
from sage_fast.regions.knn import knn_graph

pytest.importorskip("umap")

K = 15
N = scaled(20_000, minimum=200)
DIM = 384
PAIRS = 4096


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    # clustered, like pooled sentence embeddings; each cluster has its own loss level
    centres = torch.randn(64, DIM) * 2
    cluster = torch.randint(0, 64, (N,))
    x = centres[cluster] + torch.randn(N, DIM)
    losses = torch.rand(64)[cluster] + 0.1 * torch.rand(N)
    return x.to(DEVICE), losses.to(DEVICE)


@pytest.fixture(scope="module")
def graphs(data):
    x = data[0]
    exact = knn_graph(x, K)
    graphs = {"exact": exact}
    if DEVICE.type == "cpu":
        graphs["approximate"] = analyzer_module._approximate_knn(x, K, None)
    return graphs


@pytest.fixture(scope="module")
def fitted(data):
    return LossRegionAnalyzer(n_neighbors=K, knn="exact").fit(*data)


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return (found.unsqueeze(2) == exact.unsqueeze(1)).any(dim=2).float().mean().item()


GROUP = f"regions stages N={N} d={DIM} {DEVICE.type}"
STAGES = ["knn_exact", "umap_exact_graph", "map_knn_scoring", "map_knn_torch", "sample_pairs"]
if DEVICE.type == "cpu":
    STAGES[1:1] = ["knn_approximate", "umap_approx_graph"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage(benchmark, data, graphs, fitted, stage):
    x, losses = data
    extra = {}
    if stage == "knn_exact":
        fn = lambda: knn_graph(x, K)  # noqa: E731
    elif stage == "knn_approximate":
        fn = lambda: analyzer_module._approximate_knn(x, K, None)  # noqa: E731
        extra["recall"] = recall(graphs["approximate"][1], graphs["exact"][1])
    elif stage.startswith("umap"):
        graph = graphs["approximate" if stage == "umap_approx_graph" else "exact"]
        stage_analyzer = LossRegionAnalyzer(n_neighbors=K)
        stage_analyzer.knn_distances_, stage_analyzer.knn_indices_ = graph
        fn = lambda: stage_analyzer._umap(x)  # noqa: E731
    elif stage == "map_knn_scoring":
        def fn():
            _, neighbours = analyzer_module._map_knn(fitted.embedding_2d_, K)
            score = losses[neighbours].mean(dim=1)
            return analyzer_module._anchor_probability(score, analyzer_module._quantile(score, 0.8))
    elif stage == "map_knn_torch":
        fn = lambda: knn_graph(fitted.embedding_2d_, K)  # noqa: E731
    else:
        generator = torch.Generator(DEVICE).manual_seed(0)
        fn = lambda: fitted.sample_pairs(PAIRS, generator)  # noqa: E731
    measure(benchmark, GROUP, stage, fn, baseline=stage == "knn_exact", memory=False, **extra)


ROUNDS = ["umap_learn_bare", "round_exact"] + (["round_approximate"] if DEVICE.type == "cpu" else [])


@pytest.mark.parametrize("impl", ROUNDS)
def test_round(benchmark, data, impl):
    x, losses = data
    if impl == "umap_learn_bare":
        import umap

        x_host = x.cpu().numpy()
        fn = lambda: umap.UMAP(n_neighbors=K).fit(x_host)  # noqa: E731
    else:
        knn = impl.removeprefix("round_")

        def fn():
            analyzer = LossRegionAnalyzer(n_neighbors=K, knn=knn).fit(x, losses)
            return analyzer.sample_pairs(PAIRS)
    measure(benchmark, f"regions round N={N} d={DIM} {DEVICE.type}", impl, fn, baseline=impl == "umap_learn_bare",
            memory=False)
