"""Fused block-diagonal MLP: y = fc2(gelu(fc1(x))) with both weights in DiagLinear's format,
without writing the hidden activation to memory.

    h = x @ W1^T + b1        x: [..., dim]      W1: [hidden, dim]   (DynaDiag blocks, b x b)
    y = gelu(h) @ W2^T + b2  y: [..., out]      W2: [out, hidden]

W1 = (w1_values [K1, D1, b, b], w1_offsets int32 [K1]) and W2 = (w2_values [K2, D2, b, b],
w2_offsets int32 [K2]) follow kernels/diag/ exactly; GELU is the exact (erf) one, as
``torch.nn.functional.gelu``'s default. Block sizes b >= 16 (the kernel multiplies b x b
tiles with tl.dot); any geometry of either layer (tall, wide, square), any K (0 included).

The kernel. One program per (token tile, output block r of fc2), output blocks varying
fastest (programs running together share one token tile of x, which stays in L2). For each
active fc2 diagonal the program names the hidden block j it reads (j = (r + o2) mod C2 when
fc2 is wide, else j = (r - o2) mod R2 when that is < C2), recomputes h_j = x @ W1[j]^T + b1_j
from fc1's diagonals in fp32 registers (input block c = (j - o1) mod R1 when fc1 is tall or
square, kept when c < C1; c = (j + o1) mod C1 when fc1 is wide), applies GELU there and
accumulates y_r += gelu(h_j) @ W2[r, j]^T. The hidden activation never reaches HBM: the
kernel reads x and the weights and writes y, nothing else.

The price is recomputation: hidden block j is computed once for every fc2 block that reads
it (a block no fc2 block reads is never computed). On average that is K2 * R2 / C2 times
(fc2 wide), about density * out / b; exactly, fc1's work becomes sum_j n1(j) n2(j) blocks
instead of sum_j n1(j) (n1: fc1 blocks in hidden block-row j, n2: fc2 blocks in hidden
block-column j). ViT-B (768 <-> 3072, 90% sparsity, K = ceil(0.1 P)): b = 16: K = 20, 5.0x
(4.4-5.3 over 20 random offset draws); b = 32: K = 10, 2.5x (1.9-2.8); b = 64: K = 5,
1.25x (0.7-2.0). Forward FLOPs are then (recompute + 1) / 2 of the unfused sparse MLP's:
about 3x at b = 16 (31% of dense), 1.75x at b = 32 (18%), 1.13x at b = 64 (12%), against
10.4% for unfused - while the unfused MLP moves ~2.2 GB through HBM at T = 50,432 in bf16
(h written, bias and GELU read and write it, fc2 reads it) and the fused one ~0.16 GB (x
in, y out). Fusion by recomputation is nearly free at b = 64 and costs ~3x the sparse FLOPs
at b = 16, where 16 x 16 tiles also keep the tensor cores far from peak.

Why not compute each hidden block once (bench/fused_mlp.py's ``grouping_model``, ViT-B, 90%,
seed-0 offsets): a program owning nb fc2 output blocks could share the hidden blocks its
group reads. The recompute falls only slowly with nb - b = 16: 5.23 (nb = 1), 4.21 (4), 2.72
(16), 1.0 only at nb = 48, every output; b = 64: 1.32, 1.20 (4), 0.85 at nb = 12 (once per
read hidden block) - because random diagonals rarely overlap within a group. All outputs per
program means a [BT, 768] fp32 y accumulator on chip: 192 KB at BT = 64 (192 registers a
thread on 8 warps, the SM has 256 KB), and at BT = 16, where it fits, every token tile reads
all weights again: 2.9-3.1 GB from L2 at T = 50,432 against 0.45 GB today (b = 64, BT = 128).
Triton can also not add into a block of a register accumulator chosen at run time (the
hidden block's target lane), so a shared hidden block costs a branch per lane or an
NB-wide masked add per use. One output block a program with 128-token tiles stays the design.

Where recomputation costs more than the hidden layer's trip through memory, the launcher does
not fuse (``_UNFUSED_MAX_BLOCK``: b = 16 from 8192 tokens in 2-byte dtypes; a config's
UNFUSED decides instead): fc1 with GELU in its epilogue writes gelu(h) once, in x's dtype
(``diag_fwd_act``), and fc2 reads it (``diag_fwd``), each product with kernels/diag's wide
tiles (many output blocks a program; fc1's x tile in L1, fc2's tile shape by the L1 replay).
Static model (not measured), ViT-B, b = 16, H200, bf16, T = 50,432: 0.39x -> 2.22x the dense
MLP (91 us for fc1, HBM-bound on writing gelu(h); 184 us for fc2, L2-bound). A streaming
design that computed each hidden block once and kept h on chip would save the hidden's trip
through HBM, but fc1 would then be L2-bound at nearly the same time (85 us) and fc2's L2
traffic stays (x once needs all 48 output blocks a program, a [BT, 768] fp32 accumulator):
~2.3x at best in the same model, not 3x (bench/README.md).

Training (the trade-off). The forward saves only its inputs (x and the weights), never h.
The backward recomputes h = fc1(x) once with the unfused diagonal kernel, whose epilogue also
writes gelu(h) (``diag_fwd_gelu``), then: dW2 = SDDMM(dy, gelu(h)); dh = (dy W2) * gelu'(h) in
one input-gradient launch with a GELU-derivative epilogue (``diag_dx_gelu_grad``, reading h);
dx = dh W1 (diag_dx); dW1 = SDDMM(dh, x); db = column sums. No torch pass over a hidden-sized
tensor but b1's column sum (gelu and gelu_backward were 1.5 GB of 3.9 GB at ViT-B, T =
50,432, bf16; static model of the backward at b = 64: 1.33 -> 1.73x the dense MLP's backward
on the H200). Memory: the activations kept from forward to backward per MLP are x alone
instead of x, h and gelu(h) (at ViT-B, T = 50,432, bf16: 0.62 GB less per MLP block); the
backward briefly holds h, gelu(h) and dh. Speed: the backward does one extra fc1 forward, 1
of the 6 sparse matmuls of an unfused training step (+17% FLOPs).

Example:
    y = fused_diag_mlp(x, v1, off1, b1, v2, off2, b2, block_size=16,
                       hidden_features=3072, out_features=768)
    y = fused_mlp(fc1, fc2, x)   # two DiagLinear layers
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import runtime as rt
from .diag import (DiagLinear, diag_dx_gelu_grad_op, diag_dx_op, diag_fwd, diag_fwd_act, diag_fwd_torch,
                   diag_matmul_gelu_op, diag_tile_list, diag_to_dense, diag_weight_grad)
from .sddmm import acc_dtype, dot_settings

# tl.dot needs tiles of at least 16 x 16.
MIN_BLOCK_SIZE = 16


def fused_diag_mlp_ref(x, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size,
                       hidden_features, out_features):
    """The spec, through dense weights (tests only): fc2(gelu(fc1(x))) in plain torch."""
    w1 = diag_to_dense(w1_values, w1_offsets, x.shape[-1], hidden_features, block_size)
    w2 = diag_to_dense(w2_values, w2_offsets, hidden_features, out_features, block_size)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@triton.jit
def fused_diag_mlp_kernel(
    x_ptr, w1_ptr, ptr1_ptr, entries1_ptr, b1_ptr, w2_ptr, ptr2_ptr, entries2_ptr, b2_ptr, y_ptr,
    T, N_OUT,
    stride_xt, stride_xi, stride_yt, stride_yo,
    B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    FC1_BY_OUT: tl.constexpr, FC2_BY_OUT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """y[:, block r] = sum over fc2's diagonals of gelu(x @ W1[j]^T + b1_j) @ W2[r, j]^T (+ b2),
    the hidden block j recomputed in registers: one program per (token tile of BLOCK_T, fc2
    output block r), never writing h.

    Grid: (cdiv(T, BLOCK_T) * N_OUT,); program p computes tokens [(p // N_OUT) * BLOCK_T,
    (p // N_OUT + 1) * BLOCK_T) of output block p % N_OUT, output blocks varying fastest.
    Nothing is checked here (``fused_diag_mlp_fwd`` checks, then launches this).

    Args:
        x_ptr: x [T, dim], element (t, i) at t * stride_xt + i * stride_xi; fp16, bf16, fp32
            or fp64.
        w1_ptr: fc1's values [K1, D1, B, B], contiguous, the dtype of x.
        ptr1_ptr: int32 [R1 + 1], contiguous: hidden block j's fc1 entries are
            entries1[ptr1[j]:ptr1[j + 1]] (``diag_tile_list(w1_offsets, R1, P1, D1, R1 < C1, 1)``).
        entries1_ptr: int32 [E1, 2], contiguous: (k1 * D1, input block c) pairs.
        b1_ptr: b1 [R1 * B], the dtype of x; read only when HAS_B1 (any tensor otherwise).
        w2_ptr: fc2's values [K2, D2, B, B], contiguous, the dtype of x.
        ptr2_ptr: int32 [N_OUT + 1], contiguous: output block r's fc2 entries, as ptr1 for fc2.
        entries2_ptr: int32 [E2, 2], contiguous: (k2 * D2, hidden block j) pairs.
        b2_ptr: b2 [N_OUT * B], the dtype of x; read only when HAS_B2 (any tensor otherwise).
        y_ptr: y [T, N_OUT * B], element (t, o) at t * stride_yt + o * stride_yo; x's dtype.
        T: int, tokens (>= 1). N_OUT: int, fc2's output blocks R2 (>= 1).
        stride_xt, stride_xi, stride_yt, stride_yo: int element strides of x and y.
        B: constexpr int >= 16, the block size.
        BLOCK_B: constexpr int, the power of two >= B the tiles are padded to.
        BLOCK_T: constexpr int, power of two >= 16: tokens per program.
        FC1_BY_OUT, FC2_BY_OUT: constexpr bool: the layer's value index d is its output block
            (the layer is wide, R < C), else its input block.
        HAS_B1, HAS_B2: constexpr bool: add b1 before the GELU / b2 in the epilogue.
        UPCAST: constexpr bool: cast tiles to ACC before tl.dot (the interpreter's bf16 is
            wrong; fp32 operands give an exact dot).
        DOT_PRECISION: constexpr str, tl.dot's input_precision: "ieee" or "tf32" (fp32 operands).
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 x).
        NUM_STAGES: constexpr int >= 1, software-pipelining stages of fc1's inner loop.
    """
    # Output blocks vary fastest: programs running together read one token tile of x. The
    # loops walk host-built lists (kernels/diag's diag_tile_list with one block a tile):
    # fc2's (k2 * D2, hidden block j) pairs of output block r, and for each j fc1's
    # (k1 * D1, input block c) pairs - no branch, no modulo, int32 indices.
    pid = tl.program_id(0)
    r = pid % N_OUT
    pid_t = pid // N_OUT
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    mask_t = offs_t < T
    mask_b = offs_b < B
    mask_tb = mask_t[:, None] & mask_b[None, :]
    mask_w = mask_b[:, None] & mask_b[None, :]
    x_rows = x_ptr + offs_t[:, None] * stride_xt  # [BT, 1], the only int64 offsets
    # w[i, j] of a stored block is (output feature i, input feature j); both products need
    # op(W) = W^T, read as [BB(j), BB(i)].
    w_offs = offs_b[None, :] * B + offs_b[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=ACC)
    for e2 in range(tl.load(ptr2_ptr + r), tl.load(ptr2_ptr + r + 1)):
        vbase2 = tl.load(entries2_ptr + 2 * e2)
        j = tl.load(entries2_ptr + 2 * e2 + 1)  # the hidden block fc2's diagonal reads
        h = tl.zeros((BLOCK_T, BLOCK_B), dtype=ACC)
        for e1 in tl.range(tl.load(ptr1_ptr + j), tl.load(ptr1_ptr + j + 1), num_stages=NUM_STAGES):
            vbase1 = tl.load(entries1_ptr + 2 * e1)
            c = tl.load(entries1_ptr + 2 * e1 + 1)  # the input block feeding hidden block j
            if FC1_BY_OUT:
                d1 = j
            else:
                d1 = c
            xt = tl.load(x_rows + (c * B + offs_b)[None, :] * stride_xi, mask=mask_tb, other=0.0)  # [BT, BB]
            w1 = tl.load(w1_ptr + (vbase1 + d1) * (B * B) + w_offs, mask=mask_w, other=0.0)  # [BB, BB]
            if UPCAST:  # right after the load: the interpreter computes bf16 on raw bits
                xt = xt.to(ACC)
                w1 = w1.to(ACC)
            h += tl.dot(xt, w1, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_B1:
            bias1 = tl.load(b1_ptr + j * B + offs_b, mask=mask_b, other=0.0).to(ACC)  # [BB]
            h += bias1[None, :]
        # Exact GELU in the accumulator's precision; padded lanes stay 0 (gelu(0) = 0).
        a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))  # [BT, BB]
        if FC2_BY_OUT:
            d2 = r
        else:
            d2 = j
        w2 = tl.load(w2_ptr + (vbase2 + d2) * (B * B) + w_offs, mask=mask_w, other=0.0)  # [BB, BB]
        if UPCAST:
            w2 = w2.to(ACC)
        else:
            a = a.to(w2.dtype)  # fp16/bf16 operands for the tensor cores
        acc += tl.dot(a, w2, input_precision=DOT_PRECISION, out_dtype=ACC)
    if HAS_B2:
        bias2 = tl.load(b2_ptr + r * B + offs_b, mask=mask_b, other=0.0).to(ACC)  # [BB]
        acc += bias2[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + (r * B + offs_b)[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=mask_tb)


def _check_layer(name: str, values, offsets, in_features: int, out_features: int, b: int):
    """Shape, dtype and range checks of one diagonal weight; returns (R, C, D, P)."""
    R, C = out_features // b, in_features // b
    D, P = min(R, C), max(R, C)
    rt.check_index(f"{name}_offsets", offsets, 1)
    K = offsets.numel()
    if values.shape != (K, D, b, b):
        raise ValueError(f"{name}_values must have shape [K, D, b, b] = {(K, D, b, b)} for a "
                         f"{in_features} -> {out_features} layer with block_size={b} and {K} offsets, "
                         f"got {tuple(values.shape)}")
    rt.check_range(f"{name}_offsets", offsets, P)
    if rt.has_repeats(offsets):
        raise ValueError(f"{name}_offsets must be distinct diagonals; found a repeat")
    return R, C, D, P


def _check(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size, hidden_features, out_features):
    """Every argument of the op; returns the geometries (R, C, D, P) of fc1 and fc2."""
    rt.check_float("x", x2)
    rt.check_float("w1_values", w1_values)
    rt.check_float("w2_values", w2_values)
    rt.check_dtype_match("w1_values", w1_values, "x", x2)
    rt.check_dtype_match("w2_values", w2_values, "x", x2)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < MIN_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int >= {MIN_BLOCK_SIZE} for the fused MLP (it multiplies "
                         f"b x b tiles with tl.dot), got {block_size!r}; run smaller blocks as two "
                         f"unfused DiagLinear layers")
    dim, b = x2.shape[-1], block_size
    for name, n in (("hidden_features", hidden_features), ("out_features", out_features)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if dim % b or hidden_features % b or out_features % b:
        raise ValueError(f"block_size={b} must divide x's last dimension ({dim}), hidden_features="
                         f"{hidden_features} and out_features={out_features}")
    for name, bias, n in (("b1", b1, hidden_features), ("b2", b2, out_features)):
        if bias is not None:
            rt.check_float(name, bias)
            rt.check_dtype_match(name, bias, "x", x2)
            if bias.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}], got {tuple(bias.shape)}")
    rt.check_same_device(x=x2, w1_values=w1_values, w1_offsets=w1_offsets, b1=b1,
                         w2_values=w2_values, w2_offsets=w2_offsets, b2=b2)
    g1 = _check_layer("w1", w1_values, w1_offsets, dim, hidden_features, b)
    g2 = _check_layer("w2", w2_values, w2_offsets, hidden_features, out_features, b)
    return g1, g2


# The forward runs unfused (the module docstring: why, and the model's figures) at b <= 16
# (ViT-B b = 16 recomputes each hidden block ~5x; b = 64 ~1.3x stays fused) from 8192 tokens in
# 2-byte dtypes, where kernels/diag's wide tiles apply; a config's UNFUSED decides instead.
_UNFUSED_MAX_BLOCK = 16
_UNFUSED_MIN_TOKENS = 8192


def _config(b: int, T: int, dtype: torch.dtype) -> dict:
    # Under the interpreter programs run one after another (~1-2 ms per loop iteration): big
    # token tiles. On a GPU two [BT, b] fp32 tiles (h and y) live in registers (ptxas, sm_90,
    # bf16): b = 64 with 128 tokens on 8 warps takes 128 registers and gets wgmma 64x64x16
    # (64 tokens: 64x32x16 and every weight block read twice as often from L2); b = 16 72 and
    # b = 32 124 on 4 warps. b = 64 in bf16 / fp16 at T >= 8192: 256 tokens (249 registers, no
    # spill, 1 block an SM) halve the weights' re-reads from L2 (one per token tile): static
    # model, H200, T = 50,432: L2 897 -> 704 MB, 3.63 -> 4.59x the dense MLP; at T = 256 it
    # would leave 12 programs (0.96x vs 1.22x), hence the bound; fp32 (CUDA cores) keeps 128
    # (at 256 ptxas for sm_80 gives a loop of 27,412 issue slots for 4096 FMA: 9.0 -> 1.5x).
    # Until bench/sweep.py writes entries.
    # UNFUSED: the two block-diagonal products instead (_UNFUSED_MAX_BLOCK).
    if rt.interpreting():
        default = {"BLOCK_T": 64, "num_warps": 4, "num_stages": 1, "UNFUSED": False}
    else:
        wide_tile = b >= 64 and T >= 8192 and dtype.itemsize == 2
        default = {"BLOCK_T": 256 if wide_tile else 128, "num_warps": 4 if b <= 32 else 8,
                   "num_stages": 2 if b <= 32 else 3,
                   "UNFUSED": b <= _UNFUSED_MAX_BLOCK and T >= _UNFUSED_MIN_TOKENS and dtype.itemsize == 2}
    return rt.launch_config("fused_diag_mlp", {"b": b, "T": rt.shape_bucket(T), "dtype": str(dtype)[6:]}, default)


# The kernel's earlier name; tests/bench/test_sweep.py plants a buggy kernel under it, so the
# launcher launches through it.
_fused_diag_mlp_kernel = fused_diag_mlp_kernel


def fused_diag_mlp_fwd(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size: int,
                       hidden_features: int, out_features: int) -> torch.Tensor:
    """Launcher of ``fused_diag_mlp_kernel``: checks, builds (or reuses) both layers' tile
    lists, allocates y, launches on x2's device.

    Args:
        x2: [T, dim], floating (fp16 / bf16 / fp32 / fp64), any strides; T may be 0.
        w1_values: [K1, D1, b, b], x2's dtype, D1 = min(dim, hidden_features) / b.
        w1_offsets: int32 [K1], distinct, in [0, max(dim, hidden_features) / b); K1 may be 0.
        b1: [hidden_features], x2's dtype, or None.
        w2_values: [K2, D2, b, b], x2's dtype, D2 = min(hidden_features, out_features) / b.
        w2_offsets: int32 [K2], distinct, in [0, max(hidden_features, out_features) / b).
        b2: [out_features], x2's dtype, or None.
        block_size: b >= 16 (tl.dot tiles), dividing dim, hidden_features and out_features.
        hidden_features, out_features: the widths of h and y.
    Returns:
        y: [T, out_features], x2's dtype (accumulated in fp32, fp64 for fp64).
    Constraints: the launch config's BLOCK_T >= 16; values' element counts and the widths
    below 2^31 (int32 indexing).
    Where the config says UNFUSED (by default b = 16 from 8192 tokens in 2-byte dtypes:
    ``_UNFUSED_MAX_BLOCK``), the two products of kernels/diag run instead (``diag_fwd_act``,
    ``diag_fwd``): gelu(h) is rounded to x2's dtype between them.
    """
    (R1, C1, D1, P1), (R2, C2, D2, P2) = _check(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2,
                                                block_size, hidden_features, out_features)
    T, b = x2.shape[0], block_size
    if T == 0:
        return torch.empty(T, out_features, dtype=x2.dtype, device=x2.device)
    cfg = _config(b, T, x2.dtype)
    if cfg.get("UNFUSED"):
        h = diag_fwd_act(x2, w1_values, w1_offsets, b, hidden_features, b1)
        return diag_fwd(h, w2_values, w2_offsets, b, out_features, b2)
    y = torch.empty(T, out_features, dtype=x2.dtype, device=x2.device)
    if cfg["BLOCK_T"] < 16:
        raise ValueError(f"fused_diag_mlp launch config needs BLOCK_T >= 16 (tl.dot), got {cfg['BLOCK_T']}")
    upcast, precision = dot_settings(x2.dtype)
    if max(w1_values.numel(), w2_values.numel(), x2.shape[1], hidden_features, out_features) > 2 ** 31 - 1:
        raise ValueError("the weights and feature widths must stay below 2^31 elements: the kernel indexes "
                         "them in int32")
    # Per hidden block, fc1's (k1 * D1, input block) pairs; per output block, fc2's (k2 * D2,
    # hidden block) pairs: the forward lists of kernels/diag with one block a tile.
    ptr1, entries1 = diag_tile_list(w1_offsets.contiguous(), R1, P1, D1, R1 < C1, 1)
    ptr2, entries2 = diag_tile_list(w2_offsets.contiguous(), R2, P2, D2, R2 < C2, 1)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * R2,)
    fused_diag_mlp_kernel[grid](
        x2, w1_values.contiguous(), ptr1, entries1, b1 if b1 is not None else x2,
        w2_values.contiguous(), ptr2, entries2, b2 if b2 is not None else x2, y,
        T, R2, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        B=b, BLOCK_B=rt.next_pow2(b), BLOCK_T=cfg["BLOCK_T"],
        FC1_BY_OUT=R1 < C1, FC2_BY_OUT=R2 < C2, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(x2.dtype), NUM_STAGES=cfg["num_stages"],
        num_warps=cfg["num_warps"])
    return y


def fused_diag_mlp_torch(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size: int,
                         hidden_features: int, out_features: int) -> torch.Tensor:
    """CPU path: the two diagonal products of kernels/diag around GELU, the hidden
    activation in the accumulator's precision (fp32, fp64 for fp64) as in the kernel."""
    _check(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size, hidden_features, out_features)
    if x2.shape[0] == 0:
        return x2.new_zeros(0, out_features)
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    h = diag_fwd_torch(x2.to(acc), w1_values.to(acc), w1_offsets, block_size, hidden_features)
    if b1 is not None:
        h = h + b1.to(acc)
    y = diag_fwd_torch(F.gelu(h), w2_values.to(acc), w2_offsets, block_size, out_features)
    if b2 is not None:
        y = y + b2.to(acc)
    return y.to(x2.dtype)


@torch.library.custom_op("alwayssparse::fused_diag_mlp", mutates_args=())
def _fused_diag_mlp_op(x2: torch.Tensor, w1_values: torch.Tensor, w1_offsets: torch.Tensor,
                       b1: torch.Tensor | None, w2_values: torch.Tensor, w2_offsets: torch.Tensor,
                       b2: torch.Tensor | None, block_size: int, hidden_features: int,
                       out_features: int) -> torch.Tensor:
    args = (x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size, hidden_features, out_features)
    if rt.runs_triton(x2):
        return fused_diag_mlp_fwd(*args)
    return fused_diag_mlp_torch(*args)


@_fused_diag_mlp_op.register_fake
def _(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size, hidden_features, out_features):
    return x2.new_empty(x2.shape[0], out_features)


def _setup(ctx, inputs, output):
    x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2, block_size, hidden_features, _ = inputs
    ctx.save_for_backward(x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2)
    ctx.block_size = block_size
    ctx.hidden_features = hidden_features


def _column_sum(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    return g.sum(0, dtype=acc).to(dtype)


def _backward(ctx, dy):
    x2, w1_values, w1_offsets, b1, w2_values, w2_offsets, b2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous()  # a gradient from .sum() has stride 0
    b, hidden = ctx.block_size, ctx.hidden_features
    # Recompute the pre-activation with the unfused kernel (the forward kept nothing of it);
    # its epilogue writes gelu(h) beside h, and fc2's input gradient multiplies by gelu'(h) in
    # its own: no torch pass over a hidden-sized tensor (gelu, gelu_backward: 1.5 GB of the
    # 3.9 GB at ViT-B, T = 50,432, bf16).
    h, act = diag_matmul_gelu_op(x2, w1_values, w1_offsets, b, hidden, b1)
    dw2 = diag_weight_grad(dy, act, w2_offsets, b, w2_values.shape) if need[4] else None
    db2 = _column_sum(dy, b2.dtype) if b2 is not None and need[6] else None
    dx = dw1 = db1 = None
    if need[0] or need[1] or need[3]:
        dh = diag_dx_gelu_grad_op(dy, w2_values, w2_offsets, b, hidden, h)
        dx = diag_dx_op(dh, w1_values, w1_offsets, b, x2.shape[1]) if need[0] else None
        dw1 = diag_weight_grad(dh, x2, w1_offsets, b, w1_values.shape) if need[1] else None
        db1 = _column_sum(dh, b1.dtype) if b1 is not None and need[3] else None
    return dx, dw1, None, db1, dw2, None, db2, None, None, None


_fused_diag_mlp_op.register_autograd(_backward, setup_context=_setup)
# Under torch.autocast: x, values and biases cast to the region's dtype, as for a matmul.
rt.register_autocast("alwayssparse::fused_diag_mlp")


def fused_diag_mlp(x: torch.Tensor, w1_values: torch.Tensor, w1_offsets: torch.Tensor, b1: torch.Tensor | None,
                   w2_values: torch.Tensor, w2_offsets: torch.Tensor, b2: torch.Tensor | None, block_size: int,
                   hidden_features: int, out_features: int) -> torch.Tensor:
    """Fused y = gelu(x W1^T + b1) W2^T + b2 with wrap-around block-diagonal W1 and W2.

    Args:
        x: [..., dim].
        w1_values: [K1, D1, b, b], dtype of x; fc1 (dim -> hidden_features) in DiagLinear's format.
        w1_offsets: int32 [K1], distinct diagonals in [0, max(dim, hidden_features) / b).
        b1: [hidden_features] or None.
        w2_values: [K2, D2, b, b], dtype of x; fc2 (hidden_features -> out_features).
        w2_offsets: int32 [K2], distinct diagonals in [0, max(hidden_features, out_features) / b).
        b2: [out_features] or None.
        block_size: b >= 16, dividing dim, hidden_features and out_features.
        hidden_features, out_features: the widths of h and y (a tall layer's height cannot
            be read from its values and offsets).
    Returns:
        y: [..., out_features], dtype of x (accumulated in fp32). Differentiable in x, both
        values and both biases (the backward recomputes h; see the module docstring).

    Example:
        >>> off = torch.tensor([0, 3], dtype=torch.int32)
        >>> y = fused_diag_mlp(torch.randn(5, 32), torch.randn(2, 2, 16, 16), off, torch.zeros(64),
        ...                    torch.randn(2, 2, 16, 16), off, torch.zeros(32), 16, 64, 32)  # [5, 32]
    """
    rt.check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., dim]")
    for name, v in (("w1_values", w1_values), ("w2_values", w2_values)):
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [K, D, b, b], got {getattr(v, 'shape', v)!r}")
    rt.check_same_device(x=x, w1_values=w1_values, w1_offsets=w1_offsets, b1=b1,
                         w2_values=w2_values, w2_offsets=w2_offsets, b2=b2)
    lead = x.shape[:-1]
    y = _fused_diag_mlp_op(rt.flatten_tokens(x), w1_values, w1_offsets, b1, w2_values, w2_offsets, b2,
                           block_size, int(hidden_features), int(out_features))
    return y.reshape(*lead, out_features)


def fused_mlp(fc1: DiagLinear, fc2: DiagLinear, x: torch.Tensor) -> torch.Tensor:
    """fc2(gelu(fc1(x))) for two DiagLinear layers in one fused kernel (gates included:
    the layers' ``effective_values()`` are used, as their forward does).

    Example:
        >>> fc1, fc2 = DiagLinear(768, 3072, 0.1, block_size=64), DiagLinear(3072, 768, 0.1, block_size=64)
        >>> y = fused_mlp(fc1, fc2, torch.randn(8, 768))  # [8, 768]
    """
    for name, layer in (("fc1", fc1), ("fc2", fc2)):
        if not isinstance(layer, DiagLinear):
            raise TypeError(f"{name} must be a kernels.DiagLinear, got {type(layer).__name__}")
    if fc1.block_size != fc2.block_size:
        raise ValueError(f"fc1 and fc2 must share a block size, got {fc1.block_size} and {fc2.block_size}")
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"fc1.out_features ({fc1.out_features}) must equal fc2.in_features ({fc2.in_features})")
    return fused_diag_mlp(x, fc1.effective_values(), fc1.offsets, fc1.bias, fc2.effective_values(), fc2.offsets,
                          fc2.bias, fc1.block_size, fc1.out_features, fc2.out_features)
