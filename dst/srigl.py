"""SRigL (arXiv 2305.02299) on FanInLinear: constant fan-in k per active neuron, neuron ablation.

One update of a layer with nnz budget N (its nnz when the Sparsifier starts), current
fan-in k and drop fraction a:
1. n_prune = floor(a * nnz), n_keep = nnz - n_prune.
2. Salient weights: the layer's top n_keep by |w| (active weights) and its top n_prune by
   |grad|: over every entry with grow="exact"; with a sampler, over the active weights plus
   ceil(gamma * N / out) sampled free entries of every neuron (so under sampling an ablated
   neuron comes back only if enough of its sampled entries are salient).
3. Ablation (the authors' rule, condensed-sparsity's `_get_neurons_to_ablate`): the threshold
   is fixed for the run, thr = max(1, floor(gamma_sal * k0)) with k0 = floor(N / out), the
   fan-in at the target sparsity before any ablation (the current k grows as neurons go, and a
   threshold on it makes each update ablate more until the layer collapses to its minimum).
   With n_min = ceil(N / in) (the fewest neurons that can hold N with k <= in), thr is lowered
   to the salient count of the neuron ranked n_min (0-based, by descending count) when that is
   below thr, so at least n_min + 1 neurons and every tie at that rank survive. Neurons with
   fewer than thr salient weights are ablated. Ablation is recomputed at every update, so an
   ablated neuron can come back. A head layer, or ablation=False, keeps every neuron.
4. k' = floor(N / active neurons).
5. Drop: the weights kept are the top n_keep by |w| among the surviving neurons' weights only,
   so the kept slots of an ablated neuron go to the next largest weights of the survivors (as
   the authors' code does, by scoring ablated rows below every weight); a row keeps at most k'
   of them, its largest (the public code truncates rows in index order; this keeps the largest).
6. Grow: each active neuron is filled back to exactly k' with its highest-|grad| entries
   among those inactive before the update (drop and grow disjoint), grown at 0.
"""
from __future__ import annotations

import math

import torch

from alwayssparse.kernels import FanInLinear

from .apply import apply_mask_update
from .candidates import band_elems, exact_top, exact_top_per_row, sample_in_rows, sampling_weights
from .scores import UpdateContext, highest


