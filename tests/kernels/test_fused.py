"""kernels/fused.py: the fused block-diagonal MLP fc2(gelu(fc1(x))) against the fp64 dense
reference, output and every gradient, on both backends; bad input; the custom-op plumbing."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import runtime as rt
from kernels.diag import diag_to_dense
from kernels.fused import (_fused_diag_mlp_op, fused_diag_mlp, fused_diag_mlp_fwd, fused_diag_mlp_ref,
                           fused_diag_mlp_torch, fused_mlp)

from .conftest import DEVICE, assert_matches, check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
I32 = torch.int32


def make(seed, b, C1, R1, R2, K1, K2, biases=(True, True)):
    """fc1: C1 -> R1 blocks, fc2: R1 -> R2 blocks (all b x b); values scaled to unit fan-in."""
    g = torch.Generator().manual_seed(seed)
    P1, P2 = max(R1, C1), max(R2, R1)
    off1 = torch.randperm(P1, generator=g)[:K1].to(I32)
    off2 = torch.randperm(P2, generator=g)[:K2].to(I32)
    v1 = torch.randn(K1, min(R1, C1), b, b, generator=g) / (b * max(K1, 1)) ** 0.5
    v2 = torch.randn(K2, min(R2, R1), b, b, generator=g) / (b * max(K2, 1)) ** 0.5
    b1 = torch.randn(R1 * b, generator=g) if biases[0] else None
    b2 = torch.randn(R2 * b, generator=g) if biases[1] else None
    return tuple(t.to(DEVICE) if t is not None else None for t in (v1, off1, b1, v2, off2, b2))


def check_mlp(seed, b, C1, R1, R2, K1, K2, T, dtype, biases=(True, True)):
    v1, off1, b1, v2, off2, b2 = make(seed, b, C1, R1, R2, K1, K2, biases)
    x = torch.randn(T, C1 * b, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    inputs = [x, v1, b1, v2, b2]
    grad_args = tuple(i for i, t in enumerate(inputs) if t is not None)
    shape = (b, R1 * b, R2 * b)
    check_op(lambda x, v1, b1, v2, b2: fused_diag_mlp(x, v1, off1, b1, v2, off2, b2, *shape),
             lambda x, v1, b1, v2, b2: fused_diag_mlp_ref(x, v1, off1, b1, v2, off2, b2, *shape),
             inputs, dtype, grad_args)


@st.composite
def mlp_cases(draw):
    b = draw(st.sampled_from([16, 32]))
    C1 = draw(st.integers(1, 3))   # dim = C1 * b
    R1 = draw(st.integers(1, 4))   # hidden = R1 * b
    R2 = draw(st.integers(1, 3))   # out = R2 * b
    K1 = draw(st.integers(1, max(R1, C1)))
    K2 = draw(st.integers(1, max(R2, R1)))
    T = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    biases = (draw(st.booleans()), draw(st.booleans()))
    return b, C1, R1, R2, K1, K2, T, dtype, biases, draw(st.integers(0, 2 ** 16))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mlp_cases())
def test_fused_mlp_matches_dense_reference_with_gradients(backend, case):
    b, C1, R1, R2, K1, K2, T, dtype, biases, seed = case
    check_mlp(seed, b, C1, R1, R2, K1, K2, T, dtype, biases)


# (b, C1, R1, R2, K1, K2): dim, hidden, out in blocks of b.
@pytest.mark.parametrize("b,C1,R1,R2,K1,K2", [
    (16, 2, 8, 2, 3, 3),   # ViT-like: fc1 tall, fc2 wide
    (16, 4, 2, 4, 2, 1),   # bottleneck: fc1 wide, fc2 tall
    (16, 3, 3, 3, 3, 3),   # both square, every diagonal
    (32, 1, 3, 2, 3, 1),   # one input block, fc2 tall
    (16, 3, 5, 1, 1, 5),   # one output block, every fc2 diagonal
    (64, 1, 2, 1, 2, 2),   # the largest block size
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_mlp_geometries(backend, b, C1, R1, R2, K1, K2, dtype):
    check_mlp(0, b, C1, R1, R2, K1, K2, 19, dtype)


@pytest.mark.parametrize("K1,K2", [(0, 2), (2, 0), (0, 0)])
def test_layers_without_diagonals_give_bias_terms(backend, K1, K2):
    check_mlp(3, 16, 2, 3, 2, K1, K2, 5, torch.float32)


def test_many_token_tiles_and_a_ragged_last_one(backend, monkeypatch):
    """T = 37 over 16-token tiles: three tiles, the last one 5 tokens long."""
    original = rt.launch_config

    def small_tiles(kernel, key, default, device=None):
        cfg = original(kernel, key, default, device)
        return dict(cfg, BLOCK_T=16) if kernel == "fused_diag_mlp" else cfg

    monkeypatch.setattr(rt, "launch_config", small_tiles)
    check_mlp(5, 16, 2, 4, 2, 2, 3, 37, torch.float32)
    check_mlp(6, 16, 2, 4, 2, 2, 3, 37, torch.bfloat16)


def test_leading_dimensions_and_empty_input(backend):
    v1, off1, b1, v2, off2, b2 = make(0, 16, 2, 4, 2, 2, 2)
    x = torch.randn(2, 3, 32, device=DEVICE)
    y = fused_diag_mlp(x, v1, off1, b1, v2, off2, b2, 16, 64, 32)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, fused_diag_mlp(x.reshape(6, 32), v1, off1, b1, v2, off2, b2, 16, 64, 32)
                               .reshape(2, 3, 32))
    assert fused_diag_mlp(x[:0], v1, off1, b1, v2, off2, b2, 16, 64, 32).shape == (0, 3, 32)
    assert fused_diag_mlp(x[0, 0], v1, off1, b1, v2, off2, b2, 16, 64, 32).shape == (32,)


def test_fused_mlp_of_two_layers_equals_the_unfused_layers(backend):
    torch.manual_seed(0)
    fc1 = kernels.DiagLinear(32, 128, num_diagonals=3, block_size=16).to(DEVICE)
    fc2 = kernels.DiagLinear(128, 32, num_diagonals=2, block_size=16).to(DEVICE)
    fc2.enable_gate(k_target=1, temperature=1.0, scores=torch.tensor([1.0, -1.0], device=DEVICE))
    x = torch.randn(7, 32, device=DEVICE, requires_grad=True)
    y = fused_mlp(fc1, fc2, x)
    ref = fc2(F.gelu(fc1(x)))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    params = [x, fc1.values, fc1.bias, fc2.values, fc2.bias, fc2.scores]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, dy)
    grads_ref = torch.autograd.grad(ref, params, dy)
    for p, a, e in zip(["x", "fc1.values", "fc1.bias", "fc2.values", "fc2.bias", "fc2.scores"], grads, grads_ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{p}: {m}")


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_casts_every_input_to_the_region_dtype(backend, amp):
    torch.manual_seed(0)
    fc1 = kernels.DiagLinear(32, 64, num_diagonals=3, block_size=16).to(DEVICE)
    fc2 = kernels.DiagLinear(64, 32, num_diagonals=2, block_size=16).to(DEVICE)
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=amp):
        y = fused_mlp(fc1, fc2, x)
    assert y.dtype == amp
    cast = [t.detach().to(amp) for t in (x, fc1.values, fc1.bias, fc2.values, fc2.bias)]
    args = (fc1.offsets, cast[2], cast[3], fc2.offsets, cast[4], 16, 64, 32)
    ref64 = fused_diag_mlp_ref(cast[0].double(), cast[1].double(), args[0], args[1].double(), args[2].double(),
                               args[3], args[4].double(), *args[5:])
    assert_matches(y, ref64, fused_diag_mlp_ref(cast[0], cast[1], *args))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert fc1.values.grad.dtype == fc2.bias.grad.dtype == torch.float32


class _Sizes(TorchDispatchMode):
    """The largest element count of the floating-point tensors ops return (the interpreter
    also makes uint8 byte views of its arguments: not new tensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_kernel_forward_never_makes_a_hidden_sized_tensor():
    """The point of fusion: under the Triton kernel no [T, hidden] tensor exists (the torch
    path, for comparison, does make one)."""
    v1, off1, b1, v2, off2, b2 = make(0, 16, 2, 8, 2, 3, 3)
    x = torch.randn(20, 32, device=DEVICE)
    sizes = {}
    # The launchers themselves: a custom op would reach the dispatch mode as one opaque call.
    for name, launcher in (("triton", fused_diag_mlp_fwd), ("torch", fused_diag_mlp_torch)):
        with torch.no_grad(), _Sizes() as census:
            launcher(x, v1, off1, b1, v2, off2, b2, 16, 128, 32)
        sizes[name] = census.largest
    assert sizes["torch"] >= 20 * 128
    assert sizes["triton"] < 20 * 128, sizes


class _HiddenPasses(TorchDispatchMode):
    """Names of the torch ops outside the project's custom ops that read or write a tensor of
    at least ``n`` elements (a custom op reaches the mode as one call; it is not counted)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.names = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "alwayssparse":
            flat = list(args) + list((kwargs or {}).values()) + list(out if isinstance(out, (tuple, list)) else [out])
            if any(isinstance(t, torch.Tensor) and t.numel() >= self.n for t in flat):
                self.names.append(func.__name__.split(".")[0])
        return out


def test_backward_makes_no_torch_pass_over_the_hidden_activation_but_the_bias_sum(backend):
    """GELU and its derivative live in the kernels' epilogues: between the backward's launches
    the only torch op over a [T, hidden] tensor is b1's column sum."""
    v1, off1, b1, v2, off2, b2 = make(0, 16, 2, 8, 2, 3, 3)
    leaves = [t.requires_grad_() for t in (torch.randn(20, 32, device=DEVICE), v1, b1, v2, b2)]
    y = fused_diag_mlp(leaves[0], leaves[1], off1, leaves[2], leaves[3], off2, leaves[4], 16, 128, 32)
    with _HiddenPasses(20 * 128) as census:
        torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert census.names == ["sum"], census.names


@pytest.mark.parametrize("biases", [(True, True), (False, False)])
def test_opcheck_passes(backend, biases):
    v1, off1, b1, v2, off2, b2 = make(0, 16, 1, 2, 1, 2, 2, biases)
    x = torch.randn(3, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    opt = [t.double().requires_grad_() if t is not None else None for t in (v1, b1, v2, b2)]
    torch.library.opcheck(_fused_diag_mlp_op, (x, opt[0], off1, opt[1], opt[2], off2, opt[3], 16, 32, 16))


def test_gradcheck_in_fp64(backend):
    v1, off1, b1, v2, off2, b2 = (t.double().requires_grad_() if t.is_floating_point() else t
                                  for t in make(1, 16, 1, 2, 1, 2, 1))
    x = torch.randn(2, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda x, v1, b1, v2, b2: fused_diag_mlp(x, v1, off1, b1, v2, off2, b2, 16, 32, 16)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, v1, b1, v2, b2), fast_mode=True)


def test_torch_compile_fullgraph_traces_the_fused_mlp(backend):
    torch.manual_seed(0)
    fc1 = kernels.DiagLinear(32, 64, num_diagonals=2, block_size=16).to(DEVICE)
    fc2 = kernels.DiagLinear(64, 32, num_diagonals=2, block_size=16).to(DEVICE)
    x = torch.randn(5, 32, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fused_mlp(fc1, fc2, x), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in (fc1.values, fc2.values)]
    fc1.zero_grad()
    fc2.zero_grad()
    ref = fused_mlp(fc1, fc2, x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, (fc1.values, fc2.values)):
        torch.testing.assert_close(g, p.grad)


def _args(**change):
    """Valid arguments (dim 32, hidden 64, out 32, b 16), with some replaced."""
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(3, 32, generator=g), w1_values=torch.randn(2, 2, 16, 16, generator=g),
                w1_offsets=torch.tensor([0, 3], dtype=I32), b1=torch.zeros(64),
                w2_values=torch.randn(2, 2, 16, 16, generator=g), w2_offsets=torch.tensor([1, 2], dtype=I32),
                b2=torch.zeros(32), block_size=16, hidden_features=64, out_features=32)
    args.update(change)
    return args


