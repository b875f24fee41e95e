"""Evaluate a finished run's checkpoint, and export its model.

    python -m train.eval runs/vit/dynadiag-s0.9-seed0                       # test metrics, its dataset
    python -m train.eval RUN --dataset fashion_mnist                        # another image dataset
    python -m train.eval RUN --export model.safetensors --densify model.pt  # condensed / dense copies

The model is rebuilt from the run's summary.json (model config) and checkpoint.pt (config,
weights, patterns, DST state) and evaluated on the test split the run used: the same numbers
as summary.json's "test". ``--export`` writes the condensed sparse model
(``kernels.save_condensed``: values + indices, no dense weight; ``kernels.load_layers`` /
``kernels.load_into`` read it); ``--densify`` writes ``{"model": state_dict, "model_config":
..., "entry": ...}`` with every sparse layer as a plain nn.Linear (``kernels.densify``),
loadable into ``models.vit.ViT`` / ``models.bert.Bert`` built without a linear factory.
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


def evaluate_run(entry: str, cfg, model_cfg, model, dataset: str | None, device) -> dict:
    """Test metrics of ``model`` on the run's dataset (or ``dataset``)."""
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
        loss, acc = vit.evaluate(model, data.test_x, data.test_y, 512, device, amp)
        return {"dataset": name, "test": {"accuracy": acc, "loss": loss}, "examples": len(data.test_y)}
    if name != cfg.dataset:
        raise UsageError(f"a BERT run evaluates on its own corpus {cfg.dataset!r} only: its WordPiece "
                         f"tokenizer was trained on it, so another text would get other token ids")
    from . import bert
    from .data import load_text
    data = load_text(cfg.dataset, cfg.seq_len, cfg.vocab_size, cfg.seed)
    loss, acc = bert.evaluate(model, data.test, data, cfg, device, amp)
    return {"dataset": name, "test": {"mlm_loss": loss, "mlm_accuracy": acc}, "sequences": len(data.test)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run folder of python -m train.vit / train.bert")
    p.add_argument("--dataset", help="evaluate on this dataset instead of the run's (ViT: same channels, "
                   "image size and classes; BERT: the run's corpus only)")
    p.add_argument("--export", type=Path, metavar="PATH", help="write the condensed sparse model (.safetensors)")
    p.add_argument("--densify", type=Path, metavar="PATH", help="write a dense copy: every sparse layer as nn.Linear (.pt)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="only export, do not evaluate")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the metrics here")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    args = p.parse_args(argv)
    try:
        from . import common as C
        device = C.resolve_device(args.device)
        entry, cfg, model_cfg, model = load_run(args.run, device)
        result = {"run": str(args.run), "entry": entry, "method": cfg.dst.method}
        if args.eval:
            result.update(evaluate_run(entry, cfg, model_cfg, model, args.dataset, device))
    except UsageError as e:
        return usage_exit(str(e), PROG)
    if args.export:
        import alwayssparse.kernels as kernels
        kernels.save_condensed(model, args.export, extra={"entry": entry, "model_config": dataclasses.asdict(model_cfg),
                                                          "method": cfg.dst.method})
        result["export"] = str(args.export)
    if args.densify:
        import io

        import torch

        import alwayssparse.kernels as kernels
        kernels.densify(model)
        buf = io.BytesIO()
        torch.save({"entry": entry, "model_config": dataclasses.asdict(model_cfg), "model": model.state_dict()}, buf)
        C.atomic_write_bytes(args.densify, buf.getvalue())
        result["densify"] = str(args.densify)
    if args.eval:
        metrics = ", ".join(f"{k} {100 * v:.2f}%" if "accuracy" in k else f"{k} {v:.4f}" for k, v in result["test"].items())
        print(f"train.eval: {entry} {cfg.dst.method} on {result['dataset']}: test {metrics}")
    for key in ("export", "densify"):
        if key in result:
            print(f"train.eval: wrote {result[key]}")
    if args.json:
        C.atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
