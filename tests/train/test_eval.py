"""python -m train.eval: a finished run's checkpoint gives back its summary's test metrics, and
its condensed / dense exports compute the same model."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _run(*args, cache=None):
    env = ENV if cache is None else {**ENV, "DST_DATA_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """(corpus, run folder, its cache folder) of a short BERT run, trained in a process of its own."""
    from pydoc_data.topics import topics
    root = tmp_path_factory.mktemp("bert")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    _run("train.bert", "--dataset", str(corpus), "--preset", "micro", "--vocab-size", "256", "--seq-len", "32",
         "--steps", "4", "--warmup", "1", "--batch-size", "8", "--method", "srigl", "--delta-t", "2",
         "--out-dir", str(root / "bert"), "--no-progress", "--no-plots", "--threads", "1", cache=root / "cache")
    return corpus, root / "bert", root / "cache"


def _bert_run(bert_run, tmp_path):
    """A copy of ``bert_run``'s run folder and cache in ``tmp_path``, for a test to change."""
    corpus, out, cache = bert_run
    shutil.copytree(out, tmp_path / "bert")
    shutil.copytree(cache, tmp_path / "cache")
    return corpus, tmp_path / "bert", tmp_path / "cache"


def test_bert_eval_in_another_process_gives_the_summary_test_metrics_whatever_the_cache_holds(bert_run, tmp_path):
    from tests.train.test_resume import scramble_tokenizers
    _, out, cache = _bert_run(bert_run, tmp_path)
    assert scramble_tokenizers(cache) == 1   # another machine's (or process's) training of the same text
    summary = json.loads((out / "summary.json").read_text())
    for state in ("scrambled", "deleted"):
        if state == "deleted":
            for path in cache.glob("*.json"):
                path.unlink()
        _run("train.eval", str(out), "--json", str(tmp_path / "eval.json"), "--export", str(tmp_path / "m.safetensors"),
             "--densify", str(tmp_path / "d.pt"), cache=cache)
        got = json.loads((tmp_path / "eval.json").read_text())
        assert got["test"]["mlm_accuracy"] == summary["test"]["mlm_accuracy"], state
        assert got["test"]["mlm_loss"] == pytest.approx(summary["test"]["mlm_loss"], rel=1e-6), state
    # Both exports carry the run's tokenizer: the ids mean nothing without it.
    from tokenizers import Tokenizer

    import kernels
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()
    _, header = kernels.load_layers(tmp_path / "m.safetensors")
    assert Tokenizer.from_str(header["extra"]["tokenizer"]).get_vocab() == vocab
    assert Tokenizer.from_str(torch.load(tmp_path / "d.pt", weights_only=False)["tokenizer"]).get_vocab() == vocab


def test_an_old_bert_run_folder_evaluates_with_the_cached_tokenizer_and_a_warning(bert_run, tmp_path, monkeypatch,
                                                                                  capsys):
    from train.data import legacy_cache_path, text_docs
    corpus, out, cache = _bert_run(bert_run, tmp_path)
    for path in cache.glob("*.json"):
        path.unlink()
    # What the trainers before tokenizer.json left: the run's tokenizer only in the cache, under its old name.
    old = cache / legacy_cache_path(text_docs(str(corpus)), 256, str(corpus)).name
    (out / "tokenizer.json").rename(old)
    import train.data
    from train import eval as train_eval
    monkeypatch.setattr(train.data, "CACHE", cache)
    assert train_eval.main([str(out), "--json", str(tmp_path / "eval.json")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out} has no tokenizer.json" in err and str(old) in err, err
    assert "kept as" not in err and not (out / "tokenizer.json").exists()   # train.eval writes no run file
    got, summary = json.loads((tmp_path / "eval.json").read_text()), json.loads((out / "summary.json").read_text())
    assert got["test"]["mlm_accuracy"] == summary["test"]["mlm_accuracy"]


@pytest.mark.parametrize("damage, message", [
    ("missing", "is missing, and so is the cached tokenizer"),
    ("truncated", "cannot read tokenizer"),
    ("no specials", "lacks the special tokens [PAD]"),
    ("other vocabulary", "tokens, the model"),
])
def test_a_bert_run_with_a_bad_tokenizer_json_exits_2_naming_the_file(damage, message, bert_run, tmp_path,
                                                                       monkeypatch, capsys):
    _, out, cache = _bert_run(bert_run, tmp_path)
    for path in cache.glob("*.json"):
        path.unlink()
    tok = out / "tokenizer.json"
    blob = json.loads(tok.read_text())
    if damage == "missing":
        tok.unlink()
    elif damage == "truncated":
        tok.write_text(tok.read_text()[:1000])
    elif damage == "no specials":
        blob["added_tokens"] = []
        blob["model"]["vocab"] = {("[pad]" if t == "[PAD]" else t): i for t, i in blob["model"]["vocab"].items()}
        tok.write_text(json.dumps(blob))
    else:
        blob["model"]["vocab"] = {t: i for t, i in blob["model"]["vocab"].items() if i < 200}
        tok.write_text(json.dumps(blob))
    import train.data
    from train import eval as train_eval
    monkeypatch.setattr(train.data, "CACHE", cache)
    assert train_eval.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tok) in err and err.count("\n") == 1, err


