"""Wrap-around (block-)diagonal sparse matmul: DynaDiag's layer format.

The weight W [out, in] is R x C blocks of b x b (R = out/b, C = in/b), D = min(R, C),
P = max(R, C). Diagonal o in [0, P) is the set of D blocks
    {((c + o) mod R, c) : c < C}   when R >= C   (indexed by block column d = c)
    {(r, (r + o) mod C) : r < R}   when R <  C   (indexed by block row    d = r)
K active diagonals: offsets int32 [K] (distinct, in [0, P)), values [K, D, b, b] where
values[k, d] is the b x b block (rows = output features) of diagonal k at index d.

    y = x @ W^T     x: [..., in] -> y: [..., out]

Each output block row gathers at most K input blocks, and the transpose of the pattern is
again diagonal with the same offsets, so the input gradient is the same kernel with the
roles swapped: no atomics, no re-layout. b >= 16 uses tl.dot (tensor cores on a GPU);
b = 1 is a shifted multiply-add per diagonal. The weight gradient is the block SDDMM at
the diagonals' blocks (``diag_dw``).

The kernels. A program of ``_diag_block_kernel`` owns a token tile and NB consecutive output
blocks (b = 16: 8 blocks, 128 outputs, a 3-D tl.dot; b >= 32: one block, a 2-D dot, which
the sm_90 SASS shows cheaper per block pair there, see ``_tile_blocks``). Its loop walks a
host-built list of the (diagonal, input block of the tile's first block) pairs that feed
the tile (``diag_tile_list``, built on the device once per pattern and cached on the
offsets tensor): block nb reads input block p0 + nb, wrapped once, so the loop has no
branch and no modulo, indexes in int32 and pipelines (``tl.range(num_stages=)``). b = 1
(``_diag_elem_kernel``) walks the same list: each diagonal is a shifted contiguous run of
x and of its values. ``_diag_dw_kernel`` reduces dW[k, d] = dy[:, row]^T @ x[:, col] over
a token chunk for G consecutive blocks of one diagonal (their rows and columns are runs
too) with token-major tiles, and writes fp32 partials per chunk that the launcher sums:
deterministic, no atomics.

Example:
    y = diag_matmul(x, values, offsets, block_size=16)                    # square or wide
    y = diag_matmul(x, values, offsets, block_size=16, out_features=3072) # tall
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import runtime as rt
from .module import SparseLayer
from .sddmm import acc_dtype, dot_settings, sddmm
from .coords import csr_structure
from .sparse import csr_matmul

_TORCH_CHUNK_ELEMS = 1 << 22


def diag_geometry(in_features: int, out_features: int, block_size: int) -> tuple[int, int, int, int]:
    """(R, C, D, P) of the block grid; raises if the block size does not divide the matrix."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if in_features % block_size or out_features % block_size:
        raise ValueError(f"block_size={block_size} must divide in_features={in_features} "
                         f"and out_features={out_features}")
    R, C = out_features // block_size, in_features // block_size
    return R, C, min(R, C), max(R, C)


