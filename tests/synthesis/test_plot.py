import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from sage_fast.synthesis.plot import loss_map, synthetic_positions  # noqa: E402
from sage_fast.regions.analyzer import LossRegionAnalyzer, NotFittedError  # noqa: E402


@pytest.fixture
def analyzer():
    """A fitted-looking analyzer on a planted 2-D map (the plot needs only the map and the scores,
    so no UMAP fit is spent here)."""
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(60, 2, generator=generator), torch.randn(60, 2, generator=generator) + 6])
    analyzer = LossRegionAnalyzer(n_neighbors=5, quantile=0.8)
    analyzer.embedding_2d_ = points
    analyzer.region_score_ = torch.cat([torch.rand(60, generator=generator), 1 + torch.rand(60, generator=generator)])
    analyzer.n_samples_ = 120
    return analyzer


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_loss_map_writes_a_png_of_the_requested_size(analyzer, tmp_path):
    anchors = torch.tensor([70, 80, 90, 80])
    partners = torch.tensor([71, 81, 91, 82])
    lam = torch.tensor([0.3, 0.5, 0.7, 0.2])
    path = loss_map(analyzer, tmp_path / "maps" / "round1.png", (anchors, partners, lam), anchors=anchors,
                    figsize=(6.0, 4.0), dpi=50)
    assert path == tmp_path / "maps" / "round1.png" and path.exists()
    image = read_png(path)
    assert image.shape[:2] == (200, 300)
    assert image[..., :3].std() > 0.05  # something was drawn


def test_loss_map_takes_positions_and_default_title(analyzer, tmp_path):
    path = loss_map(analyzer, tmp_path / "map.png", np.array([[0.0, 0.0], [6.0, 6.0]]))
    assert read_png(path).shape[:2] == (550, 700)


def test_synthetic_positions_interpolate_between_anchor_and_partner():
    points = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    positions = synthetic_positions(points, np.array([0, 1]), np.array([1, 2]), np.array([0.25, 1.0]))
    np.testing.assert_allclose(positions, [[7.5, 0.0], [10.0, 0.0]])


def test_loss_map_checks_its_inputs(analyzer, tmp_path):
    with pytest.raises(NotFittedError):
        loss_map(LossRegionAnalyzer(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="synthetic"):
        loss_map(analyzer, tmp_path / "x.png", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="synthetic partners"):
        loss_map(analyzer, tmp_path / "x.png", (torch.tensor([0]), torch.tensor([500]), torch.tensor([0.5])))
    with pytest.raises(ValueError, match="synthetic"):
        loss_map(analyzer, tmp_path / "x.png", (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0.5])))
    with pytest.raises(ValueError, match="anchors"):
        loss_map(analyzer, tmp_path / "x.png", anchors=torch.tensor([-1]))
    with pytest.raises(ValueError, match="dpi"):
        loss_map(analyzer, tmp_path / "x.png", dpi=0)
    assert not (tmp_path / "x.png").exists()


def test_loss_map_leaves_the_pyplot_backend_alone(analyzer, tmp_path):
    import matplotlib

    before = matplotlib.rcParams["backend"]
    loss_map(analyzer, tmp_path / "map.png")
    assert matplotlib.rcParams["backend"] == before
