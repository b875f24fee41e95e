"""End to end: ViT-B/16, BERT-base and GPT-2 small, a training step and inference, sparse vs
dense - step time and peak memory.

    python bench/e2e.py                                   # GPU: ViT-B/16 batch 256, BERT-base 256 x 128
    python bench/e2e.py --models vit-b16 --formats dense,diag16 --batch 128
    python bench/e2e.py --models vit-b16,mlp --formats dense,diag64,diag64-fused   # fused vs unfused vs dense
    python bench/e2e.py --quick                           # CPU: micro models, pipeline check
    python bench/e2e.py --models vit-b16,bert-base --formats dense,fanin,diag16,csr --infer-only  # CPU inference
    OMP_NUM_THREADS=1 python bench/e2e.py --models vit-b16,bert-base --formats dense,fanin,diag16,diag1,csr \
        --batch 1 --steps 5 --clock cpu   # CPU (the training step's sparse products through kernels/cpu)
    OMP_NUM_THREADS=1 python bench/e2e.py --models vit-b16 --formats dense,diag16,fanin --autocast bf16 \
        --batch 2 --steps 3 --clock cpu   # CPU under bf16 autocast: dense bf16 (oneDNN) vs kernels/cpu's bf16
    OMP_NUM_THREADS=1 python bench/e2e.py --models gpt2-small --formats dense,fanin,diag16,diag1,csr \
        --batch 1 --steps 5 --clock cpu   # GPT-2 small (124M shapes) on CPU

Models come from ``models`` (ViT / Bert with a ``linear`` factory that makes qkv, attention
out, fc1 and fc2 sparse at ``--sparsity``; patch / token embeddings, norms and heads stay
dense). If ``models`` cannot be imported, those rows are reported as skipped and only the
``mlp`` row runs: one ViT-B/16 MLP block, x + fc2(gelu(fc1(LN(x)))) on 197 tokens per image,
built here from the ``kernels`` layers - the part of the network sparsity changes most.

Formats: dense (nn.Linear), fanin (FanInLinear, SRigL), diag<b> (DiagLinear with block b,
DynaDiag), diag<b>-fused (the same layers, each MLP one ``kernels.fused_mlp`` call: fc1 ->
GELU -> fc2 in one kernel, hidden recomputed, never in HBM; compare its row with diag<b>'s;
b >= 16; not for BERT, whose training dropout the fused kernel lacks; its output is checked
against the same MLPs unfused before timing, status "wrong" and no timing when it fails),
csr (SparseLinear, unstructured). A training step is zero_grad, forward, loss,
backward, AdamW step; inference is a forward under inference_mode. Both are timed per step
after warm-up (device synchronised), median over steps. On a GPU each format runs alone and
its peak memory is torch.cuda.max_memory_allocated; on CPU all formats of a model are built
together and take turns step by step (a shared CPU's load then falls on all alike), and with
no allocator statistic only the parameter + buffer bytes are reported. Everything runs in one dtype (bf16 on a GPU), no
autocast: the sparse ops take values and activations of one dtype - unless ``--autocast bf16``:
then the fp32 model's forward and loss run under torch.autocast(bf16), as a user's mixed-precision
step does (the dense model's matmuls in torch's bf16 GEMM, the sparse layers' in kernels/cpu's
bf16 products). BERT trains masked-LM on
15% of the positions (logits only there when the model supports it); its inference step
computes the logits of every position. GPT-2 small (models.gpt preset "small": 12 blocks, width
768, MLP 3072, vocabulary 50,257, its head tied to the token embedding, dropout 0.1) trains on
the next token at every position of ``--seq`` tokens and infers the logits of every position;
its head (128 x 768 x 50,257 at 128 tokens) stays dense and is a fixed share of both steps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from bench import common  # noqa: E402
from kernels import runtime as rt  # noqa: E402

MODELS = ("vit-b16", "bert-base", "gpt2-small", "mlp")
FORMATS = ("dense", "fanin", "diag1", "diag16", "diag64", "diag16-fused", "diag64-fused", "csr")
FIELDS = ["run", "device", "model", "preset", "format", "sparsity", "batch", "tokens", "dtype", "status", "reason",
          "train_ms", "train_q1", "train_q3", "infer_ms", "infer_q1", "infer_q3", "x_dense_train",
          "x_dense_infer", "train_peak_mb", "infer_peak_mb", "param_mb", "loss"]


def linear_factory(fmt: str, sparsity: float, device, dtype):
    """``linear(name, in, out, bias)`` making the layer of format ``fmt`` directly (sparse
    layers are created sparse: no dense weight is allocated)."""
    density = 1.0 - sparsity

    def linear(name, n_in, n_out, bias=True):
        kw = dict(bias=bias, device=device, dtype=dtype)
        if fmt == "dense":
            return nn.Linear(n_in, n_out, **kw)
        if fmt == "fanin":
            return kernels.FanInLinear(n_in, n_out, density=density, **kw)
        if fmt.startswith("diag"):
            block = int(fmt[4:].removesuffix("-fused"))
            return kernels.DiagLinear(n_in, n_out, density=density, block_size=block, **kw)
        if fmt == "csr":
            return kernels.SparseLinear(n_in, n_out, density=density, **kw)
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")

    return linear


class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(LN(x)))): a transformer MLP block from the kernels layers; ``fused``
    runs fc2(gelu(fc1(.))) as one kernels.fused_mlp call (two DiagLinear layers)."""

    def __init__(self, dim: int, hidden: int, linear, fused: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = linear("fc1", dim, hidden, True)
        self.fc2 = linear("fc2", hidden, dim, True)
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return x + kernels.fused_mlp(self.fc1, self.fc2, self.norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


@dataclass
class Workload:
    net: nn.Module
    loss: Callable[[], torch.Tensor]   # forward + loss of one training step
    infer: Callable[[], object]        # one inference forward
    tokens: int                        # tokens per step through the transformer blocks


def build(model: str, fmt: str, args, device, dtype) -> Workload:
    linear = linear_factory(fmt, args.sparsity, device, dtype)
    fused = fmt.endswith("-fused")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    B = args.batch
    if model == "mlp":
        dim, hidden, n_tok = (32, 64, 17) if args.quick else (768, 3072, 197)
        with torch.device(device):
            net = MLPBlock(dim, hidden, linear, fused).to(dtype)
        x = torch.randn(B, n_tok, dim, generator=g).to(device, dtype)
        target = torch.randn(B, n_tok, dim, generator=g).to(device, dtype)
        return Workload(net, lambda: F.mse_loss(net(x).float(), target.float()), lambda: net(x), B * n_tok)
    if model == "vit-b16":
        from models.vit import ViT, ViTConfig

        cfg = ViTConfig.preset("micro" if args.quick else "base", fused_mlp=fused)
        with torch.device(device):
            net = ViT(cfg, linear=linear).to(dtype)
        images = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
        labels = torch.randint(0, cfg.num_classes, (B,), generator=g).to(device)
        n_tok = (cfg.image_size // cfg.patch_size) ** 2 + 1
        return Workload(net, lambda: F.cross_entropy(net(images).float(), labels), lambda: net(images), B * n_tok)
    if model == "bert-base":
        if fused:
            raise ValueError("BERT trains with dropout 0.1, which the fused MLP does not apply")
        from models.bert import Bert, BertConfig

        small = {"vocab_size": 512} if args.quick else {}
        cfg = BertConfig.preset("micro" if args.quick else "base", max_len=max(args.seq, 8), **small)
        with torch.device(device):
            net = Bert(cfg, linear=linear).to(dtype)
        ids = torch.randint(0, cfg.vocab_size, (B, args.seq), generator=g).to(device)
        labels = torch.randint(0, cfg.vocab_size, (B, args.seq), generator=g).to(device)
        # Masked-LM training predicts ~15% of the positions; the model computes logits only
        # there when its forward takes ``predict`` (else for every position).
        predict = torch.rand(B, args.seq, generator=g).to(device) < 0.15
        predict[:, 0] = True
        if "predict" in inspect.signature(net.forward).parameters:
            def loss():
                return F.cross_entropy(net(ids, predict=predict).float(), labels[predict])
        else:
            def loss():
                out = net(ids)
                return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1))
        return Workload(net, loss, lambda: net(ids), B * args.seq)
    if model == "gpt2-small":
        if fused:
            raise ValueError("GPT-2 trains with dropout 0.1, which the fused MLP does not apply")
        from models.gpt import GPT, GPTConfig

        small = {"vocab_size": 512} if args.quick else {}
        cfg = GPTConfig.preset("micro" if args.quick else "small", max_len=max(args.seq, 8), **small)
        with torch.device(device):
            net = GPT(cfg, linear=linear).to(dtype)
        ids = torch.randint(0, cfg.vocab_size, (B, args.seq + 1), generator=g).to(device)

        def loss():   # next-token cross-entropy at every position
            out = net(ids[:, :-1])
            return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        return Workload(net, loss, lambda: net(ids[:, :-1]), B * args.seq)
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


class WrongOutput(Exception):
    """A format whose output fails its correctness gate: reported, never timed."""


# Error allowed on top of 2x the unfused MLP's own error at the dtype (tests/kernels/conftest.py).
FUSED_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def check_fused(net: nn.Module, dtype, tokens: int = 64) -> None:
    """Each fused MLP of ``net`` on random tokens against the same MLP unfused in fp32 (fp64
    for fp64; the reference): its error may be at most 2x the unfused MLP's at ``dtype`` + atol, as in
    tests/kernels. bench/fused_mlp.py gates the kernel itself against fp64."""
    mlps = [m for m in net.modules() if getattr(m, "fused", None) is True]
    if not mlps:
        raise WrongOutput("no fused MLP in the model")
    g = torch.Generator().manual_seed(0)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    net.eval()
    for i, mlp in enumerate(mlps):
        reference = copy.deepcopy(mlp).to(ref_dtype)
        reference.fused = False
        x = torch.randn(tokens, mlp.fc1.in_features, generator=g).to(mlp.fc1.values.device, dtype)
        with torch.inference_mode():
            ref = reference(x.to(ref_dtype)).double()
            fused = mlp(x).double()
            mlp.fused = False
            unfused = mlp(x).double()
            mlp.fused = True
        scale = max(1.0, ref.abs().max().item())
        err = (fused - ref).abs().max().item()
        bound = 2 * (unfused - ref).abs().max().item() + FUSED_ATOL[dtype] * scale
        if not err <= bound:
            raise WrongOutput(f"fused MLP {i}: max error {err:.2e} vs the unfused reference > allowed {bound:.2e}")


class Runner:
    """One model in one format: its training step and its inference step."""

    def __init__(self, model: str, fmt: str, args, device, dtype):
        self.work = build(model, fmt, args, device, dtype)
        self.autocast = getattr(args, "autocast", None)
        self.device_type = torch.device(device).type
        if fmt.endswith("-fused"):
            check_fused(self.work.net, dtype)
        self.net, self.tokens = self.work.net, self.work.tokens
        self.param_mb = sum(t.numel() * t.element_size()
                            for t in list(self.net.parameters()) + list(self.net.buffers())) / 2**20
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.loss = math.nan

    def train_step(self):
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.work.loss()
        loss.backward()
        self.opt.step()
        self.loss = loss.detach()

    def infer_step(self):
        self.net.eval()
        with torch.inference_mode(), self._autocast():
            self.work.infer()

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast)

    def drop_optimizer(self):
        self.opt.zero_grad(set_to_none=True)
        self.opt = None


