"""DynaDiag (arXiv 2506.11449) on DiagLinear, kept sparse: K active diagonals plus a bounded
candidate set carry values and learnable scores; the other P - K - C diagonals do not exist.

    W = sum_j a_j P_j diag(V_j),  a = clamp(K softmax(scores / T), 0, 1)   over stored diagonals

Design (ours; the paper stores and computes all P diagonals):
- Start: the layer's K diagonals plus C = min(P - K, ceil(candidates * K)) random candidate
  diagonals, all with random values (initialisation), all scores 0; gate on
  (``DiagLinear.enable_gate``), temperature ``temp_start``.
- Every step until the freeze step: T = cosine anneal temp_start -> temp_end.
- Update steps before the freeze (every delta_t): the K highest-scored diagonals are safe;
  of the C others, the floor(drop_fraction * C) lowest-scored are replaced by the diagonals
  not stored before the update with the largest gradient norm ||dL/dW|| over their D blocks
  (grow="exact": every such diagonal is scored, by block SDDMM a chunk of diagonals at a
  time in memory O(nnz) - RigL's exact grow, for diagonals; so the soft top-K sees all P
  diagonals over the run, as the paper's dense gate does), or the best of a sample of
  max(n, ceil(gamma * stored)) of them drawn by GSE's samplers (uniform, or GraBo / GraEst,
  whose per-row and per-column weights give a diagonal the weight sum_blocks w_r w_c: a
  circular cross-correlation, O(P log P) by FFT). New diagonals start with values 0 (the
  function does not change) and zeroed optimizer state; scores are shifted so that the kept
  ones have mean 0 and new ones start at 0, i.e. at the kept mean (softmax does not see the
  shift). The drop fraction follows the configured schedule over [0, freeze step].
- Freeze (the first step >= freeze_at * total): keep the top K by score and turn the gate off.
  freeze_gate="ones" (the default) sets the kept gates to 1, as the authors do (the function
  jumps); "fold" multiplies each kept diagonal by its gate a_j (the function stays that of the
  gated layer minus the dropped candidates). Ones trained better on both ViT tables (3 seeds,
  train/results/RESULTS.md). Exactly K diagonals remain; no update after that.
"""
from __future__ import annotations

import math

import torch

from alwayssparse.kernels import DiagLinear, sddmm
from alwayssparse.kernels.coords import sample_distinct
from alwayssparse.kernels.diag import diag_coords

from .apply import apply_mask_update, remap_parameter
from .candidates import band_elems, reduce_across_ranks, sampling_weights
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


def gate_state(layer: DiagLinear) -> dict | None:
    """The gate a checkpoint keeps (scores, temperature, k_target), None without a gate."""
    if layer.scores is None:
        return None
    return {"scores": layer.scores.detach().cpu().clone(), "temperature": float(layer.temperature),
            "k_target": layer.k_target}


def load_gate_state(layer: DiagLinear, gate: dict | None) -> None:
    """Give ``layer`` the gate of ``gate_state`` (in the same scores Parameter when it has one,
    so the optimizer keeps holding it); None removes its gate."""
    if gate is None:
        if layer.scores is not None:
            layer.disable_gate()
        return
    scores = gate["scores"].to(layer.values.device)
    if layer.scores is None:
        layer.enable_gate(gate["k_target"], gate["temperature"], scores)
        return
    with torch.no_grad():
        layer.scores.data = scores.clone()
    layer.temperature = torch.tensor(float(gate["temperature"]), device=layer.values.device)
    layer.k_target = int(gate["k_target"])