def diag_coords(offsets: torch.Tensor, R: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block (row, col) of every stored block, each [K, D] int32."""
    D = min(R, C)
    d = torch.arange(D, device=offsets.device, dtype=torch.int64)[None, :]
    o = offsets.long()[:, None]
    if R >= C:
        rows, cols = (d + o) % R, d.expand(len(offsets), D)
    else:
        rows, cols = d.expand(len(offsets), D), (d + o) % C
    return rows.to(torch.int32), cols.to(torch.int32)


def diag_to_dense(values, offsets, in_features, out_features, block_size):
    R, C, D, P = diag_geometry(in_features, out_features, block_size)
    b = block_size
    rows, cols = diag_coords(offsets, R, C)
    w = values.new_zeros(R, C, b, b)
    w.index_put_((rows.reshape(-1).long(), cols.reshape(-1).long()), values.reshape(-1, b, b), accumulate=True)
    return w.permute(0, 2, 1, 3).reshape(out_features, in_features)


def diag_matmul_ref(x, values, offsets, block_size, out_features=None):
    """The spec, through a dense weight (tests only)."""
    out_features = values.shape[1] * block_size if out_features is None else out_features
    return x @ diag_to_dense(values, offsets, x.shape[-1], out_features, block_size).t()


# Each output block q of ``out = a @ op(W)`` gathers, for every diagonal k, one input block p:
#   BY_OUT (the diagonal is indexed by the output side): p = (q + o) mod P, value index d = q;
#   BY_IN  (indexed by the input side):  p = (q - o) mod P, valid when p < D, value index d = p.
# Forward (out = rows) is BY_IN when R >= C; the input gradient (out = cols) is BY_OUT then.
# The host lists below hold, per tile of nb output blocks, the (diagonal, p of its first block)
# pairs; the kernels add the lane and wrap once, and BY_IN masks the lanes with p >= D.

def diag_tile_list_ref(offsets: torch.Tensor, n_out: int, P: int, D: int, by_out: bool, nb: int):
    """The spec of ``diag_tile_list`` as plain loops: for each output tile (nb consecutive
    output blocks from q0 = tile * nb), every diagonal k that feeds at least one of its
    blocks, in order of k, as (k * D, p0) with p0 the input block that q0 reads."""
    tiles = []
    for tile in range(-(-n_out // nb)):
        q0, row = tile * nb, []
        for k, o in enumerate(offsets.tolist()):
            p0 = (q0 + o) % P if by_out else (q0 - o) % P
            if by_out or any((q - o) % P < D for q in range(q0, min(q0 + nb, n_out))):
                row.append((k * D, p0))
        tiles.append(row)
    return tiles


def diag_tile_list(offsets: torch.Tensor, n_out: int, P: int, D: int, by_out: bool, nb: int):
    """(tile_ptr [n_tiles + 1], entries [E, 2]) int32: tile t's entries are
    entries[tile_ptr[t]:tile_ptr[t + 1]], each (k * D, p0) as in ``diag_tile_list_ref``.
    Built on the offsets' device once per pattern (cached on the offsets tensor), so the
    kernel's loop over a tile's entries has no branch and no modulo."""
    def build():
        n_tiles = -(-n_out // nb)
        dev = offsets.device
        q0 = torch.arange(n_tiles, device=dev, dtype=torch.int64)[:, None] * nb  # [n_tiles, 1]
        o = offsets.long()[None, :]  # [1, K]
        p0 = (q0 + o) % P if by_out else (q0 - o) % P  # [n_tiles, K]
        if by_out:
            keep = torch.ones_like(p0, dtype=torch.bool)
        else:
            lane = torch.arange(nb, device=dev)
            p = (p0[:, :, None] + lane) % P
            keep = ((p < D) & (q0[:, :, None] + lane < n_out)).any(-1)
        vbase = (torch.arange(offsets.numel(), device=dev, dtype=torch.int64) * D).expand_as(p0)
        tile_ptr = torch.zeros(n_tiles + 1, device=dev, dtype=torch.int32)
        tile_ptr[1:] = keep.sum(1).cumsum(0).to(torch.int32)
        entries = torch.stack([vbase[keep], p0[keep]], 1).to(torch.int32).contiguous()
        return tile_ptr, entries
    return rt.cached_pattern((offsets,), ("diag tiles", n_out, P, D, by_out, nb), build)


@triton.jit
def diag_block_kernel(
    a_ptr, values_ptr, tile_ptr, entries_ptr, bias_ptr, out_ptr, aux_ptr,
    T, D, P, N_OUT, N_TILES,
    stride_at, stride_ai, stride_ot, stride_oi,
    B: tl.constexpr, BLOCK_B: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr,
    BY_OUT: tl.constexpr, TRANS_W: tl.constexpr, USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """out = a @ op(W) (+ bias) for b >= 16 (tl.dot) or 1 < b < 16 (CUDA cores), with an
    optional GELU epilogue: one program per (token tile of BLOCK_T, tile of NB output blocks).

    a [T, n_in] (strides stride_at, stride_ai); values [K, D, B, B] contiguous; tile_ptr int32
    [N_TILES + 1] and entries int32 [E, 2] from ``diag_tile_list(offsets, N_OUT, P, D, BY_OUT,
    NB)``; bias [N_OUT * B] (read when HAS_BIAS); out [T, N_OUT * B] (strides stride_ot,
    stride_oi); aux with out's shape and strides (EPILOGUE 1: written with gelu(out); 2: read
    as h, out = acc * gelu'(h); 0: unused). TRANS_W: op(W) = W^T (the forward), else W (the
    input gradient). BLOCK_B = next power of two >= max(B, 16) when USE_DOT. Grid:
    (cdiv(T, BLOCK_T) * N_TILES,), output tiles varying fastest.
    """
    # The tiles of one token tile run together (output tiles vary fastest), so x stays in L2.
    # The loop walks the host-built list of (diagonal, first input block) pairs feeding the
    # tile: block nb reads input block p0 + nb (wrapped once at P), in int32; the 3-D tl.dot
    # keeps the NB accumulators [BT, b] apart.
    pid = tl.program_id(0)
    tile = pid % N_TILES
    pid_t = pid // N_TILES
    offs_n = tl.arange(0, NB)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    q = tile * NB + offs_n  # [NB] output blocks
    mask_q = q < N_OUT
    mask_tb = (offs_t < T)[None, :, None] & (offs_b < B)[None, None, :]  # [1, BT, BB]
    a_rows = a_ptr + offs_t[None, :, None] * stride_at  # [1, BT, 1], the only int64 offsets
    # w[i, j] of a stored block is (output feature i, input feature j); read as op(W).
    if TRANS_W:
        w_offs = offs_b[None, None, :] * B + offs_b[None, :, None]  # [1, BB(j), BB(i)]
    else:
        w_offs = offs_b[None, :, None] * B + offs_b[None, None, :]  # [1, BB(i), BB(j)]
    mask_w = (offs_b < B)[None, :, None] & (offs_b < B)[None, None, :]
    if USE_DOT and NB == 1:
        acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=ACC)
    else:
        acc = tl.zeros((NB, BLOCK_T, BLOCK_B), dtype=ACC)
    start = tl.load(tile_ptr + tile)
    end = tl.load(tile_ptr + tile + 1)
    for e in tl.range(start, end, num_stages=NUM_STAGES):
        vbase = tl.load(entries_ptr + 2 * e)  # k * D
        p = tl.load(entries_ptr + 2 * e + 1) + offs_n  # [NB] input blocks
        p = tl.where(p >= P, p - P, p)
        if BY_OUT:
            d = q
            valid = mask_q
        else:
            d = p
            valid = mask_q & (p < D)
        a = tl.load(a_rows + ((p * B)[:, None, None] + offs_b[None, None, :]) * stride_ai,
                    mask=valid[:, None, None] & mask_tb, other=0.0)  # [NB, BT, BB]
        w = tl.load(values_ptr + ((vbase + d) * (B * B))[:, None, None] + w_offs,
                    mask=valid[:, None, None] & mask_w, other=0.0)  # [NB, BB, BB]
        if UPCAST:  # right after the load: the interpreter computes bf16 on raw bits
            a = a.to(ACC)
            w = w.to(ACC)
        if USE_DOT and NB == 1:  # a 2-D dot: wgmma on sm_90 (a 3-D one is mma.sync)
            acc += tl.dot(tl.reshape(a, (BLOCK_T, BLOCK_B)), tl.reshape(w, (BLOCK_B, BLOCK_B)),
                          input_precision=DOT_PRECISION, out_dtype=ACC)
        elif USE_DOT:
            acc += tl.dot(a, w, input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            acc += tl.sum(a.to(ACC)[:, :, :, None] * w.to(ACC)[:, None, :, :], axis=2)
    acc = tl.reshape(acc, (NB, BLOCK_T, BLOCK_B))
    feat = (q * B)[:, None, None] + offs_b[None, None, :]  # [NB, 1, BB] output features
    if HAS_BIAS:  # the layer's bias in the epilogue: no extra pass over y
        acc += tl.load(bias_ptr + feat, mask=mask_q[:, None, None] & (offs_b < B)[None, None, :], other=0.0).to(ACC)
    out_offs = offs_t[None, :, None] * stride_ot + feat * stride_oi  # aux has out's shape and strides
    mask_out = mask_q[:, None, None] & mask_tb
    if EPILOGUE == 1:  # GELU: out = h, aux = gelu(h) (exact, erf) from the fp32 h
        gelu = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        tl.store(aux_ptr + out_offs, gelu.to(aux_ptr.dtype.element_ty), mask=mask_out)
    if EPILOGUE == 2:  # GELU_GRAD: out = acc * gelu'(h), h read from aux (the MLP's dh)
        h = tl.load(aux_ptr + out_offs, mask=mask_out, other=0.0).to(ACC)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
        acc = acc * (cdf + h * pdf)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def diag_elem_kernel(
    a_ptr, values_ptr, tile_ptr, entries_ptr, bias_ptr, out_ptr,
    T, D, P, N_OUT, N_TILES,
    stride_at, stride_ai, stride_ot, stride_oi,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BY_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out = a @ op(W) (+ bias) for element diagonals (b = 1) on CUDA cores: one program per
    (token tile of BLOCK_T, BLOCK_Q consecutive outputs).

    a [T, n_in] (strides stride_at, stride_ai); values [K, D] contiguous; tile_ptr / entries
    int32 from ``diag_tile_list(offsets, N_OUT, P, D, BY_OUT, BLOCK_Q)``; bias [N_OUT] (read
    when HAS_BIAS); out [T, N_OUT] (strides stride_ot, stride_oi). Grid: (cdiv(T, BLOCK_T) *
    N_TILES,). Per diagonal, output q0 + j reads input p0 + j (wrapped once at P): a shifted
    contiguous run of x and of the values.
    """
    pid = tl.program_id(0)
    tile = pid % N_TILES
    pid_t = pid // N_TILES
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, BLOCK_Q)
    q = tile * BLOCK_Q + offs_j  # [BQ]
    mask_q = q < N_OUT
    mask_t = offs_t < T
    a_rows = a_ptr + offs_t[:, None] * stride_at  # [BT, 1]
    acc = tl.zeros((BLOCK_T, BLOCK_Q), dtype=ACC)
    start = tl.load(tile_ptr + tile)
    end = tl.load(tile_ptr + tile + 1)
    for e in tl.range(start, end, num_stages=NUM_STAGES):
        vbase = tl.load(entries_ptr + 2 * e)
        p = tl.load(entries_ptr + 2 * e + 1) + offs_j
        p = tl.where(p >= P, p - P, p)
        if BY_OUT:
            d = q
            valid = mask_q
        else:
            d = p
            valid = mask_q & (p < D)
        a = tl.load(a_rows + p[None, :] * stride_ai, mask=mask_t[:, None] & valid[None, :], other=0.0)  # [BT, BQ]
        w = tl.load(values_ptr + vbase + d, mask=valid, other=0.0)  # [BQ]
        acc += a.to(ACC) * w.to(ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + q, mask=mask_q, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_ot + q[None, :] * stride_oi,
             acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_q[None, :])


