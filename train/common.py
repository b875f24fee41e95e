"""What the entry points share (flags and usage errors: train/flags.py, re-exported): the lr
schedule, the optimizer, sparse model construction, atomic checkpoints, metrics, summary.

Exit codes: 0 done, 1 the run failed (NaN / inf loss), 2 bad input (flags, preset, dataset,
checkpoint), 130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import dst
import alwayssparse.kernels as kernels
from dst import LAYER_FORMAT, DSTConfig, layer_densities, make_layer
from dst.config import is_dense
from models.transformer import sparse_layer_shapes

from .flags import (UsageError, check_common, dst_methods_of, field_comments,  # noqa: F401
                    ignored_dst_flags, parse_config, usage_exit)

# train/flags.py may have loaded dst/config.py before the package: bind it as dst.config.
if not hasattr(dst, "config"):
    dst.config = sys.modules["dst.config"]

REPO = Path(__file__).resolve().parents[1]

CHECKPOINT_FORMAT = "alwayssparse-train/1"


def token_metrics(model, batches, amp):
    """(token-weighted mean loss, accuracy) of ``model`` in eval mode, no gradients, over
    ``batches``: thunks, each giving (mean loss, logits [..., V], targets [...]) of one batch
    (BERT's masked tokens, GPT's next tokens), called in order under ``amp()``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            with amp():
                loss, logits, target = batch()
            n = target.numel()
            loss_sum += loss.item() * n
            correct += (logits.argmax(-1) == target).sum().item()
            count += n
    model.train()
    return loss_sum / max(count, 1), correct / max(count, 1)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast on a GPU by default; fp32 on CPU by default (bf16 matmuls are slower than
    fp32 there), bf16 on CPU when asked (the sparse ops follow autocast on both devices)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def check_block_size(build, model_cfg, dst_cfg: DSTConfig) -> dict:
    """UsageError unless DynaDiag's --block-size divides every sparse layer's width; returns
    the sparse layers' shapes {name: (out, in)}."""
    shapes = sparse_layer_shapes(build, model_cfg)
    if LAYER_FORMAT[dst_cfg.method] == "diag":
        for name, (out_f, in_f) in shapes.items():
            try:
                kernels.diag_geometry(in_f, out_f, dst_cfg.block_size)   # the layer's own check
            except ValueError:
                raise UsageError(f"--block-size {dst_cfg.block_size} must divide the width of every sparse "
                                 f"layer; {name} is {in_f} -> {out_f}") from None
    return shapes


def build_sparse_model(build, model_cfg, dst_cfg: DSTConfig, device: torch.device, seed: int):
    """Build ``build(model_cfg, linear=...)`` with the method's layer for every block linear,
    each with its share of the density (``dst_cfg.distribution``), created sparse on
    ``device`` - no dense weight is ever allocated for a sparse layer. Returns
    (model, {name: target density})."""
    shapes = check_block_size(build, model_cfg, dst_cfg)
    if is_dense(dst_cfg.method):
        densities = {name: 1.0 for name in shapes}
    else:
        densities = layer_densities(shapes, dst_cfg.sparsity, dst_cfg.distribution)
    generator = torch.Generator().manual_seed(seed)

    def linear(name, in_features, out_features, bias=True):
        with torch.device("cpu"):  # the layers draw their patterns from a CPU generator
            layer = make_layer(dst_cfg, in_features, out_features, densities[name], bias=bias,
                               generator=generator)
        return layer.to(device)

    with torch.device(device):
        model = build(model_cfg, linear=linear)
    return model, densities


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse layers (kernels.SparseLayer) of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kernels.SparseLayer)}


