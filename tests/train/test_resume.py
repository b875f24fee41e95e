"""A real training process killed mid-run (SIGTERM) saves a checkpoint, exits 143, and a
--resume run reproduces the uninterrupted run's losses, masks and values exactly (CPU); a
BERT / GPT run resumes with the tokenizer in its folder, whatever data_cache/ holds."""
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.data
from train import vit
from train.data import TextData

from .runs import sigterm_after_step, train_rows

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--method", "rigl", "--preset", "micro", "--steps", "60", "--warmup", "5", "--batch-size", "64",
        "--log-every", "5", "--eval-every", "20", "--eval-examples", "500", "--ckpt-every", "0",
        "--delta-t", "10", "--threads", "1", "--no-progress", "--no-plots"]


def test_a_killed_process_resumes_to_the_same_run(tmp_path):
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "train.vit", *ARGS, "--out-dir", str(cut)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = sigterm_after_step(proc, cut / "metrics.jsonl", 14, 120)
    stopped_at = torch.load(cut / "checkpoint.pt", weights_only=False)["step"]
    assert 15 <= stopped_at < 60 and f"at step {stopped_at}" in err
    assert vit.main(ARGS + ["--out-dir", str(cut), "--resume"]) == 0
    assert vit.main(ARGS + ["--out-dir", str(tmp_path / "whole")]) == 0
    assert train_rows(cut / "metrics.jsonl") == train_rows(tmp_path / "whole" / "metrics.jsonl")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])   # values, rows, cols
    assert a["history"]["mask_updates"] == b["history"]["mask_updates"] == 4   # steps 10, 20, 30, 40 (t_end 0.75)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["step_time_ms"]["steps_timed"]
    assert json.loads((cut / "summary.json").read_text())["step_time_ms"]["steps_timed"] == whole == 55   # both sessions


