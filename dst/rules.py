"""The mask-update rules by name (STYLE.md point 7): the one place where methods differ.

Every rule is a drop score (the lowest go), a grow score (the highest candidates come) and
the one shared swap ``dst.apply.apply_mask_update``, which keeps counts exact, drop and
grow disjoint (candidates are only entries inactive before the update), grown weights at
exactly 0 and their optimizer state reset.

    static    no update
    set       drop lowest |w|, grow random inactive                       (dst.unstructured)
    rigl      drop lowest |w|, grow highest |grad| among all inactive (grow="exact") or a sample
    gse       as rigl over a sampled candidate set of gamma * |active| (uniform / GraBo / GraEst)
    srigl     constant fan-in, per-row drop / grow, neuron ablation        (dst.srigl)
    dynadiag  drop the lowest learned diagonal scores, grow the candidate diagonals with the
              largest gradient norm (all, or a GSE sample), freeze the top K  (dst.dynadiag)

The Sparsifier asks its rule, through the hooks below, everything that depends on the
method: when updates happen and end, what an update step captures, what happens every step
(DynaDiag's temperature), the update itself, what counts as active and what a layer keeps
beyond its pattern (DynaDiag's gate). A new method is a
``Rule`` (or a subclass for new hooks) in ``RULES`` and its ``dst.config.METHOD_SPECS`` entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .config import METHOD_SPECS, METHODS, check_choice
from .dynadiag import (diagonal_gradient_score, freeze, gate_state, init_dynadiag, load_gate_state, set_temperature,
                       update_dynadiag)
from .schedules import cosine_anneal, is_update_step
from .scores import gate_score, gradient_score, magnitude_score, random_score
from .srigl import update_srigl_layers
from .unstructured import update_unstructured


@dataclass(frozen=True)
class Rule:
    """A method's mask updates; the hooks' plain behaviour is RigL's schedule (an update every
    delta_t steps until t_end * total_steps)."""
    drop_score: Callable | None = None    # (layer) -> [stored] scores; the lowest are dropped
    grow_score: Callable | None = None    # (flat candidates, layer, ctx, name) -> [n]; the highest are grown
    update: Callable | None = None        # (rule, {name: layer}, UpdateContext) -> {name: stats}
    needs_gradient: bool = False          # update steps capture each layer's input x and output grad dy
    accepts: tuple[str, ...] = ()         # layer formats it can run on (() = the one its method builds)

    def formats(self, method: str) -> tuple[str, ...]:
        return self.accepts or (METHOD_SPECS[method].layer,)

    def horizon(self, cfg, total_steps: int) -> float:
        """The step at which updates stop."""
        return cfg.t_end * total_steps

    def start(self, sp) -> None:
        """Once, when the Sparsifier is built (after it has found the layers)."""

    def update_due(self, sp, step: int) -> bool:
        if self.update is None or not sp.layers:
            return False
        return is_update_step(step, sp.cfg.delta_t, sp.update_end)

    def captures(self, sp, step: int) -> bool:
        """Whether ``step``'s forward / backward is recorded for the update."""
        return self.needs_gradient and self.update_due(sp, step)

    def every_step(self, sp, step: int, optimizer) -> None:
        """Before the update check of every step (after optimizer.step())."""

    def run(self, sp, step: int, ctx) -> dict:
        """The update of a due step: {name: stats}."""
        return self.update(self, sp.layers, ctx)

    def active_density(self, sp, name: str, layer) -> float:
        """The share of the layer's weights that counts toward the target."""
        return layer.density()

    def layer_state(self, layer) -> dict:
        """What the rule keeps in a layer beyond its pattern and values, for the Sparsifier's
        state_dict (entries of the layer's saved entry)."""
        return {"gate": None}

    def load_layer_state(self, layer, entry: dict) -> None:
        """Restore ``layer_state``'s entries from a saved layer entry."""

    def schedule_warning(self, cfg, total_steps: int, method: str) -> str | None:
        """Why no mask would ever change in a run of ``total_steps`` under ``cfg`` (or None)."""
        horizon = self.horizon(cfg, total_steps)
        if self.update is None or any(is_update_step(s, cfg.delta_t, horizon) for s in range(total_steps)):
            return None
        return self.no_update_message(cfg, total_steps, horizon, method)

    def no_update_message(self, cfg, total_steps: int, horizon: float, method: str) -> str:
        return (f"no mask update will happen: --delta-t {cfg.delta_t} is not below the update horizon "
                f"--t-end {cfg.t_end:g} x --steps {total_steps} = {horizon:g} steps, so {method} trains a "
                f"static mask; pass --delta-t below {max(math.ceil(horizon), 2)}")


