"""bench/e2e.py, bench/cpu_infer.py and bench/cpu_train.py run their --quick variants on CPU
and write their tables; e2e reports the models as skipped, not crashed, when ``models`` cannot be imported;
e2e's native CPU training step gives the gradients of torch's path."""
import copy
import functools
import math
import subprocess
import sys

import pytest
import torch

import kernels
from bench import cpu_infer, cpu_train, e2e

from tests.kernels.test_cpu_native import LAYERS

from .conftest import ROOT, read_rows


TRAIN_LAYERS = ("fan-in wide", "fan-in tall", "fan-in ablated", "diag b=1 tall", "diag b=16 wide", "unstructured")


def _grads(layer, x, dy):
    """(y, dx, d values, d bias) of one forward and backward."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.values.grad, layer.bias.grad


def _assert_within_2x_torch(native, torch32, ref, what):
    """The fp32 native result vs the fp64 reference: at most 2x torch's fp32 error + 1e-5."""
    for name, a, b, r in zip(("y", "dx", "d values", "d bias"), native, torch32, ref):
        err = (a.double() - r).abs().max().item()
        bound = 2 * (b.double() - r).abs().max().item() + 1e-5 * max(1.0, r.abs().max().item())
        assert err <= bound, f"{what}: {name} max error {err:.3e} > {bound:.3e}"


