"""CPU online inference: the condensed fan-in and diagonal layers at batch 1 against a dense
nn.Linear and torch.sparse CSR, by default Linear(3072 -> 768) at 90% sparsity (SRigL's CPU
setting; its claim: 3.4x dense, 2.5x CSR).

    python bench/cpu_infer.py                    # 3072 -> 768, 90%, batch 1, all cores torch uses
    python bench/cpu_infer.py --threads 1,2      # one table per thread count
    python bench/cpu_infer.py --quick            # tiny, for the tests
    python bench/cpu_infer.py --threads 1 --clock cpu   # on a CPU shared with other jobs
    python bench/cpu_infer.py --threads 1 --clock cpu --precision bf16 --batch 32   # bf16 table

Every variant's output is checked against the dense nn.Linear of the same weights before it
is timed. Timing: the variants take turns, round after round (so drift and the load of other
processes fall on all of them alike); each round times back-to-back calls for about
``--round-ms``; the figure is the median over rounds of the time per call. Ratio = baseline
time / variant time. Each variant is ``--copies`` distinct layers (default 8) called in turn,
as a model's consecutive layers are: one layer called back to back keeps its ~2 MB sparse
weight in the core's L2 cache, which a real forward pass does not (``--copies 1`` measures
that hot case). The library layers run their CPU path (``SparseLayer.cpu_inference``): with no
gradient, in fp32, the native library's product (kernels/cpu: a CSR with 2-byte column indices,
a BSR of the b x b blocks for block diagonals at batch 1) on a copy of the weight made at the
first call; the "(torch path)" rows are the same layers with it switched off
(``kernels.cpu.disabled()``): one MKL addmv / addmm on a cached CSR / BSR, the fallback. Per-call
index checks are off (the layers validate indices when the pattern changes).

Variants:
    dense nn.Linear          the baseline (MKL GEMV)
    CSR prebuilt             a torch.sparse CSR tensor built once, addmv at batch 1 (its
                             fastest form; torch.sparse.mm otherwise): the CSR baseline
    fan-in (condensed)       kernels.FanInLinear
    diagonal b=1, 16, 64     kernels.DiagLinear (several tokens, 8 | b: the block product bsr_matmul)
    SparseLinear             kernels.SparseLinear (unstructured)
    ... (torch path)         fan-in, b=1, b=16, SparseLinear on torch's MKL path instead of the
                             native library
    ... (product alone)      fan-in and b=16: the native product alone on the layer's weight
                             copy (no layer forward around it): the gap is per-call Python
    diagonal b=16 (elements' CSR, product alone)  --batch > 1: the b=16 layer's elements as a
                             CSR (kernels.cpu's element product, the layer's path before the
                             block products), the product alone
    gather (inline)          the library's condensed formulation written inline,
                             (x[:, idx] * v).sum(-1), int64 indices made once: the gap to
                             "fan-in" is op and wrapper overhead
    index_select (inline)    the same product as one 1-D x.index_select(1, idx_int32) over
                             [T, out * k], times v, summed over k: a faster plain-torch form
    index_select (torch.compile)  that, compiled by inductor (skipped with --quick or when
                             compilation fails)
    embedding_bag (inline)   the same product as F.embedding_bag(idx, x^T, per_sample_weights=v):
                             a weighted sum of T-long rows per nonzero (for --batch > 1)

``--precision bf16``: the baseline is the dense nn.Linear cast to bf16 (torch's bf16 GEMM: oneDNN,
with AVX-512-BF16 / AMX where the CPU has them), side by side with dense fp32 (column "x dense
fp32"), CSR in fp32, the fp32 fan-in and b = 16 layers, and every format cast to bf16 (fan-in,
diagonals b = 1 / 16 / 64, unstructured: the native library's bf16 products, bf16 weights and
fp32 sums). A bf16 output is checked against the fp64 product of its bf16-rounded operands: at
most 2x the error of torch's dense bf16 product plus 1e-2 (bench.common.gate).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
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

FIELDS = ["run", "threads", "load_avg", "in_features", "out_features", "sparsity", "batch", "copies", "variant", "params",
          "us_per_call", "us_q1", "us_q3", "us_min", "x_dense", "x_csr", "x_dense_min", "x_csr_min", "max_err"]
FIELDS_BF16 = FIELDS[:FIELDS.index("x_csr")] + ["x_dense_fp32"] + FIELDS[FIELDS.index("x_csr"):]


class _InlineGather(nn.Module):
    """The condensed fan-in product inline. ``flat``: one 1-D index_select over the int32
    indices, [T, out * k] (then multiply and sum over k); else 2-D advanced indexing with int64
    indices made once, as the library's CPU path does."""

    def __init__(self, layer: kernels.FanInLinear, flat: bool):
        super().__init__()
        self.flat = flat
        self.idx = layer.indices.reshape(-1) if flat else layer.indices.long()
        self.rows = layer.rows.long()
        self.values = layer.values.detach()
        self.bias = layer.bias.detach()
        self.out_features = layer.out_features
        self.full = bool(self.rows.numel() == self.out_features)

    def forward(self, x):
        if self.flat:
            xg = x.index_select(1, self.idx).view(x.shape[0], *self.values.shape)  # [T, rows, k]
        else:
            xg = x[:, self.idx]
        y = (xg * self.values).sum(-1)
        if not self.full:
            y = x.new_zeros(x.shape[0], self.out_features).index_copy_(1, self.rows, y)
        return y + self.bias


