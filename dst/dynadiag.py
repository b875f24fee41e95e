"""DynaDiag (arXiv 2506.11449) on DiagLinear, kept sparse: K active diagonals plus a bounded
candidate set carry values and learnable scores; the other P - K - C diagonals do not exist.

    W = sum_j a_j P_j diag(V_j),  a = clamp(K softmax(scores / T), 0, 1)   over stored diagonals

Design (ours; the paper stores and computes all P diagonals):
- Start: the layer's K diagonals plus C = min(P - K, ceil(candidates * K)) random candidate
  diagonals, all with random values (initialisation), all scores 0; gate on
  (``DiagLinear.enable_gate``), temperature ``temp_start``.
- Every step until the freeze step: T = cosine anneal temp_start -> temp_end.
- Update steps before the freeze (every delta_t): the K highest-scored diagonals are safe;
  of the C others, the floor(drop_fraction * C) lowest-scored are replaced by diagonals drawn
  uniformly from those not stored. New diagonals start with values 0 (the function does not
  change) and zeroed optimizer state; scores are shifted so that the kept ones have mean 0
  and new ones start at 0, i.e. at the kept mean (softmax does not see the shift). The
  drop fraction follows the configured schedule over [0, freeze step].
- Freeze (the first step >= freeze_at * total): keep the top K by score, fold their gate
  a_j into their values (the function stays that of the gated layer minus the dropped
  candidates), turn the gate off. Exactly K diagonals remain; no update after that.
"""
from __future__ import annotations

import math

import torch

from kernels import DiagLinear
from kernels.coords import sample_distinct

from .apply import apply_mask_update, remap_parameter
from .scores import UpdateContext, gate_score, highest, lowest


def candidate_diagonals(candidates: float, k: int, p: int) -> int:
    """C = min(P - K, ceil(candidates * K))."""
    return min(p - k, math.ceil(candidates * k - 1e-9))


def expand_src(src_diag: torch.Tensor, per_diagonal: int) -> torch.Tensor:
    """Per-diagonal src (old diagonal or -1) -> per-element src over [K, D, b, b] values."""
    offs = torch.arange(per_diagonal, device=src_diag.device)
    elem = src_diag[:, None] * per_diagonal + offs[None, :]
    return torch.where(src_diag[:, None] >= 0, elem, torch.full_like(elem, -1)).reshape(-1)


def _per_diagonal(layer: DiagLinear) -> int:
    R, C, D, P = layer.geometry
    return D * layer.block_size * layer.block_size


def init_dynadiag(layer: DiagLinear, candidates: float, temperature: float, generator: torch.Generator) -> int:
    """Add the candidate diagonals (random values) and turn the gate on; returns K."""
    k = layer.num_diagonals
    R, C, D, P = layer.geometry
    b = layer.block_size
    n_cand = candidate_diagonals(candidates, k, P)
    old = layer.offsets.long()
    new = sample_distinct(P, n_cand, exclude=torch.sort(old).values, generator=generator, device=old.device)
    bound = 1.0 / math.sqrt(layer.mean_fan_in(k))
    cand_values = torch.empty(n_cand, D, b, b, dtype=layer.values.dtype)
    cand_values.uniform_(-bound, bound, generator=generator)
    offsets = torch.cat([old, new])
    values = torch.cat([layer.values.detach(), cand_values.to(layer.values.device)])
    src = torch.cat([torch.arange(k, device=old.device), torch.full((n_cand,), -1, device=old.device)])
    order = torch.argsort(offsets)
    apply_mask_update(layer, None, expand_src(src[order], _per_diagonal(layer)), values=values[order],
                      offsets=offsets[order].to(torch.int32))
    layer.enable_gate(k, temperature)
    return k


def set_temperature(layer: DiagLinear, temperature: float) -> None:
    if layer.temperature is not None:
        layer.temperature.fill_(temperature)


def resample_candidates(rule, layer: DiagLinear, ctx: UpdateContext) -> dict:
    """Replace the lowest-scored floor(drop_fraction * C) candidates by new random diagonals."""
    k = layer.k_target
    R, C, D, P = layer.geometry
    stored = layer.num_diagonals
    score = rule.drop_score(layer)
    leaders = highest(score, k)
    is_candidate = torch.ones(stored, dtype=torch.bool, device=score.device)
    is_candidate[leaders] = False
    cand_pos = torch.nonzero(is_candidate).flatten()
    n_replace = min(int(math.floor(ctx.drop_fraction * cand_pos.numel())), P - stored)
    drop = cand_pos[lowest(score[cand_pos], n_replace)]
    keep = torch.ones(stored, dtype=torch.bool, device=score.device)
    keep[drop] = False
    kept_pos = torch.nonzero(keep).flatten()
    old = layer.offsets.long()
    new = sample_distinct(P, n_replace, exclude=torch.sort(old).values, generator=ctx.generator, device=old.device)
    offsets = torch.cat([old[kept_pos], new])
    src = torch.cat([kept_pos, torch.full((n_replace,), -1, dtype=torch.int64, device=old.device)])
    order = torch.argsort(offsets)
    offsets, src = offsets[order], src[order]
    with torch.no_grad():
        layer.scores.sub_(layer.scores[kept_pos].mean())
    remap_parameter(layer.scores, ctx.optimizer, src, (stored,))
    stats = apply_mask_update(layer, ctx.optimizer, expand_src(src, _per_diagonal(layer)),
                              offsets=offsets.to(torch.int32))
    stats.update(density=layer.density(), diagonals=stored, replaced=n_replace)
    return stats


def freeze(layer: DiagLinear, ctx: UpdateContext) -> dict:
    """Keep the top-K diagonals by score with their gate folded into the values; gate off."""
    k = layer.k_target
    with torch.no_grad():
        a = layer.gate().detach()
        folded = layer.values.detach() * a.to(layer.values.dtype)[:, None, None, None]
    top = torch.sort(highest(gate_score(layer), k)).values  # offsets are sorted: stays sorted
    offsets = layer.offsets[top]
    layer.disable_gate()
    stats = apply_mask_update(layer, ctx.optimizer, expand_src(top, _per_diagonal(layer)),
                              values=folded[top], offsets=offsets)
    stats.update(density=layer.density(), diagonals=k, frozen=True)
    return stats


def update_dynadiag(rule, layers: dict[str, DiagLinear], ctx: UpdateContext) -> dict:
    return {name: resample_candidates(rule, layer, ctx) for name, layer in layers.items()}
