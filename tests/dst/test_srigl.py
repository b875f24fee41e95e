import math

import pytest
import torch
from torch import nn

import kernels
from dst import DSTConfig, Sparsifier

from .helpers import check_swap, entries, fit, state_entries, tiny_model, train_step


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


def _expected_survivors(before, grad, frac, k0, gamma_sal, budget, in_f, out_f):
    """The authors' ablation rule written out: (surviving rows, kept (row, col) entries)."""
    nnz = len(before)
    n_prune = math.floor(frac * nnz)
    by_w = sorted(before, key=lambda rc: -abs(before[rc]))[:nnz - n_prune]
    by_g = torch.topk(grad.reshape(-1), n_prune).indices.tolist()
    salient = set(by_w) | {(i // in_f, i % in_f) for i in by_g}
    count = [0] * out_f
    for r, _ in salient:
        count[r] += 1
    threshold = max(1, math.floor(gamma_sal * k0))
    n_min = math.ceil(budget / in_f)
    threshold = min(threshold, sorted(count, reverse=True)[n_min])
    alive = {r for r in range(out_f) if count[r] >= threshold}
    # Kept: the top n_keep by |w| among the survivors' weights only.
    kept = sorted((rc for rc in before if rc[0] in alive), key=lambda rc: -abs(before[rc]))[:nnz - n_prune]
    return alive, set(kept)


@pytest.mark.parametrize("gamma_sal, seed", [(0.3, 0), (0.5, 1), (0.8, 2), (0.95, 3)])
def test_neurons_are_ablated_exactly_by_the_gamma_sal_rule(gamma_sal, seed):
    layer, _, stats, before, _, grad, budget = _one_update(gamma_sal=gamma_sal, seed=seed)
    expected, _ = _expected_survivors(before, grad, stats["drop_fraction"], budget // 40, gamma_sal, budget, 24, 40)
    assert set(layer.rows.tolist()) == expected
    s = stats["layers"]["0"]
    assert s["active_neurons"] == len(expected) and s["ablated"] == 40 - len(expected)
    assert s["k"] == layer.k == budget // len(expected)


def test_drop_keeps_each_rows_largest_weights_and_grow_fills_it_with_its_largest_gradients():
    layer, _, stats, before, _, grad, budget = _one_update(gamma_sal=0.5, seed=4)
    _, kept_by_w = _expected_survivors(before, grad, stats["drop_fraction"], budget // 40, 0.5, budget, 24, 40)
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
        fit(model, sparsifier, opt, step)
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


def test_the_ablation_threshold_is_fixed_by_the_target_fan_in_not_the_current_one():
    """8x8 layer, budget 16 (k0 = 2), rows 0-3 active with k = 4, gamma_sal = 0.5. Drop fraction
    0.3 * (1 + cos(pi / 10)) / 2 = 0.293 -> n_prune 4, n_keep 12: rows 0-2 hold the 12 largest
    weights, row 3 the 4 smallest; the 4 largest gradients are (3, 7) and (4, 0..2). Salient
    counts: 4 4 4 1 3 0 0 0. Fixed threshold max(1, floor(0.5 * 2)) = 1 keeps rows 0-4 (k' = 3);
    the current-k threshold 0.5 * 4 = 2 would ablate row 3 (rows 0, 1, 2, 4, k' = 4)."""
    cfg = DSTConfig(method="srigl", delta_t=1, t_end=1.0, alpha=0.3, gamma_sal=0.5, grow="exact")
    layer = kernels.FanInLinear(8, 8, k=4, generator=torch.Generator().manual_seed(0))
    values = torch.tensor([[5.0, 6, 7, 8]] * 3 + [[0.1, 0.2, 0.3, 0.4]])
    layer.set_pattern(values, torch.tensor([[0, 1, 2, 3]] * 4, dtype=torch.int32),
                      torch.arange(4, dtype=torch.int32))
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, cfg, 10)
    assert sparsifier.budgets["0"] == 16
    dy = torch.zeros(8, 8)  # grad[o, i] = sum_t dy[t, o] x[t, i] = dy[i, o] with x = I
    dy[7, 3], dy[0, 4], dy[1, 4], dy[2, 4] = 9.0, 8.0, 7.0, 6.0
    with sparsifier.capture(1):
        (model(torch.eye(8)) * dy).sum().backward()
    stats = sparsifier.step(1, torch.optim.SGD(model.parameters(), lr=0.0))
    assert stats["drop_fraction"] == pytest.approx(0.3 * (1 + math.cos(math.pi / 10)) / 2)
    assert layer.rows.tolist() == [0, 1, 2, 3, 4]
    assert layer.k == 3
    got = entries(layer)
    for r in range(3):  # the survivors keep their 3 largest; row 3 regrows its salient gradient
        assert {c for (rr, c) in got if rr == r} == {1, 2, 3}
    assert {c for (rr, c) in got if rr == 3} >= {7}
    assert {c for (rr, c) in got if rr == 4} == {0, 1, 2}


def test_ablated_rows_kept_slots_go_to_the_survivors_largest_weights():
    """16 -> 8 layer, rows 0-3 active with k = 8 (budget 32, k0 = 4), gamma_sal 1 (threshold 4).
    n_prune 9, n_keep 23: rows 0-2 hold values 10..33, row 3 one 50 and seven tiny ones; the 9
    largest gradients are in rows 4-6 (3 each). Salient counts 7 8 8 1 3 3 3 0: rows 0-2 survive
    (k' = 10). Row 3's weight 50 was among the top 23: its slot goes to the survivors, which keep
    their top 23 (all but 10), not the 22 that a plain top-23 of the layer leaves them."""
    cfg = DSTConfig(method="srigl", delta_t=1, t_end=1.0, alpha=0.3, gamma_sal=1.0, grow="exact")
    layer = kernels.FanInLinear(16, 8, k=8, generator=torch.Generator().manual_seed(0))
    values = torch.cat([torch.arange(10.0, 34.0).reshape(3, 8), torch.tensor([[50.0] + [1e-3] * 7])])
    layer.set_pattern(values, torch.arange(8, dtype=torch.int32).repeat(4, 1), torch.arange(4, dtype=torch.int32))
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, cfg, 10)
    dy = torch.zeros(16, 8)  # grad[o, i] = dy[i, o] with x = I
    for o in range(4, 7):
        for i in range(10, 13):
            dy[i, o] = 100.0 + 10 * o + i
    with sparsifier.capture(1):
        (model(torch.eye(16)) * dy).sum().backward()
    before = entries(layer)
    stats = sparsifier.step(1, torch.optim.SGD(model.parameters(), lr=0.0))
    assert math.floor(stats["drop_fraction"] * 32) == 9
    assert layer.rows.tolist() == [0, 1, 2] and layer.k == 10
    kept = set(before) & set(entries(layer))
    assert kept == {rc for rc in before if rc[0] < 3} - {(0, 0)}


@pytest.mark.parametrize("seed", [0, 1])
def test_repeated_updates_at_the_vit_gamma_sal_do_not_collapse_a_layer(seed):
    """gamma_sal 0.95 (SRigL's ViT value) on a 64 -> 64 layer at 90%: a threshold on the current
    k ratchets up with every ablation and leaves ceil(nnz / in) = 7 neurons after a few updates."""
    cfg = DSTConfig(method="srigl", sparsity=0.9, delta_t=2, t_end=1.0, alpha=0.3, gamma_sal=0.95)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(kernels.FanInLinear(64, 64, density=0.1, generator=g), nn.ReLU(),
                          kernels.FanInLinear(64, 8, density=0.1, generator=g))
    sparsifier = Sparsifier(model, cfg, 40, heads=["2"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    budget = sparsifier.budgets["0"]
    for step in range(40):
        train_step(model, sparsifier, opt, step, in_features=64, out_features=8)
    assert model[0].rows.numel() > 3 * math.ceil(budget / 64), f"collapsed to {model[0].rows.numel()} neurons"
    assert model[0].nnz() <= budget