@pytest.mark.skipif(kernels.cpu.lib() is None, reason="no native CPU library here")
@pytest.mark.parametrize("tokens", [1, 9, 40])
@pytest.mark.parametrize("name", TRAIN_LAYERS)
def test_native_training_step_gives_torchs_gradients(name, tokens, monkeypatch):
    calls = []  # the native products that answered (not those that returned None)

    def spy(*args, real, fn, **kw):
        out = real(*args, **kw)
        if out is not None:
            calls.append(fn)
        return out
    for fn in ("csr_matmul", "sddmm", "bsr_matmul", "sddmm_blocks"):
        monkeypatch.setattr(kernels.cpu, fn, functools.partial(spy, real=getattr(kernels.cpu, fn), fn=fn))
    g = torch.Generator().manual_seed(30)
    layer = LAYERS[name](g, True)
    layer_ref = copy.deepcopy(layer).double()
    for step in ("first step", "after a pattern change"):
        x = torch.randn(tokens, layer.in_features, generator=g)
        dy = torch.randn(tokens, layer.out_features, generator=g)
        with kernels.cpu.disabled():
            torch32 = _grads(layer, x, dy)
        calls.clear()
        native = _grads(layer, x, dy)
        if isinstance(layer, kernels.DiagLinear) and layer.block_size % 8 == 0:  # (block products, any T)
            assert sorted(calls) == ["bsr_matmul", "bsr_matmul", "sddmm_blocks"], \
                f"{name}: forward, input and weight gradient not all block products ({calls})"
        elif tokens > 4 or not isinstance(layer, kernels.DiagLinear):  # (DiagLinear gathers at T <= 4)
            assert sorted(calls) == ["csr_matmul", "csr_matmul", "sddmm"], \
                f"{name}: forward, input and weight gradient not all native ({calls})"
        ref = _grads(layer_ref, x.double(), dy.double())
        _assert_within_2x_torch(native, torch32, ref, f"{name}, T={tokens}, {step}")
        with torch.no_grad():  # a mask update: another pattern, the same layer object
            other = LAYERS[name](g, True)
            layer.load_state_dict(other.state_dict())
            layer_ref.load_state_dict({k: v.double() if v.is_floating_point() else v
                                       for k, v in other.state_dict().items()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick is the CPU pipeline check")
def test_e2e_quick_times_every_model_and_format_against_dense(tmp_path):
    proc = subprocess.run([sys.executable, "bench/e2e.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(tmp_path / "e2e.csv")
    assert {(r["model"], r["format"]) for r in rows} == {
        (m, f) for m in e2e.MODELS for f in ("dense", "fanin", "diag16", "diag16-fused", "diag1", "csr")}
    for model in ("bert-base", "gpt2-small"):   # trained with dropout, which the fused MLP lacks
        fused = next(r for r in rows if (r["model"], r["format"]) == (model, "diag16-fused"))
        assert fused["status"] == "skipped" and "dropout" in fused["reason"]
        rows.remove(fused)
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["train_ms"]) > 0 and float(r["infer_ms"]) > 0 and math.isfinite(float(r["loss"]))
        assert float(r["x_dense_train"]) > 0
    sparse = [r for r in rows if r["format"] != "dense" and r["model"] == "mlp"]
    dense = next(r for r in rows if r["format"] == "dense" and r["model"] == "mlp")
    assert all(float(r["param_mb"]) < float(dense["param_mb"]) for r in sparse)
    assert "ViT-B training step" in (tmp_path / "e2e.md").read_text()


def test_e2e_infer_only_times_inference_and_no_training_step(tmp_path):
    rc = e2e.main(["--quick", "--infer-only", "--models", "mlp", "--formats", "dense,fanin,diag16", "--out",
                   str(tmp_path)], log=lambda *a: None)
    assert rc == 0
    rows = read_rows(tmp_path / "e2e.csv")
    assert [r["format"] for r in rows] == ["dense", "fanin", "diag16"]
    for r in rows:
        assert r["status"] == "ok" and float(r["infer_ms"]) > 0 and float(r["x_dense_infer"]) > 0
        assert not math.isfinite(float(r["train_ms"] or "nan"))
    assert "Not measured here." in (tmp_path / "e2e.md").read_text()


def test_e2e_reports_models_as_skipped_when_they_cannot_be_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "models.vit", None)  # import models.vit -> ImportError
    rc = e2e.main(["--quick", "--models", "vit-b16,mlp", "--formats", "dense,fanin", "--out", str(tmp_path)],
                  log=lambda *a: None)
    assert rc == 0
    rows = {(r["model"], r["format"]): r for r in read_rows(tmp_path / "e2e.csv")}
    assert rows[("vit-b16", "dense")]["status"] == "skipped"
    assert "models unavailable" in rows[("vit-b16", "fanin")]["reason"]
    assert rows[("mlp", "fanin")]["status"] == "ok"


def test_e2e_refuses_to_time_a_fused_mlp_whose_output_is_wrong(tmp_path, monkeypatch):
    fused_mlp = kernels.fused_mlp
    monkeypatch.setattr(kernels, "fused_mlp", lambda fc1, fc2, x: 1.01 * fused_mlp(fc1, fc2, x))
    rc = e2e.main(["--quick", "--models", "mlp,vit-b16", "--formats", "dense,diag16-fused", "--out", str(tmp_path)],
                  log=lambda *a: None)
    assert rc == 1
    rows = {(r["model"], r["format"]): r for r in read_rows(tmp_path / "e2e.csv")}
    for model in ("mlp", "vit-b16"):
        assert rows[(model, "diag16-fused")]["status"] == "wrong" and not rows[(model, "diag16-fused")]["train_ms"]
        assert "vs the unfused reference" in rows[(model, "diag16-fused")]["reason"]
        assert rows[(model, "dense")]["status"] == "ok"


def test_cpu_inference_quick_checks_outputs_and_writes_ratios(tmp_path):
    assert cpu_infer.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *a: None) == 0
    rows = read_rows(tmp_path / "cpu_infer.csv")
    names = {r["variant"] for r in rows}
    assert {cpu_infer.DENSE, cpu_infer.CSR, "fan-in (condensed)", "diagonal b=1", "diagonal b=16",
            "fan-in (condensed) (torch path)", "diagonal b=16 (torch path)"} <= names
    for r in rows:
        assert float(r["us_per_call"]) > 0 and float(r["max_err"]) < 1e-4
    dense = next(r for r in rows if r["variant"] == cpu_infer.DENSE)
    assert float(dense["x_dense"]) == pytest.approx(1.0)
    md = (tmp_path / "cpu_infer.md").read_text()
    assert "x dense" in md
    assert "**native_cpu**: " + ("unavailable" if kernels.cpu.lib() is None else kernels.cpu.loaded_variant()) in md


def test_cpu_inference_refuses_a_variant_whose_output_is_wrong(tmp_path, monkeypatch):
    real = cpu_infer.build

    def broken(*args, **kwargs):
        variants = real(*args, **kwargs)
        mod, dense_eq, params = variants["fan-in (condensed)"]
        with torch.no_grad():
            mod.values[0, 0] += 1.0  # the layer no longer matches its dense equivalent
        return variants

    monkeypatch.setattr(cpu_infer, "build", broken)
    with pytest.raises(AssertionError, match="fan-in"):
        cpu_infer.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *a: None)


