"""The loss map: a fitted ``LossRegionAnalyzer``'s 2-D map coloured by region score, as a PNG.

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly, so it works without a display
and never touches pyplot's global backend. The image is ``figsize x dpi`` pixels exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("the loss map needs matplotlib: pip install 'sage-fast[analysis]'") from error
    return Figure, FigureCanvasAgg


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def synthetic_positions(embedding_2d, anchors, partners, lam) -> np.ndarray:
    """Where synthetic examples sit on the map: ``lam * y_anchor + (1 - lam) * y_partner`` (the same
    weights the synthesis gives the anchor's and the partner's vectors)."""
    points = _numpy(embedding_2d)
    anchors, partners, lam = _numpy(anchors).astype(np.int64), _numpy(partners).astype(np.int64), _numpy(lam)
    if not (anchors.shape == partners.shape == lam.shape and anchors.ndim == 1):
        raise ValueError(
            "synthetic must be (anchors, partners, lam), three 1-D arrays of one length, got shapes "
            f"{anchors.shape}, {partners.shape}, {lam.shape}"
        )
    n = points.shape[0]
    for name, index in (("anchors", anchors), ("partners", partners)):
        if index.size and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"synthetic {name} must lie in [0, {n}), got values in [{index.min()}, {index.max()}]")
    weight = lam.astype(np.float64)[:, None]
    return weight * points[anchors] + (1.0 - weight) * points[partners]


def loss_map(analyzer, path, synthetic=None, *, anchors=None, title: str | None = None,
             figsize: tuple[float, float] = (7.0, 5.5), dpi: int = 100) -> Path:
    """Write the loss map of a fitted ``analyzer`` to ``path`` (PNG) and return the path.

    ``synthetic``: ``None``; an ``(anchors, partners, lam)`` triple as returned by
    ``sample_pairs`` (placed with ``synthetic_positions``); or an ``[M, 2]`` array of map positions.
    ``anchors``: indices of points to mark (for example the anchors drawn). A line with N, k and the
    quantile always ends the title; ``title``, if given, goes above it.
    """
    from ..regions.analyzer import NotFittedError

    if not hasattr(analyzer, "region_score_"):
        raise NotFittedError("loss_map needs a fitted LossRegionAnalyzer: call fit(embeddings, losses) first")
    points = _numpy(analyzer.embedding_2d_).astype(np.float64)
    if points.ndim != 2 or points.shape[1] < 2:
        raise ValueError(f"the analyzer's map must have at least 2 components to plot, got shape {points.shape}")
    score = _numpy(analyzer.region_score_).astype(np.float64)
    n = points.shape[0]

    synthetic_xy = None
    if synthetic is not None:
        if isinstance(synthetic, (tuple, list)) and len(synthetic) == 3:
            synthetic_xy = synthetic_positions(points[:, :2], *synthetic)
        else:
            synthetic_xy = _numpy(synthetic).astype(np.float64)
            if synthetic_xy.ndim != 2 or synthetic_xy.shape[1] != 2:
                raise ValueError(
                    "synthetic must be (anchors, partners, lam) or an [M, 2] array of map positions, "
                    f"got an array of shape {synthetic_xy.shape}"
                )
    anchor_index = None
    if anchors is not None:
        anchor_index = np.unique(_numpy(anchors).astype(np.int64).reshape(-1))
        if anchor_index.size and (anchor_index.min() < 0 or anchor_index.max() >= n):
            raise ValueError(f"anchors must lie in [0, {n}), got values in [{anchor_index.min()}, {anchor_index.max()}]")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")

    Figure, FigureCanvasAgg = _import_matplotlib()
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    marker_size = float(np.clip(4000.0 / n, 1.0, 20.0))
    drawn = axes.scatter(points[:, 0], points[:, 1], c=score, s=marker_size, cmap="viridis", linewidths=0,
                         label="examples")
    figure.colorbar(drawn, ax=axes, label="region score (mean loss of map neighbours)")
    if anchor_index is not None and anchor_index.size:
        axes.scatter(points[anchor_index, 0], points[anchor_index, 1], s=4 * marker_size + 10, facecolors="none",
                     edgecolors="red", linewidths=0.8, label=f"anchors ({anchor_index.size})")
    if synthetic_xy is not None and synthetic_xy.size:
        axes.scatter(synthetic_xy[:, 0], synthetic_xy[:, 1], s=2 * marker_size + 6, marker="x", c="black",
                     linewidths=0.8, label=f"synthetic ({synthetic_xy.shape[0]})")
    # the numbers that define the map are always shown; a caller's title goes above them
    summary = (f"N={n}, k={analyzer.n_neighbors}, anchors from the top {1 - analyzer.quantile:.0%} "
               f"(q={analyzer.quantile:g})")
    axes.set_title(f"Loss map: {summary}" if title is None else f"{title}\n{summary}", fontsize=10)
    axes.set_xlabel("map 1")
    axes.set_ylabel("map 2")
    axes.legend(loc="best", fontsize=8, markerscale=1.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return path
