"""What the entry points share: config dataclass -> --flags, the usage-error exit, the lr
schedule, the optimizer, sparse model construction, atomic checkpoints, metrics, summary.

Exit codes: 0 done, 1 the run failed (NaN / inf loss), 2 bad input (flags, preset, dataset,
checkpoint), 130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import math
import random
import re
import resource
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kernels
from dst import METHODS, PAPER_DEFAULTS, DSTConfig, layer_densities, make_layer
from models.transformer import sparse_layer_shapes

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_FORMAT = "alwayssparse-train/1"


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


def usage_exit(message: str, prog: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- config -> flags

def field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each dataclass field (and the comment-only lines after
    it), read from the source: the comments are the --help text."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    last, indent = None, 0
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"(\s+)(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
        if m and m.group(2) in names:
            last, indent = m.group(2), len(m.group(1))
            comments[last] = (m.group(3) or "").strip()
        elif last and re.match(r"\s+#", line) and len(line) - len(line.lstrip()) > indent:
            comments[last] += " " + line.strip().lstrip("#").strip()   # a continuation, indented deeper
        else:
            last = None   # a section comment, at the fields' indentation, belongs to no field
    return comments


def _flag_type(hint):
    """int / float / str / bool from a field's type hint (``int | None`` -> int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": the comment says what None means
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# The methods that read each DST field (from dst/: the rules and the Sparsifier's schedule), for
# --help and for the warning on a flag the method ignores. A field not listed (a new one) is
# taken as read by every method.
_UPDATING = ("set", "rigl", "srigl", "gse", "dynadiag")
_GRADIENT_GROWTH = ("rigl", "srigl", "gse", "dynadiag")
DST_FIELD_METHODS = {
    "delta_t": _UPDATING, "alpha": _UPDATING, "drop_schedule": _UPDATING,
    "t_end": ("set", "rigl", "srigl", "gse"),   # dynadiag stops at its freeze (freeze_at)
    "grow": _GRADIENT_GROWTH, "gamma": _GRADIENT_GROWTH, "scope": ("rigl", "gse"),
    "gamma_sal": ("srigl",), "ablation": ("srigl",),
    "block_size": ("dynadiag",), "temp_start": ("dynadiag",), "temp_end": ("dynadiag",),
    "freeze_at": ("dynadiag",), "freeze_gate": ("dynadiag",), "candidates": ("dynadiag",),
}


def dst_methods_of(field: str) -> tuple[str, ...]:
    """The methods that read DSTConfig field ``field``."""
    return DST_FIELD_METHODS.get(field, METHODS)


def ignored_dst_flags(method: str, given) -> list[str]:
    """The --flags among ``given`` (DSTConfig field names) that ``method`` does not read."""
    return ["--" + g.replace("_", "-") for g in given if method not in dst_methods_of(g)]