def test_a_folder_without_a_finished_run_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.eval", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "is not a finished run" in done.stderr


def test_eval_of_a_vit_run_whose_images_changed_exits_2_naming_the_dataset_and_its_data_json(vit_run, tmp_path,
                                                                                            capsys):
    from train import eval as train_eval
    out = tmp_path / "vit"
    shutil.copytree(vit_run, out)
    saved = json.loads((out / "data.json").read_text())
    assert (saved["dataset"], saved["train"], saved["test"], saved["classes"]) == ("mnist", 50000, 10000, 10)
    (out / "data.json").write_text(json.dumps({**saved, "sha1": "0" * 40}))   # what another copy of MNIST would give
    assert train_eval.main([str(out), "--no-eval", "--export", str(tmp_path / "m.safetensors")]) == 0   # no data read
    capsys.readouterr()
    assert train_eval.main([str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'mnist' is not the data the run in" in err and "0" * 12 in err, err
    assert saved["sha1"][:12] in err and str(out / "data.json") in err and "--accept-data-change to evaluate" in err
    assert train_eval.main([str(out), "--accept-data-change", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["test"]["accuracy"] == \
        json.loads((out / "summary.json").read_text())["test"]["accuracy"]


def test_eval_of_a_gpt_run_whose_text_changed_exits_2_unless_accepted(tmp_path, capsys):
    from pydoc_data.topics import topics

    from train import eval as train_eval
    from train import gpt
    from train.data import corpus_fingerprint, text_docs
    text = tmp_path / "corpus.txt"
    original = "\n\n".join(topics[k] for k in sorted(topics)[:30])
    text.write_text(original)
    out = tmp_path / "gpt"
    assert gpt.main(["--dataset", str(text), "--preset", "micro", "--vocab-size", "256", "--seq-len", "32", "--steps",
                     "4", "--warmup", "1", "--batch-size", "8", "--method", "srigl", "--delta-t", "2", "--out-dir",
                     str(out), "--no-progress", "--no-plots", "--threads", "1"]) == 0
    trained = json.loads((out / "data.json").read_text())
    text.write_text(original[:len(original) // 2])   # another version of the text under the same name
    now = corpus_fingerprint(str(text), text_docs(str(text)))
    capsys.readouterr()
    for extra in ([], ["--no-eval", "--samples", "1"]):   # the test split, and the prompts of the samples
        assert train_eval.main([str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"dataset {str(text)!r} is not the data the run in {out}" in err, err
        assert trained["sha1"][:12] in err and now["sha1"][:12] in err and f"chars {now['chars']}" in err, err
    assert train_eval.main([str(out), "--samples", "0", "--accept-data-change"]) == 0
    assert capsys.readouterr().err.count("going on with the new data") == 1
    assert json.loads((out / "data.json").read_text()) == trained   # train.eval writes no run file
    text.write_text(original)
    (out / "data.json").unlink()   # a run folder from before data.json
    assert train_eval.main([str(out), "--samples", "0", "--json", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"warning: {out} has no data.json" in err and "kept as" not in err, err
    assert not (out / "data.json").exists()
    got, want = json.loads((tmp_path / "e.json").read_text())["test"], json.loads((out / "summary.json").read_text())["test"]
    assert got == pytest.approx(want, rel=1e-6)
