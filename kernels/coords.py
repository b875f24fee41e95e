"""Coordinate helpers shared by the layers and the DST rules, all O(nnz), never O(out * in).

Flat coordinates are int64 ``row * in_features + col``.
"""
from __future__ import annotations

import torch


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
                            device=None, chunk_elems: int = 1 << 21) -> torch.Tensor:
    """[n_rows, k] int32, each row k distinct sorted values from [0, n).

    Rows are drawn in chunks whose random keys hold at most ``chunk_elems`` elements, so
    memory stays bounded whatever n_rows * n is.
    """
    if not 0 < k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    out = torch.empty(n_rows, k, dtype=torch.int32, device=device)
    step = max(1, chunk_elems // max(n, 1))
    for s in range(0, n_rows, step):
        m = min(step, n_rows - s)
        keys = torch.rand(m, n, generator=generator)
        idx = keys.topk(k, dim=1).indices
        out[s:s + m] = idx.sort(dim=1).values.to(device=device, dtype=torch.int32)
    return out


def sort_coords(rows: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Permutation that sorts coordinates by (row, col)."""
    return torch.argsort(rows.long() * n_cols + cols.long())