def layer_density_report(model: nn.Module, names) -> dict[str, float]:
    """Density of each named block linear (1.0 for a dense nn.Linear)."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        out[name] = m.density() if isinstance(m, kernels.SparseLayer) else 1.0
    return out


def overall_density(model: nn.Module, names) -> float:
    nnz = total = 0
    for name in names:
        m = model.get_submodule(name)
        size = m.in_features * m.out_features
        nnz += m.nnz() if isinstance(m, kernels.SparseLayer) else size
        total += size
    return nnz / max(total, 1)


def active_density(model: nn.Module, names, sparsifier) -> float:
    """overall_density counting only the weights toward the target: DynaDiag's K active
    diagonals without the candidates it stores until its freeze."""
    active = sparsifier.active_densities() if sparsifier is not None else {}
    nnz = total = 0
    for name in names:
        m = model.get_submodule(name)
        size = m.in_features * m.out_features
        nnz += active[name] * size if name in active else (m.nnz() if isinstance(m, kernels.SparseLayer) else size)
        total += size
    return nnz / max(total, 1)


def density_text(model: nn.Module, names, sparsifier) -> str:
    """"density D" - and, while DynaDiag carries candidates, what the stored density holds."""
    stored, active = overall_density(model, names), active_density(model, names, sparsifier)
    if abs(stored - active) < 1e-12:
        return f"density {stored:.4f}"
    return f"density {active:.4f} active (stored {stored:.4f}: active + candidate diagonals until the freeze)"


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float):
    """AdamW or SGD (Nesterov). Weight decay on linear weights and sparse values only - not on
    biases, norms, embeddings, tokens or DynaDiag's gate scores."""
    decay_ids = set()
    for m in model.modules():
        if isinstance(m, kernels.SparseLayer):
            decay_ids.add(id(m.values))
        elif isinstance(m, nn.Linear):
            decay_ids.add(id(m.weight))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise UsageError(f"--optimizer must be adamw or sgd, got {name!r}")


