"""The CPU inference path of the layers (SparseLayer.cpu_inference): a product with a cached copy
of the weight - the native library's in fp32 (tests/kernels/test_cpu_native.py tests it on its
own), one MKL addmv (one token) or addmm (more) on a CSR / BSR in fp64. Same answer as the
custom op, taken only when it applies, rebuilt when the values or the pattern change."""
import pytest
import torch

import kernels
from kernels import diag, fanin, sparse


def ablated_fanin(g):
    layer = kernels.FanInLinear(40, 24, k=7, generator=g)
    keep = torch.randperm(24, generator=g)[:15].to(torch.int32)  # unsorted surviving neurons
    idx = torch.stack([torch.randperm(40, generator=g)[:7] for _ in range(15)]).to(torch.int32)
    layer.set_pattern(torch.randn(15, 7, generator=g), idx, keep)
    return layer


LAYERS = {
    "fan-in": lambda g: kernels.FanInLinear(40, 24, density=0.25, generator=g),
    "fan-in ablated": ablated_fanin,
    "diag b=1 wide": lambda g: kernels.DiagLinear(48, 20, density=0.3, block_size=1, generator=g),
    "diag b=1 tall": lambda g: kernels.DiagLinear(20, 48, density=0.3, block_size=1, generator=g),
    "diag b=16": lambda g: kernels.DiagLinear(64, 32, density=0.5, block_size=16, generator=g),
    "diag b=4 tall": lambda g: kernels.DiagLinear(16, 48, density=0.5, block_size=4, generator=g),
    "unstructured": lambda g: kernels.SparseLinear(40, 24, density=0.25, generator=g),
}
OPS = {kernels.FanInLinear: (fanin, "_fanin_op"), kernels.DiagLinear: (diag, "_diag_op"),
       kernels.SparseLinear: (sparse, "_sparse_op")}


def forbid_op(monkeypatch, layer):
    module, name = OPS[type(layer)]

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op ran: the batch-1 inference path was not taken")
    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_without_grad_the_cached_weight_path_is_taken_and_matches(name, dtype, tokens, monkeypatch):
    g = torch.Generator().manual_seed(0)
    layer = LAYERS[name](g).to(dtype)
    x = torch.randn(1, tokens, layer.in_features, generator=g, dtype=dtype)
    ref = x @ layer.to_dense().t() + layer.bias.detach()
    y_op = layer(x)  # grad enabled and values require grad: the custom op
    forbid_op(monkeypatch, layer)
    with torch.no_grad():
        y = layer(x)
    with torch.inference_mode():
        y_inf = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert y.shape == (1, tokens, layer.out_features) and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y, y_op.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(y_inf, y)


@pytest.mark.parametrize("name", ["fan-in", "diag b=1 wide", "diag b=4 tall", "unstructured"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_cached_weight_follows_value_and_pattern_changes(name, tokens):
    g = torch.Generator().manual_seed(1)
    layer = LAYERS[name](g)
    x = torch.randn(tokens, layer.in_features, generator=g)
    with torch.no_grad():
        layer(x)  # builds the cache
        layer.values.mul_(-2.0)  # an optimizer step changes values in place
        torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(3, layer.in_features, generator=g)).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias)
    if isinstance(layer, kernels.FanInLinear):  # a mask update swaps the pattern
        idx = torch.stack([torch.randperm(layer.in_features, generator=g)[:5] for _ in range(10)]).to(torch.int32)
        layer.set_pattern(torch.randn(10, 5, generator=g), idx, torch.arange(10, dtype=torch.int32))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias)


def test_the_path_is_skipped_where_it_does_not_apply(monkeypatch):
    g = torch.Generator().manual_seed(2)
    layer = LAYERS["fan-in"](g)
    x1, x3 = torch.randn(1, 40, generator=g), torch.randn(3, 40, generator=g)
    monkeypatch.setattr(layer, "_inference_weight", lambda *args, **kwargs: pytest.fail("CSR path taken"))
    layer(x1)  # gradient wanted
    layer(x3)
    with torch.no_grad(), kernels.cpu.disabled():
        layer.to(torch.bfloat16)(x1.to(torch.bfloat16))  # MKL has no bf16 (the native library has)
    with torch.no_grad(), kernels.cpu.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.to(torch.float32)(x1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        layer(x1)  # fp16: no native product
    gated = kernels.DiagLinear(48, 20, density=0.3, block_size=1, generator=g)
    gated.enable_gate(k_target=gated.num_diagonals, temperature=1.0)
    monkeypatch.setattr(gated, "_inference_weight", lambda *args, **kwargs: pytest.fail("CSR path taken with the gate on"))
    with torch.no_grad():
        gated(torch.randn(1, 48, generator=g))


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU tensors on the Triton backend need the interpreter, which is off where CUDA is present")
def test_the_triton_backend_runs_the_kernel_not_the_cached_path(monkeypatch):
    layer = LAYERS["fan-in"](torch.Generator().manual_seed(2))
    monkeypatch.setattr(layer, "_inference_weight", lambda *args, **kwargs: pytest.fail("CSR path taken"))
    with kernels.use_backend("triton"), torch.no_grad():
        layer(torch.randn(1, 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")
def test_gpu_tensors_never_take_the_cpu_path(monkeypatch):
    layer = LAYERS["fan-in"](torch.Generator().manual_seed(2)).cuda()
    monkeypatch.setattr(layer, "_inference_weight", lambda *args, **kwargs: pytest.fail("CSR path taken"))
    with torch.no_grad():
        layer(torch.randn(1, 40, device="cuda"))


def test_a_corrupt_pattern_is_reported_not_multiplied():
    g = torch.Generator().manual_seed(3)
    layer = LAYERS["unstructured"](g)
    layer.cols[0] = layer.in_features + 5  # a buffer edited behind the layer's back
    with torch.no_grad(), pytest.raises(ValueError, match="cols"):
        layer(torch.randn(1, layer.in_features, generator=g))


def test_a_training_forward_drops_the_cached_copy():
    g = torch.Generator().manual_seed(4)
    layer = LAYERS["fan-in"](g)
    x = torch.randn(2, layer.in_features, generator=g)
    with torch.no_grad():
        layer(x)
    assert layer.__dict__.get("_inference_cache")
    layer(x).sum().backward()
    assert "_inference_cache" not in layer.__dict__
