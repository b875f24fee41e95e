"""models/transformer.py's fused MLP: the same outputs and gradients as the unfused MLP (values,
biases, DynaDiag gate scores, input) on both backends and across mask updates; when it runs
fused and when not; the configurations that can never fuse are refused at construction."""
import pytest
import torch

import kernels
from dst import DSTConfig, Sparsifier, make_layer
from models.bert import Bert, BertConfig

from models.transformer import MLP, sparse_layer_shapes
from models.vit import ViT, ViTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def diag_factory(block_size=16, density=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def linear(name, in_features, out_features, bias=True):
        return kernels.DiagLinear(in_features, out_features, density, block_size=block_size, bias=bias,
                                  dtype=dtype, generator=g).to(DEVICE)
    return linear


def gated_mlp(seed, dim=32, mlp_dim=64, dropout=0.0):
    """A fused MLP of two DiagLinear layers with DynaDiag's gate on and random scores."""
    mlp = MLP("mlp", dim, mlp_dim, dropout, diag_factory(seed=seed), fused=True)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in (mlp.fc1, mlp.fc2):
        layer.enable_gate(max(1, layer.num_diagonals - 1), 0.7,
                          torch.randn(layer.num_diagonals, generator=g).to(DEVICE))
    return mlp


def outputs_and_grads(model, *inputs):
    """The output and the gradient of every parameter and input for one fixed output gradient."""
    model.zero_grad(set_to_none=True)
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    y = model(*inputs)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype).to(y.device))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update({f"input{i}": x.grad.clone() for i, x in enumerate(inputs)})
    return y.detach(), grads


def fused_and_unfused(model, mlps, *inputs):
    """(output, grads) of ``model`` with its MLPs fused, then with them unfused."""
    results = []
    for fused in (True, False):
        for m in mlps:
            m.fused = fused
        results.append(outputs_and_grads(model, *inputs))
    for m in mlps:
        m.fused = True
    return results


def assert_same(fused, unfused):
    (y_f, g_f), (y_u, g_u) = fused, unfused
    torch.testing.assert_close(y_f, y_u, rtol=1e-10, atol=1e-10)
    assert g_f.keys() == g_u.keys()
    assert any(k.endswith("bias") for k in g_f)
    for name in g_f:
        assert g_f[name].abs().max() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(g_f[name], g_u[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("backend, tokens", [("torch", 37), ("triton", 3)])
def test_fused_mlp_gives_the_unfused_output_and_every_gradient(backend, tokens):
    """triton: the kernel itself (the interpreter on CPU: 3 tokens keep it to about a second)."""
    torch.manual_seed(0)
    mlp = gated_mlp(seed=1)
    x = torch.randn(tokens, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with kernels.use_backend(backend):
        fused, unfused = fused_and_unfused(mlp, [mlp], x)
    assert_same(fused, unfused)


def test_fused_vit_matches_unfused_through_mask_updates_and_the_freeze():
    """A DynaDiag ViT: equal before any update, after candidate resampling (new offsets, zero
    values, shifted scores) and after the freeze (top-K gates set to 1, gate off)."""
    torch.manual_seed(0)
    cfg = DSTConfig.for_method("dynadiag", block_size=16, sparsity=0.75, delta_t=2, freeze_at=0.5, alpha=1.0,
                               drop_schedule="constant")
    g = torch.Generator().manual_seed(0)
    model = ViT(ViTConfig.preset("micro", depth=2, fused_mlp=True),
                linear=lambda name, i, o, bias=True: make_layer(cfg, i, o, 0.25, bias=bias, generator=g)).double()
    sparsifier = Sparsifier(model, cfg, total_steps=8)   # resamples at step 2, freezes at step 4
    fc1 = model.blocks[0].mlp.fc1
    mlps = [b.mlp for b in model.blocks]
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    offsets = fc1.offsets.clone()
    for step in range(5):
        with sparsifier.capture(step):   # DynaDiag's grow scores read the captured gradients
            assert_same(*fused_and_unfused(model, mlps, images))
        optimizer.step()
        stats = sparsifier.step(step, optimizer)
        if step == 2:
            assert stats is not None and not torch.equal(offsets, fc1.offsets) and fc1.scores is not None
    assert sparsifier.frozen and fc1.scores is None
    assert_same(*fused_and_unfused(model, mlps, images))


def test_dropout_runs_unfused_in_training_and_fused_in_eval(monkeypatch):
    calls = []
    fused_mlp = kernels.fused_mlp
    monkeypatch.setattr(kernels, "fused_mlp", lambda *a: calls.append(1) or fused_mlp(*a))
    model = Bert(BertConfig.preset("micro", vocab_size=50, fused_mlp=True), linear=diag_factory(dtype=None))
    ids = torch.randint(0, 50, (2, 9)).to(DEVICE)
    model.train()(ids)
    assert calls == []
    model.eval()(ids)
    assert calls == [1]   # micro: one block


def test_a_layer_with_forward_hooks_runs_unfused_so_the_hooks_see_it(monkeypatch):
    calls, seen = [], []
    fused_mlp = kernels.fused_mlp
    monkeypatch.setattr(kernels, "fused_mlp", lambda *a: calls.append(1) or fused_mlp(*a))
    mlp = gated_mlp(seed=3)
    x = torch.randn(5, 32, dtype=torch.float64).to(DEVICE)
    mlp(x)
    handle = mlp.fc2.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    mlp(x)
    handle.remove()
    assert calls == [1] and seen == [(5, 32)]


@pytest.mark.parametrize("factory, message", [
    (lambda name, i, o, bias=True: torch.nn.Linear(i, o, bias), "mlp.fc1 is Linear"),
    (lambda name, i, o, bias=True: kernels.SparseLinear(i, o, 0.5, bias=bias), "mlp.fc1 is SparseLinear"),
    (diag_factory(block_size=8), "needs a block size >= 16; mlp.fc1 has block size 8"),
    (lambda name, i, o, bias=True: kernels.DiagLinear(i, o, 0.5, block_size=16 if name.endswith("fc1") else 32),
     "one block size for fc1 and fc2, got 16 and 32"),
])
def test_a_fused_mlp_that_can_never_fuse_is_refused_at_construction(factory, message):
    with pytest.raises(ValueError, match=message):
        MLP("mlp", 32, 64, 0.0, factory, fused=True)
    MLP("mlp", 32, 64, 0.0, factory, fused=False)


def test_layer_shapes_of_a_fused_config_are_those_of_the_unfused_one():
    cfg = ViTConfig.preset("micro", fused_mlp=True)
    assert sparse_layer_shapes(ViT, cfg) == sparse_layer_shapes(ViT, ViTConfig.preset("micro"))
    with pytest.raises(ValueError, match="fused_mlp must be a bool"):
        ViTConfig.preset("micro", fused_mlp=1).validate()
