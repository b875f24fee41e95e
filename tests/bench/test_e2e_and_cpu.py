"""bench/e2e.py and bench/cpu_infer.py run their --quick variants on CPU and write their
tables; e2e reports the models as skipped, not crashed, when ``models`` cannot be imported."""
import math
import subprocess
import sys

import pytest
import torch

import kernels
from bench import cpu_infer, e2e

from .conftest import ROOT, read_rows



@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick is the CPU pipeline check")
def test_e2e_quick_times_every_model_and_format_against_dense(tmp_path):
    proc = subprocess.run([sys.executable, "bench/e2e.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_rows(tmp_path / "e2e.csv")
    assert {(r["model"], r["format"]) for r in rows} == {
        (m, f) for m in e2e.MODELS for f in ("dense", "fanin", "diag16", "diag16-fused", "diag1", "csr")}
    bert_fused = next(r for r in rows if (r["model"], r["format"]) == ("bert-base", "diag16-fused"))
    assert bert_fused["status"] == "skipped" and "dropout" in bert_fused["reason"]
    rows.remove(bert_fused)
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
    assert "**native_cpu**: " + ("unavailable" if kernels.cpu.lib() is None else kernels.cpu.variant()[0]) in md


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
