"""Swap the linear layers of any model (Hugging Face transformers included: nn.Linear, and GPT-2's
``Conv1D``, whose weight is stored [in, out]) for other modules - in practice the sparse layers of
``kernels`` - chosen by a name filter. Tied weights (an LM head that is the token embedding) are
left alone unless asked; the returned ``SparsifyReport`` says what was replaced, what stayed
dense and which share of the parameters the replaced layers hold.

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

GPT-2 (``GPT2LMHeadModel``) the same way: its block projections are ``Conv1D`` layers, handed to
``make_layer`` as nn.Linear views (W = weight.T); its ``lm_head`` is the token embedding and is
skipped (a warning says so) unless ``include_tied=True``. ``print(sparsify(...).summary())``
says how much of the model is now sparse.

``BLOCK_LINEARS`` matches the linear layers inside numbered transformer blocks (HF's
"encoder.layer.3.", "layers.3.", GPT-2's "h.3.", timm's and ours "blocks.3."), which leaves
embeddings, poolers and heads dense.
"""
from __future__ import annotations

import re
import warnings
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


def _conv1d_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's
    attention / MLP projections: y = x @ weight + bias, weight [in, out]), else None. Told by
    name, so that this module never imports transformers (an optional dependency)."""
    cls = type(module)
    if cls.__name__ != "Conv1D" or not cls.__module__.startswith("transformers"):
        return None
    n_in, n_out = module.weight.shape
    return n_in, n_out


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself if it is an nn.Linear; for a Conv1D an nn.Linear whose weight is the
    transpose *view* of the Conv1D's (W = weight.T, [out, in], the same storage: no copy, and on
    the meta device no memory) and whose bias is the Conv1D's."""
    if type(module) is nn.Linear:
        return module
    n_in, n_out = _conv1d_dims(module)
    with torch.device("meta"):   # the shell's own weight is replaced at once: never allocated
        view = nn.Linear(n_in, n_out, bias=False)
    view.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    view.bias = module.bias
    return view


class SparsifyReport(list):
    """What ``sparsify`` did: the list of replaced names (so ``sparsify(...)`` still compares
    equal to a list of names), and

    - ``kept_dense``: linear layers (nn.Linear / Conv1D) that stayed dense, {name: reason}
      ("not matched" by include / exclude, or "tied to <name>" for a weight shared with another
      module, e.g. GPT-2's lm_head and its token embedding);
    - ``replaced_parameters`` / ``total_parameters``: the dense parameter count of the replaced
      layers (weights + biases) and of the whole model before the swap (shared ones once);
      ``share`` the ratio: the part of the model that the sparse layers now hold.

    ``summary()`` says it in one line.
    """

    def __init__(self, replaced, kept_dense, replaced_parameters, total_parameters):
        super().__init__(replaced)
        self.kept_dense: dict[str, str] = kept_dense
        self.replaced_parameters = replaced_parameters
        self.total_parameters = total_parameters

    @property
    def replaced(self) -> list[str]:
        return list(self)

    @property
    def share(self) -> float:
        return self.replaced_parameters / max(self.total_parameters, 1)

    @property
    def tied(self) -> list[str]:
        return [n for n, why in self.kept_dense.items() if why.startswith("tied")]

    def summary(self) -> str:
        tied = f", {len(self.tied)} tied (skipped: {', '.join(self.tied)})" if self.tied else ""
        return (f"sparsify: replaced {len(self)} layer(s) holding {self.replaced_parameters:,} of "
                f"{self.total_parameters:,} parameters ({100 * self.share:.1f}%); "
                f"{len(self.kept_dense)} linear layer(s) kept dense{tied}; the rest (embeddings, norms, other "
                f"modules) stays dense")


def _tied_with(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): every qualified name it has} for parameters reachable under 2+ names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def sparsify(model: nn.Module, make_layer: Callable[[str, nn.Linear], nn.Module],
             include: Filter = None, exclude: Filter = None, *, include_tied: bool = False,
             warn_below: float = 0.5) -> SparsifyReport:
    """Replace, in place, each linear layer of ``model`` - ``nn.Linear``, and Hugging Face's
    ``Conv1D`` (GPT-2: weight stored [in, out]) - whose qualified name matches ``include``
    (regex searched in the name, or ``f(name, module) -> bool``; None = all) and not
    ``exclude``, by ``make_layer(name, linear)``. Returns a ``SparsifyReport``: the replaced
    names in model order (a list), what stayed dense and the parameter share replaced.

    ``linear`` is always an nn.Linear (y = x W^T + b, W [out, in]): for a Conv1D a view with
    W = conv.weight.T (shared storage, no copy), so ``from_dense(lin.weight, mask, lin.bias)``
    takes a mask [out, in] for either kind. A layer whose weight is shared with another module
    (tied: GPT-2's lm_head is its token embedding) is skipped with a warning, unless
    ``include_tied=True`` (the tie is then broken: the new layer has its own values). When the
    replaced layers hold less than ``warn_below`` of the model's parameters, a warning says so
    (a model that stays mostly dense should not pass for a sparse one).

    Example:
        >>> names = sparsify(model, lambda n, lin: FanInLinear(lin.in_features, lin.out_features, 0.1),
        ...                  include=BLOCK_LINEARS)
        >>> print(names.summary())
    """
    wanted, unwanted = _matcher(include, True), _matcher(exclude, False)
    tied = _tied_with(model)
    total = sum(p.numel() for p in model.parameters())
    targets, kept = [], {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear and _conv1d_dims(module) is None:
            continue
        if not (wanted(name, module) and not unwanted(name, module)):
            kept[name] = "not matched"
            continue
        others = [n for n in tied.get(id(module.weight), []) if n != f"{name}.weight"]
        if others and not include_tied:
            kept[name] = f"tied to {others[0]}"
            warnings.warn(f"sparsify: {name}.weight is tied to {', '.join(others)}; left dense "
                          "(pass include_tied=True to make it sparse and break the tie)", stacklevel=2)
            continue
        targets.append((name, module))
    replaced_params = 0
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replaced_params += sum(p.numel() for p in module.parameters(recurse=False))
        new = make_layer(name, _as_linear(module))
        if not isinstance(new, nn.Module):
            raise TypeError(f"make_layer must return an nn.Module for {name!r}, got {type(new).__name__}")
        setattr(parent, child, new)
    report = SparsifyReport([name for name, _ in targets], kept, replaced_params, total)
    if targets and report.share < warn_below:
        warnings.warn(report.summary(), stacklevel=2)
    return report


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
