"""The native library's block products (kernels.cpu.bsr_matmul, sddmm_blocks: b x b blocks, b a
multiple of 8) against fp64: every register tile and token tile (partial and full), the block
order given by an index, the transposed reading of the input gradient, bf16 operands widened,
strided views, two threads; and the layers that take them (DiagLinear b = 8 / 16 / 64 in its
training step and in inference of several tokens) with their gradients against fp64."""
import pytest
import torch

import kernels
from kernels import cpu
from kernels.coords import csr_structure

from .conftest import assert_matches
from .test_cpu_native import (amx_build, emu_library, assert_close_to_reference, bf16_reference, needs_library,  # noqa: F401
                              native_calls, tile_build, two_threads)


def block_pattern(g, n_rows, n_cols, density=0.4):
    """Block coordinates (rows, cols int32, block-row order scrambled) of a random pattern with
    its first block row empty and at least one block elsewhere."""
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    mask[0] = False
    mask[-1, -1] = True
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(rows.numel(), generator=g)
    return rows[perm].int(), cols[perm].int()


def dense_of(rows, cols, blocks, n_rows, n_cols, b):
    """The fp64 [n_rows * b, n_cols * b] matrix of blocks[n][o][i] at (rows[n], cols[n])."""
    w = torch.zeros(n_rows * b, n_cols * b, dtype=torch.float64)
    for n in range(rows.numel()):
        r, c = int(rows[n]) * b, int(cols[n]) * b
        w[r:r + b, c:c + b] += blocks[n].double()
    return w


