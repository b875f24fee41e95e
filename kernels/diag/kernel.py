"""The Triton kernels of the diagonal format and their launchers.

A program of ``diag_block_kernel`` owns a token tile and NB consecutive output blocks (b = 16:
8 blocks, 128 outputs, a 3-D tl.dot, or 32 with L1-cached loads where x's tile fits L1; b >=
32: one block, a 2-D dot, which the sm_90 SASS shows cheaper per block pair there, see
``_tile_blocks``), or TILE_GROUP such tiles one after the other over the same x tile, re-read
from L1 (``_tile_group``); where x is too wide for that, the tile shape that moves the fewest
bytes from L2 by a replay of its loads through an LRU model of L1 (``_wide_tiles``), and with
few tokens shorter tiles of fewer blocks until the grid covers the SMs (``_fill_sms``). Its
epilogue adds the bias and, for the MLP's hidden layer, a GELU (``EPILOGUE``). Its loop walks a host-built list of the (diagonal, input block of the tile's
first block) pairs that feed the tile (``diag_tile_list``): block nb reads input block p0 + nb,
wrapped once, so the loop has no branch and no modulo, indexes in int32 and pipelines
(``tl.range(num_stages=)``). The transpose of the pattern is again diagonal with the same
offsets, so the input gradient is the same kernel with the roles swapped: no atomics, no
re-layout. b = 1 (``diag_elem_kernel``) walks the same list: each diagonal is a shifted
contiguous run of x and of its values. ``diag_dw_kernel`` reduces dW[k, d] = dy[:, row]^T @
x[:, col] over a token chunk for G consecutive blocks of one diagonal (their rows and columns
are runs too) with token-major tiles, and writes fp32 partials per chunk that the launcher
sums: deterministic, no atomics; at b >= 16 it stacks G diagonals on the block they share
(``diag_dw_stacks``), and at b = 16 in 2-byte dtypes from 8192 tokens ``diag_dw_band_kernel``
takes 64 or 128 blocks a program from bands of consecutive blocks (``diag_dw_bands``) so a
program's repeated operand blocks hit in L1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import runtime as rt
from ..sddmm import acc_dtype, dot_settings, sddmm
from .pattern import (L1_MODEL_BYTES, block_coords, diag_dw_bands, diag_dw_groups, diag_dw_stacks, diag_tile_list,
                      dw_band_slices, tile_l1_slices)
from .reference import check_args, diag_geometry



@triton.jit
def tile_entry(entries_ptr, e, lanes, q, mask_q, P, D, BY_OUT: tl.constexpr):
    """Entry e of a tile list for the tile's lanes: (k * D, input blocks p [lanes], value
    indices d [lanes], valid [lanes]). Lane n reads input block p0 + n, wrapped once at P;
    BY_OUT (the diagonal indexed by the output side) takes value index q, else p, valid
    only where p < D."""
    vbase = tl.load(entries_ptr + 2 * e)  # k * D
    p = tl.load(entries_ptr + 2 * e + 1) + lanes
    p = tl.where(p >= P, p - P, p)
    if BY_OUT:
        d = q
        valid = mask_q
    else:
        d = p
        valid = mask_q & (p < D)
    return vbase, p, d, valid


@triton.jit
def diag_block_kernel(
    a_ptr, values_ptr, tile_ptr, entries_ptr, bias_ptr, out_ptr, aux_ptr,
    T, D, P, N_OUT, N_TILES, TILE_GROUP,
    stride_at, stride_ai, stride_ot, stride_oi,
    B: tl.constexpr, BLOCK_B: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr,
    BY_OUT: tl.constexpr, TRANS_W: tl.constexpr, USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """out = a @ op(W) (+ bias) for b >= 16 (tl.dot) or 1 < b < 16 (CUDA cores), with an
    optional GELU epilogue: one program per (token tile of BLOCK_T, TILE_GROUP consecutive
    tiles of NB output blocks, computed one after the other).

    Grid: (cdiv(T, BLOCK_T) * N_GROUPS,), N_GROUPS = cdiv(N_TILES, TILE_GROUP); program p
    computes tokens [(p // N_GROUPS) * BLOCK_T, (p // N_GROUPS + 1) * BLOCK_T) of output tiles
    [(p % N_GROUPS) * TILE_GROUP, min(N_TILES, (p % N_GROUPS + 1) * TILE_GROUP)) (tile t:
    output blocks [t * NB, (t + 1) * NB)), groups varying fastest. Nothing is checked here
    (``diag_fwd`` / ``diag_dx`` check, then launch this).

    Args:
        a_ptr: a [T, n_in], element (t, i) at t * stride_at + i * stride_ai: x for the
            forward, dy for the input gradient; fp16, bf16, fp32 or fp64.
        values_ptr: values [K, D, B, B], contiguous, the dtype of a; w[k, d, i, j] is
            (output feature i, input feature j) of block d of diagonal k.
        tile_ptr: int32 [N_TILES + 1], contiguous: tile t's entries are entries[tile_ptr[t]
            : tile_ptr[t + 1]] (from ``diag_tile_list(offsets, N_OUT, P, D, BY_OUT, NB)``).
        entries_ptr: int32 [E, 2], contiguous: (k * D, input block p0 of the tile's first
            output block), p0 in [0, P).
        bias_ptr: bias [N_OUT * B], the dtype of a; read only when HAS_BIAS (pass any tensor
            otherwise).
        out_ptr: out [T, N_OUT * B], element (t, o) at t * stride_ot + o * stride_oi; any
            floating dtype (the result's).
        aux_ptr: aux [T, N_OUT * B], out's dtype, shape and strides: EPILOGUE 1 writes
            gelu(out) there, EPILOGUE 2 reads h from it; unused (any tensor) for EPILOGUE 0, 3.
        T: int, tokens (>= 1). D: int, blocks per diagonal, min(R, C). P: int, max(R, C).
        N_OUT: int, output blocks (>= 1). N_TILES: int, cdiv(N_OUT, NB). TILE_GROUP: int
            >= 1, output tiles per program (their a tile is re-read from L1, see
            ``_tile_group``).
        stride_at, stride_ai, stride_ot, stride_oi: int element strides of a and out.
        B: constexpr int >= 2, the block size.
        BLOCK_B: constexpr int, the power of two >= B the tile is padded to (>= 16 with USE_DOT).
        NB: constexpr int, power of two: output blocks per program.
        BLOCK_T: constexpr int, power of two (>= 16 with USE_DOT): tokens per program.
        BY_OUT: constexpr bool: the diagonal's block index d is the output block (the pattern
            is wide on the output side), else the input block (valid where it is < D).
        TRANS_W: constexpr bool: op(W) = W^T (the forward), else W (the input gradient).
        USE_DOT: constexpr bool: tl.dot (tensor cores on a GPU); needs B >= 16. False: a
            product summed on CUDA cores.
        HAS_BIAS: constexpr bool: add bias in the epilogue.
        EPILOGUE: constexpr int: 0 none, 1 GELU (aux = gelu(out)), 2 GELU_GRAD (out = acc *
            gelu'(aux)), 3 ACT (out = gelu(acc), aux unused), all exact (erf).
        UPCAST: constexpr bool: cast a and w tiles to ACC before tl.dot (the interpreter's
            bf16 is wrong; fp32 operands give an exact dot).
        DOT_PRECISION: constexpr str, tl.dot's input_precision: "ieee" or "tf32" (fp32 operands).
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 a).
        NUM_STAGES: constexpr int >= 1, software-pipelining stages of the entry loop.
    """
    # The groups of one token tile run together (groups vary fastest), so x stays in L2; the
    # tiles of a group run one after the other and re-read the same x tile (from L1 when it
    # fits). The loop walks the host-built list of (diagonal, first input block) pairs feeding
    # the tile: block nb reads input block p0 + nb (wrapped once at P), in int32; the 3-D
    # tl.dot keeps the NB accumulators [BT, b] apart. The values are read once per program
    # (.cg: L2 only, they do not push the x tile out of L1).
    pid = tl.program_id(0)
    n_groups = tl.cdiv(N_TILES, TILE_GROUP)
    group = pid % n_groups
    pid_t = pid // n_groups
    offs_n = tl.arange(0, NB)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    mask_tb = (offs_t < T)[None, :, None] & (offs_b < B)[None, None, :]  # [1, BT, BB]
    a_rows = a_ptr + offs_t[None, :, None] * stride_at  # [1, BT, 1], the only int64 offsets
    # w[i, j] of a stored block is (output feature i, input feature j); read as op(W).
    if TRANS_W:
        w_offs = offs_b[None, None, :] * B + offs_b[None, :, None]  # [1, BB(j), BB(i)]
    else:
        w_offs = offs_b[None, :, None] * B + offs_b[None, None, :]  # [1, BB(i), BB(j)]
    mask_w = (offs_b < B)[None, :, None] & (offs_b < B)[None, None, :]
    first = group * TILE_GROUP
    for tile in range(first, tl.minimum(first + TILE_GROUP, N_TILES)):
        q = tile * NB + offs_n  # [NB] output blocks
        mask_q = q < N_OUT
        if USE_DOT and NB == 1:
            acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=ACC)
        else:
            acc = tl.zeros((NB, BLOCK_T, BLOCK_B), dtype=ACC)
        start = tl.load(tile_ptr + tile)
        end = tl.load(tile_ptr + tile + 1)
        for e in tl.range(start, end, num_stages=NUM_STAGES):
            vbase, p, d, valid = tile_entry(entries_ptr, e, offs_n, q, mask_q, P, D, BY_OUT)  # [NB] lanes
            a = tl.load(a_rows + ((p * B)[:, None, None] + offs_b[None, None, :]) * stride_ai,
                        mask=valid[:, None, None] & mask_tb, other=0.0)  # [NB, BT, BB]
            w = tl.load(values_ptr + ((vbase + d) * (B * B))[:, None, None] + w_offs,
                        mask=valid[:, None, None] & mask_w, other=0.0, cache_modifier=".cg")  # [NB, BB, BB]
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
            acc += tl.load(bias_ptr + feat, mask=mask_q[:, None, None] & (offs_b < B)[None, None, :],
                           other=0.0).to(ACC)
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
        if EPILOGUE == 3:  # ACT: out = gelu(h) alone (the MLP forward's hidden layer, unfused)
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
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
    (token tile of BLOCK_T, BLOCK_Q consecutive outputs). Per diagonal, output q0 + j reads
    input p0 + j (wrapped once at P): a shifted contiguous run of a and of the values.

    Grid: (cdiv(T, BLOCK_T) * N_TILES,), output tiles varying fastest. Nothing is checked
    here (``diag_fwd`` / ``diag_dx`` check, then launch this).

    Args:
        a_ptr: a [T, n_in], element (t, i) at t * stride_at + i * stride_ai; fp16, bf16,
            fp32 or fp64.
        values_ptr: values [K, D], contiguous, the dtype of a.
        tile_ptr: int32 [N_TILES + 1], contiguous, from ``diag_tile_list(offsets, N_OUT, P,
            D, BY_OUT, BLOCK_Q)``: tile t's entries are entries[tile_ptr[t]:tile_ptr[t + 1]].
        entries_ptr: int32 [E, 2], contiguous: (k * D, input p0 of the tile's first output).
        bias_ptr: bias [N_OUT], the dtype of a; read only when HAS_BIAS (any tensor otherwise).
        out_ptr: out [T, N_OUT], element (t, o) at t * stride_ot + o * stride_oi; any
            floating dtype (the result's).
        T: int, tokens (>= 1). D: int, elements per diagonal, min(R, C). P: int, max(R, C).
        N_OUT: int, outputs (>= 1). N_TILES: int, cdiv(N_OUT, BLOCK_Q).
        stride_at, stride_ai, stride_ot, stride_oi: int element strides of a and out.
        BLOCK_T, BLOCK_Q: constexpr ints, powers of two: tokens and outputs per program.
        BY_OUT: constexpr bool: the value index is the output, else the input (valid < D).
        HAS_BIAS: constexpr bool: add bias in the epilogue.
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 a).
        NUM_STAGES: constexpr int >= 1, software-pipelining stages of the entry loop.
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
        vbase, p, d, valid = tile_entry(entries_ptr, e, offs_j, q, mask_q, P, D, BY_OUT)  # [BQ] lanes
        a = tl.load(a_rows + p[None, :] * stride_ai, mask=mask_t[:, None] & valid[None, :], other=0.0)  # [BT, BQ]
        w = tl.load(values_ptr + vbase + d, mask=valid, other=0.0)  # [BQ]
        acc += a.to(ACC) * w.to(ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + q, mask=mask_q, other=0.0).to(ACC)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_ot + q[None, :] * stride_oi,
             acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_q[None, :])


@triton.jit
def diag_dw_kernel(
    dy_ptr, x_ptr, groups_ptr, g_ptr,
    T, T_CHUNK, D, R, C, N_GROUPS, N_VALUES,
    stride_dyt, stride_dyo, stride_xt, stride_xi,
    B: tl.constexpr, BLOCK_B: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr, TALL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Partial weight gradients g[chunk, k, d] = dy[chunk, row block]^T @ x[chunk, column
    block] over one chunk of T_CHUNK tokens for G blocks: with USE_DOT, the blocks of G
    diagonals that share one block of one operand (stacked into one MMA of M = G * B), else
    G consecutive blocks of one diagonal (CUDA cores).

    Grid: (N_GROUPS * n_chunks,), n_chunks = cdiv(T, T_CHUNK); program p computes group p %
    N_GROUPS over tokens [(p // N_GROUPS) * T_CHUNK, (p // N_GROUPS + 1) * T_CHUNK). The
    launcher (``diag_dw``) checks, then launches this, and sums the chunks: deterministic,
    no atomics.

    Args:
        dy_ptr: dy [T, R * B], element (t, o) at t * stride_dyt + o * stride_dyo; fp16, bf16,
            fp32 or fp64.
        x_ptr: x [T, C * B], element (t, i) at t * stride_xt + i * stride_xi, the dtype of dy.
        groups_ptr: int32 [N_GROUPS, 1 + 2 * G] from ``diag_dw_stacks(offsets, R, C, G)``
            with USE_DOT (the shared block, G value block indices, -1 for padding, G blocks of
            the other operand), else int32 [N_GROUPS, 4] from ``diag_dw_groups(offsets, R,
            C, G)`` (k * D + d0, d0, row block of d0, column block of d0); contiguous.
        g_ptr: g [n_chunks, K, D, B, B] (or [K, D, B, B] for one chunk), contiguous: fp32
            (fp64) partials, or dy's dtype when there is one chunk.
        T: int, tokens (>= 1). T_CHUNK: int, tokens per program, a multiple of BLOCK_T.
        D: int, blocks per diagonal, min(R, C).
        R, C: int, output and input blocks (wrap the row and column block indices).
        N_GROUPS: int, rows of groups. N_VALUES: int, K * D * B * B, the elements of a chunk.
        stride_dyt, stride_dyo, stride_xt, stride_xi: int element strides of dy and x.
        B: constexpr int >= 2, the block size (a power of two with USE_DOT).
        BLOCK_B: constexpr int, the power of two >= B the tile is padded to.
        G: constexpr int, power of two: blocks per program (USE_DOT: G * B >= 64 gives wgmma
            on sm_90).
        BLOCK_T: constexpr int, power of two (>= 16 with USE_DOT): tokens per loop step.
        TALL: constexpr bool: R >= C (the G diagonals share a column block of x and gather
            dy's row blocks), else they share a row block of dy and gather x's column blocks.
        USE_DOT, UPCAST, DOT_PRECISION, ACC, NUM_STAGES: constexpr bool, bool, str, triton
            dtype, int: as for diag_block_kernel, with dy for a and the token loop pipelined.
    """
    pid = tl.program_id(0)
    group = pid % N_GROUPS
    chunk = pid // N_GROUPS
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    t_start = chunk * T_CHUNK
    t_end = tl.minimum(t_start + T_CHUNK, T)
    offs_t = tl.arange(0, BLOCK_T)
    row0 = t_start.to(tl.int64)
    if USE_DOT:
        # G diagonals' blocks that share one block s of one operand (x's column block when
        # tall, dy's row block when wide): the other operand's G blocks side by side as a
        # [BT, G * B] tile, its transposed view the MMA's A (M = G * B: wgmma 64xBx16 on sm_90
        # from G * B = 64; a 3-D dot over G blocks is mma.sync 16x8x16). The shared tile is
        # loaded once for G blocks instead of once per block: b = 16, G = 4 at fc1, T =
        # 50,432 reads 1.9 GB from L2 instead of 3.1 GB. Padding lanes (K not a multiple of
        # G) read block 0 unmasked (a mask per lane would stop the 16-byte loads) and are
        # not stored.
        lanes = tl.arange(0, G * BLOCK_B)
        lane_k = lanes // BLOCK_B
        lane_i = lanes % BLOCK_B
        entry = groups_ptr + group * (1 + 2 * G)
        s = tl.load(entry)
        vd = tl.load(entry + 1 + lane_k)  # [G * BB] value block of each lane's diagonal
        other = tl.load(entry + 1 + G + lane_k)  # [G * BB] its block of the gathered operand
        cols = other * B + lane_i
        if B == BLOCK_B:  # runs of B features: 16-byte loads
            cols = tl.max_contiguous(tl.multiple_of(cols, B), B)
        if TALL:
            g_ptrs = dy_ptr + (row0 + offs_t)[:, None] * stride_dyt + cols[None, :] * stride_dyo
            s_ptrs = x_ptr + (row0 + offs_t)[:, None] * stride_xt + (s * B + offs_b)[None, :] * stride_xi
            step_g, step_s = BLOCK_T * stride_dyt, BLOCK_T * stride_xt
        else:
            g_ptrs = x_ptr + (row0 + offs_t)[:, None] * stride_xt + cols[None, :] * stride_xi
            s_ptrs = dy_ptr + (row0 + offs_t)[:, None] * stride_dyt + (s * B + offs_b)[None, :] * stride_dyo
            step_g, step_s = BLOCK_T * stride_xt, BLOCK_T * stride_dyt
        acc = tl.zeros((G * BLOCK_B, BLOCK_B), dtype=ACC)
        for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
            in_t = (t0 + offs_t < t_end)[:, None]
            if B == BLOCK_B:
                a = tl.load(g_ptrs, mask=in_t, other=0.0)  # [BT, G * BB]
            else:
                a = tl.load(g_ptrs, mask=in_t & (lane_i < B)[None, :], other=0.0)
            sh = tl.load(s_ptrs, mask=in_t & mask_b[None, :], other=0.0)  # [BT, BB]
            if UPCAST:  # right after the load: the interpreter computes bf16 on raw bits
                a = a.to(ACC)
                sh = sh.to(ACC)
            acc += tl.dot(tl.trans(a), sh, input_precision=DOT_PRECISION, out_dtype=ACC)  # [G * BB, BB]
            g_ptrs += step_g
            s_ptrs += step_s
        # acc[k * B + i, j] is block k's (dy feature i, x feature j) when tall, (x feature
        # i, dy feature j) when wide: stored transposed there.
        if TALL:
            elem = lane_i[:, None] * B + offs_b[None, :]
        else:
            elem = offs_b[None, :] * B + lane_i[:, None]
        offs_g = chunk.to(tl.int64) * N_VALUES + (vd * (B * B))[:, None] + elem  # [G * BB, BB]
        tl.store(g_ptr + offs_g, acc.to(g_ptr.dtype.element_ty),
                 mask=((vd >= 0) & (lane_i < B))[:, None] & mask_b[None, :])
    else:
        # G consecutive blocks of one diagonal (their rows and columns are runs) on CUDA
        # cores: dy read as [G, BB(i), BT], x as [G, BT, BB(j)].
        offs_n = tl.arange(0, G)
        vd = tl.load(groups_ptr + 4 * group) + offs_n  # [G] k * D + d
        d = tl.load(groups_ptr + 4 * group + 1) + offs_n
        r = tl.load(groups_ptr + 4 * group + 2) + offs_n
        c = tl.load(groups_ptr + 4 * group + 3) + offs_n
        r = tl.where(r >= R, r - R, r)
        c = tl.where(c >= C, c - C, c)
        valid = d < D
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
            acc += tl.sum(a.to(ACC)[:, :, :, None] * x.to(ACC)[:, None, :, :], axis=2)
            dy_ptrs += BLOCK_T * stride_dyt
            x_ptrs += BLOCK_T * stride_xt
        offs_g = (chunk.to(tl.int64) * N_VALUES + (vd * (B * B))[:, None, None]
                  + offs_b[None, :, None] * B + offs_b[None, None, :])  # [G, BB, BB]
        tl.store(g_ptr + offs_g, acc.to(g_ptr.dtype.element_ty),
                 mask=valid[:, None, None] & mask_b[None, :, None] & mask_b[None, None, :])



@triton.jit
def diag_dw_band_kernel(
    dy_ptr, x_ptr, table_ptr, g_ptr,
    T, T_CHUNK, N_PROGS, N_VALUES,
    stride_dyt, stride_dyo, stride_xt, stride_xi,
    B: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Partial weight gradients g[chunk, vd] = dy[chunk, row block]^T @ x[chunk, column block]
    for the NB blocks of one program of a band table: a 3-D dot [NB, B, BT] @ [NB, BT, B]
    (mma.sync on a GPU) whose operand tiles gather each lane's dy and x block. A program's
    blocks repeat few distinct blocks (a band of consecutive blocks of the long operand, the
    diagonals' windows of the other), and the loads are synchronous, cached in L1, so a repeat
    is an L1 hit: at ViT-B b = 16, K = 20, 552 slices a token from L2 at NB = 128 (733 at NB =
    64) instead of the stacks' 1200 (``dw_band_slices``).

    Grid: (N_PROGS * n_chunks,), n_chunks = cdiv(T, T_CHUNK); program p computes table row p %
    N_PROGS over tokens [(p // N_PROGS) * T_CHUNK, (p // N_PROGS + 1) * T_CHUNK). The launcher
    (``diag_dw``) checks, then launches this, and sums the chunks: deterministic, no atomics.

    Args:
        dy_ptr: dy [T, R * B], element (t, o) at t * stride_dyt + o * stride_dyo; fp16 or bf16
            (fp32 works, but its tiles do not fit the registers on a GPU).
        x_ptr: x [T, C * B], element (t, i) at t * stride_xt + i * stride_xi, the dtype of dy.
        table_ptr: int32 [N_PROGS, 3 * NB] from ``diag_dw_bands(offsets, R, C, NB)``, contiguous:
            per row NB value block indices k * D + d (-1: a padding lane, not stored), their dy
            row blocks and their x column blocks.
        g_ptr: g [n_chunks, K, D, B, B] (or [K, D, B, B] for one chunk), contiguous: fp32
            partials, or dy's dtype when there is one chunk.
        T: int, tokens (>= 1). T_CHUNK: int, tokens per program, a multiple of BLOCK_T.
        N_PROGS: int, rows of the table. N_VALUES: int, K * D * B * B, the elements of a chunk.
        stride_dyt, stride_dyo, stride_xt, stride_xi: int element strides of dy and x.
        B: constexpr int, the block size: a power of two >= 16.
        NB: constexpr int, power of two: blocks per program (the table's lanes).
        BLOCK_T: constexpr int, power of two >= 16: tokens per loop step.
        UPCAST, DOT_PRECISION, ACC, NUM_STAGES: constexpr bool, str, triton dtype, int: as for
            diag_dw_kernel (NUM_STAGES = 1: the loads stay synchronous and cached in L1).
    """
    pid = tl.program_id(0)
    prog = pid % N_PROGS
    chunk = pid // N_PROGS
    lanes = tl.arange(0, NB)
    offs_b = tl.arange(0, B)
    offs_t = tl.arange(0, BLOCK_T)
    entry = table_ptr + prog * (3 * NB)
    vd = tl.load(entry + lanes)
    r = tl.load(entry + NB + lanes)
    c = tl.load(entry + 2 * NB + lanes)
    # runs of B features: 16-byte loads
    rf = tl.max_contiguous(tl.multiple_of(r[:, None] * B + offs_b[None, :], [1, B]), [1, B])  # [NB, B]
    cf = tl.max_contiguous(tl.multiple_of(c[:, None] * B + offs_b[None, :], [1, B]), [1, B])
    t_start = chunk * T_CHUNK
    t_end = tl.minimum(t_start + T_CHUNK, T)
    row0 = t_start.to(tl.int64)
    a_ptrs = dy_ptr + (row0 + offs_t)[None, None, :] * stride_dyt + rf[:, :, None] * stride_dyo  # [NB, B, BT]
    x_ptrs = x_ptr + (row0 + offs_t)[None, :, None] * stride_xt + cf[:, None, :] * stride_xi  # [NB, BT, B]
    acc = tl.zeros((NB, B, B), dtype=ACC)
    for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
        in_t = t0 + offs_t < t_end
        a = tl.load(a_ptrs, mask=in_t[None, None, :], other=0.0)
        x = tl.load(x_ptrs, mask=in_t[None, :, None], other=0.0)
        if UPCAST:  # right after the load: the interpreter computes bf16 on raw bits
            a = a.to(ACC)
            x = x.to(ACC)
        acc += tl.dot(a, x, input_precision=DOT_PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_T * stride_dyt
        x_ptrs += BLOCK_T * stride_xt
    offs_g = (chunk.to(tl.int64) * N_VALUES + (vd * (B * B))[:, None, None]
              + offs_b[None, :, None] * B + offs_b[None, None, :])  # [NB, B, B]
    tl.store(g_ptr + offs_g, acc.to(g_ptr.dtype.element_ty), mask=(vd >= 0)[:, None, None])

# b = 16 with a gathered operand whose 64-token tile fits in L1 (fc1's forward, fc2's input
# gradient at 768 wide): 32 output blocks a program and synchronous loads (LDG.E.128, cached
# in L1; pipelined 16-byte cp.async bypasses L1, so every diagonal re-reads x from L2). sm_90,
# bf16, T = 50,432, ViT-B: x from L2 once per 32 output blocks instead of once per diagonal,
# static model 0.95 -> 1.90x dense; 242-254 registers, 1 block (8 warps) an SM, no spill.
# Wider (fc2's forward, fc1's input gradient at 3072): the same accumulator size (BLOCK_T x NB
# = 2048) in the shape that moves the fewest bytes from L2 for the pattern (``_wide_tiles``):
# the tile lists walk a tile's diagonals in ascending input block, so consecutive diagonals'
# windows of x overlap and their re-reads hit in L1, while the values are re-read once per
# token tile. 32 tokens x 64 blocks (all 48 of ViT-B's outputs) read x about once but the
# values once per 32 tokens (775 MB); 128 x 16 read the values a quarter as often (194 MB)
# and x ~2.3 times (717 MB: three tiles, windows 16 blocks wide ~10 apart). Replaying each
# program's loads through the model's 128 KB LRU (``tile_l1_slices``), static model, ViT-B fc2
# forward, H200, bf16, T = 50,432: 1.43x (32 x 64) -> 1.78x (128 x 16); 232-253 registers,
# no spill. From T = 8192: at T = 256 a program per 32 tokens would leave 8 programs for 132
# SMs.
# Both tile shapes take the GELU epilogues too (the MLP's hidden layer: gelu(h) alone, h and
# gelu(h), dh = dy W2 * gelu'(h)): 250-255 registers, no spill on sm_90 in bf16; static model,
# ViT-B b = 16: MLP backward 0.82 -> 1.05x the dense one's from this alone (1.29x with the wide
# tiles and the 128-block bands), the unfused forward 2.22x.
_L1_TILE_BYTES = 96 * 1024
_WIDE_L1_MIN_TOKENS = 8192


_WIDE_TILES = ((32, 64), (64, 32), (128, 16))  # (BLOCK_T, NB): 2048 accumulators [BT, NB x 16] each
_SMS = 132


def _wide_l1(b: int, dtype: torch.dtype, width: int, tokens: int) -> bool:
    """Whether the block kernel takes the wide L1 tiles: b = 16 in 2-byte dtypes from
    ``_WIDE_L1_MIN_TOKENS``, the gathered operand too wide for a 64-token tile in L1."""
    return (b == 16 and dtype.itemsize == 2 and 64 * width * dtype.itemsize > _L1_TILE_BYTES
            and tokens >= _WIDE_L1_MIN_TOKENS)


def _wide_tiles(offsets, n_out: int, P: int, D: int, by_out: bool, b: int, itemsize: int, T: int) -> dict:
    """BLOCK_T and NB of the wide L1 tiles (``_WIDE_TILES``) that read the fewest bytes from L2
    a token: the gathered operand's slices the L1 replay misses (``tile_l1_slices``, an LRU
    of L1_MODEL_BYTES) plus the values once per token tile, over the grid's wave fill on 132
    SMs (one block an SM). The replay is cached per pattern."""
    values = offsets.numel() * D * b * b * itemsize

    def build():
        out = []
        for bt, nb in _WIDE_TILES:
            tile_ptr, entries = diag_tile_list(offsets, n_out, P, D, by_out, nb)
            out.append(tile_l1_slices(tile_ptr, entries, n_out, P, D, by_out, nb, 1,
                                      L1_MODEL_BYTES // (bt * b * itemsize)))
        return out
    misses = rt.cached_pattern((offsets,), ("diag wide tiles", n_out, P, D, by_out, b, itemsize), build)

    def cost(i):
        bt, nb = _WIDE_TILES[i]
        programs = triton.cdiv(T, bt) * triton.cdiv(n_out, nb)
        fill = programs / (triton.cdiv(programs, _SMS) * _SMS)
        return (misses[i] * b * itemsize + values / bt) / fill
    bt, nb = _WIDE_TILES[min(range(len(_WIDE_TILES)), key=cost)]
    return {"BLOCK_T": bt, "NB": nb}


def _fill_sms(cfg: dict, T: int, n_out: int) -> dict:
    """A default tile for few tokens (b >= 16): BLOCK_T no taller than T needs (16 at least, for
    tl.dot), then fewer output blocks a program until the grid has a program for each of the
    132 SMs (or NB = 1): a batch-1 forward reads little more than the values, and fewer
    programs read them from fewer SMs. ViT-B fc1 at b = 16, T = 1: the 64 x 32 L1 tiles ran 6
    programs; 16 x 1 runs 192 (static model, H200: 7.4 -> 5.1 us, 5 us of it the launch)."""
    cfg = dict(cfg)
    cfg["BLOCK_T"] = max(16, min(cfg["BLOCK_T"], rt.next_pow2(T)))
    while cfg["NB"] > 1 and triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(n_out, cfg["NB"]) < _SMS:
        cfg["NB"] //= 2
    return cfg


def _block_default(b: int, dtype: torch.dtype, width: int = 0, tokens: int = 0) -> dict:
    """Launch config of the block kernel where the table has no entry (bench/sweep.py tunes
    the rest). Under the interpreter: big tiles, few loop iterations. fp32 / fp64 tiles take
    twice the registers: b = 16 then keeps 4 blocks (8 spill 32 bytes in fp32 on sm_90).
    ``width``: features of the gathered operand (x for the forward, dy for the input grad);
    ``tokens``: T."""
    nb = _tile_blocks(b)
    if dtype.itemsize > 2 and b == 16:
        nb //= 2
    if rt.interpreting():
        return {"BLOCK_T": 64, "NB": nb, "num_warps": 4, "num_stages": 1}
    if b == 16 and dtype.itemsize == 2 and 0 < 64 * width * dtype.itemsize <= _L1_TILE_BYTES:
        return {"BLOCK_T": 64, "NB": 32, "num_warps": 8, "num_stages": 1, "TILE_GROUP": 0}   # 0: _tile_group's
    if _wide_l1(b, dtype, width, tokens):  # the launcher's _wide_tiles picks the tile shape
        return {"BLOCK_T": 32, "NB": 64, "num_warps": 8, "num_stages": 1}
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


# Output tiles a program computes one after the other (``TILE_GROUP``; a config's non-zero
# "TILE_GROUP" decides instead): where the x tile fits in L1 and the loads go through L1
# (num_stages = 1: synchronous LDG.E.128; pipelined cp.async bypasses L1), the tiles after a
# group's first re-read x from L1, not L2 (the values go .cg, L2 only, so they do not evict
# it). As many as keep >= 4 programs an SM (132 SMs): sm_90, bf16, T = 50,432, fc1's forward
# at b = 16: all 6 tiles (192 / 32) a program, 788 programs, x from L2 once per token tile
# (465 -> 78 MB of the model's L2 count); static model (not measured) 1.90 -> 3.34x dense,
# HBM-bound now, 254 registers, no spill; fc2's input grad the same, BERT's QKV 1.79 -> 3.10x.
_GROUP_MIN_PROGRAMS = 4 * 132


def _tile_group(T: int, row_bytes: int, n_tiles: int, cfg: dict) -> int:
    """Default TILE_GROUP: 1 unless the launch's x tile (BLOCK_T rows of ``row_bytes``) fits
    ``_L1_TILE_BYTES`` with L1-cached loads; then the most tiles per program (up to all of
    them) that keep ``_GROUP_MIN_PROGRAMS`` programs."""
    if cfg["num_stages"] != 1 or cfg["BLOCK_T"] * row_bytes > _L1_TILE_BYTES:
        return 1
    programs = triton.cdiv(T, cfg["BLOCK_T"]) * n_tiles
    return max(1, min(n_tiles, programs // _GROUP_MIN_PROGRAMS))


_INT32_MAX = 2 ** 31 - 1


# Epilogues of the block kernel (the MLP's hidden layer; kernels/fused.py): the backward's h and
# gelu(h), its dh, and the forward's gelu(h) alone where the MLP is not fused.
EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_GELU_GRAD, EPILOGUE_ACT = 0, 1, 2, 3


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
    default = _block_default(b, a.dtype, a.shape[1], T)
    if not rt.interpreting() and _wide_l1(b, a.dtype, a.shape[1], T):
        default.update(_wide_tiles(offsets, n_out_blocks, P, D, by_out, b, a.element_size(), T))
    if not rt.interpreting() and b >= 16:
        default = _fill_sms(default, T, n_out_blocks)
    cfg = rt.launch_config(kernel_name, {"b": b, "T": rt.shape_bucket(T), "dtype": str(a.dtype)[6:]}, default)
    nb = cfg["NB"]
    tile_ptr, entries = diag_tile_list(offsets, n_out_blocks, P, D, by_out, nb)
    n_tiles = tile_ptr.numel() - 1
    group = cfg.get("TILE_GROUP") or _tile_group(T, a.shape[1] * a.element_size(), n_tiles, cfg)
    group = max(1, min(group, n_tiles))
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(n_tiles, group),)
    if grid[0] > _INT32_MAX:
        raise ValueError(f"{T} tokens need {grid[0]} programs, more than a launch holds")
    diag_block_kernel[grid](a, values, tile_ptr, entries, a if bias is None else bias, out,
                             out if aux is None else aux,
                             T, D, P, n_out_blocks, n_tiles, group,
                             a.stride(0), a.stride(1), out.stride(0), out.stride(1),
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
    R, C, D, P = check_args(x2, values, offsets, block_size, out_features, bias)
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
    R, C, D, P = check_args(x2, values, offsets, block_size, out_features, bias)
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


def diag_fwd_act(x2, values, offsets, block_size: int, out_features: int, bias=None) -> torch.Tensor:
    """Launcher of gelu(x2 W^T + bias) (the MLP forward's hidden layer where it is not fused,
    ``kernels.fused``): ``diag_block_kernel`` with EPILOGUE=3 writes the activation alone.

    Args: as ``diag_fwd`` (x2 [T, in]; values [K, D, b, b] and bias [out_features] in x2's
        dtype; offsets int32 [K]), with block_size b >= 16.
    Returns:
        [T, out_features] in x2's dtype: the exact (erf) GELU of the fp32 accumulator.
    """
    R, C, D, P = check_args(x2, values, offsets, block_size, out_features, bias)
    a = torch.empty(x2.shape[0], out_features, dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0 or offsets.numel() == 0:
        if x2.shape[0]:
            a.zero_() if bias is None else a.copy_(torch.nn.functional.gelu(bias.float()).expand_as(a))
        return a
    _launch(x2, values.contiguous(), offsets.contiguous(), a, D, P, R, block_size,
            by_out=R < C, trans_w=True, kernel_name="diag_fwd",
            bias=None if bias is None else bias.contiguous(), epilogue=EPILOGUE_ACT)
    return a


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
    if h.shape != (dy.shape[0], in_features):
        raise ValueError(f"h must have shape {(dy.shape[0], in_features)}, got {tuple(h.shape)}")
    return _input_grad(dy, values, offsets, block_size, in_features, h.contiguous())


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
    return _input_grad(dy, values, offsets, block_size, in_features)


def _input_grad(dy, values, offsets, block_size: int, in_features: int, h=None) -> torch.Tensor:
    """dy W, times gelu'(h) in the epilogue when h is given."""
    R, C = dy.shape[1] // block_size, in_features // block_size
    D, P = min(R, C), max(R, C)
    dx = torch.empty(dy.shape[0], in_features, dtype=dy.dtype, device=dy.device)
    if dy.shape[0] == 0:
        return dx
    if offsets.numel() == 0:
        return dx.zero_()
    _launch(dy, values.contiguous(), offsets.contiguous(), dx, D, P, C, block_size, by_out=R >= C,
            trans_w=False, kernel_name="diag_dx", aux=h, epilogue=EPILOGUE_NONE if h is None else EPILOGUE_GELU_GRAD)
    return dx


_DW_MIN_PROGRAMS = 4 * 132  # the weight gradient's token chunks aim at 4 programs an SM


def _dw_stack(b: int, K: int, itemsize: int, D: int, T: int) -> int:
    """Diagonals stacked on one shared block (G) for b >= 16: the power of two with M = G * b
    in [64, 128] (64: wgmma 64xbx16 on sm_90; 128 only for 2-byte dtypes: b = 64 in fp32
    would take 3 x 96 KB of shared memory, and only where its D cdiv(K, G) groups still give
    ``_DW_MIN_PROGRAMS`` programs of 128 tokens: at T = 256 fewer groups leave SMs idle, b = 64
    dW 0.42 -> 0.38x in the static model) that minimises the slices a token reads per shared
    block, cdiv(K, G) (G + 1) (padding lanes are read too); the smaller on a tie. ViT-B at
    90%, T = 50,432: b = 16, K = 20: 4 (25 slices; 8: 27); b = 64, K = 5: 2 (9; 1: 10: dW
    2.03 -> 2.24x dense, static model); BERT's QKV b = 16, K = 15: 8 (18; 4: 20)."""
    low = max(1, 64 // rt.next_pow2(b))
    big = 2 * low
    if itemsize > 2 or D * -(-max(K, 1) // big) * -(-T // 128) < _DW_MIN_PROGRAMS:
        return low
    return min((low, big), key=lambda g: (_stack_slices(K, g), g))


def _stack_slices(K: int, G: int) -> int:
    """Activation slices a token the stacks read per shared block: cdiv(K, G) stacks of G
    gathered blocks (padding lanes too) and the shared one."""
    return -(-max(K, 1) // G) * (G + 1)


# The band variant of the weight gradient (``diag_dw_band_kernel``): b = 16, 2-byte dtypes,
# 16-token steps of synchronous L1-cached loads, mma.sync 16x8x16, 1 block an SM on sm_90 (the
# dy and x tiles take 2 x NB x BLOCK_T x 16 x 2 B of shared memory). Blocks a program: 64 (64
# KB of fp32 accumulators, 8 warps: 178 registers, no spill) or 128 (128 KB, 16 warps: 128
# registers, no spill; at 8 warps 255, the limit, and half the warps to hide the loads),
# whichever table reads fewer slices a token (``dw_band_slices``), where that is fewer than
# the stacks' D cdiv(K, G) (G + 1). ViT-B fc1 / fc2, K = 20: 552 at 128, 733 at 64, 1200
# stacked; static model, H200 bf16 T = 50,432, L2-bound: 1183 -> 891 MB, dW 224 -> 171 us
# (1.36 -> 1.78x dense), training matmul 1.54 -> 1.69x (2.11x with the wide tiles), BERT's
# QKV dW 1.23 -> 1.64x. 32-token steps at 128 blocks need 256 KB of shared memory: no compile.
# The model does not count the loads' latency (not pipelined): a GPU run must confirm.
_DW_BAND_WARPS = {64: 8, 128: 16}
_DW_BAND_PROGRAMS = 2 * 132
_DW_BAND_MIN_TOKENS = 8192


def _dw_band_choice(b: int, itemsize: int, offsets, R: int, C: int, D: int, K: int, G: int,
                    T: int) -> int:
    """Blocks a program of the band variant (a key of ``_DW_BAND_WARPS``), or 0 for the stacks:
    b = 16 and 2-byte dtypes only (fp32 tiles and b = 32 accumulators would not fit the
    registers), from ``_DW_BAND_MIN_TOKENS`` (its few programs need many token chunks: at T =
    256, 15 chunks of fp32 partials make ViT-B's dW HBM-bound, 10.9 -> 23.9 us in the static
    model), the block count whose table reads the fewest slices a token (the smaller on a
    tie), and only where that is fewer than the stacks read."""
    if b != 16 or itemsize != 2 or T < _DW_BAND_MIN_TOKENS:
        return 0
    offsets = offsets.contiguous()

    def build():  # cached per pattern: the count is a sort and a host sync
        slices, nb = min((dw_band_slices(diag_dw_bands(offsets, R, C, nb), nb), nb) for nb in _DW_BAND_WARPS)
        return nb if slices < D * _stack_slices(K, G) else 0
    return rt.cached_pattern((offsets,), ("diag dw band choice", R, C, G, tuple(_DW_BAND_WARPS)), build)


def _dw_default(b: int, K: int = 1, itemsize: int = 2, D: int = 1, T: int = 0) -> dict:
    """Launch config of the weight-gradient kernel where the table has no entry (a table's G
    decides instead). b >= 16: G diagonals stacked on one shared block (``_dw_stack``), so
    the MMA has M = G * b >= 64: wgmma 64xbx16 on sm_90 (the G consecutive blocks of one
    diagonal this replaced were a 3-D mma.sync 16816 at b = 16 / 32). 1 < b < 16: a run of
    32 / b blocks of one diagonal on CUDA cores (b = 1 goes to the element SDDMM, see
    ``diag_dw``)."""
    if b < 16:
        group = max(1, 32 // rt.next_pow2(b))
    else:
        group = _dw_stack(b, K, itemsize, D, T)
    if rt.interpreting():
        return {"G": group, "BLOCK_T": 64, "num_warps": 4, "num_stages": 1, "TARGET_PROGRAMS": 4,
                "BANDS": 0, "BAND_BLOCK_T": 64, "band_warps": 4, "BAND_PROGRAMS": 4}
    return {"G": group, "BLOCK_T": 128 if b >= 16 else 64, "num_warps": 4, "num_stages": 3,
            "TARGET_PROGRAMS": _DW_MIN_PROGRAMS, "BANDS": 0, "BAND_BLOCK_T": 16, "band_warps": 8,
            "BAND_PROGRAMS": _DW_BAND_PROGRAMS}


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
        rows, cols = block_coords(offsets, R, C)
        return sddmm(dy, x2, rows, cols, 1).reshape(K, D, 1, 1)
    default = _dw_default(b, K, dy.element_size(), D, T)
    default["BANDS"] = _dw_band_choice(b, dy.element_size(), offsets, R, C, D, K, default["G"], T)
    if default["BANDS"] and not rt.interpreting():
        default["band_warps"] = _DW_BAND_WARPS[default["BANDS"]]
    cfg = rt.launch_config("diag_dw", {"b": b, "T": rt.shape_bucket(T), "dtype": str(dy.dtype)[6:]}, default)
    bands = cfg.get("BANDS", 0)
    if bands:
        return _dw_bands(dy, x2, offsets, b, R, C, D, K, T, cfg)
    use_dot = b >= 16
    if use_dot:
        groups = diag_dw_stacks(offsets.contiguous(), R, C, cfg["G"])
    else:
        groups = diag_dw_groups(offsets.contiguous(), R, C, cfg["G"])
    n_groups, bt = groups.shape[0], cfg["BLOCK_T"]
    chunk, n_chunks, g = _dw_chunks(dy, T, bt, cfg["TARGET_PROGRAMS"], n_groups, (K, D, b, b))
    upcast, precision = dot_settings(dy.dtype)
    diag_dw_kernel[(n_groups * n_chunks,)](
        dy, x2, groups, g, T, chunk, D, R, C, n_groups, K * D * b * b,
        dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1),
        B=b, BLOCK_B=max(16, rt.next_pow2(b)) if b >= 16 else rt.next_pow2(b), G=cfg["G"], BLOCK_T=bt,
        USE_DOT=use_dot, TALL=R >= C, UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(dy.dtype),
        NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"])
    return g.sum(0).to(dy.dtype) if n_chunks > 1 else g


def _dw_chunks(dy, T: int, bt: int, target_programs: int, programs: int, shape: tuple):
    """(tokens a chunk, chunks, output) of a weight-gradient launch: T cut into chunks of whole
    BLOCK_T steps until ``target_programs`` run; with several chunks the output holds their
    fp32 (fp64) partials [chunks, *shape] for the launcher to sum, else dy's dtype."""
    n_chunks = max(1, min(triton.cdiv(T, bt), triton.cdiv(target_programs, programs)))
    chunk = triton.cdiv(triton.cdiv(T, n_chunks), bt) * bt
    n_chunks = triton.cdiv(T, chunk)
    acc_torch = torch.float64 if dy.dtype == torch.float64 else torch.float32
    g = torch.empty((n_chunks, *shape) if n_chunks > 1 else shape,
                    dtype=acc_torch if n_chunks > 1 else dy.dtype, device=dy.device)
    return chunk, n_chunks, g


def _dw_bands(dy, x2, offsets, b, R, C, D, K, T, cfg) -> torch.Tensor:
    """``diag_dw``'s band variant (``diag_dw_band_kernel``), cfg["BANDS"] blocks a program."""
    nb = cfg["BANDS"]
    table = diag_dw_bands(offsets.contiguous(), R, C, nb)
    n_progs, bt = table.shape[0], cfg["BAND_BLOCK_T"]
    # At most BAND_PROGRAMS programs (whole waves at 1 block an SM): ViT-B fc1's 9 table rows
    # at NB = 128 take 29 chunks, 261 programs in 2 waves of 132 SMs, where rounding the chunks
    # up (30, 270) left a third wave of 6.
    target = max(1, cfg["BAND_PROGRAMS"] // n_progs) * n_progs
    chunk, n_chunks, g = _dw_chunks(dy, T, bt, target, n_progs, (K, D, b, b))
    upcast, precision = dot_settings(dy.dtype)
    diag_dw_band_kernel[(n_progs * n_chunks,)](
        dy, x2, table, g, T, chunk, n_progs, K * D * b * b,
        dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1),
        B=b, NB=nb, BLOCK_T=bt, UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(dy.dtype),
        NUM_STAGES=1, num_warps=cfg["band_warps"])
    return g.sum(0).to(dy.dtype) if n_chunks > 1 else g
