"""The start and finish every trainer shares, so that a trainer's file holds its config, its
model-specific pieces and its loop (train/vit.py, train/bert.py):

    run = session.start(cfg, argv, ENTRY, build)         # ddp, run folder, resume, banner
    for step in run.steps(validate):                      # lr, periodic eval, checkpoints, signals
        ...forward, backward...
        if not run.finite(loss_value, step):
            return 1
        run.update(step, loss_value, accuracy)            # all-reduce, clip, optimizer + mask step, log
    return run.finish(validate_all(), test(), ...)        # summary.json, plots, the last line

``start`` raises ``flags.Exit`` with the process's exit code where there is nothing to train
(bad input: 2; a finished run resumed: 0); ``flags.entry_main`` returns it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import common as C
from . import distributed, tracking
from .data import DATA_FILE, check_fingerprint
from .plots import mask_rows
from .flags import Entry, Exit, UsageError, usage_exit


@dataclass
class Built:
    """A trainer's model-specific pieces: the model class, its config at the data's shapes, the
    data, the banner's words for the data, and files the run folder keeps for the data (name ->
    text: BERT's and GPT's tokenizer.json), written with the run's other files at the start."""
    model_class: type
    model_config: Any
    data: Any
    about: str
    files: dict = field(default_factory=dict)


def _model_config(build_model_config, dst_cfg):
    """The trainer's model config, validated with the flags (UsageError)."""
    try:
        model_cls, model_cfg = build_model_config()
        model_cfg.validate()
        C.check_block_size(model_cls, model_cfg, dst_cfg)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return model_cls, model_cfg