def bsr_of(rows, cols, n_rows, n_cols, transpose=False):
    """(crow, bcols, bidx) of the blocks in their given order: bidx[p] is the block at CSR position
    p; with ``transpose`` the CSR of W^T over the same blocks."""
    r, c, nr, nc = (cols, rows, n_cols, n_rows) if transpose else (rows, cols, n_rows, n_cols)
    order, crow, bcols = csr_structure(r, c, nr, nc)
    bidx = torch.arange(rows.numel(), dtype=torch.int32) if order is None else order.to(torch.int32)
    return crow, bcols, bidx


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 5, 8, 9, 16, 17, 33, 70])
@pytest.mark.parametrize("b", [8, 16, 32, 64])
def test_bsr_matmul_matches_the_fp64_reference(b, tokens, threads, request):
    """y = x W^T + bias and dx = dy W (``transpose``: the CSR of W^T over W's blocks, read
    transposed) for tiles of 8 (up to 8 tokens) and 16, partial and full, with and without the
    block index and the bias; an empty block row gives the bias alone."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    g = torch.Generator().manual_seed(100 + b + tokens)
    R, C = 5, 7
    rows, cols = block_pattern(g, R, C)
    blocks = torch.randn(rows.numel(), b, b, generator=g)
    w = dense_of(rows, cols, blocks, R, C, b)
    bias = torch.randn(R * b, generator=g)
    x = torch.randn(tokens, C * b, generator=g)
    dy = torch.randn(tokens, R * b, generator=g)
    crow, bcols, bidx = bsr_of(rows, cols, R, C)
    for with_bias in (True, False):
        y = cpu.bsr_matmul(crow, bcols, blocks, R, C, x, bias if with_bias else None, bidx)
        ref = x.double() @ w.t() + (bias.double() if with_bias else 0)
        lowp = x @ w.float().t() + (bias if with_bias else 0)
        assert_close_to_reference(y, ref, lowp, f"b={b}, T={tokens}, bias={with_bias}")
    # the blocks already in CSR order: no index
    y = cpu.bsr_matmul(crow, bcols, blocks[bidx.long()].contiguous(), R, C, x)
    assert_close_to_reference(y, x.double() @ w.t(), x @ w.float().t(), f"b={b}, T={tokens}, no index")
    crow_t, bcols_t, bidx_t = bsr_of(rows, cols, R, C, transpose=True)
    dx = cpu.bsr_matmul(crow_t, bcols_t, blocks, C, R, dy, None, bidx_t, transpose=True)
    assert_close_to_reference(dx, dy.double() @ w, dy @ w.float(), f"b={b}, T={tokens}, transposed")


@needs_library
@pytest.mark.parametrize("tokens", [1, 16, 33])
def test_bsr_matmul_of_bf16_operands_widens_them_exactly(tokens):
    """bf16 x and blocks: the same fp32 sums of the same numbers (fp64 of the bf16 values within
    the fp32 tolerance), y in bf16 (within 2x torch's bf16 error) or fp32 (``out_dtype``)."""
    g = torch.Generator().manual_seed(110 + tokens)
    b, R, C = 16, 4, 6
    rows, cols = block_pattern(g, R, C)
    blocks = torch.randn(rows.numel(), b, b, generator=g).to(torch.bfloat16)
    x = torch.randn(tokens, C * b, generator=g).to(torch.bfloat16)
    w = dense_of(rows, cols, blocks, R, C, b)
    crow, bcols, bidx = bsr_of(rows, cols, R, C)
    ref = x.double() @ w.t()
    y32 = cpu.bsr_matmul(crow, bcols, blocks, R, C, x, None, bidx, out_dtype=torch.float32)
    assert_close_to_reference(y32, ref, x.float() @ w.float().t(), f"T={tokens}, fp32 out")
    y = cpu.bsr_matmul(crow, bcols, blocks, R, C, x, None, bidx)
    assert y.dtype == torch.bfloat16
    assert_matches(y, ref, x @ w.to(torch.bfloat16).t(), f"T={tokens}, bf16 out")


@needs_library
@pytest.mark.parametrize("layout", ["transposed view", "row slice"])
def test_bsr_matmul_reads_x_at_its_strides(layout):
    g = torch.Generator().manual_seed(120)
    b, R, C, T = 16, 3, 4, 21
    rows, cols = block_pattern(g, R, C, density=0.6)
    blocks = torch.randn(rows.numel(), b, b, generator=g)
    if layout == "transposed view":
        x = torch.randn(C * b, T, generator=g).t()
    else:
        x = torch.randn(T, C * b + 13, generator=g)[:, 5:5 + C * b]
    assert not x.is_contiguous()
    w = dense_of(rows, cols, blocks, R, C, b)
    y = cpu.bsr_matmul(*bsr_of(rows, cols, R, C)[:2], blocks, R, C, x, None, bsr_of(rows, cols, R, C)[2])
    assert_close_to_reference(y, x.double() @ w.t(), x @ w.float().t(), layout)


@needs_library
def test_bsr_matmul_declines_what_it_does_not_take():
    """None (the caller keeps torch's path) for a b not a multiple of 8, fp64, int64 indices, a
    mismatched x; zero tokens give an empty y."""
    g = torch.Generator().manual_seed(121)
    rows, cols = block_pattern(g, 3, 4)
    crow, bcols, bidx = bsr_of(rows, cols, 3, 4)
    for b in (4, 12):
        blocks = torch.randn(rows.numel(), b, b, generator=g)
        assert cpu.bsr_matmul(crow, bcols, blocks, 3, 4, torch.randn(5, 4 * b), None, bidx) is None
    blocks = torch.randn(rows.numel(), 8, 8, generator=g)
    x = torch.randn(5, 32, generator=g)
    assert cpu.bsr_matmul(crow, bcols, blocks.double(), 3, 4, x.double(), None, bidx) is None
    assert cpu.bsr_matmul(crow.long(), bcols, blocks, 3, 4, x, None, bidx) is None
    assert cpu.bsr_matmul(crow, bcols, blocks, 3, 4, torch.randn(5, 31), None, bidx) is None
    assert cpu.bsr_matmul(crow, bcols, blocks, 3, 4, x, None, bidx[:-1]) is None
    assert cpu.bsr_matmul(crow, bcols, blocks, 3, 4, x[:0], None, bidx).shape == (0, 24)


def block_reference(dy, x, rows, cols, b):
    """(fp64, fp32) g[n] = dy[:, rows[n] b : +b]^T x[:, cols[n] b : +b] of the given numbers."""
    T = dy.shape[0]
    r, c = rows.long(), cols.long()

    def at(dtype):
        d = dy.to(dtype).reshape(T, -1, b)[:, r]
        s = x.to(dtype).reshape(T, -1, b)[:, c]
        return torch.einsum("tno,tni->noi", d, s)
    return at(torch.float64), at(torch.float32)


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 7, 32, 33, 128, 129, 300])
@pytest.mark.parametrize("b", [8, 16, 64])
def test_sddmm_blocks_matches_the_fp64_reference(b, tokens, threads, request):
    """Every register tile (8 x 8 for b = 8, 4 x 16 otherwise), one and several token chunks
    (2048 / b tokens: the sums go through g between them), partial chunks, blocks in any order
    and repeated."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    g = torch.Generator().manual_seed(130 + b + tokens)
    M, N = 3 * b, 5 * b
    rows, cols = block_pattern(g, 3, 5, density=0.5)
    rows, cols = torch.cat([rows, rows[:2]]), torch.cat([cols, cols[:2]])
    dy, x = torch.randn(tokens, M, generator=g), torch.randn(tokens, N, generator=g)
    got = cpu.sddmm_blocks(dy, x, rows, cols, b)
    ref, lowp = block_reference(dy, x, rows, cols, b)
    assert got.dtype == torch.float32
    assert_close_to_reference(got, ref, lowp, f"b={b}, T={tokens}, {threads} threads")


@needs_library
@pytest.mark.parametrize("layout", ["contiguous", "transposed views", "row slices"])
@pytest.mark.parametrize("dtypes", ["bf16", "mixed"])
def test_sddmm_blocks_of_bf16_and_strided_operands(layout, dtypes):
    """bf16 dy and x (and one bf16, one fp32) widened exactly into the fp32 block columns, read
    at any strides: fp64 of the same numbers within the fp32 tolerance."""
    g = torch.Generator().manual_seed(140)
    b, T, M, N = 16, 45, 48, 80
    rows, cols = block_pattern(g, 3, 5, density=0.6)
    if layout == "transposed views":
        dy, x = torch.randn(M, T, generator=g).t(), torch.randn(N, T, generator=g).t()
    elif layout == "row slices":
        dy, x = torch.randn(T, M + 7, generator=g)[:, 3:3 + M], torch.randn(T, N + 9, generator=g)[:, 1:1 + N]
    else:
        dy, x = torch.randn(T, M, generator=g), torch.randn(T, N, generator=g)
    dy = dy.to(torch.bfloat16)
    x = x.to(torch.bfloat16) if dtypes == "bf16" else x
    got = cpu.sddmm_blocks(dy, x, rows, cols, b)
    ref, lowp = block_reference(dy, x, rows, cols, b)
    assert_close_to_reference(got, ref, lowp, f"{layout}, {dtypes}")


@needs_library
def test_sddmm_blocks_declines_what_it_does_not_take():
    g = torch.Generator().manual_seed(141)
    rows, cols = block_pattern(g, 2, 2, density=0.9)
    dy, x = torch.randn(9, 24, generator=g), torch.randn(9, 24, generator=g)
    assert cpu.sddmm_blocks(dy, x, rows, cols, 12) is None  # b not a multiple of 8
    assert cpu.sddmm_blocks(dy[:, :16], x, rows, cols, 16) is None  # b must divide M and N
    assert cpu.sddmm_blocks(dy.double(), x.double(), rows, cols, 8) is None
    assert cpu.sddmm_blocks(dy, x[:8], rows, cols, 8) is None
    assert cpu.sddmm_blocks(dy, x, rows.long(), cols, 8) is None
    assert cpu.sddmm_blocks(dy, x, rows[:0], cols[:0], 8).shape == (0, 8, 8)
    assert (cpu.sddmm_blocks(dy[:0], x[:0], rows, cols, 8) == 0).all()


@pytest.fixture
def block_calls(monkeypatch):
    """Counts the calls into kernels.cpu.bsr_matmul (as ('fwd' / 'dx', tokens)) and sddmm_blocks
    (as ('dW', tokens)) that the library computed."""
    calls = []
    real_mm, real_dw = cpu.bsr_matmul, cpu.sddmm_blocks

    def spy_mm(crow, bcols, blocks, n_rows, n_cols, x, *args, **kw):
        y = real_mm(crow, bcols, blocks, n_rows, n_cols, x, *args, **kw)
        if y is not None:
            calls.append(("dx" if kw.get("transpose", args[2] if len(args) > 2 else False) else "fwd", x.shape[0]))
        return y

    def spy_dw(dy, x, rows, cols, b):
        g = real_dw(dy, x, rows, cols, b)
        if g is not None:
            calls.append(("dW", dy.shape[0]))
        return g
    monkeypatch.setattr(cpu, "bsr_matmul", spy_mm)
    monkeypatch.setattr(cpu, "sddmm_blocks", spy_dw)
    return calls


DIAG = {
    "b=8": lambda g: kernels.DiagLinear(64, 48, density=0.4, block_size=8, generator=g),
    "b=16 wide": lambda g: kernels.DiagLinear(192, 64, density=0.3, block_size=16, generator=g),
    "b=16 tall": lambda g: kernels.DiagLinear(64, 192, density=0.3, block_size=16, generator=g),
    "b=64": lambda g: kernels.DiagLinear(128, 192, density=0.5, block_size=64, generator=g),
}


@needs_library
@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast"])
@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("name", list(DIAG))
def test_a_diag_layer_trains_through_the_block_products(name, tokens, precision, block_calls):
    """DiagLinear's training step on CPU: forward, input gradient and weight gradient each one
    block product, against fp64 of the numbers the layer multiplies (under autocast x, the
    weight and dy rounded to bf16, the results compared within 2x torch's bf16 error)."""
    g = torch.Generator().manual_seed(150 + tokens)
    layer = DIAG[name](g)
    layer.bias = None
    x = torch.randn(tokens, layer.in_features, generator=g, requires_grad=True)
    low = torch.bfloat16 if precision != "fp32" else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        y = layer(x)
    assert y.dtype == low
    dy = torch.randn(y.shape, generator=g).to(low)
    y.backward(dy)
    assert sorted(block_calls) == sorted([("fwd", tokens), ("dx", tokens), ("dW", tokens)]), f"{name}: {block_calls}"
    w = layer.to_dense().detach().to(low)
    xl = x.detach().to(low)
    rows, cols = layer.coords()
    r, c = rows.long(), cols.long()
    checks = {
        "y": (y, xl.double() @ w.double().t(), xl @ w.t()),
        "dx": (x.grad.to(low), dy.double() @ w.double(), dy @ w),
        "dW": (layer.values.grad.to(low), (dy.double().t() @ xl.double())[r, c].reshape(layer.values.shape),
               (dy.t() @ xl)[r, c].reshape(layer.values.shape)),
    }
    for what, (got, ref, lowp) in checks.items():
        assert_matches(got, ref, lowp, f"{name}, T={tokens}, {precision}: {what}")


@needs_library
def test_diag_b12_keeps_the_element_products(block_calls):
    """b = 12 (not a multiple of 8): no block product; the step still matches fp64."""
    g = torch.Generator().manual_seed(160)
    layer = kernels.DiagLinear(48, 36, density=0.5, block_size=12, generator=g)
    x = torch.randn(20, 48, generator=g, requires_grad=True)
    layer(x).sum().backward()
    assert not block_calls
    w = layer.to_dense().detach().double()
    assert_matches(x.grad, torch.ones(20, 36, dtype=torch.float64) @ w, None, "dx")


@needs_library
def test_a_bsr_weight_takes_several_tokens_for_8_dividing_b_only():
    """kernels.cpu.matmul on a 'bsr' NativeWeight: several tokens through bsr_matmul for b = 16
    (its blocks stored transposed), a clear error naming b for b = 12 (one token only)."""
    g = torch.Generator().manual_seed(170)
    for b in (16, 12):
        rows, cols = block_pattern(g, 3, 4, density=0.6)
        blocks = torch.randn(rows.numel(), b, b, generator=g)
        order, crow, bcols = csr_structure(rows, cols, 3, 4)
        sorted_blocks = blocks if order is None else blocks[order]
        w = cpu.bsr_weight(crow, bcols, sorted_blocks, 3 * b, 4 * b, several=True)
        x = torch.randn(6, 4 * b, generator=g)
        if b == 12:
            with pytest.raises(ValueError, match="b = 12 takes one token"):
                cpu.matmul(w, x, None)
            continue
        dense = dense_of(rows, cols, blocks, 3, 4, b)
        assert_close_to_reference(cpu.matmul(w, x, None), x.double() @ dense.t(), x @ dense.float().t(), "b=16")


# The AMX block SDDMM (sddmm_blocks_amx): on this CPU where it has AMX (skipping with the reason
# elsewhere) and on the emu build (the same kernel source on emulated tile instructions).

@pytest.fixture
def amx_dw_calls(monkeypatch):
    """Counts the weight gradients that take sddmm_blocks_amx, as tokens."""
    calls = []
    real = cpu._sddmm_blocks_amx

    def spy(so, dy, *args):
        calls.append(dy.shape[0])
        return real(so, dy, *args)
    monkeypatch.setattr(cpu, "_sddmm_blocks_amx", spy)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 100])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_amx_block_sddmm_matches_the_fp64_reference(b, tokens, threads, amx_build, amx_dw_calls, request):
    """bf16 dy and x, 16 | b: the (b / 16)^2 C tiles of each block over one chunk of 32 tokens,
    several, and partial ones (tokens past T zero in both packs), blocks in any order and
    repeated, against fp64 of the bf16 numbers at the fp32 tolerance (its sums are fp32)."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    check_bf16_block_sddmm(180, b, tokens, f"{threads} threads, AMX ({amx_build})")
    assert amx_dw_calls == [tokens]


def check_bf16_block_sddmm(seed, b, tokens, what):
    """cpu.sddmm_blocks of bf16 dy and x at 3 x 5 blocks of b (about half of them, two repeated)
    against fp64 of the bf16 numbers at the fp32 tolerance."""
    g = torch.Generator().manual_seed(seed + b + tokens)
    rows, cols = block_pattern(g, 3, 5, density=0.5)
    rows, cols = torch.cat([rows, rows[:2]]), torch.cat([cols, cols[:2]])
    dy = torch.randn(tokens, 3 * b, generator=g).to(torch.bfloat16)
    x = torch.randn(tokens, 5 * b, generator=g).to(torch.bfloat16)
    got = cpu.sddmm_blocks(dy, x, rows, cols, b)
    ref, lowp = block_reference(dy, x, rows, cols, b)
    assert_close_to_reference(got, ref, lowp, f"b={b}, T={tokens}, {what}")


def test_amx_block_sddmm_reads_strided_operands_and_leaves_fp32_and_b8_alone(amx_build, amx_dw_calls):
    """Transposed views of dy and x take it (packed element by element); fp32 or mixed operands
    and b = 8 take the fp32 register tiles."""
    g = torch.Generator().manual_seed(190)
    rows, cols = block_pattern(g, 3, 5, density=0.6)
    dy = torch.randn(48, 45, generator=g).to(torch.bfloat16).t()
    x = torch.randn(80, 45, generator=g).to(torch.bfloat16).t()
    got = cpu.sddmm_blocks(dy, x, rows, cols, 16)
    ref, lowp = block_reference(dy, x, rows, cols, 16)
    assert_close_to_reference(got, ref, lowp, f"transposed views, AMX ({amx_build})")
    assert amx_dw_calls == [45]
    for a, c, b in ((dy.float(), x, 16), (dy, x.float(), 16), (dy[:, :40], x[:, :40], 8)):
        cpu.sddmm_blocks(a, c, rows, cols, b)
    assert amx_dw_calls == [45]


def test_a_diag_layer_under_autocast_takes_the_amx_block_sddmm(amx_build, amx_dw_calls):
    """DiagLinear b = 16 under bf16 autocast: its weight gradient by AMX tiles, against fp64 of the
    bf16 numbers (rounded to bf16 as the layer's gradient is)."""
    g = torch.Generator().manual_seed(191)
    layer = DIAG["b=16 wide"](g)
    x = torch.randn(40, layer.in_features, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(dy)
    assert amx_dw_calls == [40]
    xb = x.to(torch.bfloat16)
    rows, cols = layer.coords()
    r, c = rows.long(), cols.long()
    ref = (dy.double().t() @ xb.double())[r, c].reshape(layer.values.shape)
    lowp = (dy.t() @ xb)[r, c].reshape(layer.values.shape)
    assert_matches(layer.values.grad.to(torch.bfloat16), ref, lowp, f"dW, AMX ({amx_build})")


# The AVX-512-BF16 block products of several tokens (bsr16_mm_dpbf16 for the forward and the input
# gradient, sddmm_blocks_dpbf16 for the weight gradient; 16 | b): on this CPU where it has
# avx512_bf16 (skipping with the reason elsewhere) and on the emu build, with AMX hidden where
# the build has it too (AMX would take the inference product and the weight gradient first).

@pytest.fixture(params=["this CPU", "emu"])
def blocks_dpbf16_build(request, monkeypatch):
    build = tile_build(request, "blocks_dpbf16")
    monkeypatch.setitem(cpu._state, "features", cpu.features() - {"amx"})
    return build


@pytest.fixture
def dpbf16_block_calls(monkeypatch):
    """Counts the products that take bsr16_mm_dpbf16 (as ('fwd' / 'dx' / 'bsr16', tokens)) and
    sddmm_blocks_dpbf16 (as ('dW', tokens))."""
    calls = []
    real_mm, real_dw, real_w = cpu._bsr_dpbf16, cpu._sddmm_blocks_dpbf16, cpu._pack_token_pairs16

    def spy_mm(so, crow, bcols, blocks, n_rows, n_cols, x, bias_ptr, bidx, transpose, out_dtype):
        calls.append(("dx" if transpose else "fwd", x.shape[0]))
        return real_mm(so, crow, bcols, blocks, n_rows, n_cols, x, bias_ptr, bidx, transpose, out_dtype)

    def spy_dw(so, dy, *args):
        calls.append(("dW", dy.shape[0]))
        return real_dw(so, dy, *args)
    monkeypatch.setattr(cpu, "_bsr_dpbf16", spy_mm)
    monkeypatch.setattr(cpu, "_sddmm_blocks_dpbf16", spy_dw)
    monkeypatch.setattr(cpu, "_pack_token_pairs16", lambda so, x: (calls.append(("x pairs", x.shape[0])),
                                                                   real_w(so, x))[1])
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 33])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_avx512_bf16_block_product_matches_the_fp64_reference(b, tokens, out_dtype, threads, blocks_dpbf16_build,
                                                              dpbf16_block_calls, request):
    """bf16 blocks and x, y = x W^T + bias and dx = dy W (the CSR of W^T, blocks read transposed):
    the (b / 16)^2 sub-blocks of each block, one and several token tiles of 16 and partial ones
    (tokens past T zero in the pack, never written), blocks in any order (the index), an empty
    block row (the bias alone), y in bf16 or fp32; fp64 of the same bf16 numbers, at the fp32
    tolerance for fp32 y (its sums are fp32) and 2x torch's bf16 error for bf16 y."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    g = torch.Generator().manual_seed(200 + b + tokens)
    R, C = 3, 5
    rows, cols = block_pattern(g, R, C)
    blocks = torch.randn(rows.numel(), b, b, generator=g).to(torch.bfloat16)
    w = dense_of(rows, cols, blocks, R, C, b)
    bias = torch.randn(R * b, generator=g).to(torch.bfloat16).float()
    for transpose in (False, True):
        crow, bcols, bidx = bsr_of(rows, cols, R, C, transpose)
        n_r, n_c = (C, R) if transpose else (R, C)
        x = torch.randn(tokens, n_c * b, generator=g).to(torch.bfloat16)
        wt = w if transpose else w.t()
        bb = None if transpose else bias
        y = cpu.bsr_matmul(crow, bcols, blocks, n_r, n_c, x, bb, bidx, transpose, out_dtype=out_dtype)
        ref = x.double() @ wt + (0 if bb is None else bb.double())
        lowp = (x @ wt.to(torch.bfloat16) + (0 if bb is None else bb.to(torch.bfloat16))).to(out_dtype)
        name = f"b={b}, T={tokens}, {'dx' if transpose else 'fwd'}, y {out_dtype}, {threads} threads ({blocks_dpbf16_build})"
        assert y.dtype == out_dtype and y.shape == (tokens, n_r * b), name
        if out_dtype is torch.float32:
            assert_close_to_reference(y, ref, x.float() @ wt.float(), name)
        else:
            assert_matches(y, ref, lowp, name)
        if not transpose:
            assert torch.equal(y[:, :b].float(), bias[:b].expand(tokens, b).to(out_dtype).float()), \
                f"{name}: the empty block row must give the bias alone"
    assert [c for c in dpbf16_block_calls if c[0] != "x pairs"] == [("fwd", tokens), ("dx", tokens)]


@pytest.mark.parametrize("layout", ["column slice", "transposed view"])
def test_avx512_bf16_block_product_reads_x_at_its_strides_and_leaves_other_dtypes_alone(layout, blocks_dpbf16_build,
                                                                                         dpbf16_block_calls):
    """x a column slice of a wider bf16 tensor (row stride != width) or a transposed view (packed
    element by element); fp32 blocks or x, and b = 8, take the fp32 register tiles."""
    g = torch.Generator().manual_seed(210)
    b, R, C, T = 16, 4, 6, 21
    rows, cols = block_pattern(g, R, C)
    blocks = torch.randn(rows.numel(), b, b, generator=g).to(torch.bfloat16)
    w = dense_of(rows, cols, blocks, R, C, b)
    crow, bcols, bidx = bsr_of(rows, cols, R, C)
    if layout == "column slice":
        x = torch.randn(T, C * b + 40, generator=g).to(torch.bfloat16)[:, 24:24 + C * b]
    else:
        x = torch.randn(C * b, T, generator=g).to(torch.bfloat16).t()
    y = cpu.bsr_matmul(crow, bcols, blocks, R, C, x, None, bidx, out_dtype=torch.float32)
    assert_close_to_reference(y, x.double() @ w.t(), x.float() @ w.float().t(), f"{layout} ({blocks_dpbf16_build})")
    assert ("fwd", T) in dpbf16_block_calls
    n = len(dpbf16_block_calls)
    for bl, xx in ((blocks.float(), x), (blocks, x.float())):
        cpu.bsr_matmul(crow, bcols, bl, R, C, xx, None, bidx)
    rows8, cols8 = block_pattern(g, 2, 3)
    crow8, bcols8, bidx8 = bsr_of(rows8, cols8, 2, 3)
    cpu.bsr_matmul(crow8, bcols8, torch.randn(rows8.numel(), 8, 8).to(torch.bfloat16), 2, 3,
                   torch.randn(5, 24).to(torch.bfloat16), None, bidx8)
    assert len(dpbf16_block_calls) == n


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 2, 31, 32, 33, 100])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_avx512_bf16_block_sddmm_matches_the_fp64_reference(b, tokens, threads, blocks_dpbf16_build,
                                                           dpbf16_block_calls, request):
    """bf16 dy and x, 16 | b: every sub-block of each block over token pairs (an odd T: the last
    pair's second token zero in both packs), blocks in any order and repeated, against fp64 of
    the bf16 numbers at the fp32 tolerance (its sums are fp32)."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    check_bf16_block_sddmm(220, b, tokens, f"{threads} threads ({blocks_dpbf16_build})")
    assert dpbf16_block_calls == [("dW", tokens)]


def test_avx512_bf16_block_sddmm_reads_strided_operands_and_leaves_fp32_and_b8_alone(blocks_dpbf16_build,
                                                                                    dpbf16_block_calls):
    """Transposed views and column slices of dy and x take it (packed element by element, or by
    rows); fp32 or mixed operands and b = 8 take the fp32 register tiles."""
    g = torch.Generator().manual_seed(230)
    rows, cols = block_pattern(g, 3, 5, density=0.6)
    for dy, x in ((torch.randn(48, 45, generator=g).t(), torch.randn(80, 45, generator=g).t()),
                  (torch.randn(45, 60, generator=g)[:, 5:53], torch.randn(45, 96, generator=g)[:, 16:96])):
        dy, x = dy.to(torch.bfloat16), x.to(torch.bfloat16)
        got = cpu.sddmm_blocks(dy, x, rows, cols, 16)
        ref, lowp = block_reference(dy, x, rows, cols, 16)
        assert_close_to_reference(got, ref, lowp, f"strides {dy.stride()}, {x.stride()} ({blocks_dpbf16_build})")
    assert dpbf16_block_calls == [("dW", 45), ("dW", 45)]
    for a, c, b in ((dy.float(), x, 16), (dy, x.float(), 16), (dy[:, :40], x[:, :40], 8)):
        cpu.sddmm_blocks(a, c, rows, cols, b)
    assert len(dpbf16_block_calls) == 2


@pytest.mark.parametrize("tokens", [3, 40])
@pytest.mark.parametrize("name", ["b=16 wide", "b=16 tall", "b=64"])
def test_a_diag_layer_under_autocast_takes_the_avx512_bf16_block_products(name, tokens, blocks_dpbf16_build,
                                                                          dpbf16_block_calls):
    """DiagLinear's training step under bf16 autocast: forward, input gradient and weight gradient
    each by AVX-512-BF16, against fp64 of the bf16 numbers within 2x torch's bf16 error."""
    g = torch.Generator().manual_seed(240 + tokens)
    layer = DIAG[name](g)
    x = torch.randn(tokens, layer.in_features, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(dy)
    ops = [c for c in dpbf16_block_calls if c[0] != "x pairs"]
    assert sorted(ops) == sorted([("fwd", tokens), ("dx", tokens), ("dW", tokens)]), f"{name}: {ops}"
    w = layer.to_dense().detach().to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16)
    bias = layer.bias.detach().to(torch.bfloat16)
    rows, cols = layer.coords()
    r, c = rows.long(), cols.long()
    checks = {
        "y": (y, xb.double() @ w.double().t() + bias.double(), xb @ w.t() + bias),
        "dx": (x.grad.to(torch.bfloat16), dy.double() @ w.double(), dy @ w),
        "dW": (layer.values.grad.to(torch.bfloat16), (dy.double().t() @ xb.double())[r, c].reshape(layer.values.shape),
               (dy.t() @ xb)[r, c].reshape(layer.values.shape)),
    }
    for what, (got, ref, lowp) in checks.items():
        assert_matches(got, ref, lowp, f"{name}, T={tokens} ({blocks_dpbf16_build}): {what}")


@pytest.mark.parametrize("tokens", [2, 16, 33, 70])
@pytest.mark.parametrize("name", ["b=16 wide", "b=16 tall", "b=64"])
def test_bf16_inference_of_several_tokens_takes_the_avx512_bf16_block_product(name, tokens, blocks_dpbf16_build,
                                                                             native_calls, dpbf16_block_calls):
    """A bf16 DiagLinear's inference (cpu_inference) of several tokens: its 16 x 16 VNNI weight
    ('bsr16', built once) by bsr16_mm_dpbf16, against fp64 of the bf16 numbers."""
    g = torch.Generator().manual_seed(250 + tokens)
    layer = DIAG[name](g).to(torch.bfloat16)
    x = torch.randn(tokens, layer.in_features, generator=g)
    ref, lowp = bf16_reference(layer, x)
    with torch.no_grad():
        y = layer(x.to(torch.bfloat16))
    assert native_calls[-1] == ("bsr16", tokens)
    assert dpbf16_block_calls == [("x pairs", tokens)]
    assert_matches(y, ref, lowp, f"{name}, T={tokens} ({blocks_dpbf16_build})")
