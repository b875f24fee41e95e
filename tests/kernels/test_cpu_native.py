"""The native CPU inference library (kernels/cpu): its fp32 products against the fp64 torch
reference for every layer format, its cache following value and pattern changes, both builds
(AVX2 and baseline x86-64), and the fall back to torch's path when it is disabled or cannot be
built."""
import platform
import shutil

import pytest
import torch

import kernels
from kernels import cpu

from .conftest import ATOL

needs_library = pytest.mark.skipif(cpu.lib() is None, reason=f"no native CPU library here: {cpu.error()}")


def ablated_fanin(g, n_in=40, n_out=24, k=7, keep=15):
    layer = kernels.FanInLinear(n_in, n_out, k=k, generator=g)
    rows = torch.randperm(n_out, generator=g)[:keep].to(torch.int32)  # unsorted surviving neurons
    idx = torch.stack([torch.randperm(n_in, generator=g)[:k] for _ in range(keep)]).to(torch.int32)
    layer.set_pattern(torch.randn(keep, k, generator=g), idx, rows)
    return layer


LAYERS = {
    "fan-in wide": lambda g, bias: kernels.FanInLinear(300, 37, density=0.2, bias=bias, generator=g),
    "fan-in tall": lambda g, bias: kernels.FanInLinear(37, 300, density=0.3, bias=bias, generator=g),
    "fan-in ablated": lambda g, bias: ablated_fanin(g),
    "fan-in 1 column": lambda g, bias: kernels.FanInLinear(1, 9, k=1, bias=bias, generator=g),
    "diag b=1 wide": lambda g, bias: kernels.DiagLinear(96, 40, density=0.3, block_size=1, bias=bias, generator=g),
    "diag b=1 tall": lambda g, bias: kernels.DiagLinear(40, 96, density=0.3, block_size=1, bias=bias, generator=g),
    "diag b=16 wide": lambda g, bias: kernels.DiagLinear(192, 64, density=0.3, block_size=16, bias=bias, generator=g),
    "diag b=16 tall": lambda g, bias: kernels.DiagLinear(64, 192, density=0.3, block_size=16, bias=bias, generator=g),
    "diag b=8": lambda g, bias: kernels.DiagLinear(64, 48, density=0.4, block_size=8, bias=bias, generator=g),
    "diag b=64": lambda g, bias: kernels.DiagLinear(128, 192, density=0.5, block_size=64, bias=bias, generator=g),
    "diag b=12": lambda g, bias: kernels.DiagLinear(48, 36, density=0.5, block_size=12, bias=bias, generator=g),
    "diag b=24": lambda g, bias: kernels.DiagLinear(72, 48, density=0.5, block_size=24, bias=bias, generator=g),
    "diag b=3 tall": lambda g, bias: kernels.DiagLinear(9, 30, density=0.5, block_size=3, bias=bias, generator=g),
    "unstructured": lambda g, bias: kernels.SparseLinear(600, 70, density=0.15, bias=bias, generator=g),
    # in > 65536: 4-byte column indices
    "unstructured 70000 wide": lambda g, bias: kernels.SparseLinear(70000, 6, density=0.002, bias=bias, generator=g),
}


def reference(layer, x):
    """(fp64 reference, torch's own fp32 dense result) of the layer on x."""
    w = layer.to_dense().detach()
    b = None if layer.bias is None else layer.bias.detach()
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    lowp = x @ w.t() + (0 if b is None else b)
    return ref, lowp


