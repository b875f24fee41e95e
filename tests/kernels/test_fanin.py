"""kernels/fanin.py: constant fan-in product, its gradients, ablated rows and the layer."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernels
from kernels.fanin import fanin_matmul_ref, fanin_to_dense

from .conftest import DEVICE, check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_pattern(g, n_in, n_out, k, n_active):
    indices = torch.stack([torch.randperm(n_in, generator=g)[:k] for _ in range(n_active)] or
                          [torch.empty(0, k, dtype=torch.int64)]).to(torch.int32)
    rows = torch.randperm(n_out, generator=g)[:n_active].to(torch.int32)
    values = torch.randn(n_active, k, generator=g)
    return values, indices.reshape(n_active, k), rows


@st.composite
def fanin_cases(draw):
    n_in = draw(st.integers(1, 70))
    n_out = draw(st.integers(1, 70))
    k = draw(st.integers(1, n_in))
    n_active = draw(st.integers(0, n_out))
    T = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    ablate = draw(st.booleans())
    return n_in, n_out, k, n_active if ablate else n_out, T, dtype, ablate, draw(st.integers(0, 2 ** 16))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=fanin_cases())
def test_fanin_matches_dense_reference_with_gradients(backend, case):
    n_in, n_out, k, n_active, T, dtype, ablate, seed = case
    g = torch.Generator().manual_seed(seed)
    values, indices, rows = make_pattern(g, n_in, n_out, k, n_active)
    x = torch.randn(T, n_in, generator=g)
    rows_arg = rows.to(DEVICE) if ablate else None
    if not ablate:
        rows_arg = None
    check_op(lambda x, v: kernels.fanin_matmul(x, v, indices.to(DEVICE), rows_arg, n_out),
             lambda x, v: fanin_matmul_ref(x, v, indices.to(DEVICE), rows_arg, n_out),
             [x.to(DEVICE), values.to(DEVICE)], dtype)


@pytest.mark.parametrize("T,n_in,n_out,k", [(1, 63, 123, 1), (5, 64, 16, 64), (3, 123, 63, 7), (2, 1, 1, 1)])
def test_fanin_edge_shapes(backend, T, n_in, n_out, k):
    g = torch.Generator().manual_seed(0)
    values, indices, _ = make_pattern(g, n_in, n_out, k, n_out)
    x = torch.randn(T, n_in, generator=g)
    check_op(lambda x, v: kernels.fanin_matmul(x, v, indices.to(DEVICE)),
             lambda x, v: fanin_matmul_ref(x, v, indices.to(DEVICE)),
             [x.to(DEVICE), values.to(DEVICE)], torch.float32)


def test_ablated_rows_output_zero_and_get_no_gradient(backend):
    g = torch.Generator().manual_seed(0)
    values, indices, rows = make_pattern(g, 20, 10, 4, 6)
    x = torch.randn(3, 20, generator=g, requires_grad=True)
    y = kernels.fanin_matmul(x, values, indices, rows, 10)
    ablated = sorted(set(range(10)) - set(rows.tolist()))
    assert torch.all(y[:, ablated] == 0)
    y[:, ablated].sum().backward()
    assert torch.all(x.grad == 0)


def test_leading_dims_and_noncontiguous_input(backend):
    g = torch.Generator().manual_seed(0)
    values, indices, _ = make_pattern(g, 16, 12, 5, 12)
    x = torch.randn(2, 16, 3, 7, generator=g).transpose(1, 3)  # [2, 7, 3, 16], non-contiguous
    y = kernels.fanin_matmul(x, values, indices)
    assert y.shape == (2, 7, 3, 12)
    torch.testing.assert_close(y, fanin_matmul_ref(x, values, indices), rtol=1e-5, atol=1e-5)


def test_stride0_gradient_from_sum(backend):
    g = torch.Generator().manual_seed(0)
    values, indices, _ = make_pattern(g, 16, 12, 5, 12)
    values.requires_grad_(True)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    kernels.fanin_matmul(x, values, indices).sum().backward()
    v2, x2 = values.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    fanin_matmul_ref(x2, v2, indices).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, v2.grad, rtol=1e-5, atol=1e-5)


def test_layer_matches_its_dense_view_and_mask():
    torch.manual_seed(0)
    layer = kernels.FanInLinear(40, 24, density=0.25)
    assert layer.k == 10 and layer.nnz() == 240
    m = layer.mask()
    assert m.sum(1).tolist() == [10] * 24
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias)
    assert torch.equal(layer.to_dense() != 0, m)


def test_layer_init_is_scaled_by_the_real_fan_in():
    torch.manual_seed(0)
    layer = kernels.FanInLinear(1000, 200, k=16)
    assert layer.values.abs().max() <= 1 / 16 ** 0.5
    assert layer.values.abs().max() > 0.8 / 16 ** 0.5


def test_from_dense_keeps_explicit_zeros_and_ablated_rows():
    w = torch.randn(6, 8)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[0, [1, 3]] = mask[2, [0, 7]] = mask[5, [2, 4]] = True
    w[0, 1] = 0.0  # a regrown weight at exactly zero must stay in the pattern
    layer = kernels.FanInLinear.from_dense(w, mask, torch.zeros(6))
    assert torch.equal(layer.mask(), mask)
    assert layer.rows.tolist() == [0, 2, 5]
    torch.testing.assert_close(layer.to_dense(), w * mask)


def test_from_dense_rejects_uneven_fan_in():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 0] = mask[1, :2] = True
    with pytest.raises(ValueError, match="constant fan-in"):
        kernels.FanInLinear.from_dense(torch.randn(3, 4), mask)


def test_state_dict_round_trips_across_a_changed_pattern():
    torch.manual_seed(0)
    a = kernels.FanInLinear(30, 20, k=6)
    g = torch.Generator().manual_seed(3)
    values, indices, rows = make_pattern(g, 30, 20, 9, 13)
    a.set_pattern(values, indices, rows)  # ablation: 13 rows of k = 9
    b = kernels.FanInLinear(30, 20, k=6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 30)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.mask(), b.mask())


@pytest.mark.parametrize("x_t", [0, 1])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_activation_layouts_of_the_kernels(monkeypatch, x_t, ablate, dtype):
    """X_T = 1 (token-contiguous copies of x / dx / dy, the GPU default) and X_T = 0 give the
    reference's forward and both gradients, ragged token tiles included."""
    from kernels import runtime as rt

    real = rt.launch_config
    forced = {"fanin_fwd", "fanin_dx", "sddmm"}
    monkeypatch.setattr(rt, "launch_config", lambda kernel, key, default, device=None: dict(
        real(kernel, key, default, device), **({"X_T": x_t, "BLOCK_T": 16} if kernel in forced else {})))
    g = torch.Generator().manual_seed(7)
    values, indices, rows = make_pattern(g, 45, 30, 6, 21 if ablate else 30)
    rows_arg = rows.to(DEVICE) if ablate else None
    x = torch.randn(37, 45, generator=g)
    with kernels.use_backend("triton"):
        check_op(lambda x, v: kernels.fanin_matmul(x, v, indices.to(DEVICE), rows_arg, 30),
                 lambda x, v: fanin_matmul_ref(x, v, indices.to(DEVICE), rows_arg, 30),
                 [x.to(DEVICE), values.to(DEVICE)], dtype)


def test_cpu_input_gradient_follows_in_place_pattern_changes():
    """The CPU input gradient caches W^T's structure per index tensor: an in-place change of
    the indices (or rows) must rebuild it, and a new index tensor must not reuse it."""
    from kernels.fanin import fanin_dx_torch
    g = torch.Generator().manual_seed(3)
    values, indices, rows = make_pattern(g, 20, 12, 4, 9)
    dy = torch.randn(5, 12, generator=g)

    def reference():
        return dy @ fanin_to_dense(values, indices, 20, rows, 12)

    torch.testing.assert_close(fanin_dx_torch(dy, values, indices, rows, 20), reference())
    indices[0] = torch.randperm(20, generator=g)[:4].to(torch.int32)  # a mask update in place
    torch.testing.assert_close(fanin_dx_torch(dy, values, indices, rows, 20), reference())
    rows[[0, 1]] = rows[[1, 0]]
    torch.testing.assert_close(fanin_dx_torch(dy, values, indices, rows, 20), reference())
    indices = indices.flip(1).contiguous()  # another tensor
    torch.testing.assert_close(fanin_dx_torch(dy, values, indices, rows, 20), reference())
