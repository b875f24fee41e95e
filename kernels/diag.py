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
b = 1 is a shifted multiply-add per diagonal. The weight gradient is the block SDDMM.

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

@triton.jit
def diag_partner(q, o, D, P, BY_OUT: tl.constexpr):
    """For output block q (scalar or vector) and diagonal offset o: the input block p it reads,
    the index d of the stored block along the diagonal, and whether that block exists (always,
    as a compile-time True, when the diagonal is indexed by the output side: no branch)."""
    if BY_OUT:
        p = (q + o) % P
        d = q
        valid = True
    else:
        p = (q - o + P) % P
        d = p
        valid = p < D
    return p, d, valid


@triton.jit
def _diag_block_kernel(
    a_ptr, values_ptr, offsets_ptr, out_ptr,
    T, K, D, P, N_OUT,
    stride_at, stride_ai, stride_ot, stride_oi,
    B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
    BY_OUT: tl.constexpr, TRANS_W: tl.constexpr, USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # Output blocks vary fastest: programs running together read one token tile of the input
    # (it stays in L2) instead of streaming the whole input once per diagonal.
    pid = tl.program_id(0).to(tl.int64)
    q = pid % N_OUT
    pid_t = pid // N_OUT
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_b = tl.arange(0, BLOCK_B)
    mask_t = offs_t < T
    mask_b = offs_b < B
    acc = tl.zeros((BLOCK_T, BLOCK_B), dtype=ACC)
    for k in range(0, K):
        o = tl.load(offsets_ptr + k).to(tl.int64)
        p, d, valid = diag_partner(q, o, D, P, BY_OUT)
        if valid:
            a = tl.load(a_ptr + offs_t[:, None] * stride_at + (p * B + offs_b)[None, :] * stride_ai,
                        mask=mask_t[:, None] & mask_b[None, :], other=0.0)  # [BT, BB]
            w_base = values_ptr + (k * D + d) * B * B
            # w[i, j] is (output feature i, input feature j) of the block; read as op(W).
            if TRANS_W:
                w = tl.load(w_base + offs_b[None, :] * B + offs_b[:, None],
                            mask=mask_b[:, None] & mask_b[None, :], other=0.0)  # [BB(j), BB(i)]
            else:
                w = tl.load(w_base + offs_b[:, None] * B + offs_b[None, :],
                            mask=mask_b[:, None] & mask_b[None, :], other=0.0)  # [BB(i), BB(j)]
            if UPCAST:
                a = a.to(ACC)
                w = w.to(ACC)
            if USE_DOT:
                acc += tl.dot(a, w, input_precision=DOT_PRECISION, out_dtype=ACC)
            else:
                acc += tl.sum(a.to(ACC)[:, :, None] * w.to(ACC)[None, :, :], axis=1)
    tl.store(out_ptr + offs_t[:, None] * stride_ot + (q * B + offs_b)[None, :] * stride_oi,
             acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_b[None, :])


@triton.jit
def _diag_elem_kernel(
    a_ptr, values_ptr, offsets_ptr, out_ptr,
    T, K, D, P, N_OUT,
    stride_at, stride_ai, stride_ot, stride_oi,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BY_OUT: tl.constexpr, ACC: tl.constexpr,
):
    # b = 1: a [BT, BQ] tile of outputs, one gathered multiply-add per diagonal.
    pid = tl.program_id(0).to(tl.int64)
    n_q_tiles = tl.cdiv(N_OUT, BLOCK_Q)
    pid_q = pid % n_q_tiles
    pid_t = pid // n_q_tiles
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_t = offs_t < T
    mask_q = offs_q < N_OUT
    acc = tl.zeros((BLOCK_T, BLOCK_Q), dtype=ACC)
    for k in range(0, K):
        o = tl.load(offsets_ptr + k).to(tl.int64)
        p, d, valid = diag_partner(offs_q, o, D, P, BY_OUT)
        valid = valid & mask_q
        a = tl.load(a_ptr + offs_t[:, None] * stride_at + p[None, :] * stride_ai,
                    mask=mask_t[:, None] & valid[None, :], other=0.0)  # [BT, BQ]
        w = tl.load(values_ptr + k * D + d, mask=valid, other=0.0)  # [BQ]
        acc += a.to(ACC) * w.to(ACC)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_q[None, :] * stride_oi,
             acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_q[None, :])


def _check(x2, values, offsets, block_size, out_features):
    rt.check_float("x", x2)
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