def test_resuming_a_finished_run_leaves_its_files_alone(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.vit", *ARGS, "--steps", "8", "--out-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert json.loads(before["summary.json"])["step_time_ms"]["median"] > 0
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already finished its 8 steps" in done.stdout, done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


TEXT = ["--preset", "micro", "--vocab-size", "256", "--seq-len", "32", "--steps", "16", "--warmup", "2",
        "--batch-size", "8", "--log-every", "2", "--eval-every", "8", "--method", "rigl", "--delta-t", "4",
        "--ckpt-every", "0", "--threads", "1", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    return path


def scramble_tokenizers(folder: Path) -> int:
    """Renumber every cached tokenizer in ``folder`` (the specials kept): what a training in
    another process, or on another machine, may give for the same text. Returns how many."""
    files = sorted(folder.glob("*.json"))
    for path in files:
        blob = json.loads(path.read_text())
        vocab = blob["model"]["vocab"]
        last = max(vocab.values())
        blob["model"]["vocab"] = {t: i if i < 5 else last + 5 - i for t, i in vocab.items()}
        path.write_text(json.dumps(blob))
    return len(files)


def cut_at_step_9(trainer, args, monkeypatch, data=TextData):
    """Run ``trainer`` (its batches from ``data``'s class) with a SIGTERM at step 9: it
    checkpoints step 10 and exits 143."""
    batch = data.batch

    def batch_then_sigterm(self, step, batch_size, seed):
        if step == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, step, batch_size, seed)

    monkeypatch.setattr(data, "batch", batch_then_sigterm)
    assert trainer.main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(data, "batch", batch)


@pytest.mark.parametrize("entry", ["bert", "gpt"])
def test_a_text_run_resumes_and_evaluates_with_its_own_tokenizer_whatever_the_cache_holds(entry, corpus, tmp_path,
                                                                                          monkeypatch, capsys):
    monkeypatch.setattr(train.data, "CACHE", tmp_path / "cache")
    trainer = importlib.import_module(f"train.{entry}")
    args = TEXT + ["--dataset", str(corpus)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert trainer.main(args + ["--out-dir", str(whole)]) == 0
    cut_at_step_9(trainer, args + ["--out-dir", str(cut)], monkeypatch)
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["step"] == 10
    assert (cut / "tokenizer.json").read_text() == (whole / "tokenizer.json").read_text()   # kept from the start
    assert scramble_tokenizers(tmp_path / "cache") == 1
    assert trainer.main(args + ["--out-dir", str(cut), "--resume"]) == 0
    assert train_rows(cut / "metrics.jsonl") == train_rows(whole / "metrics.jsonl")
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(cut / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from train import eval as train_eval
    for cache in ("scrambled", "deleted"):
        if cache == "deleted":
            for path in (tmp_path / "cache").glob("*.json"):
                path.unlink()
        assert train_eval.main([str(cut), "--samples", "0", "--json", str(tmp_path / "e.json")]) == 0, cache
        got = json.loads((tmp_path / "e.json").read_text())["test"]
        want = json.loads((whole / "summary.json").read_text())["test"]
        assert got == pytest.approx({k: want[k] for k in got}, rel=1e-6), cache
    assert "warning" not in capsys.readouterr().err


def test_an_old_run_folder_without_tokenizer_json_resumes_from_the_cache_with_a_warning(corpus, tmp_path, monkeypatch,
                                                                                        capsys):
    from train import bert
    from train.data import legacy_cache_path, text_docs
    monkeypatch.setattr(train.data, "CACHE", tmp_path / "cache")
    args = TEXT + ["--dataset", str(corpus)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert bert.main(args + ["--out-dir", str(whole)]) == 0
    cut_at_step_9(bert, args + ["--out-dir", str(cut)], monkeypatch)
    # What the trainers before tokenizer.json left: the run folder without it, the tokenizer in the cache only.
    old = legacy_cache_path(text_docs(str(corpus)), 256, str(corpus))
    (cut / "tokenizer.json").rename(old)
    capsys.readouterr()
    assert bert.main(args + ["--out-dir", str(cut), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {cut} has no tokenizer.json" in err and str(old) in err and "kept as" in err, err
    assert (cut / "tokenizer.json").read_text() == (whole / "tokenizer.json").read_text()
    assert train_rows(cut / "metrics.jsonl") == train_rows(whole / "metrics.jsonl")


def test_resuming_a_text_run_with_neither_its_tokenizer_nor_the_cache_exits_2_naming_both(corpus, tmp_path,
                                                                                         monkeypatch, capsys):
    from train import gpt
    monkeypatch.setattr(train.data, "CACHE", tmp_path / "cache")
    args = TEXT + ["--dataset", str(corpus), "--out-dir", str(tmp_path / "cut")]
    cut_at_step_9(gpt, args, monkeypatch)
    (tmp_path / "cut" / "tokenizer.json").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()}
    capsys.readouterr()
    assert gpt.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'cut' / 'tokenizer.json'} is missing" in err, err
    assert str(tmp_path / "cache" / "wordpiece-") in err and "cannot be rebuilt" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir()} == before   # nothing written, no re-training


def test_resuming_a_text_run_on_changed_text_exits_2_naming_the_corpus_and_both_fingerprints(corpus, tmp_path,
                                                                                             monkeypatch, capsys):
    from train import gpt
    from train.data import corpus_fingerprint, text_docs
    text = tmp_path / "corpus.txt"
    text.write_text(corpus.read_text())
    out = tmp_path / "cut"
    args = TEXT + ["--dataset", str(text), "--out-dir", str(out)]
    cut_at_step_9(gpt, args, monkeypatch)
    trained = json.loads((out / "data.json").read_text())
    assert trained == corpus_fingerprint(str(text), text_docs(str(text)))
    text.write_text(corpus.read_text().replace("the", "a"))   # the .txt edited between the sessions
    edited = corpus_fingerprint(str(text), text_docs(str(text)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert gpt.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dataset {str(text)!r} is not the data the run in {out} trained on" in err, err
    assert trained["sha1"][:12] in err and edited["sha1"][:12] in err and str(out / "data.json") in err, err
    assert "--accept-data-change" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # nothing written
    assert gpt.main(args + ["--resume", "--accept-data-change"]) == 0
    assert "going on with the new data (--accept-data-change)" in capsys.readouterr().err
    assert json.loads((out / "data.json").read_text()) == {**edited, "previous": [trained]}


def test_an_old_run_folder_without_data_json_resumes_with_one_warning_and_keeps_it(corpus, tmp_path, monkeypatch,
                                                                                   capsys):
    from train import bert
    args = TEXT + ["--dataset", str(corpus)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert bert.main(args + ["--out-dir", str(whole)]) == 0
    cut_at_step_9(bert, args + ["--out-dir", str(cut)], monkeypatch)
    (cut / "data.json").unlink()   # what the trainers before data.json left
    capsys.readouterr()
    assert bert.main(args + ["--out-dir", str(cut), "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"warning: {cut} has no data.json" in err and "kept as" in err, err
    assert (cut / "data.json").read_text() == (whole / "data.json").read_text()
    assert train_rows(cut / "metrics.jsonl") == train_rows(whole / "metrics.jsonl")


def test_resuming_a_vit_run_on_other_images_exits_2_naming_the_dataset(tiny_mnist, tmp_path, monkeypatch, capsys):
    from train.data import ImageData
    out = tmp_path / "cut"
    args = ARGS + ["--steps", "16", "--delta-t", "4", "--out-dir", str(out)]
    cut_at_step_9(vit, args, monkeypatch, ImageData)
    trained = json.loads((out / "data.json").read_text())
    assert (trained["train"], trained["test"], trained["shape"]) == (2048, 256, [1, 28, 28])
    relabelled = ImageData(tiny_mnist.name, tiny_mnist.train_x, tiny_mnist.train_y, tiny_mnist.val_x,
                           tiny_mnist.val_y, tiny_mnist.test_x, torch.roll(tiny_mnist.test_y, 1), 10)
    monkeypatch.setattr("train.vit.load_images", lambda spec, data_dir="", seed=0, **kw: relabelled)
    capsys.readouterr()
    assert vit.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset 'mnist-2k' is not the data" in err and trained["sha1"][:12] in err, err
    assert relabelled.fingerprint()["sha1"][:12] in err and str(out / "data.json") in err, err
    assert vit.main(args + ["--resume", "--accept-data-change"]) == 0