def lr_at(step: int, total: int, warmup: int, peak: float, final_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def schedule_warnings(cfg) -> list[str]:
    """What the run's flags make silently useless: a warm-up that never reaches the peak lr,
    DST settings under which no mask ever changes (delta_t past the update horizon), so that
    a short run (``--steps 30`` with the defaults) says so instead of training a static mask."""
    out = []
    if cfg.warmup > cfg.steps:   # lr_at: the last step's lr is lr * steps / warmup
        out.append(f"--warmup {cfg.warmup} > --steps {cfg.steps}: the learning rate never reaches --lr "
                   f"{cfg.lr:g} (it peaks at {cfg.lr * cfg.steps / cfg.warmup:.3g}); lower --warmup")
    note = dst.rule_for(cfg.dst.method).schedule_warning(cfg.dst, cfg.steps, cfg.dst.method)
    if note:
        out.append(note)
    return out


def precision_warning(precision: str, device: torch.device) -> str | None:
    """``--precision bf16`` on an x86-64 CPU without bf16 instructions (avx512_bf16 / amx_bf16):
    the sparse layers' bf16 products run about as fast as their fp32 ones there, but torch's
    dense bf16 matmuls (attention, embeddings, the head, a dense baseline's layers) and their
    backward are emulated and many times slower than fp32 (bench/results/cpu_train/), so the run
    is slower than under --precision fp32; it still trains correctly."""
    if precision != "bf16" or device.type != "cpu" or kernels.cpu.bf16_instructions() is not False:
        return None
    return ("--precision bf16 on a CPU without bf16 instructions (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): "
            "torch's dense bf16 matmuls are emulated here (on an AMD EPYC, a dense Linear(3072 -> 768) training "
            "step at 256 tokens took 26x its fp32 time: bench/results/cpu_train/), so this run is slower than "
            "under --precision fp32")


def warn_schedule(cfg, prog: str, device: torch.device | None = None) -> list[str]:
    """Print ``schedule_warnings`` (and, given the device, ``precision_warning``) to stderr, one
    line each; return them (for summary.json)."""
    warnings = schedule_warnings(cfg)
    if device is not None and (note := precision_warning(cfg.precision, device)):
        warnings.append(note)
    for w in warnings:
        print(f"{prog}: warning: {w}", file=sys.stderr)
    return warnings


def check_fused_mlp(cfg) -> None:
    """--fused-mlp runs each MLP as one kernels.fused_mlp call, which takes DiagLinear layers
    (--method dynadiag) with blocks of at least 16 (tl.dot tiles) and applies no dropout; a
    combination that could never fuse is a UsageError, not a silent unfused run."""
    if not cfg.fused_mlp:
        return
    min_block = kernels.fused.MIN_BLOCK_SIZE
    if LAYER_FORMAT[cfg.dst.method] != "diag":
        raise UsageError(f"--fused-mlp needs --method dynadiag (block-diagonal layers), got --method {cfg.dst.method}")
    if cfg.dst.block_size < min_block:
        raise UsageError(f"--fused-mlp needs --block-size >= {min_block} (the fused kernel multiplies b x b "
                         f"tiles with tl.dot), got --block-size {cfg.dst.block_size}")
    if cfg.dropout > 0:
        raise UsageError(f"--fused-mlp needs --dropout 0 (the fused kernel applies no dropout between fc1 and "
                         f"fc2), got --dropout {cfg.dropout:g}")


def run_dir(cfg, entry: str) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    d = cfg.dst
    tag = d.method if is_dense(d.method) else f"{d.method}-s{d.sparsity:g}"
    return REPO / "runs" / entry / f"{tag}-seed{cfg.seed}"


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder (checked before anything is written)."""
    done = [p.name for p in (path / "checkpoint.pt", path / "summary.json", path / "metrics.jsonl") if p.exists()]
    if resume:
        if not (path / "checkpoint.pt").exists():
            raise UsageError(f"--resume: no checkpoint at {path / 'checkpoint.pt'}")
    elif done and not overwrite:
        raise UsageError(f"{path} already holds a run ({', '.join(done)}); pass --resume or --overwrite")


git_sha = kernels.runtime.git_sha


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename (kernels.atomic_write): a kill at any moment leaves either the
    old file or the new one, never a torn one."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    kernels.atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, entry: str, cfg, step: int, model, optimizer, sparsifier, history) -> None:
    """Everything a resume needs: model (values + indices), optimizer, DST state, the next step
    (the data order is a function of seed and step), every RNG state, and the curves."""
    blob = {
        "format": CHECKPOINT_FORMAT, "entry": entry, "config": config_to_dict(cfg), "step": step,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
        "rng": rng_state(), "history": history,
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


# Fields that may differ between the saved run and the resuming one.
# fused_mlp computes the same function and gradients (rounding aside) and stores nothing else.
# eval_every only adds validation rows (evaluation draws from no training RNG).
# accept_data_change is checked against the run folder's data.json, not the checkpoint.
RESUME_FREE = {"resume", "overwrite", "progress", "plots", "threads", "device", "out_dir", "fused_mlp", "eval_every",
               "tensorboard", "grad_sync", "accept_data_change"}


def load_checkpoint(path: Path, entry: str, cfg) -> dict:
    """Read and check a checkpoint (UsageError, one line, when it is unreadable or belongs to
    another entry point, model, method or format). Never modifies the file."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated / corrupt files raise many kinds of errors
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a checkpoint of this trainer (format {CHECKPOINT_FORMAT})")
    if blob.get("entry") != entry:
        raise UsageError(f"{path} was written by train.{blob.get('entry')}, not train.{entry}")
    now, saved = config_to_dict(cfg), blob["config"]
    diff = sorted(k for k in now if k not in RESUME_FREE and now.get(k) != saved.get(k))
    if diff:
        k = diff[0]
        raise UsageError(f"checkpoint {path} has {k}={saved.get(k)!r}, this run {k}={now.get(k)!r} "
                         f"({len(diff)} field(s) differ: {', '.join(diff)})")
    return blob


def load_model_state(model: nn.Module, state: dict) -> None:
    """load_state_dict that keeps every Parameter object (the optimizer holds them) while
    sparse patterns change shape: parameters are resized in place first."""
    for name, p in model.named_parameters():
        if name in state and state[name].shape != p.shape:
            kernels.resize_parameter(p, torch.empty(state[name].shape, dtype=p.dtype, device=p.device))
    model.load_state_dict(state, strict=True)


class StopSignal:
    """Turns SIGINT / SIGTERM into a flag the loop checks once per step, so that it saves a
    checkpoint at a step boundary and exits; a second signal exits at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory: CUDA allocator peak on a GPU; on CPU the process's peak RSS (all of it:
    Python, data, model)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


class Metrics:
    """Append-only JSON lines (one per log / eval event), flushed at each write. Rows with
    step >= ``keep_before`` already in the file are dropped first (0 for a fresh run; the
    checkpoint's step on resume, whose rows the resumed run writes again)."""

    def __init__(self, path: Path, keep_before: int):
        kept = []
        if keep_before and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) < keep_before]
        atomic_write_text(path, "".join(k + "\n" for k in kept))
        self.file = open(path, "a")

    def write(self, **row) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def summarize_times(times: list[float]) -> dict:
    """Step time in ms, skipping the first steps (allocator / kernel warm-up)."""
    t = sorted(times[min(5, len(times) // 2):]) or [0.0]
    return {"median": 1000 * t[len(t) // 2], "mean": 1000 * sum(t) / len(t), "steps_timed": len(t)}


def now() -> float:
    return time.perf_counter()
