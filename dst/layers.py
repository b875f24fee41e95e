"""Build the layer a method trains, and check that a model's sparse layers suit a method."""
from __future__ import annotations

import torch
from torch import nn

from alwayssparse.kernels import SparseLayer

from .config import LAYER_FORMAT, DSTConfig

def layer_format(layer: nn.Module) -> str:
    """The format name of a sparse layer ("fanin", ...); "dense" for anything else."""
    return layer.format if isinstance(layer, SparseLayer) else "dense"


def check_layer_format(method: str, name: str, layer: SparseLayer, supported: tuple[str, ...]) -> None:
    """ValueError when ``layer``'s format is not one of the ``supported`` formats of ``method``."""
    fmt = layer_format(layer)
    if fmt not in supported:
        wants = f"{' or '.join(supported)} layers" if supported else "dense nn.Linear layers only"
        raise ValueError(f"method {method!r} runs on {wants}; layer {name!r} is "
                         f"{type(layer).__name__} (format {fmt!r})")


def make_layer(cfg: DSTConfig, in_features: int, out_features: int, density: float, *, bias: bool = True,
               device=None, dtype=None, generator: torch.Generator | None = None) -> nn.Module:
    """The layer ``cfg.method`` trains, created sparse (no dense weight for sparse formats).

    dense -> nn.Linear; static / set / rigl / gse -> kernels.SparseLinear; srigl ->
    kernels.FanInLinear; dynadiag -> kernels.DiagLinear(block_size=cfg.block_size).
    ``density`` in (0, 1] is rounded by the format: nnz for SparseLinear, fan-in k per row
    for FanInLinear, ceil(density * P) diagonals for DiagLinear.

    Example:
        >>> fc1 = make_layer(DSTConfig(method="srigl"), 768, 3072, density=0.1)
    """
    cfg.validate()
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    fmt = LAYER_FORMAT[cfg.method]
    if fmt == "dense":
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    cls = SparseLayer.by_format[fmt]
    options = {name: getattr(cfg, name) for name in cls.options}   # DiagLinear: block_size
    return cls(in_features, out_features, density, bias=bias, device=device, dtype=dtype, generator=generator,
               **options)
