"""Drop and grow scores shared by the rules, and what an update step hands to a rule."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .candidates import gradient_scores
from .config import DSTConfig


# Every score is a function of the layer (drop) or of candidate coordinates (grow), so that a
# rule is the pair and the update code is shared.

def magnitude_score(layer) -> torch.Tensor:
    """Drop score of the weight rules: |w| (fp32, flat over the stored values); lowest go."""
    return layer.values.detach().float().abs().reshape(-1)


def gate_score(layer) -> torch.Tensor:
    """DynaDiag's drop score: the learned score of each stored diagonal; lowest go."""
    return layer.scores.detach().float()


def gradient_score(flat: torch.Tensor, layer, ctx: "UpdateContext", name: str) -> torch.Tensor:
    """Grow score of RigL / GSE / SRigL: |dL/dW| at the flat candidates, by SDDMM of the
    captured output gradient and input."""
    dy, x = ctx.capture(name)
    return gradient_scores(dy, x, flat, layer.in_features)


def random_score(flat: torch.Tensor, layer, ctx: "UpdateContext", name: str) -> torch.Tensor:
    """Grow score of SET: uniform noise, a uniform draw."""
    return torch.rand(flat.numel(), generator=ctx.generator).to(flat.device)


def lowest(score: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the n lowest scores."""
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    return torch.topk(score, n, largest=False, sorted=False).indices


def highest(score: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the n highest scores."""
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    return torch.topk(score, n, largest=True, sorted=False).indices


@dataclass
class UpdateContext:
    """What an update step hands to a rule."""
    cfg: DSTConfig
    optimizer: torch.optim.Optimizer | None
    drop_fraction: float
    generator: torch.Generator
    captures: dict = field(default_factory=dict)     # name -> (dy [T, out], x [T, in]) when captured
    budgets: dict = field(default_factory=dict)      # SRigL: name -> nnz budget of the layer
    heads: frozenset = frozenset()                   # SRigL: layers never ablated

    def capture(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.captures:
            raise RuntimeError(f"no captured input / output gradient for layer {name!r}: run the forward and "
                               "backward of an update step inside `with sparsifier.capture(step):`")
        return self.captures[name]
