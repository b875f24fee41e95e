"""train/data.py: local image and text parquet through `datasets`, deterministic batches, MLM masking."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train import vit
from train.data import SPECIAL_TOKENS, epoch_batch, load_images, mask_tokens, text_docs

ROOT = Path(__file__).resolve().parents[2]


def test_batches_are_a_function_of_seed_and_step():
    a = [epoch_batch(100, 32, s, seed=1) for s in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, [epoch_batch(100, 32, s, seed=1) for s in range(6)]))
    assert torch.equal(torch.cat(a[:3]).sort().values, torch.cat(a[:3]).unique())   # no repeat in an epoch
    assert not torch.equal(a[0], a[3]) and not torch.equal(a[0], epoch_batch(100, 32, 0, seed=2))


def test_masking_follows_bert_and_keeps_specials():
    g = torch.Generator().manual_seed(0)
    special = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0] = special["[CLS]"]
    inputs, labels = mask_tokens(ids, special, 1000, g, prob=0.15)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01 and not chosen[:, 0].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == special["[MASK]"]).float().mean().item()
    assert abs(masked - 0.8) < 0.03


@pytest.fixture(scope="module")
def image_parquet(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    from PIL import Image
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(240):
        label = i % 3
        img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        img[label * 5:label * 5 + 5] = 255   # the class is a bright band: learnable in a few steps
        images.append(Image.fromarray(img))
        labels.append(label)
    ds = datasets.Dataset.from_dict({"img": images, "label": labels}).cast_column("img", datasets.Image())
    ds = ds.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    path = tmp_path_factory.mktemp("parquet") / "bands.parquet"
    ds.to_parquet(str(path))
    return path


def test_a_local_image_parquet_loads_and_trains(image_parquet, tmp_path):
    data = load_images(str(image_parquet))
    assert data.train_x.shape[1:] == (3, 16, 16) and data.num_classes == 3
    assert len(data.train_y) + len(data.val_y) == 216 and len(data.test_y) == 24   # 90 / 10 split, then val
    out = tmp_path / "run"
    assert vit.main(["--dataset", str(image_parquet), "--preset", "micro", "--patch-size", "4", "--steps", "30",
                     "--batch-size", "32", "--warmup", "3", "--eval-every", "100", "--method", "rigl",
                     "--sparsity", "0.5", "--out-dir", str(out), "--no-progress", "--no-plots"]) == 0
    import json
    assert json.loads((out / "summary.json").read_text())["test"]["accuracy"] > 0.6


def _pydoc_paragraphs(n):
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)[:n]]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Text datasets as the installed `datasets` writes them: one parquet with a "text" column,
    one whose only string column has another name, and a hub-style folder with train / test
    parquet files."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("text")
    docs = _pydoc_paragraphs(40)
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(root / "text.parquet"))
    datasets.Dataset.from_dict({"id": list(range(len(docs))), "body": docs}).to_parquet(str(root / "body.parquet"))
    (root / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": docs[:30]}).to_parquet(str(root / "hub" / "data" / "train-00000.parquet"))
    datasets.Dataset.from_dict({"text": docs[30:]}).to_parquet(str(root / "hub" / "data" / "test-00000.parquet"))
    return root, docs


@pytest.mark.parametrize("name", ["text.parquet", "body.parquet", "hub"])
def test_a_text_dataset_written_by_datasets_gives_every_document(text_files, name):
    root, docs = text_files
    got = text_docs(str(root / name))
    assert sorted(got) == sorted(d for d in docs if d.strip())


def test_bert_trains_on_a_text_parquet_from_the_command_line(text_files, tmp_path):
    root, _ = text_files
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DST_DATA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "train.bert", "--dataset", str(root / "text.parquet"),
                           "--preset", "micro", "--vocab-size", "256", "--seq-len", "32", "--steps", "3",
                           "--warmup", "1", "--batch-size", "4", "--method", "rigl", "--delta-t", "1",
                           "--out-dir", str(tmp_path / "run"), "--no-progress", "--no-plots", "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dataset"] == str(root / "text.parquet")


def _image_folder(root, sizes, n=24):
    """An imagefolder tree (train/<class>/*.png) of RGB images, ``sizes`` cycled over the files."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _vit_cli(dataset, out, *extra):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "train.vit", "--dataset", str(dataset), "--steps", "2",
                           "--batch-size", "8", "--warmup", "1", "--eval-examples", "8", "--method", "rigl",
                           "--out-dir", str(out), "--no-progress", "--no-plots", "--threads", "1", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_32px_rgb_folder_trains_with_the_default_preset_at_4_patches_a_side(tmp_path):
    pytest.importorskip("datasets")
    folder = _image_folder(tmp_path / "imgs", [(32, 32)])
    done = _vit_cli(folder, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    model = json.loads((tmp_path / "run" / "summary.json").read_text())["model"]
    assert (model["image_size"], model["patch_size"], model["channels"]) == (32, 8, 3)


def test_a_patch_size_that_does_not_divide_the_image_is_refused_naming_the_flag(tmp_path, capsys):
    pytest.importorskip("datasets")
    folder = _image_folder(tmp_path / "imgs", [(32, 32)])
    assert vit.main(["--dataset", str(folder), "--patch-size", "7", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--patch-size 7 must divide the image size 32" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("sizes", [[(40, 32)], [(32, 32), (28, 28)]], ids=["not square", "mixed sizes"])
def test_odd_image_sizes_are_refused_unless_image_size_resizes_them(tmp_path, capsys, sizes):
    pytest.importorskip("datasets")
    folder = _image_folder(tmp_path / "imgs", sizes)
    args = ["--dataset", str(folder), "--preset", "micro", "--steps", "2", "--batch-size", "8", "--warmup", "1",
            "--no-progress", "--no-plots"]
    assert vit.main(args + ["--out-dir", str(tmp_path / "refused")]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert vit.main(args + ["--image-size", "16", "--out-dir", str(tmp_path / "run")]) == 0
    model = json.loads((tmp_path / "run" / "summary.json").read_text())["model"]
    assert (model["image_size"], model["patch_size"]) == (16, 4)


WORDPIECE_IN_A_PROCESS = """
import sys
from pathlib import Path
from pydoc_data.topics import topics
import train.data as data
data.CACHE = Path(sys.argv[1])
data.wordpiece([topics[k] for k in sorted(topics)[:30]], 512, "pydoc30")
"""


def test_wordpiece_training_gives_the_same_file_in_every_process(tmp_path):
    # tokenizers 0.23's trainer numbers "##c" pieces in a per-process random hash order: before
    # train/data._train_wordpiece fixed them, 4 processes of 4 wrote 4 different vocabularies.
    files = []
    for i in range(3):
        cache = tmp_path / f"cache{i}"
        done = subprocess.run([sys.executable, "-c", WORDPIECE_IN_A_PROCESS, str(cache)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        (path,) = cache.glob("wordpiece*.json")
        files.append(path.read_text())
    assert files[0] == files[1] == files[2]
    vocab = json.loads(files[0])["model"]["vocab"]
    assert len(vocab) == 512 and [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_wordpiece_keeps_its_continuation_pieces_plain_vocabulary(tmp_path, monkeypatch):
    import train.data
    from pydoc_data.topics import topics
    monkeypatch.setattr(train.data, "CACHE", tmp_path)
    tok = train.data.wordpiece([topics[k] for k in sorted(topics)[:30]], 512, "pydoc30")
    assert [t["content"] for t in json.loads(tok.to_str())["added_tokens"]] == SPECIAL_TOKENS
    enc = tok.encode("Exceptionally ##a", add_special_tokens=False)
    assert any(t.startswith("##") for t in enc.tokens) and "##a" not in enc.tokens   # "##a" in text is not a token
    assert tok.decode(enc.ids, skip_special_tokens=True) == "exceptionally # # a"
    assert train.data.wordpiece([topics[k] for k in sorted(topics)[:30]], 512, "pydoc30").to_str() == tok.to_str()


def test_a_corpus_fingerprint_is_the_cache_names_sha1_with_documents_and_characters(tmp_path, monkeypatch):
    import train.data
    from train.data import corpus_fingerprint
    monkeypatch.setattr(train.data, "CACHE", tmp_path)
    docs = ["alpha beta gamma " * 40, "delta epsilon " * 30, "zeta"]
    fp = corpus_fingerprint("notes.txt", docs)
    assert fp["dataset"] == "notes.txt" and (fp["docs"], fp["chars"]) == (3, sum(map(len, docs)))
    assert len(fp["sha1"]) == 40
    train.data.wordpiece(docs, 64, "notes.txt")
    (cached,) = tmp_path.glob("wordpiece2-*.json")
    assert cached.stem.endswith("-" + fp["sha1"][:12])
    assert corpus_fingerprint("notes.txt", docs[:2] + ["zeta!"])["sha1"] != fp["sha1"]
    assert corpus_fingerprint("notes.txt", docs[:2])["docs"] == 2


def test_an_image_fingerprint_changes_with_a_label_or_a_split():
    from train.data import ImageData
    x, y = torch.zeros(10, 1, 4, 4), torch.arange(10) % 3

    def images(train_y=y, n_test=5):
        return ImageData("toy", x, train_y, x[:3], y[:3], x[:n_test], y[:n_test], 3)

    fp = images().fingerprint()
    assert fp == images().fingerprint() and fp["shape"] == [1, 4, 4] and (fp["train"], fp["test"]) == (10, 5)
    assert images(train_y=torch.roll(y, 1)).fingerprint()["sha1"] != fp["sha1"]
    assert images(n_test=4).fingerprint() != fp


def _fingerprint(sha1="a" * 40, docs=3, chars=100):
    return {"dataset": "notes.txt", "sha1": sha1, "docs": docs, "chars": chars}


def test_check_fingerprint_refuses_changed_data_naming_the_dataset_both_fingerprints_and_the_file(tmp_path):
    from train.data import UsageError, check_fingerprint
    (tmp_path / "data.json").write_text(json.dumps(_fingerprint()))
    assert check_fingerprint(tmp_path, _fingerprint(), "prog", "resume") == _fingerprint()
    with pytest.raises(UsageError) as e:
        check_fingerprint(tmp_path, _fingerprint(sha1="b" * 40, chars=101), "prog", "resume")
    msg = str(e.value)
    assert "'notes.txt'" in msg and "b" * 12 in msg and "a" * 12 in msg and "chars 101" in msg, msg
    assert str(tmp_path / "data.json") in msg and "--accept-data-change to resume" in msg, msg


def test_check_fingerprint_accepts_a_change_when_asked_and_keeps_the_old_fingerprints(tmp_path, capsys):
    from train.data import check_fingerprint
    (tmp_path / "data.json").write_text(json.dumps(_fingerprint()))
    kept = check_fingerprint(tmp_path, _fingerprint(sha1="b" * 40), "prog", "resume", accept=True)
    assert kept == {**_fingerprint(sha1="b" * 40), "previous": [_fingerprint()]}
    assert capsys.readouterr().err.count("prog: warning: dataset 'notes.txt' is not the data") == 1
    (tmp_path / "data.json").write_text(json.dumps(kept))
    again = check_fingerprint(tmp_path, _fingerprint(sha1="c" * 40), "prog", "resume", accept=True)
    assert again["previous"] == [_fingerprint(), _fingerprint(sha1="b" * 40)]
    assert check_fingerprint(tmp_path, _fingerprint(sha1="b" * 40), "prog", "resume") == kept   # now the run's


def test_check_fingerprint_warns_once_for_a_folder_without_data_json_and_goes_on(tmp_path, capsys):
    from train.data import check_fingerprint
    assert check_fingerprint(tmp_path, _fingerprint(), "prog", "evaluate") == _fingerprint()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prog: warning: {tmp_path} has no data.json" in err and "'notes.txt'" in err, err
    check_fingerprint(tmp_path, _fingerprint(), "prog", "resume", keeps=True, warn=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("content", ["{not json", '{"sha1": 1}'])
def test_an_unreadable_data_json_is_an_error_naming_it(tmp_path, content):
    from train.data import UsageError, check_fingerprint
    (tmp_path / "data.json").write_text(content)
    with pytest.raises(UsageError, match="cannot read the data fingerprint " + str(tmp_path / "data.json")):
        check_fingerprint(tmp_path, _fingerprint(), "prog", "resume")


def test_fashion_mnist_is_found_in_the_repository_cache_when_dst_data_cache_points_elsewhere(tmp_path):
    env = {**os.environ, "DST_DATA_CACHE": str(tmp_path / "elsewhere")}
    done = subprocess.run([sys.executable, "-c", "import json, train.data as d; print(json.dumps(d.FASHION_DIRS))"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dirs = json.loads(done.stdout)
    assert str(ROOT / "data_cache" / "fashion-mnist/usr/share/datasets/fashion-mnist") in dirs
    assert dirs[0] == str(tmp_path / "elsewhere" / "fashion-mnist/usr/share/datasets/fashion-mnist")
