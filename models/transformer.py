"""The transformer block shared by the ViT and the BERT: pre-LayerNorm attention + MLP whose
four linear maps (qkv, attention out, fc1, fc2) come from a ``linear`` factory.

The factory is ``linear(name, in_features, out_features, bias) -> nn.Module`` where ``name`` is
the module's path in the finished model (e.g. "blocks.0.attn.qkv"), so that a caller can give
every layer its own density, and build a sparse layer directly - a dense weight is never
allocated for a layer the factory makes sparse. The default factory is ``dense_linear``.

Shapes: x [B, N, dim] -> [B, N, dim]; an optional boolean ``key_mask`` [B, N] (True = real
token) hides padding from attention.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

LinearFactory = Callable[[str, int, int, bool], nn.Module]


def dense_linear(name: str, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """The default factory: a plain nn.Linear (``name`` is unused)."""
    return nn.Linear(in_features, out_features, bias=bias)


def sparse_layer_shapes(build: Callable[..., nn.Module], *args, **kwargs) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every layer a model asks its factory for.

    ``build(*args, linear=..., **kwargs)`` is run on the meta device, so nothing is allocated;
    the result feeds layer-wise density rules (uniform, ERK) before the real model is built.
    """
    shapes: dict[str, tuple[int, int]] = {}

    def record(name, in_features, out_features, bias=True):
        shapes[name] = (out_features, in_features)
        return nn.Linear(in_features, out_features, bias=bias)

    with torch.device("meta"):
        build(*args, linear=record, **kwargs)
    return shapes


class Attention(nn.Module):
    def __init__(self, name: str, dim: int, heads: int, dropout: float, linear: LinearFactory):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = linear(f"{name}.qkv", dim, 3 * dim, True)
        self.out = linear(f"{name}.out", dim, dim, True)

    def forward(self, x, key_mask=None):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        # Under autocast y is bf16; the sparse layers take it as nn.Linear does (no cast back).
        return self.out(rearrange(y, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, name: str, dim: int, mlp_dim: int, dropout: float, linear: LinearFactory):
        super().__init__()
        self.fc1 = linear(f"{name}.fc1", dim, mlp_dim, True)
        self.fc2 = linear(f"{name}.fc2", mlp_dim, dim, True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)) (pre-LN: stable without warm-up tricks)."""

    def __init__(self, name: str, dim: int, heads: int, mlp_dim: int, dropout: float,
                 linear: LinearFactory):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(f"{name}.attn", dim, heads, dropout, linear)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(f"{name}.mlp", dim, mlp_dim, dropout, linear)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_mask=None):
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.mlp(self.norm2(x))
