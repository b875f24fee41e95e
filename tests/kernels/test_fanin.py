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


@pytest.mark.parametrize("T", [37, 48])
@pytest.mark.parametrize("x_t", [0, 1])
@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_activation_layouts_of_the_kernels(monkeypatch, x_t, ablate, dtype, T):
    """X_T = 1 (token-contiguous copies of x / dx / dy, the GPU default) and X_T = 0 give the
    reference's forward and both gradients, with ragged (T = 37) and whole (T = 48, the
    kernels' unmasked EVEN_T loop) token tiles."""
    from kernels import runtime as rt

    real = rt.launch_config
    forced = {"fanin_fwd", "fanin_dx", "sddmm"}
    monkeypatch.setattr(rt, "launch_config", lambda kernel, key, default, device=None: dict(
        real(kernel, key, default, device), **({"X_T": x_t, "BLOCK_T": 16} if kernel in forced else {})))
    g = torch.Generator().manual_seed(7)
    values, indices, rows = make_pattern(g, 45, 30, 6, 21 if ablate else 30)
    rows_arg = rows.to(DEVICE) if ablate else None
    x = torch.randn(T, 45, generator=g)
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


def _ragged_pattern(g, n_in, n_out, k, n_active, hot=()):
    """A fan-in pattern whose fan-out per input column is ragged: ``hot`` columns are in
    every active row, the others drawn at random from the first half (the second half of
    the inputs stays empty when k allows)."""
    rest = [c for c in range(max(1, n_in // 2)) if c not in hot] or [c for c in range(n_in) if c not in hot]
    rows = []
    for _ in range(n_active):
        pick = torch.tensor(rest)[torch.randperm(len(rest), generator=g)[:k - len(hot)]].tolist()
        rows.append(sorted(list(hot) + pick))
    indices = torch.tensor(rows, dtype=torch.int32).reshape(n_active, k)
    out_rows = torch.randperm(n_out, generator=g)[:n_active].sort().values.to(torch.int32)
    values = torch.randn(n_active, k, generator=g, dtype=torch.float64)
    return values, indices, out_rows


@pytest.mark.parametrize("block_r", [1, 4, 32])
@pytest.mark.parametrize("ablate", [False, True])
def test_fanout_structure_is_the_transposed_pattern(block_r, ablate):
    """Read back as a dense W^T, the sliced ELL equals the transpose of the fan-in weight:
    ragged fan-out, empty columns, ablated rows; columns heaviest first; padding never live;
    within a column the output neurons ascend (the fixed summation order)."""
    from kernels.fanin import fanout_structure
    g = torch.Generator().manual_seed(5)
    n_in, n_out = 23, 17
    values, indices, rows = _ragged_pattern(g, n_in, n_out, 5, 11 if ablate else n_out, hot=(3, 8))
    rows_arg = rows if ablate else None
    slot_col, slot_count, slice_start, slice_width, ell, max_width = fanout_structure(indices, rows_arg, n_in, block_r, n_out)
    assert slot_col.numel() % block_r == 0 and sorted(slot_col[slot_col >= 0].tolist()) == list(range(n_in))
    assert slot_count.tolist() == sorted(slot_count.tolist(), reverse=True)
    assert max_width == int(slot_count.max()) == int(slice_width[0])
    assert slot_count[slot_col == 8].item() == indices.shape[0]  # a hot column: in every row
    wt = torch.zeros(n_in, n_out, dtype=torch.float64)
    for s in range(slice_width.numel()):
        for i in range(block_r):
            col, count = int(slot_col[s * block_r + i]), int(slot_count[s * block_r + i])
            assert count <= int(slice_width[s])
            neurons = []
            for j in range(count):
                e = int(ell[int(slice_start[s]) + j * block_r + i])
                pos, neuron = e & 0xFFFFFFFF, e >> 32
                wt[col, neuron] += values.reshape(-1)[pos]
                neurons.append(neuron)
            assert neurons == sorted(neurons)
            for j in range(count, int(slice_width[s])):  # padding: the zero row of dy
                assert int(ell[int(slice_start[s]) + j * block_r + i]) == n_out << 32
    assert torch.equal(wt, fanin_to_dense(values, indices, n_in, rows_arg, n_out).t())
    empty = sorted(set(range(n_in)) - set(indices.flatten().tolist()))
    assert empty and all(slot_count[slot_col == c].item() == 0 for c in empty)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 63, 123])
def test_input_gradient_kernel_with_ragged_fan_out_and_ablated_rows(T, dtype):
    """dX of the Triton kernel vs the fp64 reference dY W (2x torch's own error in bf16):
    a column in every row, empty columns (poisoned outputs must be written), ablated rows,
    token counts that split the fan-out loop (T = 1) and ragged token tiles."""
    from kernels.fanin import fanin_dx
    from .conftest import assert_matches
    g = torch.Generator().manual_seed(T)
    n_in, n_out = 70, 41
    values, indices, rows = _ragged_pattern(g, n_in, n_out, 6, 29, hot=(0,))
    dy = torch.randn(T, n_out, generator=g, dtype=torch.float64)
    w = fanin_to_dense(values, indices, n_in, rows, n_out)
    low_dy, low_v = dy.to(dtype), values.to(dtype)
    ref64 = low_dy.double() @ fanin_to_dense(low_v.double(), indices, n_in, rows, n_out)
    lowp = (low_dy @ fanin_to_dense(low_v, indices, n_in, rows, n_out)) if dtype == torch.bfloat16 else None
    with kernels.use_backend("triton"):
        dx = fanin_dx(low_dy.to(DEVICE), low_v.to(DEVICE), indices.to(DEVICE), rows.to(DEVICE), n_in)
    assert_matches(dx.cpu(), ref64, lowp, "dx")
    assert torch.all(dx.cpu()[:, n_in // 2:] == 0) and w[:, n_in // 2:].abs().sum() == 0


def test_input_gradient_is_bitwise_reproducible():
    """Two backward passes give bitwise-equal input gradients (no atomics: a fixed order)."""
    g = torch.Generator().manual_seed(11)
    values, indices, rows = make_pattern(g, 96, 80, 12, 70)
    x = torch.randn(37, 96, generator=g, device="cpu").to(DEVICE).requires_grad_(True)
    args = (values.to(DEVICE), indices.to(DEVICE), rows.to(DEVICE), 80)
    dy = torch.randn(37, 80, generator=g).to(DEVICE)
    with kernels.use_backend("triton"):
        first, = torch.autograd.grad(kernels.fanin_matmul(x, *args), x, dy)
        second, = torch.autograd.grad(kernels.fanin_matmul(x, *args), x, dy)
    assert torch.equal(first, second)


def test_input_gradient_kernel_follows_pattern_changes():
    """The kernel's cached W^T index is rebuilt by a mask update in place, by a new index
    tensor (set_pattern) and by an ablation (fewer rows, larger k)."""
    g = torch.Generator().manual_seed(4)
    layer = kernels.FanInLinear(40, 24, k=5, generator=g).to(DEVICE)
    x = torch.randn(9, 40, generator=g).to(DEVICE).requires_grad_(True)

    def check():
        with kernels.use_backend("triton"):
            dx, = torch.autograd.grad(layer(x).square().sum(), x)
        ref_y = x @ layer.to_dense().t() + layer.bias
        ref, = torch.autograd.grad(ref_y.square().sum(), x)
        torch.testing.assert_close(dx, ref)

    check()
    with torch.no_grad():
        layer.indices[:3] = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(3)]).to(layer.indices)
    check()
    values, indices, rows = make_pattern(g, 40, 24, 8, 15)
    layer.set_pattern(values.to(DEVICE), indices.to(DEVICE), rows.to(DEVICE))
    check()


@settings(max_examples=15, deadline=None)
@given(n_in=st.integers(1, 50), n_out=st.integers(1, 50), T=st.integers(1, 70), seed=st.integers(0, 2 ** 16))
def test_input_gradient_kernel_matches_reference_on_random_shapes(n_in, n_out, T, seed):
    from kernels.fanin import fanin_dx
    g = torch.Generator().manual_seed(seed)
    k = 1 + seed % n_in
    n_active = 1 + seed % n_out
    values, indices, rows = make_pattern(g, n_in, n_out, k, n_active)
    values = values.double()
    dy = torch.randn(T, n_out, generator=g, dtype=torch.float64)
    with kernels.use_backend("triton"):
        dx = fanin_dx(dy.to(DEVICE), values.to(DEVICE), indices.to(DEVICE), rows.to(DEVICE), n_in)
    torch.testing.assert_close(dx.cpu(), dy @ fanin_to_dense(values, indices, n_in, rows, n_out), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 40])
