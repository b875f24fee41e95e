"""Evaluate a finished run's checkpoint, and export its model.

    python -m train.eval runs/vit/dynadiag-s0.9-seed0                       # test metrics, its dataset
    python -m train.eval RUN --dataset fashion_mnist                        # another image dataset
    python -m train.eval RUN --export model.safetensors --densify model.pt  # condensed / dense copies
    python -m train.eval runs/gpt/srigl-s0.9-seed0 --samples 5              # GPT: perplexity + sampled text

The model is rebuilt from the run's summary.json (model config) and checkpoint.pt (config,
weights, patterns, DST state) and evaluated on the test split the run used: the same numbers
as summary.json's "test". A GPT run also prints ``--samples`` lines of text: each the start of
a test sequence (its first ``--prompt-tokens`` tokens) continued by the model for
``--sample-tokens`` tokens (top-k sampling at ``--temperature``, seeded by the run's seed).
``--export`` writes the condensed sparse model
(``kernels.save_condensed``: values + indices, no dense weight; ``kernels.load_layers`` /
``kernels.load_into`` read it); ``--densify`` writes ``{"model": state_dict, "model_config":
..., "entry": ...}`` with every sparse layer as a plain nn.Linear (``kernels.densify``),
loadable into ``models.vit.ViT`` / ``models.bert.Bert`` / ``models.gpt.GPT`` built without a
linear factory. A BERT / GPT run's text is tokenized with its folder's tokenizer.json (never a
new training), and both exports carry that tokenizer (the condensed file's header
``["extra"]["tokenizer"]``, the dense file's ``"tokenizer"``: ``tokenizers.Tokenizer.from_str``).
The run's own dataset must still match the fingerprint in its folder (data.json); a changed one
exits 2 unless ``--accept-data-change``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from .flags import UsageError, usage_exit

PROG = "python -m train.eval"


def _config(cls, saved: dict):
    """An entry point's Config from a checkpoint's dict (fields added since are left at their
    defaults, fields removed since are dropped)."""
    from dst import DSTConfig
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in saved.items() if k in names and k != "dst"}
    return cls(**values, dst=DSTConfig(**saved["dst"]))


def load_run(run: Path, device):
    """(entry, run config, model config, model with the checkpoint's weights and patterns)."""
    import torch

    from dst import Sparsifier

    from . import common as C
    ckpt, summary_path = run / "checkpoint.pt", run / "summary.json"
    if not ckpt.exists() or not summary_path.exists():
        missing = ", ".join(p.name for p in (ckpt, summary_path) if not p.exists())
        raise UsageError(f"{run} is not a finished run (no {missing}); finish it with --resume first")
    try:
        blob = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupt files raise many kinds of errors
        raise UsageError(f"cannot read checkpoint {ckpt}: {type(e).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != C.CHECKPOINT_FORMAT:
        raise UsageError(f"{ckpt} is not a checkpoint of this trainer (format {C.CHECKPOINT_FORMAT})")
    entry = blob["entry"]
    if entry == "vit":
        from models.vit import ViT as build, ViTConfig as ModelConfig

        from .vit import Config
    elif entry == "gpt":
        from models.gpt import GPT as build, GPTConfig as ModelConfig

        from .gpt import Config
    else:
        from models.bert import Bert as build, BertConfig as ModelConfig

        from .bert import Config
    cfg = _config(Config, blob["config"])
    model_cfg = ModelConfig(**json.loads(summary_path.read_text())["model"])
    torch.manual_seed(cfg.seed)
    model, _ = C.build_sparse_model(build, model_cfg, cfg.dst, device, cfg.seed)
    sparsifier = Sparsifier(model, cfg.dst, cfg.steps)   # DynaDiag: gates and candidates, as in training
    sparsifier.load_state_dict(blob["sparsifier"])
    C.load_model_state(model, blob["model"])
    model.eval()
    return entry, cfg, model_cfg, model


def text_tokenizer(run: Path, cfg, model_cfg):
    """The tokenizer of a BERT / GPT run (its tokenizer.json: train/data.run_tokenizer), checked
    against the model's vocabulary (UsageError naming the file)."""
    from .data import TOKENIZER_FILE, run_tokenizer
    tok = run_tokenizer(run, cfg.dataset, cfg.vocab_size, PROG)
    if tok.get_vocab_size() != model_cfg.vocab_size:
        raise UsageError(f"the tokenizer of {run} ({run / TOKENIZER_FILE} or its fallback) has {tok.get_vocab_size()} "
                         f"tokens, the model {model_cfg.vocab_size}: not the tokenizer this run trained with")
    return tok


def check_data(run: Path, data, accept: bool = False) -> None:
    """The data just loaded for the run in folder ``run`` against its data.json
    (train/data.check_fingerprint: UsageError on a mismatch unless ``accept``)."""
    from .data import check_fingerprint
    check_fingerprint(run, data.fingerprint(), PROG, "evaluate", accept)


def evaluate_run(entry: str, cfg, model_cfg, model, dataset: str | None, device, run: Path | None = None,
                 accept_data_change: bool = False) -> dict:
    """Test metrics of ``model`` on the run's dataset (or ``dataset``); a BERT / GPT run's text is
    tokenized with the tokenizer in its folder ``run``, and the run's own data is checked
    against the fingerprint there (``check_data``)."""
    from . import common as C
    amp_dtype = C.autocast_dtype(cfg.precision, device)
    import torch
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    name = dataset or cfg.dataset
    if entry == "vit":
        from . import vit
        data = vit.load_images(name, cfg.data_dir, cfg.seed, image_size=cfg.image_size or model_cfg.image_size)
        got = (data.channels, data.image_size, data.num_classes)
        want = (model_cfg.channels, model_cfg.image_size, model_cfg.num_classes)
        if got != want:
            raise UsageError(f"dataset {name!r} has (channels, image size, classes) {got}; the model takes {want}")
        if run is not None and name == cfg.dataset:
            check_data(run, data, accept_data_change)
        loss, acc = vit.evaluate(model, data.test_x, data.test_y, 512, device, amp)
        return {"dataset": name, "test": {"accuracy": acc, "loss": loss}, "examples": len(data.test_y)}
    if name != cfg.dataset:
        raise UsageError(f"a {entry.upper()} run evaluates on its own corpus {cfg.dataset!r} only: its WordPiece "
                         f"tokenizer was trained on it, so another text would get other token ids")
    if run is None:
        raise ValueError(f"evaluate_run: a {entry.upper()} run needs its folder (run=...) for its tokenizer")
    tok = text_tokenizer(run, cfg, model_cfg)
    if entry == "gpt":
        import math

        from . import gpt
        data = gpt.load_text(cfg, tok)
        check_data(run, data, accept_data_change)
        loss, acc = gpt.evaluate(model, data.test, device, amp)
        return {"dataset": name, "test": {"lm_loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": acc},
                "sequences": len(data.test), "data": data}
    from . import bert
    from .data import load_text
    data = load_text(cfg.dataset, cfg.seq_len, cfg.vocab_size, cfg.seed, tokenizer=tok)
    check_data(run, data, accept_data_change)
    loss, acc = bert.evaluate(model, data.test, data, cfg, device, amp)
    return {"dataset": name, "test": {"mlm_loss": loss, "mlm_accuracy": acc}, "sequences": len(data.test),
            "data": data}


def samples(model, data, n: int, prompt_tokens: int, new_tokens: int, temperature: float, top_k: int,
            seed: int, device) -> list[dict]:
    """``n`` continuations by a GPT ``model``: the first ``prompt_tokens`` tokens of test sequence
    i, then ``new_tokens`` sampled ones; each {"prompt": text, "continuation": text}."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = []
    for block in data.test[:n]:
        prompt = block[None, :prompt_tokens].to(device)
        ids = model.generate(prompt, new_tokens, temperature=temperature, top_k=top_k or None, generator=g)[0].tolist()
        decode = lambda t: data.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        out.append({"prompt": decode(ids[:prompt_tokens]), "continuation": decode(ids[prompt_tokens:])})
    return out


def _check_sampling(args) -> None:
    for name in ("samples", "prompt_tokens", "sample_tokens", "top_k"):
        if getattr(args, name) < (1 if name == "prompt_tokens" else 0):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {1 if name == 'prompt_tokens' else 0}, "
                             f"got {getattr(args, name)}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run folder of python -m train.vit / train.bert / train.gpt")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the run's (ViT: same channels, "
                   "image size and classes; BERT, GPT: the run's corpus only)")
    p.add_argument("--export", type=Path, metavar="PATH", help="write the condensed sparse model (.safetensors)")
    p.add_argument("--densify", type=Path, metavar="PATH", help="write a dense copy: every sparse layer as nn.Linear (.pt)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="only export, do not evaluate")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the metrics here")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--accept-data-change", action="store_true", help="evaluate although the run's dataset no "
                   "longer matches the fingerprint in its folder (data.json)")
    g = p.add_argument_group("GPT runs: sampled text (printed, and in --json)")
    g.add_argument("--samples", type=int, default=3, help="lines to sample, 0 = none (default: 3)")
    g.add_argument("--prompt-tokens", type=int, default=8, help="tokens of a test sequence as the prompt (default: 8)")
    g.add_argument("--sample-tokens", type=int, default=32, help="tokens sampled after the prompt (default: 32)")
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default: 0.8)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens, 0 = all (default: 50)")
    args = p.parse_args(argv)
    try:
        _check_sampling(args)
        from . import common as C
        device = C.resolve_device(args.device)
        entry, cfg, model_cfg, model = load_run(args.run, device)
        result = {"run": str(args.run), "entry": entry, "method": cfg.dst.method}
        if args.eval:
            result.update(evaluate_run(entry, cfg, model_cfg, model, args.dataset, device, args.run,
                                       args.accept_data_change))
        data = result.pop("data", None)
        tokenizer = data.tokenizer if data is not None else None
        if entry != "vit" and tokenizer is None and (args.export or args.densify or (entry == "gpt" and args.samples)):
            tokenizer = text_tokenizer(args.run, cfg, model_cfg)   # --no-eval: for the exports and the samples
        if entry == "gpt" and args.samples:
            if data is None:   # --no-eval: the corpus, for the prompts
                from .gpt import load_text
                data = load_text(cfg, tokenizer)
                check_data(args.run, data, args.accept_data_change)
            if args.prompt_tokens >= model_cfg.max_len:
                raise UsageError(f"--prompt-tokens must be < the model's max_len {model_cfg.max_len}, "
                                 f"got {args.prompt_tokens}")
            result["samples"] = samples(model, data, args.samples, args.prompt_tokens, args.sample_tokens,
                                        args.temperature, args.top_k, cfg.seed, device)
    except UsageError as e:
        return usage_exit(str(e), PROG)
    # A BERT / GPT export carries its tokenizer (tokenizer.json's text): the ids mean nothing without it.
    with_tokenizer = {"tokenizer": tokenizer.to_str()} if tokenizer is not None else {}
    if args.export:
        import alwayssparse.kernels as kernels
        kernels.save_condensed(model, args.export, extra={"entry": entry, "model_config": dataclasses.asdict(model_cfg),
                                                          "method": cfg.dst.method, **with_tokenizer})
        result["export"] = str(args.export)
    if args.densify:
        import io

        import torch

        import alwayssparse.kernels as kernels
        kernels.densify(model)
        buf = io.BytesIO()
        torch.save({"entry": entry, "model_config": dataclasses.asdict(model_cfg), "model": model.state_dict(),
                    **with_tokenizer}, buf)
        C.atomic_write_bytes(args.densify, buf.getvalue())
        result["densify"] = str(args.densify)
    if args.eval:
        metrics = ", ".join(f"{k} {100 * v:.2f}%" if "accuracy" in k else f"{k} {v:.4f}" for k, v in result["test"].items())
        print(f"train.eval: {entry} {cfg.dst.method} on {result['dataset']}: test {metrics}")
    for i, sample in enumerate(result.get("samples", [])):
        print(f"sample {i}: {sample['prompt']} >>> {sample['continuation']}")
    for key in ("export", "densify"):
        if key in result:
            print(f"train.eval: wrote {result[key]}")
    if args.json:
        C.atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