BAD = {
    "int input": (dict(x=torch.ones(3, 32, dtype=torch.int64)), TypeError, "x must be float32"),
    "w1 dtype": (dict(w1_values=torch.randn(2, 2, 16, 16).double()), TypeError, "w1_values must have the dtype of x"),
    "w2 dtype": (dict(w2_values=torch.randn(2, 2, 16, 16).half()), TypeError, "w2_values must have the dtype of x"),
    "b1 shape": (dict(b1=torch.zeros(32)), ValueError, r"b1 must have shape \[64\]"),
    "b2 dtype": (dict(b2=torch.zeros(32).half()), TypeError, "b2 must have the dtype of x"),
    "w1 offsets dtype": (dict(w1_offsets=torch.tensor([0, 3])), TypeError, "w1_offsets must have dtype torch.int32"),
    "w2 offsets 2-D": (dict(w2_offsets=torch.tensor([[1, 2]], dtype=I32)), ValueError, "w2_offsets must be 1-D"),
    "w1 offset range": (dict(w1_offsets=torch.tensor([0, 4], dtype=I32)), ValueError, r"w1_offsets must lie in \[0, 4\)"),
    "w2 negative offset": (dict(w2_offsets=torch.tensor([-1, 2], dtype=I32)), ValueError, r"w2_offsets must lie in \[0, 4\)"),
    "w2 repeated offset": (dict(w2_offsets=torch.tensor([2, 2], dtype=I32)), ValueError, "w2_offsets must be distinct"),
    "w1 values shape": (dict(w1_values=torch.randn(2, 4, 16, 16)), ValueError, r"w1_values must have shape \[K, D, b, b\]"),
    "w2 values shape": (dict(w2_values=torch.randn(3, 2, 16, 16)), ValueError, r"w2_values must have shape \[K, D, b, b\]"),
    "w2 values 3-D": (dict(w2_values=torch.randn(2, 16, 16)), ValueError, "w2_values must be a 4-D tensor"),
    "small block": (dict(block_size=8, w1_values=torch.randn(2, 4, 8, 8), w2_values=torch.randn(2, 4, 8, 8)),
                    ValueError, "block_size must be an int >= 16"),
    "block not dividing": (dict(hidden_features=72, b1=torch.zeros(72)), ValueError, "block_size=16 must divide"),
    "hidden features": (dict(hidden_features=0), ValueError, "hidden_features must be a positive int"),
    "device mismatch": (dict(w2_offsets=torch.tensor([1, 2], dtype=I32, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_a_clear_error(backend, case):
    change, exc, message = BAD[case]
    with pytest.raises(exc, match=message):
        fused_diag_mlp(**_args(**change))


def test_fused_mlp_rejects_layers_that_do_not_chain():
    fc1 = kernels.DiagLinear(32, 64, num_diagonals=1, block_size=16)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="share a block size"):
        fused_mlp(fc1, kernels.DiagLinear(64, 32, num_diagonals=1, block_size=32), x)
    with pytest.raises(ValueError, match=r"fc1.out_features \(64\) must equal fc2.in_features \(32\)"):
        fused_mlp(fc1, kernels.DiagLinear(32, 32, num_diagonals=1, block_size=16), x)
    with pytest.raises(TypeError, match="fc2 must be a kernels.DiagLinear"):
        fused_mlp(fc1, torch.nn.Linear(64, 32), x)


def test_reference_is_two_dense_layers_around_gelu():
    v1, off1, b1, v2, off2, b2 = make(2, 16, 2, 3, 2, 2, 2)
    x = torch.randn(4, 32, dtype=torch.float64, device=DEVICE)
    w1 = diag_to_dense(v1.double(), off1, 32, 48, 16)
    w2 = diag_to_dense(v2.double(), off2, 48, 32, 16)
    expected = F.gelu(x @ w1.t() + b1.double()) @ w2.t() + b2.double()
    got = fused_diag_mlp_ref(x, v1.double(), off1, b1.double(), v2.double(), off2, b2.double(), 16, 48, 32)
    torch.testing.assert_close(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); the interpreter runs "
                    "the same kernel at small shapes above")
@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vit_b_shapes_on_gpu(b, dtype):
    check_mlp(0, b, 768 // b, 3072 // b, 768 // b, max(1, 3072 // b // 10), max(1, 3072 // b // 10), 4096, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); the interpreter runs "
                    "the unfused forward with a forced config above")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vit_b_b16_forward_runs_unfused_from_8192_tokens_on_gpu(dtype):
    assert kernels.fused._config(16, 8192, dtype)["UNFUSED"]
    check_mlp(0, 16, 48, 192, 48, 20, 20, 8192, dtype)


# Odd token counts through the host-built lists; fc1 tall / fc2 wide (ViT) and both square
# with every diagonal, b = 16 and 64.
@pytest.mark.parametrize("T", [1, 63, 123])
@pytest.mark.parametrize("b,C1,R1,R2,K1,K2", [(16, 2, 6, 2, 2, 3), (16, 3, 3, 3, 3, 3), (64, 1, 2, 1, 1, 2)])
def test_fused_mlp_at_odd_token_counts(backend, T, b, C1, R1, R2, K1, K2):
    check_mlp(T, b, C1, R1, R2, K1, K2, T, torch.float32)


def test_fused_mlp_follows_a_pattern_change_between_calls(backend):
    """The kernel's pair lists are cached per offsets tensor: an in-place mask update must
    rebuild them (its version counter moves)."""
    v1, off1, b1, v2, off2, b2 = make(7, 16, 2, 6, 2, 2, 3)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    shape = (16, 96, 32)
    for new1, new2 in (([0, 5], [1, 2, 4]), ([3, 4], [0, 3, 5])):
        off1.copy_(torch.tensor(new1, dtype=I32))
        off2.copy_(torch.tensor(new2, dtype=I32))
        y = fused_diag_mlp(x, v1, off1, b1, v2, off2, b2, *shape)
        assert_matches(y, fused_diag_mlp_ref(x.double(), v1.double(), off1, b1.double(), v2.double(), off2,
                                             b2.double(), *shape))


@pytest.fixture
def unfused(monkeypatch):
    """The launcher's unfused forward (fc1 with GELU in its epilogue, then fc2), forced."""
    original = rt.launch_config

    def choose(kernel, key, default, device=None):
        cfg = original(kernel, key, default, device)
        return dict(cfg, UNFUSED=True) if kernel == "fused_diag_mlp" else cfg

    monkeypatch.setattr(rt, "launch_config", choose)
    with kernels.use_backend("triton"):
        yield


@pytest.mark.parametrize("b,C1,R1,R2,K1,K2", [
    (16, 2, 8, 2, 3, 3),   # ViT-like: fc1 tall, fc2 wide
    (16, 4, 2, 4, 2, 1),   # bottleneck: fc1 wide, fc2 tall
    (16, 3, 5, 1, 1, 5),   # one output block, every fc2 diagonal
    (32, 1, 3, 2, 3, 1),
    (16, 2, 3, 2, 0, 2),   # no fc1 diagonal: the hidden layer is gelu(b1)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_unfused_forward_matches_the_reference(unfused, b, C1, R1, R2, K1, K2, dtype):
    check_mlp(1, b, C1, R1, R2, K1, K2, 37, dtype)


def test_the_unfused_forward_runs_the_two_products(unfused):
    """The forced config takes the other path: a [T, hidden] activation exists (which the
    fused kernel never makes), and it is gelu(fc1(x)) rounded to x's dtype."""
    v1, off1, b1, v2, off2, b2 = make(0, 16, 2, 8, 2, 3, 3)
    x = torch.randn(20, 32, device=DEVICE)
    with torch.no_grad(), _Sizes() as census:
        y = fused_diag_mlp_fwd(x, v1, off1, b1, v2, off2, b2, 16, 128, 32)
    assert census.largest >= 20 * 128
    h = F.gelu(F.linear(x.double(), diag_to_dense(v1.double(), off1, 32, 128, 16), b1.double()))
    expected = F.linear(h, diag_to_dense(v2.double(), off2, 128, 32, 16), b2.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_the_forward_is_unfused_by_default_only_at_b16_on_many_tokens(monkeypatch):
    """Off the interpreter: b = 16 from 8192 tokens in 2-byte dtypes (the hidden layer would be
    recomputed ~5x); b = 64, few tokens and fp32 stay fused."""
    monkeypatch.setattr(rt, "interpreting", lambda: False)
    cfg = kernels.fused._config
    assert cfg(16, 50432, torch.bfloat16)["UNFUSED"]
    assert cfg(16, 8192, torch.float16)["UNFUSED"]
    assert not cfg(16, 4096, torch.bfloat16)["UNFUSED"]
    assert not cfg(64, 50432, torch.bfloat16)["UNFUSED"]
    assert not cfg(32, 50432, torch.bfloat16)["UNFUSED"]
    assert not cfg(16, 50432, torch.float32)["UNFUSED"]
