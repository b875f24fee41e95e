"""A compact BERT encoder with a masked-LM head. qkv, attention out, fc1 and fc2 of every block
come from a ``linear`` factory (sparse layers of ``kernels`` in training, nn.Linear by
default); token / position embeddings and the LM head (transform + decoder tied to the token
embedding) stay dense.

Differences from the original BERT, for quick and stable small-scale training: pre-LN blocks
with a final LayerNorm, no token-type embedding, no pooler / next-sentence head.

input_ids [B, N] (int64), optional attention_mask [B, N] (1 = token, 0 = padding)
-> logits [B, N, vocab_size].

Example:
    >>> cfg = BertConfig.preset("tiny", vocab_size=8000)
    >>> model = Bert(cfg)
    >>> logits = model(torch.randint(0, 8000, (4, 128)))   # [4, 128, 8000]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout
from .transformer import EncoderConfig, LinearFactory, dense_linear, encoder_blocks


# "micro" for tests, "tiny" the CPU default (2 x 128, like the BERT-tiny of Turc et al.), then
# BERT-mini / small / base / large shapes.
BERT_PRESETS = {
    "micro": dict(dim=32, depth=1, heads=2, mlp_dim=64, max_len=64),
    "tiny": dict(dim=128, depth=2, heads=2, mlp_dim=512, max_len=128),
    "mini": dict(dim=256, depth=4, heads=4, mlp_dim=1024, max_len=512),
    "small": dict(dim=512, depth=4, heads=8, mlp_dim=2048, max_len=512),
    "base": dict(vocab_size=30522, dim=768, depth=12, heads=12, mlp_dim=3072, max_len=512),
    "large": dict(vocab_size=30522, dim=1024, depth=24, heads=16, mlp_dim=4096, max_len=512),
}


@dataclass
class BertConfig(EncoderConfig):
    vocab_size: int = 8000   # WordPiece vocabulary size (set from the tokenizer)
    max_len: int = 128       # longest sequence (position embeddings)
    dim: int = 128           # hidden width
    depth: int = 2           # transformer blocks
    heads: int = 2           # attention heads; must divide dim
    mlp_dim: int = 512       # hidden width of each block's MLP
    dropout: float = 0.1     # dropout on embeddings, attention, MLP and residual branches
    fused_mlp: bool = False  # MLPs as one kernels.fused_mlp call where dropout cannot act (p = 0 or
                             # eval); needs DiagLinear fc1 / fc2 with block >= 16 (models/transformer.py)

    kind: ClassVar[str] = "BERT"
    presets: ClassVar[dict] = BERT_PRESETS
    input_fields: ClassVar[tuple[str, ...]] = ("vocab_size", "max_len")


class Bert(nn.Module):
    """Pre-LN BERT encoder + masked-LM head; ``linear`` builds the blocks' linears by name
    (transformer.encoder_blocks)."""

    def __init__(self, config: BertConfig, linear: LinearFactory = dense_linear):
        super().__init__()
        self.config = c = config.validate()
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Embedding(c.max_len, c.dim)
        self.embed_norm = nn.LayerNorm(c.dim)
        self.drop = Dropout(c.dropout)
        self.blocks = encoder_blocks(c, linear)
        self.norm = nn.LayerNorm(c.dim)
        self.lm_transform = nn.Linear(c.dim, c.dim)
        self.lm_norm = nn.LayerNorm(c.dim)
        self.lm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        with torch.no_grad():
            for emb in (self.tok_embed, self.pos_embed):
                emb.weight.normal_(0.0, 0.02)

    def encode(self, input_ids, attention_mask=None):
        """Final hidden states [B, N, dim]."""
        n = input_ids.shape[1]
        if n > self.config.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.config.max_len}")
        pos = torch.arange(n, device=input_ids.device)
        x = self.drop(self.embed_norm(self.tok_embed(input_ids) + self.pos_embed(pos)))
        key_mask = None if attention_mask is None else attention_mask.bool()
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def lm_head(self, h):
        """Vocabulary logits [..., vocab_size] of hidden states [..., dim]."""
        h = self.lm_norm(F.gelu(self.lm_transform(h)))
        return h @ self.tok_embed.weight.t() + self.lm_bias  # decoder tied to the token embedding

    def forward(self, input_ids, attention_mask=None, predict=None):
        """Logits [B, N, vocab_size]; with a boolean ``predict`` [B, N] only those positions'
        logits [n_predict, vocab_size] (masked-LM training: ~15% of the decoder's work)."""
        h = self.encode(input_ids, attention_mask)
        return self.lm_head(h if predict is None else h[predict])
