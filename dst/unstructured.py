"""SET, RigL and GSE on SparseLinear: drop the lowest |w|, grow the best inactive candidates.

SET grows a uniform draw (random grow score); RigL grows the highest |grad| among all
inactive entries (grow="exact", a bounded chunked scan) or among a sample; GSE grows the
highest |grad| in a sampled candidate set of gamma * |active| entries. Counts are exact:
each layer drops exactly as many as it grows, and only entries inactive before the update
are candidates, so drop and grow are disjoint.
"""
from __future__ import annotations

import math

import torch

from alwayssparse.kernels import SparseLinear
from alwayssparse.kernels.coords import sample_distinct

from .apply import apply_mask_update
from .candidates import band_elems, exact_top, sample_candidates
from .scores import UpdateContext, highest, lowest


def grow_count(drop_fraction: float, layer: SparseLinear) -> int:
    """floor(fraction * nnz), never more than the inactive entries."""
    nnz = layer.nnz()
    return min(int(math.floor(drop_fraction * nnz)), layer.weight_numel - nnz)


def candidate_count(gamma: float, layer: SparseLinear, n_grow: int) -> int:
    """GSE's |S| = gamma * |active|, at least the number to grow, at most the inactive."""
    return min(layer.weight_numel - layer.nnz(), max(n_grow, math.ceil(gamma * layer.nnz())))


def scored_candidates(rule, layer: SparseLinear, n_cand: int, ctx: UpdateContext,
                      name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat coordinates, grow scores) of ``n_cand`` inactive candidates of one layer.

    A gradient-free rule (SET) scores a uniform draw; a gradient rule scores a sample
    (grow = uniform / grabo / graest) or scans every inactive entry (grow = "exact", where
    the band GEMM of the scan computes the same |grad| score).
    """
    active = layer.flat_coords()
    if not rule.needs_gradient:
        flat = sample_distinct(layer.weight_numel, n_cand, exclude=active, generator=ctx.generator,
                               device=active.device)
        return flat, rule.grow_score(flat, layer, ctx, name)
    dy, x = ctx.capture(name)
    if ctx.cfg.grow == "exact":
        scores, flat = exact_top(dy, x, n_cand, active, band_elems(layer.nnz()))
        return flat, scores
    flat = sample_candidates(ctx.cfg.grow, n_cand, layer.out_features, layer.in_features, active, dy, x,
                             ctx.generator)
    return flat, rule.grow_score(flat, layer, ctx, name)


def merge_sorted(kept: torch.Tensor, kept_src: torch.Tensor, grown: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two sorted disjoint coordinate lists: (merged, src) with src -1 for grown.
    Binary search instead of a sort of the whole list (a sort of 1 M int64 costs ~0.2 s on CPU)."""
    total = kept.numel() + grown.numel()
    pos_kept = torch.arange(kept.numel(), device=kept.device) + torch.searchsorted(grown, kept)
    pos_grown = torch.arange(grown.numel(), device=kept.device) + torch.searchsorted(kept, grown)
    merged = kept.new_empty(total)
    src = torch.full((total,), -1, dtype=torch.int64, device=kept.device)
    merged[pos_kept], merged[pos_grown] = kept, grown
    src[pos_kept] = kept_src
    return merged, src


def swap_unstructured(rule, layer: SparseLinear, optimizer, grow_flat: torch.Tensor) -> dict:
    """Drop as many lowest-scored weights as ``grow_flat`` (inactive, distinct) holds; grow those."""
    n = grow_flat.numel()
    drop = lowest(rule.drop_score(layer), n)
    keep = torch.ones(layer.nnz(), dtype=torch.bool, device=grow_flat.device)
    keep[drop] = False
    kept_pos = torch.nonzero(keep).flatten()
    new_flat, src = merge_sorted(layer.flat_coords()[kept_pos], kept_pos, grow_flat)
    rows = torch.div(new_flat, layer.in_features, rounding_mode="floor")
    return apply_mask_update(layer, optimizer, src, rows=rows.to(torch.int32),
                             cols=(new_flat % layer.in_features).to(torch.int32))


def update_unstructured(rule, layers: dict[str, SparseLinear], ctx: UpdateContext) -> dict:
    """One mask update of set / rigl / gse over every SparseLinear; {name: stats}.

    scope="global" (rigl, gse): the layers' grow counts are pooled, candidates drawn from
    each layer in proportion to its inactive entries, and the pooled top by |grad| grown;
    each layer then drops as many as it grew, so every layer's density stays exact.
    """
    counts = {name: grow_count(ctx.drop_fraction, layer) for name, layer in layers.items()}
    if rule.needs_gradient and ctx.cfg.scope == "global":
        grows = _global_grow(rule, layers, counts, ctx)
    else:
        grows = {}
        for name, layer in layers.items():
            n = counts[name]
            exact = not rule.needs_gradient or ctx.cfg.grow == "exact"
            n_cand = n if exact else candidate_count(ctx.cfg.gamma, layer, n)
            flat, score = scored_candidates(rule, layer, n_cand, ctx, name)
            grows[name] = flat[highest(score, n)]
    stats = {}
    for name, layer in layers.items():
        stats[name] = swap_unstructured(rule, layer, ctx.optimizer, torch.sort(grows[name]).values)
        stats[name]["density"] = layer.density()
    return stats


def _global_grow(rule, layers: dict[str, SparseLinear], counts: dict[str, int],
                 ctx: UpdateContext) -> dict[str, torch.Tensor]:
    """The pooled top ``sum(counts)`` candidates of all layers by |grad|, a layer taking at
    most min(its nnz, its inactive entries)."""
    total_grow = sum(counts.values())
    names = list(layers)
    inactive = [layers[n].weight_numel - layers[n].nnz() for n in names]
    pool = max(total_grow, math.ceil(ctx.cfg.gamma * sum(layers[n].nnz() for n in names)))
    flats, scores, owners = [], [], []
    for i, name in enumerate(names):
        if ctx.cfg.grow == "exact":
            n_cand = min(total_grow, inactive[i])
        else:
            n_cand = min(inactive[i], math.ceil(pool * inactive[i] / max(1, sum(inactive))))
        flat, score = scored_candidates(rule, layers[name], n_cand, ctx, name)
        flats.append(flat)
        scores.append(score.float())
        owners.append(torch.full((flat.numel(),), i, dtype=torch.int64, device=flat.device))
    flat, score, owner = torch.cat(flats), torch.cat(scores), torch.cat(owners)
    order = torch.argsort(score, descending=True)
    by = owner[order]
    rank = torch.empty_like(by)
    caps = torch.empty_like(by)
    for i, name in enumerate(names):
        mine = by == i
        rank[mine] = torch.arange(int(mine.sum()), device=by.device)
        caps[mine] = min(layers[name].nnz(), inactive[i])
    chosen = order[rank < caps][:total_grow]
    return {name: flat[chosen[owner[chosen] == i]] for i, name in enumerate(names)}
