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

The files, top to bottom (STYLE.md point 2):
    reference.py  geometry, coordinates, the dense spec, tile lists as loops, argument checks
    pattern.py    the index structures cached per pattern (tile lists, dW groups, coordinates)
    kernel.py     the Triton kernels and their launchers (diag_fwd, diag_dx, diag_dw, GELU epilogues)
    cpu.py        the torch path (MKL CSR / batched block products, SDDMM weight gradient)
    ops.py        custom ops, autograd, autocast, and the public diag_matmul
    layer.py      DiagLinear and DynaDiag's per-diagonal gate

Example:
    y = diag_matmul(x, values, offsets, block_size=16)                    # square or wide
    y = diag_matmul(x, values, offsets, block_size=16, out_features=3072) # tall
"""
from .reference import (check_args, diag_coords, diag_geometry, diag_matmul_ref, diag_tile_list_ref,  # noqa: F401
                        diag_to_dense)
from .pattern import block_coords, diag_dw_groups, diag_tile_list, element_coords  # noqa: F401
from .kernel import (EPILOGUE_ACT, EPILOGUE_GELU, EPILOGUE_GELU_GRAD, EPILOGUE_NONE,  # noqa: F401
                     diag_block_kernel, diag_dw, diag_dw_band_kernel, diag_dw_kernel, diag_dx, diag_dx_gelu_grad,
                     diag_elem_kernel, diag_fwd, diag_fwd_act, diag_fwd_gelu, tile_entry)
from .kernel import _INT32_MAX, _block_default, _dw_default, _launch, _tile_blocks  # noqa: F401
from .cpu import diag_dw_torch, diag_dx_torch, diag_fwd_torch  # noqa: F401
from .cpu import (_CPU_ELEMENT_MAX_BLOCK, _TORCH_CHUNK_ELEMS, _acc, _diag_csr_product,  # noqa: F401
                  _diag_product_torch, _elementwise_on_cpu)
from .ops import (diag_dw_op, diag_dx_gelu_grad_op, diag_dx_op, diag_matmul, diag_matmul_gelu_op,  # noqa: F401
                  diag_matmul_op, diag_weight_grad)
from .layer import DiagLinear, diagonals_for_density  # noqa: F401

# The names these had when kernels/diag.py was one file (tests and kernels/__init__ import some).
_diag_block_kernel, _diag_elem_kernel, _diag_dw_kernel = diag_block_kernel, diag_elem_kernel, diag_dw_kernel
_check, _element_coords, _block_coords = check_args, element_coords, block_coords
_diag_op, _diag_dx_op, _diag_dw_op, _diag_dw = diag_matmul_op, diag_dx_op, diag_dw_op, diag_weight_grad
_diag_gelu_op, _diag_dx_gelu_grad_op = diag_matmul_gelu_op, diag_dx_gelu_grad_op
