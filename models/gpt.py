"""A small decoder-only transformer (GPT-style causal language model). qkv, attention out, fc1
and fc2 of every block come from a ``linear`` factory (sparse layers of ``kernels`` in
training, nn.Linear by default); token / position embeddings stay dense and the output head is
the token embedding (tied), as in GPT-2.

Pre-LN blocks with causal attention (models/transformer.py) and a final LayerNorm, learned
position embeddings; no biasless variants, no rotary embeddings.

input_ids [B, N] (int64) -> logits [B, N, vocab_size]: the logits at position i predict token
i + 1.

Example:
    >>> cfg = GPTConfig.preset("tiny", vocab_size=4096)
    >>> model = GPT(cfg)
    >>> logits = model(torch.randint(0, 4096, (4, 64)))   # [4, 64, 4096]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout
from .transformer import EncoderConfig, LinearFactory, dense_linear, encoder_blocks


# "micro" for tests, "tiny" the CPU default (2 x 128), then GPT-2 small / medium shapes
# (Radford et al. 2019: 124M / 350M parameters at their 50,257-token vocabulary).
GPT_PRESETS = {
    "micro": dict(dim=32, depth=1, heads=2, mlp_dim=64, max_len=64),
    "tiny": dict(dim=128, depth=2, heads=2, mlp_dim=512, max_len=128),
    "mini": dict(dim=256, depth=4, heads=4, mlp_dim=1024, max_len=512),
    "small": dict(vocab_size=50257, dim=768, depth=12, heads=12, mlp_dim=3072, max_len=1024),
    "medium": dict(vocab_size=50257, dim=1024, depth=24, heads=16, mlp_dim=4096, max_len=1024),
}


@dataclass
class GPTConfig(EncoderConfig):
    vocab_size: int = 4096   # vocabulary size (set from the tokenizer)
    max_len: int = 128       # longest sequence (position embeddings)
    dim: int = 128           # hidden width
    depth: int = 2           # transformer blocks
    heads: int = 2           # attention heads; must divide dim
    mlp_dim: int = 512       # hidden width of each block's MLP
    dropout: float = 0.1     # dropout on embeddings, attention, MLP and residual branches
    fused_mlp: bool = False  # MLPs as one kernels.fused_mlp call where dropout cannot act (p = 0 or
                             # eval); needs DiagLinear fc1 / fc2 with block >= 16 (models/transformer.py)

    kind: ClassVar[str] = "GPT"
    presets: ClassVar[dict] = GPT_PRESETS
    input_fields: ClassVar[tuple[str, ...]] = ("vocab_size", "max_len")
    causal: ClassVar[bool] = True


class GPT(nn.Module):
    """Pre-LN decoder with tied input / output embeddings; ``linear`` builds the blocks' linears by
    name (transformer.encoder_blocks: "blocks.{i}.attn.qkv", ..., "blocks.{i}.mlp.fc2")."""

    def __init__(self, config: GPTConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.config = c = config.validate()
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Embedding(c.max_len, c.dim)
        self.drop = Dropout(c.dropout)
        self.blocks = encoder_blocks(c, linear)
        self.norm = nn.LayerNorm(c.dim)
        with torch.no_grad():
            for emb in (self.tok_embed, self.pos_embed):
                emb.weight.normal_(0.0, 0.02)   # GPT-2's init

    def forward(self, input_ids):
        """Next-token logits [B, N, vocab_size]."""
        n = input_ids.shape[1]
        if n > self.config.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.config.max_len}")
        pos = torch.arange(n, device=input_ids.device)
        x = self.drop(self.tok_embed(input_ids) + self.pos_embed(pos))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tok_embed.weight.t()   # the head is the token embedding (tied)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        """``input_ids`` [B, N] followed by ``max_new_tokens`` sampled tokens: [B, N + max_new_tokens].
        Each step samples from softmax(logits / temperature) over the ``top_k`` likeliest tokens
        (all when None), the context cut to the last ``max_len`` tokens."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.max_len:])[:, -1].float() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
            ids = torch.cat([ids, nxt], dim=1)
        return ids
