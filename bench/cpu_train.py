"""CPU training products: one layer's training step (forward, input gradient and weight gradient
at the stored elements) and the weight gradient alone (the SDDMM), fp32 and bf16, against the
dense layer in fp32 and in bf16 side by side; by default Linear(3072 -> 768) at 90% sparsity,
256 tokens (a ViT-B MLP's second layer over one image and a bit).

    python bench/cpu_train.py --threads 1 --clock cpu               # 3072 -> 768, 90%, 256 tokens
    python bench/cpu_train.py --threads 1 --clock cpu --tokens 32
    KERNELS_CPU_VARIANT=avx2 python bench/cpu_train.py --threads 1 --clock cpu   # the AVX2 anchor
    python bench/cpu_train.py --quick                               # tiny, for the tests
    python bench/cpu_train.py --threads 1 --clock cpu --checks off  # as the runs before 2026-12-07's (checks off)

Variants, each checked against fp64 before it is timed (bench.common.gate: fp32 at fp32
tolerance, bf16 within 2x torch's dense bf16 error + 1e-2):
    step  dense fp32 / bf16     nn.Linear forward + backward (dx and dW), bf16 under CPU autocast
    step  fan-in, diag b=16/64  kernels.FanInLinear / DiagLinear, the same, fp32 and under autocast
          diag b=1              (b = 1: DynaDiag's element diagonals, their CSR products and SDDMM)
                                (DiagLinear: the block products bsr_matmul / sddmm_blocks)
    step  diag b=16, elements   the same layer with the block products off (kernels.cpu.block_products
                                patched to False): its elements' CSR products, as before them
    dW    dense fp32 / bf16     dy^T x, the dense weight gradient (torch's GEMM: MKL / oneDNN)
    dW    SDDMM fan-in / b=16   kernels.cpu.sddmm at the layers' stored elements, fp32 and bf16
                                dy and x: sddmm_tiles_dpbf16 where kernels.cpu.features() has
                                "sddmm_dpbf16" (AVX-512-BF16), else bf16 widened into fp32 tiles
    dW    blocks b=16 / b=64    kernels.cpu.sddmm_blocks at the diagonals' block coordinates (bf16:
                                AMX tiles where features() has "amx", else AVX-512-BF16 where it
                                has "blocks_dpbf16" - as the step's bf16 block products - else
                                fp32 register tiles)
Timing as bench/cpu_infer.py: the variants take turns round after round, each round ~--round-ms
of back-to-back calls, the figure the median over rounds. x dense fp32 / x dense bf16: the dense
variant of the same kind (step or dW) / this one, measured in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from bench import common  # noqa: E402
from bench.cpu_infer import CLOCKS, add_layer_args, cpu_header  # noqa: E402
from kernels.diag import cpu as diag_cpu  # noqa: E402
from kernels.diag.pattern import element_coords, element_coords_sorted  # noqa: E402
FIELDS = ["run", "threads", "load_avg", "in_features", "out_features", "sparsity", "tokens", "kind", "variant",
          "kernel", "ms_per_call", "ms_q1", "ms_q3", "ms_min", "x_dense_fp32", "x_dense_bf16", "max_err"]


def _sddmm_kernel(dtype: torch.dtype, rows: torch.Tensor) -> str:
    """The element SDDMM kernels.cpu.sddmm takes for these coordinates' rows."""
    if kernels.cpu.lib() is None:
        return f"torch (no native library: {kernels.cpu.error()})"
    if dtype == torch.bfloat16 and "sddmm_dpbf16" in kernels.cpu.features():
        return "sddmm_tiles_dpbf16"
    r = rows.reshape(-1)
    by_row = r.numel() < 2 or bool((r[1:] >= r[:-1]).all())
    return (("sddmm_rows (fp32 tiles, row by row)" if by_row else "sddmm_tiles (fp32 tiles)")
            + (", bf16 widened" if dtype == torch.bfloat16 else ""))


