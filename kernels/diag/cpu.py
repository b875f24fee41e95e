"""The CPU path of the diagonal format (no Triton): for b a multiple of 8 the native library's
block products (kernels.cpu.bsr_matmul for the forward and the input gradient, sddmm_blocks
for the weight gradient, through kernels.sddmm); otherwise CSR products of the diagonals'
elements for small blocks (native or MKL), batched b x b block products (torch) for large
ones, and the weight gradient through the SDDMM's torch path."""
from __future__ import annotations

import torch

from .. import cpu as cpu_native
from .. import runtime as rt
from ..coords import csr_structure
from ..sddmm import sddmm
from ..sparse import csr_matmul
from .pattern import block_coords, element_coords, element_coords_sorted
from .reference import check_args, diag_geometry


_TORCH_CHUNK_ELEMS = 1 << 22


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


def _diag_csr_product(a, values, offsets, R, C, b: int, transpose: bool):
    """CPU, b <= _CPU_ELEMENT_MAX_BLOCK: the K * D * b * b elements as an MKL CSR product
    (measured 10-20x faster than the gathered einsum at b = 1). ``transpose``: multiply by W^T
    (the input grad). R, C count blocks."""
    n_r, n_c = (C * b, R * b) if transpose else (R * b, C * b)

    def build():  # the CSR structure of the diagonals' elements, once per pattern
        rows, cols = element_coords(offsets, R, C, b)
        return csr_structure(*((cols, rows) if transpose else (rows, cols)), n_r, n_c)

    order, crow, csr_cols = rt.cached_pattern((offsets,), ("diag", R, C, b, transpose), build)
    vals = values.reshape(-1) if order is None else values.reshape(-1).index_select(0, order)
    return csr_matmul(crow, csr_cols, vals, n_r, n_c, a.t()).t().contiguous()


def _elementwise_on_cpu(block_size: int, tokens: int, offsets) -> bool:
    return block_size <= _CPU_ELEMENT_MAX_BLOCK and tokens > 4 and offsets.numel() > 0


# b = 16 and 64, 3072 -> 768 at 90%, 256 tokens, fp32, 1 thread, the EPYC: forward / input
# gradient / weight gradient 2.2 / 2.0 / 1.8 ms as blocks (kernels.cpu.bsr_matmul, sddmm_blocks)
# against 2.9 / 2.5 / 4.6 as the CSR of the elements (kernels.cpu's element products); b = 64
# 1.8 / 1.8 / 1.6 against the same 2.7 / 2.5 / 4.6 (bench/cpu_train.py times the layer's step).
def _native_blocks(a, values, offsets, R: int, C: int, b: int, transpose: bool, bias=None):
    """a @ W^T (``transpose``: a @ W, the input gradient) by the library's block product, the
    value blocks read in place; None where it does not apply (b not a multiple of 8, a dtype
    other than fp32 / bf16, no library, tracing). R, C count blocks."""
    if not (cpu_native.block_products(b) and offsets.numel() > 0 and a.shape[0] > 0):
        return None
    n_r, n_c = (C, R) if transpose else (R, C)

    def build():  # the BSR of W (or W^T) over the value blocks, once per pattern
        brow, bcol = block_coords(offsets, R, C)
        order, crow, bcols = csr_structure(*((bcol, brow) if transpose else (brow, bcol)), n_r, n_c)
        bidx = torch.arange(brow.numel(), dtype=torch.int32) if order is None else order.to(torch.int32)
        return crow, bcols, bidx

    crow, bcols, bidx = rt.cached_pattern((offsets,), ("diag blocks", R, C, transpose), build)
    return cpu_native.bsr_matmul(crow, bcols, values.reshape(-1, b, b), n_r, n_c, a, bias, bidx, transpose)


