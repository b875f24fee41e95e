"""Where grow candidates come from and how they are scored: never through a dense [out, in]
gradient.

Coordinates are flat int64 ``row * in_features + col``; ``active`` is the sorted flat list
of a layer's stored weights. dy: [T, out] and x: [T, in] are the output gradient and the
input of the layer at the update step (captured by the Sparsifier).

- ``exact``: every entry is looked at, in column bands of bounded width: the band's gradient
  |dy^T x[:, band]| ([out, w], fp32, a small GEMM: every entry of the band is a candidate, so
  this is the SDDMM of the band at GEMM speed) is merged into a running top-n (per layer) or
  top-m (per row) and dropped. Memory O(n + out * (m + w)) with out * w about nnz; compute
  O(T out in), which is what looking at every entry costs.
- ``uniform`` / ``grabo`` / ``graest``: GSE's samplers draw distinct inactive coordinates,
  scored by ``kernels.sddmm`` at those coordinates only. Memory and time O(candidates + nnz).
  GraBo draws (r, c) with probability proportional to sum_t |dy[t, r]| * sum_t |x[t, c]|;
  GraEst to |sum_t s_t dy[t, r]| * |sum_t s_t x[t, c]| with random signs s (an AMS sketch),
  one per row of the global batch under data parallelism.
"""
from __future__ import annotations

import torch

from alwayssparse.kernels import sddmm
from alwayssparse.kernels.coords import isin_sorted, sample_distinct

from .config import GROW_MODES, check_choice

SAMPLERS = ("uniform", "grabo", "graest")
# Elements of one band of the exact scan ([rows, w] fp32): about the layer's nnz, so that the
# scan's memory is O(nnz), within [2^16, 2^22] (16 MiB) so that small layers are not scanned
# in slivers and large ones not in huge slabs; a band never spans more than half the columns.
MIN_BAND_ELEMS, MAX_BAND_ELEMS = 1 << 16, 1 << 22
# Rounds of weighted rejection sampling before the rest is drawn uniformly.
_WEIGHTED_ROUNDS = 8


def check_grow(grow: str) -> None:
    check_choice("grow", grow, GROW_MODES)


def check_sampler(sampler: str) -> None:
    check_choice("sampler", sampler, SAMPLERS)


def reduce_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes of a distributed run (in place), so that every rank scores
    the global batch and takes the same decisions; a no-op in a single process. Every score
    that depends on the local batch passes through here before any selection."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def global_rows(n_local: int, device) -> tuple[int, int]:
    """(first row of this rank's batch in the global batch, rows of the global batch): ranks'
    batches concatenated in rank order; (0, n_local) in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return 0, n_local
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device))
    sizes = [int(t) for t in sizes]
    rank = torch.distributed.get_rank()
    return sum(sizes[:rank]), sum(sizes)


def gradient_scores(dy: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, in_features: int) -> torch.Tensor:
    """|dL/dW| at the flat coordinates (fp32 [n]), by SDDMM: sum_t dy[t, r] x[t, c]."""
    rows = torch.div(flat, in_features, rounding_mode="floor").to(torch.int32)
    cols = (flat % in_features).to(torch.int32)
    return reduce_across_ranks(sddmm(dy, x, rows, cols).float()).abs()


def sampling_weights(sampler: str, dy: torch.Tensor, x: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row weights [out], col weights [in]) on the CPU for GraBo / GraEst, None for uniform."""
    check_sampler(sampler)
    if sampler == "uniform":
        return None
    if sampler == "grabo":
        row_w = reduce_across_ranks(dy.float().abs().sum(0))
        col_w = reduce_across_ranks(x.float().abs().sum(0))
    else:
        # One sign per row of the global batch: every rank draws the same global vector (the
        # generator is seeded alike on every rank) and takes its own rows, so the summed
        # sketch is that of the concatenated batch, not sum_r (s^T dy_r) with shared s.
        start, total = global_rows(dy.shape[0], dy.device)
        signs = torch.randint(0, 2, (total,), generator=generator).float().mul_(2).sub_(1)
        signs = signs[start:start + dy.shape[0]].to(dy.device)
        row_w = reduce_across_ranks(signs @ dy.float()).abs()
        col_w = reduce_across_ranks(signs @ x.float()).abs()
    return row_w.double().cpu(), col_w.double().cpu()