def test_cpu_inference_in_bf16_checks_outputs_at_bf16_tolerance_and_writes_both_anchors(tmp_path):
    assert cpu_infer.main(["--quick", "--threads", "1", "--precision", "bf16", "--batch", "3", "--out", str(tmp_path)],
                          log=lambda *a: None) == 0
    rows = {r["variant"]: r for r in read_rows(tmp_path / "cpu_infer_bf16.csv")}
    assert {cpu_infer.DENSE, cpu_infer.DENSE_BF16, "fan-in (condensed) bf16", "diagonal b=1 bf16",
            "diagonal b=16 bf16", "diagonal b=64 bf16", "SparseLinear bf16"} <= set(rows)
    assert float(rows[cpu_infer.DENSE_BF16]["x_dense"]) == pytest.approx(1.0)
    assert float(rows[cpu_infer.DENSE]["x_dense_fp32"]) == pytest.approx(1.0)
    assert "x dense fp32" in (tmp_path / "cpu_infer_bf16.md").read_text()


def test_cpu_inference_in_bf16_refuses_a_wrong_bf16_variant(tmp_path, monkeypatch):
    real = cpu_infer.build_bf16

    def broken(*args, **kwargs):
        variants = real(*args, **kwargs)
        with torch.no_grad():
            variants["diagonal b=16 bf16"][0].mod.values[0, 0, 0, 0] += 1.0
        return variants

    monkeypatch.setattr(cpu_infer, "build_bf16", broken)
    with pytest.raises(AssertionError, match="b=16 bf16"):
        cpu_infer.main(["--quick", "--threads", "1", "--precision", "bf16", "--out", str(tmp_path)], log=lambda *a: None)


