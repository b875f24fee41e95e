import math

import pytest
import torch
from torch import nn

import kernels
from dst import DSTConfig, Sparsifier

from .helpers import batch, check_swap, entries, state_entries, tiny_model, train_step


def _one_update(gamma_sal=0.5, alpha=0.3, seed=0, ablation=True, in_f=24, out_f=40, k=7):
    """A single FanInLinear, one update at step 1 with grow="exact"; returns what the test
    needs to recompute the update densely."""
    cfg = DSTConfig(method="srigl", delta_t=1, t_end=1.0, alpha=alpha, gamma_sal=gamma_sal, ablation=ablation,
                    grow="exact")
    layer = kernels.FanInLinear(in_f, out_f, k=k, generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, cfg, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed + 1)
    x, target = torch.randn(9, in_f, generator=g), torch.randn(9, out_f, generator=g)
    with sparsifier.capture(1):
        y = model(x)
        y.retain_grad()
        (y - target).square().mean().backward()
    opt.step()
    grad = (y.grad.double().t() @ x.double()).abs()  # dense reference, test only
    before = entries(layer)
    moments = state_entries(layer, opt, "exp_avg")
    stats = sparsifier.step(1, opt)
    return layer, opt, stats, before, moments, grad, sparsifier.budgets["0"]


def _expected_survivors(before, grad, frac, k, gamma_sal, budget, in_f, out_f):
    nnz = len(before)
    n_prune = math.floor(frac * nnz)
    by_w = sorted(before, key=lambda rc: -abs(before[rc]))[:nnz - n_prune]
    by_g = torch.topk(grad.reshape(-1), n_prune).indices.tolist()
    salient = set(by_w) | {(i // in_f, i % in_f) for i in by_g}
    count = torch.zeros(out_f)
    for r, _ in salient:
        count[r] += 1
    alive = count >= max(1.0, gamma_sal * k)
    n_min = math.ceil(budget / in_f)
    if int(alive.sum()) < n_min:
        alive = torch.zeros(out_f, dtype=torch.bool)
        alive[torch.sort(-count, stable=True).indices[:n_min]] = True
    return set(torch.nonzero(alive).flatten().tolist()), set(by_w)


@pytest.mark.parametrize("gamma_sal, seed", [(0.3, 0), (0.5, 1), (0.8, 2), (0.95, 3)])
def test_neurons_are_ablated_exactly_by_the_gamma_sal_rule(gamma_sal, seed):
    layer, _, stats, before, _, grad, budget = _one_update(gamma_sal=gamma_sal, seed=seed)
    expected, _ = _expected_survivors(before, grad, stats["drop_fraction"], 7, gamma_sal, budget, 24, 40)
    assert set(layer.rows.tolist()) == expected
    s = stats["layers"]["0"]
    assert s["active_neurons"] == len(expected) and s["ablated"] == 40 - len(expected)
    assert s["k"] == layer.k == budget // len(expected)


def test_drop_keeps_each_rows_largest_weights_and_grow_fills_it_with_its_largest_gradients():
    layer, _, stats, before, _, grad, budget = _one_update(gamma_sal=0.5, seed=4)
    _, kept_by_w = _expected_survivors(before, grad, stats["drop_fraction"], 7, 0.5, budget, 24, 40)
    after = entries(layer)
    k_new = layer.k
    for r in layer.rows.tolist():
        old_row = {c: v for (rr, c), v in before.items() if rr == r}
        new_row = {c for (rr, c) in after if rr == r}
        assert len(new_row) == k_new
        q = sum(1 for (rr, c) in kept_by_w if rr == r)
        q = min(max(q, k_new - (24 - len(old_row))), k_new) if old_row else 0
        kept = set(sorted(old_row, key=lambda c: -abs(old_row[c]))[:q])
        assert new_row & set(old_row) == kept, f"row {r} keeps its top {q} by |w|"
        free = [c for c in range(24) if c not in old_row]
        best = set(sorted(free, key=lambda c: -grad[r, c].item())[:k_new - q])
        assert new_row - set(old_row) == best, f"row {r} grows its top {k_new - q} by |grad|"


def test_without_ablation_every_neuron_keeps_exactly_k():
    layer, _, stats, _, _, _, budget = _one_update(gamma_sal=1.0, ablation=False)
    assert layer.rows.tolist() == list(range(40)) and layer.k == 7 == budget // 40


def test_at_least_budget_over_in_neurons_survive():
    layer, _, stats, _, _, _, budget = _one_update(gamma_sal=1.0, alpha=1.0, seed=5, in_f=12, out_f=30, k=6)
    assert layer.rows.numel() >= math.ceil(budget / 12)
    assert layer.k <= 12


def test_the_head_is_never_ablated():
    cfg = DSTConfig(method="srigl", sparsity=0.7, delta_t=1, t_end=1.0, gamma_sal=1.0)
    model = tiny_model(cfg)
    sparsifier = Sparsifier(model, cfg, 10, heads=["2"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(5):
        train_step(model, sparsifier, opt, step)
        assert model[2].rows.tolist() == list(range(12))
    assert model[0].rows.numel() < 40, "the other layer does ablate at gamma_sal = 1"


@pytest.mark.parametrize("grow", ["exact", "uniform", "grabo", "graest"])
def test_every_update_holds_exactly_k_per_active_row_and_swaps_cleanly(grow):
    cfg = DSTConfig(method="srigl", sparsity=0.7, delta_t=2, t_end=1.0, alpha=0.4, gamma_sal=0.6, grow=grow)
    model = tiny_model(cfg)
    sparsifier = Sparsifier(model, cfg, 20)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(12):
        x, y = batch(step)
        with sparsifier.capture(step):
            (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        before = {n: (entries(l), state_entries(l, opt, "exp_avg")) for n, l in sparsifier.layers.items()}
        stats = sparsifier.step(step, opt)
        if stats is None:
            continue
        for name, layer in sparsifier.layers.items():
            e, m = before[name]
            check_swap(e, entries(layer), m, state_entries(layer, opt, "exp_avg"), stats["layers"][name])
            n_rows, k = layer.values.shape
            budget = sparsifier.budgets[name]
            assert k == min(layer.in_features, budget // n_rows)
            assert layer.indices.shape == (n_rows, k)
            assert bool((layer.indices.sort(dim=1).values.diff(dim=1) > 0).all()), "k distinct columns per row"
            assert layer.nnz() <= budget


def test_an_ablated_neuron_comes_back_when_its_gradients_are_salient():
    cfg = DSTConfig(method="srigl", delta_t=1, t_end=1.0, alpha=0.3, gamma_sal=0.5, grow="exact")
    layer = kernels.FanInLinear(16, 8, k=4, generator=torch.Generator().manual_seed(0))
    layer.set_pattern(layer.values.detach()[1:].clone(), layer.indices[1:].clone(), layer.rows[1:].clone())
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, cfg, 10)  # budget 28: neuron 0 starts ablated
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with sparsifier.capture(1):
        model(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))[:, 0].sum().backward()
    sparsifier.step(1, opt)  # only neuron 0 has gradients: its entries are the salient ones
    assert 0 in layer.rows.tolist()
