"""The one place where a mask change reaches a layer and its optimizer state.

A mask update is described by ``src``: for every element of the new ``values`` (in their
storage order, flattened), the flat position in the old ``values`` it keeps, or -1 for a
grown element. Kept elements keep their value and their optimizer state; grown elements
start at exactly 0 with zeroed optimizer state (Adam/AdamW exp_avg, exp_avg_sq,
max_exp_avg_sq; SGD momentum_buffer; any per-element state of the parameter's shape).
Dropped elements are those no ``src`` points to. Everything is O(nnz).
"""
from __future__ import annotations

import torch

from alwayssparse.kernels import SparseLayer, SparseLinear, resize_parameter


def gather_or_zero(old: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """old.reshape(-1)[src] with 0 where src < 0."""
    flat = old.reshape(-1)
    out = flat.new_zeros(src.shape)
    keep = src >= 0
    out[keep] = flat[src[keep]]
    return out


def check_src(src: torch.Tensor, old_numel: int) -> None:
    """Every old element is kept at most once and every index is in range."""
    kept = src[src >= 0]
    if kept.numel() and (int(kept.max()) >= old_numel):
        raise ValueError(f"src points past the {old_numel} old elements")
    if kept.numel() > 1 and bool((torch.sort(kept).values.diff() == 0).any()):
        raise ValueError("src keeps an old element twice")


def remap_parameter(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer | None, src: torch.Tensor,
                    shape: tuple[int, ...], values: torch.Tensor | None = None) -> None:
    """Give ``param`` the new ``shape`` (same Parameter object): its data is ``values`` if
    given, else the old data gathered at ``src`` (0 where src < 0); every optimizer state
    tensor of the parameter's old shape is gathered the same way (0 for new elements)."""
    src = src.reshape(-1)
    old_shape = param.shape
    check_src(src, param.numel())
    with torch.no_grad():
        new = gather_or_zero(param.detach(), src).reshape(shape) if values is None else values.reshape(shape)
        if optimizer is not None:
            state = optimizer.state.get(param, {})
            for key, t in list(state.items()):
                if isinstance(t, torch.Tensor) and t.shape == old_shape and t.numel() == param.numel():
                    state[key] = gather_or_zero(t, src).reshape(shape)
        resize_parameter(param, new.to(param.dtype).contiguous())
    # A gradient of the old pattern means nothing for the new one.
    param.grad = None


def apply_mask_update(layer: SparseLayer, optimizer: torch.optim.Optimizer | None, src: torch.Tensor,
                      values: torch.Tensor | None = None, **pattern: torch.Tensor) -> dict:
    """Swap ``layer`` to a new pattern and remap its optimizer state.

    Args:
        layer: SparseLinear (pattern: rows, cols, sorted by (row, col)), FanInLinear
            (indices [n, k], rows [n]) or DiagLinear (offsets [K]).
        optimizer: holds ``layer.values`` (or None).
        src: int64 [new numel]: old flat position kept by each new element, -1 if grown.
        values: explicit new values (initialisation, DynaDiag's folding); default: the old
            values gathered at ``src``, grown ones 0.
    Returns:
        {"kept", "dropped", "grown"} element counts (kept + grown = new nnz; kept + dropped =
        old nnz).
    """
    old_numel = layer.values.numel()
    shape = layer.values_shape(**pattern)
    if isinstance(layer, SparseLinear):
        # set_pattern sorts by (row, col): src must already be in that order.
        flat = pattern["rows"].long() * layer.in_features + pattern["cols"].long()
        if flat.numel() > 1 and not bool((flat.diff() > 0).all()):
            raise ValueError("rows/cols must be sorted by (row, col) and distinct")
    remap_parameter(layer.values, optimizer, src, shape, values)
    layer.set_pattern(layer.values.detach(), **pattern)
    kept = int((src >= 0).sum())
    return {"kept": kept, "dropped": old_numel - kept, "grown": int(src.numel()) - kept}