@pytest.mark.skipif(kernels.cpu.lib() is None, reason="no native CPU library here")
@pytest.mark.parametrize("name", TRAIN_LAYERS)
def test_a_training_step_under_bf16_autocast_runs_the_native_bf16_products(name, monkeypatch):
    """Forward, input gradient and weight gradient of a step under CPU bf16 autocast answered by
    kernels.cpu on bf16 operands (tests/kernels/test_autocast.py checks the numbers)."""
    calls = []

    def spy(*args, real, fn, **kw):
        out = real(*args, **kw)
        if out is not None:  # (the dtype of the operand the product reads: values, x or dy)
            calls.append((fn, args[{"csr_matmul": 2, "bsr_matmul": 5}.get(fn, 0)].dtype))
        return out
    for fn in ("csr_matmul", "sddmm", "bsr_matmul", "sddmm_blocks"):
        monkeypatch.setattr(kernels.cpu, fn, functools.partial(spy, real=getattr(kernels.cpu, fn), fn=fn))
    g = torch.Generator().manual_seed(41)
    layer = LAYERS[name](g, True)
    x = torch.randn(9, layer.in_features, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    assert y.dtype == torch.bfloat16 and layer.values.grad.dtype == torch.float32
    bf = torch.bfloat16
    if isinstance(layer, kernels.DiagLinear) and layer.block_size % 8 == 0:
        assert sorted(calls) == [("bsr_matmul", bf), ("bsr_matmul", bf), ("sddmm_blocks", bf)], calls
    else:
        assert sorted(calls) == [("csr_matmul", bf), ("csr_matmul", bf), ("sddmm", bf)], calls


def test_e2e_under_bf16_autocast_times_every_format(tmp_path):
    rc = e2e.main(["--quick", "--models", "mlp", "--formats", "dense,fanin,diag16", "--autocast", "bf16", "--out",
                   str(tmp_path)], log=lambda *a: None)
    assert rc == 0
    rows = read_rows(tmp_path / "e2e.csv")
    assert [r["format"] for r in rows] == ["dense", "fanin", "diag16"]
    for r in rows:
        assert r["status"] == "ok" and r["dtype"] == "float32 + autocast bf16" and math.isfinite(float(r["loss"]))
    assert "under bf16 autocast" in (tmp_path / "e2e.md").read_text()


def test_cpu_training_products_quick_checks_weight_gradients_and_writes_both_anchors(tmp_path):
    assert cpu_train.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *a: None) == 0
    rows = {r["variant"]: r for r in read_rows(tmp_path / "cpu_train.csv")}
    for kind, dtype in (("step", "fp32"), ("step", "bf16"), ("dW", "fp32"), ("dW", "bf16")):
        names = [n for n in rows if n.startswith(kind + " ") and dtype in n]
        # step: dense, fan-in, diag b=16, diag b=16 on its elements, diag b=64, diag b=1; dW:
        # dense, the element SDDMM of fan-in and b=16, the block SDDMM of b=16 and b=64
        assert len(names) == (6 if kind == "step" else 5), (kind, dtype, names)
    assert float(rows["step dense nn.Linear fp32"]["x_dense_fp32"]) == pytest.approx(1.0)
    assert float(rows["dW dense bf16"]["x_dense_bf16"]) == pytest.approx(1.0)
    # (fan-in's coordinates are stored row by row: sddmm_rows; the quick run's 40 tokens take
    # b = 1's sorted coordinates too, and the b = 16 elements keep their diagonal order)
    want = ("sddmm_tiles_dpbf16" if "sddmm_dpbf16" in kernels.cpu.features() else "sddmm_rows")
    assert rows["dW SDDMM fan-in bf16"]["kernel"].startswith(want if kernels.cpu.lib() is not None else "torch")
    if kernels.cpu.lib() is not None:
        assert rows["step diag b=64 fp32"]["kernel"].startswith("layer step: bsr_matmul (fp32 register tiles); "
                                                                 "dW sddmm_blocks")
        assert rows["step diag b=16, elements fp32"]["kernel"].startswith("layer step; dW sddmm_tiles")
        assert rows["step diag b=1 fp32"]["kernel"].startswith("layer step; dW sddmm_rows")
        assert rows["dW blocks diag b=16 bf16"]["kernel"].startswith("sddmm_blocks")
        if "blocks_dpbf16" in kernels.cpu.features() and "amx" not in kernels.cpu.features():
            assert rows["step diag b=64 bf16 (autocast)"]["kernel"] == (
                "layer step: bsr_matmul: bsr16_mm_dpbf16 (AVX-512-BF16); dW sddmm_blocks_dpbf16 (AVX-512-BF16)")
    for r in rows.values():
        assert float(r["ms_per_call"]) > 0
    assert "x dense bf16" in (tmp_path / "cpu_train.md").read_text()


@pytest.mark.parametrize("variant", ["fan-in", "diag b=16"])
def test_cpu_training_products_refuse_a_wrong_weight_gradient(variant, tmp_path, monkeypatch):
    """A layer whose weight gradient is off at one stored element fails the check before timing."""
    layer_type = kernels.FanInLinear if variant == "fan-in" else kernels.DiagLinear
    real = cpu_train._Step.__init__

    def init(self, layer, *args):
        real(self, layer, *args)
        if type(layer) is layer_type and not getattr(layer, "_bumped", False):
            layer._bumped = True
            bump = torch.zeros_like(layer.values).reshape(-1).index_fill_(0, torch.tensor([0]), 1.0)
            layer.values.register_hook(lambda g: g + bump.reshape(g.shape))
    monkeypatch.setattr(cpu_train._Step, "__init__", init)
    with pytest.raises(AssertionError, match=f"step {variant} fp32"):
        cpu_train.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *a: None)


@pytest.mark.skipif(kernels.cpu.lib() is None, reason=f"no native CPU library here: {kernels.cpu.error()}")
def test_cpu_training_products_refuse_a_wrong_block_gradient(tmp_path, monkeypatch):
    """A block weight gradient off at one element fails the check before timing."""
    real = kernels.cpu.sddmm_blocks

    def off(*args):
        g = real(*args)
        g.view(-1)[0] += 1.0
        return g
    monkeypatch.setattr(kernels.cpu, "sddmm_blocks", off)
    monkeypatch.setattr(cpu_train, "_check_step", lambda *a: 0.0)  # (the layers' steps take it too)
    with pytest.raises(AssertionError, match="blocks b=16 fp32"):
        cpu_train.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *a: None)
