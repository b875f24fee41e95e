"""train/gpt.py end to end on a small local text: next-token loss goes down, files written,
perplexity = exp(loss), exact density; bad input exits 2; a killed run resumes exactly;
train.eval gives the summary's test metrics back and samples text."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import gpt

from .runs import sigterm_after_step, train_rows

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    return path


def small(corpus, out, *extra):
    return ["--dataset", str(corpus), "--preset", "micro", "--vocab-size", "512", "--seq-len", "32",
            "--steps", "40", "--warmup", "5", "--lr", "3e-3", "--batch-size", "16", "--log-every", "5",
            "--eval-every", "20", "--delta-t", "10", "--sparsity", "0.8", "--out-dir", str(out), "--no-progress",
            "--threads", "1", *extra]


@pytest.mark.parametrize("method", ["dense", "srigl", "dynadiag", "rigl"])
def test_gpt_trains_on_a_local_text_file(method, corpus, tmp_path):
    out = tmp_path / method
    assert gpt.main(small(corpus, out, "--method", method)) == 0
    for name in ("metrics.jsonl", "summary.json", "curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    rows = train_rows(out / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    s = json.loads((out / "summary.json").read_text())
    assert s["entry"] == "gpt" and s["model"]["max_len"] >= 32 and s["model"]["vocab_size"] <= 512
    assert 0 < s["test"]["lm_loss"] < rows[0]["loss"] and 0 <= s["test"]["accuracy"] <= 1
    assert s["test"]["perplexity"] == pytest.approx(math.exp(s["test"]["lm_loss"]))
    assert len(s["density"]["target"]) == 4   # qkv, out, fc1, fc2 of the one block
    if method == "dense":
        assert s["density"]["overall"] == 1.0
    elif method == "rigl":
        assert s["density"]["nnz"] == s["density"]["budget"]
        assert abs(s["density"]["overall"] - 0.2) < 0.01


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "4"], "--seq-len must be >= 8"),
    (["--vocab-size", "3"], "--vocab-size must be >= 31"),
    (["--dropout", "1"], "--dropout must lie in [0, 1)"),
    (["--preset", "xl"], "unknown GPT preset 'xl'"),
    (["--dataset", "/no/such/corpus.txt"], "does not exist"),
    (["--method", "srigl", "--dropout", "0", "--fused-mlp"], "--fused-mlp needs --method dynadiag"),
])
def test_gpt_bad_input_exits_2_with_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert gpt.main(["--preset", "micro", "--steps", "2", "--out-dir", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_killed_gpt_run_resumes_to_the_same_run(corpus, tmp_path):
    args = small(corpus, tmp_path / "cut", "--method", "rigl", "--steps", "60", "--ckpt-every", "0", "--no-plots")
    proc = subprocess.Popen([sys.executable, "-m", "train.gpt", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    sigterm_after_step(proc, metrics, 14, 180)
    stopped_at = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"]
    assert 15 <= stopped_at < 60
    # Every session in a process of its own (the resumed one reads the run folder's tokenizer.json).
    whole = small(corpus, tmp_path / "whole", "--method", "rigl", "--steps", "60", "--ckpt-every", "0", "--no-plots")
    for cmd in (args + ["--resume"], whole):
        done = subprocess.run([sys.executable, "-m", "train.gpt", *cmd], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert train_rows(metrics) == train_rows(tmp_path / "whole" / "metrics.jsonl")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_of_a_gpt_run_gives_its_test_metrics_samples_text_and_exports(corpus, tmp_path):
    out = tmp_path / "run"   # trained in a process of its own; train.eval reads its tokenizer.json
    done = subprocess.run([sys.executable, "-m", "train.gpt", *small(corpus, out, "--method", "srigl", "--steps", "6",
                                                                      "--no-plots")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = [sys.executable, "-m", "train.eval", str(out), "--json", str(tmp_path / "e.json"), "--samples", "2",
           "--sample-tokens", "12", "--densify", str(tmp_path / "d.pt")]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got, summary = json.loads((tmp_path / "e.json").read_text()), json.loads((out / "summary.json").read_text())
    assert got["entry"] == "gpt" and got["test"]["accuracy"] == summary["test"]["accuracy"]
    assert got["test"]["perplexity"] == pytest.approx(summary["test"]["perplexity"], rel=1e-6)
    assert len(got["samples"]) == 2 and all(s["continuation"].strip() for s in got["samples"])
    assert done.stdout.count("sample ") == 2
    again = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert json.loads((tmp_path / "e.json").read_text())["samples"] == got["samples"], "seeded by the run's seed"
    assert again.returncode == 0
    from models.gpt import GPT, GPTConfig
    blob = torch.load(tmp_path / "d.pt", weights_only=False)
    dense = GPT(GPTConfig(**blob["model_config"]))   # plain nn.Linear layers
    dense.load_state_dict(blob["model"])
    bad = subprocess.run([sys.executable, "-m", "train.eval", str(out), "--top-k", "-1"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--top-k must be >= 0" in bad.stderr