def _block_default(b: int) -> dict:
    """Launch config of the block kernel where the table has no entry. On a GPU: 128-token
    tiles; 8 warps for b >= 64, whose [128, 64] fp32 accumulator on 4 warps takes 155
    registers a thread (ptxas, sm_90, bf16, as the JIT specialises it: b = 16 54, b = 32 80,
    b = 64 on 8 warps 80; tests/kernels/gpu_compile.py). bench/sweep.py tunes the rest."""
    if rt.interpreting():
        return {"BLOCK_T": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_T": 128, "num_warps": 8 if b >= 64 else 4, "num_stages": 3}


def _launch(a, values, offsets, out, D, P, n_out_blocks, b, by_out, trans_w, kernel_name):
    T, K = a.shape[0], offsets.numel()
    if b == 1:
        cfg = rt.launch_config(kernel_name, {"b": 1, "T": rt.shape_bucket(T), "dtype": str(a.dtype)[6:]},
                               # 32-token tiles on a GPU: 89 registers a thread, 64: 168 (sm_90)
                               {"BLOCK_T": 64 if rt.interpreting() else 32, "BLOCK_Q": 64, "num_warps": 4})
        grid = (triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(n_out_blocks, cfg["BLOCK_Q"]),)
        _diag_elem_kernel[grid](a, values, offsets, out, T, K, D, P, n_out_blocks,
                                a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                                BLOCK_T=cfg["BLOCK_T"], BLOCK_Q=cfg["BLOCK_Q"], BY_OUT=by_out,
                                ACC=acc_dtype(a.dtype), num_warps=cfg["num_warps"])
        return
    upcast, precision = dot_settings(a.dtype)
    cfg = rt.launch_config(kernel_name, {"b": b, "T": rt.shape_bucket(T), "dtype": str(a.dtype)[6:]},
                           _block_default(b))
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * n_out_blocks,)
    _diag_block_kernel[grid](a, values, offsets, out, T, K, D, P, n_out_blocks,
                             a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                             B=b, BLOCK_B=max(16, rt.next_pow2(b)) if b >= 16 else rt.next_pow2(b),
                             BLOCK_T=cfg["BLOCK_T"], BY_OUT=by_out, TRANS_W=trans_w, USE_DOT=b >= 16,
                             UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(a.dtype),
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def diag_fwd(x2, values, offsets, block_size: int, out_features: int) -> torch.Tensor:
    """Launcher of the forward product. x2: [T, in] -> y: [T, out_features]."""
    R, C, D, P = _check(x2, values, offsets, block_size, out_features)
    y = torch.empty(x2.shape[0], out_features, dtype=x2.dtype, device=x2.device)
    if x2.shape[0] == 0:
        return y
    if offsets.numel() == 0:
        return y.zero_()
    _launch(x2, values.contiguous(), offsets.contiguous(), y, D, P, R, block_size,
            by_out=R < C, trans_w=True, kernel_name="diag_fwd")
    return y


def diag_dx(dy, values, offsets, block_size: int, in_features: int) -> torch.Tensor:
    """Launcher of the input gradient. dy: [T, out] -> dx: [T, in_features]."""
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


def diag_fwd_torch(x2, values, offsets, block_size: int, out_features: int) -> torch.Tensor:
    R, C, D, P = _check(x2, values, offsets, block_size, out_features)
    if _elementwise_on_cpu(block_size, x2.shape[0], offsets):
        return _diag_csr_product(x2, values, offsets, R, C, block_size, transpose=False)
    return _diag_product_torch(x2, values, offsets, C, R, block_size, gather=R < C, transpose_w=True)


def diag_dx_torch(dy, values, offsets, block_size: int, in_features: int) -> torch.Tensor:
    R, C = dy.shape[1] // block_size, in_features // block_size
    if _elementwise_on_cpu(block_size, dy.shape[0], offsets):
        return _diag_csr_product(dy, values, offsets, R, C, block_size, transpose=True)
    return _diag_product_torch(dy, values, offsets, R, C, block_size, gather=R >= C, transpose_w=False)


def _diag_dw(dy, x2, offsets, block_size, values_shape):
    R, C = dy.shape[1] // block_size, x2.shape[1] // block_size
    if not rt.runs_triton(dy) and _elementwise_on_cpu(block_size, dy.shape[0], offsets):
        # element dots at the diagonals' elements (cached coordinates: the SDDMM's CPU path
        # caches its own structure on the same tensors)
        rows, cols = _element_coords(offsets, R, C, block_size)
        return sddmm(dy, x2, rows, cols, 1).reshape(values_shape)
    rows, cols = rt.cached_pattern((offsets,), ("diag coords", R, C),
                                   lambda: tuple(t.reshape(-1) for t in diag_coords(offsets, R, C)))
    g = sddmm(dy, x2, rows, cols, block_size)
    return g.reshape(values_shape)


@torch.library.custom_op("alwayssparse::diag_matmul", mutates_args=())
def _diag_op(x2: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
             out_features: int) -> torch.Tensor:
    if rt.runs_triton(x2):
        return diag_fwd(x2, values, offsets, block_size, out_features)
    return diag_fwd_torch(x2, values, offsets, block_size, out_features)


@_diag_op.register_fake
def _(x2, values, offsets, block_size, out_features):
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


def _setup(ctx, inputs, output):
    x2, values, offsets, block_size, _ = inputs
    ctx.save_for_backward(x2, values, offsets)
    ctx.block_size = block_size


def _backward(ctx, dy):
    x2, values, offsets = ctx.saved_tensors
    dy = dy.contiguous()  # a gradient from .sum() has stride 0
    b = ctx.block_size
    dx = _diag_dx_op(dy, values, offsets, b, x2.shape[1]) if ctx.needs_input_grad[0] else None
    dv = _diag_dw(dy, x2, offsets, b, values.shape) if ctx.needs_input_grad[1] else None
    return dx, dv, None, None, None


_diag_op.register_autograd(_backward, setup_context=_setup)
rt.register_autocast("alwayssparse::diag_matmul")
rt.register_autocast("alwayssparse::diag_dx")


def diag_matmul(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int = 1,
                out_features: int | None = None) -> torch.Tensor:
    """Wrap-around (block-)diagonal sparse product y = x W^T.

    Args:
        x: [..., in].
        values: [K, D, b, b], same dtype as x (D = min(out, in) / b).
        offsets: int32 [K], distinct diagonals in [0, P), P = max(out, in) / b.
        block_size: b, dividing in and out. 1 gives element diagonals.
        out_features: width of y; defaults to D * b (right for square and wide W, required
            for tall W, whose height values and offsets cannot tell).
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
    rt.check_same_device(x=x, values=values, offsets=offsets)
    lead = x.shape[:-1]
    y = _diag_op(rt.flatten_tokens(x), values, offsets, block_size, out_features)
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
        y = diag_matmul(x, self.effective_values(), self.offsets, self.block_size, self.out_features)
        return self.add_bias(y)

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
