"""The fused block-diagonal MLP against the dense MLP and the unfused diagonal layers: ViT-B's
fc2(gelu(fc1(x))), 768 -> 3072 -> 768, T = 256 x 197 = 50,432 tokens, bf16, 90% sparsity.

    python bench/fused_mlp.py                       # GPU: b = 16, 32, 64
    python bench/fused_mlp.py --blocks 64 --tokens 4096
    python bench/fused_mlp.py --quick               # CPU: tiny shapes through the interpreter

Variants (one dtype throughout, no autocast):
    dense     nn.Linear -> F.gelu -> nn.Linear (cuBLAS on a GPU) with the dense equivalent of
              the sparse weights
    unfused   DiagLinear -> F.gelu -> DiagLinear: the diagonal kernel twice, the [T, hidden]
              activation written and read through HBM (bias and GELU as separate passes)
    fused     kernels.fused.fused_mlp: one kernel, the hidden activation stays on chip; the
              backward recomputes it (see kernels/fused.py)

Gate before timing: every variant's output and every gradient (x, weights, biases) must be
finite and within 2x torch's own error at the dtype + atol of the fp64 dense reference
(``common.gate``), with fresh outputs NaN-poisoned. A variant that fails is reported as
wrong and never timed, and the run exits with status 1.

Timing: ``triton.testing.do_bench`` medians on a GPU ("fwd" under no_grad; "fwd+bwd" a
forward and ``torch.autograd.grad`` of x, values (dense: weights) and biases). On CPU
(--quick) the Triton kernels run under the interpreter and the times are NOT speed figures.

FLOP model (per variant, from the actual offsets): a sparse product costs 2 T nnz; the
fused forward recomputes hidden block j once for every fc2 block that reads it, so its fc1
work is 2 T b^2 sum_j n1(j) n2(j) (n1(j): fc1 blocks in hidden block-row j, n2(j): fc2
blocks in hidden block-column j) and recompute = that / fc1's own 2 T nnz1. fwd+bwd adds,
for the sparse variants, dx and dW of both layers (4 products) and for the fused one the
recomputed fc1 forward of its backward. Minimum HBM traffic (forward, activations only):
dense and unfused T (2 dim + 4 hidden) bytes/elem (h written, read, gelu(h) written, read),
fused T 2 dim. TFLOP/s below = model FLOPs / time.

Outputs in --out (default bench/results/fused_mlp, --quick: bench/results/quick):
fused_mlp.csv (appended) and fused_mlp.md (this run).
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from bench import common  # noqa: E402
from kernels.diag import diag_coords  # noqa: E402
from kernels.fused import fused_diag_mlp_ref, fused_mlp  # noqa: E402

VARIANTS = ("dense", "unfused", "fused")
FIELDS = ["run", "device", "mode", "dim", "hidden", "tokens", "sparsity", "block", "dtype", "variant", "params",
          "status", "reason", "max_err", "fwd_ms", "fwdbwd_ms", "x_dense_fwd", "x_dense_fwdbwd",
          "x_unfused_fwd", "x_unfused_fwdbwd", "recompute", "gflop_fwd", "gflop_fwdbwd", "tflops_fwd",
          "tflops_fwdbwd", "min_hbm_mb_fwd"]
# Quick: the whole pipeline through the interpreter in seconds (K = 4 and 2 diagonals).
QUICK = dict(dim=64, hidden=256, tokens=37, blocks="16,32", sparsity=0.75)


def block_counts(offsets: torch.Tensor, R: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored blocks per block-row [R] and per block-column [C] of a diagonal pattern."""
    rows, cols = diag_coords(offsets.cpu(), R, C)
    return (torch.bincount(rows.reshape(-1).long(), minlength=R),
            torch.bincount(cols.reshape(-1).long(), minlength=C))


