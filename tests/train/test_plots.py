"""train/plots.py: masks.png draws each layer with its own shape (a 192 x 64 layer is 3:1, not a square)."""
import matplotlib
import torch

from train import plots


def test_a_pooled_mask_keeps_the_layers_aspect():
    assert tuple(plots._pooled(torch.ones(192, 64)).shape) == (192, 64)
    assert tuple(plots._pooled(torch.ones(3072, 768)).shape) == (256, 64)   # one factor, 12, for both sides


def test_mask_panels_are_drawn_at_equal_aspect(tmp_path, monkeypatch):
    import kernels
    layer = kernels.SparseLinear(64, 192, density=0.1)
    seen = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, img, **kw: seen.append((img.shape, kw["aspect"])) or real(ax, img, **kw))
    plots.plot_masks({"fc": layer}, tmp_path / "masks.png", "t")
    assert seen == [((192, 64), "equal")] and (tmp_path / "masks.png").stat().st_size > 0
