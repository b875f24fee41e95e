"""The start banner says what DynaDiag's stored density holds: its K active diagonals plus
the candidates it carries until the freeze (a 0.1 target printed as "density 0.2057" before)."""
import torch
from torch import nn

from dst import DSTConfig, Sparsifier, make_layer
from train import common as C


def _model(method):
    cfg = DSTConfig.for_method(method, sparsity=0.9)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(make_layer(cfg, 64, 192, 0.1, generator=g), nn.ReLU(), make_layer(cfg, 192, 64, 0.1, generator=g))
    return model, Sparsifier(model, cfg, 100)


def test_dynadiag_banner_gives_the_active_density_and_what_the_stored_one_adds():
    model, sparsifier = _model("dynadiag")
    names = ["0", "2"]
    stored, active = C.overall_density(model, names), C.active_density(model, names, sparsifier)
    assert 0.09 < active < 0.11 and stored > 1.8 * active
    text = C.density_text(model, names, sparsifier)
    assert text.startswith(f"density {active:.4f} active (stored {stored:.4f}") and "candidate" in text


def test_other_methods_print_one_density():
    model, sparsifier = _model("rigl")
    assert C.density_text(model, ["0", "2"], sparsifier) == f"density {C.overall_density(model, ['0', '2']):.4f}"
