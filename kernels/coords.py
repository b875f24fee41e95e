"""Coordinate helpers shared by the layers and the DST rules, all O(nnz), never O(out * in).

Flat coordinates are int64 ``row * in_features + col``.
"""
from __future__ import annotations

import torch


def stored_count(name: str, count: int | None, density: float | None, high: int, high_name: str = "") -> int:
    """How many weights a layer stores: ``count`` if given, else ``density`` of ``high``
    (at least 1); checked to lie in [1, high]. The names are the arguments' in errors."""
    if count is None:
        if density is None:
            raise ValueError(f"give density (in (0, 1]) or {name}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        count = max(1, round(density * high))
    if not 1 <= count <= high:
        bound = f"{high_name}={high}" if high_name else high
        raise ValueError(f"{name} must lie in [1, {bound}], got {count}")
    return count


def sample_distinct(n: int, k: int, *, exclude: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``k`` distinct int64 values drawn uniformly from [0, n) minus ``exclude`` (sorted int64).

    Rejection sampling with replacement plus ``unique``: expected O((k + |exclude|) log) work
    and memory, never O(n). Raises ValueError when fewer than k values are available.
    """
    device = device if device is not None else (exclude.device if exclude is not None else "cpu")
    n_excl = 0 if exclude is None else exclude.numel()
    if k < 0 or k > n - n_excl:
        raise ValueError(f"cannot draw k={k} distinct values from {n - n_excl} available in [0, {n})")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    picked = torch.empty(0, dtype=torch.int64, device=device)
    while picked.numel() < k:
        need = k - picked.numel()
        free = n - n_excl - picked.numel()
        # Over-draw so that one round usually suffices even when most values are taken.
        draw = int(need * max(1.25, 2.0 * (n / max(free, 1)))) + 16
        cand = torch.randint(0, n, (draw,), generator=generator, device="cpu").to(device)
        cand = torch.unique(cand)
        if exclude is not None and n_excl:
            cand = cand[~_isin_sorted(cand, exclude)]
        if picked.numel():
            cand = cand[~_isin_sorted(cand, picked)]
        perm = torch.randperm(cand.numel(), generator=generator, device="cpu").to(device)
        picked = torch.sort(torch.cat([picked, cand[perm[:need]]])).values
    return picked


def _isin_sorted(values: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """Membership of ``values`` in the sorted 1-D ``sorted_set`` by binary search."""
    if sorted_set.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    pos = torch.searchsorted(sorted_set, values).clamp_max(sorted_set.numel() - 1)
    return sorted_set[pos] == values


def isin_sorted(values: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """Public form of the sorted membership test (values and set int64)."""
    return _isin_sorted(values, sorted_set)


def random_rows_of_distinct(n_rows: int, n: int, k: int, *, generator=None,
                            device=None) -> torch.Tensor:
    """[n_rows, k] int32, each row k distinct sorted values drawn uniformly from [0, n).

    O(n_rows * k) time and memory whatever n is: each row draws about 2k values with
    replacement, keeps the distinct ones (a uniform random subset) and picks k of them by
    random keys; rows left short draw again with twice as many. When k > n / 2 the rows are
    ranked random keys over all n columns instead, which is then O(n_rows * k) as well.
    """
    if not 0 < k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    out = torch.empty(n_rows, k, dtype=torch.int64)
    if 2 * k > n:
        step = max(1, (1 << 21) // n)
        for s in range(0, n_rows, step):
            m = min(step, n_rows - s)
            out[s:s + m] = torch.rand(m, n, generator=generator).topk(k, dim=1).indices
    else:
        todo = torch.arange(n_rows)
        draws = 2 * k + 8
        while todo.numel():
            cand = torch.sort(torch.randint(0, n, (todo.numel(), draws), generator=generator), dim=1).values
            dup = torch.zeros_like(cand, dtype=torch.bool)
            dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
            keys = torch.rand(cand.shape, generator=generator).masked_fill_(dup, -1.0)
            pick = keys.topk(k, dim=1)
            ok = (pick.values >= 0).all(dim=1)
            out[todo[ok]] = cand.gather(1, pick.indices)[ok]
            todo, draws = todo[~ok], 2 * draws
    return out.sort(dim=1).values.to(device=device, dtype=torch.int32)


def sort_coords(rows: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Permutation that sorts coordinates by (row, col)."""
    return torch.argsort(rows.long() * n_cols + cols.long())


def index_dtype(nnz: int) -> torch.dtype:
    """int32 CSR indices when they fit (MKL reads them as they are; int64 would cost a copy of
    the layer's int32 coordinates per call), else int64."""
    return torch.int32 if nnz < 2 ** 31 - 1 else torch.int64


def crow_of_sorted(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers of row indices already sorted (no sort: a binary search per row)."""
    bounds = torch.arange(n_rows + 1, device=rows.device, dtype=rows.dtype)
    return torch.searchsorted(rows, bounds).to(index_dtype(rows.numel()))


def csr_structure(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, *,
                  what: str | None = None):
    """(order or None, crow, cols in CSR order) of coordinates in any order: the stored values
    taken in ``order`` (None: as they are) form a CSR with rows sorted and columns sorted
    within a row. Sorted coordinates (the layers keep theirs so) need no argsort. With
    ``what`` (a name for the message) a coordinate stored twice raises ValueError."""
    flat = rows.long() * n_cols + cols.long()
    order = None
    if flat.numel() > 1 and not bool((flat[1:] >= flat[:-1]).all()):
        order = torch.argsort(flat)
        rows, cols, flat = rows[order], cols[order], flat[order]
    if what is not None and flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
        raise ValueError(f"{what} stores one weight twice")
    return order, crow_of_sorted(rows, n_rows), cols
