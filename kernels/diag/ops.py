"""Custom ops of the diagonal format (a Triton launch for tensors that take the Triton backend,
the CPU path otherwise), their autograd and autocast, and the public ``diag_matmul``.

Example:
    y = diag_matmul(x, values, offsets, block_size=16)                    # square or wide
    y = diag_matmul(x, values, offsets, block_size=16, out_features=3072) # tall
"""
from __future__ import annotations

import torch

from .. import cpu as cpu_native
from .. import runtime as rt
from .cpu import diag_dw_torch, diag_dx_torch, diag_fwd_torch
from .kernel import diag_dw, diag_dx, diag_dx_gelu_grad, diag_fwd, diag_fwd_gelu


@rt.backend_op("alwayssparse::diag_dw", diag_dw,
               lambda dy, x2, offsets, b: (offsets.shape[0], min(dy.shape[1], x2.shape[1]) // b, b, b))
def diag_dw_op(dy: torch.Tensor, x2: torch.Tensor, offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    return diag_dw_torch(dy, x2, offsets, block_size)


def diag_weight_grad(dy, x2, offsets, block_size, values_shape):
    return diag_dw_op(dy, x2, offsets, block_size).reshape(values_shape)


@rt.backend_op("alwayssparse::diag_matmul", diag_fwd, 4)
def diag_matmul_op(x2: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
                   out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    return diag_fwd_torch(x2, values, offsets, block_size, out_features, bias)


@rt.backend_op("alwayssparse::diag_dx", diag_dx, 4)
def diag_dx_op(dy: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
               in_features: int) -> torch.Tensor:
    return diag_dx_torch(dy, values, offsets, block_size, in_features)


@rt.backend_op("alwayssparse::diag_matmul_gelu", diag_fwd_gelu, 4, outputs=2)
def diag_matmul_gelu_op(x2: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
                        out_features: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    h = diag_fwd_torch(x2, values, offsets, block_size, out_features, bias)
    return h, torch.nn.functional.gelu(h)


@rt.backend_op("alwayssparse::diag_dx_gelu_grad", diag_dx_gelu_grad, 4)
def diag_dx_gelu_grad_op(dy: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int,
                         in_features: int, h: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(diag_dx_torch(dy, values, offsets, block_size, in_features), h)


def _setup(ctx, inputs, output):
    x2, values, offsets, block_size, _, bias = inputs
    ctx.save_for_backward(x2, values, offsets)
    ctx.block_size = block_size
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x2, values, offsets = ctx.saved_tensors
    dy = dy.contiguous()  # a gradient from .sum() has stride 0
    b = ctx.block_size
    dx = diag_dx_op(dy, values, offsets, b, x2.shape[1]) if ctx.needs_input_grad[0] else None
    dv = diag_weight_grad(dy, x2, offsets, b, values.shape) if ctx.needs_input_grad[1] else None
    db = None
    if ctx.has_bias and ctx.needs_input_grad[5]:
        db = cpu_native.column_sums(dy)  # (CPU: the library's, else torch's)
        if db is None:
            db = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)
        db = db.to(dy.dtype)
    return dx, dv, None, None, None, db


diag_matmul_op.register_autograd(_backward, setup_context=_setup)


def diag_matmul(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, block_size: int = 1,
                out_features: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Wrap-around (block-)diagonal sparse product y = x W^T (+ bias).

    Args:
        x: [..., in].
        values: [K, D, b, b], same dtype as x (D = min(out, in) / b).
        offsets: int32 [K], distinct diagonals in [0, P), P = max(out, in) / b.
        block_size: b, dividing in and out. 1 gives element diagonals.
        out_features: width of y; defaults to D * b (right for square and wide W, required
            for tall W, whose height values and offsets cannot tell).
        bias: [out_features] or None, added in the kernel's epilogue (in fp32, cast to
            x's dtype first, as nn.Linear under autocast).
    Returns:
        y: [..., out_features]. Differentiable in x and values.

    Example:
        >>> off = torch.tensor([0, 3], dtype=torch.int32)
        >>> y = diag_matmul(torch.randn(5, 64), torch.randn(2, 4, 16, 16), off, 16)  # [5, 64]
    """
    # x's dtype is checked once, by the op (reference.check_args); here only what this wrapper
    # relies on, and the devices: a tensor on another device (meta) would send the op to that
    # device's kernel, past the op's own checks
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        rt.check_float("x", x)
        raise ValueError("x must have at least one dimension [..., in]")
    if not isinstance(values, torch.Tensor) or values.dim() != 4:
        raise ValueError(f"values must be a 4-D tensor [K, D, b, b], got {getattr(values, 'shape', values)!r}")
    out_features = values.shape[1] * block_size if out_features is None else int(out_features)
    rt.check_same_device(x=x, values=values, offsets=offsets, bias=bias)
    if bias is not None:
        rt.check_float("bias", bias)
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    y = diag_matmul_op(rt.flatten_tokens(x), values, offsets, block_size, out_features, bias)
    return y.reshape(*lead, out_features)