def diag_fwd_torch(x2, values, offsets, block_size: int, out_features: int, bias=None) -> torch.Tensor:
    R, C, D, P = check_args(x2, values, offsets, block_size, out_features, bias)
    y = _native_blocks(x2, values, offsets, R, C, block_size, transpose=False, bias=bias)
    if y is not None:
        return y
    if _elementwise_on_cpu(block_size, x2.shape[0], offsets):
        y = _diag_csr_product(x2, values, offsets, R, C, block_size, transpose=False)
    else:
        y = _diag_product_torch(x2, values, offsets, C, R, block_size, gather=R < C, transpose_w=True)
    return y if bias is None else y + bias


def diag_dx_torch(dy, values, offsets, block_size: int, in_features: int) -> torch.Tensor:
    R, C = dy.shape[1] // block_size, in_features // block_size
    dx = _native_blocks(dy, values, offsets, R, C, block_size, transpose=True)
    if dx is not None:
        return dx
    if _elementwise_on_cpu(block_size, dy.shape[0], offsets):
        return _diag_csr_product(dy, values, offsets, R, C, block_size, transpose=True)
    return _diag_product_torch(dy, values, offsets, R, C, block_size, gather=R >= C, transpose_w=False)


def diag_dw_torch(dy, x2, offsets, block_size: int) -> torch.Tensor:
    """CPU path of the weight gradient, through the SDDMM's CPU path at the diagonals' (cached)
    coordinates: blocks (the library's sddmm_blocks for b a multiple of 8, else torch's
    batched products), or element dots for b <= _CPU_ELEMENT_MAX_BLOCK without the library's
    block products."""
    b = block_size
    R, C, D, P = diag_geometry(x2.shape[1], dy.shape[1], b)
    shape = (offsets.numel(), D, b, b)
    if _elementwise_on_cpu(b, dy.shape[0], offsets) and not cpu_native.block_products(b):
        if b == 1 and _sorted_elements_pay(dy, x2):
            first, second, by_row, back = element_coords_sorted(offsets, R, C, b)
            g = sddmm(dy, x2, first, second, 1) if by_row else sddmm(x2, dy, first, second, 1)
            return g.to(dy.dtype).reshape(D, b, offsets.numel(), b).permute(*back).contiguous()
        rows, cols = element_coords(offsets, R, C, b)
        return sddmm(dy, x2, rows, cols, 1).reshape(shape)
    return sddmm(dy, x2, *block_coords(offsets, R, C), b).reshape(shape)


# Element diagonals (b = 1) from this many tokens take their weight gradient with the coordinates
# sorted by their separable side (the library's sddmm_rows, a dy or x row in registers) and
# permute the result back to [K, D, 1, 1]. Linear 3072 -> 768 and 768 -> 3072 at 90%, one
# thread, the EPYC, against the element order: 1.09-1.10x at 32 tokens, 1.25-1.30x at 64,
# 1.46-1.52x at 256 (the permuting copy ~0.16 ms). b = 4 gained only at 256 tokens (1.07-1.19x;
# 0.62-0.86x at 32): its element order already reads four weights of a row in turn.
_SORTED_ELEMENTS_MIN_TOKENS = 32
# bf16 dy and x with the AVX-512-BF16 SDDMM (sddmm_rows_dpbf16 sorted, sddmm_tiles_dpbf16 in
# diagonal order), the EPYC Zen 4, the same layers: sorted 0.84-0.89x at 32 tokens, 1.16-1.25x
# at 64, 1.33-1.46x at 256.
_SORTED_ELEMENTS_MIN_TOKENS_DPBF16 = 64


def _sorted_elements_pay(dy, x2) -> bool:
    floats = (torch.float32, torch.bfloat16)
    if cpu_native.lib() is None or dy.dtype not in floats or x2.dtype not in floats:
        return False
    dpbf16 = dy.dtype == x2.dtype == torch.bfloat16 and "sddmm_dpbf16" in cpu_native.features()
    return dy.shape[0] >= (_SORTED_ELEMENTS_MIN_TOKENS_DPBF16 if dpbf16 else _SORTED_ELEMENTS_MIN_TOKENS)
