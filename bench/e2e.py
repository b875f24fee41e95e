"""End to end: ViT-B/16 and BERT-base, a training step and inference, sparse vs dense - step
time and peak memory.

    python bench/e2e.py                                   # GPU: ViT-B/16 batch 256, BERT-base 256 x 128
    python bench/e2e.py --models vit-b16 --formats dense,diag16 --batch 128
    python bench/e2e.py --quick                           # CPU: micro models, pipeline check

Models come from ``models`` (ViT / Bert with a ``linear`` factory that makes qkv, attention
out, fc1 and fc2 sparse at ``--sparsity``; patch / token embeddings, norms and heads stay
dense). If ``models`` cannot be imported, those rows are reported as skipped and only the
``mlp`` row runs: one ViT-B/16 MLP block, x + fc2(gelu(fc1(LN(x)))) on 197 tokens per image,
built here from the ``kernels`` layers - the part of the network sparsity changes most.

Formats: dense (nn.Linear), fanin (FanInLinear, SRigL), diag<b> (DiagLinear with block b,
DynaDiag), csr (SparseLinear, unstructured). A training step is zero_grad, forward, loss,
backward, AdamW step; inference is a forward under inference_mode. Both are timed per step
after warm-up (device synchronised), median over steps. Peak memory is
torch.cuda.max_memory_allocated on a GPU; on CPU there is no allocator statistic and only the
parameter + buffer bytes are reported. Everything runs in one dtype (bf16 on a GPU), no
autocast: the sparse ops take values and activations of one dtype. BERT's loss covers every
position (the model's LM head computes logits for all tokens).
"""
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from bench import common  # noqa: E402
from kernels import runtime as rt  # noqa: E402

MODELS = ("vit-b16", "bert-base", "mlp")
FORMATS = ("dense", "fanin", "diag1", "diag16", "diag64", "csr")
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
            return kernels.DiagLinear(n_in, n_out, density=density, block_size=int(fmt[4:]), **kw)
        if fmt == "csr":
            return kernels.SparseLinear(n_in, n_out, density=density, **kw)
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")

    return linear


class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(LN(x)))): a transformer MLP block from the kernels layers."""

    def __init__(self, dim: int, hidden: int, linear):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = linear("fc1", dim, hidden, True)
        self.fc2 = linear("fc2", hidden, dim, True)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def build(model: str, fmt: str, args, device, dtype):
    """(module, make_batch() -> inputs, loss_fn(out, targets), tokens per batch)."""
    linear = linear_factory(fmt, args.sparsity, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    B = args.batch
    if model == "mlp":
        dim, hidden, n_tok = (32, 64, 17) if args.quick else (768, 3072, 197)
        with torch.device(device):
            net = MLPBlock(dim, hidden, linear)
        x = torch.randn(B, n_tok, dim, generator=g).to(device, dtype)
        target = torch.randn(B, n_tok, dim, generator=g).to(device, dtype)
        return net.to(dtype), (x,), target, lambda out, t: F.mse_loss(out.float(), t.float()), B * n_tok
    if model == "vit-b16":
        from models.vit import ViT, ViTConfig

        cfg = ViTConfig.preset("micro" if args.quick else "base")
        with torch.device(device):
            net = ViT(cfg, linear=linear)
        images = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
        labels = torch.randint(0, cfg.num_classes, (B,), generator=g).to(device)
        n_tok = (cfg.image_size // cfg.patch_size) ** 2 + 1
        return net.to(dtype), (images,), labels, lambda out, t: F.cross_entropy(out.float(), t), B * n_tok
    if model == "bert-base":
        from models.bert import Bert, BertConfig

        small = {"vocab_size": 512} if args.quick else {}
        cfg = BertConfig.preset("micro" if args.quick else "base", max_len=max(args.seq, 8), **small)
        with torch.device(device):
            net = Bert(cfg, linear=linear)
        ids = torch.randint(0, cfg.vocab_size, (B, args.seq), generator=g).to(device)
        labels = torch.randint(0, cfg.vocab_size, (B, args.seq), generator=g).to(device)

        def loss_fn(out, t):
            return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), t.reshape(-1))
        return net.to(dtype), (ids,), labels, loss_fn, B * args.seq
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


def _timed(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    common.synchronize()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        common.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def measure(model: str, fmt: str, args, device, dtype) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    net, inputs, target, loss_fn, tokens = build(model, fmt, args, device, dtype)
    param_mb = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers())) / 2**20
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    losses = []

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(*inputs), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    net.train()
    train = _timed(train_step, args.steps, args.warmup)
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    opt.zero_grad(set_to_none=True)
    del opt
    net.eval()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        infer = _timed(lambda: net(*inputs), args.steps, args.warmup)
    infer_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    tq, iq = _quartiles(train), _quartiles(infer)
    return dict(tokens=tokens, train_ms=statistics.median(train), train_q1=tq[0], train_q3=tq[1],
                infer_ms=statistics.median(infer), infer_q1=iq[0], infer_q3=iq[1],
                train_peak_mb=train_peak, infer_peak_mb=infer_peak, param_mb=param_mb, loss=loss)


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--formats", default="dense,fanin,diag16,diag1,csr", help=f"comma list of {FORMATS}")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=None, help="images / sequences per step (GPU 256, CPU 1)")
    p.add_argument("--seq", type=int, default=None, help="BERT sequence length (128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (GPU 20, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 1)")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="micro models, CPU-sized (pipeline check)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    device = common.device()
    gpu = device.type == "cuda"
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
    out = args.out or (common.RESULTS / ("quick" if args.quick else rt.device_key()))
    out.mkdir(parents=True, exist_ok=True)
    head = common.header()
    head.pop("note", None)  # the sparse layers run their torch path on CPU, not the interpreter
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    previous = kernels.runtime.checks_enabled()
    kernels.set_checks(False)  # per-call index checks synchronise; the layers check on mask change
    rows = []
    try:
        for model in args.models:
            for fmt in args.formats:
                row = dict(run=run_id, device=head.get("gpu") if gpu else "cpu", model=model,
                           preset="micro" if args.quick else ("vit-b/16 mlp" if model == "mlp" else "base"), format=fmt,
                           sparsity=0.0 if fmt == "dense" else args.sparsity, batch=args.batch,
                           dtype=str(dtype).removeprefix("torch."))
                try:
                    row.update(measure(model, fmt, args, device, dtype), status="ok", reason="")
                except ImportError as e:
                    row.update(status="skipped", reason=f"models unavailable: {e}")
                except torch.cuda.OutOfMemoryError:
                    row.update(status="oom", reason="out of GPU memory")
                except ValueError as e:  # e.g. a block size that does not divide a width
                    row.update(status="skipped", reason=str(e).splitlines()[0][:160])
                rows.append(row)
                log(f"[e2e] {model:<9} {fmt:<6} {row['status']:<7} train {common.fmt(row.get('train_ms'))} ms  "
                    f"infer {common.fmt(row.get('infer_ms'))} ms  peak {common.fmt(row.get('train_peak_mb'))} MB"
                    + (f"  ({row['reason']})" if row["reason"] else ""))
                if gpu:
                    torch.cuda.empty_cache()
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
           f"batch {args.batch}, BERT sequence {args.seq}, {args.steps} timed steps after {args.warmup} warm-up, "
           f"{str(dtype).removeprefix('torch.')}. x dense = dense time / sparse time. Peak memory: "
           + ("torch.cuda.max_memory_allocated." if gpu else "not available on CPU (param MB = parameters + buffers)."),
           "", "Target (H100 bf16): ViT-B training step >= 1.3x dense.", "",
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
