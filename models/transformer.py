"""The transformer block shared by the ViT, the BERT and the GPT: pre-LayerNorm attention + MLP
whose four linear maps (qkv, attention out, fc1, fc2) come from a ``linear`` factory; causal
attention (each token sees itself and the tokens before it) for a decoder (``causal=True``).

The factory is ``linear(name, in_features, out_features, bias) -> nn.Module`` where ``name`` is
the module's path in the finished model (e.g. "blocks.0.attn.qkv"), so that a caller can give
every layer its own density, and build a sparse layer directly - a dense weight is never
allocated for a layer the factory makes sparse. The default factory is ``dense_linear``.

Shapes: x [B, N, dim] -> [B, N, dim]; an optional boolean ``key_mask`` [B, N] (True = real
token) hides padding from attention.

Fused MLP (``fused=True``, opt-in): fc1 and fc2 must be ``kernels.DiagLinear`` layers with one
block size >= 16 (a ValueError at construction otherwise); the forward then runs
``kernels.fused_mlp`` (fc1 -> GELU -> fc2 in one kernel, the hidden activation never written;
see kernels/fused.py for its cost) whenever dropout cannot act: dropout 0, or eval mode.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import alwayssparse.kernels as kernels
from alwayssparse.kernels.fused import MIN_BLOCK_SIZE

from .attention import self_attention
from .dropout import Dropout

LinearFactory = Callable[[str, int, int, bool], nn.Module]


class EncoderConfig:
    """What ViTConfig and BertConfig share: a preset by name, and the checks of an encoder's
    fields (subclasses name their own int fields and may check more in ``_check_inputs``)."""
    kind: ClassVar[str]                 # "ViT": for the error of an unknown preset
    presets: ClassVar[dict]             # {name: field values}
    input_fields: ClassVar[tuple[str, ...]]   # the ints of the input side (image_size, vocab_size, ...)
    causal: ClassVar[bool] = False      # causal attention in every block (a decoder: GPTConfig)

    @classmethod
    def preset(cls, name: str, **overrides):
        """A named model size (see ``presets``) with field overrides."""
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.kind} preset {name!r}; choose from {sorted(cls.presets)}")
        return dataclasses.replace(cls(**cls.presets[name]), **overrides)

    def _check_inputs(self) -> None:
        """Checks of the input-side fields beyond being ints >= 1."""

    def validate(self):
        """ValueError naming the first bad field; returns self."""
        for f in self.input_fields + ("dim", "depth", "heads", "mlp_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be an int >= 1, got {getattr(self, f)!r}")
        self._check_inputs()
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not isinstance(self.fused_mlp, bool):
            raise ValueError(f"fused_mlp must be a bool, got {self.fused_mlp!r}")
        return self


def dense_linear(name: str, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """The default factory: a plain nn.Linear (``name`` is unused)."""
    return nn.Linear(in_features, out_features, bias=bias)


def sparse_layer_shapes(build: Callable[..., nn.Module], *args, **kwargs) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every layer a model asks its factory for.

    ``build(*args, linear=..., **kwargs)`` is run on the meta device, so nothing is allocated;
    the result feeds layer-wise density rules (uniform, ERK) before the real model is built.
    """
    shapes: dict[str, tuple[int, int]] = {}
    if args and dataclasses.is_dataclass(args[0]) and getattr(args[0], "fused_mlp", False):
        # Fusion changes no shape, and the recorder's nn.Linear layers cannot be fused.
        args = (dataclasses.replace(args[0], fused_mlp=False), *args[1:])

    def record(name, in_features, out_features, bias=True):
        shapes[name] = (out_features, in_features)
        return nn.Linear(in_features, out_features, bias=bias)

    with torch.device("meta"):
        build(*args, linear=record, **kwargs)
    return shapes


