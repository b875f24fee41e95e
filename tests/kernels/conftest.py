"""Shared fixtures of the kernel tests: device, backend, NaN-poisoned fresh outputs, and the
low-precision comparison rule."""
import math

import pytest
import torch
from torch.utils._device import _device_constructors

import kernels
from kernels import runtime as rt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Error allowed on top of 2x torch's own error at the same dtype (flash-attention's rule).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Run a test through the torch path and through the Triton kernels (interpreter on CPU)."""
    with kernels.use_backend(request.param):
        yield request.param


# torch caches the set of factory functions that ``with torch.device(...)`` redirects on its
# first use; filled while torch.empty is the poisoned wrapper below, it would hold the wrapper
# and every later device context in the session would miss the real torch.empty. Fill it now.
_device_constructors()


@pytest.fixture(autouse=True)
def poison_fresh_outputs():
    """torch.empty / empty_like return NaN-filled floats during kernel tests
    (kernels.runtime.poisoned_empty): an output element that a kernel forgets to write then
    fails loudly instead of passing by luck."""
    with rt.poisoned_empty():
        yield


def assert_matches(out, ref64, lowp_ref=None, name="output"):
    """``out`` against the fp64 reference: for fp32/fp64 within ATOL scaled by the reference's
    magnitude; for fp16/bf16 the error may be at most 2x the error of torch's own dense
    computation at that dtype (``lowp_ref``) plus ATOL."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN (an unwritten element?)"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    atol = ATOL[out.dtype] * scale
    if lowp_ref is None or out.dtype in (torch.float32, torch.float64):
        bound = atol if out.dtype != torch.float32 else atol + 4 * scale * 2 ** -23 * math.sqrt(max(ref64.numel(), 1))
    else:
        torch_err = (lowp_ref.double() - ref64).abs().max().item() if out.numel() else 0.0
        bound = 2 * torch_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > allowed {bound:.3e} ({out.dtype})"


def check_op(fn, ref_fn, inputs, dtype, grad_args=(0, 1)):
    """Compare fn(*inputs) and its gradients to ref_fn in fp64 (the spec) and, for low
    precision, to ref_fn at ``dtype`` (torch's own error)."""
    def prepare(target_dtype):
        out = []
        for i, t in enumerate(inputs):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(target_dtype).requires_grad_(i in grad_args)
            out.append(t)
        return out

    # The low-precision inputs are the ground truth: fp64 copies of exactly those values.
    low = prepare(dtype)
    hi = [t.detach().double().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point()
          and i in grad_args else (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
          for i, t in enumerate(low)]
    y = fn(*low)
    y64 = ref_fn(*hi)
    y_lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        lowref = [t.detach().requires_grad_(i in grad_args) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for i, t in enumerate(low)]
        y_lowp = ref_fn(*lowref)
    assert_matches(y, y64, y_lowp, "output")
    if y.numel() == 0:
        return
    g = torch.randn(y.shape, dtype=torch.float64, device=y.device, generator=torch.Generator(y.device).manual_seed(1))
    grads = torch.autograd.grad(y, [low[i] for i in grad_args], g.to(dtype), allow_unused=True)
    grads64 = torch.autograd.grad(y64, [hi[i] for i in grad_args], g, allow_unused=True)
    grads_lowp = [None] * len(grad_args)
    if y_lowp is not None:
        grads_lowp = torch.autograd.grad(y_lowp, [lowref[i] for i in grad_args], g.to(dtype), allow_unused=True)
    for i, a, b, c in zip(grad_args, grads, grads64, grads_lowp):
        assert_matches(a, b, c, f"grad of input {i}")
