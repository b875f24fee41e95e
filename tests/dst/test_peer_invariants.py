"""What the reference implementations assert about themselves, asserted of ours.

- RigL's ``rigl/sparse_utils_test.py`` (google-research/rigl): ERK / ER layer densities give
  the global nonzero budget up to rounding, keep density / ((n_in + n_out) / (n_in n_out))
  equal across the sparse layers, and cap layers at dense with the rest rescaled.
- RigL's ``rigl/sparse_optimizers_test.py``: masks change on update steps only, and then
  keep their nonzero count; drop fraction 0 changes nothing; new connections start at 0; a
  static mask never changes. Here for SET, RigL, GSE (SparseLinear) and SRigL (FanInLinear).
- condensed-sparsity's ``tests/rigl_torch_tests/test_rigl_constant_fan.py`` and
  ``test_rigl.py`` (SRigL's code): one fan-in value per layer after init and after training;
  optimizer moments zero where weights are not (here: were just grown).

Our layers store only the active entries, so "a mask" is the set of (row, col) coordinates.
Per-layer sparsity overrides (RigL's custom_sparsity_map) have no counterpart in our API:
``layer_densities`` takes only shapes, a sparsity and a distribution.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import kernels
from dst import DSTConfig, Sparsifier, layer_densities, make_layer

from .helpers import entries, fit, state_entries, tiny_model, train_step

# SET, RigL (exact grow), GSE (its uniform sampler) on SparseLinear, SRigL on FanInLinear.
# gamma_sal 0.3: SRigL's CNN value, which keeps most neurons of the 24-40-12 MLP alive.
METHODS = [("set", {}), ("rigl", {"grow": "exact"}), ("gse", {"grow": "uniform"}),
           ("srigl", {"grow": "exact", "gamma_sal": 0.3})]
IDS = [m for m, _ in METHODS]


def _er_score(shape, distribution):
    """The Erdos-Renyi factor written out: (n_in + n_out) / (n_in n_out), ERK adding the
    kernel dims (sum of all dims over their product)."""
    dims = shape if distribution == "erk" else shape[:2]
    return sum(dims) / math.prod(dims)


def _mask(layer) -> set:
    rows, cols = layer.coords()
    return set(zip(rows.tolist(), cols.tolist()))


def _snapshot(model, optimizer) -> list:
    """Coordinates, values and every per-element optimizer state of each sparse layer."""
    out = []
    for m in model.modules():
        if isinstance(m, kernels.SparseLayer):
            state = optimizer.state.get(m.values, {})
            keys = sorted(k for k, t in state.items() if isinstance(t, torch.Tensor) and t.shape == m.values.shape)
            out.append((entries(m), {k: state_entries(m, optimizer, k) for k in keys}))
    return out




# RigL's testSparsityDictErdosRenyiSparsitiesScale cases, its (in, out[, ...]) shapes written
# as ours: (out, in) for a Linear, (out, in, kh, kw) for a conv.
RIGL_SCALE_CASES = [((3, 2), (3, 2), 0.5), ((3, 2, 1, 1), (3, 2, 1, 1), 0.3), ((6, 8), (3, 4), 0.7),
                    ((4, 80), (20, 20), 0.8), ((6, 2), (3, 2), 0.8),
                    ((16, 3, 3, 3), (32, 16, 1, 1), 0.9)]  # ours: convs of unequal kernels (ERK != ER)


@pytest.mark.parametrize("distribution", ["er", "erk"])
@pytest.mark.parametrize("shape1, shape2, sparsity", RIGL_SCALE_CASES)
def test_erdos_renyi_keeps_density_over_the_er_factor_equal_across_layers(shape1, shape2, sparsity, distribution):
    dens = layer_densities({"a": shape1, "b": shape2}, sparsity, distribution)
    assert dens["a"] < 1.0 and dens["b"] < 1.0, "no layer of these cases is capped"
    ratio_a = dens["a"] / _er_score(shape1, distribution)
    ratio_b = dens["b"] / _er_score(shape2, distribution)
    assert ratio_a == pytest.approx(ratio_b, rel=1e-12)


@pytest.mark.parametrize("shapes, sparsity", [
    ({"a": (3, 2), "b": (3, 2)}, 0.5), ({"a": (6, 8), "b": (3, 4)}, 0.7), ({"a": (4, 80), "b": (20, 20)}, 0.8),
    ({"qkv": (63, 21), "proj": (21, 21), "fc1": (123, 21), "fc2": (21, 123)}, 0.9),
    ({"fc1": (40, 24), "fc2": (12, 40)}, 0.7), ({"one": (1, 63), "two": (123, 1)}, 0.5)])
@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_the_layers_nonzero_counts_add_up_to_the_global_budget_within_rounding(shapes, sparsity, distribution):
    """Each SparseLinear holds round(density * numel) nonzeros, so the layers' total is
    (1 - sparsity) * total within half a weight per layer (RigL allows 2 for its 2 layers)."""
    dens = layer_densities(shapes, sparsity, distribution)
    cfg = DSTConfig(method="rigl")
    gen = torch.Generator().manual_seed(0)
    nnz = {name: make_layer(cfg, i, o, dens[name], generator=gen).nnz() for name, (o, i) in shapes.items()}
    for name, (o, i) in shapes.items():
        assert nnz[name] == max(1, round(dens[name] * o * i)), name
    target = (1.0 - sparsity) * sum(o * i for o, i in shapes.values())
    assert abs(sum(nnz.values()) - target) <= len(shapes) / 2


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_srigl_layers_hold_their_share_of_the_budget_within_half_a_weight_per_row(sparsity):
    """FanInLinear rounds the fan-in, k = round(density * in), so a layer is off by at most
    half a weight per neuron."""
    shapes = {"qkv": (63, 21), "proj": (21, 21), "fc1": (123, 21), "fc2": (21, 123)}
    dens = layer_densities(shapes, sparsity, "er")
    cfg = DSTConfig(method="srigl")
    for name, (o, i) in shapes.items():
        layer = make_layer(cfg, i, o, dens[name], generator=torch.Generator().manual_seed(0))
        assert layer.nnz() == o * layer.k
        assert abs(layer.nnz() - dens[name] * o * i) <= o / 2, name


def test_layers_erk_would_push_above_one_are_made_dense_and_their_excess_goes_to_the_others():
    shapes = {"tiny": (4, 4), "small": (16, 8), "big": (256, 256), "wide": (64, 512)}
    total = sum(o * i for o, i in shapes.values())
    dens = layer_densities(shapes, 0.5, "erk")
    # Without the cap the two smallest layers would be far above 1 (scores 0.5 and 0.19).
    naive = 0.5 * total / sum(_er_score(s, "erk") * math.prod(s) for s in shapes.values())
    assert naive * _er_score(shapes["small"], "erk") > 1.0
    assert dens["tiny"] == dens["small"] == 1.0
    assert dens["big"] < 1.0 and dens["wide"] < 1.0
    assert dens["big"] / _er_score(shapes["big"], "erk") == pytest.approx(
        dens["wide"] / _er_score(shapes["wide"], "erk"), rel=1e-12)
    sparse_ones = dens["big"] * 256 * 256 + dens["wide"] * 64 * 512
    left = 0.5 * total - 4 * 4 - 16 * 8  # the budget left after the dense layers
    assert sparse_ones == pytest.approx(left, rel=1e-12)
    assert dens["big"] > naive * _er_score(shapes["big"], "erk"), "the capped layers' excess is redistributed"


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(1, 130), st.integers(1, 130)), min_size=2, max_size=5),
       st.floats(0.3, 0.95), st.sampled_from(["er", "erk"]))
def test_only_the_highest_scored_layers_are_made_dense_and_the_rest_share_one_factor(shape_list, sparsity,
                                                                                      distribution):
    shapes = {f"l{j}": s for j, s in enumerate(shape_list)}
    dens = layer_densities(shapes, sparsity, distribution)
    score = {n: _er_score(s, distribution) for n, s in shapes.items()}
    sparse = [n for n in shapes if dens[n] < 1.0]
    dense = [n for n in shapes if dens[n] == 1.0]
    if not sparse:
        return
    ratios = [dens[n] / score[n] for n in sparse]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    if dense:
        # A layer is dense because its score times the common factor reaches 1: every dense
        # layer scores at least as high as every sparse one (ties aside).
        assert min(score[n] for n in dense) >= max(score[n] for n in sparse) * (1 - 1e-12)
        assert all(ratios[0] * score[n] >= 1.0 - 1e-9 for n in dense)


def _setup(method, overrides, steps=10, seed=0, optimizer="adam", **cfg_kw):
    kw = {"sparsity": 0.7, "delta_t": 2, "t_end": 1.0, "alpha": 0.4, "seed": seed, **cfg_kw, **overrides}
    cfg = DSTConfig(method=method, **kw)
    model = tiny_model(cfg, density=0.3, seed=seed)
    sparsifier = Sparsifier(model, cfg, steps)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, sparsifier, opt


@pytest.mark.parametrize("method, overrides", METHODS, ids=IDS)
def test_masks_change_on_update_steps_only_and_keep_their_nonzero_count(method, overrides):
    # delta_t 2, 10 steps, t_end 0.7: updates at steps 2, 4 and 6 (never at 0, none from 7 on).
    model, sparsifier, opt = _setup(method, overrides, steps=10, t_end=0.7, drop_schedule="constant")
    layers = sparsifier.layers
    nnz = {name: layer.nnz() for name, layer in layers.items()}
    for step in range(10):
        before = {name: _mask(layer) for name, layer in layers.items()}
        _, stats = train_step(model, sparsifier, opt, step)
        after = {name: _mask(layer) for name, layer in layers.items()}
        if step in (2, 4, 6):
            assert stats is not None, step
            for name, layer in layers.items():
                assert after[name] != before[name], f"step {step}: {name} did not change"
                if method == "srigl":
                    # Exact fan-in: k = floor(budget / active neurons) in every active row.
                    n_rows = layer.rows.numel()
                    assert layer.nnz() == n_rows * (sparsifier.budgets[name] // n_rows) == len(after[name])
                else:
                    assert layer.nnz() == len(after[name]) == nnz[name], f"step {step}: {name} nnz changed"
        else:
            assert stats is None, step
            assert after == before, f"step {step} is not an update step"


@pytest.mark.parametrize("delta_t", [1, 3])
@pytest.mark.parametrize("method, overrides", METHODS + [("srigl", {"grow": "uniform", "gamma_sal": 0.95})],
                         ids=IDS + ["srigl-vit"])
def test_drop_fraction_zero_changes_nothing(method, overrides, delta_t):
    model, sparsifier, opt = _setup(method, overrides, steps=8, alpha=0.0, delta_t=delta_t)
    updates = 0
    for step in range(8):
        fit(model, sparsifier, opt, step)
        before = _snapshot(model, opt)
        updates += sparsifier.step(step, opt) is not None
        assert _snapshot(model, opt) == before, f"step {step}: coordinates, values or optimizer state changed"
    assert updates == len(range(delta_t, 8, delta_t)), "the update steps did run"


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("method, overrides", METHODS + [("srigl", {"grow": "graest", "gamma_sal": 0.95})],
                         ids=IDS + ["srigl-vit"])
def test_grown_weights_and_their_optimizer_state_start_at_zero_and_the_function_loses_only_the_dropped(
        method, overrides, optimizer):
    """RigL's testNewConnectionZeroInit, condensed-sparsity's momentum check (Adam's exp_avg
    and exp_avg_sq, SGD's momentum_buffer): zero at every just-grown entry, untouched at every
    kept one. Seen through the forward too: right after an update the layer computes the old
    weights with the dropped ones removed."""
    model, sparsifier, opt = _setup(method, overrides, steps=12, optimizer=optimizer, delta_t=1)
    keys = ("exp_avg", "exp_avg_sq") if optimizer == "adam" else ("momentum_buffer",)
    x_probe = torch.randn(5, 40, generator=torch.Generator().manual_seed(7))
    grown_total = 0
    for step in range(12):
        fit(model, sparsifier, opt, step)
        before = {n: (entries(l), {k: state_entries(l, opt, k) for k in keys}, l.to_dense())
                  for n, l in sparsifier.layers.items()}
        if sparsifier.step(step, opt) is None:
            continue
        for name, layer in sparsifier.layers.items():
            old, old_state, old_dense = before[name]
            new = entries(layer)
            grown, kept = set(new) - set(old), set(new) & set(old)
            grown_total += len(grown)
            assert all(new[rc] == 0.0 for rc in grown), "a grown weight starts at exactly 0"
            assert all(new[rc] == old[rc] for rc in kept)
            for k in keys:
                state = state_entries(layer, opt, k)
                assert all(state[rc] == 0.0 for rc in grown), f"{k} of a grown weight starts at 0"
                assert all(state[rc] == old_state[k][rc] for rc in kept), f"{k} of a kept weight is untouched"
            keep = torch.zeros_like(old_dense, dtype=torch.bool)
            if kept:
                keep[tuple(torch.tensor(sorted(kept)).t())] = True
            expected = torch.where(keep, old_dense, torch.zeros_like(old_dense))
            assert torch.equal(layer.to_dense(), expected)
            xp = x_probe[:, :layer.in_features]
            with torch.no_grad():
                torch.testing.assert_close(layer(xp), xp @ expected.t() + layer.bias, rtol=1e-5, atol=1e-6)
    assert grown_total > 0


@pytest.mark.parametrize("make", [lambda g: kernels.SparseLinear(24, 12, density=0.3, generator=g),
                                  lambda g: kernels.FanInLinear(24, 12, k=5, generator=g),
                                  lambda g: kernels.DiagLinear(24, 12, 0.3, generator=g)],
                         ids=["sparse", "fanin", "diag"])
def test_a_static_mask_never_changes_while_its_weights_train(make):
    layer = make(torch.Generator().manual_seed(0))
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, DSTConfig(method="static", delta_t=1, t_end=1.0), 15)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    start = entries(layer)
    for step in range(15):
        assert train_step(model, sparsifier, opt, step)[1] is None
        assert set(entries(layer)) == set(start), f"step {step}"
    assert entries(layer) != start, "the weights did train"


def _row_counts(layer) -> torch.Tensor:
    """Active entries of each of the layer's out rows, from its coordinates (duplicates counted once)."""
    mask = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool)
    rows, cols = layer.coords()
    mask[rows.long(), cols.long()] = True
    return mask.sum(1)