def diag_dw_groups(offsets: torch.Tensor, R: int, C: int, group: int) -> torch.Tensor:
    """[n_groups, 4] int32 of the weight-gradient kernel: diagonal k's blocks d0 .. d0 +
    group - 1 as (k * D + d0, d0, row block of d0, column block of d0); cached per pattern."""
    def build():
        D = min(R, C)
        dev = offsets.device
        d0 = torch.arange(0, D, group, device=dev, dtype=torch.int64)[None, :]  # [1, G]
        o = offsets.long()[:, None]  # [K, 1]
        k = torch.arange(offsets.numel(), device=dev, dtype=torch.int64)[:, None]
        rows, cols = ((d0 + o) % R, d0.expand_as(d0 + o)) if R >= C else (d0.expand_as(d0 + o), (d0 + o) % C)
        table = torch.stack([(k * D + d0).expand_as(rows), d0.expand_as(rows), rows, cols], -1)
        return table.reshape(-1, 4).to(torch.int32).contiguous()
    return rt.cached_pattern((offsets,), ("diag dw groups", R, C, group), build)


@triton.jit
def diag_dw_kernel(
    dy_ptr, x_ptr, groups_ptr, g_ptr,
    T, T_CHUNK, D, R, C, N_GROUPS, N_VALUES,
    stride_dyt, stride_dyo, stride_xt, stride_xi,
    B: tl.constexpr, BLOCK_B: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Partial weight gradients g[chunk, k, d] = dy[chunk, row block]^T @ x[chunk, column
    block] for G consecutive blocks d of one diagonal over one chunk of T_CHUNK tokens.

    dy [T, out] (strides stride_dyt, stride_dyo); x [T, in] (strides stride_xt, stride_xi);
    groups int32 [N_GROUPS, 4] from ``diag_dw_groups(offsets, R, C, G)``; g [n_chunks, K, D, B,
    B] contiguous (N_VALUES = K * D * B * B elements a chunk; fp32, or dy's dtype when one
    chunk). Grid: (N_GROUPS * n_chunks,). The launcher sums the chunks: deterministic, no
    atomics.
    """
    # Token-major tiles: the MMA is [b, BT] @ [BT, b], batched over the G blocks (3-D
    # mma.sync) or, for G = 1, 2-D (wgmma on sm_90 for b >= 64).
    pid = tl.program_id(0)
    group = pid % N_GROUPS
    chunk = pid // N_GROUPS
    offs_n = tl.arange(0, G)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    vd = tl.load(groups_ptr + 4 * group) + offs_n  # [G] k * D + d
    d = tl.load(groups_ptr + 4 * group + 1) + offs_n
    r = tl.load(groups_ptr + 4 * group + 2) + offs_n
    c = tl.load(groups_ptr + 4 * group + 3) + offs_n
    r = tl.where(r >= R, r - R, r)
    c = tl.where(c >= C, c - C, c)
    valid = d < D
    t_start = chunk * T_CHUNK
    t_end = tl.minimum(t_start + T_CHUNK, T)
    offs_t = tl.arange(0, BLOCK_T)
    row0 = t_start.to(tl.int64)
    if USE_DOT and G == 1:
        # One block: 2-D token-major tiles [BT, BB]; dy^T goes to the MMA as a transposed view
        # (loaded async like x; a transposed pointer tile would be loaded synchronously and
        # shuffled in registers: 132 PRMT per iteration at b = 64).
        dy_ptrs = (dy_ptr + (row0 + offs_t)[:, None] * stride_dyt
                   + (tl.sum(r, 0) * B + offs_b)[None, :] * stride_dyo)  # [BT, BB]
        x_ptrs = x_ptr + (row0 + offs_t)[:, None] * stride_xt + (tl.sum(c, 0) * B + offs_b)[None, :] * stride_xi
        acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=ACC)
        for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
            m = (t0 + offs_t < t_end)[:, None] & mask_b[None, :]
            a = tl.load(dy_ptrs, mask=m, other=0.0)  # [BT, BB(i)]
            x = tl.load(x_ptrs, mask=m, other=0.0)  # [BT, BB(j)]
            if UPCAST:  # right after the load: the interpreter computes bf16 on raw bits
                a = a.to(ACC)
                x = x.to(ACC)
            acc += tl.dot(tl.trans(a), x, input_precision=DOT_PRECISION, out_dtype=ACC)
            dy_ptrs += BLOCK_T * stride_dyt
            x_ptrs += BLOCK_T * stride_xt
        acc = tl.reshape(acc, (G, BLOCK_B, BLOCK_B))
    else:
        # G blocks: dy read as [G, BB(i), BT] (the 3-D dot's A, loaded async as it is; its
        # transposed view of a [G, BT, BB] tile loads synchronously), x as [G, BT, BB(j)].
        dy_ptrs = (dy_ptr + (row0 + offs_t)[None, None, :] * stride_dyt
                   + ((r * B)[:, None, None] + offs_b[None, :, None]) * stride_dyo)
        x_ptrs = (x_ptr + (row0 + offs_t)[None, :, None] * stride_xt
                  + ((c * B)[:, None, None] + offs_b[None, None, :]) * stride_xi)
        mask_dy = valid[:, None, None] & mask_b[None, :, None]
        mask_x = valid[:, None, None] & mask_b[None, None, :]
        acc = tl.zeros((G, BLOCK_B, BLOCK_B), dtype=ACC)
        for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
            in_t = t0 + offs_t < t_end
            a = tl.load(dy_ptrs, mask=mask_dy & in_t[None, None, :], other=0.0)  # [G, BB, BT]
            x = tl.load(x_ptrs, mask=mask_x & in_t[None, :, None], other=0.0)  # [G, BT, BB]
            if UPCAST:
                a = a.to(ACC)
                x = x.to(ACC)
            if USE_DOT:
                acc += tl.dot(a, x, input_precision=DOT_PRECISION, out_dtype=ACC)
            else:
                acc += tl.sum(a.to(ACC)[:, :, :, None] * x.to(ACC)[:, None, :, :], axis=2)
            dy_ptrs += BLOCK_T * stride_dyt
            x_ptrs += BLOCK_T * stride_xt
    offs_g = (chunk.to(tl.int64) * N_VALUES + (vd * (B * B))[:, None, None]
              + offs_b[None, :, None] * B + offs_b[None, None, :])  # [G, BB, BB]
    tl.store(g_ptr + offs_g, acc.to(g_ptr.dtype.element_ty),
             mask=valid[:, None, None] & mask_b[None, :, None] & mask_b[None, None, :])


# The kernels' earlier names (kernels/__init__.py imports them).
_diag_block_kernel, _diag_elem_kernel, _diag_dw_kernel = diag_block_kernel, diag_elem_kernel, diag_dw_kernel


def _check(x2, values, offsets, block_size, out_features, bias=None):
    rt.check_float("x", x2)
    if bias is not None:
        rt.check_float("bias", bias)
        rt.check_dtype_match("bias", bias, "x", x2)
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
        rt.check_same_device(x=x2, bias=bias)
    rt.check_float("values", values)
    rt.check_dtype_match("values", values, "x", x2)
    rt.check_index("offsets", offsets, 1)
    R, C, D, P = diag_geometry(x2.shape[-1], out_features, block_size)
    K, b = offsets.numel(), block_size
    if values.shape != (K, D, b, b):
        raise ValueError(f"values must have shape [K, D, b, b] = {(K, D, b, b)} for in={x2.shape[-1]}, "
                         f"out={out_features}, block_size={b}, got {tuple(values.shape)}")
    rt.check_same_device(x=x2, values=values, offsets=offsets)
    rt.check_range("offsets", offsets, P)
    if rt.checks_enabled() and K > 1 and bool((offsets.sort().values.diff() == 0).any()):
        raise ValueError("offsets must be distinct diagonals; found a repeat")
    return R, C, D, P


# b = 16 with a gathered operand whose 64-token tile fits in L1 (fc1's forward, fc2's input
# gradient at 768 wide): 32 output blocks a program and synchronous loads (LDG.E.128, cached
# in L1; pipelined 16-byte cp.async bypasses L1, so every diagonal re-reads x from L2). sm_90,
# bf16, T = 50,432, ViT-B: x from L2 once per 32 output blocks instead of once per diagonal,
# static model 0.95 -> 1.90x dense; 242-254 registers, 1 block (8 warps) an SM, no spill.
_L1_TILE_BYTES = 96 * 1024


def _block_default(b: int, dtype: torch.dtype, width: int = 0, epilogue: int = 0) -> dict:
    """Launch config of the block kernel where the table has no entry (bench/sweep.py tunes
    the rest). Under the interpreter: big tiles, few loop iterations. fp32 / fp64 tiles take
    twice the registers: b = 16 then keeps 4 blocks (8 spill 32 bytes in fp32 on sm_90).
    ``width``: features of the gathered operand (x for the forward, dy for the input grad)."""
    nb = _tile_blocks(b)
    if dtype.itemsize > 2 and b == 16:
        nb //= 2
    if rt.interpreting():
        return {"BLOCK_T": 64, "NB": nb, "num_warps": 4, "num_stages": 1}
    if b == 16 and dtype.itemsize == 2 and epilogue == 0 and 0 < 64 * width * dtype.itemsize <= _L1_TILE_BYTES:
        return {"BLOCK_T": 64, "NB": 32, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_T": 128, "NB": nb, "num_warps": 8 if b >= 64 or nb > 1 else 4, "num_stages": 3}


def _tile_blocks(b: int) -> int:
    """Output blocks per program (NB) by default, chosen on the sm_90 SASS (bf16, 128-token
    tiles, instructions of the loop body per (input block, output block) pair, warps x
    body / NB): b = 16 NB = 8 on 8 warps (3-D mma.sync 16816, 180 / pair, 92-104 registers)
    beats NB = 1 (wgmma 64x16x16, 296 / pair); b = 32 NB = 1 (wgmma 64x32x16, 360 / pair,
    83 registers) beats NB = 4 (mma.sync, 460 / pair, 201 registers); b = 64 NB = 1 (wgmma
    64x64x16, 74-89 registers) where NB = 2 spills 10 KB. b < 16 (CUDA cores, a
    [NB, BT, b, b] product in registers): 32 outputs."""
    if b < 16:
        return max(1, 32 // rt.next_pow2(b))
    return 8 if b == 16 else 1


_INT32_MAX = 2 ** 31 - 1


# Epilogues of the block kernel (the fused MLP's backward; kernels/fused.py).
EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_GELU_GRAD = 0, 1, 2


def _launch(a, values, offsets, out, D, P, n_out_blocks, b, by_out, trans_w, kernel_name, bias=None,
            aux=None, epilogue=EPILOGUE_NONE):
    T = a.shape[0]
    if epilogue != EPILOGUE_NONE and b < 16:
        raise ValueError(f"the GELU epilogues need block_size >= 16 (the block kernel), got {b}")
    if values.numel() > _INT32_MAX or max(a.shape[1], out.shape[1]) > _INT32_MAX:
        raise ValueError(f"values ({values.numel()} elements) and the feature widths must stay below 2^31: "
                         f"the kernels index them in int32")
    if b == 1:
        cfg = rt.launch_config(kernel_name, {"b": 1, "T": rt.shape_bucket(T), "dtype": str(a.dtype)[6:]},
                               {"BLOCK_T": 64 if rt.interpreting() else 32, "BLOCK_Q": 64, "num_warps": 4,
                                "num_stages": 1 if rt.interpreting() else 3})
        tile_ptr, entries = diag_tile_list(offsets, n_out_blocks, P, D, by_out, cfg["BLOCK_Q"])
        n_tiles = tile_ptr.numel() - 1
        grid = (triton.cdiv(T, cfg["BLOCK_T"]) * n_tiles,)
        diag_elem_kernel[grid](a, values, tile_ptr, entries, a if bias is None else bias, out,
                                T, D, P, n_out_blocks, n_tiles, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                                BLOCK_T=cfg["BLOCK_T"], BLOCK_Q=cfg["BLOCK_Q"], BY_OUT=by_out, HAS_BIAS=bias is not None,
                                ACC=acc_dtype(a.dtype), NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"])
        return
    upcast, precision = dot_settings(a.dtype)
    cfg = rt.launch_config(kernel_name, {"b": b, "T": rt.shape_bucket(T), "dtype": str(a.dtype)[6:]},
                           _block_default(b, a.dtype, a.shape[1], epilogue))
    nb = cfg["NB"]
    tile_ptr, entries = diag_tile_list(offsets, n_out_blocks, P, D, by_out, nb)
    n_tiles = tile_ptr.numel() - 1
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * n_tiles,)
    if grid[0] > _INT32_MAX:
        raise ValueError(f"{T} tokens need {grid[0]} programs, more than a launch holds")
    diag_block_kernel[grid](a, values, tile_ptr, entries, a if bias is None else bias, out,
                             out if aux is None else aux,
                             T, D, P, n_out_blocks, n_tiles, a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                             B=b, BLOCK_B=max(16, rt.next_pow2(b)) if b >= 16 else rt.next_pow2(b), NB=nb,
                             BLOCK_T=cfg["BLOCK_T"], BY_OUT=by_out, TRANS_W=trans_w, USE_DOT=b >= 16, HAS_BIAS=bias is not None,
                             EPILOGUE=epilogue,
                             UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(a.dtype),
                             NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"])


def diag_fwd(x2, values, offsets, block_size: int, out_features: int, bias=None) -> torch.Tensor:
    """Launcher of the forward product y = x2 W^T (+ bias): checks, allocates y, launches
    ``diag_block_kernel`` (b >= 2) or ``diag_elem_kernel`` (b = 1) on x2's device.

    Args:
        x2: [T, in], floating (fp16 / bf16 / fp32 / fp64), any strides; T may be 0.
        values: [K, D, b, b], x2's dtype, D = min(in, out) / b (made contiguous).
        offsets: int32 [K], distinct, in [0, P), P = max(in, out) / b; K may be 0.
        block_size: b >= 1, dividing in and out_features.
        out_features: the width of y (a tall layer's height is not in values' shape).
        bias: [out_features], x2's dtype, or None; added in the kernel's epilogue.
    Returns:
        y: [T, out_features], x2's dtype (accumulated in fp32, fp64 for fp64).
    Constraints: values' element count and both widths below 2^31 (int32 indexing); the
    grid (cdiv(T, BLOCK_T) x output tiles) below 2^31 programs.
    """
    R, C, D, P = _check(x2, values, offsets, block_size, out_features, bias)
    y = torch.empty(x2.shape[0], out_features, dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0:
        return y
    if offsets.numel() == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand_as(y))
    _launch(x2, values.contiguous(), offsets.contiguous(), y, D, P, R, block_size,
            by_out=R < C, trans_w=True, kernel_name="diag_fwd",
            bias=None if bias is None else bias.contiguous())
    return y


def diag_fwd_gelu(x2, values, offsets, block_size: int, out_features: int, bias=None):
    """Launcher of the forward product with a GELU epilogue (the fused MLP's backward):
    ``diag_block_kernel`` with EPILOGUE=1 writes h and gelu(h) in one pass.

    Args: as ``diag_fwd`` (x2 [T, in]; values [K, D, b, b] and bias [out_features] in x2's
        dtype; offsets int32 [K]), with block_size b >= 16.
    Returns:
        (h, gelu(h)): each [T, out_features] in x2's dtype; h = x2 W^T + bias, the exact
        (erf) GELU taken from the fp32 accumulator before rounding.
    """
    R, C, D, P = _check(x2, values, offsets, block_size, out_features, bias)
    h = torch.empty(x2.shape[0], out_features, dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0 or offsets.numel() == 0:
        if x2.shape[0]:
            h.zero_() if bias is None else h.copy_(bias.expand_as(h))
        return h, torch.nn.functional.gelu(h)
    a = torch.empty_like(h)
    _launch(x2, values.contiguous(), offsets.contiguous(), h, D, P, R, block_size,
            by_out=R < C, trans_w=True, kernel_name="diag_fwd",
            bias=None if bias is None else bias.contiguous(), aux=a, epilogue=EPILOGUE_GELU)
    return h, a


def diag_dx_gelu_grad(dy, values, offsets, block_size: int, in_features: int, h) -> torch.Tensor:
    """Launcher of the input gradient through a GELU (the fused MLP's dh): ``diag_block_kernel``
    with EPILOGUE=2 multiplies dy W by gelu'(h) before it stores.

    Args:
        dy: [T, out], floating, any strides.
        values: [K, D, b, b], dy's dtype; offsets: int32 [K] distinct in [0, P).
        block_size: b >= 16, dividing out and in_features.
        in_features: the width of the result.
        h: [T, in_features], dy's dtype: the pre-activation the GELU was applied to.
    Returns:
        dh: [T, in_features], dy's dtype, (dy W) * gelu'(h) with the exact (erf) derivative.
    """
    R, C = dy.shape[1] // block_size, in_features // block_size
    D, P = min(R, C), max(R, C)
    if h.shape != (dy.shape[0], in_features):
        raise ValueError(f"h must have shape {(dy.shape[0], in_features)}, got {tuple(h.shape)}")
    dh = torch.empty(dy.shape[0], in_features, dtype=dy.dtype, device=dy.device)
    if dy.shape[0] == 0:
        return dh
    if offsets.numel() == 0:
        return dh.zero_()
    _launch(dy, values.contiguous(), offsets.contiguous(), dh, D, P, C, block_size,
            by_out=R >= C, trans_w=False, kernel_name="diag_dx", aux=h.contiguous(), epilogue=EPILOGUE_GELU_GRAD)
    return dh


def diag_dx(dy, values, offsets, block_size: int, in_features: int) -> torch.Tensor:
    """Launcher of the input gradient dx = dy W: the forward's kernel with the roles of the
    block row and column swapped (the transposed pattern is diagonal with the same offsets).

    Args:
        dy: [T, out], floating (fp16 / bf16 / fp32 / fp64), any strides; T may be 0.
        values: [K, D, b, b], dy's dtype; offsets: int32 [K], distinct, in [0, P).
        block_size: b >= 1, dividing out and in_features.
        in_features: the width of dx.
    Returns:
        dx: [T, in_features], dy's dtype (accumulated in fp32, fp64 for fp64).
    Constraints: as ``diag_fwd``.
    """
    R, C = dy.shape[1] // block_size, in_features // block_size
    D, P = min(R, C), max(R, C)
    dx = torch.empty(dy.shape[0], in_features, dtype=dy.dtype, device=dy.device)
    if dy.shape[0] == 0:
        return dx
    if offsets.numel() == 0:
        return dx.zero_()
    _launch(dy, values.contiguous(), offsets.contiguous(), dx, D, P, C, block_size,
            by_out=R >= C, trans_w=False, kernel_name="diag_dx")
    return dx


def _acc(t):
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _diag_product_torch(a, values, offsets, n_in_blocks, n_out_blocks, b, gather: bool, transpose_w: bool):
    """out = a @ op(W) block by block. ``gather``: the diagonal is indexed by the output side,
    so each output block d gathers input block (d + o) mod n_in; otherwise each input block d
    produces a contribution that is scattered to output block (d + o) mod n_out."""
    T, K, D = a.shape[0], values.shape[0], values.shape[1]
    a3 = _acc(a).reshape(T, n_in_blocks, b)
    v = _acc(values)
    out = a3.new_zeros(T, n_out_blocks, b)
    if T == 0 or K == 0:
        return out.reshape(T, n_out_blocks * b).to(a.dtype)
    d = torch.arange(D, device=a.device)
    spec = "tkdj,kdij->tkdi" if transpose_w else "tkdi,kdij->tkdj"
    step = max(1, _TORCH_CHUNK_ELEMS // max(T * D * b, 1))
    for s in range(0, K, step):
        o = offsets[s:s + step].long()[:, None]
        if gather:
            src = a3[:, (d[None, :] + o) % n_in_blocks]  # [T, k, D, b]
            out += torch.einsum(spec, src, v[s:s + step]).sum(1)
        else:
            src = a3[:, None, :D].expand(T, o.shape[0], D, b)
            contrib = torch.einsum(spec, src, v[s:s + step])  # [T, k, D, b]
            dst = ((d[None, :] + o) % n_out_blocks).reshape(-1)
            out.index_add_(1, dst, contrib.reshape(T, -1, b))
    return out.reshape(T, n_out_blocks * b).to(a.dtype)


# Up to this block size the CPU path multiplies the diagonals' elements as a CSR (MKL) and
# takes their weight gradient as element dots (sampled_addmm); from it on, the block products
# (batched b x b GEMMs) win. Linear 768 <-> 3072 at 90%, 197 tokens, 2 threads, fwd / dx / dW
# ms: b = 16 elements 3.0-3.3 / 3.2-3.4 / 4.1-4.4, blocks 4.5-5.6 / 4.5-5.8 / 6.1-7.6;
# b = 64 elements 3.1-3.2 / 3.0-3.1 / 3.7-3.8, blocks 1.4-1.7 / 1.3-1.7 / 1.8-2.0.
_CPU_ELEMENT_MAX_BLOCK = 16


def _element_coords(offsets, R: int, C: int, b: int):
    """(rows, cols) of every stored element, aligned with values.reshape(-1) ([K, D, b, b],
    entry [i, j] of a block = output b*row + i, input b*col + j); cached per offsets."""
    def build():
        brow, bcol = (t.reshape(-1, 1, 1).long() for t in diag_coords(offsets, R, C))
        i = torch.arange(b, device=offsets.device)
        rows = (brow * b + i[:, None]).expand(-1, b, b).reshape(-1).to(torch.int32)
        cols = (bcol * b + i[None, :]).expand(-1, b, b).reshape(-1).to(torch.int32)
        return rows, cols
    return rt.cached_pattern((offsets,), ("diag elements", R, C, b), build)


def _diag_csr_product(a, values, offsets, R, C, b: int, transpose: bool):
    """CPU, b <= _CPU_ELEMENT_MAX_BLOCK: the K * D * b * b elements as an MKL CSR product
    (measured 10-20x faster than the gathered einsum at b = 1). ``transpose``: multiply by W^T
    (the input grad). R, C count blocks."""
    n_r, n_c = (C * b, R * b) if transpose else (R * b, C * b)

    def build():  # the CSR structure of the diagonals' elements, once per pattern
        rows, cols = _element_coords(offsets, R, C, b)
        return csr_structure(*((cols, rows) if transpose else (rows, cols)), n_r, n_c)

    order, crow, csr_cols = rt.cached_pattern((offsets,), ("diag", R, C, b, transpose), build)
    vals = values.reshape(-1) if order is None else values.reshape(-1)[order]
    return csr_matmul(crow, csr_cols, vals, n_r, n_c, a.t()).t().contiguous()


def _elementwise_on_cpu(block_size: int, tokens: int, offsets) -> bool:
    return block_size <= _CPU_ELEMENT_MAX_BLOCK and tokens > 4 and offsets.numel() > 0


def diag_fwd_torch(x2, values, offsets, block_size: int, out_features: int, bias=None) -> torch.Tensor:
    R, C, D, P = _check(x2, values, offsets, block_size, out_features, bias)
    if _elementwise_on_cpu(block_size, x2.shape[0], offsets):
        y = _diag_csr_product(x2, values, offsets, R, C, block_size, transpose=False)
    else:
        y = _diag_product_torch(x2, values, offsets, C, R, block_size, gather=R < C, transpose_w=True)
    return y if bias is None else y + bias


def diag_dx_torch(dy, values, offsets, block_size: int, in_features: int) -> torch.Tensor:
    R, C = dy.shape[1] // block_size, in_features // block_size
    if _elementwise_on_cpu(block_size, dy.shape[0], offsets):
        return _diag_csr_product(dy, values, offsets, R, C, block_size, transpose=True)
    return _diag_product_torch(dy, values, offsets, R, C, block_size, gather=R >= C, transpose_w=False)


def _dw_default(b: int) -> dict:
    """Launch config of the weight-gradient kernel where the table has no entry: G blocks of
    one diagonal per program, chosen on the sm_90 SASS (bf16): b = 16 G = 8 and b = 32 G = 4
    (3-D mma.sync 16816, both operands async, 96 / 128 registers; wgmma needs M = 64, which
    the b rows of one block cannot fill; b = 32 G = 1 loads dy synchronously), b = 64 G = 1
    (2-D wgmma 64x64x16, 62 registers). 1 < b < 16: a run of 32 / b blocks on CUDA cores
    (b = 1 goes to the element SDDMM, see ``diag_dw``)."""
    if b < 16:
        group = max(1, 32 // rt.next_pow2(b))
    else:
        group = {16: 8, 32: 4}.get(b, 1)
    if rt.interpreting():
        return {"G": group, "BLOCK_T": 64, "num_warps": 4, "num_stages": 1, "TARGET_PROGRAMS": 4}
    return {"G": group, "BLOCK_T": 64 if group > 1 else 128, "num_warps": 4, "num_stages": 3,
            "TARGET_PROGRAMS": 4 * 132}


def diag_dw(dy, x2, offsets, block_size: int) -> torch.Tensor:
    """Launcher of the weight gradient dW[k, d] = dy[:, row block]^T x2[:, column block] (the
    block SDDMM at the diagonals' blocks): ``diag_dw_kernel`` over token chunks, the fp32
    partials summed here (deterministic); b = 1 goes to the element SDDMM (kernels/sddmm.py).

    Args:
        dy: [T, out], floating, any strides; x2: [T, in], dy's dtype, same T (may be 0).
        offsets: int32 [K], distinct, in [0, P), P = max(in, out) / b.
        block_size: b >= 1, dividing in and out.
    Returns:
        [K, D, b, b] in dy's dtype (accumulated in fp32, fp64 for fp64), D = min(in, out) / b.
    Constraints: K * D * b * b and both widths below 2^31 (int32 indexing).
    """
    rt.check_float("dy", dy)
    rt.check_float("x", x2)
    rt.check_dtype_match("dy", dy, "x", x2)
    rt.check_index("offsets", offsets, 1)
    rt.check_same_device(dy=dy, x=x2, offsets=offsets)
    b = block_size
    R, C, D, P = diag_geometry(x2.shape[1], dy.shape[1], b)
    if dy.shape[0] != x2.shape[0]:
        raise ValueError(f"dy and x must have the same number of tokens, got {dy.shape[0]} and {x2.shape[0]}")
    rt.check_range("offsets", offsets, P)
    K, T = offsets.numel(), dy.shape[0]
    if K * D * b * b > _INT32_MAX or max(dy.shape[1], x2.shape[1]) > _INT32_MAX:
        raise ValueError("the weight gradient and the feature widths must stay below 2^31 elements: "
                         "the kernel indexes them in int32")
    if K == 0 or T == 0:
        return torch.zeros(K, D, b, b, dtype=dy.dtype, device=dy.device)
    if b == 1:
        # Element diagonals: the element SDDMM, whose token-contiguous copies vectorise the
        # reduction over T, beats a shifted run of this kernel on sm_90 (static report, T =
        # 50,432: 0.046x vs 0.037x dense; this kernel's loop: 744 instructions per 32 FMA).
        rows, cols = _block_coords(offsets, R, C)
        return sddmm(dy, x2, rows, cols, 1).reshape(K, D, 1, 1)
    cfg = rt.launch_config("diag_dw", {"b": b, "T": rt.shape_bucket(T), "dtype": str(dy.dtype)[6:]}, _dw_default(b))
    groups = diag_dw_groups(offsets.contiguous(), R, C, cfg["G"])
    n_groups, bt = groups.shape[0], cfg["BLOCK_T"]
    n_chunks = max(1, min(triton.cdiv(T, bt), triton.cdiv(cfg["TARGET_PROGRAMS"], n_groups)))
    chunk = triton.cdiv(triton.cdiv(T, n_chunks), bt) * bt
    n_chunks = triton.cdiv(T, chunk)
    acc_torch = torch.float64 if dy.dtype == torch.float64 else torch.float32
    g = torch.empty((n_chunks, K, D, b, b) if n_chunks > 1 else (K, D, b, b),
                    dtype=acc_torch if n_chunks > 1 else dy.dtype, device=dy.device)
    upcast, precision = dot_settings(dy.dtype)
    diag_dw_kernel[(n_groups * n_chunks,)](
        dy, x2, groups, g, T, chunk, D, R, C, n_groups, K * D * b * b,
        dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1),
        B=b, BLOCK_B=max(16, rt.next_pow2(b)) if b >= 16 else rt.next_pow2(b), G=cfg["G"], BLOCK_T=bt,
        USE_DOT=b >= 16, UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(dy.dtype),
        NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"])
    return g.sum(0).to(dy.dtype) if n_chunks > 1 else g


def diag_dw_torch(dy, x2, offsets, block_size: int) -> torch.Tensor:
    """CPU path of the weight gradient: element dots (b <= _CPU_ELEMENT_MAX_BLOCK) or block
    products through the SDDMM's torch path, at the diagonals' (cached) coordinates."""
    b = block_size
    R, C, D, P = diag_geometry(x2.shape[1], dy.shape[1], b)
    shape = (offsets.numel(), D, b, b)
    if _elementwise_on_cpu(b, dy.shape[0], offsets):
        rows, cols = _element_coords(offsets, R, C, b)
        return sddmm(dy, x2, rows, cols, 1).reshape(shape)
    return sddmm(dy, x2, *_block_coords(offsets, R, C), b).reshape(shape)


def _block_coords(offsets, R: int, C: int):
    """Block (row, col) of every stored block, flat [K * D] int32 each; cached per offsets."""
    return rt.cached_pattern((offsets,), ("diag coords", R, C),
                             lambda: tuple(t.reshape(-1) for t in diag_coords(offsets, R, C)))


@torch.library.custom_op("alwayssparse::diag_dw", mutates_args=())
def _diag_dw_op(dy: torch.Tensor, x2: torch.Tensor, offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    if rt.runs_triton(dy):
        return diag_dw(dy, x2, offsets, block_size)
    return diag_dw_torch(dy, x2, offsets, block_size)


@_diag_dw_op.register_fake
def _(dy, x2, offsets, block_size):
    D = min(dy.shape[1], x2.shape[1]) // block_size
    return dy.new_empty(offsets.shape[0], D, block_size, block_size)


def _diag_dw(dy, x2, offsets, block_size, values_shape):
    return _diag_dw_op(dy, x2, offsets, block_size).reshape(values_shape)


@torch.library.custom_op("alwayssparse::diag_matmul", mutates_args=())
def _diag_op(x2: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
             out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    if rt.runs_triton(x2):
        return diag_fwd(x2, values, offsets, block_size, out_features, bias)
    return diag_fwd_torch(x2, values, offsets, block_size, out_features, bias)


@_diag_op.register_fake
def _(x2, values, offsets, block_size, out_features, bias=None):
    return x2.new_empty(x2.shape[0], out_features)


@torch.library.custom_op("alwayssparse::diag_dx", mutates_args=())
def _diag_dx_op(dy: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
                in_features: int) -> torch.Tensor:
    if rt.runs_triton(dy):
        return diag_dx(dy, values, offsets, block_size, in_features)
    return diag_dx_torch(dy, values, offsets, block_size, in_features)


@_diag_dx_op.register_fake
def _(dy, values, offsets, block_size, in_features):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("alwayssparse::diag_matmul_gelu", mutates_args=())
def _diag_gelu_op(x2: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
                  out_features: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if rt.runs_triton(x2):
        return diag_fwd_gelu(x2, values, offsets, block_size, out_features, bias)
    h = diag_fwd_torch(x2, values, offsets, block_size, out_features, bias)
    return h, torch.nn.functional.gelu(h)


@_diag_gelu_op.register_fake
def _(x2, values, offsets, block_size, out_features, bias=None):
    return x2.new_empty(x2.shape[0], out_features), x2.new_empty(x2.shape[0], out_features)


@torch.library.custom_op("alwayssparse::diag_dx_gelu_grad", mutates_args=())
def _diag_dx_gelu_grad_op(dy: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
                          in_features: int, h: torch.Tensor) -> torch.Tensor:
    if rt.runs_triton(dy):
        return diag_dx_gelu_grad(dy, values, offsets, block_size, in_features, h)
    return torch.ops.aten.gelu_backward(diag_dx_torch(dy, values, offsets, block_size, in_features), h)


@_diag_dx_gelu_grad_op.register_fake
def _(dy, values, offsets, block_size, in_features, h):
    return dy.new_empty(dy.shape[0], in_features)


def _setup(ctx, inputs, output):
    x2, values, offsets, block_size, _, bias = inputs
    ctx.save_for_backward(x2, values, offsets)
    ctx.block_size = block_size
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x2, values, offsets = ctx.saved_tensors
    dy = dy.contiguous()  # a gradient from .sum() has stride 0
    b = ctx.block_size
    dx = _diag_dx_op(dy, values, offsets, b, x2.shape[1]) if ctx.needs_input_grad[0] else None
    dv = _diag_dw(dy, x2, offsets, b, values.shape) if ctx.needs_input_grad[1] else None
    db = None
    if ctx.has_bias and ctx.needs_input_grad[5]:
        db = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(dy.dtype)
    return dx, dv, None, None, None, db


_diag_op.register_autograd(_backward, setup_context=_setup)
rt.register_autocast("alwayssparse::diag_matmul")
rt.register_autocast("alwayssparse::diag_dx")
rt.register_autocast("alwayssparse::diag_matmul_gelu")
rt.register_autocast("alwayssparse::diag_dx_gelu_grad")


def diag_matmul(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int = 1,
                out_features: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Wrap-around (block-)diagonal sparse product y = x W^T (+ bias).

    Args:
        x: [..., in].
        values: [K, D, b, b], same dtype as x (D = min(out, in) / b).
        offsets: int32 [K], distinct diagonals in [0, P), P = max(out, in) / b.
        block_size: b, dividing in and out. 1 gives element diagonals.
        out_features: width of y; defaults to D * b (right for square and wide W, required
            for tall W, whose height values and offsets cannot tell).
        bias: [out_features] or None, added in the kernel's epilogue (in fp32, cast to
            x's dtype first, as nn.Linear under autocast).
    Returns:
        y: [..., out_features]. Differentiable in x and values.

    Example:
        >>> off = torch.tensor([0, 3], dtype=torch.int32)
        >>> y = diag_matmul(torch.randn(5, 64), torch.randn(2, 4, 16, 16), off, 16)  # [5, 64]
    """
    rt.check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in]")
    if not isinstance(values, torch.Tensor) or values.dim() != 4:
        raise ValueError(f"values must be a 4-D tensor [K, D, b, b], got {getattr(values, 'shape', values)!r}")
    out_features = values.shape[1] * block_size if out_features is None else int(out_features)
    rt.check_same_device(x=x, values=values, offsets=offsets, bias=bias)
    if bias is not None:
        rt.check_float("bias", bias)
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    y = _diag_op(rt.flatten_tokens(x), values, offsets, block_size, out_features, bias)
    return y.reshape(*lead, out_features)


def diagonals_for_density(in_features: int, out_features: int, block_size: int, density: float) -> int:
    """K = ceil(density * R * C / D) = ceil(density * P), clamped to [1, P] (DynaDiag's rule)."""
    R, C, D, P = diag_geometry(in_features, out_features, block_size)
    return min(P, max(1, math.ceil(density * P - 1e-9)))


class DiagLinear(SparseLayer):
    """Drop-in ``nn.Linear`` whose weight is K wrap-around (block-)diagonals (DynaDiag).

    Parameters: ``values [K, D, b, b]`` (and ``bias``); buffer ``offsets [K]`` int32.
    Optional per-diagonal gate (DynaDiag's soft top-K): when ``scores`` is set (see
    ``enable_gate``), the forward uses ``values * a[k]`` with
    ``a = clamp(k_target * softmax(scores / temperature), 0, 1)``.

    Example:
        >>> layer = DiagLinear(768, 3072, density=0.1, block_size=16)
        >>> y = layer(torch.randn(4, 768))
    """

    def __init__(self, in_features: int, out_features: int, density: float | None = None, *,
                 num_diagonals: int | None = None, block_size: int = 1, bias: bool = True,
                 device=None, dtype=None, generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        R, C, D, P = diag_geometry(in_features, out_features, block_size)
        self.block_size = block_size
        if num_diagonals is None:
            if density is None:
                raise ValueError("give density (in (0, 1]) or num_diagonals")
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density must lie in (0, 1], got {density}")
            num_diagonals = diagonals_for_density(in_features, out_features, block_size, density)
        if not 1 <= num_diagonals <= P:
            raise ValueError(f"num_diagonals must lie in [1, P={P}], got {num_diagonals}")
        offsets = torch.randperm(P, generator=generator)[:num_diagonals].sort().values
        self.register_buffer("offsets", offsets.to(device=device, dtype=torch.int32))
        bound = 1.0 / math.sqrt(self.mean_fan_in(num_diagonals))
        values = torch.empty(num_diagonals, D, block_size, block_size, device=device, dtype=dtype)
        values.uniform_(-bound, bound, generator=generator)
        self.values = torch.nn.Parameter(values)
        self.reset_bias(bound, generator)
        self.register_parameter("scores", None)
        self.register_buffer("temperature", None)
        self.k_target = None

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        return diag_geometry(self.in_features, self.out_features, self.block_size)

    def mean_fan_in(self, num_diagonals: int | None = None) -> float:
        K = self.offsets.numel() if num_diagonals is None else num_diagonals
        R, C, D, P = self.geometry
        return K * D * self.block_size / R

    @property
    def num_diagonals(self) -> int:
        return self.offsets.numel()

    def enable_gate(self, k_target: int, temperature: float, scores: torch.Tensor | None = None) -> None:
        """Turn on DynaDiag's learnable soft top-K over the stored diagonals."""
        K = self.num_diagonals
        s = torch.zeros(K, device=self.values.device, dtype=torch.float32) if scores is None else scores
        if s.shape != (K,):
            raise ValueError(f"scores must have shape [{K}], got {tuple(s.shape)}")
        if self.scores is not None and self.scores.shape == s.shape:
            with torch.no_grad():  # keep the Parameter object an optimizer may hold
                self.scores.copy_(s)
        else:
            self.scores = torch.nn.Parameter(s.detach().clone().float())
        self.temperature = torch.tensor(float(temperature), device=self.values.device)
        self.k_target = int(k_target)

    def disable_gate(self) -> None:
        self.scores = None
        self.temperature = None
        self.k_target = None

    def gate(self) -> torch.Tensor | None:
        if self.scores is None:
            return None
        a = self.k_target * torch.softmax(self.scores / self.temperature, dim=0)
        return a.clamp(0.0, 1.0)

    def effective_values(self) -> torch.Tensor:
        a = self.gate()
        if a is None:
            return self.values
        return self.values * a.to(self.values.dtype)[:, None, None, None]

    def inference_values(self) -> torch.Tensor | None:
        return self.values if self.scores is None else None

    def weight_blocks(self, values: torch.Tensor):
        b = self.block_size
        if b == 1:
            return super().weight_blocks(values)
        R, C, D, P = self.geometry
        brow, bcol = diag_coords(self.offsets, R, C)
        return brow.reshape(-1), bcol.reshape(-1), values.reshape(-1, b, b), b

    def forward(self, x):
        y = self.cpu_inference(x)
        if y is not None:
            return y
        # the bias is added in the kernel's epilogue (no pass over y), in y's dtype as add_bias
        return diag_matmul(x, self.effective_values(), self.offsets, self.block_size, self.out_features, self.bias)

    def coords(self):
        R, C, D, P = self.geometry
        b = self.block_size
        brow, bcol = diag_coords(self.offsets, R, C)  # [K, D]
        i = torch.arange(b, device=brow.device, dtype=torch.int32)
        rows = (brow[:, :, None, None] * b + i[:, None]).expand(-1, -1, b, b)
        cols = (bcol[:, :, None, None] * b + i[None, :]).expand(-1, -1, b, b)
        return rows.reshape(-1), cols.reshape(-1)

    def to_dense(self) -> torch.Tensor:
        return diag_to_dense(self.effective_values().detach(), self.offsets, self.in_features,
                             self.out_features, self.block_size)

    def set_pattern(self, values: torch.Tensor, offsets: torch.Tensor) -> None:
        """Replace the diagonals (a mask update): checks them, then swaps them in."""
        probe = self.values.new_empty(0, self.in_features)
        _check(probe, values.to(self.values.dtype), offsets.to(torch.int32), self.block_size, self.out_features)
        self._swap_values(values.to(self.values.dtype).contiguous())
        self.offsets = offsets.to(torch.int32).contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None,
                   block_size: int = 1):
        """Build from a dense weight, keeping the blocks on the given diagonals."""
        out_features, in_features = weight.shape
        offsets = offsets.to(torch.int32)
        layer = cls(in_features, out_features, num_diagonals=max(1, offsets.numel()), block_size=block_size,
                    bias=bias is not None, device=weight.device, dtype=weight.dtype)
        R, C, D, P = layer.geometry
        b = block_size
        rows, cols = diag_coords(offsets, R, C)
        blocks = weight.detach().reshape(R, b, C, b).permute(0, 2, 1, 3)
        layer.set_pattern(blocks[rows.long(), cols.long()].clone(), offsets)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer
