"""The native CPU library (kernels/cpu): its fp32 inference products against the fp64 torch
reference for every layer format, its cache following value and pattern changes, both builds
(AVX2 and baseline x86-64), the fall back to torch's path when it is disabled or cannot be
built, its training-step products (csr_matmul, sddmm) against fp64, the variant
KERNELS_CPU_VARIANT forces, and the AMX / AVX-512-BF16 kernels on this CPU where it has them and
on the emu build everywhere."""
import copy
import ctypes
import os
import pickle
import platform
import shutil

import pytest
import torch

import kernels
from kernels import cpu

from .conftest import ATOL, assert_matches

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


def check_layers(names, tokens, seed, what):
    """Each named layer (fresh, seeded) at each token count against the fp64 reference."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        layer = LAYERS[name](g, True)
        for t in tokens:
            x = torch.randn(t, layer.in_features, generator=g)
            with torch.no_grad():
                y = layer(x)
            ref, lowp = reference(layer, x)
            assert_close_to_reference(y, ref, lowp, f"{name}, T={t}, {what}")


# (the two_threads fixture's two ways to split a product: torch's OpenMP threads, a Python pool)
both_splitters = pytest.mark.parametrize("two_threads", ["openmp", "python threads"], indirect=True)


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls into kernels.cpu.matmul and matvec (one token), as (kind, tokens): the
    layers look both up at each call."""
    calls = []
    real_matmul, real_matvec = cpu.matmul, cpu.matvec

    def spy_matmul(w, x, bias):
        calls.append((w.kind, x.shape[0]))
        return real_matmul(w, x, bias)

    def spy_matvec(plan, x):
        calls.append((plan.kind, 1))
        return real_matvec(plan, x)
    monkeypatch.setattr(cpu, "matmul", spy_matmul)
    monkeypatch.setattr(cpu, "matvec", spy_matvec)
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
    b = getattr(layer, "block_size", 1)
    # blocks for one token (any b > 1) and for several (8 | b: bsr_matmul), else elements
    assert kind == ("bsr" if b > 1 and (tokens == 1 or b % 8 == 0) else "csr"), f"{name}: {kind}"
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
    before = len(native_calls)
    layer(torch.randn(3, layer.in_features, generator=g)).square().sum().backward()
    opt.step()
    del native_calls[before:]   # the training step's own native products, not the inference copy's
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


def swap_values_memory(layer, g):
    """``.data =``: new memory, the same Parameter and the same version counter."""
    layer.values.data = torch.randn(layer.values.shape, generator=g)


def swap_values_memory_twice(layer, g):
    """The second tensor is made once the first swap freed the original memory, which the
    allocator hands out again (a cache keyed on its address and version would match)."""
    swap_values_memory(layer, g)
    swap_values_memory(layer, g)


def swap_bias_memory(layer, g):
    layer.bias.data = torch.randn(layer.bias.shape, generator=g)


def change_bias_in_place(layer, g):
    with torch.no_grad():
        layer.bias.add_(torch.randn(layer.bias.shape, generator=g))


def load_same_shapes(layer, g):
    """A state_dict of the same shapes: copied into the tensors in place."""
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for t in other.parameters():
            t.copy_(torch.randn(t.shape, generator=g))
    layer.load_state_dict(other.state_dict())


def reassign_index_buffer(layer, g):
    """A new index tensor of the same shape put in the buffer's slot."""
    name = layer.pattern_buffers[-1]
    old = getattr(layer, name)
    if isinstance(layer, kernels.DiagLinear):
        P = max(layer.geometry[0], layer.geometry[1])
        new = torch.randperm(P, generator=g)[:old.numel()].sort().values
    elif isinstance(layer, kernels.FanInLinear):
        new = torch.randperm(layer.out_features, generator=g)[:old.numel()]
    else:  # SparseLinear: each stored weight one column further (wrapping), still distinct in its row
        new = (old + 1) % layer.in_features
    setattr(layer, name, new.to(torch.int32))


def enable_gate(layer, g):
    layer.enable_gate(k_target=1, temperature=0.5, scores=torch.randn(layer.num_diagonals, generator=g))


def round_trip_dtype(layer, g):
    """fp64 and back to fp32, the values changed while in fp64: new memory at each step."""
    layer.double()
    with torch.no_grad():
        layer.values.mul_(3.0)
    layer.float()


CHANGES = {f.__name__: f for f in (swap_values_memory, swap_values_memory_twice, swap_bias_memory,
                                   change_bias_in_place, load_same_shapes, reassign_index_buffer, enable_gate,
                                   round_trip_dtype)}


@needs_library
@pytest.mark.parametrize("name, change", [(n, c) for n in ("fan-in wide", "diag b=1 tall", "diag b=16 wide", "unstructured")
                                          for c in CHANGES if c != "enable_gate" or n.startswith("diag")])
@pytest.mark.parametrize("tokens", [1, 9])
def test_the_cached_copy_is_rebuilt_after_every_kind_of_change(name, tokens, change):
    g = torch.Generator().manual_seed(24)
    layer = LAYERS[name](g, True)
    x = torch.randn(tokens, layer.in_features, generator=g)
    with torch.no_grad():
        layer(x)
        layer(x)  # the second call takes the resolved one-token plan
        CHANGES[change](layer, g)
        y = layer(x)
    ref, lowp = reference(layer, x)
    assert_close_to_reference(y, ref, lowp, f"{name} after {change}")


@needs_library
@pytest.mark.parametrize("name", ["fan-in wide", "diag b=16 wide"])
def test_memory_freed_by_a_swap_and_handed_out_again_is_not_taken_for_the_old_values(name):
    # Each round frees the values' memory and makes new values of the same size, which the
    # allocator may place there: the same address and version counter, other numbers.
    g = torch.Generator().manual_seed(30)
    layer = LAYERS[name](g, True)
    x = torch.randn(1, layer.in_features, generator=g)
    for round in range(10):
        with torch.no_grad():
            layer(x)
            layer(x)
            swap_values_memory_twice(layer, g)
            y = layer(x)
        ref, lowp = reference(layer, x)
        assert_close_to_reference(y, ref, lowp, f"{name}, round {round}")


@needs_library
def test_a_layer_made_in_inference_mode_follows_its_changes():
    # inference tensors have no version counter: the copy is rebuilt at every call
    g = torch.Generator().manual_seed(31)
    with torch.inference_mode():
        layer = LAYERS["fan-in wide"](g, True)
        x = torch.randn(1, layer.in_features, generator=g)
        layer(x)
        layer.values.mul_(-2.0)
        y = layer(x)
    ref, lowp = reference(layer, x)
    assert_close_to_reference(y, ref, lowp, "inference mode")


@needs_library
def test_one_layer_follows_the_shape_of_x_from_call_to_call(native_calls):
    g = torch.Generator().manual_seed(25)
    layer = LAYERS["diag b=16 wide"](g, True)
    for shape in [(1,), (), (1, 1), (1,), (3,), (1,)]:
        x = torch.randn(*shape, layer.in_features, generator=g)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*shape, layer.out_features)
        ref, lowp = reference(layer, x.reshape(-1, layer.in_features))
        assert_close_to_reference(y.reshape(-1, layer.out_features), ref, lowp, str(shape))
    assert [t for _, t in native_calls] == [1, 1, 1, 1, 3, 1]


@needs_library
def test_a_strided_token_is_read_at_its_strides():
    g = torch.Generator().manual_seed(26)
    layer = LAYERS["fan-in wide"](g, True)
    x = torch.randn(1, 2 * layer.in_features, generator=g)
    with torch.no_grad():
        layer(x[:, :layer.in_features])  # the plan, for a contiguous x
        y = layer(x[:, ::2])
    ref, lowp = reference(layer, x[:, ::2])
    assert_close_to_reference(y, ref, lowp, "every other element")


def planned(name: str, seed: int):
    """(layer, one token x) with the layer's one-token plan built (two calls without grad)."""
    g = torch.Generator().manual_seed(seed)
    layer = LAYERS[name](g, True)
    x = torch.randn(1, layer.in_features, generator=g)
    with torch.no_grad():
        layer(x)
        layer(x)
    return layer, x


@needs_library
def test_after_the_plan_a_gradient_or_autocast_takes_the_custom_op():
    layer, x = planned("fan-in wide", 27)
    y = layer(x)  # (the training products may run natively too: kernels.sparse.csr_matmul)
    assert y.requires_grad and "_inference_cache" not in layer.__dict__
    y.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.ones(layer.out_features))
    with torch.no_grad():
        layer(x)
        layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16


@needs_library
def test_after_the_plan_another_dtype_of_x_is_refused_as_before():
    layer, x = planned("diag b=16 wide", 29)
    with torch.no_grad(), pytest.raises(TypeError, match="dtype"):  # the custom op's check, not fp64 as fp32
        layer(x.double())


@needs_library
def test_a_layer_with_its_copy_can_be_deep_copied_and_pickled():
    layer, x = planned("diag b=16 wide", 28)
    twin = copy.deepcopy(layer)
    assert "_inference_cache" not in twin.__dict__
    restored = pickle.loads(pickle.dumps(layer))
    with torch.no_grad():
        twin.values.mul_(-1.0)  # the copy's values, not the original's
        y, y_twin, y_restored = layer(x), twin(x), restored(x)
    for mod, out in ((layer, y), (twin, y_twin), (restored, y_restored)):
        ref, lowp = reference(mod, x)
        assert_close_to_reference(out, ref, lowp, "copy")


@needs_library
@both_splitters
def test_rows_split_over_threads_give_the_same_result(monkeypatch, two_threads):
    check_layers(("fan-in ablated", "diag b=16 tall", "diag b=12"), (1, 40), 14, "2 threads")


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
def two_threads(request, monkeypatch):
    """torch at 2 threads, and every product and pack split over them however small: on torch's OpenMP
    threads where the library has "openmp" (parallel_rows), or - indirect parameter "python
    threads" - on the Python thread pool (the fallback); yields which."""
    splitter = getattr(request, "param", "openmp")
    previous = torch.get_num_threads()
    monkeypatch.setattr(cpu, "PARALLEL_MIN_FMAS", 0)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_PACK", 0)
    monkeypatch.setattr(cpu, "SPLIT_ON_OPENMP", splitter == "openmp")
    torch.set_num_threads(2)
    yield splitter
    torch.set_num_threads(previous)



@needs_library
@both_splitters
def test_split_ors_the_results_of_its_threads(two_threads):
    so = cpu.lib()
    g = torch.zeros(8)
    # sddmm_tiles has no kernel for tiles of 7 tokens: each thread returns -1 before reading anything
    assert cpu._split(8, 10**9, so.sddmm_tiles, 1, 7, 1, 1, None, None, None, None, g.data_ptr()) == -1
    x = torch.randn(300, 40).bfloat16()
    out = torch.zeros(40)
    assert cpu._split(40, 10**9, so.col_sums_bf16, 300, x.data_ptr(), 40, out.data_ptr()) == 0  # (void)
    torch.testing.assert_close(out, x.double().sum(0).float(), rtol=1e-5, atol=1e-4)


@needs_library
@both_splitters
def test_split_on_openmp_goes_through_parallel_rows(two_threads, monkeypatch):
    so = cpu.lib()
    if two_threads == "openmp" and "openmp" not in cpu.features():
        pytest.skip(f"no OpenMP split: {cpu.missing_feature('openmp')}")
    calls = []
    real = so.parallel_rows if two_threads == "openmp" else None

    def spy(*a):
        calls.append(a[:2])
        return real(*a)
    if real is not None:
        monkeypatch.setattr(so, "parallel_rows", spy)
    layer = LAYERS["fan-in wide"](torch.Generator().manual_seed(3), True)
    x = torch.randn(40, layer.in_features)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, x @ layer.to_dense().t() + layer.bias, rtol=1e-4, atol=1e-4)
    assert calls if two_threads == "openmp" else not calls
    assert all(threads == 2 for threads, _ in calls)


def test_a_second_openmp_runtime_is_named(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /venv/torch/lib/libgomp.so.1\n"
                    "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n"
                    "7f04-7f05 r--p 00000000 08:01 1 /venv/torch/lib/libgomp.so.1\n"
                    "7f06-7f07 r-xp 00000000 08:01 3 /usr/lib/libgompish.so\n"
                    "7f08-7f09 rw-p 00000000 00:00 0\n")
    assert cpu._openmp_runtimes(maps) == ["/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/venv/torch/lib/libgomp.so.1"]
    assert cpu._openmp_runtimes(tmp_path / "absent") == []


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
    monkeypatch.setattr(cpu, "matvec", lambda *a: pytest.fail("the native product ran"))
    check_layers(("fan-in ablated", "diag b=16 wide", "unstructured"), (1, 6), 16, "through torch")


@pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"))
                    or os.environ.get("KERNELS_NATIVE_CPU") == "0", reason="no C compiler here, or the library is off")
def test_the_library_builds_where_a_compiler_is_present():
    # (every native test skips without the library: a source that stops compiling must fail here)
    assert cpu.lib() is not None, cpu.error()


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
        layer(x)  # the resolved one-token plan
        with cpu.disabled():
            y_torch_after = layer(x)
    assert len(native_calls) == 2
    torch.testing.assert_close(y_torch_after, y_torch)
    ref, lowp = reference(layer, x)
    assert_close_to_reference(y_torch, ref, lowp, "torch path")
    assert_close_to_reference(y_native, ref, lowp, "native path")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the AVX2 / x86-64 choice is made on x86-64 only")
def test_the_build_uses_only_instructions_the_cpu_reports(monkeypatch):
    monkeypatch.delenv("KERNELS_CPU_VARIANT", raising=False)  # (the choice from the flags)
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
    check_layers(("fan-in ablated", "diag b=16 tall", "diag b=12", "unstructured 70000 wide"), (1, 19), 18,
                 "x86-64 build")
    check_training_products(19, "x86-64 build")
    g = torch.Generator().manual_seed(36)
    for name in ("fan-in ablated", "diag b=16 tall", "diag b=12", "unstructured 70000 wide"):
        layer = LAYERS[name](g, True)
        for t in (1, 19):
            x = torch.randn(t, layer.in_features, generator=g)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            assert_matches(y, *bf16_reference(layer, x), f"{name}, T={t}, bf16, x86-64 build")
    check_bf16_training_products(37, "x86-64 build", shapes=((37, 300),), tokens=(1, 19))


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


def random_csr(g, n_rows, n_cols, density, empty_rows=()):
    """(crow, col, values) int32 / fp32 of a random pattern (coords.csr_structure, the layers'
    own builder), rows in ``empty_rows`` without entries (ablated neurons)."""
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    mask[list(empty_rows)] = False
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(rows.numel(), generator=g)  # any order in, CSR order out
    order, crow, col = kernels.coords.csr_structure(rows[perm].int(), cols[perm].int(), n_rows, n_cols)
    return crow.int(), col.int(), torch.randn(col.numel(), generator=g)


def dense_of(crow, col, values, n_rows, n_cols):
    counts = (crow[1:] - crow[:-1]).long()
    w = torch.zeros(n_rows, n_cols, dtype=torch.float64)
    w[torch.arange(n_rows).repeat_interleave(counts), col.long()] = values.double()
    return w


def check_training_products(seed, what, shapes=((37, 300), (300, 37), (64, 64)), tokens=(1, 5, 33, 70)):
    """kernels.cpu.csr_matmul (x.t() and token-minor right-hand sides) and kernels.cpu.sddmm
    (coordinates in row order and shuffled) against fp64, tall and wide, with empty rows."""
    g = torch.Generator().manual_seed(seed)
    for n_rows, n_cols in shapes:
        crow, col, vals = random_csr(g, n_rows, n_cols, 0.2, empty_rows=range(0, n_rows, 3))
        w = dense_of(crow, col, vals, n_rows, n_cols)
        rows = torch.arange(n_rows).repeat_interleave((crow[1:] - crow[:-1]).long()).int()
        for T in tokens:
            x = torch.randn(T, n_cols, generator=g)
            for name, dense_t in (("x.t()", x.t()), ("token-minor", x.t().contiguous())):
                y = cpu.csr_matmul(crow, col, vals, n_rows, n_cols, dense_t)
                assert y is not None, f"{what}: csr_matmul refused fp32 / int32 operands"
                ref = w @ x.double().t()
                assert_close_to_reference(y, ref, w.float() @ x.t(), f"csr_matmul {n_rows}x{n_cols} T={T} {name}, {what}")
            dy = torch.randn(T, n_rows, generator=g)
            full = dy.double().t() @ x.double()
            for name, perm in (("row order", torch.arange(rows.numel())), ("shuffled", torch.randperm(rows.numel(), generator=g))):
                r, c = rows[perm].contiguous(), col[perm].contiguous()
                got = cpu.sddmm(dy, x, r, c)
                assert got is not None, f"{what}: sddmm refused fp32 / int32 operands"
                ref = full[r.long(), c.long()]
                lowp = (dy.t() @ x)[r.long(), c.long()]
                assert_close_to_reference(got, ref, lowp, f"sddmm {n_rows}x{n_cols} T={T} {name}, {what}")


@needs_library
def test_training_products_match_the_fp64_reference():
    check_training_products(20, "1 thread")


@needs_library
@pytest.mark.parametrize("budget, widths", [(256 * 1024, (24, 16)), (512 * 1024, (32, 32))])
def test_training_products_of_wide_inputs_take_narrower_token_tiles(budget, widths, monkeypatch):
    """A tile of x within TILE_BYTES: 2100 inputs x 4 B take 24- / 16-token tiles at 256 KB (Zen 3's
    half L2), 32 at 512 KB (Zen 4's); the products match fp64 either way."""
    monkeypatch.setattr(cpu, "TILE_BYTES", budget)
    assert (cpu._tile_width(197, 2100, (8, 16, 24, 32)), cpu._tile_width(197, 2100, (16, 32))) == widths
    check_training_products(23, "wide input", shapes=((24, 2100),), tokens=(40,))


def test_the_token_tile_budget_is_half_the_l2(tmp_path):
    """TILE_BYTES = half of cpu0's L2 from sysfs, at least 256 KB (also where sysfs says nothing)."""
    for name, level, size in (("index0", "1", "48K"), ("index2", "2", "1024K"), ("index3", "3", "32768K")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(level + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    assert cpu._l2_bytes(tmp_path) == 1 << 20 and cpu.tile_bytes(1 << 20) == 512 * 1024
    assert cpu._l2_bytes(tmp_path / "none") is None and cpu.tile_bytes(None) == 256 * 1024
    assert cpu.tile_bytes(512 * 1024) == cpu.tile_bytes(256 * 1024) == 256 * 1024
    assert cpu.TILE_BYTES == cpu.tile_bytes(cpu._l2_bytes())


@needs_library
@both_splitters
def test_training_products_split_over_threads(two_threads):
    check_training_products(21, "2 threads", shapes=((300, 37), (37, 300)), tokens=(5, 70))


@needs_library
def test_coordinates_in_row_order_take_the_row_kernel_and_others_the_element_one(monkeypatch):
    """sddmm_rows (each dy row in registers once a tile) for rows that never decrease - fan-in's
    repeat_interleave, a sorted unstructured mask, rows with 0 to 70 weights (below and past the
    eight of a reduction) - and sddmm_tiles for any other order; both against fp64."""
    g = torch.Generator().manual_seed(24)
    so = cpu.lib()
    calls = []
    for name in ("sddmm_rows", "sddmm_tiles"):
        real = getattr(so, name)
        monkeypatch.setattr(so, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    counts = torch.tensor([0, 1, 7, 8, 9, 16, 70, 0, 3])
    rows = torch.arange(counts.numel()).repeat_interleave(counts).int()
    cols = torch.randint(0, 90, (rows.numel(),), generator=g).int()
    for T in (1, 16, 17, 40):
        dy, x = torch.randn(T, counts.numel(), generator=g), torch.randn(T, 90, generator=g)
        full = dy.double().t() @ x.double()
        for order, want in (("row order", "sddmm_rows"), ("reversed", "sddmm_tiles")):
            r, c = (rows, cols) if order == "row order" else (rows.flip(0).contiguous(), cols.flip(0).contiguous())
            calls.clear()
            got = cpu.sddmm(dy, x, r, c)
            assert calls == [want], f"{order}, T={T}: {calls}"
            assert_close_to_reference(got, full[r.long(), c.long()], (dy.t() @ x)[r.long(), c.long()],
                                      f"sddmm {order} T={T}")


@needs_library
def test_training_products_of_empty_patterns_and_no_tokens():
    crow = torch.zeros(5, dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.int32)
    y = cpu.csr_matmul(crow, empty, torch.zeros(0), 4, 6, torch.randn(6, 3))
    assert y.shape == (4, 3) and not y.any()
    g = cpu.sddmm(torch.randn(0, 4), torch.randn(0, 6), torch.tensor([0, 3], dtype=torch.int32),
                  torch.tensor([5, 1], dtype=torch.int32))
    assert g.shape == (2,) and not g.any()
    assert cpu.sddmm(torch.randn(3, 4), torch.randn(3, 6), empty, empty).shape == (0,)


@needs_library
def test_training_products_refuse_what_they_do_not_cover():
    g = torch.Generator().manual_seed(22)
    crow, col, vals = random_csr(g, 8, 12, 0.3)
    x, dy = torch.randn(3, 12, generator=g), torch.randn(3, 8, generator=g)
    rows = torch.arange(8).repeat_interleave((crow[1:] - crow[:-1]).long()).int()
    assert cpu.csr_matmul(crow, col, vals.double(), 8, 12, x.double().t()) is None  # fp64: torch's path
    assert cpu.csr_matmul(crow.long(), col.long(), vals, 8, 12, x.t()) is None     # int64 indices
    assert cpu.sddmm(dy.double(), x.double(), rows, col) is None
    assert cpu.sddmm(dy, x, rows.long(), col.long()) is None
    with cpu.disabled():
        assert cpu.csr_matmul(crow, col, vals, 8, 12, x.t()) is None
        assert cpu.sddmm(dy, x, rows, col) is None


# bf16: the weight stored in bf16, x widened to fp32, fp32 sums, y rounded to bf16 - nn.Linear
# under CPU autocast. Compared with the fp64 product of the bf16-rounded operands: at most 2x
# the error of torch's own dense bf16 product plus ATOL[bf16] (conftest.assert_matches).

def bf16_reference(layer, x):
    """(fp64 reference, torch's dense bf16 result) of the layer on x, operands rounded to bf16."""
    w = layer.to_dense().detach().to(torch.bfloat16)
    b = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    ref = xb.double() @ w.double().t() + (0 if b is None else b.double())
    lowp = xb @ w.t() + (0 if b is None else b)
    return ref, lowp


@needs_library
@pytest.mark.parametrize("how", ["bf16 layer", "autocast"])
@pytest.mark.parametrize("tokens", [1, 5, 33, 70])
@pytest.mark.parametrize("name", list(LAYERS))
def test_native_bf16_product_matches_the_fp64_reference(name, tokens, how, native_calls):
    g = torch.Generator().manual_seed(31)
    layer = LAYERS[name](g, True)
    x = torch.randn(tokens, layer.in_features, generator=g)
    ref, lowp = bf16_reference(layer, x)
    with torch.no_grad():
        if how == "bf16 layer":
            layer.to(torch.bfloat16)
            y = layer(x.to(torch.bfloat16))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
    assert native_calls, "the native product did not run"
    b = getattr(layer, "block_size", 1)
    # (bf16 blocks of 16 | b take the 16 x 16 tile kernels where the loaded build has them: AMX,
    # AVX-512-BF16 or emu)
    tiles = b % 16 == 0 and cpu.block_kernel(tokens)
    blocks = b > 1 and (tokens == 1 or b % 8 == 0)  # (several tokens: bsr_matmul's fp32 blocks)
    assert native_calls[-1][0] == ("bsr16" if tiles else "bsr" if blocks else "csr")
    assert y.dtype == torch.bfloat16
    assert_matches(y, ref, lowp, f"{name}, T={tokens}, {how}")


@needs_library
def test_a_bf16_one_token_plan_is_reused_and_follows_autocast_on_and_off(native_calls):
    g = torch.Generator().manual_seed(32)
    layer = LAYERS["diag b=16 wide"](g, True)
    x = torch.randn(1, layer.in_features, generator=g)
    with torch.no_grad():
        y32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = [layer(x.to(torch.bfloat16)) for _ in range(3)]
        again = layer(x)
    assert y32.dtype == again.dtype == torch.float32 and torch.equal(y32, again)
    ref, lowp = bf16_reference(layer, x)
    for y in y16:
        assert y.dtype == torch.bfloat16
        assert_matches(y, ref, lowp, "bf16 plan")
    assert len(native_calls) == 5


@needs_library
def test_bf16_rounding_is_torchs_round_to_nearest_even():
    so = cpu.lib()
    g = torch.Generator().manual_seed(33)
    bits = torch.randint(-2**31, 2**31 - 1, (4099,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 2**15, (64,), generator=g, dtype=torch.int32) << 16) | 0x8000  # exactly half way
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.3895e38, 1e-40])
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), special])
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    so.f32_to_bf16(x.numel(), x.data_ptr(), out.data_ptr())
    want = x.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    back = torch.empty(x.numel())
    so.bf16_to_f32(x.numel(), want.data_ptr(), back.data_ptr())
    assert torch.equal(back[~nan], want[~nan].float())


def check_bf16_training_products(seed, what, shapes=((37, 300), (300, 37)), tokens=(1, 5, 33, 70)):
    """kernels.cpu.csr_matmul and sddmm on bf16 operands (values, x, dy) against fp64 of the
    same bf16 numbers: csr_matmul's bf16 y within 2x torch's bf16 error + ATOL, sddmm's fp32 g
    at fp32 tolerance (its sums are fp32)."""
    g = torch.Generator().manual_seed(seed)
    for n_rows, n_cols in shapes:
        crow, col, vals = random_csr(g, n_rows, n_cols, 0.2, empty_rows=range(0, n_rows, 3))
        vals = vals.to(torch.bfloat16)
        w = dense_of(crow, col, vals, n_rows, n_cols)
        rows = torch.arange(n_rows).repeat_interleave((crow[1:] - crow[:-1]).long()).int()
        for T in tokens:
            x = torch.randn(T, n_cols, generator=g).to(torch.bfloat16)
            for name, dense_t in (("x.t()", x.t()), ("token-minor", x.t().contiguous())):
                y = cpu.csr_matmul(crow, col, vals, n_rows, n_cols, dense_t)
                assert y is not None and y.dtype == torch.bfloat16, f"{what}: csr_matmul refused bf16"
                assert_matches(y, w @ x.double().t(), w.to(torch.bfloat16) @ x.t(),
                               f"csr_matmul {n_rows}x{n_cols} T={T} {name}, {what}")
            dy = torch.randn(T, n_rows, generator=g).to(torch.bfloat16)
            for name, perm in (("row order", torch.arange(rows.numel())),
                               ("shuffled", torch.randperm(rows.numel(), generator=g))):
                r, c = rows[perm].contiguous(), col[perm].contiguous()
                got = cpu.sddmm(dy, x, r, c)
                assert got is not None and got.dtype == torch.float32, f"{what}: sddmm refused bf16"
                ref = (dy.double().t() @ x.double())[r.long(), c.long()]
                assert_close_to_reference(got, ref, (dy.float().t() @ x.float())[r.long(), c.long()],
                                          f"sddmm {n_rows}x{n_cols} T={T} {name}, {what}")


@needs_library
def test_bf16_training_products_match_the_fp64_reference():
    check_bf16_training_products(34, "1 thread")


@needs_library
@both_splitters
def test_bf16_training_products_split_over_threads(two_threads):
    check_bf16_training_products(35, "2 threads", tokens=(5, 70))


# The AVX-512-BF16 and AMX builds: chosen from the CPU's flags, compiled on every x86-64 CPU with
# a compiler (a source that stops compiling for them fails here, on the AVX2-only EPYC too), run
# where the CPU has them (their tests skip with the reason elsewhere).

AMX_FLAGS = {"sse2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile",
             "amx_bf16"}
has_compiler = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")),
    reason="needs x86-64 and a C compiler")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the variants are x86-64's")
def test_the_widest_build_the_cpu_flags_allow_is_chosen(monkeypatch):
    monkeypatch.delenv("KERNELS_CPU_VARIANT", raising=False)  # (the choice from the flags)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX_FLAGS)
    assert cpu.variant() == ("amx", cpu.AMX_FLAGS)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX_FLAGS - {"amx_tile"})
    assert cpu.variant() == ("avx512-bf16", cpu.AVX512_BF16_FLAGS)
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: AMX_FLAGS - {"avx512_bf16"})
    assert cpu.variant() == ("avx2", ["-mavx2", "-mfma"])


@has_compiler
@pytest.mark.parametrize("name, symbols", [("avx512-bf16", ("bsr16_mv_dpbf16", "csr_mm_i16_dpbf16", "csr_mm_i32_dpbf16",
                                                           "pack_tokens_dpbf16", "sddmm_tiles_dpbf16",
                                                           "pack_tokens_bf16_tiles", "bsr16_mm_dpbf16",
                                                           "pack_token_pairs16", "pack_vnni16",
                                                           "sddmm_blocks_dpbf16", "pack_pair_groups")),
                                           ("amx", ("bsr16_mv_dpbf16", "csr_mm_i16_dpbf16", "bsr16_mm_amx",
                                                    "sparse_cpu_amx_init", "sddmm_tiles_dpbf16",
                                                    "sddmm_blocks_amx", "pack_token_pairs", "bsr16_mm_dpbf16",
                                                    "sddmm_blocks_dpbf16"))])
def test_the_avx512_bf16_and_amx_builds_compile_on_any_x86_64(name, symbols, fresh_library):
    path = cpu.build(name)
    assert path.exists() and name in path.name
    so = ctypes.CDLL(str(path))  # (looked up, never called: this CPU may lack the instructions)
    for symbol in symbols + ("csr_mv_i16_bf16", "csr_mm_i16_bf16", "bsr_mv_bf16", "sddmm_tiles", "sddmm_rows",
                             "bsr_mm", "sddmm_blocks", "pack_blocks_bf16"):
        assert hasattr(so, symbol), f"{name} build lacks {symbol}"


def test_a_build_that_fails_falls_back_to_the_next_narrower_variant(monkeypatch, fresh_library):
    monkeypatch.delenv("KERNELS_CPU_VARIANT", raising=False)  # (a forced variant has no fall back)
    real = cpu.build
    monkeypatch.setattr(cpu, "variant", lambda: ("amx", cpu.AMX_FLAGS))

    def build(name=None):
        if name in ("amx", "avx512-bf16"):
            raise RuntimeError(f"gcc failed: unknown -m flag ({name})")
        return real(name)
    monkeypatch.setattr(cpu, "build", build)
    so = cpu.lib()
    if so is None:
        pytest.skip(f"no native library here at all: {cpu.error()}")
    assert cpu.loaded_variant() == ("avx2" if {"avx2", "fma"} <= cpu._cpu_flags() else "x86-64")
    assert cpu.features() <= {"openmp"}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the variants are x86-64's")
def test_kernels_cpu_variant_forces_a_build_and_refuses_what_the_cpu_cannot_run(monkeypatch, fresh_library):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma", "f16c"})
    monkeypatch.setenv("KERNELS_CPU_VARIANT", "x86-64")
    assert cpu.variant() == ("x86-64", ["-march=x86-64"])
    monkeypatch.setenv("KERNELS_CPU_VARIANT", "emu")
    assert cpu.variant() == ("emu", cpu.EMU_FLAGS)
    for name in ("amx", "avx512-bf16"):
        monkeypatch.setenv("KERNELS_CPU_VARIANT", name)
        with pytest.raises(RuntimeError, match=rf"KERNELS_CPU_VARIANT={name}: this CPU .* lacks .*avx512_bf16.*emu"):
            cpu.lib()
    monkeypatch.setenv("KERNELS_CPU_VARIANT", "avx512")
    with pytest.raises(ValueError, match="'avx512' is not a variant; choose one of amx, avx512-bf16, avx2, x86-64"):
        cpu.lib()
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"sse2", "avx"})
    for name in ("avx2", "emu"):
        monkeypatch.setenv("KERNELS_CPU_VARIANT", name)
        with pytest.raises(RuntimeError, match="lacks avx2, fma"):
            cpu.variant()


@pytest.mark.skipif(cpu.lib() is None or shutil.which("gcc") is None, reason="needs gcc and the native library")
def test_a_compiler_without_openmp_builds_the_rest_and_splits_on_python_threads(monkeypatch, fresh_library,
                                                                              tmp_path):
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unknown option -fopenmp" >&2; exit 1; }; '
                  f'done\nexec {shutil.which("gcc")} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert cpu.lib() is not None and "openmp" not in cpu.features()
    assert cpu.missing_feature("openmp") == "the library was built without OpenMP (the compiler has no -fopenmp)"
    assert not hasattr(cpu.lib(), "parallel_rows")
    monkeypatch.setattr(cpu, "PARALLEL_MIN_FMAS", 0)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_PACK", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_layers(("fan-in ablated", "diag b=16 tall"), (1, 40), 16, "2 Python threads")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or cpu.lib() is None,
                    reason="needs x86-64 and a C compiler")
def test_a_forced_variant_is_loaded_without_falling_back(monkeypatch, fresh_library):
    monkeypatch.setenv("KERNELS_CPU_VARIANT", "x86-64")
    assert cpu.lib() is not None and cpu.loaded_variant() == "x86-64" and cpu.features() <= {"openmp"}
    cpu.reset()
    real = cpu.build

    def build(name=None):
        if name == "x86-64":
            raise RuntimeError("gcc failed (x86-64)")
        return real(name)
    monkeypatch.setattr(cpu, "build", build)
    assert cpu.lib() is None and cpu.error() == "x86-64: RuntimeError: gcc failed (x86-64)"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or cpu.lib() is None,
                    reason="the variants are x86-64's")
def test_a_missing_kernel_is_said_to_be_the_build_s_or_the_cpu_s(monkeypatch, fresh_library):
    """The avx2 build forced on a CPU with avx512_bf16: the skip reason names the forced build, not
    the CPU; on a CPU without the flag, the CPU."""
    monkeypatch.setenv("KERNELS_CPU_VARIANT", "avx2")
    assert cpu.lib() is not None and "blocks_dpbf16" not in cpu.features()
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512_bf16"})
    assert cpu.missing_feature("blocks_dpbf16").startswith(
        "the avx2 build (forced by KERNELS_CPU_VARIANT) has no blocks_dpbf16 kernels; this CPU")
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert cpu.missing_feature("blocks_dpbf16").endswith("the avx2 build) lacks avx512_bf16")


@needs_library
@pytest.mark.parametrize("name", ["diag b=16 wide", "diag b=16 tall", "diag b=64"])
def test_the_16_by_16_tile_layout_holds_the_bf16_blocks(name):
    """The VNNI blocks of the AMX / AVX-512-BF16 kernels, built on any CPU: their dense weight is
    the layer's, rounded to bf16, exactly."""
    g = torch.Generator().manual_seed(38)
    layer = LAYERS[name](g, True)
    with torch.no_grad():
        w = layer._inference_weight(layer.values, blocked=True, native=True, dtype=torch.bfloat16, tiles=True)
    assert w.kind == "bsr16" and w.values.dtype == torch.bfloat16 and w.values.shape[1:] == (8, 16, 2)
    assert torch.equal(cpu.bsr16_dense(w), layer.to_dense().detach().to(torch.bfloat16).float())
    assert w.n_rows == layer.out_features // 16


# The AMX and AVX-512-BF16 kernels run twice: on this CPU's build where it has them (skipping
# with the reason elsewhere: the AMD EPYC) and on the emu build on any AVX2 CPU, the same kernel
# source on emulated instructions (sparse_cpu.c, SPARSE_CPU_EMU; the emulation itself is tested
# against a model of Intel's documented operation in test_cpu_emu.py). Same fp64 references,
# same tolerances.

@pytest.fixture
def emu_library(monkeypatch):
    """The emu build loaded in place of this CPU's (KERNELS_CPU_VARIANT=emu); this CPU's back after."""
    if not (platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu._cpu_flags()):
        pytest.skip("the emu build needs an x86-64 CPU with avx2 + fma")
    monkeypatch.setenv("KERNELS_CPU_VARIANT", "emu")
    cpu.reset()
    if cpu.lib() is None:
        pytest.skip(f"no native library here: {cpu.error()}")
    assert cpu.loaded_variant() == "emu" and cpu.features() - {"openmp"} == {"amx", "avx512_bf16", "csr_dpbf16",
                                                                             "sddmm_dpbf16", "blocks_dpbf16"}
    yield
    monkeypatch.undo()
    cpu.reset()


def tile_build(request, feature: str):
    if request.param == "emu":
        request.getfixturevalue("emu_library")
    elif feature not in cpu.features():
        why = cpu.missing_feature(feature)
        if why.startswith("the AMX kernels"):  # this CPU has them, and their first-run check failed
            pytest.fail(f"{feature} kernels on this CPU: {why}")
        pytest.skip(f"{feature} kernels: {why}")
    return request.param


@pytest.fixture(params=["this CPU", "emu"])
def amx_build(request):
    """bsr16_mm_amx on this CPU (skips without AMX) or on the emu build."""
    return tile_build(request, "amx")


@pytest.fixture(params=["this CPU", "emu"])
def dpbf16_build(request):
    """bsr16_mv_dpbf16 on this CPU (skips without AVX-512-BF16) or on the emu build."""
    return tile_build(request, "avx512_bf16")


def check_amx_tile_product(name, tokens, how, build, native_calls):
    g = torch.Generator().manual_seed(39)
    layer = LAYERS[name](g, True)
    x = torch.randn(tokens, layer.in_features, generator=g)
    ref, lowp = bf16_reference(layer, x)
    with torch.no_grad():
        if how == "bf16 layer":
            y = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
    assert native_calls[-1] == ("bsr16", tokens)
    assert_matches(y, ref, lowp, f"{name}, T={tokens}, AMX ({build}), {how}")


@pytest.mark.parametrize("how", ["bf16 layer", "autocast"])
@pytest.mark.parametrize("tokens", [2, 16, 33, 70])
@pytest.mark.parametrize("name", ["diag b=16 wide", "diag b=16 tall", "diag b=64"])
def test_amx_tile_product_matches_the_fp64_reference(name, tokens, how, amx_build, native_calls):
    check_amx_tile_product(name, tokens, how, amx_build, native_calls)


def test_amx_tile_product_split_over_threads(amx_build, two_threads, native_calls):
    check_amx_tile_product("diag b=16 tall", 70, "autocast", amx_build, native_calls)


def check_avx512_bf16_one_token_product(name, build, native_calls):
    g = torch.Generator().manual_seed(40)
    layer = LAYERS[name](g, True)
    x = torch.randn(1, layer.in_features, generator=g)
    ref, lowp = bf16_reference(layer, x)
    with torch.no_grad():
        y = [layer.to(torch.bfloat16)(x.to(torch.bfloat16)) for _ in range(2)]  # the plan, then its reuse
    assert native_calls[-1] == ("bsr16", 1)
    for out in y:
        assert_matches(out, ref, lowp, f"{name}, AVX-512-BF16 ({build})")


@pytest.mark.parametrize("name", ["diag b=16 wide", "diag b=16 tall", "diag b=64"])
def test_avx512_bf16_one_token_product_matches_the_fp64_reference(name, dpbf16_build, native_calls):
    check_avx512_bf16_one_token_product(name, dpbf16_build, native_calls)


def test_avx512_bf16_one_token_product_split_over_threads(dpbf16_build, two_threads, native_calls):
    check_avx512_bf16_one_token_product("diag b=16 tall", dpbf16_build, native_calls)


def random_bsr16(g, n_out, n_in, empty_rows):
    """A BSR of 16 x 16 blocks, about half the blocks of each block row, none in ``empty_rows``."""
    crow, bcols = [0], []
    for rb in range(n_out // 16):
        cols = [] if rb in empty_rows else sorted(torch.randperm(n_in // 16, generator=g)[:max(1, n_in // 32)].tolist())
        bcols += cols
        crow.append(len(bcols))
    blocks = torch.randn(len(bcols), 16, 16, generator=g)
    dense = torch.zeros(n_out, n_in)
    for rb in range(n_out // 16):
        for n in range(crow[rb], crow[rb + 1]):
            dense[rb * 16:rb * 16 + 16, bcols[n] * 16:bcols[n] * 16 + 16] = blocks[n]
    return torch.tensor(crow, dtype=torch.int32), torch.tensor(bcols, dtype=torch.int32), blocks, dense


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_tile_kernels_take_empty_block_rows_strided_x_and_either_y(out_dtype, bias, amx_build):
    """kernels.cpu.matmul on a 'bsr16' weight directly: block rows without blocks (bias only),
    x a column slice of a wider bf16 tensor (row stride != in), y in bf16 or fp32, every tail
    of the 32-token loop; one bf16 token takes bsr16_mv_dpbf16 (the AMX build has both)."""
    g = torch.Generator().manual_seed(41)
    n_out, n_in = 80, 96
    crow, bcols, blocks, dense = random_bsr16(g, n_out, n_in, empty_rows=(0, 3))
    w = cpu.bsr16_weight(crow, bcols, blocks, n_out, n_in)
    b = torch.randn(n_out, generator=g).to(torch.bfloat16).float() if bias else None
    wb = dense.to(torch.bfloat16)
    for tokens in (1, 5, 16, 31, 32, 33, 70):
        wide = torch.randn(tokens, n_in + 24, generator=g).to(torch.bfloat16)
        x = wide[:, 8:8 + n_in]
        y = cpu.matmul(w, x, b, out_dtype=out_dtype)
        ref = x.double() @ wb.double().t() + (0 if b is None else b.double())
        lowp = (x @ wb.t() + (0 if b is None else b.to(torch.bfloat16))).to(out_dtype)
        assert y.dtype == out_dtype and y.shape == (tokens, n_out)
        assert_matches(y, ref, lowp, f"T={tokens}, y {out_dtype}, bias {bias} ({amx_build})")
        if not bias:
            assert not y[:, :16].any() and not y[:, 48:64].any(), "an empty block row must give 0"


# The AVX-512-BF16 CSR product of several tokens (csr_mm_*_dpbf16: weight pairs, bf16 tiles of 32
# tokens), on this CPU where it has avx512_bf16 (skips with the reason elsewhere) and on the emu
# build: the inference weight (by panels of PANEL columns, the bf16 copy in ``pairs``) and the
# training product's (kernels.cpu.csr_matmul: one panel, bf16 values), fan-in (an odd k, so every
# row ends on an unpaired weight in some panel; ablated rows) and unstructured masks (empty rows),
# against fp64 of the same bf16 numbers at the existing tolerances (conftest.assert_matches).

@pytest.fixture(params=["this CPU", "emu"])
def csr_dpbf16_build(request):
    """csr_mm_*_dpbf16 on this CPU (skips without AVX-512-BF16) or on the emu build."""
    return tile_build(request, "csr_dpbf16")


def count_tokens(monkeypatch, name: str, arg: int) -> list[int]:
    """Spies on kernels.cpu.<name>: the token count (shape[0]) of its argument ``arg``, a call each."""
    calls = []
    real = getattr(cpu, name)

    def spy(*args):
        calls.append(args[arg].shape[0])
        return real(*args)
    monkeypatch.setattr(cpu, name, spy)
    return calls


@pytest.fixture
def dpbf16_calls(monkeypatch):
    """Counts the products that take csr_mm_*_dpbf16, as tokens."""
    return count_tokens(monkeypatch, "_csr_dpbf16_matmul", 3)  # (so, w, pairs, x, ...)


def csr_mask(g, kind, n_out, n_in):
    """(rows, cols) int32 of a fan-in mask (k = 37 a row, rows 0, 7, 14, ... ablated) or an
    unstructured one (density 0.15, every fifth row empty)."""
    if kind == "fan-in":
        live = [r for r in range(n_out) if r % 7]
        rows = torch.tensor(live).repeat_interleave(37)
        cols = torch.cat([torch.randperm(n_in, generator=g)[:37] for _ in live])
    else:
        mask = torch.rand(n_out, n_in, generator=g) < 0.15
        mask[::5] = False
        rows, cols = mask.nonzero(as_tuple=True)
    return rows.int(), cols.int()


DPBF16_TOKENS = [2, 5, 31, 32, 33, 70, 256]


def dpbf16_slot(j: int) -> int:
    """Where pack_tokens_dpbf16 puts token j of a tile of 32 (sparse_cpu.c's dpbf16_slot)."""
    return 8 * ((j % 16) // 4) + 4 * (j // 16) + j % 4


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("n", [3, 8, 16, 24, 40, 333])
@pytest.mark.parametrize("layout", ["x", "x.T"])
def test_bf16_token_tile_packs_put_every_token_where_the_products_read_it(tokens, n, layout, dpbf16_build):
    """pack_tokens_dpbf16 (tiles of 32 in csr_mm_*_dpbf16's slot order) and pack_tokens_bf16_tiles
    (16 / 32 / 64 / 128 in token order) against torch's permute of the zero-padded x, bit for bit:
    16-column blocks of word transposes, the 8-column and element-by-element tails (n = 3, 24,
    40, 333), partial tiles (tokens past T zero) and a transposed x (the element-by-element path).
    The outputs start NaN, so an unwritten slot fails."""
    so = cpu.lib()
    g = torch.Generator().manual_seed(71)
    x = torch.randn(tokens, n, generator=g).bfloat16()
    if layout == "x.T":
        x = x.t().contiguous().t()
    for tw, order in ((32, "slots"), (16, "tokens"), (32, "tokens"), (64, "tokens"), (128, "tokens")):
        tiles = -(-tokens // tw)
        padded = torch.zeros(tiles * tw, n, dtype=torch.bfloat16)
        padded[:tokens] = x
        want = padded.reshape(tiles, tw, n).permute(0, 2, 1)  # [tiles, n, tw], token order
        if order == "slots":
            want = want[:, :, torch.tensor(sorted(range(32), key=dpbf16_slot))]
        out = torch.full((tiles, n, tw), float("nan"), dtype=torch.bfloat16)
        if order == "slots":
            so.pack_tokens_dpbf16(tokens, n, x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), 1)
        else:
            so.pack_tokens_bf16_tiles(tokens, n, x.data_ptr(), x.stride(0), x.stride(1), tw, out.data_ptr(), 1)
        assert torch.equal(out.view(torch.int16), want.contiguous().view(torch.int16)), (tw, order)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["fan-in", "unstructured"])
@pytest.mark.parametrize("tokens", DPBF16_TOKENS)
def test_avx512_bf16_csr_product_matches_the_fp64_reference(tokens, kind, bias, out_dtype, threads, csr_dpbf16_build,
                                                           dpbf16_calls, monkeypatch, request):
    """kernels.cpu.matmul on bf16 x: the inference weight (3 panels, the last one partial) and the
    training one, every token count through csr_mm_*_dpbf16 (DPBF16_MIN_TOKENS lowered to 1: 2
    and 5 tokens are a partial tile); y in bf16 or fp32, bias (fp32) or none, 1 or 2 threads;
    150 outputs: the kernel's sums go to y 64 rows at a time, so 64 + 64 + 22 on one thread and
    64 + 11 from row 75 on the second."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    monkeypatch.setattr(cpu, "DPBF16_MIN_TOKENS", 1)
    g = torch.Generator().manual_seed(42 + tokens)
    n_out, n_in = 150, 2 * cpu.PANEL + 76
    rows, cols = csr_mask(g, kind, n_out, n_in)
    values = torch.randn(rows.numel(), generator=g).to(torch.bfloat16)
    panelled = cpu.csr_weight(rows, cols, values, n_out, n_in, panels=True, dtype=torch.bfloat16)
    assert panelled.panels == 3 and panelled.pairs is not None and panelled.index == 16
    order, crow, col = kernels.coords.csr_structure(rows, cols, n_out, n_in)
    training = cpu.NativeWeight("csr", n_out, n_in, crow.int(), col.int(), values[order].contiguous())
    w = dense_of(crow, col, values[order], n_out, n_in)
    b = torch.randn(n_out, generator=g) if bias else None
    x = torch.randn(tokens, n_in, generator=g).to(torch.bfloat16)
    ref = x.double() @ w.t() + (0 if b is None else b.double())
    lowp = (x @ w.to(torch.bfloat16).t() + (0 if b is None else b.to(torch.bfloat16))).to(out_dtype)
    for name, weight in (("inference, by panels", panelled), ("training, one panel", training)):
        y = cpu.matmul(weight, x, b, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (tokens, n_out)
        assert_matches(y, ref, lowp, f"{kind}, T={tokens}, {name}, bias {bias}, y {out_dtype}, {threads} threads "
                                     f"({csr_dpbf16_build})")
        if not bias:
            assert not y[:, ::5 if kind == "unstructured" else 7].any(), "an empty row must give 0"
    assert dpbf16_calls == [tokens, tokens]


def test_avx512_bf16_csr_product_with_4_byte_column_indices(csr_dpbf16_build, dpbf16_calls):
    g = torch.Generator().manual_seed(43)
    layer = LAYERS["unstructured 70000 wide"](g, True)
    x = torch.randn(33, layer.in_features, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert dpbf16_calls == [33]
    assert layer._inference_weight(layer.values, blocked=False, native=True, dtype=torch.bfloat16).index == 32
    assert_matches(y, *bf16_reference(layer, x), f"70000 wide ({csr_dpbf16_build})")


@pytest.mark.parametrize("name", ["fan-in wide", "fan-in ablated", "diag b=1 tall", "unstructured"])
def test_bf16_layers_take_the_avx512_bf16_csr_product_from_17_tokens(name, csr_dpbf16_build, dpbf16_calls,
                                                                      native_calls):
    """The layers' bf16 inference (a bf16 layer and autocast) at 2 ... 256 tokens: csr_mm_*_dpbf16
    from DPBF16_MIN_TOKENS on, the fp32 loop below; both match the fp64 reference."""
    g = torch.Generator().manual_seed(44)
    layer = LAYERS[name](g, True)
    for tokens in DPBF16_TOKENS:
        x = torch.randn(tokens, layer.in_features, generator=g)
        ref, lowp = bf16_reference(layer, x)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y2 = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16))
        for how, out in (("autocast", y), ("bf16 layer", y2)):
            assert_matches(out, ref, lowp, f"{name}, T={tokens}, {how} ({csr_dpbf16_build})")
    assert native_calls == [("csr", t) for t in DPBF16_TOKENS for _ in range(2)]
    assert dpbf16_calls == [t for t in DPBF16_TOKENS if t >= cpu.DPBF16_MIN_TOKENS for _ in range(2)]


def test_fp32_x_never_takes_the_avx512_bf16_csr_product(csr_dpbf16_build, dpbf16_calls):
    """fp32 x with a bf16 weight keeps its fp32 numbers (the fp32 loop): rounding x to bf16 would not."""
    g = torch.Generator().manual_seed(45)
    rows, cols = csr_mask(g, "unstructured", 30, 200)
    values = torch.randn(rows.numel(), generator=g).to(torch.bfloat16)
    w = cpu.csr_weight(rows, cols, values, 30, 200, panels=True, dtype=torch.bfloat16)
    x = torch.randn(40, 200, generator=g)
    y = cpu.matmul(w, x, None)
    assert not dpbf16_calls and y.dtype == torch.float32
    dense = torch.zeros(30, 200, dtype=torch.float64)
    dense[rows.long(), cols.long()] = values.double()
    ref = x.double() @ dense.t()
    assert_close_to_reference(y, ref, x @ dense.float().t(), "fp32 x, bf16 weight")


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_training_products_take_the_avx512_bf16_csr_product(threads, csr_dpbf16_build, dpbf16_calls,
                                                                 request):
    """csr_matmul under autocast, as a training step calls it (forward and input gradient: bf16
    values, bf16 dense_t), at 5 ... 256 tokens, tall and wide, x.t() and token-minor."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    check_bf16_training_products(46, f"{threads} threads ({csr_dpbf16_build})", tokens=(5, 31, 33, 70, 256))
    assert dpbf16_calls.count(5) == 0 and len(dpbf16_calls) == 2 * 2 * 4  # shapes x layouts x T >= 17


def test_a_bf16_layer_trains_under_autocast_through_the_avx512_bf16_csr_product(csr_dpbf16_build, dpbf16_calls):
    """The forward and input gradient of a fan-in layer's training step under autocast against
    fp64 of the bf16-rounded operands."""
    g = torch.Generator().manual_seed(47)
    layer = LAYERS["fan-in wide"](g, True)
    x = torch.randn(40, layer.in_features, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(dy)
    assert len(dpbf16_calls) == 2 and set(dpbf16_calls) == {40}  # forward, input gradient
    w = layer.to_dense().detach().to(torch.bfloat16)
    ref, lowp = bf16_reference(layer, x.detach())
    assert_matches(y, ref, lowp, f"forward ({csr_dpbf16_build})")
    assert_matches(x.grad.to(torch.bfloat16), dy.double() @ w.double(), dy @ w, f"input gradient ({csr_dpbf16_build})")


# The weight gradient of bf16 dy and x by AVX-512-BF16 (sddmm_tiles_dpbf16): both packed into bf16
# token tiles of 32 / 64 / 128 tokens, a pair of tokens per fp32 lane, sixteen weights a
# reduction and a scalar tail. fp32 sums, so against fp64 of the same bf16 numbers at fp32
# tolerance (2x the error of torch's fp32 product of them + ATOL), as the fp32 tiles.

@pytest.fixture(params=["this CPU", "emu"])
def sddmm_dpbf16_build(request):
    """sddmm_tiles_dpbf16 on this CPU (skips without AVX-512-BF16) or on the emu build."""
    return tile_build(request, "sddmm_dpbf16")


@pytest.fixture
def sddmm_dpbf16_calls(monkeypatch):
    """Counts the weight gradients that take sddmm_tiles_dpbf16, as tokens."""
    return count_tokens(monkeypatch, "_sddmm_dpbf16", 1)  # (so, dy, x, ...)


def check_bf16_sddmm(dy, x, rows, cols, what):
    got = cpu.sddmm(dy, x, rows, cols)
    assert got is not None and got.dtype == torch.float32, f"{what}: sddmm refused bf16"
    r, c = rows.long(), cols.long()
    ref = (dy.double().t() @ x.double())[r, c]
    assert_close_to_reference(got, ref, (dy.float().t() @ x.float())[r, c], what)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 5, 31, 32, 33, 70, 127, 256])
def test_avx512_bf16_sddmm_matches_the_fp64_reference(tokens, threads, sddmm_dpbf16_build, sddmm_dpbf16_calls,
                                                      request):
    """cpu.sddmm on bf16 dy and x: a fan-in mask and an unstructured one, coordinates in row order
    and shuffled, 7 / 16 / 53 / all of them (below, at and past the sixteen weights of a
    reduction), every tile width (T = 1 ... 127 in one tile of 32, 64 or 128 tokens, partial or
    full; 256 in two)."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    g = torch.Generator().manual_seed(60 + tokens)
    n_out, n_in = 45, 300
    assert cpu._tile_width(tokens, n_in, (32, 64, 128), elem_bytes=2) == next((tw for tw in (32, 64, 128) if tw >= tokens), 128)
    dy = torch.randn(tokens, n_out, generator=g).to(torch.bfloat16)
    x = torch.randn(tokens, n_in, generator=g).to(torch.bfloat16)
    runs = 0
    for kind in ("fan-in", "unstructured"):
        rows, cols = csr_mask(g, kind, n_out, n_in)
        for name, perm in (("row order", torch.arange(rows.numel())),
                           ("shuffled", torch.randperm(rows.numel(), generator=g))):
            for n in (7, 16, 53, rows.numel()):
                r, c = rows[perm][:n].contiguous(), cols[perm][:n].contiguous()
                check_bf16_sddmm(dy, x, r, c, f"{kind}, {name}, n={n}, T={tokens}, {threads} threads "
                                              f"({sddmm_dpbf16_build})")
                runs += 1
    assert sddmm_dpbf16_calls == [tokens] * runs


def test_avx512_bf16_sddmm_of_coordinates_by_row_takes_the_row_kernel(sddmm_dpbf16_build, monkeypatch):
    """Coordinates stored row by row (fan-in's) take sddmm_rows_dpbf16 (their row pointers
    passed), any other order sddmm_tiles_dpbf16 (none); both against fp64, rows with no weight
    and rows past the last coordinate included."""
    kinds = []
    real = cpu._sddmm_dpbf16
    monkeypatch.setattr(cpu, "_sddmm_dpbf16", lambda so, dy, x, r, c, g, crow: (
        kinds.append("rows" if crow is not None else "tiles"), real(so, dy, x, r, c, g, crow))[1])
    g = torch.Generator().manual_seed(66)
    dy = torch.randn(70, 45, generator=g).to(torch.bfloat16)
    x = torch.randn(70, 300, generator=g).to(torch.bfloat16)
    rows, cols = csr_mask(g, "fan-in", 45, 300)
    keep = rows < 40  # (the last rows hold no weight)
    rows, cols = rows[keep].contiguous(), cols[keep].contiguous()
    perm = torch.randperm(rows.numel(), generator=g)
    check_bf16_sddmm(dy, x, rows, cols, f"row order ({sddmm_dpbf16_build})")
    check_bf16_sddmm(dy, x, rows[perm].contiguous(), cols[perm].contiguous(), f"shuffled ({sddmm_dpbf16_build})")
    assert kinds == ["rows", "tiles"]


@pytest.mark.parametrize("n_in, tw", [(1500, 64), (3072, 32)])
def test_avx512_bf16_sddmm_of_wide_inputs_takes_narrower_token_tiles(n_in, tw, sddmm_dpbf16_build,
                                                                     sddmm_dpbf16_calls, monkeypatch):
    """A tile of x within TILE_BYTES (here 256 KB) at 2 B an element: 256 tokens of a 1500- /
    3072-wide x in tiles of 64 / 32 tokens."""
    monkeypatch.setattr(cpu, "TILE_BYTES", 256 * 1024)
    assert cpu._tile_width(256, n_in, (32, 64, 128), elem_bytes=2) == tw
    g = torch.Generator().manual_seed(61)
    dy = torch.randn(256, 40, generator=g).to(torch.bfloat16)
    x = torch.randn(256, n_in, generator=g).to(torch.bfloat16)
    rows, cols = csr_mask(g, "fan-in", 40, n_in)
    check_bf16_sddmm(dy, x, rows, cols, f"{n_in} wide, tiles of {tw} ({sddmm_dpbf16_build})")
    assert sddmm_dpbf16_calls == [256]


@pytest.mark.parametrize("layout", ["transposed views", "row slices"])
def test_avx512_bf16_sddmm_reads_dy_and_x_at_their_strides(layout, sddmm_dpbf16_build, sddmm_dpbf16_calls):
    """dy and x as views: transposed (element stride 1 along tokens: packed element by element)
    and row slices of wider tensors (token stride past the width: packed 8 x 8 at a time)."""
    g = torch.Generator().manual_seed(62)
    T, n_out, n_in = 70, 45, 300
    if layout == "transposed views":
        dy = torch.randn(n_out, T, generator=g).to(torch.bfloat16).t()
        x = torch.randn(n_in, T, generator=g).to(torch.bfloat16).t()
        assert dy.stride() == (1, T) and x.stride() == (1, T)
    else:
        dy = torch.randn(T, n_out + 19, generator=g).to(torch.bfloat16)[:, 3:3 + n_out]
        x = torch.randn(T, n_in + 21, generator=g).to(torch.bfloat16)[:, 5:5 + n_in]
        assert not dy.is_contiguous() and x.stride(1) == 1
    rows, cols = csr_mask(g, "unstructured", n_out, n_in)
    check_bf16_sddmm(dy, x, rows, cols, f"{layout} ({sddmm_dpbf16_build})")
    assert sddmm_dpbf16_calls == [T]


def test_fp32_or_mixed_operands_never_take_the_avx512_bf16_sddmm(sddmm_dpbf16_build, sddmm_dpbf16_calls):
    """An fp32 dy or x keeps its fp32 numbers (the fp32 tiles): rounding it to bf16 would not."""
    g = torch.Generator().manual_seed(63)
    rows, cols = csr_mask(g, "fan-in", 45, 300)
    dy, x = torch.randn(40, 45, generator=g), torch.randn(40, 300, generator=g)
    for a, b in ((dy, x), (dy.to(torch.bfloat16), x), (dy, x.to(torch.bfloat16))):
        got = cpu.sddmm(a, b, rows, cols)
        ref = (a.double().t() @ b.double())[rows.long(), cols.long()]
        assert_close_to_reference(got, ref, (a.float().t() @ b.float())[rows.long(), cols.long()],
                                  f"dy {a.dtype}, x {b.dtype} ({sddmm_dpbf16_build})")
    assert not sddmm_dpbf16_calls


@pytest.mark.parametrize("name", ["fan-in wide", "unstructured", "diag b=1 tall", "diag b=12"])
def test_a_bf16_layer_takes_the_avx512_bf16_sddmm_for_its_weight_gradient(name, sddmm_dpbf16_build,
                                                                          sddmm_dpbf16_calls):
    """A training step under autocast: the weight gradient at the stored elements (a block
    diagonal's b x b elements too, for b <= 16 not a multiple of 8: those of 8 | b take the
    block products, tests/kernels/test_cpu_blocks.py) from the bf16 dy and x the backward pass hands to
    kernels.sddmm, against fp64 of those bf16 numbers (rounded
    to bf16 as the layer's gradient is, so within 2x torch's bf16 error + ATOL)."""
    g = torch.Generator().manual_seed(64)
    layer = LAYERS[name](g, True)
    x = torch.randn(40, layer.in_features, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(dy)
    assert sddmm_dpbf16_calls == [40], f"{name}: {sddmm_dpbf16_calls}"
    rows, cols = layer.coords()
    xb = x.to(torch.bfloat16)
    r, c = rows.long(), cols.long()
    ref = (dy.double().t() @ xb.double())[r, c].reshape(layer.values.shape)
    lowp = (dy.t() @ xb)[r, c].reshape(layer.values.shape)
    assert_matches(layer.values.grad.to(torch.bfloat16), ref, lowp, f"{name} dW ({sddmm_dpbf16_build})")


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 5), (63, 1030), (130, 2051), (300, 16)])
def test_column_sums_of_bf16_match_the_fp64_reference(shape, threads, request):
    """kernels.cpu.column_sums (a bias gradient under autocast): every column chunk (1024) and its
    tail, one and several row chunks (64) and a partial one, a column slice (row stride != width),
    against fp64 at the fp32 tolerance; fp32, a transposed view and 0 rows are declined."""
    if threads == 2:
        request.getfixturevalue("two_threads")
    g = torch.Generator().manual_seed(300 + shape[0])
    wide = torch.randn(shape[0], shape[1] + 9, generator=g).to(torch.bfloat16)
    for t in (wide[:, :shape[1]].contiguous(), wide[:, 4:4 + shape[1]]):
        got = cpu.column_sums(t)
        assert_close_to_reference(got, t.double().sum(0), t.float().sum(0), f"{shape}, strides {t.stride()}")
    assert cpu.column_sums(wide.float()) is None and cpu.column_sums(wide.t()) is None
    assert cpu.column_sums(wide[:0]) is None


@needs_library
@pytest.mark.parametrize("name", ["diag b=16", "fan-in", "unstructured"])
def test_a_layer_s_bias_gradient_under_autocast_takes_the_column_sums(name, monkeypatch):
    """The bias gradient of bf16 dy on CPU: DiagLinear's backward and, for fan-in and unstructured
    layers, module._BiasAdd sum it by kernels.cpu.column_sums (x [2, 35, 64]: the token rows
    flattened); the gradients of x and the values are autograd's as before; fp32 keeps torch's."""
    calls = []  # (the shapes the library summed)
    real = cpu.column_sums

    def spy(t):
        out = real(t)
        if out is not None:
            calls.append(t.shape)
        return out
    monkeypatch.setattr(cpu, "column_sums", spy)
    g = torch.Generator().manual_seed(310)
    layer = {"diag b=16": lambda: kernels.DiagLinear(64, 48, density=0.5, block_size=16, generator=g),
             "fan-in": lambda: kernels.FanInLinear(64, 48, density=0.5, generator=g),
             "unstructured": lambda: kernels.SparseLinear(64, 48, density=0.5, generator=g)}[name]()
    x = torch.randn(2, 35, 64, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(dy)
    assert calls == [(70, 48)]
    flat = dy.reshape(70, 48)
    assert layer.bias.grad.dtype == torch.float32
    assert_matches(layer.bias.grad.to(torch.bfloat16), flat.double().sum(0), flat.float().sum(0).to(torch.bfloat16),
                   f"{name}: bias gradient")
    w = layer.to_dense().detach().to(torch.bfloat16)
    assert_matches(x.grad.to(torch.bfloat16), dy.double() @ w.double(), dy @ w, f"{name}: input gradient")
    calls.clear()
    layer.zero_grad()
    layer(x.detach()).backward(dy.float())  # fp32: torch's sum
    assert calls == [] and torch.allclose(layer.bias.grad, flat.float().sum(0), atol=1e-4)


def test_workspaces_are_reused_per_slot_and_per_thread(monkeypatch):
    """kernels.cpu.workspace: one buffer per slot and thread, reused for anything that fits (any
    dtype and shape, contiguous), grown for what does not, a fresh tensor per call above
    WORKSPACE_MAX_BYTES; release_workspaces frees them and says how much."""
    import threading
    cpu.release_workspaces()
    a = cpu.workspace("xt", (4, 8), torch.float32)
    b = cpu.workspace("xt", (3, 8), torch.bfloat16)
    assert b.data_ptr() == a.data_ptr() and b.shape == (3, 8) and b.dtype == torch.bfloat16 and b.is_contiguous()
    assert cpu.workspace("yt", (4, 8), torch.float32).data_ptr() != a.data_ptr(), "another slot shares a buffer"
    big = cpu.workspace("xt", (64, 8), torch.float32)
    assert big.shape == (64, 8) and cpu.workspace("xt", (64, 8), torch.float32).data_ptr() == big.data_ptr()
    other = []
    t = threading.Thread(target=lambda: other.append(cpu.workspace("xt", (4, 8), torch.float32).data_ptr()))
    t.start()
    t.join()
    assert other[0] != big.data_ptr(), "two threads share a workspace"
    monkeypatch.setattr(cpu, "WORKSPACE_MAX_BYTES", 1024)
    assert cpu.workspace("xt", (64, 8), torch.float32).data_ptr() != big.data_ptr()
    assert cpu.release_workspaces() == 64 * 8 * 4 + 4 * 8 * 4
    assert cpu.release_workspaces() == 0


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_return_no_workspace(dtype):
    """Each training product's result survives the next call of the same product (its temporaries
    live in reused workspaces; what it returns must not): fp32 and bf16, csr_matmul in the fp32
    loop (8 tokens) and, in bf16 where the build has it, the AVX-512-BF16 kernel (40), sddmm,
    bsr_matmul and sddmm_blocks (b = 16)."""
    g = torch.Generator().manual_seed(3)
    n_out, n_in = 64, 96
    mask = torch.rand(n_out, n_in, generator=g) < 0.3
    rows, cols = (c.int() for c in mask.nonzero(as_tuple=True))
    order, crow, col = kernels.coords.csr_structure(rows, cols, n_out, n_in)
    values = torch.randn(rows.numel(), generator=g).to(dtype)
    brow = torch.tensor([0, 1, 3, 3], dtype=torch.int32)
    bcol = torch.tensor([0, 2, 1, 5], dtype=torch.int32)
    bcrow = torch.tensor([0, 1, 2, 2, 4], dtype=torch.int32)
    blocks = torch.randn(4, 16, 16, generator=g).to(dtype)
    products = {
        "csr_matmul": lambda T: cpu.csr_matmul(crow.int(), col.int(), values, n_out, n_in,
                                               torch.randn(T, n_in, generator=g).to(dtype).t()),
        "sddmm": lambda T: cpu.sddmm(torch.randn(T, n_out, generator=g).to(dtype),
                                     torch.randn(T, n_in, generator=g).to(dtype), rows, cols),
        "bsr_matmul": lambda T: cpu.bsr_matmul(bcrow, bcol, blocks, 4, 6, torch.randn(T, 96, generator=g).to(dtype)),
        "sddmm_blocks": lambda T: cpu.sddmm_blocks(torch.randn(T, 64, generator=g).to(dtype),
                                                   torch.randn(T, 96, generator=g).to(dtype), brow, bcol, 16),
    }
    for name, product in products.items():
        for T in (8, 40):
            first = product(T)
            kept = first.clone()
            second = product(T)
            assert torch.equal(first, kept), f"{name}, {T} tokens: the next call overwrote the result"
            assert not torch.equal(first, second), f"{name}, {T} tokens: two calls gave one result"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["fanin", "sparse"])
def test_functional_products_add_their_bias(op, dtype):
    """fanin_matmul / sparse_matmul with ``bias``: y = the product + bias in y's dtype (on CPU in
    place on the product), and the bias gradient dy's column sums (x [2, 9, 40], so the bias is
    added to the [18, 30] product before its reshape); without a gradient the same values."""
    g = torch.Generator().manual_seed(400)
    x = torch.randn(2, 9, 40, generator=g).to(dtype)
    bias = torch.randn(30, generator=g).to(dtype).requires_grad_()
    if op == "fanin":
        layer = kernels.FanInLinear(40, 30, k=6, generator=g).to(dtype)
        product = lambda b: kernels.fanin_matmul(x, layer.values, layer.indices, layer.rows, 30, b)  # noqa: E731
    else:
        layer = kernels.SparseLinear(40, 30, density=0.2, generator=g).to(dtype)
        product = lambda b: kernels.sparse_matmul(x, layer.values, layer.rows, layer.cols, 30, b)  # noqa: E731
    plain = product(None)
    y = product(bias)
    assert y.shape == (2, 9, 30) and y.dtype == dtype
    assert torch.equal(y.detach(), plain.detach() + bias.detach()), "y != the product + bias"
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    flat = dy.reshape(18, 30)
    assert_matches(bias.grad, flat.double().sum(0), flat.float().sum(0).to(dtype), f"{op} {dtype}: bias gradient")
    with torch.no_grad():
        assert torch.equal(product(bias), y.detach())
