"""A MODEL (not a measurement) of a whole ViT-B/16 training step and inference pass on the
H100 / H200, sparse against dense, composed from the static report's per-op model.

    python bench/step_model.py                       # batch 256 training, batch 1 and 256 inference
    python bench/step_model.py --formats dense,diag64 --batch 64

The step is bench/e2e.py's own (zero_grad, forward, loss, backward, AdamW - foreach, as torch
takes it on a GPU; inference: a forward under inference_mode; bf16, no autocast). It runs on
the CPU (the torch path) at batch 2 and 3 under a dispatch mode that records every op, each of
the project's custom ops as one op, its body unseen. Every op of a ViT is affine in the batch
(weights fixed, activations per image), so an op's bytes, FLOPs and tokens at batch B are those
at batch 2 plus (B - 2) times the difference from batch 3 (batch 1 is special: a broadcast
over the batch is a copy there; tests/bench/test_step_model.py checks the rule against a
fourth trace). Each op then gets a model time on each GPU:
- a sparse layer's product (a custom op: forward, input grad, weight grad): the static
  report's model of that product at that layer and token count (bench/static.py: its Triton
  launches compiled for sm_90 and read, tile lists, L1 replay, the launcher's glue), on a
  layer of the same shape and density (its own random pattern);
- the unstructured format's forward and input grad (torch.sparse CSR: cuSPARSE on a GPU) at
  a floor: the SpMM's values, indices, x and y once over HBM or its FLOPs on the CUDA cores,
  whichever is longer, plus the two transposed copies its path makes (kernels/sparse.py) -
  a lower bound on cuSPARSE's time, so a ratio against it is a lower bound too;
- a matmul (mm, addmm, bmm): cuBLAS as bench/static.py models it (``gemm_time``);
- attention (SDPA): its FLOPs at ATTN_OF_PEAK of the tensor peak, or its bytes over HBM;
- any other op: its inputs and outputs once over HBM, plus a launch (TORCH_OP_S).
Ops moving under 4 KB are left out (AdamW's step counters live on the host).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import static  # noqa: E402  (first: it picks the compiler over the interpreter)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench import common  # noqa: E402
from kernels import cpu as kernels_cpu  # noqa: E402
from kernels import runtime as rt  # noqa: E402
from models import attention  # noqa: E402

# FlashAttention's published H100 figures at head dim 64 are ~35% of the dense bf16 peak
# forward and less backward; 197 tokens fill its 128-row tiles to 77%. Taken: 0.3 (a model).
ATTN_OF_PEAK = 0.3
ATTN_BWD_OF_FWD = 2.5   # the backward's matmuls: 5 against the forward's 2 (S recomputed)
MIN_BYTES = 4096        # as static.GlueBytes: smaller ops are host scalars or launch noise
FORMATS = ("dense", "diag64", "diag64-fused", "diag16", "diag16-fused", "fanin", "csr")
PRODUCTS = {"diag_matmul": "fwd", "fanin_matmul": "fwd", "sparse_matmul": "fwd",
            "diag_dx": "dx", "fanin_dx": "dx", "sparse_dx": "dx", "diag_dw": "dw", "sddmm": "dw",
            "fused_diag_mlp": "mlp",
            # the fused MLP's backward: fc1 recomputed with h and gelu(h) written, fc2's input grad
            # times gelu'(h), h read - each the plain product's model plus its second tensor over HBM
            "diag_matmul_gelu": "fwd", "diag_dx_gelu_grad": "dx"}
GEMMS = ("mm", "addmm", "bmm", "baddbmm")
ATTENTION = "scaled_dot_product"
KINDS = ("sparse", "gemm", "attention", "memory")


@dataclass
class Call:
    """One op of a traced step: what the model needs of it."""
    name: str
    kind: str           # sparse (a project custom op), gemm, attention, memory
    bytes: float
    flops: float = 0.0
    dtype: str = "bfloat16"
    product: str = ""   # a custom op's: fwd, dx, dw; mlp (the fused MLP's forward)
    tokens: float = 0   # a custom op's rows
    n_in: int = 0
    n_out: int = 0
    nnz: float = 0      # a custom op's stored values
    aux_bytes: float = 0  # a GELU epilogue's second tensor (h or gelu(h)), beside the product's own


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else "bfloat16"


def _sparse_call(name: str, args, out) -> Call:
    product = PRODUCTS.get(name)
    if product is None:
        raise ValueError(f"no model for the custom op alwayssparse::{name}; formats: {', '.join(FORMATS)}")
    a, moved = args[0], static.moved_bytes(args, {}, out)
    out = out[0] if isinstance(out, (list, tuple)) else out  # diag_matmul_gelu: (h, gelu(h))
    if product == "mlp":  # (x2, w1, offsets1, b1, w2, offsets2, b2, b, hidden, out)
        return Call(name, "sparse", moved, dtype=_dtype_name(a), product=product,
                    tokens=a.shape[0], n_in=a.shape[1], n_out=int(args[8]), nnz=args[1].numel() + args[4].numel())
    if product == "dw":
        n_in, n_out, nnz = args[1].shape[1], a.shape[1], out.numel()
    else:
        n_in, n_out = (a.shape[1], out.shape[1]) if product == "fwd" else (out.shape[1], a.shape[1])
        nnz = args[1].numel()
    aux = a.shape[0] * (n_out if product == "fwd" else n_in) * a.element_size() if "gelu" in name else 0
    return Call(name, "sparse", moved, dtype=_dtype_name(a), product=product,
                tokens=a.shape[0], n_in=n_in, n_out=n_out, nnz=nnz, aux_bytes=aux)


def _flops(name: str, args) -> float:
    if name in GEMMS:
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        return 2.0 * a.numel() * b.shape[-1]
    q, k = [t for t in args if isinstance(t, torch.Tensor) and t.dim() == 4][int("backward" in name):][:2]
    fwd = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    return fwd * (ATTN_BWD_OF_FWD if "backward" in name else 1.0)


class Trace(TorchDispatchMode):
    """Records every op run under it as a ``Call`` (the project's custom ops as one each)."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.dropout.default and (args[1] == 0 or not args[2]):
            return args[0]  # ATen returns the input itself (taken apart here, it would clone)
        name = func.__name__.split(".")[0]
        if func.namespace == static.KERNEL_NAMESPACE:
            out = func(*args, **kwargs)
            self.calls.append(_sparse_call(name, args, out))
            return out
        # A composite op (under inference_mode: linear, layer_norm, SDPA) is taken apart into
        # the ops a GPU runs (addmm, native_layer_norm, the flash op)
        with self:
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        out = func(*args, **kwargs)
        if name not in static._NO_BYTES:  # every op, however small (MIN_BYTES: at the target batch)
            kind = "gemm" if name in GEMMS else "attention" if ATTENTION in name else "memory"
            first = out[0] if isinstance(out, (list, tuple)) else out
            self.calls.append(Call(name, kind, static.moved_bytes(args, kwargs, out),
                                   0.0 if kind == "memory" else _flops(name, args), dtype=_dtype_name(first)))
        return out


@contextlib.contextmanager
def _backend(name: str):
    """CPU tensors through ``name`` ("torch": the CPU path computes; "triton": the launchers,
    captured and never run), per-call index checks off as bench/e2e.py and the report run;
    both restored after. Attention takes torch's scaled_dot_product_attention, as on a GPU (on
    CPU in bf16 models.attention's "auto" would take its batched GEMMs). The native CPU library
    is off inside: a bf16 layer without a gradient would otherwise multiply in it through ctypes
    (SparseLayer.cpu_inference), which no dispatch mode sees - the trace would lose the GPU's
    sparse products and record the CPU weight copy's build instead."""
    backend, checks = rt.get_backend(), rt.checks_enabled()
    rt.set_backend(name)
    rt.set_checks(False)
    try:
        with kernels_cpu.disabled(), mock.patch.dict(os.environ, {attention.BACKEND_ENV: "sdpa"}):
            yield
    finally:
        rt.set_backend(backend)
        rt.set_checks(checks)


def trace(model: str, fmt: str, batch: int, phase: str, quick: bool = False) -> tuple[list[Call], int]:
    """The ops of one steady-state training step (phase "train": after a first step that made
    AdamW's state) or inference pass ("infer") of bench/e2e.py's workload, on the CPU in bf16;
    and the tokens a step takes through the blocks."""
    from bench import e2e

    args = types.SimpleNamespace(sparsity=0.9, seed=0, batch=batch, quick=quick, seq=128)
    with _backend("torch"):
        r = e2e.Runner(model, fmt, args, torch.device("cpu"), torch.bfloat16)
        r.opt = torch.optim.AdamW(r.net.parameters(), lr=1e-4, foreach=True)  # what a GPU takes
        step = r.train_step if phase == "train" else r.infer_step
        if phase == "train":
            step()
        t = Trace()
        with t:
            step()
    return t.calls, r.tokens


def extrapolate(at2: list[Call], at3: list[Call], batch: int) -> list[Call]:
    """The calls at ``batch`` from those at batch 2 and 3, every number affine in the batch
    (batch 1 is no base: a broadcast over the batch, the class token's, is a copy there and a
    sum from 2 on); those moving under MIN_BYTES then left out."""
    if [c.name for c in at2] != [c.name for c in at3]:
        raise ValueError(f"the step runs other ops at batch 3 than at 2 ({len(at2)} vs {len(at3)}): "
                         "not affine in the batch")
    out = []
    for a, b in zip(at2, at3):
        if (a.kind, a.product, a.n_in, a.n_out, a.dtype) != (b.kind, b.product, b.n_in, b.n_out, b.dtype):
            raise ValueError(f"{a.name}: another shape or dtype at batch 3 ({a} vs {b})")
        out.append(replace(a, **{f: getattr(a, f) + (batch - 2) * (getattr(b, f) - getattr(a, f))
                                 for f in ("bytes", "flops", "tokens", "nnz", "aux_bytes")}))
    return [c for c in out if c.bytes >= MIN_BYTES]


def calls_at(model: str, fmt: str, batch: int, phase: str, quick: bool = False) -> tuple[list[Call], int]:
    """(the calls, the tokens) of a step at ``batch``: traced there up to batch 3, else
    extrapolated from batch 2 and 3."""
    if batch <= 3:
        calls, tokens = trace(model, fmt, batch, phase, quick)
        return [c for c in calls if c.bytes >= MIN_BYTES], tokens
    (two, tokens), (three, _) = (trace(model, fmt, b, phase, quick) for b in (2, 3))
    return extrapolate(two, three, batch), tokens // 2 * batch


_LAYER_MODELS: dict = {}


def layer_model(fmt: str, product: str, n_in: int, n_out: int, tokens: int, dtype: str) -> dict:
    """{GPU name: model time (s)} of one sparse layer's product (bench/static.py's model of its
    launches compiled for sm_90), cached per shape."""
    fmt = fmt.removesuffix("-fused")  # a fused-MLP model's other layers are plain diag<b>
    key = (fmt, product, n_in, n_out, tokens, dtype)
    if key not in _LAYER_MODELS:
        with _backend("triton"):
            if product == "mlp":  # the fused MLP's forward, n_in -> n_out (hidden) -> n_in
                op = static._mlp_ops(f"mlp{fmt[4:]}", [tokens], dtype, common.parse_dtype(dtype), torch.device("cpu"),
                                     n_in, n_out)[0]
            else:
                op = static.layer_ops("sparse" if fmt == "csr" else fmt, f"{n_in}->{n_out}", n_in, n_out, [tokens],
                                      dtype, torch.device("cpu"), products=(product,))[0]
            static.capture(op, execute=False)
            if op.error:
                raise ValueError(f"{op.label}: {op.error}")
            _, errors, _, models = static.op_models(op, 90)
            if any(errors):
                raise ValueError(f"{op.label}: {'; '.join(e for e in errors if e)}")
        _LAYER_MODELS[key] = {name: m["t"] for name, m in models.items()}
    return _LAYER_MODELS[key]


def csr_floor(nnz: float, n_in: int, n_out: int, tokens: float, dtype: str, gpu: dict) -> float:
    """A floor (s) of torch.sparse CSR's product y = x W^T (cuSPARSE SpMM) on a GPU: values,
    int32 column indices and row pointers, x and y once over HBM, or 2 nnz T FLOPs on the
    CUDA cores, whichever is longer, plus one library call; and the two transposed copies of
    x and y that kernels/sparse.py's path makes, a pass each."""
    e = common.parse_dtype(dtype).itemsize
    acts = tokens * (n_in + n_out) * e
    spmm = max(2.0 * nnz * tokens / gpu["fp32"], (nnz * (e + 4) + 4 * (n_out + 1) + acts) / gpu["hbm"])
    return spmm + static.CUBLAS_S + 2 * acts / gpu["hbm"] + 2 * static.TORCH_OP_S


def call_time(c: Call, fmt: str, gpu_name: str, layer=layer_model) -> float:
    gpu = static.GPUS[gpu_name]
    if c.kind == "sparse":
        if c.name.startswith("sparse_"):  # forward or input grad: x W^T or dy W, the same floor
            n_in, n_out = (c.n_in, c.n_out) if c.product == "fwd" else (c.n_out, c.n_in)
            return csr_floor(c.nnz, n_in, n_out, c.tokens, c.dtype, gpu)
        t = layer(fmt, c.product, c.n_in, c.n_out, int(round(c.tokens)), c.dtype)[gpu_name]
        return t + c.aux_bytes / gpu["hbm"]
    if c.kind == "gemm":
        return static.gemm_time(c.flops, c.bytes, c.dtype, gpu)
    if c.kind == "attention":
        return max(c.flops / (gpu["tc_bf16"] * ATTN_OF_PEAK), c.bytes / gpu["hbm"]) + static.TORCH_OP_S
    return c.bytes / gpu["hbm"] + static.TORCH_OP_S


def step_time(calls: list[Call], fmt: str, gpu_name: str, layer=layer_model) -> dict:
    """Model time (s) of the calls on one GPU, in all and by kind, and the op count."""
    out = dict.fromkeys(KINDS, 0.0)
    for c in calls:
        out[c.kind] += call_time(c, fmt, gpu_name, layer)
    out["total"] = sum(out[k] for k in KINDS)
    out["ops"] = len(calls)
    return out


FIELDS = ["model", "phase", "format", "batch", "tokens", "ops", "model_not_measured_h100_ms",
          "model_not_measured_h200_ms", "model_not_measured_x_dense_h200", "sparse_ms", "gemm_ms",
          "attention_ms", "memory_ms", "error"]


def rows(formats=FORMATS, cases=(("train", 256), ("infer", 256), ("infer", 1)), model: str = "vit-b16",
         quick: bool = False, layer=layer_model, log=print) -> list[dict]:
    """One row per (phase, batch, format): model times on both GPUs, the H200's by kind, and
    the ratio to dense (the first format must be dense)."""
    out = []
    for phase, batch in cases:
        dense = None
        for fmt in formats:
            log(f"step model: {model} {phase} batch {batch} {fmt}")
            r = dict(model=model, phase=phase, format=fmt, batch=batch)
            try:
                calls, tokens = calls_at(model, fmt, batch, phase, quick)
                h1, h2 = (step_time(calls, fmt, g, layer) for g in ("H100", "H200"))
            except Exception as e:  # noqa: BLE001 - a format the model cannot take gets a row saying why
                out.append(dict(r, error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            if fmt == "dense":
                dense = h2["total"]
            r.update(tokens=tokens, ops=h2["ops"], model_not_measured_h100_ms=round(h1["total"] * 1e3, 6),
                     model_not_measured_h200_ms=round(h2["total"] * 1e3, 6),
                     model_not_measured_x_dense_h200=round(dense / h2["total"], 4) if dense else "",
                     **{f"{k}_ms": round(h2[k] * 1e3, 6) for k in KINDS}, error="")
            out.append(r)
    return out


def markdown(rs: list[dict]) -> list[str]:
    """The report's section on the step model."""
    cols = [("phase", "phase"), ("batch", "batch"), ("format", "format"), ("ops", "ops"),
            ("model_not_measured_h100_ms", "model H100 ms"), ("model_not_measured_h200_ms", "model H200 ms"),
            ("model_not_measured_x_dense_h200", "x dense H200 (model)"), ("sparse_ms", "sparse layers ms"),
            ("gemm_ms", "dense matmuls ms"), ("attention_ms", "attention ms"), ("memory_ms", "other ops ms"),
            ("error", "error")]
    return ["## ViT-B/16 training step and inference, composed from the per-op model (not measured)", "",
            "bench/step_model.py: bench/e2e.py's step traced op by op on the CPU at batch 2 and 3 and "
            "extrapolated (every op is affine in the batch); each sparse layer's product takes this "
            "report's model at its shape, dense matmuls the cuBLAS model, attention its FLOPs at "
            f"{ATTN_OF_PEAK} of the tensor peak, other ops their bytes over HBM + {static.TORCH_OP_S * 1e6:.0f} us "
            "(the columns by kind: H200). `csr`: torch.sparse CSR at a floor of cuSPARSE, so its ratio is "
            "a lower bound (bench/README.md).", "",
            common.md_table(rs, cols), ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS), help="the first must be dense")
    p.add_argument("--batch", type=int, default=256, help="training and inference batch (and batch 1 inference)")
    p.add_argument("--out", default=str(static.OUT / "step_sm90"), help="writes <out>.md and <out>.csv")
    args = p.parse_args(argv)
    formats = args.formats.split(",")
    if formats[0] != "dense":
        p.error("--formats must start with dense (the ratios' baseline)")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    rs = rows(formats, (("train", args.batch), ("infer", args.batch), ("infer", 1)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(["# ViT-B/16 step model (H100 / H200; a MODEL, not measured)", ""]
                                                + markdown(rs)))
    common.write_csv(out.with_suffix(".csv"), rs, FIELDS)
    print(f"wrote {out}.md/.csv ({len(rs)} rows; formats {', '.join(formats[1:])} against dense)")
    return 1 if any(r.get("error") for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