@dataclass(frozen=True)
class DynaDiagRule(Rule):
    """DynaDiag: gates over the stored diagonals whose temperature anneals every step;
    resamples the candidate diagonals every delta_t steps until the freeze, where the top K
    are kept and the gates go (dst.dynadiag)."""

    def horizon(self, cfg, total_steps: int) -> float:
        return round(cfg.freeze_at * total_steps)

    def start(self, sp) -> None:
        for name, layer in sp.layers.items():
            sp.k_targets[name] = init_dynadiag(layer, sp.cfg.candidates, sp.cfg.temp_start, sp.generator)

    def update_due(self, sp, step: int) -> bool:
        return not sp.frozen and (step >= sp.update_end or is_update_step(step, sp.cfg.delta_t, sp.update_end))

    def captures(self, sp, step: int) -> bool:
        return step < sp.update_end and super().captures(sp, step)   # the freeze needs no gradient

    def every_step(self, sp, step: int, optimizer) -> None:
        if sp.frozen:
            return
        self._check_optimizer(sp, optimizer)
        temperature = cosine_anneal(step, sp.cfg.temp_start, sp.cfg.temp_end, sp.update_end)
        for layer in sp.layers.values():
            set_temperature(layer, temperature)

    @staticmethod
    def _check_optimizer(sp, optimizer) -> None:
        """The gate scores are Parameters the Sparsifier creates: an optimizer built before it
        would leave them untrained, silently."""
        if optimizer is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in sp.layers.items() if layer.scores is not None and id(layer.scores) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the DynaDiag gate scores of {missing}: build it after "
                             "dst.Sparsifier(model, ...), which adds them, e.g. "
                             "optimizer = torch.optim.AdamW(model.parameters())")

    def run(self, sp, step: int, ctx) -> dict:
        if step < sp.update_end:
            return super().run(sp, step, ctx)
        layers = {name: freeze(layer, ctx) for name, layer in sp.layers.items()}
        sp.frozen = True
        return layers

    def active_density(self, sp, name: str, layer) -> float:
        k = sp.k_targets.get(name)
        stored = layer.density()
        return stored * k / layer.num_diagonals if k is not None and not sp.frozen else stored

    def layer_state(self, layer) -> dict:
        return {"gate": gate_state(layer)}

    def load_layer_state(self, layer, entry: dict) -> None:
        load_gate_state(layer, entry["gate"])

    def no_update_message(self, cfg, total_steps: int, horizon: float, method: str) -> str:
        return (f"no DynaDiag resampling before the freeze at step {horizon} (--freeze-at {cfg.freeze_at:g} x "
                f"--steps {total_steps}) with --delta-t {cfg.delta_t}: the diagonals are chosen once, at the "
                f"freeze; pass --delta-t below {max(horizon, 2)}")


RULES: dict[str, Rule] = {
    "dense": Rule(),
    "static": Rule(accepts=("sparse", "fanin", "diag")),
    "set": Rule(magnitude_score, random_score, update_unstructured),
    "rigl": Rule(magnitude_score, gradient_score, update_unstructured, needs_gradient=True),
    "gse": Rule(magnitude_score, gradient_score, update_unstructured, needs_gradient=True),
    "srigl": Rule(magnitude_score, gradient_score, update_srigl_layers, needs_gradient=True),
    "dynadiag": DynaDiagRule(gate_score, diagonal_gradient_score, update_dynadiag, needs_gradient=True),
}


def rule_for(method: str) -> Rule:
    """The rule of ``method``; ValueError listing the choices for an unknown name."""
    check_choice("method", method, METHODS)
    return RULES[method]
