import math

import pytest
import torch
from torch import nn

import kernels
from dst import DSTConfig, Sparsifier
from dst.dynadiag import diagonal_gradient_norms, diagonal_weights
from dst.schedules import cosine_anneal

from .helpers import check_swap, entries, state_entries


def _model(candidates=1.0, block_size=1, freeze_at=0.5, delta_t=2, alpha=0.5, in_f=48, out_f=64, density=0.25,
           freeze_gate="fold", **cfg_kw):
    cfg = DSTConfig(method="dynadiag", delta_t=delta_t, alpha=alpha, candidates=candidates, block_size=block_size,
                    freeze_at=freeze_at, drop_schedule="constant", freeze_gate=freeze_gate, **cfg_kw)
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


def _dense_diagonal_norms(dy, x, R, C, b):
    """fp64 reference: the dense gradient, blocked, summed along each wrap-around diagonal."""
    g = (dy.double().t() @ x.double()).reshape(R, b, C, b).permute(0, 2, 1, 3).square().sum((2, 3))  # [R, C]
    D, P = min(R, C), max(R, C)
    d = torch.arange(D)
    return torch.stack([g[(d + o) % R, d].sum() if R >= C else g[d, (d + o) % C].sum() for o in range(P)]).sqrt()


@pytest.mark.parametrize("in_f, out_f, b, chunk", [(12, 20, 1, 7), (20, 12, 1, 1), (16, 32, 4, 40), (32, 16, 4, 10 ** 6),
                                                  (63, 63, 1, 100)])
def test_diagonal_gradient_norms_match_the_dense_gradient_in_chunks(in_f, out_f, b, chunk):
    g = torch.Generator().manual_seed(in_f * out_f + b)
    dy, x = torch.randn(9, out_f, generator=g, dtype=torch.float64), torch.randn(9, in_f, generator=g, dtype=torch.float64)
    R, C = out_f // b, in_f // b
    offsets = torch.randperm(max(R, C), generator=g)
    got = diagonal_gradient_norms(dy, x, offsets, R, C, b, chunk)
    torch.testing.assert_close(got.double(), _dense_diagonal_norms(dy, x, R, C, b)[offsets], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("R, C, b", [(5, 3, 1), (3, 5, 2), (4, 4, 1), (7, 2, 3)])
def test_diagonal_sampling_weights_are_the_sum_over_each_diagonals_blocks(R, C, b):
    g = torch.Generator().manual_seed(R * 10 + C)
    row_w, col_w = torch.rand(R * b, generator=g, dtype=torch.float64), torch.rand(C * b, generator=g, dtype=torch.float64)
    rows, cols = kernels.diag.diag_coords(torch.arange(max(R, C)), R, C)
    rwb, cwb = row_w.reshape(R, b).sum(1), col_w.reshape(C, b).sum(1)
    expected = (rwb[rows.long()] * cwb[cols.long()]).sum(1)
    torch.testing.assert_close(diagonal_weights(row_w, col_w, R, C, b), expected)


@pytest.mark.parametrize("block_size", [1, 4])
def test_exact_grow_brings_the_diagonals_with_the_largest_gradient_norm(block_size):
    cfg, layer, model, sparsifier, opt = _model(alpha=0.5, block_size=block_size, in_f=32, out_f=64)
    R, C, D, P = layer.geometry
    _train(model, sparsifier, opt, 0)
    sparsifier.step(0, opt)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, generator=g)
    target = torch.randn(8, 64, generator=g)
    with sparsifier.capture(2):
        y = model(x)
        y.retain_grad()
        (y - target).square().mean().backward()
    old = layer.offsets.long()
    norms = _dense_diagonal_norms(y.grad, x, R, C, block_size)
    free = [o for o in range(P) if o not in set(old.tolist())]
    stats = sparsifier.step(2, opt)
    n = stats["layers"]["0"]["replaced"]
    assert n > 0
    new = set(layer.offsets.tolist()) - set(old.tolist())
    assert new == set(sorted(free, key=lambda o: -norms[o].item())[:n])


@pytest.mark.parametrize("grow", ["uniform", "grabo", "graest"])
def test_sampled_grow_takes_the_best_gradient_norms_of_a_sample_of_free_diagonals(grow):
    cfg, layer, model, sparsifier, opt = _model(grow=grow, gamma=0.75)
    for step in range(5):
        _train(model, sparsifier, opt, step)
        old = set(layer.offsets.tolist())
        stats = sparsifier.step(step, opt)
        if stats is not None:
            new = set(layer.offsets.tolist()) - old
            assert len(new) == stats["layers"]["0"]["replaced"] > 0 and not new & old
            assert layer.num_diagonals == 32 and layer.offsets.tolist() == sorted(layer.offsets.tolist())


@pytest.mark.parametrize("freeze_gate", ["fold", "ones"])
def test_the_freeze_folds_the_gate_or_sets_it_to_one(freeze_gate):
    cfg, layer, model, sparsifier, opt = _model(freeze_at=0.25, freeze_gate=freeze_gate)
    for step in range(5):
        _train(model, sparsifier, opt, step)
        sparsifier.step(step, opt)
    _train(model, sparsifier, opt, 5)
    top = torch.sort(torch.topk(layer.scores.detach(), layer.k_target).indices).values
    layer.temperature.fill_(cfg.temp_end)  # the freeze step anneals to temp_end first
    values, a = layer.values.detach()[top].clone(), layer.gate().detach()[top]
    assert not torch.allclose(a, torch.ones_like(a)), "the case must tell the two apart"
    sparsifier.step(5, opt)
    expected = values * a[:, None, None, None] if freeze_gate == "fold" else values
    torch.testing.assert_close(layer.values.detach(), expected)


def test_active_density_counts_the_k_diagonals_and_stored_density_the_candidates_too():
    _, layer, model, sparsifier, opt = _model(candidates=1.0, freeze_at=0.25)
    assert sparsifier.densities()["0"] == pytest.approx(32 / 64)
    assert sparsifier.active_densities()["0"] == pytest.approx(16 / 64)
    for step in range(6):
        _train(model, sparsifier, opt, step)
        sparsifier.step(step, opt)
    assert sparsifier.frozen and sparsifier.active_densities()["0"] == sparsifier.densities()["0"] == pytest.approx(16 / 64)
