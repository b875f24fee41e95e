import io

import pytest
import torch
from torch import nn

import dst
import kernels
from dst import DSTConfig, Sparsifier

from .helpers import batch, tiny_model, train_step


def _setup(method, seed=0, steps=12, **overrides):
    cfg = DSTConfig(method=method, sparsity=0.7, delta_t=2, t_end=1.0, seed=1, **overrides)
    model = tiny_model(cfg, seed=seed)
    sparsifier = Sparsifier(model, cfg, steps)
    return model, sparsifier, torch.optim.AdamW(model.parameters(), lr=0.03)


@pytest.mark.parametrize("method, layer", [
    ("srigl", kernels.SparseLinear(8, 8, density=0.5)),
    ("rigl", kernels.FanInLinear(8, 8, k=2)),
    ("gse", kernels.DiagLinear(8, 8, 0.5)),
    ("dynadiag", kernels.FanInLinear(8, 8, k=2)),
    ("dense", kernels.SparseLinear(8, 8, density=0.5)),
])
def test_a_method_on_a_layer_format_it_does_not_update_is_rejected(method, layer):
    with pytest.raises(ValueError, match=f"method '{method}' runs on .*layer '0' is {type(layer).__name__}"):
        Sparsifier(nn.Sequential(layer), DSTConfig(method=method), 10)


@pytest.mark.parametrize("layer", [kernels.SparseLinear(8, 8, density=0.5), kernels.FanInLinear(8, 8, k=2),
                                   kernels.DiagLinear(8, 8, 0.5)])
def test_static_runs_on_every_format_and_never_changes_it(layer):
    model = nn.Sequential(layer)
    sparsifier = Sparsifier(model, DSTConfig(method="static", delta_t=1), 10)
    rows, cols = (t.clone() for t in layer.coords())
    for step in range(4):
        assert sparsifier.step(step, None) is None
    assert all(torch.equal(a, b) for a, b in zip((rows, cols), layer.coords()))


def test_bad_arguments_are_named():
    model = tiny_model(DSTConfig(method="srigl"))
    with pytest.raises(ValueError, match="total_steps"):
        Sparsifier(model, DSTConfig(method="srigl"), 0)
    with pytest.raises(ValueError, match="heads .*'head'"):
        Sparsifier(model, DSTConfig(method="srigl"), 10, heads=["head"])
    with pytest.raises(ValueError, match="method"):
        Sparsifier(model, DSTConfig(method="rigl-ish"), 10)


def test_capture_hooks_only_on_update_steps_of_gradient_rules():
    for method, wants in (("rigl", True), ("srigl", True), ("gse", True), ("set", False), ("dynadiag", True)):
        model, sparsifier, opt = _setup(method)
        for step in range(4):
            with sparsifier.capture(step):
                x, y = batch(step)
                (model(x) - y).square().mean().backward()
            recorded = sparsifier.captured()
            assert bool(recorded) == (wants and step % 2 == 0 and step > 0), (method, step)
            opt.step()
            opt.zero_grad()
            sparsifier.step(step, opt)
            assert sparsifier.captured() == {}
        assert all(not layer._forward_hooks for layer in sparsifier.layers.values())


def test_captured_activations_of_accumulated_micro_batches_give_the_weight_gradient():
    model, sparsifier, _ = _setup("rigl")
    with sparsifier.capture(2):
        for micro in range(3):
            x, y = batch(micro, tokens=5)
            ((model(x) - y).square().mean() / 3).backward()
    for name, (dy, x) in sparsifier.captured().items():
        layer = sparsifier.layers[name]
        assert dy.shape == (15, layer.out_features) and x.shape == (15, layer.in_features)
        grad = kernels.sddmm(dy, x, layer.rows, layer.cols)
        assert torch.allclose(grad, layer.values.grad, atol=1e-6)


def test_step_reports_counts_and_densities_only_when_masks_change():
    model, sparsifier, opt = _setup("rigl")
    assert train_step(model, sparsifier, opt, 1)[1] is None
    stats = train_step(model, sparsifier, opt, 2)[1]
    assert set(stats) == {"step", "drop_fraction", "seconds", "layers"}
    assert set(stats["layers"]) == {"0", "2"}
    assert set(stats["layers"]["0"]) >= {"kept", "dropped", "grown", "density"}
    assert sparsifier.densities() == {n: layer.density() for n, layer in sparsifier.layers.items()}


