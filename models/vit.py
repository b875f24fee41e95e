"""A compact Vision Transformer whose qkv, attention out, fc1 and fc2 come from a ``linear``
factory (sparse layers of ``kernels`` in training, nn.Linear by default); the patch embedding,
the class token, the position embedding and the classifier head stay dense.

images [B, C, H, W] -> logits [B, num_classes]; tokens: 1 class token + (H/p)(W/p) patches.

Example:
    >>> cfg = ViTConfig.preset("tiny")                  # MNIST-sized, trains on 2 CPU cores
    >>> model = ViT(cfg)                                # dense
    >>> logits = model(torch.randn(8, 1, 28, 28))       # [8, 10]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from .transformer import EncoderConfig, LinearFactory, dense_linear, encoder_blocks


# Sizes: "micro" for tests (seconds), "tiny" the MNIST default (minutes on 2 CPU cores), then the
# ViT paper's S/16, B/16 and L/16 shapes at 224x224 RGB with 1000 classes.
VIT_PRESETS = {
    "micro": dict(dim=32, depth=1, heads=2, mlp_dim=64),
    "tiny": dict(dim=64, depth=4, heads=4, mlp_dim=256),
    "small": dict(image_size=224, patch_size=16, channels=3, num_classes=1000, dim=384, depth=12,
                  heads=6, mlp_dim=1536),
    "base": dict(image_size=224, patch_size=16, channels=3, num_classes=1000, dim=768, depth=12,
                 heads=12, mlp_dim=3072),
    "large": dict(image_size=224, patch_size=16, channels=3, num_classes=1000, dim=1024, depth=24,
                  heads=16, mlp_dim=4096),
}


@dataclass
class ViTConfig(EncoderConfig):
    image_size: int = 28     # input height = width
    patch_size: int = 7      # side of a square patch; must divide image_size
    channels: int = 1        # input channels (1 MNIST, 3 RGB)
    num_classes: int = 10    # classifier outputs
    dim: int = 64            # token width
    depth: int = 4           # transformer blocks
    heads: int = 4           # attention heads; must divide dim
    mlp_dim: int = 256       # hidden width of each block's MLP (fc1 out, fc2 in)
    dropout: float = 0.0     # dropout on attention, MLP and residual branches
    fused_mlp: bool = False  # MLPs as one kernels.fused_mlp call where dropout cannot act (p = 0 or
                             # eval); needs DiagLinear fc1 / fc2 with block >= 16 (models/transformer.py)

    kind: ClassVar[str] = "ViT"
    presets: ClassVar[dict] = VIT_PRESETS
    input_fields: ClassVar[tuple[str, ...]] = ("image_size", "patch_size", "channels", "num_classes")

    def _check_inputs(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")


class ViT(nn.Module):
    """Pre-LN ViT with a class token; ``linear`` builds the blocks' linears by name
    (transformer.encoder_blocks)."""

    def __init__(self, config: ViTConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.config = c = config.validate()
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Linear(c.patch_size * c.patch_size * c.channels, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, c.dim) * 0.02)
        self.blocks = encoder_blocks(c, linear)
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)

    def forward(self, images):
        p = self.config.patch_size
        x = self.patch_embed(rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