# --clock cpu: the process's CPU time (all its threads), for a CPU shared with other jobs, where
# a step's wall time includes its waits in the run queue; with one thread (OMP_NUM_THREADS=1)
# it is the step's time on an idle core.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time_once(fn) -> float:
    t0 = _clock()
    fn()
    common.synchronize()
    return (_clock() - t0) * 1e3


def _summary(train: list[float], infer: list[float]) -> dict:
    def quart(xs):
        if not xs:
            return math.nan, math.nan
        if len(xs) < 2:
            return xs[0], xs[0]
        q = statistics.quantiles(xs, n=4)
        return q[0], q[2]
    tq, iq = quart(train), quart(infer)
    return dict(train_ms=statistics.median(train) if train else math.nan, train_q1=tq[0], train_q3=tq[1],
                infer_ms=statistics.median(infer), infer_q1=iq[0], infer_q3=iq[1])


def _finished(r: Runner, trained: bool = True) -> dict:
    loss = float(r.loss)
    if trained and not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return dict(tokens=r.tokens, param_mb=r.param_mb, loss=loss)


def measure_gpu(model: str, fmt: str, args, device, dtype) -> dict:
    """One format alone on the GPU, so that its peak memory is its own."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = Runner(model, fmt, args, device, dtype)
    for _ in range(args.warmup):
        r.train_step()
    train = [_time_once(r.train_step) for _ in range(args.steps)]
    train_peak = torch.cuda.max_memory_allocated() / 2**20
    r.drop_optimizer()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        r.infer_step()
    infer = [_time_once(r.infer_step) for _ in range(args.steps)]
    infer_peak = torch.cuda.max_memory_allocated() / 2**20
    return dict(_summary(train, infer), **_finished(r), train_peak_mb=train_peak, infer_peak_mb=infer_peak)


def measure_cpu(model: str, formats: list[str], args, device, dtype) -> dict[str, dict]:
    """All formats of one model side by side, their steps taking turns (so that the load of
    other processes on a shared CPU falls on all of them alike). {fmt: result or error row}."""
    runners, out = {}, {}
    for fmt in formats:
        try:
            runners[fmt] = Runner(model, fmt, args, device, dtype)
        except ImportError as e:
            out[fmt] = dict(status="skipped", reason=f"models unavailable: {e}")
        except ValueError as e:  # e.g. a block size that does not divide a width
            out[fmt] = dict(status="skipped", reason=str(e).splitlines()[0][:160])
        except WrongOutput as e:
            out[fmt] = dict(status="wrong", reason=str(e)[:160])
    names = list(runners)
    times = {n: {"train": [], "infer": []} for n in names}
    faults = {n: {"train": [], "infer": []} for n in names}
    for phase in args.phases:
        for n in names:
            for _ in range(args.warmup):
                getattr(runners[n], f"{phase}_step")()
        for step in range(args.steps):
            for n in names[step % max(len(names), 1):] + names[:step % max(len(names), 1)]:
                f0 = _minor_faults()
                times[n][phase].append(_time_once(getattr(runners[n], f"{phase}_step")))
                faults[n][phase].append(_minor_faults() - f0)
        if phase == "train" or "train" not in args.phases:
            for r in runners.values():
                r.drop_optimizer()
    for n in names:
        out[n] = dict(_summary(times[n]["train"], times[n]["infer"]), **_finished(runners[n], "train" in args.phases),
                      train_peak_mb=math.nan, infer_peak_mb=math.nan, status="ok", reason=_faults_note(faults[n]))
    return out


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_note(faults: dict) -> str:
    """The median minor page faults of a timed step, per phase: on CPU a step's time follows
    them (fresh pages from the OS, ~2 us each on the EPYC VMs here), and they depend on the
    process's allocation history, so they explain a part of the spread between runs."""
    def count(v):
        m = statistics.median(v)
        return f"{m / 1e3:.0f}k" if m >= 10_000 else f"{m:.0f}"
    parts = [f"{phase} {count(v)}" for phase, v in faults.items() if v]
    return ("minor faults a step: " + ", ".join(parts)) if parts else ""