def assert_close_to_reference(y, ref, lowp, name):
    """fp32 result vs the fp64 reference: at most 2x the error of torch's dense fp32 product
    plus ATOL (tests/kernels/conftest.py), scaled by the reference's magnitude."""
    assert y.shape == ref.shape and y.dtype == torch.float32, f"{name}: {tuple(y.shape)} {y.dtype}"
    assert not torch.isnan(y).any(), f"{name}: NaN (an unwritten element?)"
    if not y.numel():
        return
    scale = max(1.0, ref.abs().max().item())
    err = (y.double() - ref).abs().max().item()
    bound = 2 * (lowp.double() - ref).abs().max().item() + ATOL[torch.float32] * scale
    assert err <= bound, f"{name}: max error {err:.3e} > allowed {bound:.3e}"


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls into kernels.cpu.matmul (the layers look it up at each call)."""
    calls = []
    real = cpu.matmul

    def spy(w, x, bias):
        calls.append((w.kind, x.shape[0]))
        return real(w, x, bias)
    monkeypatch.setattr(cpu, "matmul", spy)
    return calls


@needs_library
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [1, 5, 8, 33, 70])
@pytest.mark.parametrize("name", list(LAYERS))
def test_native_product_matches_the_fp64_reference(name, tokens, bias, native_calls):
    g = torch.Generator().manual_seed(11)
    layer = LAYERS[name](g, bias)
    x = torch.randn(tokens, layer.in_features, generator=g)
    with torch.no_grad():
        y = layer(x)
    assert native_calls, "the native product did not run"
    kind = native_calls[-1][0]
    assert kind == ("bsr" if tokens == 1 and getattr(layer, "block_size", 1) > 1 else "csr")
    ref, lowp = reference(layer, x)
    assert_close_to_reference(y, ref, lowp, name)


@needs_library
@pytest.mark.parametrize("shape", [(2, 3), (0,), (1, 1)])
def test_leading_dimensions_and_zero_tokens_keep_their_shape(shape, native_calls):
    g = torch.Generator().manual_seed(12)
    layer = LAYERS["diag b=16 wide"](g, True)
    x = torch.randn(*shape, layer.in_features, generator=g)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (*shape, layer.out_features) and y.is_contiguous()
    ref, lowp = reference(layer, x.reshape(-1, layer.in_features))
    assert_close_to_reference(y.reshape(-1, layer.out_features), ref, lowp, str(shape))


@needs_library
@pytest.mark.parametrize("name", ["fan-in wide", "diag b=1 tall", "diag b=16 wide", "unstructured"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_the_native_copy_follows_value_and_pattern_changes(name, tokens, native_calls):
    g = torch.Generator().manual_seed(13)
    layer = LAYERS[name](g, True)
    x = torch.randn(tokens, layer.in_features, generator=g)

    def check(what):
        with torch.no_grad():
            y = layer(x)
        ref, lowp = reference(layer, x)
        assert_close_to_reference(y, ref, lowp, f"{name} after {what}")

    check("the first call")
    with torch.no_grad():
        layer.values.mul_(-2.0)  # an optimizer step changes the values in place
    check("an in-place value change")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(3, layer.in_features, generator=g)).square().sum().backward()
    opt.step()
    check("an optimizer step")
    if isinstance(layer, kernels.FanInLinear):  # a mask update: other rows (some ablated), other k
        rows = torch.randperm(layer.out_features, generator=g)[:20].to(torch.int32)
        idx = torch.stack([torch.randperm(layer.in_features, generator=g)[:9] for _ in range(20)]).to(torch.int32)
        layer.set_pattern(torch.randn(20, 9, generator=g), idx, rows)
    elif isinstance(layer, kernels.DiagLinear):
        K = layer.num_diagonals
        offsets = torch.randperm(max(layer.geometry[0], layer.geometry[1]), generator=g)[:K].sort().values
        layer.set_pattern(torch.randn_like(layer.values), offsets.to(torch.int32))
    else:
        other = kernels.SparseLinear(layer.in_features, layer.out_features, density=0.3, generator=g)
        layer.load_state_dict(other.state_dict())  # a state_dict load with another nnz
    check("a pattern change")
    assert len(native_calls) == 4


@needs_library
def test_rows_split_over_threads_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(14)
    previous = torch.get_num_threads()
    monkeypatch.setattr(cpu, "PARALLEL_MIN_FMAS", 0)
    try:
        torch.set_num_threads(2)
        for name in ("fan-in ablated", "diag b=16 tall", "diag b=12"):
            layer = LAYERS[name](g, True)
            for tokens in (1, 40):
                x = torch.randn(tokens, layer.in_features, generator=g)
                with torch.no_grad():
                    y = layer(x)
                ref, lowp = reference(layer, x)
                assert_close_to_reference(y, ref, lowp, f"{name}, 2 threads, T={tokens}")
    finally:
        torch.set_num_threads(previous)


@needs_library
def test_fp64_takes_the_mkl_path_not_the_native_one(native_calls):
    g = torch.Generator().manual_seed(15)
    layer = LAYERS["fan-in wide"](g, True).double()
    x = torch.randn(3, layer.in_features, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert not native_calls
    torch.testing.assert_close(y, x @ layer.to_dense().t() + layer.bias, rtol=1e-12, atol=1e-12)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library state of the test's own (its own build folder); the real one comes back after."""
    monkeypatch.setenv("KERNELS_CPU_BUILD_DIR", str(tmp_path))
    cpu.reset()
    yield
    monkeypatch.undo()
    cpu.reset()