def diagonal_gradient_norms(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, R: int, C: int, b: int,
                            chunk_elems: int) -> torch.Tensor:
    """||dL/dW|| over each diagonal's D blocks (fp32 [len(offsets)]): block SDDMM of about
    ``chunk_elems`` gradient elements at a time, summed over ranks before the norm."""
    per_diagonal = min(R, C) * b * b
    step = max(1, chunk_elems // per_diagonal)
    norms = [torch.empty(0, device=offsets.device)]
    for start in range(0, offsets.numel(), step):
        rows, cols = diag_coords(offsets[start:start + step], R, C)
        g = reduce_across_ranks(sddmm(dy, x, rows.reshape(-1), cols.reshape(-1), b).float())
        norms.append(g.reshape(-1, per_diagonal).square().sum(1).sqrt())
    return torch.cat(norms)


def diagonal_gradient_score(offsets: torch.Tensor, layer: DiagLinear, ctx: UpdateContext, name: str) -> torch.Tensor:
    """DynaDiag's grow score: the gradient norm of each candidate diagonal (not stored)."""
    dy, x = ctx.capture(name)
    R, C, _, _ = layer.geometry
    return diagonal_gradient_norms(dy, x, offsets, R, C, layer.block_size, band_elems(layer.nnz()))


def diagonal_weights(row_w: torch.Tensor, col_w: torch.Tensor, R: int, C: int, b: int) -> torch.Tensor:
    """[P] sampling weight of every diagonal, sum over its blocks of w_row(block) * w_col(block)
    (per-element weights summed per block): diagonal o holds blocks ((d + o) % R, d) when
    R >= C, so this is a circular cross-correlation, computed by FFT in O(P log P)."""
    rw, cw = row_w.double().reshape(R, b).sum(1), col_w.double().reshape(C, b).sum(1)
    long, short = (rw, cw) if R >= C else (cw, rw)
    P = long.numel()
    spectrum = torch.fft.rfft(long, n=P) * torch.fft.rfft(short, n=P).conj()
    return torch.fft.irfft(spectrum, n=P).clamp_min(0.0)


def _grow_diagonals(rule, layer: DiagLinear, ctx: UpdateContext, name: str, old: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` diagonals not in ``old``: the highest grow score among all of them (grow="exact")
    or among a sample of max(n, ceil(gamma * stored)) drawn by the configured sampler."""
    R, C, D, P = layer.geometry
    cfg, gen = ctx.cfg, ctx.generator
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=old.device)
    free_mask = torch.ones(P, dtype=torch.bool, device=old.device)
    free_mask[old] = False
    free = torch.nonzero(free_mask).flatten()
    if cfg.grow == "exact":
        pool = free
    else:
        n_pool = min(free.numel(), max(n, math.ceil(cfg.gamma * old.numel())))
        weights = None
        if cfg.grow != "uniform":
            dy, x = ctx.capture(name)
            row_w, col_w = sampling_weights(cfg.grow, dy, x, gen)
            weights = diagonal_weights(row_w, col_w, R, C, layer.block_size)[free.cpu()]
        if weights is None or not bool(weights.sum() > 0):
            pool = sample_distinct(P, n_pool, exclude=torch.sort(old).values, generator=gen, device=old.device)
        else:
            pool = free[torch.multinomial(weights, n_pool, replacement=False, generator=gen).to(old.device)]
    return pool[highest(rule.grow_score(pool, layer, ctx, name), n)]


def resample_candidates(rule, layer: DiagLinear, ctx: UpdateContext, name: str) -> dict:
    """Replace the lowest-scored floor(drop_fraction * C) candidates by the diagonals with the
    best grow score (module docstring)."""
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
    new = _grow_diagonals(rule, layer, ctx, name, old, n_replace)
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
    """Keep the top-K diagonals by score, their gate folded into the values or set to 1
    (``freeze_gate``); gate off."""
    k = layer.k_target
    with torch.no_grad():
        values = layer.values.detach()
        if ctx.cfg.freeze_gate == "fold":
            values = values * layer.gate().detach().to(values.dtype)[:, None, None, None]
    top = torch.sort(highest(gate_score(layer), k)).values  # offsets are sorted: stays sorted
    offsets = layer.offsets[top]
    layer.disable_gate()
    stats = apply_mask_update(layer, ctx.optimizer, expand_src(top, _per_diagonal(layer)),
                              values=values[top], offsets=offsets)
    stats.update(density=layer.density(), diagonals=k, frozen=True)
    return stats


def update_dynadiag(rule, layers: dict[str, DiagLinear], ctx: UpdateContext) -> dict:
    return {name: resample_candidates(rule, layer, ctx, name) for name, layer in layers.items()}
