import copy
import math

import pytest
import torch

from sage_fast.regions.analyzer import (
    LossRegionAnalyzer,
    NotFittedError,
    _anchor_probability,
    _approximate_knn,
    _map_knn,
    _quantile,
    _sample_beta,
    _sample_gamma,
)
from sage_fast.regions.knn import knn_graph, knn_graph_reference

pytest.importorskip("umap")

CLUSTER = 200
DIM = 32
K = 10


def planted(seed: int = 0):
    """Two well-separated clusters in d=32; the second has high loss."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(CLUSTER, DIM, generator=generator)
    high = torch.randn(CLUSTER, DIM, generator=generator) + 8.0
    embeddings = torch.cat([low, high])
    losses = torch.cat([0.2 * torch.rand(CLUSTER, generator=generator), 1.0 + torch.rand(CLUSTER, generator=generator)])
    return embeddings, losses


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def fitted(data):
    embeddings, losses = data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snapshot = (embeddings.clone(), losses.clone())
    analyzer = LossRegionAnalyzer(n_neighbors=K, quantile=0.8, random_state=0,
                                  umap_kwargs={"n_epochs": 200}).fit(embeddings.to(device), losses.to(device))
    assert torch.equal(embeddings, snapshot[0]) and torch.equal(losses, snapshot[1])
    return analyzer


def with_params(analyzer, **params):
    """A copy of a fitted analyzer with other sampling settings (no refit)."""
    clone = copy.copy(analyzer)
    for name, value in params.items():
        setattr(clone, name, value)
    return clone


def test_fitted_attributes(fitted, data):
    n = 2 * CLUSTER
    device = fitted.device_
    assert fitted.n_samples_ == n and fitted.knn_method_ == "exact"
    assert fitted.knn_indices_.shape == (n, K) and fitted.knn_indices_.dtype == torch.int64
    assert fitted.knn_distances_.shape == (n, K) and fitted.knn_distances_.dtype == torch.float32
    assert fitted.embedding_2d_.shape == (n, 2) and fitted.embedding_2d_.dtype == torch.float32
    for name in ("knn_indices_", "embedding_2d_", "map_knn_indices_", "region_score_", "threshold_"):
        assert getattr(fitted, name).device == device, name
    assert torch.isfinite(fitted.embedding_2d_).all()
    distances, indices = knn_graph(data[0].to(device), K)
    assert torch.equal(fitted.knn_indices_, indices)


def test_map_neighbours_are_exact_and_exclude_self(fitted):
    reference_distances, reference_indices = knn_graph_reference(fitted.embedding_2d_.cpu(), K)
    torch.testing.assert_close(fitted.map_knn_distances_.cpu().double(), reference_distances.double(), rtol=1e-4, atol=1e-5)
    own = torch.arange(fitted.n_samples_).unsqueeze(1)
    assert not (fitted.map_knn_indices_.cpu() == own).any()
    # Same neighbour sets (order may differ only among equal distances).
    assert (fitted.map_knn_indices_.cpu().sort(1).values == reference_indices.sort(1).values).float().mean() > 0.99


def test_region_score_and_threshold_match_float64_reference(fitted, data):
    losses = data[1].double()
    expected = losses[fitted.map_knn_indices_.cpu()].mean(dim=1)
    torch.testing.assert_close(fitted.region_score_.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    threshold = torch.quantile(expected, 0.8)
    assert abs(fitted.threshold_.item() - threshold.item()) < 1e-5


def test_anchors_come_from_the_high_loss_cluster(fitted):
    generator = torch.Generator(fitted.device_).manual_seed(0)
    anchors, partners, lam = fitted.sample_pairs(2000, generator)
    assert anchors.shape == partners.shape == lam.shape == (2000,)
    assert anchors.dtype == partners.dtype == torch.int64 and lam.dtype == torch.float32
    assert (anchors >= CLUSTER).float().mean() >= 0.8
    assert (fitted.region_score_[anchors] >= fitted.threshold_).all()
    # Each partner is one of its anchor's map neighbours.
    assert (fitted.map_knn_indices_[anchors] == partners.unsqueeze(1)).any(dim=1).all()
    assert (lam >= 0.2).all() and (lam <= 0.8).all()


def test_sampling_is_deterministic_with_a_seeded_generator(fitted):
    first = fitted.sample_pairs(64, torch.Generator(fitted.device_).manual_seed(5))
    second = fitted.sample_pairs(64, torch.Generator(fitted.device_).manual_seed(5))
    other = fitted.sample_pairs(64, torch.Generator(fitted.device_).manual_seed(6))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_anchor_probability_rises_with_score(fitted):
    probability = fitted.anchor_probability_
    score = fitted.region_score_
    assert torch.isclose(probability.sum(), torch.tensor(1.0, device=probability.device))
    assert (probability[score < fitted.threshold_] == 0).all()
    candidates = score >= fitted.threshold_
    ordered = probability[candidates][score[candidates].argsort()]
    assert (ordered.diff() >= -1e-9).all() and (ordered > 0).all()


def test_anchor_probability_of_equal_scores_is_uniform():
    probability = _anchor_probability(torch.full((6,), 2.0), torch.tensor(2.0))
    torch.testing.assert_close(probability, torch.full((6,), 1 / 6))


def test_uniform_pairs_draw_from_both_clusters(fitted):
    anchors, partners, lam = fitted.sample_uniform_pairs(2000, torch.Generator(fitted.device_).manual_seed(1))
    share = (anchors >= CLUSTER).float().mean().item()
    assert 0.4 < share < 0.6
    assert (fitted.map_knn_indices_[anchors] == partners.unsqueeze(1)).any(dim=1).all()
    assert (lam >= 0.2).all() and (lam <= 0.8).all()


def test_inverse_mode_returns_real_examples_near_the_anchor(fitted):
    inverse = with_params(fitted, mode="inverse")
    anchors, partners, lam = inverse.sample_pairs(24, torch.Generator(fitted.device_).manual_seed(2))
    assert partners.dtype == torch.int64 and partners.shape == (24,)
    assert ((partners >= 0) & (partners < fitted.n_samples_)).all()
    assert (partners != anchors).all()
    # The jitter is a fraction of a neighbour distance: partners stay in the anchor's cluster.
    assert ((partners >= CLUSTER) == (anchors >= CLUSTER)).float().mean() >= 0.9


def test_neighbour_inverse_lands_near_the_map_points(fitted):
    pooled = fitted._neighbour_inverse(fitted.embedding_2d_[:5])
    assert pooled.shape == (5, DIM)
    # Querying at a map point returns (nearly) that point's own pooled embedding.
    torch.testing.assert_close(pooled, fitted.embeddings_[:5], rtol=1e-3, atol=1e-3)
    between = fitted._neighbour_inverse((fitted.embedding_2d_[:1] + fitted.embedding_2d_[1:2]) / 2)
    own_cluster, other_cluster = fitted.embeddings_[:CLUSTER].mean(0), fitted.embeddings_[CLUSTER:].mean(0)
    assert (between - own_cluster).norm() < (between - other_cluster).norm()


@pytest.mark.parametrize("lam_range", [(0.3, 0.6), (0.5, 0.5), (0.0, 1.0)])
def test_beta_lam_stays_in_range_and_is_reproducible(fitted, lam_range):
    beta = with_params(fitted, lam_distribution="beta", lam_range=lam_range, beta_concentration=2.0)
    lam = beta._sample_lam(4000, torch.Generator(fitted.device_).manual_seed(3))
    again = beta._sample_lam(4000, torch.Generator(fitted.device_).manual_seed(3))
    assert torch.equal(lam, again)
    lo, hi = lam_range
    assert (lam >= lo).all() and (lam <= hi).all()
    assert abs(lam.mean().item() - (lo + hi) / 2) < 0.02


@pytest.mark.parametrize("shape", [0.5, 1.0, 2.0, 7.5])
def test_gamma_sampler_matches_moments(seed, shape):
    samples = _sample_gamma(shape, 40000, torch.Generator().manual_seed(seed), torch.device("cpu")).double()
    assert (samples > 0).all()
    # Mean and variance of Gamma(shape, 1) are both `shape`; 5 standard errors.
    assert abs(samples.mean().item() - shape) < 5 * math.sqrt(shape / 40000)
    assert abs(samples.var().item() - shape) < 0.1 * shape


def test_beta_sampler_matches_moments(seed):
    c = 3.0
    samples = _sample_beta(c, 40000, torch.Generator().manual_seed(seed), torch.device("cpu")).double()
    variance = 1 / (4 * (2 * c + 1))
    assert abs(samples.mean().item() - 0.5) < 5 * math.sqrt(variance / 40000)
    assert abs(samples.var().item() - variance) < 0.1 * variance


@pytest.mark.parametrize("n", [7, 11, 400])
def test_quantile_matches_torch(seed, n):
    values = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    for q in (0.01, 0.5, 0.8, 0.99):
        assert abs(_quantile(values, q).item() - torch.quantile(values, q).item()) < 1e-6


@pytest.mark.parametrize("n", [6, 31, 257])
def test_map_knn_matches_reference(seed, n):
    points = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    distances, indices = _map_knn(points, 5)
    reference_distances, reference_indices = knn_graph_reference(points, 5)
    torch.testing.assert_close(distances.double(), reference_distances.double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(indices, reference_indices)


class ExactNNDescent:
    """Stands in for pynndescent.NNDescent (whose numba compile takes minutes on two cores): the
    exact graph with the point itself included, as NN-descent returns it, except that in the first
    row the point itself comes second (as it may when a duplicate sits at distance 0)."""

    def __init__(self, data, n_neighbors, **kwargs):
        distances, indices = knn_graph(torch.from_numpy(data), n_neighbors - 1)
        own = torch.arange(data.shape[0]).unsqueeze(1)
        indices = torch.cat([own, indices], dim=1)
        distances = torch.cat([torch.zeros_like(distances[:, :1]), distances], dim=1)
        indices[0, :2] = indices[0, :2].flip(0)
        distances[0, :2] = distances[0, :2].flip(0)
        self.neighbor_graph = (indices.int().numpy(), distances.numpy())


def test_approximate_knn_drops_the_point_itself(data, monkeypatch):
    pynndescent = pytest.importorskip("pynndescent")
    monkeypatch.setattr(pynndescent, "NNDescent", ExactNNDescent)
    embeddings = data[0][::4].contiguous()
    distances, indices = _approximate_knn(embeddings, K, random_state=0)
    exact_distances, exact_indices = knn_graph(embeddings, K)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert torch.equal(indices, exact_indices)
    torch.testing.assert_close(distances, exact_distances)



@pytest.mark.slow  # pynndescent's numba compilation: 40-75 s on two CPU cores, about 1 s once compiled
def test_real_pynndescent_graph_is_close_to_exact(data):
    """The real NN-descent path (what ``knn="auto"`` takes on the CPU above 8,192 points), on a small
    planted set: the point itself is dropped, every reported distance is the true distance of the
    reported neighbour, rows are sorted, and the graph recovers nearly all exact neighbours."""
    pytest.importorskip("pynndescent")
    embeddings = data[0]
    n = embeddings.shape[0]
    distances, indices = _approximate_knn(embeddings, K, random_state=0)
    assert distances.shape == (n, K) and indices.shape == (n, K)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert not (indices == torch.arange(n).unsqueeze(1)).any()
    assert ((indices >= 0) & (indices < n)).all()
    assert (indices.sort(dim=1).values.diff(dim=1) != 0).all(), "a neighbour is listed twice"
    assert (distances.diff(dim=1) >= 0).all()
    true = (embeddings.double()[indices] - embeddings.double()[:, None, :]).norm(dim=2)
    torch.testing.assert_close(distances.double(), true, rtol=1e-5, atol=1e-5)
    _, exact = knn_graph(embeddings, K)
    recall = sum(len(set(a) & set(b)) for a, b in zip(indices.tolist(), exact.tolist())) / exact.numel()
    assert recall >= 0.95, f"NN-descent recall {recall:.3f} against the exact graph"
    # seeded: the same graph again
    again = _approximate_knn(embeddings, K, random_state=0)[1]
    assert torch.equal(indices, again)

def test_auto_knn_is_exact_on_small_inputs_and_on_cuda():
    analyzer = LossRegionAnalyzer()
    assert analyzer.knn_method(500, torch.device("cpu")) == "exact"
    assert analyzer.knn_method(10**6, torch.device("cpu")) == "approximate"
    assert analyzer.knn_method(10**6, torch.device("cuda")) == "exact"
    assert LossRegionAnalyzer(knn="exact").knn_method(10**6, torch.device("cpu")) == "exact"


def test_get_params_lists_the_constructor_arguments():
    params = LossRegionAnalyzer(n_neighbors=7, mode="inverse").get_params()
    assert params["n_neighbors"] == 7 and params["mode"] == "inverse" and "umap_kwargs" in params


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_neighbors": 1}, "n_neighbors"),
        ({"n_neighbors": 4.0}, "n_neighbors"),
        ({"n_components": 0}, "n_components"),
        ({"quantile": 0.0}, "quantile"),
        ({"quantile": 1.0}, "quantile"),
        ({"quantile": float("nan")}, "quantile"),
        ({"mode": "mixup"}, "mode"),
        ({"lam_range": (0.8, 0.2)}, "lam_range"),
        ({"lam_range": (-0.1, 0.5)}, "lam_range"),
        ({"lam_range": (0.5, 1.5)}, "lam_range"),
        ({"lam_range": 0.5}, "lam_range"),
        ({"lam_distribution": "normal"}, "lam_distribution"),
        ({"beta_concentration": 0.0}, "beta_concentration"),
        ({"inverse_jitter": -1.0}, "inverse_jitter"),
        ({"knn": "faiss"}, "knn"),
        ({"umap_kwargs": {"n_neighbors": 5}}, "umap_kwargs"),
        ({"umap_kwargs": [1]}, "umap_kwargs"),
        ({"random_state": 1.5}, "random_state"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossRegionAnalyzer(**kwargs)


@pytest.mark.parametrize(
    "n,d,loss_change,match",
    [
        (400, 32, "nan", "losses"),
        (400, 32, "inf", "losses"),
        (400, 32, "short", "losses"),
        (10, 32, None, "n_neighbors"),
        (11, 32, None, "at least"),
        (0, 32, None, "empty"),
        (400, 0, None, "column"),
    ],
)
def test_bad_fit_inputs_raise_before_any_work(n, d, loss_change, match):
    embeddings = torch.randn(n, d)
    losses = torch.rand(n)
    if loss_change == "nan":
        losses[3] = float("nan")
    elif loss_change == "inf":
        losses[3] = float("inf")
    elif loss_change == "short":
        losses = losses[:-1]
    with pytest.raises(ValueError, match=match):
        LossRegionAnalyzer(n_neighbors=10).fit(embeddings, losses)


def test_bad_fit_shapes_raise():
    analyzer = LossRegionAnalyzer(n_neighbors=10)
    with pytest.raises(ValueError, match="embeddings"):
        analyzer.fit(torch.randn(40), torch.rand(40))
    with pytest.raises(ValueError, match="losses"):
        analyzer.fit(torch.randn(40, 3), torch.rand(40, 1))
    with pytest.raises(ValueError, match="embeddings"):
        analyzer.fit(torch.randint(0, 3, (40, 3)), torch.rand(40))


def test_sampling_before_fit_raises_not_fitted():
    analyzer = LossRegionAnalyzer()
    for call in (lambda: analyzer.sample_pairs(4), lambda: analyzer.sample_uniform_pairs(4)):
        with pytest.raises(NotFittedError) as raised:
            call()
        assert isinstance(raised.value, ValueError) and isinstance(raised.value, AttributeError)


@pytest.mark.parametrize("m", [0, -3, 2.5, True])
def test_bad_sample_counts_raise(fitted, m):
    with pytest.raises(ValueError, match="m must be"):
        fitted.sample_pairs(m)
    with pytest.raises(ValueError, match="m must be"):
        fitted.sample_uniform_pairs(m)


def test_bad_generator_raises(fitted):
    with pytest.raises(ValueError, match="generator"):
        fitted.sample_pairs(4, generator=0)
    if fitted.device_.type == "cuda":
        with pytest.raises(ValueError, match="generator"):
            fitted.sample_pairs(4, generator=torch.Generator())


def test_inverse_transform_checks_points(fitted):
    with pytest.raises(ValueError, match="points"):
        fitted.inverse_transform(torch.zeros(3, 5))


def test_a_program_that_ends_during_the_warm_up_waits_for_it_and_exits_cleanly(tmp_path):
    """A daemon warm-up thread inside a torch call when the interpreter finalises aborts the process:
    a short run, or one that failed early with a clear message, then crashed at exit. The warm-up
    is waited for instead."""
    from exit_fixtures import assert_waited_and_exited_cleanly, busy_function, run_until_exit

    done = tmp_path / "warm-up finished"
    out = run_until_exit("from sage_fast.regions import analyzer\n" + busy_function("busy", done)
                         + "analyzer.warm_up = busy\nanalyzer.warm_up_in_background()\n")
    assert_waited_and_exited_cleanly(out, done)