def _target_line(rows, gpu, dtype, args) -> str:
    vit = [r for r in rows if r["model"] == "vit-b16" and r["format"] != "dense"
           and math.isfinite(r.get("x_dense_train") or math.nan)]
    if not vit:
        return "Not measured here."
    best = max(vit, key=lambda r: r["x_dense_train"])
    verdict = "met" if best["x_dense_train"] >= 1.3 else f"missed ({best['x_dense_train'] / 1.3:.0%} of it)"
    where = "" if (gpu and dtype == torch.bfloat16 and not args.quick) else " - not the target's setting (H100, bf16, full size)"
    return f"Best sparse format here: {best['format']} at {best['x_dense_train']:.2f}x: {verdict}{where}."


def _cpu_target_line(rows, args) -> str:
    """Issue 14's CPU targets at batch 1: ViT-B/16 training step >= 1.5x dense, ViT-B/16 and
    BERT-base inference >= 2x dense; the best sparse format of each, with its verdict."""
    if args.quick or args.batch != 1:
        return ""
    parts = []
    for model, phase, target in (("vit-b16", "train", 1.5), ("vit-b16", "infer", 2.0), ("bert-base", "infer", 2.0)):
        got = [r for r in rows if r["model"] == model and r["format"] != "dense"
               and math.isfinite(r.get(f"x_dense_{phase}") or math.nan)]
        if got:
            best = max(got, key=lambda r: r[f"x_dense_{phase}"])
            x = best[f"x_dense_{phase}"]
            parts.append(f"{model} {'training step' if phase == 'train' else 'inference'} >= {target}x: "
                         f"{best['format']} {x:.2f}x ({'met' if x >= target else 'missed'})")
    return "CPU targets (issue 14, batch 1): " + ("; ".join(parts) if parts else "not measured here") + "."


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--formats", default="dense,fanin,diag16,diag16-fused,diag1,csr", help=f"comma list of {FORMATS}")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=None, help="images / sequences per step (GPU 256, CPU 1)")
    p.add_argument("--seq", type=int, default=None, help="BERT / GPT-2 sequence length (128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (GPU 20, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 1)")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--autocast", choices=["bf16"], default=None,
                   help="run forward and loss under torch.autocast in bf16 (the model stays fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="CPU: wall (perf_counter) or cpu (process CPU time, for a CPU shared with other jobs)")
    p.add_argument("--infer-only", action="store_true",
                   help="CPU: time inference only (no training steps; a loaded CPU then needs ~1/4 of the time)")
    p.add_argument("--quick", action="store_true", help="micro models, CPU-sized (pipeline check)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    args.autocast = torch.bfloat16 if args.autocast == "bf16" else None
    device = common.device()
    gpu = device.type == "cuda"
    if args.infer_only and gpu:
        p.error("--infer-only is for CPU runs")
    args.phases = ("infer",) if args.infer_only else ("train", "infer")
    if args.clock == "cpu" and gpu:
        p.error("--clock cpu is for CPU runs")
    global _clock
    _clock = CLOCKS[args.clock]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [m for m in args.models if m not in MODELS] + [f for f in args.formats if f not in FORMATS]
    if bad:
        p.error(f"unknown model/format {bad}; models {MODELS}, formats {FORMATS}")
    if "dense" not in args.formats:
        args.formats.insert(0, "dense")
    args.batch = args.batch or (4 if args.quick else (256 if gpu else 1))
    args.seq = args.seq or (16 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else (20 if gpu else 3))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or not gpu else 5)
    dtype = common.parse_dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    if not gpu and not args.quick:
        log("no GPU: full-size models on CPU are slow (batch 1 by default); use --quick for the pipeline check")
    # e2e on CPU runs the torch paths, not the interpreter: its results go to "cpu"
    out = args.out or (common.RESULTS / ("quick" if args.quick else (rt.device_key() if gpu else "cpu")))
    out.mkdir(parents=True, exist_ok=True)
    head = common.header()
    head.pop("note", None)  # the sparse layers run their torch path on CPU, not the interpreter
    if not gpu:
        head.pop("table", None)  # no Triton launch on CPU: the tuned table plays no part
        head["timing"] = ("median (ms) of " + ("perf_counter" if args.clock == "wall" else
                          "process CPU time (time.process_time)") + f", {torch.get_num_threads()} thread(s)")
        native = kernels.cpu.lib()
        head["native_cpu"] = (f"{kernels.cpu.loaded_variant()} build of kernels/cpu" if native is not None
                              else f"unavailable ({kernels.cpu.error()}): the sparse layers ran torch's path")
        head["training_step"] = ("sparse products through kernels/cpu (kernels.cpu.csr_matmul, kernels.cpu.sddmm)"
                                 if native is not None else "sparse products through torch (MKL)")
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    previous = kernels.runtime.checks_enabled()
    kernels.set_checks(False)  # per-call index checks synchronise; the layers check on mask change
    rows = []

    def record(model, fmt, result):  # on a GPU each format as it finishes: a phase cut short keeps them
        row = dict(run=run_id, device=head.get("gpu") if gpu else "cpu", model=model,
                   preset="micro" if args.quick else ("vit-b/16 mlp" if model == "mlp" else "small" if model == "gpt2-small" else "base"),
                   format=fmt, sparsity=0.0 if fmt == "dense" else args.sparsity, batch=args.batch,
                   dtype=str(dtype).removeprefix("torch.") + (" + autocast bf16" if args.autocast else ""), **result)
        rows.append(row)
        log(f"[e2e] {model:<9} {fmt:<12} {row['status']:<7} train {common.fmt(row.get('train_ms'))} ms  "
            f"infer {common.fmt(row.get('infer_ms'))} ms  peak {common.fmt(row.get('train_peak_mb'))} MB"
            + (f"  ({row['reason']})" if row["reason"] else ""))

    try:
        for model in args.models:
            if not gpu:
                results = measure_cpu(model, args.formats, args, device, dtype)
                for fmt in args.formats:
                    record(model, fmt, results[fmt])
                continue
            for fmt in args.formats:
                try:
                    result = dict(measure_gpu(model, fmt, args, device, dtype), status="ok", reason="")
                except ImportError as e:
                    result = dict(status="skipped", reason=f"models unavailable: {e}")
                except torch.cuda.OutOfMemoryError:
                    result = dict(status="oom", reason="out of GPU memory")
                except ValueError as e:  # e.g. a block size that does not divide a width
                    result = dict(status="skipped", reason=str(e).splitlines()[0][:160])
                except WrongOutput as e:
                    result = dict(status="wrong", reason=str(e)[:160])
                except Exception as e:  # noqa: BLE001 - record it, go on with the other formats
                    result = dict(status="error", reason=f"{type(e).__name__}: {str(e)[:160]}")
                torch.cuda.empty_cache()
                record(model, fmt, result)
    finally:
        kernels.set_checks(previous)
    for r in rows:
        base = next((d for d in rows if d["model"] == r["model"] and d["format"] == "dense" and d["status"] == "ok"),
                    None)
        if base and r["status"] == "ok":
            r["x_dense_train"] = base["train_ms"] / r["train_ms"]
            r["x_dense_infer"] = base["infer_ms"] / r["infer_ms"]
    common.append_csv(out / "e2e.csv", rows, FIELDS)
    md = [f"# End to end: training step and inference at {args.sparsity:.0%} sparsity vs dense", ""]
    if args.quick:
        md += ["> **--quick: micro models on CPU, a pipeline check; these are not the ViT-B/BERT-base figures.**", ""]
    md += [common.header_markdown(head), "",
           f"batch {args.batch}, BERT / GPT-2 sequence {args.seq}, {args.steps} timed steps after {args.warmup} warm-up, "
           f"{str(dtype).removeprefix('torch.')}{' under bf16 autocast' if args.autocast else ''}. x dense = dense time / sparse time; diag<b>-fused = the diag<b> "
           "layers with each MLP as one kernels.fused_mlp call (compare with the diag<b> row). Peak memory: "
           + ("torch.cuda.max_memory_allocated." if gpu else "not available on CPU (param MB = parameters + buffers)."),
           "", "Target (H100 bf16): ViT-B training step >= 1.3x dense. " + _target_line(rows, gpu, dtype, args), "",
           *(() if gpu or not _cpu_target_line(rows, args) else (_cpu_target_line(rows, args), "")),
           common.md_table(rows, [("model", "model"), ("preset", "size"), ("format", "format"), ("status", "status"),
                                  ("tokens", "tokens/step"), ("train_ms", "train ms"), ("x_dense_train", "x dense"),
                                  ("infer_ms", "infer ms"), ("x_dense_infer", "x dense"),
                                  ("train_peak_mb", "train peak MB"), ("infer_peak_mb", "infer peak MB"),
                                  ("param_mb", "param MB"), ("reason", "note")]), ""]
    (out / "e2e.md").write_text("\n".join(md) + "\n")
    log(f"[out] {out}/e2e.md, e2e.csv")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
