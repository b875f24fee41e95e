"""train/vit.py end to end on small MNIST: every method trains (loss down, files written,
exact density), and resume / signals / NaN behave."""
import json
import math
import os
import signal

import pytest
import torch

from train import vit

FAST = ["--preset", "micro", "--steps", "40", "--warmup", "5", "--lr", "3e-3", "--batch-size", "64",
        "--log-every", "5", "--eval-every", "20", "--ckpt-every", "20", "--delta-t", "10", "--no-progress"]


def rows(path, split="train"):
    return [json.loads(line) for line in open(path) if json.loads(line)["split"] == split]


@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl", "srigl", "dynadiag", "gse"])
def test_each_method_trains_writes_its_files_and_keeps_the_exact_density(method, tmp_path, tiny_mnist):
    out = tmp_path / method
    assert vit.main(FAST + ["--method", method, "--sparsity", "0.8", "--out-dir", str(out)]) == 0
    for name in ("metrics.jsonl", "summary.json", "curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "masks.png").exists() == (method != "dense")
    train_rows = rows(out / "metrics.jsonl")
    assert len(train_rows) == 8
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.1, [r["loss"] for r in train_rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["config"]["dst"]["method"] == method
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and summary["step_time_ms"]["median"] > 0
    density = summary["density"]
    assert set(density["layers"]) == {f"blocks.0.{n}" for n in ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")}
    if method == "dense":
        assert density["overall"] == 1.0
        return
    assert summary["mask_updates"] > 0 or method == "static"
    for name, nnz in density["nnz"].items():
        budget = density["budget"][name]
        if method == "srigl":   # k = floor(budget / active neurons): loses less than one weight per neuron
            out_features = 96 if name.endswith("qkv") else 64 if name.endswith("fc1") else 32
            assert budget - out_features < nnz <= budget
        else:
            assert nnz == budget, (name, nnz, budget)
    assert abs(density["overall"] - 0.2) < 0.03


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_resume_after_a_signal_continues_exactly(signum, tmp_path, tiny_mnist, monkeypatch, capsys):
    args = FAST + ["--method", "rigl", "--steps", "30", "--ckpt-every", "0"]
    assert vit.main(args + ["--out-dir", str(tmp_path / "whole")]) == 0
    batch = type(tiny_mnist).batch

    def batch_then_sigterm(self, step, batch_size, seed):
        if step == 17:
            os.kill(os.getpid(), signum)
        return batch(self, step, batch_size, seed)

    monkeypatch.setattr(type(tiny_mnist), "batch", batch_then_sigterm)
    cut = tmp_path / "cut"
    assert vit.main(args + ["--out-dir", str(cut)]) == 128 + signum
    assert f"stopped by signal {int(signum)} at step 18" in capsys.readouterr().err
    assert not (cut / "summary.json").exists()
    monkeypatch.setattr(type(tiny_mnist), "batch", batch)
    assert vit.main(args + ["--out-dir", str(cut), "--resume"]) == 0
    assert rows(cut / "metrics.jsonl") == rows(tmp_path / "whole" / "metrics.jsonl")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(cut / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_mnist,
                                                                                monkeypatch, capsys):
    batch = type(tiny_mnist).batch

    def poisoned(self, step, batch_size, seed):
        x, y = batch(self, step, batch_size, seed)
        return (x * math.nan if step == 23 else x), y

    monkeypatch.setattr(type(tiny_mnist), "batch", poisoned)
    out = tmp_path / "nan"
    assert vit.main(FAST + ["--method", "set", "--out-dir", str(out)]) == 1
    assert "loss is nan at step 23" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 20
    assert not (out / "summary.json").exists()


def test_dynadiag_block_size_must_divide_the_width(tmp_path, tiny_mnist, capsys):
    out = tmp_path / "x"
    assert vit.main(FAST + ["--method", "dynadiag", "--block-size", "5", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--block-size 5 must divide" in err
    assert not out.exists()


def test_sgd_trains_too(tmp_path, tiny_mnist):
    out = tmp_path / "sgd"
    assert vit.main(FAST + ["--method", "static", "--sparsity", "0.5", "--optimizer", "sgd", "--lr", "0.05",
                            "--no-plots", "--out-dir", str(out)]) == 0
    train_rows = rows(out / "metrics.jsonl")
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.1
    assert json.loads((out / "summary.json").read_text())["config"]["optimizer"] == "sgd"


@pytest.mark.parametrize("method", ["rigl", "dynadiag"])
def test_bf16_autocast_trains_on_cpu(method, tmp_path, tiny_mnist):
    """--precision bf16 runs the sparse ops under autocast (bf16 products, fp32 parameters)."""
    out = tmp_path / method
    assert vit.main(FAST + ["--method", method, "--sparsity", "0.8", "--precision", "bf16",
                            "--out-dir", str(out)]) == 0
    train_rows = rows(out / "metrics.jsonl")
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.1, [r["loss"] for r in train_rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["precision"] == "bf16" and summary["mask_updates"] > 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    floats = [t for t in state["model"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)


def test_fused_mlp_trains_like_the_unfused_mlp_and_is_recorded(tmp_path, tiny_mnist, monkeypatch):
    import kernels
    calls = []
    fused_mlp = kernels.fused_mlp
    monkeypatch.setattr(kernels, "fused_mlp", lambda *a: calls.append(1) or fused_mlp(*a))
    args = FAST + ["--method", "dynadiag", "--block-size", "16", "--sparsity", "0.8", "--no-plots"]
    assert vit.main(args + ["--out-dir", str(tmp_path / "unfused")]) == 0
    assert calls == []
    out = tmp_path / "fused"
    assert vit.main(args + ["--fused-mlp", "--out-dir", str(out)]) == 0
    assert len(calls) >= 40   # every training step (one block), then the evaluations
    train_rows = rows(out / "metrics.jsonl")
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.1, [r["loss"] for r in train_rows]
    unfused = [r["loss"] for r in rows(tmp_path / "unfused" / "metrics.jsonl")]
    assert [r["loss"] for r in train_rows] == pytest.approx(unfused, rel=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["fused_mlp"] is True and summary["model"]["fused_mlp"] is True
    assert summary["mask_updates"] > 0 and summary["density"]["nnz"] == summary["density"]["budget"]


def test_a_run_resumes_with_fused_mlp_switched_on(tmp_path, tiny_mnist):
    """--fused-mlp changes no state (same function, same parameters): a resume may switch it."""
    args = FAST + ["--method", "dynadiag", "--block-size", "16", "--steps", "10", "--ckpt-every", "5",
                   "--no-plots", "--out-dir", str(tmp_path)]
    assert vit.main(args) == 0
    (tmp_path / "summary.json").unlink()   # stopped after its last checkpoint, before the summary
    assert vit.main(args + ["--resume", "--fused-mlp"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["fused_mlp"] is True