def sample_candidates(sampler: str, n: int, n_rows: int, in_features: int, active: torch.Tensor,
                      dy: torch.Tensor | None, x: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct inactive flat coordinates (sorted int64), drawn by ``sampler``."""
    weights = None if sampler == "uniform" else sampling_weights(sampler, dy, x, generator)
    total = n_rows * in_features
    if weights is None:
        return sample_distinct(total, n, exclude=active, generator=generator, device=active.device)
    return sample_weighted_distinct(weights[0], weights[1], n, active, generator)


def sample_weighted_distinct(row_w: torch.Tensor, col_w: torch.Tensor, n: int, exclude: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct flat coordinates outside ``exclude`` (sorted), drawn with probability
    proportional to row_w[r] * col_w[c] (with replacement, repeats removed).

    After a few rounds the remainder is drawn uniformly, so the count is always exact even
    when the weights concentrate on fewer than n free entries.
    """
    n_rows, in_features = row_w.numel(), col_w.numel()
    device = exclude.device
    picked = torch.empty(0, dtype=torch.int64, device=device)
    usable = bool(row_w.sum() > 0) and bool(col_w.sum() > 0)
    for _ in range(_WEIGHTED_ROUNDS if usable else 0):
        need = n - picked.numel()
        if need == 0:
            break
        draw = 2 * need + 16
        r = torch.multinomial(row_w, draw, replacement=True, generator=generator)
        c = torch.multinomial(col_w, draw, replacement=True, generator=generator)
        cand = torch.unique(r * in_features + c).to(device)
        cand = cand[~isin_sorted(cand, exclude)]
        cand = cand[~isin_sorted(cand, picked)]
        # unique() sorts: take a random subset, not the smallest coordinates.
        perm = torch.randperm(cand.numel(), generator=generator).to(device)
        picked = torch.sort(torch.cat([picked, cand[perm[:need]]])).values
    need = n - picked.numel()
    if need:
        taken = torch.sort(torch.cat([exclude, picked])).values
        rest = sample_distinct(n_rows * in_features, need, exclude=taken, generator=generator, device=device)
        picked = torch.sort(torch.cat([picked, rest])).values
    return picked


def sample_in_rows(rows: torch.Tensor, counts: torch.Tensor, in_features: int, exclude: torch.Tensor,
                   col_w: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """For each output row rows[i] (distinct), counts[i] distinct columns whose (row, col) is
    not in ``exclude`` (sorted flat); columns drawn proportional to ``col_w`` (uniform when
    None). Returns sorted flat coordinates; the caller keeps counts[i] <= free entries of the
    row. Rows still short after a few rounds enumerate their free columns (O(in) per row).
    """
    device = exclude.device
    order = torch.sort(rows.long().to(device))
    rows, counts = order.values, counts.long().to(device)[order.indices]
    pieces: list[torch.Tensor] = []  # each sorted; together distinct
    have = torch.zeros_like(counts)
    for _ in range(_WEIGHTED_ROUNDS):
        short = counts - have
        todo = short > 0
        if not bool(todo.any()):
            break
        draw = 2 * short[todo] + 4
        r = rows[todo].repeat_interleave(draw)
        if col_w is None:
            c = torch.randint(0, in_features, (r.numel(),), generator=generator).to(device)
        else:
            c = torch.multinomial(col_w, r.numel(), replacement=True, generator=generator).to(device)
        cand = torch.unique(r * in_features + c)
        cand = cand[~isin_sorted(cand, exclude)]
        for piece in pieces:
            cand = cand[~isin_sorted(cand, piece)]
        chosen = torch.sort(_random_per_row(cand, rows, short, in_features, generator)).values
        pieces.append(chosen)
        have += _count_per_row(chosen, rows, in_features)
    short = counts - have
    for i in torch.nonzero(short > 0).flatten().tolist():
        flat = int(rows[i]) * in_features + torch.arange(in_features, device=device)
        taken = isin_sorted(flat, exclude)
        for piece in pieces:
            taken |= isin_sorted(flat, piece)
        free = flat[~taken]
        perm = torch.randperm(free.numel(), generator=generator).to(device)
        pieces.append(torch.sort(free[perm[:int(short[i])]]).values)
    if not pieces:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.sort(torch.cat(pieces)).values


def _count_per_row(flat: torch.Tensor, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """How many of the sorted flat coordinates fall in each of ``rows`` (sorted, distinct)."""
    r = torch.div(flat, in_features, rounding_mode="floor")
    lo = torch.searchsorted(r, rows, right=False)
    hi = torch.searchsorted(r, rows, right=True)
    return hi - lo


def _random_per_row(cand: torch.Tensor, rows: torch.Tensor, quota: torch.Tensor, in_features: int,
                    generator: torch.Generator) -> torch.Tensor:
    """At most quota[i] of the sorted candidates in row rows[i] (sorted), chosen at random."""
    if cand.numel() == 0:
        return cand
    r = torch.div(cand, in_features, rounding_mode="floor")
    limit = quota.clamp_min(0)[torch.searchsorted(rows, r)]
    # Random priority within each row: sort by (row, random key) and keep the first `limit`.
    key = torch.rand(cand.numel(), generator=generator, dtype=torch.float64).to(cand.device)
    perm = torch.argsort(r.double() * 2 + key)
    r_sorted = r[perm]
    first = torch.searchsorted(r_sorted, r_sorted, right=False)
    rank = torch.arange(cand.numel(), device=cand.device) - first
    keep = rank < limit[perm]
    return cand[perm[keep]]


def band_elems(nnz: int) -> int:
    """Elements of one band of the exact scan for a layer with ``nnz`` weights."""
    return min(MAX_BAND_ELEMS, max(MIN_BAND_ELEMS, nnz))


def band_width(n_rows: int, in_features: int, elems: int) -> int:
    """Columns per band: ``elems`` / rows, at most half the columns (never the whole matrix)."""
    return max(1, min((in_features + 1) // 2, elems // max(n_rows, 1)))


def _gradient_bands(dy: torch.Tensor, x: torch.Tensor, active: torch.Tensor | None, elems: int):
    """Yield (c0, |dy^T x[:, c0:c1]|) band by band ([rows, w] fp32); entries in ``active``
    (flat over dy's rows) are -inf so that they are never chosen."""
    n_rows, in_features = dy.shape[1], x.shape[1]
    w = band_width(n_rows, in_features, elems)
    dyf = dy.float()
    if active is not None and active.numel():
        a_cols = active % in_features
        order = torch.argsort(a_cols, stable=True)
        a_cols = a_cols[order]
        a_rows = torch.div(active, in_features, rounding_mode="floor")[order]
        bounds = torch.searchsorted(a_cols, torch.arange(0, in_features + w, w, device=active.device)).tolist()
    else:
        bounds = None
    for b, c0 in enumerate(range(0, in_features, w)):
        c1 = min(in_features, c0 + w)
        g = reduce_across_ranks(dyf.t() @ x[:, c0:c1].float()).abs_()  # [rows, w]
        if bounds is not None and bounds[b + 1] > bounds[b]:
            s, e = bounds[b], bounds[b + 1]
            g[a_rows[s:e], a_cols[s:e] - c0] = float("-inf")
        yield c0, g


def exact_top(dy: torch.Tensor, x: torch.Tensor, n: int, active: torch.Tensor | None,
              elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest |gradient| entries outside ``active`` (all entries when None):
    (scores fp32 [n], flat int64 [n]), scanned band by band.

    A band contributes only its entries above the n-th best known so far; survivors pile
    up and are cut back to n once they exceed 2n, so the merge is amortised O(band).
    """
    in_features = x.shape[1]
    best_v = torch.empty(0, device=dy.device)
    best_i = torch.empty(0, dtype=torch.int64, device=dy.device)
    if n == 0:
        return best_v, best_i
    vals, flats, held = [], [], 0
    floor = torch.tensor(float("-inf"), device=dy.device)
    for c0, g in _gradient_bands(dy, x, active, elems):
        w = g.shape[1]
        sel = torch.nonzero(g.reshape(-1) > floor).flatten()
        if sel.numel() == 0:
            continue
        vals.append(g.reshape(-1)[sel])
        flats.append(torch.div(sel, w, rounding_mode="floor") * in_features + c0 + sel % w)
        held += sel.numel()
        if held > 2 * n:
            best_v, best_i = _cut(vals, flats, n)
            vals, flats, held, floor = [best_v], [best_i], n, best_v.min()
    best_v, best_i = _cut(vals, flats, n)
    if best_v.numel() < n:
        raise ValueError(f"asked for the top {n} entries but only {best_v.numel()} are eligible")
    return best_v, best_i


def _cut(vals: list, flats: list, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = torch.cat(vals), torch.cat(flats)
    if v.numel() <= n:
        return v, i
    top = torch.topk(v, n, sorted=False)
    return top.values, i[top.indices]


def exact_top_per_row(dy: torch.Tensor, x: torch.Tensor, m: int, active: torch.Tensor | None,
                      elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of dy, its m largest |gradient| entries outside ``active``:
    (scores fp32 [rows, m] descending, cols int64 [rows, m]); -inf / -1 where a row has fewer
    than m eligible entries."""
    n_rows = dy.shape[1]
    best_v = torch.full((n_rows, m), float("-inf"), device=dy.device)
    best_c = torch.full((n_rows, m), -1, dtype=torch.int64, device=dy.device)
    if m == 0:
        return best_v, best_c
    # Bands at least 3m wide: the per-band topk over m + w columns then costs O(w) per column.
    elems = max(elems, 3 * m * n_rows)
    for c0, g in _gradient_bands(dy, x, active, elems):
        top = torch.topk(torch.cat([best_v, g], dim=1), m, dim=1)
        # An index below m is a previous best, above it column c0 + index - m of this band.
        idx = top.indices
        best_c = torch.where(idx < m, best_c.gather(1, idx.clamp_max(m - 1)), idx - m + c0)
        best_v = top.values
    best_c[torch.isinf(best_v)] = -1
    return best_v, best_c