def surviving_neurons(salience: torch.Tensor, gamma_sal: float, budget: int, in_features: int) -> torch.Tensor:
    """Boolean [out]: the neurons that survive ablation (module docstring, step 3), from each
    neuron's salient-weight count and the layer's nnz budget."""
    n_out = salience.numel()
    n_min = math.ceil(budget / in_features)
    if n_min >= n_out:
        return torch.ones_like(salience, dtype=torch.bool)
    threshold = max(1, math.floor(gamma_sal * (budget // n_out)))
    ranked = torch.sort(salience, descending=True).values
    threshold = min(threshold, int(ranked[n_min]))
    return salience >= threshold


def _rank_in_row(score: torch.Tensor) -> torch.Tensor:
    """[n, k] rank of each entry within its row by descending score (0 = largest)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return rank


def _top_per_row_of(flat: torch.Tensor, score: torch.Tensor, rows: torch.Tensor, need: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """From candidates (flat, score), the best need[i] of each row rows[i] (sorted, distinct)."""
    r = torch.div(flat, in_features, rounding_mode="floor")
    pos = torch.searchsorted(rows, r).clamp_max(max(rows.numel() - 1, 0))
    inside = rows.numel() > 0
    member = (rows[pos] == r) if inside else torch.zeros_like(r, dtype=torch.bool)
    flat, score, pos = flat[member], score[member], pos[member]
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(pos[order], stable=True).indices]  # by row, best first within a row
    pos_sorted = pos[order]
    first = torch.searchsorted(pos_sorted, pos_sorted)
    rank = torch.arange(order.numel(), device=flat.device) - first
    return flat[order[rank < need[pos_sorted]]]


def update_srigl(rule, layer: FanInLinear, ctx: UpdateContext, name: str) -> dict:
    """One SRigL mask update of ``layer`` (module docstring); returns its stats."""
    cfg, gen = ctx.cfg, ctx.generator
    out_f, in_f = layer.out_features, layer.in_features
    budget = ctx.budgets[name]
    dy, x = ctx.capture(name)
    device = layer.values.device
    n_old, k = layer.values.shape
    nnz = n_old * k
    old_rows = layer.rows.long()
    old_cols = layer.indices.long()
    old_flat = (old_rows[:, None] * in_f + old_cols).reshape(-1)  # storage order
    active = torch.sort(old_flat).values
    n_prune = min(nnz, int(math.floor(ctx.drop_fraction * nnz)))
    w_score = rule.drop_score(layer)
    keep_pos = highest(w_score, nnz - n_prune)

    # Salience by |grad|: the layer's top n_prune over all entries, or over active + samples.
    col_w = None
    if cfg.grow == "exact":
        cand = cand_score = None
        _, grad_top = exact_top(dy, x, n_prune, None, band_elems(budget))
    else:
        weights = sampling_weights(cfg.grow, dy, x, gen)
        col_w = None if weights is None else weights[1]
        # gamma * budget candidates in all, the same number in every row, active or ablated.
        count = torch.zeros(out_f, dtype=torch.int64, device=device)
        count[old_rows] = k
        per_row = (in_f - count).clamp_max(math.ceil(cfg.gamma * budget / out_f))
        cand = sample_in_rows(torch.arange(out_f, device=device), per_row, in_f, active, col_w, gen)
        cand_score = rule.grow_score(cand, layer, ctx, name)
        pool = torch.cat([old_flat, cand])
        pool_score = torch.cat([rule.grow_score(old_flat, layer, ctx, name), cand_score])
        grad_top = pool[highest(pool_score, n_prune)]
    salient = torch.unique(torch.cat([old_flat[keep_pos], grad_top]))
    salience = torch.bincount(torch.div(salient, in_f, rounding_mode="floor"), minlength=out_f)

    if name in ctx.heads or not cfg.ablation:
        alive = torch.ones(out_f, dtype=torch.bool, device=device)
    else:
        alive = surviving_neurons(salience, cfg.gamma_sal, budget, in_f)
    new_rows = torch.nonzero(alive).flatten()  # sorted
    n_new = new_rows.numel()
    k_new = min(in_f, budget // n_new)

    # Drop: the top n_keep by |w| among the survivors' weights, at most k_new a row, and at
    # least enough that k_new fits in the entries a row had free (grow never re-uses a
    # just-dropped entry).
    alive_entry = alive[old_rows].repeat_interleave(k)  # [nnz], storage order
    n_keep = min(nnz - n_prune, int(alive_entry.sum()))
    kept_mask = torch.zeros(nnz, dtype=torch.bool, device=device)
    kept_mask[highest(torch.where(alive_entry, w_score, -math.inf), n_keep)] = True
    q = kept_mask.reshape(n_old, k).sum(1).clamp(min=max(0, k_new - (in_f - k)), max=k_new)
    q = torch.where(alive[old_rows], q, torch.zeros_like(q))
    keep_entry = _rank_in_row(w_score.reshape(n_old, k)) < q[:, None]  # [n_old, k]

    # Grow: fill each active neuron to k_new.
    have = torch.zeros(out_f, dtype=torch.int64, device=device)
    have[old_rows] = q
    need = k_new - have[new_rows]  # [n_new]
    grow_flat = _grow(dy, x, new_rows, need, active, cand, cand_score, col_w, in_f, gen, cfg.grow, budget)

    kept_src = torch.nonzero(keep_entry.reshape(-1)).flatten()
    new_flat = torch.cat([old_flat[kept_src], grow_flat])
    src = torch.cat([kept_src, torch.full((grow_flat.numel(),), -1, dtype=torch.int64, device=device)])
    order = torch.argsort(new_flat)
    new_flat, src = new_flat[order], src[order]
    rows_of = torch.div(new_flat, in_f, rounding_mode="floor")
    counts = torch.bincount(torch.searchsorted(new_rows, rows_of), minlength=n_new)
    if not bool((counts == k_new).all()):
        raise AssertionError(f"SRigL update of {name!r} left rows with {counts.unique().tolist()} weights, "
                             f"not exactly k={k_new}")
    stats = apply_mask_update(layer, ctx.optimizer, src,
                              indices=(new_flat % in_f).reshape(n_new, k_new).to(torch.int32),
                              rows=new_rows.to(torch.int32))
    stats.update(density=layer.density(), k=k_new, active_neurons=n_new, ablated=out_f - n_new)
    return stats


def _grow(dy, x, new_rows, need, active, cand, cand_score, col_w, in_f, gen, grow, budget) -> torch.Tensor:
    """need[i] entries of row new_rows[i], inactive before the update, by highest |grad|."""
    device = active.device
    todo = need > 0
    if not bool(todo.any()):
        return torch.empty(0, dtype=torch.int64, device=device)
    rows, want = new_rows[todo], need[todo]
    if grow == "exact":
        # Second pass over the rows that grow only: memory O(rows * (max need + band)).
        r_act = torch.div(active, in_f, rounding_mode="floor")
        pos = torch.searchsorted(rows, r_act).clamp_max(rows.numel() - 1)
        member = rows[pos] == r_act
        sub_active = torch.sort(pos[member] * in_f + active[member] % in_f).values
        _, cols = exact_top_per_row(dy[:, rows], x, int(want.max()), sub_active, band_elems(budget))
        take = torch.arange(cols.shape[1], device=device)[None, :] < want[:, None]
        return torch.sort((rows[:, None] * in_f + cols)[take]).values
    got = _top_per_row_of(cand, cand_score, rows, want, in_f)
    counts = torch.zeros(rows.numel(), dtype=torch.int64, device=device)
    if got.numel():
        counts = torch.bincount(torch.searchsorted(rows, torch.div(got, in_f, rounding_mode="floor")),
                                minlength=rows.numel())
    short = want - counts
    if bool((short > 0).any()):
        # Rows with too few sampled candidates: fill up from their other free entries.
        taken = torch.sort(torch.cat([active, cand])).values
        extra = sample_in_rows(rows[short > 0], short[short > 0], in_f, taken, col_w, gen)
        got = torch.cat([got, extra])
    return torch.sort(got).values


def update_srigl_layers(rule, layers: dict[str, FanInLinear], ctx: UpdateContext) -> dict:
    return {name: update_srigl(rule, layer, ctx, name) for name, layer in layers.items()}