def parse_config(cls, argv=None, prog: str | None = None):
    """Build ``cls`` (an entry point's config dataclass) from --flags: one flag per field,
    ``--snake-case``, help from the field comments. A field ``dst: DSTConfig`` becomes the
    flags of DSTConfig (``--method``, ``--sparsity``, ``--delta-t``, ...); a DST flag left out
    takes that method's paper default (``DSTConfig.for_method``), and its seed is the run's.
    Bad flags or values: one line on stderr, exit code 2."""
    parser = _Parser(prog=prog, description=inspect.getdoc(cls),
                     formatter_class=_Help)
    dst_flags = []

    def add(f, hint, comment, default, dest):
        flag = "--" + f.name.replace("_", "-")
        comment = comment.replace("%", "%%")  # argparse %-formats help strings
        kind = _flag_type(hint)
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=comment)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=default, help=comment, metavar=kind.__name__.upper())

    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is DSTConfig:
            dst_hints, dst_comments = typing.get_type_hints(DSTConfig), field_comments(DSTConfig)
            by_paper = {k for d in PAPER_DEFAULTS.values() for k in d}
            for g in dataclasses.fields(DSTConfig):
                if g.name == "seed":
                    continue
                # default None: a flag left out is filled by DSTConfig.for_method, and a given one is known
                if g.name in by_paper:
                    note, default = f"; default: the method's paper value, else {g.default}", None
                else:
                    note, default = f" (default: {g.default})", None
                if g.name == "method":
                    note, default = f": {', '.join(METHODS)}", g.default
                elif dst_methods_of(g.name) != METHODS:
                    note = f" [{', '.join(dst_methods_of(g.name))}]" + note
                add(g, dst_hints[g.name], dst_comments.get(g.name, "") + note, default, "dst." + g.name)
                dst_flags.append(g.name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        add(f, hints[f.name], comments.get(f.name, ""), default, f.name)
    args = vars(parser.parse_args(argv))
    values = {k: v for k, v in args.items() if not k.startswith("dst.")}
    given = {k[4:]: v for k, v in args.items() if k.startswith("dst.") and v is not None}
    method = given.pop("method")
    if method not in METHODS:
        parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    try:
        dst_cfg = DSTConfig.for_method(method, seed=values.get("seed", 0), **given)
    except ValueError as e:
        parser.error(str(e))
    dst_field = next(f.name for f in dataclasses.fields(cls) if hints[f.name] is DSTConfig)
    ignored = ignored_dst_flags(method, given)
    if ignored:   # a warning, not an error: table scripts pass one --delta-t to every method
        print(f"{parser.prog}: warning: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
              f"--method {method} (ignored; --help lists the methods of each DST flag)", file=sys.stderr)
    return cls(**values, **{dst_field: dst_cfg})


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- setup helpers

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


def build_sparse_model(build, model_cfg, dst_cfg: DSTConfig, device: torch.device, seed: int):
    """Build ``build(model_cfg, linear=...)`` with the method's layer for every block linear,
    each with its share of the density (``dst_cfg.distribution``), created sparse on
    ``device`` - no dense weight is ever allocated for a sparse layer. Returns
    (model, {name: target density})."""
    shapes = sparse_layer_shapes(build, model_cfg)
    if dst_cfg.method == "dynadiag":
        b = dst_cfg.block_size
        for name, (out_f, in_f) in shapes.items():
            if out_f % b or in_f % b:
                raise UsageError(f"--block-size {b} must divide the width of every sparse layer; "
                                 f"{name} is {in_f} -> {out_f}")
    if dst_cfg.method == "dense":
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


def check_common(cfg) -> None:
    """Checks of the loop flags both entry points share (UsageError on the first bad one)."""
    positive = ("steps", "batch_size", "eval_every", "log_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "ckpt_every", "threads", "eval_examples"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or not 0 <= cfg.momentum < 1:
        raise UsageError("--weight-decay and --grad-clip must be >= 0 and --momentum in [0, 1)")
    if cfg.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {cfg.seed}")


def schedule_warnings(cfg) -> list[str]:
    """What the run's flags make silently useless: a warm-up that never reaches the peak lr,
    DST settings under which no mask ever changes (delta_t past the update horizon), so that
    a short run (``--steps 30`` with the defaults) says so instead of training a static mask."""
    from dst.schedules import is_update_step
    out = []
    if cfg.warmup > cfg.steps:   # lr_at: the last step's lr is lr * steps / warmup
        out.append(f"--warmup {cfg.warmup} > --steps {cfg.steps}: the learning rate never reaches --lr "
                   f"{cfg.lr:g} (it peaks at {cfg.lr * cfg.steps / cfg.warmup:.3g}); lower --warmup")
    d = cfg.dst
    if d.method == "dynadiag":
        freeze = round(d.freeze_at * cfg.steps)
        if not any(is_update_step(s, d.delta_t, freeze) for s in range(cfg.steps)):
            out.append(f"no DynaDiag resampling before the freeze at step {freeze} (--freeze-at {d.freeze_at:g} x "
                       f"--steps {cfg.steps}) with --delta-t {d.delta_t}: the diagonals are chosen once, at the "
                       f"freeze; pass --delta-t below {max(freeze, 2)}")
    elif d.method in ("set", "rigl", "srigl", "gse"):
        horizon = d.t_end * cfg.steps
        updates = sum(is_update_step(s, d.delta_t, horizon) for s in range(cfg.steps))
        if updates == 0:
            out.append(f"no mask update will happen: --delta-t {d.delta_t} is not below the update horizon "
                       f"--t-end {d.t_end:g} x --steps {cfg.steps} = {horizon:g} steps, so {d.method} trains a "
                       f"static mask; pass --delta-t below {max(math.ceil(horizon), 2)}")
    return out


def warn_schedule(cfg, prog: str) -> list[str]:
    """Print ``schedule_warnings`` to stderr, one line each; return them (for summary.json)."""
    warnings = schedule_warnings(cfg)
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
    if cfg.dst.method != "dynadiag":
        raise UsageError(f"--fused-mlp needs --method dynadiag (block-diagonal layers), got --method {cfg.dst.method}")
    if cfg.dst.block_size < min_block:
        raise UsageError(f"--fused-mlp needs --block-size >= {min_block} (the fused kernel multiplies b x b "
                         f"tiles with tl.dot), got --block-size {cfg.dst.block_size}")
    if cfg.dropout > 0:
        raise UsageError(f"--fused-mlp needs --dropout 0 (the fused kernel applies no dropout between fc1 and "
                         f"fc2), got --dropout {cfg.dropout:g}")


# ----------------------------------------------------------------------------- run folder

def run_dir(cfg, entry: str) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    d = cfg.dst
    tag = "dense" if d.method == "dense" else f"{d.method}-s{d.sparsity:g}"
    return REPO / "runs" / entry / f"{tag}-seed{cfg.seed}"


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder (checked before anything is written)."""
    done = [p.name for p in (path / "checkpoint.pt", path / "summary.json", path / "metrics.jsonl") if p.exists()]
    if resume:
        if not (path / "checkpoint.pt").exists():
            raise UsageError(f"--resume: no checkpoint at {path / 'checkpoint.pt'}")
    elif done and not overwrite:
        raise UsageError(f"{path} already holds a run ({', '.join(done)}); pass --resume or --overwrite")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- checkpoints

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
RESUME_FREE = {"resume", "overwrite", "progress", "plots", "threads", "device", "out_dir", "fused_mlp"}


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
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name in state and state[name].shape != p.shape:
                p.data = torch.empty(state[name].shape, dtype=p.dtype, device=p.device)
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- run-time guards

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
