"""Multi-head self-attention from a packed qkv, for the transformer blocks: torch's
``scaled_dot_product_attention``, or on CPU in bf16 our product of batched GEMMs (``bmm``).

Shapes: qkv [B, N, 3 * H * D] (q, k, v side by side, each H heads of D) -> y [B, N, H * D];
``key_mask`` [B, N] bool (True = a real token) hides padding from every query; ``causal``:
token i attends to tokens 0..i; dropout on the attention probabilities.

Why a second path: on the 2-core AMD EPYC Zen 4 (avx512_bf16, no AMX), torch 2.13's CPU flash
attention in bf16 took 17-18 ms forward and 79-89 ms forward + backward for ViT-B/16's attention
at batch 8 (12 heads, 197 tokens, D 64); three bf16 GEMMs per image and a softmax between them
took 12 and 41 ms. Attention was then ~45% of a 90%-sparse ViT-B/16 training step under bf16
autocast (the sparse linears ~38%). ``bench/cpu_attention.py`` measures both paths on any CPU.

The ``bmm`` path, a chunk of sequences at a time (all their heads at once; CHUNK_BYTES): s = (q k^T) *
scale as one GEMM with bf16 output, masked positions -inf, p = softmax(s) (fp32 inside, bf16
out), y = dropout(p) v. Nothing of size N x N is kept for the backward: it saves qkv (as the
flash kernel saves q, k, v) and the dropout's keep mask where dropout acts, and recomputes s
and p per chunk. The scores are rounded to bf16 before the softmax (as attention written
with bf16 matmuls is, e.g. an eager implementation under autocast), where the flash kernel
keeps them in fp32: the output's error against fp64 is about twice the flash kernel's (tests:
tests/models/test_attention.py).

The dropout's keep mask is ``models.dropout.keep_mask((B, H, N, N), p)``, one draw from the
default generator per forward (the bool mask is kept for the backward).

Which path (``backend``): "auto" takes ``bmm`` for a CPU tensor in bf16 with N <=
BMM_MAX_TOKENS on a CPU without AMX, else torch's; ``MODELS_ATTENTION=sdpa`` or ``=bmm``
overrides "auto" (``bmm`` on any CPU tensor, any dtype; a CUDA tensor always takes torch's).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from einops import rearrange

import alwayssparse.kernels as kernels

from .dropout import keep_mask

BACKENDS = ("auto", "sdpa", "bmm")
BACKEND_ENV = "MODELS_ATTENTION"
# Up to this many tokens "auto" takes bmm: measured on the Zen 4 (bench/cpu_attention.py, bf16, one
# thread, forward + backward, two runs): 128 tokens 1.95-2.72x torch's kernel, 197 1.80-2.00x,
# 512 1.36-1.49x, 1024 0.79x in one run and 1.35x in the other, 1024 causal 0.81x in both (torch's
# flash kernel skips the masked blocks). The cut stays below what was consistent.
BMM_MAX_TOKENS = 256


def _amx_cpu() -> bool:
    return kernels.cpu.amx_instructions()


def backend_for(qkv: torch.Tensor, backend: str = "auto") -> str:
    """The path ``self_attention`` takes for this qkv: "sdpa" or "bmm" (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not an attention backend; choose from {BACKENDS}")
        backend = forced
    if qkv.device.type != "cpu":
        return "sdpa"
    if backend == "auto":
        fits = qkv.dtype == torch.bfloat16 and qkv.shape[1] <= BMM_MAX_TOKENS
        return "bmm" if fits and not _amx_cpu() else "sdpa"
    return backend


class _SplitHeads(torch.autograd.Function):
    """qkv [B, N, 3 * H * D] -> q, k, v, each a [B, H, N, D] view. Its backward writes the three
    gradients into the packed layout in one pass: autograd's own (einops' unbind and permute)
    stacks them [3, B, H, N, D] and then copies that transpose into [B, N, 3 H D], two passes
    over a qkv-sized tensor a layer (ViT-B at 50,432 tokens: 5.6 GB a training step)."""

    @staticmethod
    def forward(ctx, qkv, heads: int):
        b, n, _ = qkv.shape
        t = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        return t[0], t[1], t[2]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        # [B, H, N, D] -> [B, N, H, D] views, stacked at dim 2: [B, N, 3, H, D], the qkv layout
        g = torch.stack([d.transpose(1, 2) for d in (dq, dk, dv)], dim=2)
        return g.flatten(2), None


# Sequences per chunk: as many as keep a chunk's bf16 scores [c H, N, N] within this many bytes
# (a core's L2 is 1-2 MiB), so that small sequences share their calls (at 2 heads of 17 tokens,
# one sequence at a time ran 4x slower than torch's kernel: the calls, not the arithmetic).
CHUNK_BYTES = 1 << 20


def _chunks(B: int, heads: int, N: int):
    per = max(1, CHUNK_BYTES // (heads * N * N * 2))
    return ((b, min(b + per, B)) for b in range(0, B, per))


def _heads(t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """q, k, v [3, c H, N, D] of sequences b0..b1 of t = qkv [B, N, 3, H, D], contiguous: one
    copy (torch's bmm copies a strided operand to contiguous itself, k^T at ~3x the others' cost:
    at ViT-B/16's shapes these copies were ~6% of the step)."""
    return t[b0:b1].permute(2, 0, 3, 1, 4).reshape(3, -1, t.shape[1], t.shape[4]).contiguous()


def _unheads(y: torch.Tensor, c: int) -> torch.Tensor:
    """[c H, N, D] -> the [c, N, H, D] view that goes back into qkv's or y's layout."""
    return y.unflatten(0, (c, -1)).transpose(1, 2)


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """(a @ b) * scale [G, M, N], the scale inside the GEMM (one rounding to bf16, not two)."""
    return torch.baddbmm(a.new_empty(()).expand(a.shape[0], a.shape[1], b.shape[2]), a, b, beta=0, alpha=scale)


def _probabilities(q, k, scale: float, hidden: torch.Tensor | None) -> torch.Tensor:
    """softmax((q k^T) * scale) [c H, N, N] with the ``hidden`` positions ([c, 1, N or 1, N]
    bool, broadcast over heads) at 0."""
    s = _scaled_bmm(q, k.transpose(1, 2), scale)
    if hidden is not None:
        c = hidden.shape[0]
        s.unflatten(0, (c, -1)).masked_fill_(hidden, float("-inf"))
    return torch.softmax(s, -1)


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, scale: float, b0: int, b1: int) -> torch.Tensor:
    """x [c H, N, N] of sequences b0..b1 with the dropout's keep mask [B, H, N, N] applied (the
    forward's probabilities and the backward's gradient alike: the same rounding)."""
    return x if keep is None else x * keep[b0:b1].flatten(0, 1) * scale


def _layout(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, int, float]:
    """(qkv as [B, N, 3, H, D], D, the scores' scale D^-1/2)."""
    B, N, width = qkv.shape
    D = width // (3 * heads)
    return qkv.view(B, N, 3, heads, D), D, D ** -0.5


def _hidden(hidden: torch.Tensor | None, b0: int, b1: int) -> torch.Tensor | None:
    return None if hidden is None else hidden[b0:b1]


class _BmmAttention(torch.autograd.Function):
    """The ``bmm`` path (module docstring), a chunk of sequences at a time (_chunks)."""

    @staticmethod
    def forward(ctx, qkv, heads: int, hidden, dropout_p: float):
        B, N, _ = qkv.shape
        t, D, scale = _layout(qkv, heads)
        keep, keep_scale = keep_mask((B, heads, N, N), dropout_p) if dropout_p > 0 else (None, 1.0)
        y = qkv.new_empty(B, N, heads, D)
        with torch.autocast("cpu", enabled=False):
            for b0, b1 in _chunks(B, heads, N):
                q, k, v = _heads(t, b0, b1)
                p = _dropped(_probabilities(q, k, scale, _hidden(hidden, b0, b1)), keep, keep_scale, b0, b1)
                y[b0:b1] = _unheads(torch.bmm(p, v), b1 - b0)
        ctx.save_for_backward(qkv, hidden, keep)
        ctx.heads, ctx.keep_scale = heads, keep_scale
        return y.view(B, N, heads * D)

    @staticmethod
    def backward(ctx, dy):
        qkv, hidden, keep = ctx.saved_tensors
        heads, keep_scale = ctx.heads, ctx.keep_scale
        B, N, width = qkv.shape
        t, D, scale = _layout(qkv, heads)
        dy = dy.reshape(B, N, heads, D)
        dt = torch.empty_like(t)   # [B, N, 3, H, D]: the qkv gradient in qkv's layout
        with torch.autocast("cpu", enabled=False):
            for b0, b1 in _chunks(B, heads, N):
                c = b1 - b0
                q, k, v = _heads(t, b0, b1)
                do = dy[b0:b1].transpose(1, 2).reshape(-1, N, D).contiguous()   # [c H, N, D]
                p = _probabilities(q, k, scale, _hidden(hidden, b0, b1))
                dp = _dropped(torch.bmm(do, v.transpose(1, 2)), keep, keep_scale, b0, b1)   # d p [c H, N, N]
                dropped = _dropped(p, keep, keep_scale, b0, b1)   # the forward's, bit for bit
                dt[b0:b1, :, 2] = _unheads(torch.bmm(dropped.transpose(1, 2), do), c)
                ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)   # d(scaled scores)
                dt[b0:b1, :, 0] = _unheads(_scaled_bmm(ds, k, scale), c)
                dt[b0:b1, :, 1] = _unheads(_scaled_bmm(ds.transpose(1, 2), q, scale), c)
        return dt.view(B, N, width), None, None, None


def self_attention(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None, causal: bool = False,
                   dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention of a packed qkv [B, N, 3 * heads * D] -> [B, N, heads * D].

    ``key_mask`` [B, N] bool (True = real token) or ``causal`` (not both); ``dropout_p`` on the
    attention probabilities (pass 0 in eval). ``backend`` "auto" / "sdpa" / "bmm": the module
    docstring.

        y = self_attention(qkv, heads=12)                       # ViT / BERT
        y = self_attention(qkv, heads=12, causal=True)          # GPT
    """
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if qkv.dim() != 3 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qkv must be [B, N, 3 * heads * D] with heads={heads}, got {tuple(qkv.shape)}")
    if causal and key_mask is not None:
        raise ValueError("causal attention takes no key_mask (pad at the end: a causal token never sees it)")
    B, N, _ = qkv.shape
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, N)):
        raise ValueError(f"key_mask must be bool [B, N] = [{B}, {N}], got {key_mask.dtype} {tuple(key_mask.shape)}")
    if backend_for(qkv, backend) == "bmm":
        if causal:
            hidden = torch.ones(N, N, dtype=torch.bool, device=qkv.device).triu(1)[None].expand(B, N, N)
        elif key_mask is not None:
            hidden = (~key_mask)[:, None, :]   # [B, 1, N]: broadcast over queries
        else:
            hidden = None
        if hidden is not None:   # [B, 1, N or 1, N]: broadcast over heads
            hidden = hidden[:, None]
        return _BmmAttention.apply(qkv, heads, hidden, float(dropout_p))
    q, k, v = _SplitHeads.apply(qkv, heads)  # "b n (three h d) -> three b h n d"
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    # Under autocast y is bf16; the sparse layers take it as nn.Linear does (no cast back).
    return rearrange(y, "b h n d -> b n (h d)")