def flop_model(dim: int, hidden: int, tokens: int, block: int, offsets1: torch.Tensor,
               offsets2: torch.Tensor) -> dict:
    """FLOPs of each variant (forward and forward+backward), the fused recompute factor and
    the minimum forward activation traffic per element byte; see the module docstring."""
    b, T = block, tokens
    n1_rows, _ = block_counts(offsets1, hidden // b, dim // b)   # fc1: hidden x dim blocks
    _, n2_cols = block_counts(offsets2, dim // b, hidden // b)   # fc2: dim x hidden blocks
    nnz1, nnz2 = int(n1_rows.sum()) * b * b, int(n2_cols.sum()) * b * b
    fused_fc1 = int((n1_rows * n2_cols).sum()) * b * b
    dense = 2.0 * T * dim * hidden
    fc1, fc2 = 2.0 * T * nnz1, 2.0 * T * nnz2
    return {
        "recompute": fused_fc1 / nnz1 if nnz1 else math.nan,
        "dense": {"fwd": 2 * dense, "fwdbwd": 6 * dense},
        "unfused": {"fwd": fc1 + fc2, "fwdbwd": 3 * (fc1 + fc2)},
        "fused": {"fwd": 2.0 * T * fused_fc1 + fc2, "fwdbwd": 2.0 * T * fused_fc1 + fc2 + fc1 + 2 * (fc1 + fc2)},
        "hbm_elems": {"dense": T * (2 * dim + 4 * hidden), "unfused": T * (2 * dim + 4 * hidden),
                      "fused": T * 2 * dim},
    }


def grouping_model(dim: int, hidden: int, block: int, offsets1: torch.Tensor, offsets2: torch.Tensor,
                   nb: int, block_t: int, elem_bytes: int = 2) -> dict:
    """What a fused forward whose programs own ``nb`` consecutive fc2 output blocks of a token
    tile would do, if it computed each hidden block its group reads once (deduplicated across
    the group's diagonals): the recompute factor (fc1 blocks computed / stored), the on-chip y
    accumulator per program (fp32 bytes: nb b x block_t) and the bytes of weights every token
    tile reads from L2 (fc1 blocks computed + fc2 blocks, b x b each). nb = 1 is today's kernel
    (no dedup possible); nb = out / b is FlashAttention-style streaming (each read hidden block
    once). The model behind kernels/fused.py's choice of one output block a program."""
    b = block
    R2 = dim // b
    n1_rows, _ = block_counts(offsets1, hidden // b, dim // b)
    rows2, cols2 = (t.reshape(-1).long() for t in diag_coords(offsets2.cpu(), R2, hidden // b))
    computed = 0
    for r0 in range(0, R2, nb):
        in_group = (rows2 >= r0) & (rows2 < r0 + nb)
        computed += int(n1_rows[torch.unique(cols2[in_group])].sum())
    stored = int(n1_rows.sum())
    return {"recompute": computed / stored if stored else math.nan,
            "acc_bytes": nb * b * block_t * 4,
            "weight_bytes_per_tile": (computed + rows2.numel()) * b * b * elem_bytes,
            "x_tile_readers": -(-R2 // nb)}


class Variants:
    """The three MLPs of one block size, sharing one set of weights."""

    def __init__(self, dim: int, hidden: int, block: int, sparsity: float, device, dtype, seed: int):
        g = torch.Generator().manual_seed(seed)  # the layers are drawn on the CPU, then moved
        fcs = [kernels.DiagLinear(n_in, n_out, 1.0 - sparsity, block_size=block, generator=g)
               for n_in, n_out in ((dim, hidden), (hidden, dim))]
        with torch.no_grad():
            for fc in fcs:
                fc.bias.uniform_(-0.5, 0.5, generator=g)
        self.fc1, self.fc2 = (fc.to(device=device, dtype=dtype) for fc in fcs)
        self.lin1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.lin2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
        with torch.no_grad():
            for lin, fc in ((self.lin1, self.fc1), (self.lin2, self.fc2)):
                lin.weight.copy_(fc.to_dense())
                lin.bias.copy_(fc.bias)
        self.block, self.hidden = block, hidden

    def forward(self, name: str):
        fc1, fc2, lin1, lin2 = self.fc1, self.fc2, self.lin1, self.lin2
        return {"dense": lambda x: lin2(F.gelu(lin1(x))),
                "unfused": lambda x: fc2(F.gelu(fc1(x))),
                "fused": lambda x: fused_mlp(fc1, fc2, x)}[name]

    def params(self, name: str) -> list[torch.Tensor]:
        if name == "dense":
            return [self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias]
        return [self.fc1.values, self.fc1.bias, self.fc2.values, self.fc2.bias]

    def pattern(self) -> str:
        return f"K1={self.fc1.num_diagonals}/{self.fc1.geometry[3]} K2={self.fc2.num_diagonals}/{self.fc2.geometry[3]}"

    def reference(self, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype):
        """(output, grads of x, v1, b1, v2, b2) of the dense-weight spec at ``dtype``: fp64 is
        the truth, the variants' dtype gives torch's own rounding error for the gate."""
        fc1, fc2 = self.fc1, self.fc2
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, fc1.values, fc1.bias, fc2.values, fc2.bias)]
        xr, v1, b1, v2, b2 = leaves
        y = fused_diag_mlp_ref(xr, v1, fc1.offsets, b1, v2, fc2.offsets, b2, self.block, self.hidden,
                               fc2.out_features)
        return y.detach(), torch.autograd.grad(y, leaves, dy.to(dtype))


def _dense_blocks(weight_grad: torch.Tensor, layer: kernels.DiagLinear) -> torch.Tensor:
    """A dense weight gradient read at the layer's stored blocks ([K, D, b, b])."""
    R, C, _, _ = layer.geometry
    b = layer.block_size
    rows, cols = diag_coords(layer.offsets, R, C)
    blocks = weight_grad.reshape(R, b, C, b).permute(0, 2, 1, 3)
    return blocks[rows.long(), cols.long()]


def check_variant(v: Variants, name: str, x, dy, truth, lowp) -> tuple[bool, float, str]:
    """Gate the output and every gradient of one variant; (passed, worst err / bound, reason)."""
    params = v.params(name)
    xg = x.detach().requires_grad_()
    with common.poisoned_empty():
        y = v.forward(name)(xg)
        grads = list(torch.autograd.grad(y, [xg] + params, dy))
    if name == "dense":  # dense weight gradients, read where the sparse pattern stores blocks
        grads[1], grads[3] = _dense_blocks(grads[1], v.fc1), _dense_blocks(grads[3], v.fc2)
    labels = ["output", "grad x", "grad fc1 values", "grad fc1 bias", "grad fc2 values", "grad fc2 bias"]
    worst = 0.0
    for label, out, t, lp in zip(labels, [y] + grads, [truth[0]] + list(truth[1]), [lowp[0]] + list(lowp[1])):
        ok, err, bound, reason = common.gate(out, t, lp if out.dtype in (torch.float16, torch.bfloat16) else None)
        if not ok:
            return False, math.inf, f"{label}: {reason}"
        worst = max(worst, err / bound if bound else 0.0)
    return True, worst, ""


def time_variant(v: Variants, name: str, x, dy, cpu_reps: int, warmup_ms: float, rep_ms: float):
    """(forward ms, forward+backward ms) medians."""
    fwd = v.forward(name)
    leaves = [x.detach().requires_grad_()] + v.params(name)

    def forward():
        with torch.no_grad():
            fwd(x)

    def forward_backward():
        torch.autograd.grad(fwd(leaves[0]), leaves, dy)

    kw = dict(warmup_ms=warmup_ms, rep_ms=rep_ms, cpu_reps=cpu_reps)
    return common.bench_ms(forward, **kw), common.bench_ms(forward_backward, **kw)


def main(argv=None, log=print) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=768, help="model width (fc1 in, fc2 out)")
    p.add_argument("--hidden", type=int, default=3072, help="MLP width (fc1 out, fc2 in)")
    p.add_argument("--tokens", type=int, default=256 * 197, help="T = batch x sequence (ViT-B/16 batch 256)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--blocks", default="16,32,64", help="comma list of block sizes b (>= 16)")
    p.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 with --quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--quick", action="store_true", help="tiny shapes, Triton interpreter on CPU (pipeline check)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    args = p.parse_args(argv)
    device = common.device()
    gpu = device.type == "cuda"
    if args.quick:
        for k, val in QUICK.items():
            setattr(args, k, val)
    elif not gpu:
        p.error("no GPU: the full-size benchmark needs CUDA (the interpreter would take hours); "
                "use --quick for the CPU pipeline check")
    blocks = [int(b) for b in str(args.blocks).split(",") if b.strip()]
    dtype = common.parse_dtype(args.dtype or ("bfloat16" if gpu and not args.quick else "float32"))
    out = args.out or (common.RESULTS / ("quick" if args.quick else "fused_mlp"))
    out.mkdir(parents=True, exist_ok=True)
    head = common.header()
    mode = "gpu" if gpu else ("interpreter" if common.interpreting() else "cpu")
    if not gpu:
        head["note"] = common.INTERPRETER_NOTE
        log(common.INTERPRETER_NOTE)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    dname = str(dtype).removeprefix("torch.")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(args.tokens, args.dim, generator=gen, device=device).to(dtype)
    dy = torch.randn(args.tokens, args.dim, generator=gen, device=device).to(dtype)
    elem = x.element_size()
    base = dict(run=run_id, device=head["gpu"] if gpu else "cpu", mode=mode, dim=args.dim, hidden=args.hidden,
                tokens=args.tokens, sparsity=args.sparsity, dtype=dname)
    rows, dense_row = [], None
    previous = kernels.runtime.checks_enabled()
    kernels.set_checks(False)  # per-call index checks synchronise; the layers check on mask change
    try:
        # On CPU the sparse ops run the Triton kernels through the interpreter, not the torch path.
        with kernels.use_backend("triton"):
            for b in blocks:
                v = Variants(args.dim, args.hidden, b, args.sparsity, device, dtype, args.seed)
                model = flop_model(args.dim, args.hidden, args.tokens, b, v.fc1.offsets, v.fc2.offsets)
                truth = v.reference(x, dy, torch.float64)
                lowp = v.reference(x, dy, dtype)
                for name in VARIANTS if dense_row is None else VARIANTS[1:]:
                    row = dict(base, block="-" if name == "dense" else b, variant=name,
                               params="dense" if name == "dense" else v.pattern(),
                               recompute=model["recompute"] if name == "fused" else math.nan,
                               gflop_fwd=model[name]["fwd"] / 1e9, gflop_fwdbwd=model[name]["fwdbwd"] / 1e9,
                               min_hbm_mb_fwd=model["hbm_elems"][name] * elem / 2**20)
                    ok, worst, reason = check_variant(v, name, x, dy, truth, lowp)
                    if not ok:
                        row.update(status="wrong", reason=reason)
                    else:
                        fwd_ms, fb_ms = time_variant(v, name, x, dy, 3 if args.quick else 5,
                                                     args.warmup_ms, args.rep_ms)
                        row.update(status="ok", reason="", max_err=worst, fwd_ms=fwd_ms, fwdbwd_ms=fb_ms,
                                   tflops_fwd=model[name]["fwd"] / fwd_ms / 1e9,
                                   tflops_fwdbwd=model[name]["fwdbwd"] / fb_ms / 1e9)
                    if name == "dense":
                        dense_row = row
                    rows.append(row)
                    log(f"[fused_mlp] b={row['block']:<3} {name:<8} {row['status']:<5} "
                        f"fwd {common.fmt(row.get('fwd_ms'))} ms  fwd+bwd {common.fmt(row.get('fwdbwd_ms'))} ms"
                        + (f"  ({row['reason']})" if row["reason"] else ""))
                if gpu:
                    del v
                    torch.cuda.empty_cache()
    finally:
        kernels.set_checks(previous)
    for r in rows:
        if r["status"] != "ok":
            continue
        unfused = next((u for u in rows if u["variant"] == "unfused" and u["block"] == r["block"]
                        and u["status"] == "ok"), None)
        for phase in ("fwd", "fwdbwd"):
            if dense_row and dense_row["status"] == "ok":
                r[f"x_dense_{phase}"] = dense_row[f"{phase}_ms"] / r[f"{phase}_ms"]
            if unfused is not None:
                r[f"x_unfused_{phase}"] = unfused[f"{phase}_ms"] / r[f"{phase}_ms"]
    common.append_csv(out / "fused_mlp.csv", rows, FIELDS)
    write_markdown(out / "fused_mlp.md", rows, head, args, dname)
    log(f"[out] {out}/fused_mlp.md, fused_mlp.csv")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def write_markdown(path: Path, rows: list[dict], head: dict, args, dname: str) -> None:
    title = (f"# Fused block-diagonal MLP: {args.dim} -> {args.hidden} -> {args.dim}, T = {args.tokens}, "
             f"{args.sparsity:.0%} sparsity, {dname}")
    md = [title, ""]
    if "note" in head:
        md += [f"> **{head['note']}** The ratios below compare numpy emulation, not kernels.", ""]
    md += [common.header_markdown({k: val for k, val in head.items() if k != "note"}), "",
           "x dense / x unfused = that variant's time / this one's (same inputs, same dtype). "
           "fwd: forward under no_grad; fwd+bwd: forward and the gradients of x, weights and biases. "
           "recompute: how many times the fused kernel computes each hidden block (fc1 work / fc1's "
           "own). GFLOP: the model FLOPs each variant executes (see bench/fused_mlp.py); "
           "min HBM MB: activations in and out of the forward, nothing else. A variant is timed only "
           "after its output and all its gradients passed the fp64 gate (status ok); max err = "
           "worst error / allowed error over them.", "",
           common.md_table(rows, [("block", "b"), ("variant", "variant"), ("params", "pattern"),
                                  ("status", "status"), ("fwd_ms", "fwd ms"), ("x_dense_fwd", "x dense"),
                                  ("x_unfused_fwd", "x unfused"), ("fwdbwd_ms", "fwd+bwd ms"),
                                  ("x_dense_fwdbwd", "x dense"), ("x_unfused_fwdbwd", "x unfused"),
                                  ("recompute", "recompute"), ("gflop_fwd", "GFLOP fwd"),
                                  ("gflop_fwdbwd", "GFLOP fwd+bwd"), ("tflops_fwd", "TFLOP/s fwd"),
                                  ("min_hbm_mb_fwd", "min HBM MB fwd"), ("max_err", "max err"),
                                  ("reason", "note")]), ""]
    path.write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