def _blocks_dw_kernel(b: int, dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and b % 16 == 0 and "amx" in kernels.cpu.features():
        return "sddmm_blocks_amx (AMX tiles)"
    if dtype == torch.bfloat16 and b % 16 == 0 and "blocks_dpbf16" in kernels.cpu.features():
        return "sddmm_blocks_dpbf16 (AVX-512-BF16)"
    return "sddmm_blocks (fp32 register tiles" + (", bf16 widened)" if dtype == torch.bfloat16 else ")")


def _step_kernel(layer: nn.Module, dtype: torch.dtype, elements: bool, tokens: int) -> str:
    b = getattr(layer, "block_size", 1)
    if isinstance(layer, kernels.DiagLinear) and not elements and kernels.cpu.block_products(b):
        if dtype == torch.bfloat16 and b % 16 == 0 and "blocks_dpbf16" in kernels.cpu.features():
            mm = "bsr_matmul: bsr16_mm_dpbf16 (AVX-512-BF16)"
        else:
            mm = "bsr_matmul (fp32 register tiles" + (", bf16 widened)" if dtype == torch.bfloat16 else ")")
        return f"layer step: {mm}; dW " + _blocks_dw_kernel(b, dtype)
    if isinstance(layer, kernels.DiagLinear):  # (the layer's weight gradient takes its element coordinates,
        R, C, _, _ = layer.geometry                 # sorted by their separable side for b = 1 from 32 tokens)
        sort = b == 1 and tokens >= diag_cpu._SORTED_ELEMENTS_MIN_TOKENS
        rows = (element_coords_sorted if sort else element_coords)(layer.offsets, R, C, b)[0]
    else:
        rows = layer.coords()[0]
    return "layer step; dW " + _sddmm_kernel(dtype, rows)


class _Step:
    """One training step of ``layer`` on x (requires grad) and dy: forward, backward (dx and the
    weight's gradient), gradients dropped after; under CPU bf16 autocast with ``bf16``; with
    ``elements`` the library's block products off (the element products they replaced)."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, bf16: bool, elements: bool = False):
        self.layer, self.x, self.dy, self.bf16 = layer, x.detach().clone().requires_grad_(True), dy, bf16
        self.elements = elements

    def run(self):
        for p in self.layer.parameters():
            p.grad = None
        self.x.grad = None
        off = mock.patch.object(kernels.cpu, "block_products", lambda b: False) if self.elements else contextlib.nullcontext()
        with off, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            y = self.layer(self.x)
            y.backward(self.dy.to(y.dtype))
        return y

    __call__ = run

    def weight_grad(self) -> torch.Tensor:
        p = self.layer.values if hasattr(self.layer, "values") else self.layer.weight
        return p.grad


def _check_step(name: str, step: _Step, coords) -> float:
    """The step's weight gradient at the layer's stored elements (all of them for dense) against
    fp64 of the same (bf16-rounded under autocast) operands."""
    step.run()
    xin = step.x.detach().to(torch.bfloat16) if step.bf16 else step.x.detach()
    dy = step.dy.to(torch.bfloat16) if step.bf16 else step.dy
    truth, lowp = dy.double().t() @ xin.double(), dy.t() @ xin  # lowp: torch's dense product at the dtype
    got = step.weight_grad()
    if step.bf16:  # the layer's gradient is rounded to bf16 before autocast hands it back in fp32
        got = got.to(torch.bfloat16)
    if coords is not None:
        r, c = (t.long() for t in coords)
        truth, lowp, got = truth[r, c], lowp[r, c], got.reshape(-1)
    ok, err, _, why = common.gate(got, truth, lowp if step.bf16 else None)
    if not ok:
        raise AssertionError(f"{name}: weight gradient {why}")
    return err


def build(args):
    """{name: (kind, callable, kernel, check error)} for every variant."""
    n_in, n_out, T = args.in_features, args.out_features, args.tokens
    g = torch.Generator().manual_seed(args.seed)
    density = 1.0 - args.sparsity
    dense = nn.Linear(n_in, n_out)
    fanin = kernels.FanInLinear(n_in, n_out, density=density, generator=g)
    diag = kernels.DiagLinear(n_in, n_out, density=density, block_size=16, generator=g)
    diag64 = kernels.DiagLinear(n_in, n_out, density=density, block_size=64, generator=g)
    diag1 = kernels.DiagLinear(n_in, n_out, density=density, block_size=1, generator=g)
    x = torch.randn(T, n_in, generator=g)
    dy = torch.randn(T, n_out, generator=g)
    xb, dyb = x.to(torch.bfloat16), dy.to(torch.bfloat16)
    out = {}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        dtype = torch.bfloat16 if bf16 else torch.float32
        for name, layer, coords, elements in (
                ("dense nn.Linear", dense, None, False), ("fan-in", fanin, fanin.coords(), False),
                ("diag b=16", diag, diag.coords(), False), ("diag b=16, elements", diag, diag.coords(), True),
                ("diag b=64", diag64, diag64.coords(), False), ("diag b=1", diag1, diag1.coords(), False)):
            kernel = (("torch GEMM (oneDNN)" if bf16 else "torch GEMM (MKL)") if layer is dense
                      else _step_kernel(layer, dtype, elements, T))
            step = _Step(layer, x, dy, bf16, elements)
            label = f"step {name} {tag}" + (" (autocast)" if bf16 else "")
            out[label] = ("step", step, kernel, _check_step(label, step, coords))
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        a, b = (dyb, xb) if bf16 else (dy, x)
        truth = dyb.double().t() @ xb.double() if bf16 else dy.double().t() @ x.double()
        ok, err, _, why = common.gate(a.t() @ b, truth, (a.t() @ b) if bf16 else None)
        if not ok:
            raise AssertionError(f"dense dW {tag}: {why}")
        out[f"dW dense {tag}"] = ("dW", (lambda a=a, b=b: a.t() @ b), "torch GEMM", err)
        for name, layer in (("fan-in", fanin), ("diag b=16", diag)):
            rows, cols = (t.contiguous() for t in layer.coords())
            r, c = rows.long(), cols.long()
            got = kernels.cpu.sddmm(a, b, rows, cols)
            if got is None:
                raise AssertionError(f"SDDMM {name} {tag}: kernels.cpu.sddmm refused the operands "
                                     f"({kernels.cpu.error() or 'no native library'})")
            ok, err, _, why = common.gate(got, truth[r, c], (a.float().t() @ b.float())[r, c])
            if not ok:
                raise AssertionError(f"SDDMM {name} {tag}: {why}")
            out[f"dW SDDMM {name} {tag}"] = ("dW", (lambda a=a, b=b, rows=rows, cols=cols:
                                                     kernels.cpu.sddmm(a, b, rows, cols)),
                                              _sddmm_kernel(a.dtype, rows), err)
        for layer in (diag, diag64):
            bs = layer.block_size
            brow, bcol = (t.reshape(-1).contiguous() for t in kernels.diag.pattern.block_coords(
                layer.offsets, n_out // bs, n_in // bs))
            got = kernels.cpu.sddmm_blocks(a, b, brow, bcol, bs)
            if got is None:
                raise AssertionError(f"blocks b={bs} {tag}: kernels.cpu.sddmm_blocks refused the operands "
                                     f"({kernels.cpu.error() or 'no native library'})")
            rows, cols = (t.long() for t in layer.coords())
            ok, err, _, why = common.gate(got.reshape(-1), truth[rows, cols], (a.float().t() @ b.float())[rows, cols])
            if not ok:
                raise AssertionError(f"blocks b={bs} {tag}: {why}")
            out[f"dW blocks diag b={bs} {tag}"] = ("dW", (lambda a=a, b=b, brow=brow, bcol=bcol, bs=bs:
                                                          kernels.cpu.sddmm_blocks(a, b, brow, bcol, bs)),
                                                   _blocks_dw_kernel(bs, a.dtype), err)
    return out


def measure(fns: dict, rounds: int, round_ms: float, clock) -> dict[str, list[float]]:
    names = list(fns)
    calls = {}
    for n in names:
        fns[n]()
        t0 = clock()
        fns[n]()
        one = max(clock() - t0, 1e-6)
        calls[n] = max(1, min(1000, round(round_ms / 1e3 / one)))
    per_call = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            for _ in range(calls[n]):
                fns[n]()
            per_call[n].append((clock() - t0) / calls[n] * 1e3)
    return per_call


def run_one(args, threads: int, run_id: str) -> list[dict]:
    torch.set_num_threads(threads)
    variants = build(args)
    per_call = measure({n: v[1] for n, v in variants.items()}, args.rounds, args.round_ms, CLOCKS[args.clock])
    med = {n: statistics.median(v) for n, v in per_call.items()}
    anchor = {("step", "fp32"): "step dense nn.Linear fp32", ("step", "bf16"): "step dense nn.Linear bf16 (autocast)",
              ("dW", "fp32"): "dW dense fp32", ("dW", "bf16"): "dW dense bf16"}
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name, (kind, _, kernel, err) in variants.items():
        q = statistics.quantiles(per_call[name], n=4) if len(per_call[name]) >= 2 else [med[name]] * 3
        rows.append(dict(run=run_id, threads=threads, load_avg=load, in_features=args.in_features,
                         out_features=args.out_features, sparsity=args.sparsity, tokens=args.tokens, kind=kind,
                         variant=name, kernel=kernel, ms_per_call=med[name], ms_q1=q[0], ms_q3=q[2],
                         ms_min=min(per_call[name]), x_dense_fp32=med[anchor[kind, "fp32"]] / med[name],
                         x_dense_bf16=med[anchor[kind, "bf16"]] / med[name], max_err=err))
    return rows


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_args(p, tokens=("--tokens", 256), rounds=11, round_ms=100.0)
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/cpu_train)")
    p.add_argument("--checks", choices=("on", "off"), default="on",
                   help="the layers' argument and index checks: on (the default a user trains with; an index "
                        "tensor's bounds are read once per pattern) or off (kernels.set_checks(False))")
    args = p.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    if args.quick:
        args.in_features, args.out_features, args.tokens, args.rounds, args.round_ms = 512, 128, 40, 2, 2.0
    out = args.out or (common.RESULTS / ("quick" if args.quick else "cpu_train"))
    out.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    head = cpu_header(args)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    previous = kernels.runtime.checks_enabled()
    kernels.set_checks(args.checks == "on")
    try:
        rows = [r for t in threads for r in run_one(args, t, run_id)]
    finally:
        kernels.set_checks(previous)
        torch.set_num_threads(head["cpu_threads"])
    common.append_csv(out / "cpu_train.csv", rows, FIELDS)
    md = [f"# CPU training products: Linear({args.in_features} -> {args.out_features}) at {args.sparsity:.0%} "
          f"sparsity, {args.tokens} tokens", "", common.header_markdown(head), "",
          f"Checks: {args.checks} (`--checks`).", "",
          "step = forward + backward (dx and the weight gradient) of one layer, bf16 under CPU autocast; "
          "dW = the weight gradient alone (dense: dy^T x; sparse: kernels.cpu.sddmm at the layer's stored "
          "elements, or kernels.cpu.sddmm_blocks at its b x b blocks). x dense fp32 / x dense bf16 = the dense variant of the same kind / this one, side by side "
          "in one process (q1 / q3: quartiles over rounds). max err: the weight gradient against fp64.", ""]
    for t in threads:
        sub = [r for r in rows if r["threads"] == t]
        md += [f"## {t} thread(s) (1-min load average at the end: {sub[0]['load_avg']} on {os.cpu_count()} cores)", "",
               common.md_table(sub, [("variant", "variant"), ("kernel", "kernel"), ("ms_per_call", "ms / call"),
                                     ("ms_q1", "q1"), ("ms_q3", "q3"), ("x_dense_fp32", "x dense fp32"),
                                     ("x_dense_bf16", "x dense bf16"), ("max_err", "max err")]), ""]
    (out / "cpu_train.md").write_text("\n".join(md) + "\n")
    for r in rows:
        log(f"  {r['variant']:<34} {r['ms_per_call']:9.3f} ms   x dense fp32 {r['x_dense_fp32']:6.2f}   "
            f"x dense bf16 {r['x_dense_bf16']:6.2f}")
    log(f"[out] {out}/cpu_train.md, cpu_train.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
