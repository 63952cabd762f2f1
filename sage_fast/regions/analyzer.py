"""Loss regions: where on the student's embedding map the loss is high, and anchor pairs there.

Given pooled embeddings ``e`` [N, d] and per-example losses ``l`` [N], ``fit`` does:

a. the kNN graph of ``e`` with ``k = n_neighbors`` (exact ``knn_graph``, or pynndescent's approximate
   graph on the CPU, see ``knn``), computed once;
b. UMAP of ``e`` to ``n_components`` dimensions from that graph (umap-learn ``precomputed_knn`` on the
   CPU, cuML ``knn_graph=`` on CUDA). Both expect the point itself as its first neighbour at distance
   0, so the graph passed is ``[i, j_1 .. j_{k-1}]``, exactly what a plain ``UMAP(n_neighbors=k)``
   would build;
c. the region score ``r_i = (1/k) sum_{j in M_k(i)} l_j`` where ``M_k(i)`` are i's ``k`` nearest
   neighbours in the map, i itself excluded: ``r`` describes the region around i, so one noisy loss
   does not make its own point an anchor;
d. ``threshold_`` = the ``quantile``-quantile of ``r`` (linear interpolation).

``sample_pairs`` draws anchors with replacement from ``{i : r_i >= threshold_}`` with probability
``p_i ∝ r_i - min_{candidates} r + eps`` (``eps`` = 1% of the candidates' score range, so the
weakest candidate still has a small chance and equal scores give a uniform draw). The partner is
uniform over the anchor's ``k`` map neighbours (mode ``"interpolate"``), or, in mode ``"inverse"``,
the real example nearest in the pooled space to ``inverse_transform(y_a + s z)``, ``z ~ N(0, I)``,
``s = inverse_jitter x`` the median map-neighbour distance, the anchor itself excluded.
``lam ~ U[lo, hi]`` or ``lo + (hi - lo) Beta(c, c)`` with ``c = beta_concentration``.
``sample_uniform_pairs`` is the random-region baseline: anchors uniform over all points.

On the CPU, numba compiles umap-learn's and pynndescent's functions on first use in a process
(about 7 s of a first fit of 1,000 points, against 1.5 s for the fit itself): the compilations are
kept on disk in the folder ``use_compilation_cache`` names (``NUMBA_CACHE_DIR``, unless set), so
later runs load them.

Everything stays on the fitting device. cuML has no ``inverse_transform``; there the inverse is
approximated on the device by the inverse-distance-weighted mean of the pooled embeddings of the
jittered point's ``k`` nearest map points. Losses must be finite (NaN or inf raise ``ValueError``
naming ``losses``): a NaN would silently poison the mean of every region it falls into.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import threading
import warnings

import numpy as np
import torch

from .. import _checks

MODES = ("interpolate", "inverse")
LAM_DISTRIBUTIONS = ("uniform", "beta")
KNN_METHODS = ("auto", "exact", "approximate")
#: From ``bench/test_bench_regions.py`` on CPU (d=384, k=15): at N=400 the exact torch graph took
#: 0.4x the time of pynndescent, at N=20000 pynndescent took 0.34x the time of the exact graph and the
#: whole round 0.8x. The crossover lies between; this threshold sits between the two sizes measured.
AUTO_APPROXIMATE_MIN_SAMPLES = 8192
#: Keys of ``umap_kwargs`` the analyzer sets itself.
RESERVED_UMAP_KWARGS = ("n_neighbors", "n_components", "metric", "precomputed_knn", "random_state")
# Query rows per block when searching the pooled space for inverse-mode partners (bounds memory).
_QUERY_BLOCK_ELEMENTS = 1 << 24


class NotFittedError(ValueError, AttributeError):
    """The analyzer was used before ``fit``."""


_CACHED_PACKAGES: set[str] = set()
_IMPORT_LOCK = threading.Lock()
_COMPILATION_CACHE: list[str | None] = [None]  # see use_compilation_cache


def use_compilation_cache(folder: str | os.PathLike) -> None:
    """Keep numba's compilations of umap-learn and pynndescent in ``folder`` (unless the user chose a
    place, ``NUMBA_CACHE_DIR``), so a later process loads them instead of compiling. The training
    driver and the Trainer integration pass ``<cache>/numba``; without a call nothing is cached."""
    _COMPILATION_CACHE[0] = str(folder)


def _numba_cache_dir() -> None:
    """Point numba's on-disk cache at the folder ``use_compilation_cache`` gave. Called before
    umap-learn or pynndescent is imported: their compiled functions are found by the directory
    numba's config holds when they are defined."""
    directory = _COMPILATION_CACHE[0]
    if os.environ.get("NUMBA_CACHE_DIR") or directory is None:
        return
    os.environ["NUMBA_CACHE_DIR"] = directory
    numba = sys.modules.get("numba")
    if numba is not None and not numba.config.CACHE_DIR:  # numba read the environment before we set it
        numba.config.CACHE_DIR = directory


