"""How the overall sparsity is split over layers: uniform, ERK (RigL) and ER (GSE)."""
from __future__ import annotations

import math

from .config import DISTRIBUTIONS, check_choice


def _raw_score(shape: tuple[int, ...], distribution: str) -> float:
    """Erdos-Renyi density up to a global factor: (sum of dims) / (product of dims).

    ER (GSE) uses (in + out) / (in * out). ERK (RigL) adds the kernel dims of a conv
    (out, in, kh, kw); for a Linear, whose shape is (out, in), the two coincide.
    """
    dims = shape if distribution == "erk" else shape[:2]
    return sum(dims) / math.prod(dims)


def layer_densities(shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str) -> dict[str, float]:
    """Density of each layer so that the total is 1 - sparsity and no layer exceeds 1.

    Args:
        shapes: name -> (out_features, in_features) (conv: (out, in, kh, kw)).
        sparsity: overall fraction of zeros, in [0, 1).
        distribution: "uniform" (every layer 1 - sparsity), "erk" or "er" (density proportional
            to the Erdos-Renyi score; layers it would push above 1 are made dense and the rest
            rescaled, RigL's procedure).
    Returns:
        name -> density in (0, 1]; sum(density * numel) = (1 - sparsity) * sum(numel) up to
        float rounding, or everything dense when that is impossible.

    Example:
        >>> layer_densities({"fc1": (3072, 768), "fc2": (768, 3072)}, 0.9, "erk")
        {'fc1': 0.1, 'fc2': 0.1}
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    for name, shape in shapes.items():
        if len(shape) < 2 or any(not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"shape of {name!r} must be (out, in[, kernel dims]) of positive ints, got {shape!r}")
    density = 1.0 - sparsity
    if distribution == "uniform":
        return {name: density for name in shapes}
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _raw_score(shape, distribution) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        # Solve eps * sum(raw * n) over sparse layers = target ones - ones of the dense layers.
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:
            return {name: 1.0 for name in shapes}
        eps = budget / divisor
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        # One at a time, the largest first: making a layer dense lowers eps for the others.
        dense.add(max(over, key=lambda n: raw[n]))
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}
