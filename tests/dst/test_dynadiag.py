import math

import pytest
import torch
from torch import nn

import kernels
from dst import DSTConfig, Sparsifier
from dst.schedules import cosine_anneal

from .helpers import check_swap, entries, state_entries


def _model(candidates=1.0, block_size=1, freeze_at=0.5, delta_t=2, alpha=0.5, in_f=48, out_f=64, density=0.25):
    cfg = DSTConfig(method="dynadiag", delta_t=delta_t, alpha=alpha, candidates=candidates, block_size=block_size,
                    freeze_at=freeze_at, drop_schedule="constant")
    layer = kernels.DiagLinear(in_f, out_f, density, block_size=block_size, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, cfg, 20)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    return cfg, layer, model, sparsifier, opt


def _train(model, sparsifier, opt, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, model[0].in_features, generator=g)
    with sparsifier.capture(step):
        (model(x) - torch.sin(x.sum(1, keepdim=True))).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("candidates, expected", [(1.0, 16), (0.5, 8), (0.0, 0), (10.0, 48)])
def test_only_k_active_plus_a_bounded_candidate_set_of_diagonals_is_stored(candidates, expected):
    _, layer, model, sparsifier, opt = _model(candidates=candidates)
    R, C, D, P = layer.geometry
    assert (P, layer.k_target) == (64, 16)
    assert layer.num_diagonals == 16 + expected
    assert layer.values.shape == (16 + expected, D, 1, 1) and layer.scores.shape == (16 + expected,)
    assert any(p is layer.scores for p in opt.param_groups[0]["params"]), "the optimizer trains the scores"
    assert sparsifier.densities()["0"] == pytest.approx((16 + expected) / 64)


def test_temperature_follows_the_cosine_anneal_until_the_freeze():
    cfg, layer, model, sparsifier, opt = _model(freeze_at=0.5)
    for step in range(9):
        _train(model, sparsifier, opt, step)
        sparsifier.step(step, opt)
        assert float(layer.temperature) == pytest.approx(cosine_anneal(step, 5.0, 0.05, 10))


def test_resampling_replaces_the_lowest_scored_candidates_with_fresh_zero_diagonals():
    cfg, layer, model, sparsifier, opt = _model(alpha=0.5)
    _train(model, sparsifier, opt, 0)
    sparsifier.step(0, opt)
    _train(model, sparsifier, opt, 2)
    offsets = layer.offsets.tolist()
    scores = dict(zip(offsets, layer.scores.detach().tolist()))
    score_m = dict(zip(offsets, opt.state[layer.scores]["exp_avg"].tolist()))
    before, before_m = entries(layer), state_entries(layer, opt, "exp_avg")
    stats = sparsifier.step(2, opt)
    s = stats["layers"]["0"]
    leaders = sorted(offsets, key=lambda o: -scores[o])[:16]
    candidates = [o for o in offsets if o not in leaders]
    n_replace = math.floor(0.5 * len(candidates))
    gone = set(sorted(candidates, key=lambda o: scores[o])[:n_replace])
    now = layer.offsets.tolist()
    assert now == sorted(now) and len(now) == 32 and s["replaced"] == n_replace
    assert set(offsets) - set(now) == gone and set(leaders) <= set(now)
    new = set(now) - set(offsets)
    assert len(new) == n_replace
    check_swap(before, entries(layer), before_m, state_entries(layer, opt, "exp_avg"), s)
    kept_mean = sum(scores[o] for o in offsets if o not in gone) / (32 - n_replace)
    for o, v, m in zip(now, layer.scores.detach().tolist(), opt.state[layer.scores]["exp_avg"].tolist()):
        if o in new:
            assert v == 0.0 and m == 0.0, "a new diagonal starts at the kept scores' mean (0 after the shift)"
        else:
            assert v == pytest.approx(scores[o] - kept_mean, abs=1e-6) and m == score_m[o]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_freezing_keeps_exactly_the_top_k_diagonals_with_the_gate_folded_in(block_size):
    cfg, layer, model, sparsifier, opt = _model(block_size=block_size, freeze_at=0.25, in_f=64, out_f=128)
    K = layer.k_target
    assert sparsifier.freeze_step == 5
    for step in range(6):
        _train(model, sparsifier, opt, step)
        if step < 5:
            sparsifier.step(step, opt)
    assert not sparsifier.frozen
    # The freeze folds the gate at the end of the anneal (temp_end) into the top-K diagonals.
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    top = torch.sort(torch.topk(layer.scores.detach(), K).indices).values
    with torch.no_grad():
        layer.temperature.fill_(cfg.temp_end)
        expected = kernels.diag_matmul(x, layer.effective_values()[top], layer.offsets[top], block_size, 128) + layer.bias
    stats = sparsifier.step(5, opt)
    assert stats["layers"]["0"]["frozen"] and sparsifier.frozen
    assert layer.num_diagonals == K and layer.scores is None
    assert torch.allclose(model(x), expected, atol=1e-6), "the frozen layer computes what the gated one did"
    for step in range(6, 12):
        _train(model, sparsifier, opt, step)
        assert sparsifier.step(step, opt) is None
        assert layer.num_diagonals == K
