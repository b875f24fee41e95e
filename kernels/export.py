"""Export: a trained sparse model in condensed form (safetensors), back again, and to dense.

The file holds every parameter and buffer of the model exactly as stored (values, int32
indices, offsets, rows, ...) plus JSON metadata naming each sparse layer's format and shape,
so the layers can be rebuilt without the training code (``load_layers``) or loaded into a
model of the same architecture (``load_into``). Writes are atomic: a temp file, fsync, rename.

Example:
    save_condensed(model, "vit90.safetensors", extra={"accuracy": 0.93})
    layers, meta = load_layers("vit90.safetensors")   # {name: FanInLinear | DiagLinear | SparseLinear}
    densify(model)                                      # sparse layers -> nn.Linear, in place
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .diag import DiagLinear
from .fanin import FanInLinear  # noqa: F401 (imported: each layer class registers its format)
from .module import SparseLayer
from .sparse import SparseLinear  # noqa: F401

FORMAT_VERSION = 1


def _layer_meta(layer: SparseLayer) -> dict:
    meta = {"format": layer.format, "in_features": layer.in_features,
            "out_features": layer.out_features, "bias": layer.bias is not None,
            "dtype": str(layer.values.dtype).replace("torch.", ""),
            **{name: getattr(layer, name) for name in layer.options}}   # DiagLinear: block_size
    if isinstance(layer, DiagLinear):
        meta["k_target"] = layer.k_target   # its gate (DynaDiag before the freeze)
    return meta


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``: a crash at any moment
    leaves either the old file or the new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_condensed(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save ``model`` with its sparse layers in condensed form (no dense [out, in] tensor)."""
    layers = {name: _layer_meta(m) for name, m in model.named_modules() if isinstance(m, SparseLayer)}
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    header = {"alwayssparse_format": FORMAT_VERSION, "layers": layers, "extra": extra or {}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"alwayssparse": json.dumps(header)}))


def read_condensed(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a condensed file; a clear error if it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no condensed model at {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("alwayssparse")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if raw is None:
        raise ValueError(f"{path} has no alwayssparse metadata: not a condensed model of this project")
    header = json.loads(raw)
    if header.get("alwayssparse_format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {header.get('alwayssparse_format')}, expected {FORMAT_VERSION}")
    return tensors, header


def load_layers(path: str | os.PathLike, device=None) -> tuple[dict[str, SparseLayer], dict]:
    """Rebuild every sparse layer of a condensed file without the model's code."""
    tensors, header = read_condensed(path)
    layers = {}
    for name, meta in header["layers"].items():
        cls = SparseLayer.by_format[meta["format"]]
        dtype = getattr(torch, meta["dtype"])
        kwargs = {"bias": meta["bias"], "device": device, "dtype": dtype, **{o: meta[o] for o in cls.options}}
        prefix = f"{name}." if name else ""
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if meta["format"] == "diag":
            kwargs["num_diagonals"] = sub["offsets"].numel()
        else:
            kwargs["density"] = 1.0 / meta["in_features"]  # placeholder pattern, replaced below
        layer = cls(meta["in_features"], meta["out_features"], **kwargs)
        if meta["format"] == "diag" and "scores" in sub:
            layer.enable_gate(meta["k_target"], float(sub["temperature"]), sub["scores"])
        layer.load_state_dict(sub)
        layers[name] = layer.to(device) if device is not None else layer
    return layers, header


def load_into(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict:
    """Load a condensed file into a model of the same architecture (its patterns may differ:
    sparse layers take the stored shapes). Returns the header's ``extra``."""
    tensors, header = read_condensed(path)
    mine = {name: _layer_meta(m)["format"] for name, m in model.named_modules() if isinstance(m, SparseLayer)}
    theirs = {name: meta["format"] for name, meta in header["layers"].items()}
    if strict and mine != theirs:
        raise ValueError(f"{path} holds sparse layers {theirs}, the model has {mine}")
    for name, m in model.named_modules():
        meta = header["layers"].get(name)
        if isinstance(m, DiagLinear) and meta and f"{name}.scores" in tensors and m.scores is None:
            m.enable_gate(meta["k_target"], float(tensors[f"{name}.temperature"]), tensors[f"{name}.scores"])
    model.load_state_dict(tensors, strict=strict)
    return header.get("extra", {})


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer of ``model`` by an equivalent dense nn.Linear, in place."""
    if isinstance(model, SparseLayer):
        return model.to_linear()
    for name, child in list(model.named_children()):
        if isinstance(child, SparseLayer):
            setattr(model, name, child.to_linear())
        else:
            densify(child)
    return model


def sparse_from_dense(linear: nn.Linear, fmt: str, pattern, block_size: int = 1) -> SparseLayer:
    """A sparse layer holding ``linear``'s weights on an explicit pattern: a boolean mask for
    "sparse" and "fanin", int32 diagonal offsets for "diag"."""
    if fmt not in SparseLayer.by_format:
        raise ValueError(f"fmt must be one of {sorted(SparseLayer.by_format)}, got {fmt!r}")
    bias = linear.bias.detach() if linear.bias is not None else None
    if fmt == "diag":
        return DiagLinear.from_dense(linear.weight.detach(), pattern, bias, block_size=block_size)
    return SparseLayer.by_format[fmt].from_dense(linear.weight.detach(), pattern, bias)
