"""python -m train.eval: a finished run's checkpoint gives back its summary's test metrics, and
its condensed / dense exports compute the same model."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _run(*args):
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "vit"
    _run("train.vit", "--method", "dynadiag", "--preset", "micro", "--steps", "20", "--warmup", "2", "--delta-t", "5",
         "--batch-size", "32", "--eval-examples", "64", "--out-dir", str(out), "--no-progress", "--no-plots",
         "--threads", "1")
    return out


def test_eval_gives_the_summary_test_metrics_and_exports_the_same_model(vit_run, tmp_path):
    _run("train.eval", str(vit_run), "--export", str(tmp_path / "m.safetensors"), "--densify", str(tmp_path / "d.pt"),
         "--json", str(tmp_path / "eval.json"))
    got, summary = json.loads((tmp_path / "eval.json").read_text()), json.loads((vit_run / "summary.json").read_text())
    assert got["test"]["accuracy"] == summary["test"]["accuracy"]
    assert got["test"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)

    import kernels
    from models.vit import ViT, ViTConfig
    from train import vit
    from train.data import load_images
    blob = torch.load(tmp_path / "d.pt", weights_only=False)
    dense = ViT(ViTConfig(**blob["model_config"]))   # plain nn.Linear layers
    dense.load_state_dict(blob["model"])
    data = load_images("mnist")
    _, acc = vit.evaluate(dense, data.test_x, data.test_y, 512, torch.device("cpu"), contextlib.nullcontext)
    assert acc == pytest.approx(summary["test"]["accuracy"], abs=2e-4)   # dense rounding: at most 2 of 10,000
    layers, header = kernels.load_layers(tmp_path / "m.safetensors")
    assert set(layers) == set(summary["density"]["nnz"]) and header["extra"]["method"] == "dynadiag"
    assert {n: m.nnz() for n, m in layers.items()} == summary["density"]["nnz"]


def test_bert_eval_gives_the_summary_test_metrics(tmp_path):
    from pydoc_data.topics import topics
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    out = tmp_path / "bert"
    _run("train.bert", "--dataset", str(corpus), "--preset", "micro", "--vocab-size", "256", "--seq-len", "32",
         "--steps", "4", "--warmup", "1", "--batch-size", "8", "--method", "srigl", "--delta-t", "2",
         "--out-dir", str(out), "--no-progress", "--no-plots", "--threads", "1")
    _run("train.eval", str(out), "--json", str(tmp_path / "eval.json"))
    got, summary = json.loads((tmp_path / "eval.json").read_text()), json.loads((out / "summary.json").read_text())
    assert got["test"]["mlm_accuracy"] == summary["test"]["mlm_accuracy"]
    assert got["test"]["mlm_loss"] == pytest.approx(summary["test"]["mlm_loss"], rel=1e-6)


def test_a_folder_without_a_finished_run_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.eval", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "is not a finished run" in done.stderr