def _fingerprint(model):
    return [t.detach().clone() for t in model.state_dict().values()]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("method, overrides, stop", [
    ("set", {}, 5), ("rigl", {}, 5), ("gse", {"grow": "graest"}, 5), ("srigl", {"grow": "uniform"}, 5),
    ("srigl", {"grow": "exact", "gamma_sal": 0.9}, 7), ("dynadiag", {"freeze_at": 0.75}, 5),
    ("dynadiag", {"freeze_at": 0.25}, 7)])
def test_resuming_from_a_state_dict_reproduces_the_uninterrupted_run(method, overrides, stop):
    model, sparsifier, opt = _setup(method, **overrides)
    for step in range(12):
        train_step(model, sparsifier, opt, step)
    straight = _fingerprint(model)

    model, sparsifier, opt = _setup(method, **overrides)
    for step in range(stop):
        train_step(model, sparsifier, opt, step)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sparsifier.state_dict()})
    # A fresh process: other initial weights, then the documented order of loading.
    model, sparsifier, opt = _setup(method, seed=5, **overrides)
    sparsifier.load_state_dict(saved["sparsifier"])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for step in range(stop, 12):
        train_step(model, sparsifier, opt, step)
    resumed = _fingerprint(model)
    assert len(straight) == len(resumed)
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(straight, resumed))


def test_a_state_of_another_method_is_refused():
    _, rigl, _ = _setup("rigl")
    _, gse, _ = _setup("gse")
    with pytest.raises(ValueError, match="method 'rigl'"):
        gse.load_state_dict(rigl.state_dict())


@pytest.mark.parametrize("method", dst.METHODS)
def test_a_tiny_training_run_lowers_the_loss(method):
    # gamma_sal 0.3: SRigL's value for non-transformer nets (0.95 ablates most of a 24-wide MLP).
    cfg = DSTConfig(method=method, sparsity=0.6, delta_t=8, t_end=0.75, seed=0, gamma_sal=0.3)
    model = tiny_model(cfg, density=0.4)
    sparsifier = Sparsifier(model, cfg, 80)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = [train_step(model, sparsifier, opt, step)[0] for step in range(80)]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f"{method}: {first:.4f} -> {last:.4f}")
    assert last < 0.7 * first, f"{method}: loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("method, overrides", [
    ("set", {}), ("rigl", {"grow": "grabo"}), ("gse", {"grow": "graest"}), ("srigl", {"grow": "uniform"}),
    ("dynadiag", {"freeze_at": 0.5})])
def test_the_same_seed_gives_the_same_masks_for_every_method(method, overrides):
    masks = []
    for _ in range(2):
        model, sparsifier, opt = _setup(method, **overrides)
        for step in range(9):
            train_step(model, sparsifier, opt, step)
        masks.append([torch.cat([t.reshape(-1).long() for t in layer.coords()])
                      for layer in sparsifier.layers.values()])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


@pytest.mark.parametrize("method, overrides", [
    ("rigl", {}), ("gse", {"grow": "grabo"}), ("srigl", {}), ("srigl", {"grow": "graest"}), ("dynadiag", {})])
def test_updates_run_on_a_bfloat16_model(method, overrides):
    cfg = DSTConfig(method=method, sparsity=0.7, delta_t=1, t_end=1.0, freeze_at=0.5, **overrides)
    model = tiny_model(cfg).to(torch.bfloat16)
    nnz = {name: m.nnz() for name, m in model.named_children() if isinstance(m, kernels.SparseLayer)}
    sparsifier = Sparsifier(model, cfg, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    updates = 0
    for step in range(6):
        x, y = batch(step)
        with sparsifier.capture(step):
            (model(x.bfloat16()) - y.bfloat16()).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        updates += sparsifier.step(step, opt) is not None
    assert updates >= 3
    for name, layer in sparsifier.layers.items():
        assert layer.values.dtype == torch.bfloat16
        if method == "srigl":
            assert layer.nnz() <= sparsifier.budgets[name]
        else:
            assert layer.nnz() == nnz[name], "exact count (DynaDiag: K diagonals once frozen)"


def test_an_optimizer_built_before_the_sparsifier_is_refused_for_dynadiag():
    cfg = DSTConfig(method="dynadiag", delta_t=2)
    model = tiny_model(cfg)
    early = torch.optim.Adam(model.parameters(), lr=0.01)  # before the gate scores exist
    sparsifier = Sparsifier(model, cfg, 10)
    with pytest.raises(ValueError, match="build it after dst.Sparsifier"):
        sparsifier.step(0, early)
    sparsifier.step(0, torch.optim.Adam(model.parameters(), lr=0.01))  # the right order runs
