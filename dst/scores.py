"""Drop and grow scores shared by the rules, and what an update step hands to a rule."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .candidates import gradient_scores
from .config import DSTConfig


def magnitude_score(values: torch.Tensor) -> torch.Tensor:
    """Drop score of every rule on weights: |w| (fp32, flat); the lowest are dropped."""
    return values.detach().float().abs().reshape(-1)


def random_score(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """SET's grow score (and DynaDiag's for new candidate diagonals): uniform noise, so the
    grown candidates are a uniform draw."""
    return torch.rand(n, generator=generator).to(device)


def gradient_score(dy: torch.Tensor, x: torch.Tensor, flat: torch.Tensor, in_features: int) -> torch.Tensor:
    """RigL / GSE / SRigL grow score: |dL/dW| at the candidates, by SDDMM."""
    return gradient_scores(dy, x, flat, in_features)


def gate_score(scores: torch.Tensor) -> torch.Tensor:
    """DynaDiag's drop score: the learned per-diagonal score (the lowest candidates go)."""
    return scores.detach().float()


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
