"""The spec of the wrap-around (block-)diagonal format: geometry, block coordinates, the dense
weight, the product through it (tests compare every kernel to it in fp64), the tile lists as
plain loops, and the argument checks every path shares. The format (R, C, D, P, offsets,
values) is described in kernels/diag/__init__.py.
"""
from __future__ import annotations

import torch

from .. import runtime as rt


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
    blocks, as (k * D, p0) with p0 the input block that q0 reads, in ascending p0 (ties: in
    order of k)."""
    tiles = []
    for tile in range(-(-n_out // nb)):
        q0, row = tile * nb, []
        for k, o in enumerate(offsets.tolist()):
            p0 = (q0 + o) % P if by_out else (q0 - o) % P
            if by_out or any((q - o) % P < D for q in range(q0, min(q0 + nb, n_out))):
                row.append((k * D, p0))
        tiles.append(sorted(row, key=lambda entry: entry[1]))
    return tiles


def check_args(x2, values, offsets, block_size, out_features, bias=None):
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
    if rt.has_repeats(offsets):
        raise ValueError("offsets must be distinct diagonals; found a repeat")
    return R, C, D, P