def _cache_compilations(package: str) -> None:
    """Keep numba's compilations of ``package``'s functions on disk, so a later process loads them
    instead of compiling (umap-learn's functions are not marked ``cache=True``: its first fit in a
    process spends most of its time in numba's compiler). A function compiled under two sets of
    options (umap's serial and parallel layout epoch) shares one cache entry, so only its serial
    version is cached. Best effort: a numba without these internals compiles as before."""
    if package in _CACHED_PACKAGES:
        return
    _CACHED_PACKAGES.add(package)
    try:
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
    except ImportError:
        return
    versions: dict[object, list] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and getattr(value.py_func, "__module__", None) == name:
                versions.setdefault(value.py_func, [])
                if all(value is not other for other in versions[value.py_func]):
                    versions[value.py_func].append(value)
    for dispatchers in versions.values():
        serial = dispatchers if len(dispatchers) == 1 else [
            d for d in dispatchers if not d.targetoptions.get("parallel")]
        if len(serial) == 1 and isinstance(getattr(serial[0], "_cache", None), NullCache):
            try:
                serial[0].enable_caching()
            except Exception:  # a function numba cannot locate on disk (defined in a notebook, say)
                pass


@contextlib.contextmanager
def _keep_torch_threads():
    """Give the calling thread back the torch thread count it had. numba's OpenMP threading layer
    (umap-learn's and pynndescent's parallel functions) sets the OpenMP thread count of the thread
    that starts it to ``NUMBA_NUM_THREADS`` (all cores), and that count is torch's intra-op count in
    that thread: a training loop that asked for one thread (``OMP_NUM_THREADS=1``,
    ``torch.set_num_threads``) went on with all of them after its first round, with other numerics
    and a busy machine, and which thread started numba first decided it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _import_umap():
    with _IMPORT_LOCK:  # a warm-up thread and a round's worker may both get here: cache before any compile
        _numba_cache_dir()
        try:
            import umap
        except ImportError as error:
            raise ImportError(
                "the loss-region analysis on the CPU needs umap-learn: pip install 'sage-fast[analysis]'"
            ) from error
        _cache_compilations("umap")
    return umap


def warm_up() -> None:
    """Import umap-learn and have numba compile its functions (or load them from the disk cache)
    with a fit on a few random points, so that the first real round does not pay for it. Touches no
    random stream but its own."""
    g = torch.Generator().manual_seed(0)
    LossRegionAnalyzer(n_neighbors=5, random_state=0).fit(torch.randn(64, 8, generator=g), torch.rand(64, generator=g))


def warm_up_in_background() -> threading.Thread:
    """``warm_up`` on a thread, started now (a training driver calls it before loading its models,
    so a first run compiles while the teacher is prepared). Failures are left to the first real
    round, which reports them (umap-learn missing, say).

    Not a daemon: the interpreter waits for it at exit. A daemon thread that is inside a torch call
    when the interpreter finalises is ended there, and that aborts the whole process ("terminate
    called without an active exception"), turning a run that finished into a crash."""
    def run() -> None:
        try:
            warm_up()
        except Exception:  # noqa: BLE001 - the real round raises the same error with its message
            pass

    thread = threading.Thread(target=run, name="sage-fast analysis warm-up", daemon=False)
    thread.start()
    return thread


class LossRegionAnalyzer:
    """Find high-loss regions of the student's embedding map and draw anchor/partner pairs there.

    scikit-learn style: the constructor only stores and checks its arguments, ``fit`` sets the
    attributes ending in ``_``. See the module docstring for the math.
    """

    def __init__(self, n_neighbors: int = 15, n_components: int = 2, quantile: float = 0.8,
                 mode: str = "interpolate", lam_range: tuple[float, float] = (0.2, 0.8),
                 lam_distribution: str = "uniform", beta_concentration: float = 2.0,
                 inverse_jitter: float = 0.5, knn: str = "auto", umap_kwargs: dict | None = None,
                 random_state: int | None = None, device: torch.device | str | None = None):
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 2:
            raise ValueError(f"n_neighbors must be an int >= 2, got {n_neighbors!r}")
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        _checks.in_range("quantile", quantile, 0.0, 1.0, lo_open=True, hi_open=True)
        _checks.choice("mode", mode, MODES)
        try:
            lam_lo, lam_hi = (float(v) for v in lam_range)
        except (TypeError, ValueError):
            raise ValueError(f"lam_range must be a pair (lo, hi) of numbers, got {lam_range!r}") from None
        if not (0.0 <= lam_lo <= lam_hi <= 1.0):
            raise ValueError(f"lam_range must satisfy 0 <= lo <= hi <= 1, got {lam_range!r}")
        _checks.choice("lam_distribution", lam_distribution, LAM_DISTRIBUTIONS)
        _checks.in_range("beta_concentration", beta_concentration, 0.0, math.inf, lo_open=True, hi_open=True)
        _checks.in_range("inverse_jitter", inverse_jitter, 0.0, math.inf, hi_open=True)
        _checks.choice("knn", knn, KNN_METHODS)
        if umap_kwargs is not None:
            if not isinstance(umap_kwargs, dict):
                raise ValueError(f"umap_kwargs must be a dict or None, got {type(umap_kwargs).__name__}")
            clash = sorted(set(umap_kwargs) & set(RESERVED_UMAP_KWARGS))
            if clash:
                raise ValueError(f"umap_kwargs must not set {clash}: the analyzer sets them from its own arguments")
        if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int)):
            raise ValueError(f"random_state must be an int or None, got {random_state!r}")
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.quantile = float(quantile)
        self.mode = mode
        self.lam_range = (lam_lo, lam_hi)
        self.lam_distribution = lam_distribution
        self.beta_concentration = float(beta_concentration)
        self.inverse_jitter = float(inverse_jitter)
        self.knn = knn
        self.umap_kwargs = umap_kwargs
        self.random_state = random_state
        self.device = None if device is None else torch.device(device)

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters if name != "self"}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"LossRegionAnalyzer({params})"

    # ----------------------------------------------------------------------------------- fitting
    def knn_method(self, n_samples: int, device: torch.device) -> str:
        """``"exact"`` or ``"approximate"`` for ``n_samples`` points on ``device``."""
        if self.knn != "auto":
            return self.knn
        if device.type == "cpu" and n_samples >= AUTO_APPROXIMATE_MIN_SAMPLES:
            return "approximate"
        return "exact"

    def _check_fit_inputs(self, embeddings, losses) -> None:
        _checks.tensor("embeddings", embeddings, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.tensor("losses", losses, ndim=1, dtypes=_checks.FLOAT_DTYPES)
        _checks.non_empty("embeddings", embeddings)
        if embeddings.shape[1] == 0:
            raise ValueError("embeddings must have at least one column")
        n = embeddings.shape[0]
        if losses.shape[0] != n:
            raise ValueError(f"losses must have one value per row of embeddings: got {losses.shape[0]} and {n}")
        if self.n_neighbors >= n:
            raise ValueError(f"n_neighbors ({self.n_neighbors}) must be smaller than the number of points ({n})")
        minimum = max(self.n_neighbors + 2, 5)
        if n < minimum:
            raise ValueError(f"UMAP needs at least max(n_neighbors + 2, 5) = {minimum} points, got {n}")
        _checks.finite("losses", losses)
        _checks.finite("embeddings", embeddings)

    def fit(self, embeddings: torch.Tensor, losses: torch.Tensor) -> "LossRegionAnalyzer":
        """Fit on pooled embeddings [N, d] and losses [N] (any float dtype; not modified)."""
        self._check_fit_inputs(embeddings, losses)
        with _keep_torch_threads():
            return self._fit(embeddings, losses)

    def _fit(self, embeddings: torch.Tensor, losses: torch.Tensor) -> "LossRegionAnalyzer":
        device = self.device or embeddings.device
        x = embeddings.detach().to(device=device, dtype=torch.float32).contiguous()
        loss = losses.detach().to(device=device, dtype=torch.float32)
        n, k = x.shape[0], self.n_neighbors

        self.knn_method_ = self.knn_method(n, device)
        if self.knn_method_ == "approximate":
            self.knn_distances_, self.knn_indices_ = _approximate_knn(x, k, self.random_state)
        else:
            from .knn import knn_graph

            self.knn_distances_, self.knn_indices_ = knn_graph(x, k)

        self.umap_, self.embedding_2d_ = self._umap(x)
        self.map_knn_distances_, self.map_knn_indices_ = _map_knn(self.embedding_2d_, k)
        self.region_score_ = loss[self.map_knn_indices_].mean(dim=1)
        self.threshold_ = _quantile(self.region_score_, self.quantile)
        self.anchor_probability_ = _anchor_probability(self.region_score_, self.threshold_)
        self.median_map_distance_ = self.map_knn_distances_.median()
        self.embeddings_ = x
        self.losses_ = loss
        self.n_samples_ = n
        self.device_ = device
        return self

    def _umap_arguments(self) -> dict:
        arguments = dict(self.umap_kwargs or {})
        arguments.update(n_neighbors=self.n_neighbors, n_components=self.n_components, random_state=self.random_state)
        return arguments

    def _graph_with_self(self):
        """The kNN graph in the layout UMAP wants: the point itself first, at distance 0."""
        n, k = self.knn_indices_.shape[0], self.n_neighbors
        own = torch.arange(n, device=self.knn_indices_.device).unsqueeze(1)
        indices = torch.cat([own, self.knn_indices_[:, : k - 1]], dim=1).contiguous()
        distances = torch.cat([torch.zeros_like(self.knn_distances_[:, :1]), self.knn_distances_[:, : k - 1]], dim=1)
        return indices, distances.contiguous()

    def _umap(self, x: torch.Tensor):
        indices, distances = self._graph_with_self()
        if x.device.type == "cuda":
            fitted = self._umap_cuml(x, indices, distances)
            if fitted is not None:
                return fitted
        umap = _import_umap()
        reducer = umap.UMAP(precomputed_knn=(indices.cpu().numpy(), distances.cpu().numpy()),
                            **self._umap_arguments())
        with warnings.catch_warnings():
            # Without a search index umap-learn cannot transform new points; the analysis never does.
            warnings.filterwarnings("ignore", message=r".*knn_search_index.*")
            warnings.filterwarnings("ignore", message=r".*n_jobs value .* overridden.*")
            embedding = reducer.fit_transform(x.cpu().numpy())
        return reducer, torch.from_numpy(np.ascontiguousarray(embedding, dtype=np.float32)).to(x.device)

    def _umap_cuml(self, x, indices, distances):
        try:
            from cuml.manifold import UMAP
        except ImportError:
            warnings.warn(
                "cuML is not installed, so UMAP runs on the host with umap-learn (the embeddings and the kNN "
                "graph are copied to host memory and back); for UMAP on the GPU: pip install 'sage-fast[gpu]'",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        from . import _gpu

        cupy = _gpu.import_cupy()
        # build_algo="brute_force_knn": "auto" picks NN-descent above 50,000 rows when no random_state is
        # set, whose builds may stage the data in host memory and are not deterministic. The kNN graph is
        # given, so brute force costs nothing here and keeps everything on the device.
        reducer = UMAP(output_type="cupy", **{"build_algo": "brute_force_knn", **self._umap_arguments()})
        # cuML takes (indices, distances) with the point itself first, like umap-learn.
        graph = (_gpu.as_cupy(indices), _gpu.as_cupy(distances))
        with _gpu.cuda_errors_explained("cuML UMAP"):
            embedding = reducer.fit_transform(_gpu.as_cupy(x), knn_graph=graph)
        return reducer, _gpu.as_torch(cupy.ascontiguousarray(embedding, dtype=cupy.float32))

    # ---------------------------------------------------------------------------------- sampling
    def _check_fitted(self) -> None:
        if not hasattr(self, "region_score_"):
            raise NotFittedError("this LossRegionAnalyzer is not fitted yet: call fit(embeddings, losses) first")

    def _check_sample_arguments(self, m, generator) -> None:
        self._check_fitted()
        if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
            raise ValueError(f"m must be a positive int, got {m!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != self.device_.type:
                raise ValueError(
                    f"generator must live on the fitting device ({self.device_.type}), got one on {generator.device.type}"
                )

    def sample_pairs(self, m: int, generator: torch.Generator | None = None):
        """``m`` (anchor, partner, lam) triples from the high-loss regions:
        ``anchors`` int64 [m], ``partners`` int64 [m], ``lam`` float32 [m], on the fitting device."""
        self._check_sample_arguments(m, generator)
        anchors = torch.multinomial(self.anchor_probability_, m, replacement=True, generator=generator)
        if self.mode == "inverse":
            partners = self._inverse_partners(anchors, generator)
        else:
            partners = self._map_neighbour(anchors, generator)
        return anchors, partners, self._sample_lam(m, generator)

    def sample_uniform_pairs(self, m: int, generator: torch.Generator | None = None):
        """The random-region baseline: anchors uniform over all points, partners among their map
        neighbours, ``lam`` as in ``sample_pairs``."""
        self._check_sample_arguments(m, generator)
        anchors = torch.randint(0, self.n_samples_, (m,), generator=generator, device=self.device_)
        return anchors, self._map_neighbour(anchors, generator), self._sample_lam(m, generator)

    def _map_neighbour(self, anchors, generator):
        column = torch.randint(0, self.n_neighbors, anchors.shape, generator=generator, device=self.device_)
        return self.map_knn_indices_[anchors, column]

    def _sample_lam(self, m, generator):
        lo, hi = self.lam_range
        if self.lam_distribution == "beta":
            unit = _sample_beta(self.beta_concentration, m, generator, self.device_)
        else:
            unit = torch.rand(m, generator=generator, device=self.device_)
        return (lo + (hi - lo) * unit).clamp_(lo, hi)

    def _inverse_partners(self, anchors, generator):
        scale = self.inverse_jitter * self.median_map_distance_
        jitter = torch.randn(anchors.shape[0], self.embedding_2d_.shape[1], generator=generator, device=self.device_)
        points = self.embedding_2d_[anchors] + scale * jitter
        pooled = self.inverse_transform(points)
        return _nearest_rows(pooled, self.embeddings_, exclude=anchors)

    def inverse_transform(self, points: torch.Tensor) -> torch.Tensor:
        """Map points of the 2-D map back to the pooled space ([M, n_components] -> [M, d])."""
        self._check_fitted()
        _checks.tensor("points", points, ndim=2, dtypes=_checks.FLOAT_DTYPES)
        if points.shape[1] != self.embedding_2d_.shape[1]:
            raise ValueError(f"points must have {self.embedding_2d_.shape[1]} columns, got {points.shape[1]}")
        inverse = getattr(self.umap_, "inverse_transform", None)
        if inverse is None or not type(self.umap_).__module__.startswith("umap"):
            return self._neighbour_inverse(points.to(self.device_, torch.float32))
        with _keep_torch_threads():
            pooled = inverse(points.detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)).to(self.device_)

    def _neighbour_inverse(self, points):
        """Inverse-distance-weighted mean of the pooled embeddings of each point's k nearest map points."""
        distances, neighbours = _nearest_rows(points, self.embedding_2d_, k=self.n_neighbors)
        weights = 1.0 / (distances + 1e-6 * self.median_map_distance_ + 1e-12)
        weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.einsum("mk,mkd->md", weights, self.embeddings_[neighbours])


# --------------------------------------------------------------------------------------- helpers
def _approximate_knn(x: torch.Tensor, k: int, random_state: int | None):
    """pynndescent's approximate kNN graph (self excluded), in ``knn_graph``'s layout."""
    _numba_cache_dir()
    try:
        from pynndescent import NNDescent
    except ImportError as error:
        raise ImportError("knn='approximate' needs pynndescent: pip install 'sage-fast[analysis]'") from error
    index = NNDescent(x.cpu().numpy(), n_neighbors=k + 1, metric="euclidean", random_state=random_state,
                      low_memory=True, compressed=True)
    indices, distances = (torch.from_numpy(np.ascontiguousarray(a)) for a in index.neighbor_graph)
    if bool((indices < 0).any()):
        raise RuntimeError("pynndescent left some neighbour lists incomplete; use knn='exact'")
    # Drop the point itself wherever it appears (usually first); a row without it drops its farthest.
    is_self = indices == torch.arange(indices.shape[0]).unsqueeze(1)
    order = torch.sort(torch.where(is_self, math.inf, distances.double()), dim=1, stable=True).indices[:, :k]
    distances = distances.gather(1, order).float()
    indices = indices.gather(1, order).long()
    return distances.to(x.device), indices.to(x.device)


def _map_knn(embedding_2d: torch.Tensor, k: int):
    """Exact kNN in the low-dimensional map. A k-d tree on the CPU (O(N log N), exact); the tiled
    ``knn_graph`` on CUDA."""
    if embedding_2d.device.type == "cpu" and embedding_2d.shape[1] <= 3:
        from scipy.spatial import cKDTree

        points = embedding_2d.numpy().astype(np.float64)
        distances, indices = cKDTree(points).query(points, k=k + 1)
        distances, indices = torch.from_numpy(distances), torch.from_numpy(indices)
        is_self = indices == torch.arange(indices.shape[0]).unsqueeze(1)
        order = torch.sort(torch.where(is_self, -1.0, distances), dim=1, stable=True).indices[:, 1:]
        return distances.gather(1, order).float(), indices.gather(1, order).long()
    from .knn import knn_graph

    return knn_graph(embedding_2d, k)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile with linear interpolation (``torch.quantile``'s default), any length."""
    ordered = values.sort().values
    position = q * (values.shape[0] - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, values.shape[0] - 1)
    return ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])


def _anchor_probability(score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    candidate = score >= threshold
    if not bool(candidate.any()):  # rounding in the interpolation; the maximum always qualifies
        candidate = score == score.max()
    low = torch.where(candidate, score, math.inf).min()
    high = torch.where(candidate, score, -math.inf).max()
    eps = 0.01 * (high - low) + 1e-12
    weights = torch.where(candidate, score - low + eps, 0.0)
    return weights / weights.sum()


def _nearest_rows(queries: torch.Tensor, rows: torch.Tensor, *, k: int = 1, exclude: torch.Tensor | None = None):
    """Exact nearest ``rows`` of each query in blocks of queries. ``k == 1`` returns the indices
    [M] (``exclude`` [M] removes one row per query); otherwise ``(distances, indices)`` [M, k]."""
    rows = rows.float()
    row_sq = (rows * rows).sum(dim=1)
    block = max(1, _QUERY_BLOCK_ELEMENTS // rows.shape[0])
    distances, indices = [], []
    for start in range(0, queries.shape[0], block):
        query = queries[start : start + block].float()
        squared = (query * query).sum(dim=1, keepdim=True) + row_sq - 2.0 * query @ rows.T
        if exclude is not None:
            squared[torch.arange(query.shape[0], device=query.device), exclude[start : start + block]] = math.inf
        top = torch.topk(squared, k, dim=1, largest=False)
        distances.append(top.values.clamp_min(0).sqrt())
        indices.append(top.indices)
    if k == 1:
        return torch.cat(indices).squeeze(1)
    return torch.cat(distances), torch.cat(indices)


def _sample_gamma(shape: float, m: int, generator, device, tries: int = 8) -> torch.Tensor:
    """Gamma(shape, 1) by Marsaglia and Tsang's squeeze method, vectorised with a fixed number of
    tries per sample (each accepted with probability > 0.95, so all ``tries`` fail with probability
    below 1e-10; such a sample takes the mode-like value ``d``). Shapes below 1 use
    ``Gamma(a) = Gamma(a + 1) U^(1/a)``. Uses only ``generator``, so it is reproducible."""
    boosted = shape < 1.0
    a = shape + 1.0 if boosted else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(tries, m, generator=generator, device=device)
    u = torch.rand(tries, m, generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    accepted = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
    first = accepted.float().argmax(dim=0, keepdim=True)
    samples = (d * v).gather(0, first).squeeze(0)
    samples = torch.where(accepted.any(dim=0), samples, torch.full_like(samples, d))
    if boosted:
        samples = samples * torch.rand(m, generator=generator, device=device).clamp_min(1e-30) ** (1.0 / shape)
    return samples


def _sample_beta(concentration: float, m: int, generator, device) -> torch.Tensor:
    """Beta(c, c) as G1 / (G1 + G2) with independent Gamma(c) draws."""
    first = _sample_gamma(concentration, m, generator, device)
    second = _sample_gamma(concentration, m, generator, device)
    return first / (first + second).clamp_min(1e-30)
