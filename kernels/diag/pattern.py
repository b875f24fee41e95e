"""Index structures of a diagonal pattern, built on the offsets' device once per pattern and
cached on the offsets tensor (rebuilt when a mask update changes it): the kernels' tile lists
and weight-gradient groups, and the block / element coordinates of the SDDMM and CPU paths."""
from __future__ import annotations

import torch

from .. import runtime as rt
from .reference import diag_coords


def diag_tile_list(offsets: torch.Tensor, n_out: int, P: int, D: int, by_out: bool, nb: int):
    """(tile_ptr [n_tiles + 1], entries [E, 2]) int32: tile t's entries are
    entries[tile_ptr[t]:tile_ptr[t + 1]], each (k * D, p0) as in ``diag_tile_list_ref``, in
    ascending p0 (consecutive entries read overlapping windows of the input: L1 reuse).
    Built on the offsets' device once per pattern (cached on the offsets tensor), so the
    kernel's loop over a tile's entries has no branch and no modulo."""
    def build():
        n_tiles = -(-n_out // nb)
        dev = offsets.device
        q0 = torch.arange(n_tiles, device=dev, dtype=torch.int64)[:, None] * nb  # [n_tiles, 1]
        o = offsets.long()[None, :]  # [1, K]
        p0 = (q0 + o) % P if by_out else (q0 - o) % P  # [n_tiles, K]
        order = p0.argsort(dim=1, stable=True)  # ascending input block within each tile
        p0 = p0.gather(1, order)
        if by_out:
            keep = torch.ones_like(p0, dtype=torch.bool)
        else:
            lane = torch.arange(nb, device=dev)
            p = (p0[:, :, None] + lane) % P
            keep = ((p < D) & (q0[:, :, None] + lane < n_out)).any(-1)
        vbase = order * D
        tile_ptr = torch.zeros(n_tiles + 1, device=dev, dtype=torch.int32)
        tile_ptr[1:] = keep.sum(1).cumsum(0).to(torch.int32)
        entries = torch.stack([vbase[keep], p0[keep]], 1).to(torch.int32).contiguous()
        return tile_ptr, entries
    return rt.cached_pattern((offsets,), ("diag tiles", n_out, P, D, by_out, nb), build)


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


def diag_dw_stacks(offsets: torch.Tensor, R: int, C: int, stack: int) -> torch.Tensor:
    """[n_groups, 1 + 2 * stack] int32 of the weight-gradient kernel's tensor-core path: per
    group, the shared block s (the column block d when R >= C, else the row block d), then
    ``stack`` value block indices k * D + d (-1: a padding lane) and the ``stack`` blocks of
    the other operand (row block (d + o_k) mod R, or column block (d + o_k) mod C; 0 for a
    padding lane). Diagonals are taken ``stack`` at a time in offsets' order, groups ordered
    by d (the groups of one shared block are neighbours in the grid). Cached per pattern."""
    def build():
        D, P = min(R, C), max(R, C)
        dev = offsets.device
        K = offsets.numel()
        n_stacks = -(-K // stack)
        lane = torch.arange(n_stacks * stack, device=dev, dtype=torch.int64)  # [S * stack]
        pad = lane >= K
        k = torch.where(pad, 0, lane)
        o = offsets.long()[k]
        d = torch.arange(D, device=dev, dtype=torch.int64)[:, None]  # [D, 1]
        vd = torch.where(pad, -1, k * D + d)  # [D, S * stack]
        other = torch.where(pad, 0, (d + o) % P)
        table = torch.cat([d.expand(D, n_stacks).reshape(-1, 1),
                           vd.reshape(D * n_stacks, stack), other.reshape(D * n_stacks, stack)], 1)
        return table.to(torch.int32).contiguous()
    return rt.cached_pattern((offsets,), ("diag dw stacks", R, C, stack), build)


def diag_dw_bands(offsets: torch.Tensor, R: int, C: int, nb: int) -> torch.Tensor:
    """[n_programs, 3 * nb] int32 of the weight-gradient band kernel (``diag_dw_band_kernel``):
    per program ``nb`` value block indices k * D + d (-1: a padding lane), then their dy row
    blocks and x column blocks (a padding lane repeats lane 0's: no slice of its own). The
    blocks are cut into bands of W consecutive blocks of the operand with P = max(R, C) blocks
    (dy's rows when R >= C), each band's blocks sorted by their block of the other operand
    and taken ``nb`` at a time; W is the power of two that minimises the distinct slices the
    programs read a token (``dw_band_slices``; every block of one diagonal over a band has
    consecutive blocks of both operands, and diagonals whose windows overlap share them).
    Cached per pattern."""
    def build():
        D, P = min(R, C), max(R, C)
        dev = offsets.device
        brow, bcol = (c.long() for c in block_coords(offsets, R, C))  # [K * D], value block order
        d, t = (bcol, brow) if R >= C else (brow, bcol)  # the D-side block d, the P-side block
        vd = torch.arange(d.numel(), device=dev, dtype=torch.int64)
        best = None
        W = 1
        while True:
            band = t // W
            order = torch.argsort(band * (D + 1) * (P + 1) + d * (P + 1) + t, stable=True)
            b_sorted = band[order]
            # rank within the band -> program: bands start at program boundaries
            counts = torch.bincount(b_sorted, minlength=int(band.max()) + 1)
            per = -(-counts // nb)  # programs of each band
            first = torch.cumsum(per, 0) - per
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=dev) - start[b_sorted]
            prog = first[b_sorted] + rank // nb
            lane = rank % nb
            n = int(per.sum())
            table = torch.full((n, 3 * nb), -1, dtype=torch.int64, device=dev)
            rows, cols = brow[order], bcol[order]
            table[prog, lane] = vd[order]
            table[:, nb:2 * nb] = -2
            table[prog, nb + lane] = rows
            table[prog, 2 * nb + lane] = cols
            pad = table[:, nb:2 * nb] == -2
            table[:, nb:2 * nb] = torch.where(pad, table[:, nb:nb + 1], table[:, nb:2 * nb])
            table[:, 2 * nb:] = torch.where(pad, table[:, 2 * nb:2 * nb + 1], table[:, 2 * nb:])
            table = table.to(torch.int32).contiguous()
            got = dw_band_slices(table, nb)
            if best is None or got < best[0]:
                best = (got, table)
            if W >= P:
                break
            W *= 2
        return best[1]
    return rt.cached_pattern((offsets,), ("diag dw bands", R, C, nb), build)


def dw_band_slices(table: torch.Tensor, nb: int) -> int:
    """T x b activation slices a token of the band kernel reads from L2 with ``table``
    (``diag_dw_bands``): per program its distinct dy row blocks plus its distinct x column
    blocks (a program's repeats hit in L1)."""
    rows, cols = table[:, nb:2 * nb].long(), table[:, 2 * nb:].long()
    def distinct(a):
        a = a.sort(dim=1).values
        return int(a.shape[0] + (a[:, 1:] != a[:, :-1]).sum()) if a.numel() else 0
    return distinct(rows) + distinct(cols)


# What the launcher's tile choice and bench/static.py's model take L1 to be: an LRU of 128 KB
# (256 KB an SM on sm_90, shared memory included). A model: only a GPU run can confirm it.
L1_MODEL_BYTES = 128 * 1024


def tile_l1_slices(tile_ptr, entries, n_out: int, P: int, D: int, by_out: bool, nb: int, group: int,
                   capacity: int) -> int:
    """Slices (a token tile x one input block) of the gathered operand that the programs of one
    token tile of ``diag_block_kernel`` read from L2, their loads replayed in the kernel's
    order - a program's ``group`` tiles one after the other, a tile's entries in list order,
    an entry's valid lanes (input block p0 + lane wrapped at P; BY_IN: only p < D) - through
    an LRU of ``capacity`` slices (0: no L1). tile_ptr, entries: ``diag_tile_list``'s, as
    tensors or lists. Per token that is the slices it reads, each of b features."""
    tile_ptr = tile_ptr.tolist() if hasattr(tile_ptr, "tolist") else list(tile_ptr)
    entries = entries.tolist() if hasattr(entries, "tolist") else list(entries)
    n_tiles = len(tile_ptr) - 1
    misses = 0
    for first in range(0, n_tiles, max(1, group)):
        lru: dict[int, None] = {}  # insertion order = recency
        for tile in range(first, min(first + max(1, group), n_tiles)):
            lanes = [n for n in range(nb) if tile * nb + n < n_out]
            for _, p0 in entries[tile_ptr[tile]:tile_ptr[tile + 1]]:
                for n in lanes:
                    p = p0 + n - P if p0 + n >= P else p0 + n
                    if not by_out and p >= D:
                        continue
                    if p in lru:
                        del lru[p]
                    else:
                        misses += 1
                        if capacity and len(lru) >= capacity:
                            del lru[next(iter(lru))]
                    if capacity:
                        lru[p] = None
    return misses


def element_coords(offsets, R: int, C: int, b: int):
    """(rows, cols) of every stored element, aligned with values.reshape(-1) ([K, D, b, b],
    entry [i, j] of a block = output b*row + i, input b*col + j); cached per offsets."""
    def build():
        brow, bcol = (t.reshape(-1, 1, 1).long() for t in diag_coords(offsets, R, C))
        i = torch.arange(b, device=offsets.device)
        rows = (brow * b + i[:, None]).expand(-1, b, b).reshape(-1).to(torch.int32)
        cols = (bcol * b + i[None, :]).expand(-1, b, b).reshape(-1).to(torch.int32)
        return rows, cols
    return rt.cached_pattern((offsets,), ("diag elements", R, C, b), build)


# The permutations of the value axes [K, D, b, b] that put the element coordinates in the order of
# their separable side (rows d * b + i when R < C, columns d * b + j when R >= C), and back.
_BY_ROW, _FROM_ROW = (1, 2, 0, 3), (2, 0, 1, 3)
_BY_COL, _FROM_COL = (1, 3, 0, 2), (2, 0, 3, 1)


def element_coords_sorted(offsets, R: int, C: int, b: int):
    """(first, second, by_row, back): the element coordinates as element_coords, permuted so that
    ``first`` never decreases - rows when ``by_row`` (R < C: block row d of every diagonal), else
    columns (R >= C), ``second`` the other side - and ``back``, the axis permutation that turns
    values in that order (viewed [D, b, K, b]) into [K, D, b, b]. Cached per offsets."""
    def build():
        rows, cols = element_coords(offsets, R, C, b)
        K, D = offsets.numel(), min(R, C)
        by_row = R < C
        axes = _BY_ROW if by_row else _BY_COL
        order = [t.reshape(K, D, b, b).permute(*axes).reshape(-1).contiguous() for t in (rows, cols)]
        first, second = order if by_row else order[::-1]
        return first, second, by_row, _FROM_ROW if by_row else _FROM_COL
    return rt.cached_pattern((offsets,), ("diag elements sorted", R, C, b), build)


def block_coords(offsets, R: int, C: int):
    """Block (row, col) of every stored block, flat [K * D] int32 each; cached per offsets."""
    return rt.cached_pattern((offsets,), ("diag coords", R, C),
                             lambda: tuple(t.reshape(-1) for t in diag_coords(offsets, R, C)))