class _EmbeddingBag(nn.Module):
    """The condensed fan-in product as F.embedding_bag over x^T: output row r sums
    v[r, j] * x^T[idx[r, j], :] - one weighted sum of T-long rows per nonzero, nothing
    materialised. Slow at T = 1 (rows of one float), fast for T in the tens and up."""

    def __init__(self, layer: kernels.FanInLinear):
        super().__init__()
        n_rows, k = layer.indices.shape
        self.idx = layer.indices.reshape(-1).long()
        self.offsets = torch.arange(0, n_rows * k, k, dtype=torch.long)
        self.values = layer.values.detach().reshape(-1)
        self.rows = layer.rows.long()
        self.bias = layer.bias.detach()
        self.out_features = layer.out_features

    def forward(self, x):
        yt = F.embedding_bag(self.idx, x.t().contiguous(), self.offsets, mode="sum",
                             per_sample_weights=self.values)  # [rows, T]
        y = x.new_zeros(x.shape[0], self.out_features)
        y[:, self.rows] = yt.t()
        return y + self.bias


class _PrebuiltCSR(nn.Module):
    """torch.sparse CSR of a layer's weight, built once (torch's int64 indices), in its fastest
    form: one addmv (b + W x) at batch 1, else (W x^T)^T + b."""

    def __init__(self, layer: kernels.SparseLinear):
        super().__init__()
        self.w = layer.to_dense().to_sparse_csr()
        self.bias = layer.bias.detach()

    def forward(self, x):
        if x.shape[0] == 1:
            return torch.addmv(self.bias, self.w, x[0]).unsqueeze(0)
        return torch.sparse.mm(self.w, x.t()).t() + self.bias


