"""CPU attention: torch's scaled_dot_product_attention (its CPU flash kernel) against the models'
bmm path (models/attention.py), forward (inference) and forward + backward (training), at the
attention shapes of ViT-B/16, BERT-base and GPT-2 small, bf16 by default.

    python bench/cpu_attention.py --threads 1 --clock cpu
    python bench/cpu_attention.py --threads 1 --clock cpu --dtype float32
    python bench/cpu_attention.py --quick                                    # tiny, for the tests

Each path's output and qkv gradient are checked against fp64 first (bench.common.gate: within 2x
torch's error at the dtype + atol). Timing as bench/cpu_infer.py: the two paths take turns round
after round, the figure the median over rounds; "x sdpa" = torch's time / the bmm path's, side
by side in one process. FLOP/s counts 4 N^2 D per head forward (two GEMMs; causal counted full)
and 2.5x that forward + backward (the backward's four GEMMs and the bmm path's recomputed one
are not told apart). "auto" says which path models.attention's "auto" takes for that shape here.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.cpu_infer import CLOCKS, cpu_header  # noqa: E402
from models import attention  # noqa: E402

# name: (batch, tokens, heads, head dim, causal) - the models' attention at e2e's CPU batch sizes
SHAPES = {
    "vit-b16 b8": (8, 197, 12, 64, False),
    "vit-b16 b32": (32, 197, 12, 64, False),
    "bert-base b8": (8, 128, 12, 64, False),
    "gpt2-small b8": (8, 128, 12, 64, True),
    "512 tokens b2": (2, 512, 12, 64, False),
    "1024 tokens b1": (1, 1024, 12, 64, False),
    "gpt2-small 1024 b1": (1, 1024, 12, 64, True),
    "vit-tiny b128": (128, 17, 4, 16, False),      # the trainers' CPU defaults (MNIST ViT, pydoc BERT / GPT)
    "bert-tiny b32": (32, 64, 2, 64, False),
    "gpt-tiny b32": (32, 64, 2, 64, True),
}
QUICK_SHAPES = {"quick": (2, 17, 2, 8, False), "quick causal": (1, 9, 2, 8, True)}
FIELDS = ["run", "threads", "load_avg", "shape", "batch", "tokens", "heads", "head_dim", "causal", "dtype", "mode",
          "backend", "auto", "ms_per_call", "ms_q1", "ms_q3", "ms_min", "gflops", "x_sdpa", "max_err", "err_bound"]
BACKENDS = ("sdpa", "bmm")


def _call(backend: str, qkv: torch.Tensor, heads: int, causal: bool, dy: torch.Tensor | None):
    """One forward (dy None, under inference_mode) or forward + backward of ``backend``."""
    if dy is None:
        with torch.inference_mode():
            return attention.self_attention(qkv, heads, causal=causal, backend=backend), None
    x = qkv.detach().requires_grad_()
    y = attention.self_attention(x, heads, causal=causal, backend=backend)
    y.backward(dy)
    return y, x.grad


def check(qkv, heads: int, causal: bool, dy) -> dict[str, tuple[float, float]]:
    """{backend: (max error, bound)} over the output and the qkv gradient against fp64; raises
    AssertionError naming the path that fails bench.common.gate."""
    truth = _call("sdpa", qkv.double(), heads, causal, dy.double())
    torchs = _call("sdpa", qkv, heads, causal, dy)
    out = {}
    for backend in BACKENDS:
        got = _call(backend, qkv, heads, causal, dy)
        worst = (0.0, 0.0)
        for what, a, ref, lowp in zip(("output", "qkv gradient"), got, truth, torchs):
            ok, err, bound, why = common.gate(a, ref, lowp)
            if not ok:
                raise AssertionError(f"{backend} {what}: {why}")
            worst = max(worst, (err, bound))
        out[backend] = worst
    return out


def _time_calls(fn, calls: int) -> float:
    t0 = _clock()
    for _ in range(calls):
        fn()
    return (_clock() - t0) / calls * 1e3


def measure(fns: dict, rounds: int, round_ms: float) -> dict[str, list[float]]:
    """Per-call milliseconds of each function, one sample per round, the functions interleaved."""
    names = list(fns)
    calls = {}
    for n in names:
        fns[n]()
        one = statistics.median(_time_calls(fns[n], 1) for _ in range(3))
        calls[n] = max(1, min(1000, round(round_ms / max(one, 1e-3))))
    per_call = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            per_call[n].append(_time_calls(fns[n], calls[n]))
    return per_call


_clock = time.perf_counter


def run_one(args, threads: int, run_id: str, dtype: torch.dtype, shapes: dict, log=print) -> list[dict]:
    torch.set_num_threads(threads)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name, (B, N, H, D, causal) in shapes.items():
        g = torch.Generator().manual_seed(args.seed)
        qkv = torch.randn(B, N, 3 * H * D, generator=g).to(dtype)
        dy = torch.randn(B, N, H * D, generator=g).to(dtype)
        errors = check(qkv, H, causal, dy)
        auto = attention.backend_for(qkv)
        for mode, grad in (("forward", None), ("forward + backward", dy)):
            fns = {b: (lambda b=b: _call(b, qkv, H, causal, grad)) for b in BACKENDS}
            per_call = measure(fns, args.rounds, args.round_ms)
            med = {b: statistics.median(v) for b, v in per_call.items()}
            flop = 4 * B * H * N * N * D * (1 if grad is None else 2.5)
            for b in BACKENDS:
                q = statistics.quantiles(per_call[b], n=4) if len(per_call[b]) >= 2 else [med[b]] * 3
                rows.append(dict(run=run_id, threads=threads, load_avg=load, shape=name, batch=B, tokens=N, heads=H,
                                 head_dim=D, causal=causal, dtype=str(dtype).removeprefix("torch."), mode=mode,
                                 backend=b, auto=auto, ms_per_call=med[b], ms_q1=q[0], ms_q3=q[2],
                                 ms_min=min(per_call[b]), gflops=flop / med[b] / 1e6,
                                 x_sdpa=med["sdpa"] / med[b], max_err=errors[b][0], err_bound=errors[b][1]))
            log(f"  {name:<20} {mode:<19} sdpa {med['sdpa']:8.2f} ms   bmm {med['bmm']:8.2f} ms   "
                f"x sdpa {med['sdpa'] / med['bmm']:5.2f}   (auto: {auto})")
    return rows


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all)")
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default: torch's)")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (median over them)")
    p.add_argument("--round-ms", type=float, default=300.0, help="time spent on each path per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: perf_counter; cpu: the thread's CPU time (for a CPU shared with other jobs)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (tests)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/cpu_attention)")
    args = p.parse_args(argv)
    shapes = SHAPES
    if args.quick:
        shapes, args.rounds, args.round_ms = QUICK_SHAPES, 2, 2.0
    elif args.shapes:
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            p.error(f"unknown --shapes {unknown}; choose from {list(SHAPES)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.rounds < 1 or args.round_ms <= 0:
        p.error("--rounds must be >= 1 and --round-ms > 0")
    out = args.out or Path(__file__).resolve().parent / "results" / "cpu_attention"
    out.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    dtype = getattr(torch, args.dtype)
    head = cpu_header(args)
    head["amx"] = attention._amx_cpu()
    global _clock
    _clock = CLOCKS[args.clock]
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    rows = []
    try:
        for t in threads:
            log(f"threads={t}")
            rows += run_one(args, t, run_id, dtype, shapes, log)
    finally:
        torch.set_num_threads(head["cpu_threads"])
    stem = f"cpu_attention_{args.dtype}"
    common.append_csv(out / f"{stem}.csv", rows, FIELDS)
    md = [f"# CPU attention in {args.dtype}: torch's scaled_dot_product_attention vs the models' bmm path", "",
          common.header_markdown(head), "",
          "x sdpa = torch's time / the bmm path's, side by side in one process (q1 / q3: quartiles over "
          "rounds). GFLOP/s: 4 N^2 D a head forward, 2.5x that forward + backward (causal counted full). "
          "Errors: the larger of output and qkv gradient against fp64 (max abs), with the gate's bound. "
          "auto: the path models.attention's \"auto\" takes for the shape on this CPU.", ""]
    for t in threads:
        md += [f"## {t} thread(s)", "",
               common.md_table([r for r in rows if r["threads"] == t],
                               [("shape", "shape"), ("causal", "causal"), ("mode", "mode"), ("backend", "path"),
                                ("ms_per_call", "ms / call"), ("ms_q1", "q1"), ("ms_q3", "q3"),
                                ("gflops", "GFLOP/s"), ("x_sdpa", "x sdpa"), ("max_err", "max err"),
                                ("err_bound", "bound"), ("auto", "auto")]), ""]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    log(f"[out] {out}/{stem}.md, {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
