"""kernels.runtime's explicit hooks: config overrides (what bench/sweep.py runs candidates
through), NaN-poisoned fresh outputs, the power-of-two buckets of the config tables; the
custom ops' eager CPU calls (BackendOp) and the index checks kept per unchanged tensor."""
import math

import pytest
import torch

import kernels
from kernels import diag, fanin, sparse
from kernels import runtime as rt


def test_config_override_decides_first_and_none_falls_through():
    default = {"BLOCK": 16, "num_warps": 4}
    with rt.config_override(lambda kernel, key, d: {**d, "BLOCK": 64} if kernel == "a" else None):
        assert rt.launch_config("a", {"T": 8}, default) == {"BLOCK": 64, "num_warps": 4}
        assert rt.launch_config("b", {"T": 8}, default) == default       # None: the table / default
        with rt.config_override(lambda kernel, key, d: {"BLOCK": 128}):
            assert rt.launch_config("a", {"T": 8}, default) == {"BLOCK": 128}   # innermost first
        assert rt.launch_config("a", {"T": 8}, default)["BLOCK"] == 64
    assert rt.launch_config("a", {"T": 8}, default) == default


def test_config_override_is_closed_by_an_exception():
    with pytest.raises(RuntimeError):
        with rt.config_override(lambda *a: {"X": 1}):
            raise RuntimeError
    assert rt.launch_config("a", {}, {"X": 0}) == {"X": 0}


def test_poisoned_empty_fills_floats_with_nan_and_restores_torch():
    empty, empty_like = torch.empty, torch.empty_like
    with rt.poisoned_empty():
        assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
        assert torch.empty(3, dtype=torch.int32).dtype == torch.int32   # integers untouched
    assert torch.empty is empty and torch.empty_like is empty_like


@pytest.mark.parametrize("n, want", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_next_pow2_is_the_tables_shape_bucket(n, want):
    assert rt.next_pow2(n) == rt.shape_bucket(n) == want
    assert want >= n and (want == 1 or want // 2 < n) and math.log2(want).is_integer()


def test_acc_dtype_is_fp64_only_for_fp64():
    assert rt.acc_dtype(torch.float64) == torch.float64
    assert all(rt.acc_dtype(d) == torch.float32 for d in (torch.float32, torch.bfloat16, torch.float16))


# --- BackendOp: eager CPU calls past the dispatcher, everything else through the custom op ---

EAGER_LAYERS = {
    "fan-in": lambda g: kernels.FanInLinear(48, 32, density=0.25, generator=g),
    "diag b=16 (block products)": lambda g: kernels.DiagLinear(64, 32, density=0.5, block_size=16, generator=g),
    "diag b=4 (elements)": lambda g: kernels.DiagLinear(48, 16, density=0.5, block_size=4, generator=g),
    "unstructured": lambda g: kernels.SparseLinear(40, 24, density=0.25, generator=g),
}
FORWARD_OPS = {kernels.FanInLinear: fanin._fanin_op, kernels.DiagLinear: diag._diag_op,
               kernels.SparseLinear: sparse._sparse_op}


def _step(layer, x, dy, amp: bool):
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("name", list(EAGER_LAYERS))
def test_eager_calls_skip_the_custom_op_and_give_its_results_bit_for_bit(name, tokens, amp, monkeypatch):
    g = torch.Generator().manual_seed(tokens)
    layer = EAGER_LAYERS[name](g)
    x = torch.randn(2, tokens, layer.in_features, generator=g)
    dy = torch.randn(2, tokens, layer.out_features, generator=g)
    rt.set_eager(False)
    try:
        through_op = _step(layer, x, dy, amp)
    finally:
        rt.set_eager(True)
    forward = FORWARD_OPS[type(layer)]

    def refuse(*args):
        raise AssertionError("the custom op ran on an eager CPU call")
    monkeypatch.setattr(forward, "op", refuse)
    eager = _step(layer, x, dy, amp)
    assert eager[0].dtype == (torch.bfloat16 if amp else torch.float32)
    for a, b in zip(eager, through_op, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_a_function_mode_and_a_tensor_subclass_see_the_custom_op():
    g = torch.Generator().manual_seed(0)
    layer = EAGER_LAYERS["diag b=16 (block products)"](g)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    with _Recorder() as rec:
        layer(x).sum().backward()
    assert "alwayssparse.diag_matmul.default" in rec.ops and "alwayssparse.diag_dx.default" in rec.ops
    calls = []

    class Counting(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))
    with Counting():
        layer(x)
    assert any("alwayssparse.diag_matmul" in c for c in calls)
    with torch._subclasses.fake_tensor.FakeTensorMode():  # fake tensors: the op's fake kernel
        x, values, offsets = torch.empty(3, 64), torch.empty(2, 2, 16, 16), torch.zeros(2, dtype=torch.int32)
        y = diag.diag_matmul(x, values, offsets, 16, 32)
    assert y.shape == (3, 32) and type(x) is not torch.Tensor and type(y) is type(x)


def test_jit_trace_records_the_custom_op():
    g = torch.Generator().manual_seed(1)
    layer = EAGER_LAYERS["fan-in"](g)
    x = torch.randn(3, 48, generator=g)
    v = layer.values.detach()
    traced = torch.jit.trace(lambda x: kernels.fanin_matmul(x, v, layer.indices, layer.rows, layer.out_features), (x,),
                             check_trace=False)
    assert "alwayssparse::fanin_matmul" in str(traced.graph)
    torch.testing.assert_close(traced(x * 2), kernels.fanin_matmul(x * 2, v, layer.indices, layer.rows, 32))


def test_index_checks_are_read_once_per_unchanged_tensor_and_redone_after_a_change():
    t = torch.tensor([3, 0, 2], dtype=torch.int32)
    rt.check_range("t", t, 4)
    assert rt.index_bounds(t) == (0, 3) and not rt.has_repeats(t)
    t[1] = 4                                   # in place: the version moves, the bounds are read again
    with pytest.raises(ValueError, match=r"t must lie in \[0, 4\), found values in \[2, 4\]"):
        rt.check_range("t", t, 4)
    t[1] = 2
    assert rt.has_repeats(t)                   # a repeat made in place is seen
    rows = torch.tensor([[0, 1], [2, 2]], dtype=torch.int32)
    assert rt.has_repeats(rows) and not rt.has_repeats(rows.t().contiguous())  # along the last dim


def test_a_diagonal_made_bad_in_place_is_refused_on_the_next_call():
    layer = kernels.DiagLinear(64, 32, density=0.5, block_size=16)
    x = torch.randn(4, 64)
    layer(x)
    with torch.no_grad():
        layer.offsets[0] = layer.offsets[1]
    with pytest.raises(ValueError, match="distinct diagonals"):
        layer(x)
    with torch.no_grad():
        layer.offsets[0] = 99
    with pytest.raises(ValueError, match="offsets must lie in"):
        layer(x)