def test_outputs_past_the_stored_rows_are_zero_without_a_row_list(T):
    """rows=None with out_features > n_rows: the first n_rows neurons, the rest ablated (0) -
    the kernel must not leave them unwritten (fresh outputs are NaN-poisoned here)."""
    g = torch.Generator().manual_seed(2)
    values, indices, _ = make_pattern(g, 9, 3, 2, 3)
    x = torch.randn(T, 9, generator=g)
    with kernels.use_backend("triton"):
        y = kernels.fanin_matmul(x.to(DEVICE), values.to(DEVICE), indices.to(DEVICE), None, 7).cpu()
    torch.testing.assert_close(y, fanin_matmul_ref(x, values, indices, None, 7))


def test_raw_launchers_need_no_row_list_for_a_full_pattern():
    # the common case another project calls first: no ablated rows, y as wide as values
    torch.manual_seed(0)
    x = torch.randn(7, 24, dtype=torch.float64, device=DEVICE)
    idx = torch.stack([torch.randperm(24)[:5] for _ in range(12)]).to(torch.int32).to(DEVICE)
    v = torch.randn(12, 5, dtype=torch.float64, device=DEVICE)
    ref = fanin_matmul_ref(x, v, idx)
    torch.testing.assert_close(kernels.fanin_fwd(x, v, idx), ref)
    torch.testing.assert_close(kernels.fanin_fwd(x, v, idx, out_features=15)[:, :12], ref)
    dy = torch.randn(7, 12, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(kernels.fanin_dx(dy, v, idx, in_features=24), dy @ fanin_to_dense(v, idx, 24))
    with pytest.raises(ValueError, match="in_features"):
        kernels.fanin_dx(dy, v, idx)


@pytest.mark.parametrize("order", ["ascending", "shuffled", "none, out wider"])
@pytest.mark.parametrize("T", [1, 7, 40])
def test_stored_rows_in_any_order_give_the_reference_on_every_path(backend, order, T):
    """Ascending rows (FanInLinear's, SRigL's) take the CSR over every output with the ablated
    rows empty; shuffled ones the product of the stored rows scattered into y; None with
    out_features > n_rows the first rows."""
    g = torch.Generator().manual_seed(T)
    values, indices, rows = make_pattern(g, 50, 37, 6, 29)
    rows = {"ascending": rows.sort().values, "shuffled": rows, "none, out wider": None}[order]
    if rows is not None:
        assert (order == "ascending") == bool((rows[1:] > rows[:-1]).all())
        rows = rows.to(DEVICE)
    x = torch.randn(T, 50, generator=g)
    check_op(lambda x, v: kernels.fanin_matmul(x, v, indices.to(DEVICE), rows, 37),
             lambda x, v: fanin_matmul_ref(x, v, indices.to(DEVICE), rows, 37),
             [x.to(DEVICE), values.to(DEVICE)], torch.float32)
