"""kernels/diag/: wrap-around (block-)diagonal product, gradients, geometry and the layer."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import kernels
from kernels.diag import diag_matmul_ref, diag_to_dense, diagonals_for_density

from .conftest import DEVICE, assert_matches, check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def diag_cases(draw):
    b = draw(st.sampled_from([1, 1, 2, 4, 16, 32]))
    R = draw(st.integers(1, 6 if b < 16 else 4))
    C = draw(st.integers(1, 6 if b < 16 else 4))
    P = max(R, C)
    K = draw(st.integers(1, P))
    T = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    return b, R, C, K, T, dtype, draw(st.integers(0, 2 ** 16))


def make(g, b, R, C, K):
    D, P = min(R, C), max(R, C)
    offsets = torch.randperm(P, generator=g)[:K].to(torch.int32)
    return torch.randn(K, D, b, b, generator=g), offsets


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=diag_cases())
def test_diag_matches_dense_reference_with_gradients(backend, case):
    b, R, C, K, T, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    values, offsets = make(g, b, R, C, K)
    x = torch.randn(T, C * b, generator=g)
    off = offsets.to(DEVICE)
    check_op(lambda x, v: kernels.diag_matmul(x, v, off, b, R * b),
             lambda x, v: diag_matmul_ref(x, v, off, b, R * b),
             [x.to(DEVICE), values.to(DEVICE)], dtype)


@pytest.mark.parametrize("b,R,C,K", [(1, 123, 63, 5), (1, 63, 123, 63), (16, 3, 7, 7), (16, 7, 3, 1),
                                     (64, 2, 1, 2), (32, 1, 3, 3), (8, 5, 5, 5)])
def test_diag_edge_shapes(backend, b, R, C, K):
    g = torch.Generator().manual_seed(0)
    values, offsets = make(g, b, R, C, K)
    x = torch.randn(3, C * b, generator=g)
    off = offsets.to(DEVICE)
    check_op(lambda x, v: kernels.diag_matmul(x, v, off, b, R * b),
             lambda x, v: diag_matmul_ref(x, v, off, b, R * b),
             [x.to(DEVICE), values.to(DEVICE)], torch.float32)


@pytest.mark.parametrize("T", [31, 32, 70])
@pytest.mark.parametrize("R,C,K", [(40, 96, 7), (96, 40, 9), (50, 50, 6)])
def test_element_diagonals_weight_gradient_in_either_coordinate_order(monkeypatch, T, R, C, K):
    """b = 1 from 32 tokens on takes its weight gradient at the coordinates sorted by the side
    each diagonal walks in order (wide: rows, tall and square: columns, x and dy swapped) and
    permutes it back; below 32 the element order. Both against fp64, the sorted one checked to
    be taken (an SDDMM whose first coordinates never decrease)."""
    from kernels.diag import cpu as diag_cpu
    seen = []
    real = diag_cpu.sddmm
    monkeypatch.setattr(diag_cpu, "sddmm", lambda a, b, r, c, bs: seen.append(bool((r[1:] >= r[:-1]).all()))
                        or real(a, b, r, c, bs))
    g = torch.Generator().manual_seed(T + R)
    values, offsets = make(g, 1, R, C, K)
    x = torch.randn(T, C, generator=g)
    check_op(lambda x, v: kernels.diag_matmul(x, v, offsets, 1, R),
             lambda x, v: diag_matmul_ref(x, v, offsets, 1, R), [x, values], torch.float32)
    assert seen and all(seen) == (T >= 32 and kernels.cpu.lib() is not None)


@pytest.mark.parametrize("T", [32, 63, 64, 100])
@pytest.mark.parametrize("R,C,K", [(40, 96, 7), (96, 40, 9)])
def test_bf16_element_diagonals_sort_from_64_tokens_with_the_avx512_bf16_sddmm(monkeypatch, T, R, C, K):
    """bf16 dy and x: with the AVX-512-BF16 SDDMM ("sddmm_dpbf16") the sorted coordinates from 64
    tokens on, else from 32 as in fp32; the gradient against fp64 of the bf16 numbers."""
    from kernels.diag import cpu as diag_cpu
    seen = []
    real = diag_cpu.sddmm
    monkeypatch.setattr(diag_cpu, "sddmm", lambda a, b, r, c, bs: seen.append(bool((r[1:] >= r[:-1]).all()))
                        or real(a, b, r, c, bs))
    g = torch.Generator().manual_seed(T + R + 1)
    values, offsets = make(g, 1, R, C, K)
    x = torch.randn(T, C, generator=g).to(torch.bfloat16)
    dy = torch.randn(T, R, generator=g).to(torch.bfloat16)
    got = diag_cpu.diag_dw_torch(dy, x, offsets, 1)
    rows, cols = kernels.diag.element_coords(offsets, R, C, 1)
    ref = (dy.double().t() @ x.double())[rows.long(), cols.long()].reshape(got.shape)
    assert_matches(got, ref, (dy.t() @ x)[rows.long(), cols.long()].reshape(got.shape), f"T={T}")
    least = 64 if "sddmm_dpbf16" in kernels.cpu.features() else 32
    assert seen and all(seen) == (T >= least and kernels.cpu.lib() is not None)


@pytest.mark.parametrize("R,C", [(4, 4), (6, 3), (3, 6), (5, 2)])
def test_pattern_follows_the_wraparound_definition(R, C):
    P, D = max(R, C), min(R, C)
    for o in range(P):
        m = diag_to_dense(torch.ones(1, D, 1, 1), torch.tensor([o], dtype=torch.int32), C, R, 1) != 0
        expected = torch.zeros(R, C, dtype=torch.bool)
        for i in range(D):
            if R >= C:
                expected[(i + o) % R, i] = True
            else:
                expected[i, (i + o) % C] = True
        assert torch.equal(m, expected), (R, C, o)


def test_all_diagonals_cover_the_matrix_once():
    for R, C in [(4, 4), (6, 3), (3, 6)]:
        P, D = max(R, C), min(R, C)
        count = diag_to_dense(torch.ones(P, D, 1, 1), torch.arange(P, dtype=torch.int32), C, R, 1)
        assert torch.equal(count, torch.ones(R, C))


def test_one_diagonal_at_offset_zero_is_plain_block_diagonal(backend):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 4, 16, 16, generator=g)
    x = torch.randn(5, 64, generator=g)
    y = kernels.diag_matmul(x, values, torch.zeros(1, dtype=torch.int32), 16)
    torch.testing.assert_close(y, x @ torch.block_diag(*values[0]).t(), rtol=1e-5, atol=1e-5)


def test_transposed_pattern_is_diagonal_with_the_same_offsets():
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    w = diag_to_dense(torch.ones(3, 3, 2, 2), offsets, 6, 12, 2)  # R = 6, C = 3
    wt = diag_to_dense(torch.ones(3, 3, 2, 2), offsets, 12, 6, 2)  # R = 3, C = 6
    assert torch.equal(w.t(), wt)


def test_layer_density_and_dense_view():
    torch.manual_seed(0)
    layer = kernels.DiagLinear(64, 256, density=0.1, block_size=16)
    R, C, D, P = layer.geometry
    assert (R, C, D, P) == (16, 4, 4, 16)
    assert layer.num_diagonals == diagonals_for_density(64, 256, 16, 0.1) == 2
    assert layer.mask().sum().item() == layer.nnz() == 2 * 4 * 16 * 16
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias, rtol=1e-5, atol=1e-5)


def test_gate_scales_each_diagonal():
    torch.manual_seed(0)
    layer = kernels.DiagLinear(32, 32, num_diagonals=4, block_size=8)
    layer.enable_gate(k_target=2, temperature=1.0, scores=torch.tensor([5.0, 0.0, 0.0, -5.0]))
    a = layer.gate()
    assert a.shape == (4,) and 0 <= a.min() and a.max() <= 1 and a[0] == 1
    x = torch.randn(2, 32)
    ref = kernels.diag_matmul(x, layer.values * a[:, None, None, None], layer.offsets, 8) + layer.bias
    torch.testing.assert_close(layer(x), ref)
    layer(x).sum().backward()
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0


def test_from_dense_and_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.randn(48, 16)
    offsets = torch.tensor([1, 4], dtype=torch.int32)
    layer = kernels.DiagLinear.from_dense(w, offsets, torch.zeros(48), block_size=4)
    m = layer.mask()
    torch.testing.assert_close(layer.to_dense(), w * m)
    other = kernels.DiagLinear(16, 48, num_diagonals=5, block_size=4)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.offsets, offsets) and torch.equal(other.mask(), m)
    x = torch.randn(2, 16)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (32, 32)])  # tall, wide, square
def test_zero_tokens_give_an_empty_product_and_gradients(backend, shape):
    n_in, n_out = shape
    layer = kernels.DiagLinear(n_in, n_out, density=0.5, block_size=16).to(DEVICE)
    x = torch.zeros(0, n_in, device=DEVICE, requires_grad=True)
    y = kernels.diag_matmul(x, layer.values, layer.offsets, 16, n_out)
    assert y.shape == (0, n_out)
    y.sum().backward()
    assert x.grad.shape == (0, n_in) and not layer.values.grad.abs().any()


from kernels import runtime as rt  # noqa: E402
from kernels.diag import diag_coords, diag_dw, diag_dw_groups, diag_tile_list, diag_tile_list_ref  # noqa: E402
from kernels.diag.pattern import diag_dw_bands, diag_dw_stacks, dw_band_slices  # noqa: E402


def _tile_list_as_rows(tile_ptr, entries):
    ptr, ent = tile_ptr.tolist(), [tuple(e) for e in entries.tolist()]
    return [ent[ptr[t]:ptr[t + 1]] for t in range(len(ptr) - 1)]


# (R, C, K, nb): tall, wide, square, K = 1, all P diagonals, a tile wider than the layer
@pytest.mark.parametrize("R,C,K,nb", [(12, 3, 4, 8), (3, 12, 4, 8), (5, 5, 5, 2), (7, 2, 1, 4),
                                      (2, 7, 7, 1), (48, 12, 5, 8), (12, 48, 12, 64), (1, 1, 1, 8)])
def test_tile_lists_match_the_loop_reference_for_the_forward_and_the_input_grad(R, C, K, nb):
    g = torch.Generator().manual_seed(R * 100 + C)
    D, P = min(R, C), max(R, C)
    offsets = torch.randperm(P, generator=g)[:K].to(torch.int32)
    for n_out, by_out in ((R, R < C), (C, R >= C)):  # forward, input grad
        got = _tile_list_as_rows(*diag_tile_list(offsets, n_out, P, D, by_out, nb))
        assert got == diag_tile_list_ref(offsets, n_out, P, D, by_out, nb), (n_out, by_out)
        # every stored block is reached exactly once by some (tile, lane)
        seen = []
        for tile, row in enumerate(got):
            for vbase, p0 in row:
                k = vbase // D
                for lane in range(nb):
                    q, p = tile * nb + lane, (p0 + lane) % P
                    if q < n_out and (by_out or p < D):
                        seen.append((k, q if by_out else p))
        assert sorted(seen) == [(k, d) for k in range(K) for d in range(D)]


@pytest.mark.parametrize("R,C,K,group", [(12, 3, 4, 8), (3, 12, 12, 2), (5, 5, 1, 64), (6, 6, 6, 4)])
def test_weight_grad_groups_name_the_stored_blocks(R, C, K, group):
    offsets = torch.randperm(max(R, C), generator=torch.Generator().manual_seed(1))[:K].to(torch.int32)
    rows, cols = diag_coords(offsets, R, C)
    D = min(R, C)
    for vd, d0, r0, c0 in diag_dw_groups(offsets, R, C, group).tolist():
        k = vd // D
        assert vd == k * D + d0 and d0 % group == 0
        assert (r0, c0) == (rows[k, d0].item(), cols[k, d0].item())


@pytest.mark.parametrize("R,C,K,stack", [(12, 3, 4, 4), (12, 3, 5, 4), (3, 12, 12, 8), (5, 5, 1, 2), (6, 6, 6, 1)])
def test_weight_grad_stacks_name_every_stored_block_once_around_a_shared_block(R, C, K, stack):
    offsets = torch.randperm(max(R, C), generator=torch.Generator().manual_seed(K))[:K].to(torch.int32)
    rows, cols = diag_coords(offsets, R, C)
    D = min(R, C)
    table = diag_dw_stacks(offsets, R, C, stack)
    assert table.dtype == torch.int32 and table.shape == (D * -(-K // stack), 1 + 2 * stack)
    seen = []
    for s, *rest in table.tolist():
        vds, others = rest[:stack], rest[stack:]
        for vd, other in zip(vds, others):
            if vd < 0:  # a padding lane: block 0, never stored
                assert other == 0
                continue
            k, d = divmod(vd, D)
            # the shared block is x's column block (tall) or dy's row block (wide), the other the gathered one
            shared, gathered = (cols, rows) if R >= C else (rows, cols)
            assert (s, other) == (shared[k, d].item(), gathered[k, d].item())
            seen.append((k, d))
    assert sorted(seen) == [(k, d) for k in range(K) for d in range(D)]


def test_tile_lists_are_cached_per_pattern_and_rebuilt_after_a_change():
    offsets = torch.tensor([0, 5, 9], dtype=torch.int32)
    first = diag_tile_list(offsets, 12, 12, 4, False, 4)
    assert diag_tile_list(offsets, 12, 12, 4, False, 4) is first
    offsets[1] = 6  # an in-place mask update bumps the version counter
    second = diag_tile_list(offsets, 12, 12, 4, False, 4)
    assert second is not first
    assert _tile_list_as_rows(*second) == diag_tile_list_ref(offsets, 12, 12, 4, False, 4)


# Odd token counts, b = 1, 16 and 64, tall and wide, one diagonal and all of them.
@pytest.mark.parametrize("b,R,C,K", [(1, 70, 9, 70), (1, 9, 70, 1), (16, 6, 2, 6), (16, 2, 6, 1),
                                     (64, 3, 1, 3), (64, 1, 2, 1)])
@pytest.mark.parametrize("T", [1, 63, 123])
def test_diag_kernels_at_odd_token_counts(backend, b, R, C, K, T):
    g = torch.Generator().manual_seed(T + b)
    values, offsets = make(g, b, R, C, K)
    x = torch.randn(T, C * b, generator=g)
    off = offsets.to(DEVICE)
    check_op(lambda x, v: kernels.diag_matmul(x, v, off, b, R * b),
             lambda x, v: diag_matmul_ref(x, v, off, b, R * b),
             [x.to(DEVICE), values.to(DEVICE)], torch.float32)


def _dw_ref(dy, x, offsets, b):
    R, C = dy.shape[1] // b, x.shape[1] // b
    rows, cols = diag_coords(offsets, R, C)
    dyb, xb = dy.double().reshape(-1, R, b), x.double().reshape(-1, C, b)
    return torch.einsum("tkdi,tkdj->kdij", dyb[:, rows.long()], xb[:, cols.long()])


# The token split (fp32 partials summed on the host) needs more tokens than one chunk; b = 24
# pads the stacked tiles to 32 (a lane mask, padding lanes when K is not a multiple of G).
@pytest.mark.parametrize("b,R,C,K,T", [(16, 4, 2, 3, 123), (16, 2, 4, 4, 63), (64, 2, 1, 2, 130),
                                       (1, 40, 24, 7, 123), (4, 3, 5, 5, 1), (32, 3, 3, 3, 77),
                                       (24, 3, 2, 3, 37), (24, 2, 5, 5, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_kernel_matches_the_block_sddmm_reference(b, R, C, K, T, dtype):
    g = torch.Generator().manual_seed(b * T)
    offsets = torch.randperm(max(R, C), generator=g)[:K].to(torch.int32)
    dy, x = torch.randn(T, R * b, generator=g).to(dtype), torch.randn(T, C * b, generator=g).to(dtype)
    with kernels.use_backend("triton"):
        got = diag_dw(dy.to(DEVICE), x.to(DEVICE), offsets.to(DEVICE), b)
    ref = _dw_ref(dy, x, offsets, b)
    assert got.dtype == dtype and got.shape == ref.shape
    # bf16: one rounding of the fp32 sum; fp32: accumulation order
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_a_pattern_change_between_calls_reaches_every_kernel(backend):
    g = torch.Generator().manual_seed(3)
    layer = kernels.DiagLinear(32, 96, num_diagonals=2, block_size=16, generator=g).to(DEVICE)
    x = torch.randn(21, 32, generator=g).to(DEVICE)
    for new in ([1, 4], [0, 5]):
        with torch.no_grad():
            layer.offsets.copy_(torch.tensor(new, dtype=torch.int32))  # in place: same tensor
        check_op(lambda x, v: kernels.diag_matmul(x, v, layer.offsets, 16, 96),
                 lambda x, v: diag_matmul_ref(x, v, layer.offsets, 16, 96),
                 [x, layer.values.detach()], torch.float32)


@pytest.mark.parametrize("b,R,C", [(1, 6, 3), (16, 2, 3), (64, 2, 1)])
def test_bias_in_the_epilogue_matches_a_separate_add_with_gradients(backend, b, R, C):
    g = torch.Generator().manual_seed(b + R)
    values, offsets = make(g, b, R, C, 2)
    x, bias = torch.randn(37, C * b, generator=g), torch.randn(R * b, generator=g)
    off = offsets.to(DEVICE)
    check_op(lambda x, v, c: kernels.diag_matmul(x, v, off, b, R * b, bias=c),
             lambda x, v, c: diag_matmul_ref(x, v, off, b, R * b) + c,
             [x.to(DEVICE), values.to(DEVICE), bias.to(DEVICE)], torch.float32, grad_args=(0, 1, 2))
    # no diagonals: y is the bias alone
    y = kernels.diag_matmul(x.to(DEVICE), values[:0].to(DEVICE), off[:0], b, R * b, bias=bias.to(DEVICE))
    torch.testing.assert_close(y.cpu(), bias.expand(37, -1))


def test_opcheck_passes_with_a_bias(backend):
    from kernels.diag import _diag_op
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(6, 32, generator=g).to(DEVICE), torch.randn(2, 4, 4, 4, generator=g).to(DEVICE)
    bias = torch.randn(16, generator=g).to(DEVICE)
    off = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(_diag_op.op, (x, v.requires_grad_(), off, 4, 16, bias.requires_grad_()))


# (the fused MLP's backward: h and gelu(h) from one forward, dh = (dy W) * gelu'(h) from one
# input-gradient launch)

from kernels.diag import diag_dx_gelu_grad, diag_fwd_act, diag_fwd_gelu  # noqa: E402


# tall, wide; b = 16 (NB = 8 output blocks a program on a GPU) and 32; odd token counts
@pytest.mark.parametrize("b,R,C,K,T", [(16, 6, 2, 3, 63), (16, 2, 6, 4, 1), (32, 3, 1, 2, 19), (32, 1, 3, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_epilogues_match_gelu_of_the_reference_product(b, R, C, K, T, dtype):
    g = torch.Generator().manual_seed(R * 10 + C + T)
    n_in, n_out = C * b, R * b
    offsets = torch.randperm(max(R, C), generator=g)[:K].to(torch.int32).to(DEVICE)
    values = (torch.randn(K, min(R, C), b, b, generator=g) / (b * K) ** 0.5).to(DEVICE)
    bias = torch.randn(n_out, generator=g).to(DEVICE)
    x = torch.randn(T, n_in, generator=g).to(DEVICE)
    dy = torch.randn(T, n_out, generator=g).to(DEVICE)
    w64 = diag_to_dense(values.double(), offsets, n_in, n_out, b)
    h64 = x.double() @ w64.t() + bias.double()
    # the reference at the kernel's dtype (torch's own rounding) for the 2x rule
    wl = diag_to_dense(values.to(dtype), offsets, n_in, n_out, b)
    hl = x.to(dtype) @ wl.t() + bias.to(dtype)
    h, act = diag_fwd_gelu(x.to(dtype), values.to(dtype), offsets, b, n_out, bias.to(dtype))
    assert_matches(h, h64, hl, "h")
    assert_matches(act, F.gelu(h64), F.gelu(hl), "gelu(h)")
    alone = diag_fwd_act(x.to(dtype), values.to(dtype), offsets, b, n_out, bias.to(dtype))
    assert_matches(alone, F.gelu(h64), F.gelu(hl), "gelu(h) alone")
    # input gradient of the layer whose *input* went through the GELU: dh = (dy2 W) * gelu'(h)
    # with dy2 [T, n_out] and the pre-activation of its input [T, n_in]
    pre = torch.randn(T, n_in, generator=g).to(DEVICE)
    ref64 = torch.ops.aten.gelu_backward(dy.double() @ w64, pre.double())
    refl = torch.ops.aten.gelu_backward(dy.to(dtype) @ wl, pre.to(dtype))
    dh = diag_dx_gelu_grad(dy.to(dtype), values.to(dtype), offsets, b, n_in, pre.to(dtype))
    assert_matches(dh, ref64, refl, "dh")


def test_gelu_epilogues_without_diagonals_give_bias_terms():
    x, dy, pre = torch.randn(5, 32), torch.randn(5, 64), torch.randn(5, 32)
    none, bias = torch.zeros(0, 2, 16, 16), torch.randn(64)
    off = torch.zeros(0, dtype=torch.int32)
    h, act = diag_fwd_gelu(x, none, off, 16, 64, bias)
    assert torch.equal(h, bias.expand(5, 64)) and torch.allclose(act, F.gelu(h))
    assert torch.allclose(diag_fwd_act(x, none, off, 16, 64, bias), F.gelu(bias).expand(5, 64))
    assert torch.equal(diag_fwd_act(x, none, off, 16, 64), torch.zeros(5, 64))
    assert torch.equal(diag_dx_gelu_grad(dy, none, off, 16, 32, pre), torch.zeros(5, 32))


# Several output tiles a program (TILE_GROUP, one after the other over the same x tile): wide
# and tall, a group that does not divide the tiles (7 blocks in tiles of 2: 4 tiles, groups of
# 3), the bias and both GELU epilogues; fresh outputs are NaN-poisoned, so a tile a group
# skipped fails.
@pytest.mark.parametrize("R,C,K", [(7, 2, 4), (2, 7, 5)])
@pytest.mark.parametrize("group", [2, 3, 4])
def test_output_tiles_grouped_per_program_match_the_reference(R, C, K, group):
    b, T = 16, 37
    g = torch.Generator().manual_seed(R * 10 + group)
    n_in, n_out = C * b, R * b
    offsets = torch.randperm(max(R, C), generator=g)[:K].to(torch.int32).to(DEVICE)
    values = (torch.randn(K, min(R, C), b, b, generator=g) / (b * K) ** 0.5).to(DEVICE)
    bias = torch.randn(n_out, generator=g).to(DEVICE)
    x, dy = torch.randn(T, n_in, generator=g).to(DEVICE), torch.randn(T, n_out, generator=g).to(DEVICE)
    pre = torch.randn(T, n_in, generator=g).to(DEVICE)
    w64 = diag_to_dense(values.double(), offsets, n_in, n_out, b)
    h64 = x.double() @ w64.t() + bias.double()

    def grouped(kernel, key, default):
        return dict(default, NB=2, BLOCK_T=16, TILE_GROUP=group) if kernel in ("diag_fwd", "diag_dx") else None

    with rt.config_override(grouped):
        y = kernels.diag.diag_fwd(x, values, offsets, b, n_out, bias)
        h, act = diag_fwd_gelu(x, values, offsets, b, n_out, bias)
        alone = diag_fwd_act(x, values, offsets, b, n_out, bias)
        dx = kernels.diag.diag_dx(dy, values, offsets, b, n_in)
        dh = diag_dx_gelu_grad(dy, values, offsets, b, n_in, pre)
    assert_matches(y, h64, name="y")
    assert_matches(h, h64, name="h")
    assert_matches(act, F.gelu(h64), name="gelu(h)")
    assert_matches(alone, F.gelu(h64), name="gelu(h) alone")
    assert_matches(dx, dy.double() @ w64, name="dx")
    assert_matches(dh, torch.ops.aten.gelu_backward(dy.double() @ w64, pre.double()), name="dh")


def test_tile_group_is_one_unless_x_tile_is_read_through_l1():
    from kernels.diag.kernel import _tile_group
    l1 = {"BLOCK_T": 64, "NB": 32, "num_stages": 1}
    # ViT-B fc1 forward, T = 50,432: 788 token tiles x 6 output tiles -> all 6 in one program
    assert _tile_group(50432, 768 * 2, 6, l1) == 6
    assert _tile_group(256, 768 * 2, 6, l1) == 1  # 24 programs: nothing to spare
    assert _tile_group(50432, 3072 * 2, 6, l1) == 1  # a 384 KB x tile: no L1 reuse
    assert _tile_group(50432, 768 * 2, 6, dict(l1, num_stages=3)) == 1  # cp.async bypasses L1


def test_l1_replay_counts_the_misses_of_an_lru_in_the_kernels_load_order():
    from kernels.diag.pattern import tile_l1_slices
    # one tile of 2 output blocks (by_out: lane n reads p0 + n, wrapped at P = 8)
    windows = [[0, 0], [0, 2], [0, 0]]  # input blocks {0, 1}, {2, 3}, {0, 1}
    assert tile_l1_slices([0, 3], windows, 2, 8, 2, True, 2, 1, 0) == 6  # no L1: every load
    assert tile_l1_slices([0, 3], windows, 2, 8, 2, True, 2, 1, 2) == 6  # {0, 1} evicted by {2, 3}
    assert tile_l1_slices([0, 3], windows, 2, 8, 2, True, 2, 1, 4) == 4  # all four stay
    sliding = [[0, 0], [0, 1], [0, 7]]  # {0, 1}, {1, 2}, then {7, 0}: wrapped at P
    assert tile_l1_slices([0, 3], sliding, 2, 8, 2, True, 2, 1, 4) == 4  # the overlaps hit
    assert tile_l1_slices([0, 3], sliding, 2, 8, 2, True, 2, 1, 3) == 5  # 7 evicts 0, the least recent
    # recency, not arrival: 0 read again before 2 comes, so 2 evicts 1 (a FIFO would evict 0)
    assert tile_l1_slices([0, 5], [[0, p] for p in (0, 1, 0, 2, 0)], 1, 8, 1, True, 1, 1, 2) == 3
    # a second tile reading the same windows hits only when one program runs both (group 2)
    two = [0, 2, 4], [[0, 0], [0, 2], [0, 0], [0, 2]]
    assert tile_l1_slices(*two, 4, 8, 4, True, 2, 1, 4) == 8
    assert tile_l1_slices(*two, 4, 8, 4, True, 2, 2, 4) == 4
    # BY_IN reads only input blocks below D; lanes past the last output block read nothing
    assert tile_l1_slices([0, 1], [[0, 2]], 2, 8, 3, False, 2, 1, 4) == 1
    assert tile_l1_slices([0, 1], [[0, 2]], 1, 8, 3, True, 2, 1, 4) == 1


def test_wide_tiles_take_the_shape_that_reads_the_fewest_bytes():
    """fc2's forward at ViT-B b = 16 (768 outputs, x 3072 wide): 128 tokens x 16 output blocks
    beat 32 x 64 once T fills the SMs (values a quarter as often, x ~2x); the choice is the
    argmin of the replayed misses plus the values per token tile."""
    from kernels.diag.kernel import _WIDE_TILES, _wide_l1, _wide_tiles
    from kernels.diag.pattern import tile_l1_slices
    g = torch.Generator().manual_seed(0)
    R, C, b = 48, 192, 16
    offsets = torch.randperm(C, generator=g)[:20].to(torch.int32)
    assert _wide_l1(b, torch.bfloat16, 3072, 50432) and not _wide_l1(b, torch.bfloat16, 768, 50432)
    assert not _wide_l1(b, torch.bfloat16, 3072, 4096) and not _wide_l1(b, torch.float32, 3072, 50432)
    per_token = {}
    for bt, nb in _WIDE_TILES:
        tp, en = kernels.diag.diag_tile_list(offsets, R, C, R, True, nb)
        misses = tile_l1_slices(tp, en, R, C, R, True, nb, 1, 128 * 1024 // (bt * b * 2))
        per_token[(bt, nb)] = misses * b * 2 + 20 * R * b * b * 2 / bt
    best = min(per_token, key=per_token.get)
    assert _wide_tiles(offsets, R, C, R, True, b, 2, 50432 * 8) == {"BLOCK_T": best[0], "NB": best[1]}
    assert best == (128, 16) and per_token[best] < 0.85 * per_token[(32, 64)], per_token
    # few tokens: 128-token tiles leave a wave of the grid mostly empty
    assert _wide_tiles(offsets, R, C, R, True, b, 2, 8192) != {"BLOCK_T": 128, "NB": 16}


def _fwd_and_dx_under(config: dict, b, R, C, K, T, seed):
    """diag_fwd (with a bias) and diag_dx with ``config`` forced on both launchers, against the
    fp64 reference."""
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = C * b, R * b
    offsets = torch.randperm(max(R, C), generator=g)[:K].to(torch.int32).to(DEVICE)
    values = (torch.randn(K, min(R, C), b, b, generator=g) / (b * K) ** 0.5).to(DEVICE)
    bias = torch.randn(n_out, generator=g).to(DEVICE)
    x, dy = torch.randn(T, n_in, generator=g).to(DEVICE), torch.randn(T, n_out, generator=g).to(DEVICE)
    w64 = diag_to_dense(values.double(), offsets, n_in, n_out, b)

    def forced(kernel, key, default):
        return dict(default, **config) if kernel in ("diag_fwd", "diag_dx") else None

    with rt.config_override(forced):
        y = kernels.diag.diag_fwd(x, values, offsets, b, n_out, bias)
        dx = kernels.diag.diag_dx(dy, values, offsets, b, n_in)
    assert_matches(y, x.double() @ w64.t() + bias.double(), name="y")
    assert_matches(dx, dy.double() @ w64, name="dx")


@pytest.mark.parametrize("bt,nb", [(128, 16), (64, 32)])
def test_the_wide_tiles_match_the_reference(bt, nb):
    """The wide shapes on a ViT-B-sized fc2 (48 output blocks: 3 tiles of 16, or a full and a
    half-empty tile of 32) with a ragged last token tile, forward with bias and input grad."""
    _fwd_and_dx_under({"BLOCK_T": bt, "NB": nb, "num_stages": 1}, 16, 48, 192, 20, 150, bt)


def test_few_tokens_get_short_tiles_and_enough_programs_for_the_sms():
    from kernels.diag.kernel import _fill_sms
    l1 = {"BLOCK_T": 64, "NB": 32, "num_warps": 8, "num_stages": 1, "TILE_GROUP": 0}
    # ViT-B fc1 at batch 1: 6 programs of 32 blocks -> 192 of one block, 16-token tiles
    assert _fill_sms(l1, 1, 192) == dict(l1, BLOCK_T=16, NB=1)
    assert _fill_sms(l1, 256, 192) == dict(l1, NB=4)  # 4 token tiles x 48 = 192 programs
    assert _fill_sms(l1, 50432, 192) == l1  # 4728 programs already
    # fc2 (48 output blocks) at T = 256: one block a program is as far as it goes (96 programs)
    assert _fill_sms({"BLOCK_T": 128, "NB": 8}, 256, 48) == {"BLOCK_T": 128, "NB": 1}


@pytest.mark.parametrize("nb", [1, 2])
@pytest.mark.parametrize("T", [1, 5])
def test_the_few_token_tiles_match_the_reference(nb, T):
    _fwd_and_dx_under({"BLOCK_T": 16, "NB": nb}, 16, 6, 2, 3, T, T * 10 + nb)


def test_weight_grad_stack_minimises_the_slices_read_per_token():
    from kernels.diag.kernel import _dw_default, _dw_stack

    def slices(K, G):
        return -(-K // G) * (G + 1)

    T = 50432
    # ViT-B at 90%: b = 16, K = 20 keeps 4 (25 slices; 8 reads 27); b = 64, K = 5 takes 2 (9; 1: 10)
    assert _dw_stack(16, 20, 2, 48, T) == 4 and _dw_stack(64, 5, 2, 12, T) == 2
    assert _dw_stack(16, 15, 2, 48, T) == 8  # BERT's QKV: 18 slices, not 20
    assert _dw_stack(64, 5, 2, 12, 256) == 1  # 36 groups x 2 token tiles: too few programs
    for b in (16, 32, 64):
        low = 64 // b
        for K in range(1, 41):
            G = _dw_stack(b, K, 2, 48, T)
            assert G in (low, 2 * low) and slices(K, G) == min(slices(K, low), slices(K, 2 * low)), (b, K)
            assert _dw_stack(b, K, 4, 48, T) == low  # fp32: M = 64 only (shared memory)
    assert _dw_default(16, 15, 2, 48, T)["G"] == 8


# A G the launch table (or the sweep) names beats the default: the gradient is the same
# (M = G * b from 32 to 128, padding lanes where G does not divide K).
@pytest.mark.parametrize("b,R,C,K,G", [(16, 2, 5, 5, 2), (16, 2, 5, 5, 4), (16, 5, 2, 5, 8), (64, 2, 1, 2, 2),
                                       (32, 3, 3, 3, 4)])
def test_weight_grad_with_a_configured_stack_matches_the_reference(b, R, C, K, G):
    T = 45
    g = torch.Generator().manual_seed(G * b)
    offsets = torch.randperm(max(R, C), generator=g)[:K].to(torch.int32)
    dy, x = torch.randn(T, R * b, generator=g), torch.randn(T, C * b, generator=g)
    seen = []

    def stack(kernel, key, default):
        if kernel != "diag_dw":
            return None
        seen.append(G)
        return dict(default, G=G)

    with kernels.use_backend("triton"), rt.config_override(stack):
        got = diag_dw(dy.to(DEVICE), x.to(DEVICE), offsets.to(DEVICE), b)
    assert seen == [G]
    torch.testing.assert_close(got.cpu().double(), _dw_ref(dy, x, offsets, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("R,C,K,nb", [(12, 3, 4, 4), (12, 3, 5, 8), (3, 12, 12, 8), (5, 5, 1, 2), (6, 6, 6, 64),
                                      (192, 48, 20, 64)])
def test_weight_grad_bands_name_every_stored_block_once(R, C, K, nb):
    offsets = torch.randperm(max(R, C), generator=torch.Generator().manual_seed(K + nb))[:K].to(torch.int32)
    rows, cols = diag_coords(offsets, R, C)
    D = min(R, C)
    table = diag_dw_bands(offsets, R, C, nb)
    assert table.dtype == torch.int32 and table.shape[1] == 3 * nb
    seen, distinct = [], 0
    for row in table.tolist():
        vds, rs, cs = row[:nb], row[nb:2 * nb], row[2 * nb:]
        assert vds[0] >= 0  # no empty program
        for vd, r, c in zip(vds, rs, cs):
            if vd < 0:  # a padding lane repeats lane 0's blocks (no slice of its own), never stored
                assert (r, c) == (rs[0], cs[0])
                continue
            k, d = divmod(vd, D)
            assert (r, c) == (rows[k, d].item(), cols[k, d].item())
            seen.append((k, d))
        distinct += len(set(rs)) + len(set(cs))
    assert sorted(seen) == [(k, d) for k in range(K) for d in range(D)]
    assert dw_band_slices(table, nb) == distinct


def test_weight_grad_takes_the_band_block_count_that_reads_the_fewest_slices():
    from kernels.diag.kernel import _dw_band_choice

    g = torch.Generator().manual_seed(0)
    # ViT-B fc1 / fc2 at 90%, b = 16: 552 slices a token with 128 blocks a program, 733 with
    # 64, the stacks 1200
    offsets = kernels.DiagLinear(768, 3072, 0.1, block_size=16, generator=g).offsets
    for R, C in ((192, 48), (48, 192)):
        assert dw_band_slices(diag_dw_bands(offsets, R, C, 64), 64) == 733
        assert dw_band_slices(diag_dw_bands(offsets, R, C, 128), 128) == 552
        assert _dw_band_choice(16, 2, offsets, R, C, 48, 20, 4, 50432) == 128
        assert _dw_band_choice(16, 4, offsets, R, C, 48, 20, 4, 50432) == 0  # fp32: stacks
        assert _dw_band_choice(16, 2, offsets, R, C, 48, 20, 4, 256) == 0  # few tokens: partial sums
    assert _dw_band_choice(64, 2, offsets, 48, 12, 12, 20, 2, 50432) == 0  # b = 64: stacks
    chosen = set()
    for seed in range(6):
        R, C = (24, 6) if seed % 2 else (6, 24)
        K = 2 + seed * 3
        offsets = torch.randperm(24, generator=torch.Generator().manual_seed(seed))[:K].to(torch.int32)
        stacks = 6 * -(-K // 4) * 5
        slices, nb = min((dw_band_slices(diag_dw_bands(offsets, R, C, nb), nb), nb) for nb in (64, 128))
        got = _dw_band_choice(16, 2, offsets, R, C, 6, K, 4, 8192)
        assert got == (nb if slices < stacks else 0)
        chosen.add(got)
    assert chosen == {64, 128}  # a tie takes 64; 128 where it reads fewer


# The band variant (forced by a config) against the reference: tall and wide, padding lanes,
# several programs (nb below the block count) and token chunks, both dtypes, both block counts
# the launcher takes (64, 128) with lanes past the first half in use.
@pytest.mark.parametrize("R,C,K,nb,T", [(6, 2, 5, 4, 123), (2, 6, 6, 8, 77), (4, 4, 3, 64, 19), (5, 3, 4, 2, 150),
                                        (10, 10, 10, 64, 45), (16, 8, 12, 128, 50), (8, 16, 13, 128, 33),
                                        (12, 12, 11, 128, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_band_variant_matches_the_reference(R, C, K, nb, T, dtype):
    b = 16
    g = torch.Generator().manual_seed(nb * T)
    offsets = torch.randperm(max(R, C), generator=g)[:K].to(torch.int32)
    dy, x = torch.randn(T, R * b, generator=g).to(dtype), torch.randn(T, C * b, generator=g).to(dtype)
    if nb >= 64 and K * min(R, C) > nb // 2:  # a kernel that skipped the second half of the lanes fails here
        assert (diag_dw_bands(offsets, R, C, nb)[:, :nb] >= 0).sum(1).max() > nb // 2
    seen = []

    def bands(kernel, key, default):
        if kernel != "diag_dw":
            return None
        seen.append(nb)
        return dict(default, BANDS=nb, BAND_BLOCK_T=16, BAND_PROGRAMS=16)

    with kernels.use_backend("triton"), rt.config_override(bands):
        got = diag_dw(dy.to(DEVICE), x.to(DEVICE), offsets.to(DEVICE), b)
    assert seen == [nb]
    ref = _dw_ref(dy, x, offsets, b)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_weight_grad_band_variant_launches_at_most_band_programs(monkeypatch):
    # 2 table rows (12 x 12 blocks, K = 11, 128 a program) and BAND_PROGRAMS = 7: 3 token
    # chunks, 6 programs (rounding the chunks up would launch 8)
    from kernels.diag import kernel as kernel_module

    R, C, K, nb, T, b = 12, 12, 11, 128, 200, 16
    g = torch.Generator().manual_seed(7)
    offsets = torch.randperm(12, generator=g)[:K].to(torch.int32)
    dy, x = torch.randn(T, R * b, generator=g), torch.randn(T, C * b, generator=g)
    assert diag_dw_bands(offsets, R, C, nb).shape[0] == 2
    real, grids = kernel_module.diag_dw_band_kernel, []

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(kernel_module, "diag_dw_band_kernel", Recording())

    def bands(kernel, key, default):
        return dict(default, BANDS=nb, BAND_BLOCK_T=16, BAND_PROGRAMS=7) if kernel == "diag_dw" else None

    with kernels.use_backend("triton"), rt.config_override(bands):
        got = diag_dw(dy.to(DEVICE), x.to(DEVICE), offsets.to(DEVICE), b)
    assert grids == [(6,)]
    torch.testing.assert_close(got.cpu().double(), _dw_ref(dy, x, offsets, b), rtol=1e-5, atol=1e-5)