class Attention(nn.Module):
    """Multi-head self-attention (models/attention.py: torch's scaled_dot_product_attention, or
    on CPU in bf16 our batched GEMMs); ``causal=True``: token i attends to tokens 0..i only
    (no padding mask besides)."""

    def __init__(self, name: str, dim: int, heads: int, dropout: float, linear: LinearFactory,
                 causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.causal = causal
        self.qkv = linear(f"{name}.qkv", dim, 3 * dim, True)
        self.out = linear(f"{name}.out", dim, dim, True)

    def forward(self, x, key_mask=None):
        y = self_attention(self.qkv(x), self.heads, key_mask, self.causal,
                           dropout_p=self.dropout if self.training else 0.0)
        # Under autocast y is bf16; the sparse layers take it as nn.Linear does (no cast back).
        return self.out(y)


def check_fusable(name: str, fc1: nn.Module, fc2: nn.Module) -> None:
    """ValueError unless fc1 and fc2 are DiagLinear layers with one block size >= 16, the
    layers ``kernels.fused_mlp`` takes."""
    for layer_name, layer in (("fc1", fc1), ("fc2", fc2)):
        if not isinstance(layer, kernels.DiagLinear):
            raise ValueError(f"fused MLP {name} needs kernels.DiagLinear layers (DynaDiag); "
                             f"{name}.{layer_name} is {type(layer).__name__}")
        if layer.block_size < MIN_BLOCK_SIZE:
            raise ValueError(f"fused MLP {name} needs a block size >= {MIN_BLOCK_SIZE}; "
                             f"{name}.{layer_name} has block size {layer.block_size}")
    if fc1.block_size != fc2.block_size:
        raise ValueError(f"fused MLP {name} needs one block size for fc1 and fc2, got "
                         f"{fc1.block_size} and {fc2.block_size}")


class MLP(nn.Module):
    """fc2(GELU(fc1(x))) with dropout after the GELU and after fc2.

    ``fused=True`` runs ``kernels.fused_mlp(fc1, fc2, x)`` instead when dropout cannot act
    (p = 0 or eval mode) - the same function and the same gradients for values, biases and
    DynaDiag gate scores (it reads ``effective_values()``), with the hidden activation never
    stored. It calls neither layer's forward, so a layer with forward hooks (the Sparsifier's
    capture for gradient-based rules; DynaDiag registers none) runs unfused, for the hooks.
    """

    def __init__(self, name: str, dim: int, mlp_dim: int, dropout: float, linear: LinearFactory,
                 fused: bool = False):
        super().__init__()
        self.fc1 = linear(f"{name}.fc1", dim, mlp_dim, True)
        self.fc2 = linear(f"{name}.fc2", mlp_dim, dim, True)
        self.drop = Dropout(dropout)
        if fused:
            check_fusable(name, self.fc1, self.fc2)
        self.fused = fused

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.fc2))

    def forward(self, x):
        if self.fused and (self.drop.p == 0 or not self.training) and not self._hooked():
            return kernels.fused_mlp(self.fc1, self.fc2, x)
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)) (pre-LN: stable without warm-up tricks)."""

    def __init__(self, name: str, dim: int, heads: int, mlp_dim: int, dropout: float,
                 linear: LinearFactory, fused_mlp: bool = False, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(f"{name}.attn", dim, heads, dropout, linear, causal=causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(f"{name}.mlp", dim, mlp_dim, dropout, linear, fused=fused_mlp)
        self.drop = Dropout(dropout)

    def forward(self, x, key_mask=None):
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.mlp(self.norm2(x))


def encoder_blocks(config: EncoderConfig, linear: LinearFactory) -> nn.ModuleList:
    """The encoder's ``config.depth`` blocks, their linears named "blocks.{i}.attn.qkv",
    "blocks.{i}.attn.out", "blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc2" (the names ``linear``
    gets, and the module paths in the model, as the trainers' sparse layers need them); causal
    attention when the config's class says so (``causal``)."""
    c = config
    return nn.ModuleList(Block(f"blocks.{i}", c.dim, c.heads, c.mlp_dim, c.dropout, linear, c.fused_mlp,
                               causal=c.causal) for i in range(c.depth))