def answers_through_torch(monkeypatch):
    """A fan-in, a b = 16 and an unstructured layer answer correctly at 1 and 6 tokens, with
    the native product refused."""
    monkeypatch.setattr(cpu, "matmul", lambda *a: pytest.fail("the native product ran"))
    g = torch.Generator().manual_seed(16)
    for name in ("fan-in ablated", "diag b=16 wide", "unstructured"):
        layer = LAYERS[name](g, True)
        for tokens in (1, 6):
            x = torch.randn(tokens, layer.in_features, generator=g)
            with torch.no_grad():
                y = layer(x)
            ref, lowp = reference(layer, x)
            assert_close_to_reference(y, ref, lowp, f"{name} through torch")


def test_without_a_compiler_the_layers_use_torchs_path(monkeypatch, fresh_library):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cpu.lib() is None and "no C compiler" in cpu.error()
    answers_through_torch(monkeypatch)


def test_a_failing_build_is_reported_and_the_layers_use_torchs_path(monkeypatch, fresh_library, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert cpu.lib() is None and "failed" in cpu.error()
    assert not list(tmp_path.glob("*.so"))
    answers_through_torch(monkeypatch)


def test_the_library_can_be_switched_off(monkeypatch, fresh_library):
    monkeypatch.setenv("KERNELS_NATIVE_CPU", "0")
    assert cpu.lib() is None and "KERNELS_NATIVE_CPU" in cpu.error()
    answers_through_torch(monkeypatch)


@needs_library
def test_disabled_context_gives_torchs_path_in_it_only(native_calls):
    g = torch.Generator().manual_seed(17)
    layer = LAYERS["diag b=16 wide"](g, True)
    x = torch.randn(1, layer.in_features, generator=g)
    with torch.no_grad():
        with cpu.disabled():
            y_torch = layer(x)
        assert not native_calls
        y_native = layer(x)
    assert native_calls
    ref, lowp = reference(layer, x)
    assert_close_to_reference(y_torch, ref, lowp, "torch path")
    assert_close_to_reference(y_native, ref, lowp, "native path")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the AVX2 / x86-64 choice is made on x86-64 only")
def test_the_build_uses_only_instructions_the_cpu_reports(monkeypatch):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"sse2", "avx"})
    assert cpu.variant() == ("x86-64", ["-march=x86-64"])
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma"})
    assert cpu.variant() == ("avx2", ["-mavx2", "-mfma"])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or cpu.lib() is None,
                    reason="needs x86-64 and a C compiler (the baseline build)")
def test_the_baseline_x86_64_build_gives_the_same_products(monkeypatch, fresh_library):
    monkeypatch.setattr(cpu, "variant", lambda: ("x86-64", ["-march=x86-64"]))
    assert cpu.lib() is not None, cpu.error()
    assert "x86-64" in cpu.lib()._name
    g = torch.Generator().manual_seed(18)
    for name in ("fan-in ablated", "diag b=16 tall", "diag b=12", "unstructured 70000 wide"):
        layer = LAYERS[name](g, True)
        for tokens in (1, 19):
            x = torch.randn(tokens, layer.in_features, generator=g)
            with torch.no_grad():
                y = layer(x)
            ref, lowp = reference(layer, x)
            assert_close_to_reference(y, ref, lowp, f"{name}, x86-64 build")


@needs_library
def test_two_byte_column_indices_where_the_width_allows():
    g = torch.Generator().manual_seed(19)
    narrow = LAYERS["unstructured"](g, True)
    wide = LAYERS["unstructured 70000 wide"](g, True)
    assert narrow._inference_weight(narrow.values, blocked=True, native=True).index == 16
    assert wide._inference_weight(wide.values, blocked=True, native=True).index == 32
    layer = kernels.FanInLinear(65536, 4, k=3, generator=g)  # column 65535 needs all 16 bits
    with torch.no_grad():
        layer.indices[:, -1] = 65535
        layer.indices.copy_(layer.indices.sort(dim=1).values)
    x = torch.randn(1, 65536, generator=g)
    with torch.no_grad():
        y = layer(x)
    ref, lowp = reference(layer, x)
    assert_close_to_reference(y, ref, lowp, "column 65535")
