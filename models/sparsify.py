"""Swap the nn.Linear layers of any model (Hugging Face transformers included) for other
modules - in practice the sparse layers of ``kernels`` - chosen by a name filter.

Two ways to use it:

1. From a trained dense model, keep an explicit mask (no always-sparse claim: the dense weight
   exists already)::

       sparsify(model, lambda name, lin: SparseLinear.from_dense(lin.weight, mask[name], lin.bias))

2. Always sparse: build the model on the meta device (no memory), swap the block linears for
   freshly initialised sparse layers, then give the remaining (dense) parameters real storage::

       with torch.device("meta"):
           model = BertForMaskedLM(config)
       sparsify(model, lambda name, lin: SparseLinear(lin.in_features, lin.out_features, 0.1),
                include=BLOCK_LINEARS)
       materialize(model, "cpu", init=model._init_weights)   # HF's own per-module init
       model.tie_weights()                                     # HF: re-tie the LM decoder

``BLOCK_LINEARS`` matches the linear layers inside numbered transformer blocks (HF's
"encoder.layer.3.", "layers.3.", GPT-2's "h.3.", timm's and ours "blocks.3."), which leaves
embeddings, poolers and heads dense.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

BLOCK_LINEARS = r"(^|\.)(layer|layers|h|blocks)\.\d+\."

Filter = str | Callable[[str, nn.Module], bool] | None


def _matcher(pattern: Filter, default: bool) -> Callable[[str, nn.Module], bool]:
    if pattern is None:
        return lambda name, module: default
    if isinstance(pattern, str):
        regex = re.compile(pattern)
        return lambda name, module: regex.search(name) is not None
    if callable(pattern):
        return pattern
    raise TypeError(f"include/exclude must be a regex string, a callable or None, got {type(pattern).__name__}")


def sparsify(model: nn.Module, make_layer: Callable[[str, nn.Linear], nn.Module],
             include: Filter = None, exclude: Filter = None) -> list[str]:
    """Replace, in place, each ``nn.Linear`` of ``model`` whose qualified name matches
    ``include`` (regex searched in the name, or ``f(name, module) -> bool``; None = all) and not
    ``exclude``, by ``make_layer(name, linear)``. Returns the replaced names, in model order.

    Example:
        >>> names = sparsify(model, lambda n, lin: FanInLinear(lin.in_features, lin.out_features, 0.1),
        ...                  include=BLOCK_LINEARS)
    """
    wanted, unwanted = _matcher(include, True), _matcher(exclude, False)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and wanted(name, module) and not unwanted(name, module)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make_layer(name, linear)
        if not isinstance(new, nn.Module):
            raise TypeError(f"make_layer must return an nn.Module for {name!r}, got {type(new).__name__}")
        setattr(parent, child, new)
    return [name for name, _ in targets]


def materialize(model: nn.Module, device, init: Callable[[nn.Module], None] | None = None) -> list[str]:
    """Give every parameter / buffer still on the meta device real (uninitialised) storage on
    ``device``, one owning module at a time, then initialise that module with ``init(module)``
    (e.g. a Hugging Face model's ``_init_weights``) or else its ``reset_parameters()``.
    Returns the names of the modules materialised. Layers that are already real are untouched,
    so a sparse layer built on ``device`` keeps its values."""
    done = []
    for name, module in model.named_modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in tensors):
            continue
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            if init is not None:
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                raise ValueError(f"module {name!r} ({type(module).__name__}) has meta tensors and no "
                                 "reset_parameters(); pass init=")
        done.append(name)
    return done