class _TorchPath(nn.Module):
    """A library layer with the native CPU library switched off: torch's MKL path."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with kernels.cpu.disabled():
            return self.layer(x)


class _NativeCall(nn.Module):
    """The native library's product alone on the layer's weight copy, made once: at one token
    kernels.cpu.matvec with its plan (the allocation of y and the ctypes call), else
    kernels.cpu.matmul. The gap to the layer's row is the per-call Python of the layer (its
    forward and SparseLayer.cpu_inference: the checks and the watch of its tensors)."""

    def __init__(self, layer: nn.Module, tokens: int, elements: bool = False):
        super().__init__()
        b = getattr(layer, "block_size", 1)
        # as the layer's own path (one token: BSR; several: BSR for 8 | b, else the elements'
        # CSR), or with ``elements`` the elements' CSR for several tokens (the product before
        # the block products)
        several = tokens > 1 and not elements and b > 1 and kernels.cpu.block_products(b)
        with torch.no_grad():
            self.w = layer._inference_weight(layer.inference_values(), blocked=tokens == 1 or several, native=True,
                                             several=several)
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.plan = (kernels.cpu.matvec_plan(self.w, self.bias, torch.Size([1, layer.in_features]),
                                             (1, layer.out_features)) if tokens == 1 else None)

    def forward(self, x):
        if self.plan is not None:
            return kernels.cpu.matvec(self.plan, x)
        return kernels.cpu.matmul(self.w, x, self.bias)


class _RoundRobin(nn.Module):
    """Calls its modules in turn, one per call: ``copies`` distinct layers of a variant, as a
    model's consecutive layers are, so a layer's weights are no longer in the core's cache
    when its next call comes (one layer called back to back keeps a 2 MB sparse weight in L2,
    which flatters the small formats)."""

    def __init__(self, mods):
        super().__init__()
        self.mods = list(mods)
        self.i = 0

    def forward(self, x):
        self.i = (self.i + 1) % len(self.mods)
        return self.mods[self.i](x)


DENSE, CSR = "dense nn.Linear", "CSR prebuilt"
DENSE_BF16 = "dense nn.Linear bf16"


class _Cast(nn.Module):
    """A copy of a module in bf16. It is timed on a bf16 x, as a bf16 model's previous layer
    hands it over (a cast of x inside the timed call, ~3.8 us at batch 1 on the loaded EPYC,
    would be 4-9% of a sparse layer's call and <1% of a dense one's)."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.mod = copy.deepcopy(mod).to(torch.bfloat16)

    def forward(self, x):
        return self.mod(x.to(torch.bfloat16))


