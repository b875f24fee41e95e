"""The mask-update rules by name (STYLE.md point 7): small functions over tensors.

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
              largest gradient norm (all, or a GSE sample), freeze the top K                                            (dst.dynadiag)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .config import METHODS, check_choice
from .dynadiag import diagonal_gradient_score, update_dynadiag
from .scores import gate_score, gradient_score, magnitude_score, random_score
from .srigl import update_srigl_layers
from .unstructured import update_unstructured


class Rule(NamedTuple):
    formats: tuple[str, ...]        # layer formats the rule updates
    needs_gradient: bool            # update steps capture each layer's input x and output grad dy
    drop_score: Callable | None     # (layer) -> [stored] scores; the lowest are dropped
    grow_score: Callable | None     # (flat candidates, layer, ctx, name) -> [n]; the highest are grown
    update: Callable | None         # (rule, {name: layer}, UpdateContext) -> {name: stats}


RULES: dict[str, Rule] = {
    "dense": Rule((), False, None, None, None),
    "static": Rule(("sparse", "fanin", "diag"), False, None, None, None),
    "set": Rule(("sparse",), False, magnitude_score, random_score, update_unstructured),
    "rigl": Rule(("sparse",), True, magnitude_score, gradient_score, update_unstructured),
    "gse": Rule(("sparse",), True, magnitude_score, gradient_score, update_unstructured),
    "srigl": Rule(("fanin",), True, magnitude_score, gradient_score, update_srigl_layers),
    "dynadiag": Rule(("diag",), True, gate_score, diagonal_gradient_score, update_dynadiag),
}


def rule_for(method: str) -> Rule:
    """The rule of ``method``; ValueError listing the choices for an unknown name."""
    check_choice("method", method, METHODS)
    return RULES[method]
