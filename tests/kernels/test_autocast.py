"""The sparse layers and ops under torch.autocast: they follow torch's rule for matmuls (inputs
cast to the region's dtype, output in that dtype, parameters' gradients in the parameters'
dtype), whatever dtype the incoming activation has, on both backends."""
import pytest
import torch

import kernels

from .conftest import DEVICE, assert_matches

LAYERS = {
    "diag b=16": lambda g: kernels.DiagLinear(64, 96, density=0.3, block_size=16, generator=g),
    "diag b=1": lambda g: kernels.DiagLinear(48, 40, density=0.3, block_size=1, generator=g),
    "fan-in": lambda g: kernels.FanInLinear(48, 40, density=0.3, generator=g),
    "unstructured": lambda g: kernels.SparseLinear(48, 40, density=0.3, generator=g),
}


def dense_grad_at_pattern(layer, g64, x64):
    """The fp64 weight gradient g^T x read at the layer's stored coordinates."""
    rows, cols = layer.coords()
    return (g64.t() @ x64)[rows.long(), cols.long()].reshape(layer.values.shape)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", ["fp32", "amp"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_under_autocast_matches_the_dense_product_of_the_cast_inputs(backend, name, x_dtype, amp):
    g = torch.Generator().manual_seed(0)
    layer = LAYERS[name](g).to(DEVICE)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    # fp32 input (after a LayerNorm) or an input already in the autocast dtype (after a GELU)
    x = torch.randn(2, 5, layer.in_features, generator=g).to(DEVICE)
    x = x.to(amp) if x_dtype == "amp" else x
    x.requires_grad_(True)
    dense = layer.to_linear()
    with torch.autocast(DEVICE, dtype=amp):
        y = layer(x)
        y_torch = dense(x.detach())  # torch's own error at this dtype
    assert y.dtype == amp
    w64, b64, x64 = (t.detach().to(amp).double() for t in (dense.weight, layer.bias, x))
    y64 = x64 @ w64.t() + b64
    assert_matches(y, y64, y_torch)

    gy = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(gy.to(amp))
    gy64 = gy.to(amp).double()
    assert layer.values.grad.dtype == layer.values.dtype == torch.float32
    assert x.grad.dtype == x.dtype and layer.bias.grad.dtype == torch.float32
    flat_g, flat_x = gy64.reshape(-1, layer.out_features), x64.reshape(-1, layer.in_features)
    assert_matches(x.grad.to(amp), gy64 @ w64, None, "grad of x")
    assert_matches(layer.values.grad.to(amp), dense_grad_at_pattern(layer, flat_g, flat_x), None, "grad of values")
    assert_matches(layer.bias.grad.to(amp), flat_g.sum(0), None, "grad of bias")


def test_ops_called_directly_cast_mixed_inputs_and_leave_fp64_alone(backend):
    g = torch.Generator().manual_seed(3)
    dy, x = torch.randn(6, 8, generator=g).to(DEVICE), torch.randn(6, 5, generator=g).to(DEVICE)
    rows, cols = (torch.tensor(v, dtype=torch.int32, device=DEVICE) for v in ([0, 3, 7], [4, 0, 2]))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = kernels.sddmm(dy.to(torch.bfloat16), x, rows, cols)   # bf16 and fp32 mixed
        out64 = kernels.sddmm(dy.double(), x.double(), rows, cols)  # fp64 is not autocast's business
    assert out.dtype == torch.bfloat16 and out64.dtype == torch.float64
    ref = (dy.to(torch.bfloat16).double().t() @ x.to(torch.bfloat16).double())[rows.long(), cols.long()]
    assert_matches(out, ref, None)
    assert_matches(out64, (dy.double().t() @ x.double())[rows.long(), cols.long()], None)


def test_autocast_off_inside_the_op_keeps_fp32_exact():
    """Outside an autocast region nothing changes: fp32 in, fp32 out, same numbers."""
    g = torch.Generator().manual_seed(4)
    layer = LAYERS["fan-in"](g).to(DEVICE)
    x = torch.randn(3, layer.in_features, generator=g).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=False):
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x))


@pytest.mark.parametrize("name", ["diag b=16", "fan-in"])
def test_compiled_layer_under_autocast_equals_eager(name):
    g = torch.Generator().manual_seed(5)
    layer = LAYERS[name](g).to(DEVICE)
    x = torch.randn(4, layer.in_features, generator=g).to(DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, y_eager = compiled(x), layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_eager)