def _timed_input(mod: nn.Module, x: torch.Tensor, xb: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(what to time, its input): a bf16 variant's module on the bf16 x, the others on x."""
    if isinstance(mod, _RoundRobin) and isinstance(mod.mods[0], _Cast):
        return _RoundRobin(m.mod for m in mod.mods), xb
    if isinstance(mod, _Cast):
        return mod.mod, xb
    return mod, x


def build_bf16(n_in: int, n_out: int, sparsity: float, seed: int, tokens: int = 1
               ) -> dict[str, tuple[nn.Module, nn.Module, str]]:
    """The --precision bf16 variants: {variant: (module, its fp32 dense equivalent, pattern)}."""
    g = torch.Generator().manual_seed(seed)
    density = 1.0 - sparsity
    dense = nn.Linear(n_in, n_out)
    csr = kernels.SparseLinear(n_in, n_out, density=density, generator=g)
    fan = kernels.FanInLinear(n_in, n_out, density=density, generator=g)
    out = {DENSE: (dense, dense, f"{n_out}x{n_in} dense"),
           DENSE_BF16: (_Cast(dense), dense, f"{n_out}x{n_in} dense"),
           CSR: (_PrebuiltCSR(csr), csr.to_linear(), f"nnz={csr.nnz()}"),
           "fan-in (condensed) fp32": (fan, fan.to_linear(), f"k={fan.k}")}
    diags = {}
    for b in (1, 16, 64):
        if n_in % b == 0 and n_out % b == 0:
            diags[b] = kernels.DiagLinear(n_in, n_out, density=density, block_size=b, generator=g)
    if 16 in diags:
        out["diagonal b=16 fp32"] = (diags[16], diags[16].to_linear(), f"K={diags[16].num_diagonals}")
    out["fan-in (condensed) bf16"] = (_Cast(fan), fan.to_linear(), f"k={fan.k}")
    for b, d in diags.items():
        out[f"diagonal b={b} bf16"] = (_Cast(d), d.to_linear(), f"K={d.num_diagonals}")
    out["SparseLinear bf16"] = (_Cast(csr), csr.to_linear(), f"nnz={csr.nnz()}")
    return out


def check_bf16(name: str, mod: nn.Module, dense_eq: nn.Linear, x: torch.Tensor) -> float:
    """The max error of a variant's output; a bf16 one against the fp64 product of its bf16
    operands (2x torch's bf16 error + atol), an fp32 one against its fp32 dense equivalent."""
    y = mod(x)
    if y.dtype != torch.bfloat16:
        err = (y - dense_eq(x)).abs().max().item()
        if not torch.allclose(y, dense_eq(x), rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{name}: output differs from its dense equivalent by {err:.3e}")
        return err
    w, b, xb = (t.detach().to(torch.bfloat16) for t in (dense_eq.weight, dense_eq.bias, x))
    truth = xb.double() @ w.double().t() + b.double()
    ok, err, bound, why = common.gate(y, truth, xb @ w.t() + b)
    if not ok:
        raise AssertionError(f"{name}: {why}")
    return err


def build(n_in: int, n_out: int, sparsity: float, seed: int, compile_gather: bool, log=print, tokens: int = 1
          ) -> dict[str, tuple[nn.Module, nn.Module, str]]:
    """{variant: (module, its dense equivalent, pattern description)}."""
    g = torch.Generator().manual_seed(seed)
    density = 1.0 - sparsity
    dense = nn.Linear(n_in, n_out)
    csr = kernels.SparseLinear(n_in, n_out, density=density, generator=g)
    csr_dense = csr.to_linear()
    fan = kernels.FanInLinear(n_in, n_out, density=density, generator=g)
    fan_dense = fan.to_linear()
    out = {DENSE: (dense, dense, f"{n_out}x{n_in} dense"),
           CSR: (_PrebuiltCSR(csr), csr_dense, f"nnz={csr.nnz()}"),
           "fan-in (condensed)": (fan, fan_dense, f"k={fan.k}")}
    for b in (1, 16, 64):
        if n_in % b == 0 and n_out % b == 0:
            d = kernels.DiagLinear(n_in, n_out, density=density, block_size=b, generator=g)
            out[f"diagonal b={b}"] = (d, d.to_linear(), f"K={d.num_diagonals}")
    out["SparseLinear"] = (csr, csr_dense, f"nnz={csr.nnz()}")
    for name in ("fan-in (condensed)", "diagonal b=1", "diagonal b=16", "SparseLinear"):
        if name in out:
            layer, ref, params = out[name]
            out[f"{name} (torch path)"] = (_TorchPath(layer), ref, params)
    if kernels.cpu.lib() is not None:
        for name in ("fan-in (condensed)", "diagonal b=16"):
            if name in out:
                layer, ref, params = out[name]
                out[f"{name} (product alone)"] = (_NativeCall(layer, tokens), ref, params)
        if tokens > 1 and "diagonal b=16" in out:
            layer, ref, params = out["diagonal b=16"]
            out["diagonal b=16 (elements' CSR, product alone)"] = (_NativeCall(layer, tokens, elements=True), ref,
                                                                    params)
    out["gather (inline)"] = (_InlineGather(fan, flat=False), fan_dense, f"k={fan.k}")
    out["index_select (inline)"] = (_InlineGather(fan, flat=True), fan_dense, f"k={fan.k}")
    out["embedding_bag (inline)"] = (_EmbeddingBag(fan), fan_dense, f"k={fan.k}")
    if compile_gather:
        try:
            compiled = torch.compile(_InlineGather(fan, flat=True))
            with torch.inference_mode():
                compiled(torch.zeros(1, n_in))
            out["index_select (torch.compile)"] = (compiled, fan_dense, f"k={fan.k}")
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported platform: skip the variant
            log(f"index_select (torch.compile) skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return out


# --clock: wall time, or this thread's CPU time (on a CPU shared with busier processes the wall
# time of a call includes its waits in the run queue; the CPU time does not - it still includes
# what other processes do to the caches and the memory bus).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _time_calls(mod, x, calls: int) -> float:
    t0 = _clock()
    for _ in range(calls):
        mod(x)
    return (_clock() - t0) / calls * 1e6


def measure(variants, x, rounds: int, round_ms: float) -> dict[str, list[float]]:
    """Per-call microseconds of every variant, one sample per round, variants interleaved
    (bf16 variants on x in bf16, see _timed_input)."""
    names = list(variants)
    xb = x.to(torch.bfloat16)
    timed = {n: _timed_input(variants[n][0], x, xb) for n in names}
    calls = {}
    for n in names:
        one = statistics.median(_time_calls(*timed[n], 1) for _ in range(3))
        calls[n] = max(1, min(10_000, round(round_ms * 1e3 / max(one, 1e-3))))
    per_call = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            per_call[n].append(_time_calls(*timed[n], calls[n]))
    return per_call


def run_one(args, threads: int, run_id: str, log=print) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    bf16 = args.precision == "bf16"
    if args.copies > 1 and not args.quick and not bf16:
        log("index_select (torch.compile) left out: one compilation per copy")
    if bf16:
        sets = [build_bf16(args.in_features, args.out_features, args.sparsity, args.seed + 1000 * i, args.batch)
                for i in range(args.copies)]
    else:
        sets = [build(args.in_features, args.out_features, args.sparsity, args.seed + 1000 * i,
                      compile_gather=not args.quick and args.copies == 1, log=log, tokens=args.batch)
                for i in range(args.copies)]
    x = torch.randn(args.batch, args.in_features, generator=torch.Generator().manual_seed(args.seed + 1))
    errs = {}
    with torch.inference_mode():
        for variants in sets:
            for name, (mod, dense_eq, _) in variants.items():
                if bf16:
                    err = check_bf16(name, mod, dense_eq, x)
                else:
                    y, ref = mod(x), dense_eq(x)
                    err = (y - ref).abs().max().item()
                    if not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
                        raise AssertionError(f"{name}: output differs from its dense equivalent by {err:.3e}")
                errs[name] = max(err, errs.get(name, 0.0))
        variants = {name: (_RoundRobin(s[name][0] for s in sets) if args.copies > 1 else mod, ref, params)
                    for name, (mod, ref, params) in sets[0].items()}
        for mod, _, _ in variants.values():  # warm caches and lazy initialisation
            for _ in range(3 * args.copies):
                mod(x)
        per_call = measure(variants, x, args.rounds, args.round_ms)
    med = {n: statistics.median(v) for n, v in per_call.items()}
    best = {n: min(v) for n, v in per_call.items()}
    base = DENSE_BF16 if bf16 else DENSE
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan
    rows = []
    for name, (_, _, params) in variants.items():
        q = statistics.quantiles(per_call[name], n=4) if len(per_call[name]) >= 2 else [med[name]] * 3
        rows.append(dict(run=run_id, threads=threads, load_avg=load, in_features=args.in_features,
                         out_features=args.out_features, sparsity=args.sparsity, batch=args.batch, copies=args.copies,
                         variant=name, params=params, us_per_call=med[name], us_q1=q[0], us_q3=q[2],
                         us_min=best[name], x_dense=med[base] / med[name], x_csr=med[CSR] / med[name],
                         x_dense_min=best[base] / best[name], x_csr_min=best[CSR] / best[name],
                         max_err=errs[name], **({"x_dense_fp32": med[DENSE] / med[name]} if bf16 else {})))
    return rows


def add_layer_args(p: argparse.ArgumentParser, *, tokens: tuple[str, int], rounds: int, round_ms: float) -> None:
    """The options of a CPU layer benchmark (this one and bench/cpu_train.py): the layer, the token
    flag (name, default), threads, timing rounds, seed, clock, --quick."""
    p.add_argument("--in-features", type=int, default=3072)
    p.add_argument("--out-features", type=int, default=768)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument(tokens[0], type=int, default=tokens[1])
    p.add_argument("--threads", default=None, help="comma list of torch thread counts (default: torch's)")
    p.add_argument("--rounds", type=int, default=rounds, help="timing rounds (median over them)")
    p.add_argument("--round-ms", type=float, default=round_ms, help="time spent on each variant per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: perf_counter; cpu: the thread's CPU time (for a CPU shared with other jobs)")
    p.add_argument("--quick", action="store_true", help="tiny layer, few rounds (tests)")


def cpu_header(args) -> dict:
    """common.header() for a CPU benchmark: no Triton table, the timing mode, the native build and
    its optional kernels (or why there is none)."""
    head = common.header()
    for k in ("note", "table"):  # no Triton here: the CPU torch paths and the native library
        head.pop(k, None)
    head["timing"] = (f"median over {args.rounds} interleaved rounds of ~{args.round_ms:g} ms of calls "
                      f"({'perf_counter' if args.clock == 'wall' else 'thread CPU time (time.thread_time)'})")
    head["native_cpu"] = (f"{kernels.cpu.loaded_variant()} build of kernels/cpu, features "
                          f"{sorted(kernels.cpu.features()) or 'none'}" if kernels.cpu.lib() is not None
                          else f"unavailable ({kernels.cpu.error()}): the library layers ran torch's path")
    return head


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_args(p, tokens=("--batch", 1), rounds=31, round_ms=20.0)
    p.add_argument("--copies", type=int, default=8,
                   help="distinct layers per variant called in turn (1: one layer back to back, its "
                        "weights stay in the core's cache)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the layers cast to bf16 against dense bf16 (and fp32) side by side")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/cpu_infer)")
    args = p.parse_args(argv)
    if args.copies < 1:
        p.error(f"--copies must be >= 1, got {args.copies}")
    if args.quick:
        args.in_features, args.out_features, args.rounds, args.round_ms = 512, 128, 3, 2.0
        args.copies = min(args.copies, 2)
    out = args.out or (common.RESULTS / ("quick" if args.quick else "cpu_infer"))
    out.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    head = cpu_header(args)
    global _clock
    _clock = CLOCKS[args.clock]
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    previous = kernels.runtime.checks_enabled()
    kernels.set_checks(False)
    try:
        rows = []
        for t in threads:
            rows += run_one(args, t, run_id, log)
    finally:
        kernels.set_checks(previous)
        torch.set_num_threads(head["cpu_threads"])
    bf16 = args.precision == "bf16"
    stem = "cpu_infer_bf16" if bf16 else "cpu_infer"
    common.append_csv(out / f"{stem}.csv", rows, FIELDS_BF16 if bf16 else FIELDS)
    title = (f"# CPU inference{' in bf16' if bf16 else ''}: Linear({args.in_features} -> {args.out_features}) at "
             f"{args.sparsity:.0%} sparsity, batch {args.batch}, {args.copies} layer(s) per variant in turn")
    md = [title, "", common.header_markdown(head), "",
          "Ratio = time of the baseline / time of the variant, measured side by side in one process "
          "(q1 / q3: quartiles over rounds; min: the fastest round, the least disturbed by other "
          "processes). CSR = a torch.sparse CSR tensor built once. "
          + ("x dense = vs the dense layer in bf16 (torch's bf16 GEMM), x dense fp32 = vs the dense fp32 layer; "
             "bf16 rows: the layer cast to bf16 (bf16 weights and activations, fp32 sums)."
             if bf16 else "SRigL's CPU claim for this setting: 3.4x dense, 2.5x CSR."), ""]
    for t in threads:
        sub = [r for r in rows if r["threads"] == t]
        md += [f"## {t} thread(s) (1-min load average at the end: {sub[0]['load_avg']} on "
               f"{os.cpu_count()} cores)", "",
               common.md_table(sub, [("variant", "variant"), ("params", "pattern"), ("us_per_call", "us / call"),
                                     ("us_q1", "q1"), ("us_q3", "q3"), ("us_min", "min"),
                                     ("x_dense", "x dense bf16" if bf16 else "x dense")]
                               + ([("x_dense_fp32", "x dense fp32")] if bf16 else [])
                               + [("x_csr", "x CSR"), ("x_dense_min", "x dense (min)"),
                                  ("x_csr_min", "x CSR (min)")]),
               ""]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    for t in threads:
        log(f"threads={t}")
        for r in rows:
            if r["threads"] == t:
                log(f"  {r['variant']:<29} {r['us_per_call']:9.1f} us   x dense {r['x_dense']:6.2f}   "
                    f"x CSR {r['x_csr']:6.2f}   (min: {r['us_min']:9.1f} us, x dense {r['x_dense_min']:6.2f})")
    log(f"[out] {out}/{stem}.md, {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