@dataclass
class Run:
    """One training session's state; ``start`` builds it."""
    cfg: Any
    argv: list | None
    entry: Entry
    ddp: distributed.Dist
    device: torch.device
    amp: Callable                  # a fresh autocast context (or a null one) per call
    out: Path
    model_config: Any
    data: Any
    model: nn.Module
    net: nn.Module                 # what the training forward calls: the model, or DDP around it under torchrun
    targets: dict                  # {layer name: target density}
    sparsifier: Any
    optimizer: torch.optim.Optimizer
    history: dict
    start: int                     # the first step of this session (the checkpoint's on --resume)
    metrics: Any                   # C.Metrics, mirrored to TensorBoard with --tensorboard
    warnings: list
    exit_code: int | None = None   # set when a signal stopped the loop
    _t0: float = 0.0
    _wall: float = field(default_factory=time.perf_counter)
    _bar: Any = None

    @property
    def names(self) -> list[str]:
        return list(self.targets)

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self, step: int) -> None:
        C.save_checkpoint(self.checkpoint, entry=self.entry.name, cfg=self.cfg, step=step, model=self.model,
                          optimizer=self.optimizer, sparsifier=self.sparsifier, history=self.history)

    def steps(self, validate: Callable[[], tuple[float, float]]):
        """The steps of this session. Before each: the lr of the schedule, a validation pass
        (``validate() -> (loss, metric)``) and a checkpoint when due; SIGINT / SIGTERM save a
        checkpoint and end the loop (``exit_code`` says so, ``finish`` returns it)."""
        from tqdm import tqdm
        cfg = self.cfg
        eval_every = cfg.eval_every or max(1, cfg.steps // 10)
        self._wall = time.perf_counter()
        self._bar = tqdm(total=cfg.steps, initial=self.start, disable=not cfg.progress or None,
                         dynamic_ncols=True, desc=cfg.dst.method)
        try:
            with C.StopSignal() as stop:
                for step in range(self.start, cfg.steps):
                    if stop.signum is not None:
                        self.save(step)
                        self._bar.close()
                        print(f"{self.entry.label}: stopped by signal {stop.signum} at step {step}; checkpoint "
                              f"saved to {self.checkpoint} (continue with --resume)", file=sys.stderr)
                        self.exit_code = stop.exit_code
                        return
                    lr = C.lr_at(step, cfg.steps, cfg.warmup, cfg.lr)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    if step > 0 and step % eval_every == 0:
                        vloss, vacc = validate()
                        self.history["eval"].append((step, vloss, vacc))
                        self.metrics.write(step=step, split="val", loss=vloss, accuracy=vacc)
                        if self.ddp.is_main:   # (every rank has the same figures: one line, not one a rank)
                            self._bar.write(f"step {step}: val {self.entry.loss_label} {vloss:.4f}, "
                                            f"{self.entry.metric_label} {100 * vacc:.2f}%")
                    if cfg.ckpt_every and step > self.start and step % cfg.ckpt_every == 0:
                        self.save(step)
                    self._t0 = time.perf_counter()
                    yield step
                    self._bar.update(1)
        finally:
            self._bar.close()

    def finite(self, loss_value: float, step: int) -> bool:
        """False (and a line on stderr) when the loss is NaN / inf: the trainer returns 1."""
        if math.isfinite(loss_value):
            return True
        self._bar.close()
        print(f"{self.entry.label}: loss is {loss_value} at step {step}; stopping (last good checkpoint: "
              f"{self.checkpoint if self.checkpoint.exists() else 'none'})", file=sys.stderr)
        return False

    def update(self, step: int, loss_value: float, accuracy: Callable[[], float]) -> None:
        """After backward: average the gradients over ranks, clip, the optimizer step, the mask
        update when due; then the step time, and a metrics row every ``log_every`` steps
        (``accuracy()`` is called only then)."""
        cfg, history = self.cfg, self.history
        if self.net is self.model:   # DDP averaged the gradients during backward; else --grad-sync flat / one process
            self.ddp.all_reduce_grads(self.model)  # average over ranks (no-op in one process)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        stats = self.sparsifier.step(step, self.optimizer)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        history["times"].append((step, time.perf_counter() - self._t0))   # kept across --resume sessions
        if stats is not None:
            history["mask_updates"] += 1
            history["mask_seconds"] += stats["seconds"]
        log = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        for row in mask_rows(step, stats, self.sparsifier, log=log):
            self.metrics.write(**row)   # mask churn and DynaDiag's gates (train/plots.py)
        history["window"].append(loss_value)
        if log:
            train_loss = sum(history["window"]) / len(history["window"])
            history["window"] = []
            density = C.overall_density(self.model, self.names)
            acc = accuracy()
            history["train"].append((step, train_loss))
            history["density"].append((step, density))
            lr = self.optimizer.param_groups[0]["lr"]
            self.metrics.write(step=step, split="train", loss=train_loss, accuracy=acc, lr=lr, density=density,
                               mask_updates=history["mask_updates"])
            self._bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{acc:.3f}", density=f"{density:.3f}")

    def finish(self, val: tuple[float, float], test: tuple[float, float], scores: dict, headline: str) -> int:
        """The final validation and test (loss, metric) on all of their data: metrics rows, the
        last checkpoint, summary.json (``scores``: {"test": {...}, "val": {...}} under the
        trainer's names), plots, the last line (``headline`` first). Returns the exit code."""
        cfg, model, names, history = self.cfg, self.model, self.names, self.history
        wall = time.perf_counter() - self._wall
        (vloss, vacc), (tloss, tacc) = val, test
        history["eval"].append((cfg.steps, vloss, vacc))
        self.metrics.write(step=cfg.steps, split="val", loss=vloss, accuracy=vacc)
        self.metrics.write(step=cfg.steps, split="test", loss=tloss, accuracy=tacc)
        self.metrics.close()
        self.save(cfg.steps)
        summary = {
            "entry": self.entry.name, "method": cfg.dst.method, "sparsity": cfg.dst.sparsity,
            "dataset": self.data.name, **scores,
            "density": {"overall": C.overall_density(model, names),
                        "active": C.active_density(model, names, self.sparsifier), "target": self.targets,
                        "layers": C.layer_density_report(model, names),
                        "nnz": {n: m.nnz() for n, m in C.sparse_layers(model).items()},
                        "budget": dict(self.sparsifier.budgets)},
            "stored_parameters": sum(p.numel() for p in model.parameters()),
            "step_time_ms": C.summarize_times([t for _, t in history["times"]]),
            "mask_updates": history["mask_updates"], "mask_update_seconds": history["mask_seconds"],
            "wall_seconds_this_session": wall, "steps": cfg.steps, "warnings": self.warnings,
            "resumed_from": self.start or None, "memory": C.peak_memory_mb(self.device), "device": str(self.device),
            "torch": torch.__version__, "git": C.git_sha(),
            "command": " ".join([self.entry.prog] + list(sys.argv[1:] if self.argv is None else self.argv)),
            "model": dataclasses.asdict(self.model_config), "config": C.config_to_dict(cfg),
        }
        C.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if cfg.plots:
            from .plots import plot_churn, plot_curves, plot_masks
            title = f"{self.entry.title} {cfg.preset} / {self.data.name} / {cfg.dst.method} sparsity {cfg.dst.sparsity:g}"
            plot_curves(history, self.out / "curves.png", title)
            plot_masks(C.sparse_layers(model), self.out / "masks.png", title)
            plot_churn(self.out / "metrics.jsonl", self.out / "churn.png", title)
        if self.ddp.is_main:
            print(f"{self.entry.label}: {headline} | {cfg.dst.method} density {summary['density']['overall']:.4f} | "
                  f"{summary['step_time_ms']['median']:.1f} ms/step | {wall:.0f} s | {self.out}")
        self.ddp.close()   # the process group, before the interpreter tears torch down
        return 0


def start(cfg, argv, entry: Entry, check_flags: Callable, model_config: Callable, load: Callable) -> Run:
    """Everything before the first step, in the order that writes nothing on bad input: the
    processes (torchrun), the flags, the device, the run folder and checkpoint, the model
    config (``model_config() -> (class, config)``, checked before the data loads), the data
    (``load(model_config, resume_from) -> Built``; ``resume_from`` is the run folder on
    --resume, else None: a trainer whose data depends on the run reads it there), the sparse
    model, the Sparsifier and the optimizer; then resume, the run's files (``Built.files``, and
    data.json: the data's fingerprint, checked against the folder's on --resume), the metrics
    file and the banner. Raises ``Exit``."""
    from dst import Sparsifier
    ddp = distributed.init(cfg.device)  # torchrun: one process per device (see train/distributed.py)
    if ddp.active:
        # Rank 0 owns the run folder; every other rank keeps its own copy of the checkpoint
        # (identical state, so --resume works on every rank) in a subfolder, and no plots.
        on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
        cfg = dataclasses.replace(cfg, device=f"cuda:{ddp.local_rank}" if on_gpu else cfg.device)
        if not ddp.is_main:
            cfg = dataclasses.replace(cfg, out_dir=str(C.run_dir(cfg, entry.name) / f"rank{ddp.rank}"),
                                      plots=False, progress=False)
    try:
        check_flags(cfg)
        C.check_fused_mlp(cfg)
        device = C.resolve_device(cfg.device)
        amp_dtype = C.autocast_dtype(cfg.precision, device)
        out = C.run_dir(cfg, entry.name)
        C.prepare_run_dir(out, cfg.resume, cfg.overwrite)
        blob = C.load_checkpoint(out / "checkpoint.pt", entry.name, cfg) if cfg.resume else None
        model_cls, model_cfg = _model_config(model_config, cfg.dst)
        if blob is not None and blob["step"] >= cfg.steps and (out / "summary.json").exists():
            # A finished run: its summary (step times, wall time) is not rewritten by a session that
            # trains nothing, and its data is not loaded (no tokenizer fallback, no warning).
            print(f"{entry.label}: {out} already finished its {cfg.steps} steps; nothing to resume, summary.json kept")
            raise Exit(0)
        built = load(model_cfg, out if blob is not None else None)
        fingerprint = built.data.fingerprint()   # kept in data.json; a resumed run's data must match it
        if blob is not None:
            fingerprint = check_fingerprint(out, fingerprint, entry.prog, "resume", cfg.accept_data_change,
                                            keeps=True, warn=ddp.is_main)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        C.seed_everything(cfg.seed)
        try:
            built.model_config.validate()
            model, targets = C.build_sparse_model(built.model_class, built.model_config, cfg.dst, device, cfg.seed)
            sparsifier = Sparsifier(model, cfg.dst, cfg.steps)
        except ValueError as e:
            raise UsageError(str(e)) from None
        optimizer = C.make_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, cfg.momentum)
    except UsageError as e:
        raise Exit(usage_exit(str(e), entry.prog)) from None
    warnings = C.warn_schedule(cfg, entry.prog, device) if ddp.is_main else []
    ddp.broadcast_model(model)
    net = ddp.wrap(model, cfg.grad_sync)   # the training forward: DDP under torchrun (train/distributed.py)
    history = {"train": [], "eval": [], "density": [], "metric": entry.metric, "window": [], "mask_updates": 0,
               "mask_seconds": 0.0, "times": []}
    first = 0
    if blob is not None:
        sparsifier.load_state_dict(blob["sparsifier"])
        C.load_model_state(model, blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        C.set_rng_state(blob["rng"])
        first = blob["step"]
        history = {"times": [], **{k: ([e for e in v if e[0] < first] if k in ("train", "eval", "density", "times")
                                       else v) for k, v in blob["history"].items()}}
    out.mkdir(parents=True, exist_ok=True)
    for name, text in {**built.files, DATA_FILE: json.dumps(fingerprint, indent=2) + "\n"}.items():
        C.atomic_write_text(out / name, text)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    metrics = C.Metrics(out / "metrics.jsonl", keep_before=first)
    metrics = tracking.mirror(metrics, out, cfg.tensorboard and ddp.is_main, first)   # --tensorboard
    run = Run(cfg=cfg, argv=argv, entry=entry, ddp=ddp, device=device, amp=amp, out=out,
              model_config=built.model_config, data=built.data, model=model, net=net, targets=targets,
              sparsifier=sparsifier, optimizer=optimizer, history=history, start=first, metrics=metrics,
              warnings=warnings)
    d = cfg.dst
    what = d.method if C.is_dense(d.method) else f"{d.method} at sparsity {d.sparsity:g} ({d.distribution})"
    mc = built.model_config
    if ddp.is_main:
        print(f"{entry.label}: {what}, {cfg.preset} {mc.dim}x{mc.depth} on {built.about}, "
              f"{sum(p.numel() for p in model.parameters()):,} stored parameters, "
              f"{C.density_text(model, run.names, sparsifier)}, {device}, {cfg.steps} steps -> {out}")
    return run