@pytest.mark.parametrize("gamma_sal, grow, ablation", [
    (0.95, "exact", True), (0.95, "graest", True), (0.3, "uniform", True), (0.95, "exact", False)])
def test_srigl_keeps_one_fan_in_per_layer_after_init_and_through_training(gamma_sal, grow, ablation):
    cfg = DSTConfig(method="srigl", sparsity=0.7, delta_t=2, t_end=0.8, alpha=0.4, gamma_sal=gamma_sal, grow=grow,
                    ablation=ablation, seed=0)
    model = tiny_model(cfg, density=0.3, seed=0)
    sparsifier = Sparsifier(model, cfg, 30, heads=["2"])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for name, layer in sparsifier.layers.items():
        counts = _row_counts(layer)
        assert counts.unique().tolist() == [layer.k], f"{name} after init"
    ablated = 0
    for step in range(30):
        if train_step(model, sparsifier, opt, step)[1] is None:
            continue
        for name, layer in sparsifier.layers.items():
            counts = _row_counts(layer)
            active = torch.zeros(layer.out_features, dtype=torch.bool)
            active[layer.rows.long()] = True
            assert bool((counts[active] == layer.k).all()), f"step {step}: {name}: {counts[active].unique()}"
            assert bool((counts[~active] == 0).all())
            assert layer.k == min(layer.in_features, sparsifier.budgets[name] // int(active.sum()))
            ablated += int((~active).sum())
    if not ablation:
        assert ablated == 0
    elif gamma_sal == 0.95:
        assert ablated > 0, "the ViT gamma_sal does ablate here, so ablated rows were checked"
