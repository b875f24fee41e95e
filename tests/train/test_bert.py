"""train/bert.py end to end on a small local text: masked-LM loss goes down, files written,
exact density."""
import json

import pytest

from train import bert


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    return path


@pytest.mark.parametrize("method", ["dense", "srigl", "dynadiag"])
def test_bert_trains_on_a_local_text_file(method, corpus, tmp_path):
    out = tmp_path / method
    args = ["--dataset", str(corpus), "--preset", "micro", "--vocab-size", "512", "--seq-len", "32",
            "--steps", "40", "--warmup", "5", "--lr", "3e-3", "--batch-size", "16", "--log-every", "5",
            "--eval-every", "20", "--delta-t", "10", "--method", method, "--sparsity", "0.8",
            "--out-dir", str(out), "--no-progress"]
    assert bert.main(args) == 0
    for name in ("metrics.jsonl", "summary.json", "curves.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    train_rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train"' in line]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3, [r["loss"] for r in train_rows]
    s = json.loads((out / "summary.json").read_text())
    assert 0 < s["test"]["mlm_loss"] < train_rows[0]["loss"] and 0 <= s["test"]["mlm_accuracy"] <= 1
    if method == "dynadiag":
        assert s["density"]["nnz"] == s["density"]["budget"]


def test_bert_trains_with_fused_mlps_and_dropout_off(corpus, tmp_path):
    out = tmp_path / "fused"
    args = ["--dataset", str(corpus), "--preset", "micro", "--vocab-size", "512", "--seq-len", "32",
            "--steps", "40", "--warmup", "5", "--lr", "3e-3", "--batch-size", "16", "--log-every", "5",
            "--eval-every", "20", "--delta-t", "10", "--method", "dynadiag", "--block-size", "16",
            "--dropout", "0", "--fused-mlp", "--sparsity", "0.8", "--out-dir", str(out), "--no-progress", "--no-plots"]
    assert bert.main(args) == 0
    train_rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train"' in line]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3, [r["loss"] for r in train_rows]
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["fused_mlp"] is True and s["model"]["fused_mlp"] is True and s["model"]["dropout"] == 0
