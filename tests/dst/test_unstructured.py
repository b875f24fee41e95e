import math

import pytest
import torch
from torch import nn

import dst
import dst.unstructured
import kernels
from dst import DSTConfig, Sparsifier

from .helpers import batch, check_swap, entries, fit, state_entries, tiny_model, train_step

CASES = [("set", {}), ("rigl", {"grow": "exact"}), ("rigl", {"grow": "grabo"}), ("gse", {"grow": "uniform"}),
         ("gse", {"grow": "graest"}), ("gse", {"grow": "uniform", "scope": "global"}),
         ("rigl", {"grow": "exact", "scope": "global"})]
IDS = [m + "-" + "-".join(o.values()) for m, o in CASES]


def _setup(method, overrides, seed=0, steps=20):
    cfg = DSTConfig(method=method, sparsity=0.7, delta_t=2, t_end=1.0, alpha=0.4, seed=seed, **overrides)
    model = tiny_model(cfg, density=0.3, seed=seed)
    sparsifier = Sparsifier(model, cfg, steps)
    return model, sparsifier, torch.optim.Adam(model.parameters(), lr=0.05)


@pytest.mark.parametrize("method, overrides", CASES, ids=IDS)
def test_every_update_keeps_counts_exact_drop_and_grow_disjoint_and_grown_weights_fresh(method, overrides):
    model, sparsifier, opt = _setup(method, overrides)
    nnz = {name: layer.nnz() for name, layer in sparsifier.layers.items()}
    updates = 0
    for step in range(9):
        fit(model, sparsifier, opt, step)
        before = {name: (entries(layer), state_entries(layer, opt, "exp_avg"), state_entries(layer, opt, "exp_avg_sq"))
                  for name, layer in sparsifier.layers.items()}
        stats = sparsifier.step(step, opt)
        if stats is None:
            continue
        updates += 1
        grown_total = 0
        for name, layer in sparsifier.layers.items():
            e, m, v = before[name]
            s = stats["layers"][name]
            dropped, grown = check_swap(e, entries(layer), m, state_entries(layer, opt, "exp_avg"), s)
            check_swap(e, entries(layer), v, state_entries(layer, opt, "exp_avg_sq"), s)
            assert len(dropped) == len(grown)
            assert layer.nnz() == nnz[name], "density exact after every update"
            assert s["density"] == nnz[name] / layer.weight_numel
            if overrides.get("scope") != "global":
                assert len(grown) == math.floor(stats["drop_fraction"] * nnz[name])
            grown_total += len(grown)
        if overrides.get("scope") == "global":
            assert grown_total == sum(math.floor(stats["drop_fraction"] * n) for n in nnz.values())
        assert grown_total > 0
    assert updates == 4


def test_rigl_drops_the_smallest_weights_and_grows_the_largest_gradients_among_inactive_entries():
    cfg = DSTConfig(method="rigl", sparsity=0.7, delta_t=1, t_end=1.0, alpha=0.3)
    layer = kernels.SparseLinear(30, 20, density=0.3, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, cfg, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(7, 30, generator=torch.Generator().manual_seed(1)), torch.randn(7, 20)
    with sparsifier.capture(1):
        y = model(x)
        y.retain_grad()
        (y - target).square().mean().backward()
    opt.step()
    grad = (y.grad.double().t() @ x.double()).abs()  # the dense reference, test only
    before = entries(layer)
    stats = sparsifier.step(1, opt)
    n = math.floor(stats["drop_fraction"] * len(before))
    inactive = [(r, c) for r in range(20) for c in range(30) if (r, c) not in before]
    expect_grown = set(sorted(inactive, key=lambda rc: -grad[rc].item())[:n])
    expect_dropped = set(sorted(before, key=lambda rc: abs(before[rc]))[:n])
    after = entries(layer)
    assert set(after) - set(before) == expect_grown
    assert set(before) - set(after) == expect_dropped


@pytest.mark.parametrize("sampler", ["uniform", "grabo", "graest"])
def test_gse_scores_only_sampled_inactive_candidates_and_grows_among_them(monkeypatch, sampler):
    drawn = []

    def recording(sampler_name, n, n_rows, in_features, active, dy, x, generator):
        cand = dst.candidates.sample_candidates(sampler_name, n, n_rows, in_features, active, dy, x, generator)
        drawn.append((set(active.tolist()), set(cand.tolist()), n))
        return cand

    monkeypatch.setattr(dst.unstructured, "sample_candidates", recording)
    model, sparsifier, opt = _setup("gse", {"grow": sampler, "gamma": 1.5})
    layers = list(sparsifier.layers.values())
    for step in range(5):
        fit(model, sparsifier, opt, step)
        before = [set(entries(layer)) for layer in layers]
        nnz = [len(b) for b in before]
        drawn.clear()
        if sparsifier.step(step, opt) is None:
            continue
        assert len(drawn) == len(layers)
        for layer, old, n, (active, cand, size) in zip(layers, before, nnz, drawn):
            in_f = layer.in_features
            assert active == {r * in_f + c for r, c in old}
            assert not cand & active, "candidates are inactive entries only"
            assert size == min(layer.weight_numel - n, math.ceil(1.5 * n)) == len(cand)
            grown = {r * in_f + c for r, c in set(entries(layer)) - old}
            assert grown <= cand


@pytest.mark.parametrize("method, overrides", CASES, ids=IDS)
def test_the_same_seed_gives_the_same_masks(method, overrides):
    runs = []
    for _ in range(2):
        model, sparsifier, opt = _setup(method, overrides, seed=3)
        for step in range(7):
            train_step(model, sparsifier, opt, step)
        runs.append([torch.cat([layer.rows, layer.cols]) for layer in sparsifier.layers.values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_another_seed_gives_other_random_growth():
    masks = []
    for seed in (1, 2):
        cfg = DSTConfig(method="set", sparsity=0.7, delta_t=2, t_end=1.0, seed=seed)
        model = tiny_model(cfg, seed=0)
        sparsifier = Sparsifier(model, cfg, 20)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for step in range(5):
            train_step(model, sparsifier, opt, step)
        masks.append(model[0].flat_coords())
    assert not torch.equal(*masks)


def test_set_needs_no_capture_but_gradient_rules_say_how_to_capture():
    for method in ("set", "rigl"):
        cfg = DSTConfig(method=method, sparsity=0.7, delta_t=1, t_end=1.0)
        model = tiny_model(cfg)
        sparsifier = Sparsifier(model, cfg, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = batch(1)
        (model(x) - y).square().mean().backward()  # no capture block
        opt.step()
        if method == "set":
            assert sparsifier.step(1, opt) is not None
        else:
            with pytest.raises(RuntimeError, match="capture"):
                sparsifier.step(1, opt)
