"""Static performance report: every Triton kernel of the project compiled at the target shapes,
its SASS read, and a roofline model of its time on H100 / H200 against dense cuBLAS.

    python bench/static.py                   # CPU or GPU, every case, sm_90 and sm_80 (~10 min on 2 cores)
    python bench/static.py --tokens 256 --dtypes bfloat16 --archs 90      # a subset
    python bench/static.py --json            # one JSON line per compiled launch on stdout (the tests)

Cases: ViT-B's MLP fc1 768 -> 3072 and fc2 3072 -> 768 and BERT-base's QKV 768 -> 2304 at
T = 1, 256, 50,432 tokens (ViT-B/16 at batch 256: 256 x 197), 90% sparsity, bf16 and fp32;
formats fan-in (SRigL), block diagonals b = 1, 16, 64 (DynaDiag), unstructured (its weight
gradient, the SDDMM; its product is torch.sparse CSR) and the fused block-diagonal MLP
(b = 16, 64). fc2 at T = 256 in fp32 is SRigL's own benchmark (Linear 3072 -> 768, batch 256).
Each op (forward, input grad, weight grad; the MLP's forward and backward) is driven through
the public layers and ops with autograd, and every Triton launch it makes is captured
(bench/sass.py): new or renamed kernels appear without edits here. Nothing runs on CPU;
activations are ``torch.empty`` (untouched pages cost no memory).

Everything predicted is a MODEL, not a measurement, and says so in its column name. The
model and its constants are in bench/README.md ("The static report"). With a GPU
(torch.cuda.is_available()) every op is also timed (triton.testing.do_bench median) beside
dense cuBLAS, and the report adds the measured time and the model's error.

Outputs: bench/results/static/sm<cc>.md and .csv (--out to change).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GPU = torch.cuda.is_available()
if not GPU:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET unset or 0: the interpreter replaces the kernels this compiles")
    # kernels/__init__ switches the interpreter on without a GPU; this compiles instead.
    os.environ["TRITON_INTERPRET"] = "0"

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels  # noqa: E402
# L1_MODEL_BYTES: L1 as an LRU of 128 KB (256 KB an SM on sm_90, shared memory included)
try:
    from kernels.diag.pattern import L1_MODEL_BYTES, tile_l1_slices  # noqa: E402
except ImportError:  # an older kernels tree (a baseline report, bench/README.md): no tile lists
    L1_MODEL_BYTES, tile_l1_slices = 128 * 1024, None
from bench import common, sass  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "static"

LAYERS = {"fc1": (768, 3072), "fc2": (3072, 768), "qkv": (768, 2304)}
TOKENS = (1, 256, 50432)
DTYPES = ("bfloat16", "float32")
FORMATS = ("fanin", "diag1", "diag16", "diag64", "sparse", "mlp16", "mlp64")
DENSITY = 0.1

# Every figure below feeds the model only; sources in bench/README.md.
GPUS = {
    "H100": dict(hbm=3.35e12, l2=5.5e12, tc_bf16=700e12, fp32=67e12, sms=132),
    "H200": dict(hbm=4.5e12, l2=5.5e12, tc_bf16=790e12, fp32=67e12, sms=132),
}
TF32_OF_BF16 = 0.5          # TF32 tensor peak is half of bf16's (H100: 495 vs 989 dense)
MMA_SYNC_OF_WGMMA = 0.6     # mma.sync on Hopper: ~60% of the wgmma peak (public microbenchmarks)
SMEM_BYTES_PER_CLK = 128    # shared-memory bandwidth per SM and clock (operands of a wgmma)
TC_FLOP_PER_CLK = 4096      # dense bf16 tensor FLOP per SM and clock (989 TFLOP/s / 132 / 1.83 GHz)
LSU_CYCLES = 4              # a warp's memory instruction takes 4 issue cycles of a partition's 8 LD/ST units
CUBLAS_FP32_OF_PEAK = 0.8   # cuBLAS SGEMM (FFMA; torch's default fp32 matmul) at 80% of 67 TFLOP/s
LAUNCH_S = 5e-6             # per Triton launch from Python (its launcher's host overhead)
TORCH_OP_S = 2e-6           # per torch op on the device (glue: copies, casts, zeroing, bias)
CUBLAS_S = 3e-6             # per cuBLAS call


_NO_BYTES = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
             "reshape", "_reshape_alias", "t", "transpose", "permute", "as_strided", "expand", "slice", "select",
             "unsqueeze", "squeeze", "detach", "alias", "lift_fresh", "unbind", "split", "split_with_sizes",
             "narrow", "view_as", "_to_copy_meta", "numpy_T", "clone_meta", "unfold", "diagonal", "flatten",
             "contiguous", "set_", "resize_", "item", "_local_scalar_dense", "is_same_size", "sym_size",
             "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "zeros_like_meta",
             "_has_compatible_shallow_copy_type", "result_type"}


KERNEL_NAMESPACE = "alwayssparse"  # the project's custom ops: their kernels are modelled, not glue


def _custom_op_impl(func):
    """The Python implementation behind one of the project's custom ops (None if not found)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(f"{func.namespace}::{func._opname}")
    return None if opdef is None else opdef._init_fn


class GlueBytes(TorchDispatchMode):
    """Bytes read and written by the torch ops a launcher and its autograd run around the
    kernels (transposed copies, fp32 buffers and their casts, zeroing, bias): a model of
    their HBM traffic, one device pass each.

    A project custom op (``alwayssparse::*``) is not glue: its inputs and outputs are the
    kernels' own traffic, which the model counts already (activations, values). Its Python
    implementation runs with this mode re-entered instead, so the torch ops inside the
    launcher (a partial-sum reduction, a transposed copy) are counted and the op's I/O is not.
    Counting the op itself (as before) added x + y + values to every forward's HBM bytes."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == KERNEL_NAMESPACE:
            impl = _custom_op_impl(func)
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
            return func(*args, **kwargs)  # its inner ops go uncounted rather than double-counted
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name in _NO_BYTES:
            return out
        moved = moved_bytes(args, kwargs, out)
        if moved >= 4096:  # scalars and small index set-ups are launch cost, not traffic
            self.bytes += moved
            self.ops += 1
            self.names[name] = self.names.get(name, 0) + 1
        return out


def moved_bytes(args, kwargs, out) -> int:
    """Bytes of an op's tensors - inputs (lists too) and outputs, each once: one pass over HBM."""
    seen, moved = set(), 0
    for t in list(args) + list(kwargs.values()) + list(out if isinstance(out, (list, tuple)) else (out,)):
        for u in (t if isinstance(t, (list, tuple)) else (t,)):
            if isinstance(u, torch.Tensor) and id(u) not in seen:
                seen.add(id(u))
                moved += u.numel() * u.element_size()
    return moved


@dataclass
class Op:
    """One op at one shape: how to run it and what a perfect kernel would have to do."""
    fmt: str
    layer: str
    n_in: int
    n_out: int
    tokens: int
    dtype: str
    product: str            # fwd, dx, dw (mlp: fwd, bwd)
    block: int
    nnz: int
    index_bytes: int
    run: object             # () -> launches the op
    dense: object = None    # () -> the dense cuBLAS baseline (GPU timing only)
    recompute: float = 1.0  # fused MLP: fc1 blocks computed per stored block
    flops_dense: float = 0.0
    params: str = ""
    launches: list = field(default_factory=list)
    glue_bytes: int = 0
    glue_ops: int = 0
    error: str = ""

    @property
    def label(self) -> str:
        shape = f"{self.n_in}->{self.n_out}" + (f"->{self.n_in}" if self.fmt.startswith("mlp") else "")
        return f"{self.fmt} {self.product} {self.layer} {shape} T={self.tokens} {self.dtype}"


def _layer(fmt: str, n_in: int, n_out: int, dt: torch.dtype, device):
    g = torch.Generator().manual_seed(0)
    if fmt == "fanin":
        return kernels.FanInLinear(n_in, n_out, DENSITY, dtype=dt, generator=g).to(device)
    if fmt.startswith("diag"):
        b = int(fmt[4:])
        return kernels.DiagLinear(n_in, n_out, DENSITY, block_size=b, dtype=dt, generator=g).to(device)
    return kernels.SparseLinear(n_in, n_out, DENSITY, dtype=dt, generator=g).to(device)


def _act(T: int, n: int, dt, device, grad=False):
    if device.type == "cuda":
        t = torch.randn(T, n, device=device, dtype=dt)
    else:
        t = torch.empty(T, n, dtype=dt)  # never read: nothing runs
    return t.requires_grad_(grad)


def build_ops(formats, layers, tokens, dtypes, device) -> list[Op]:
    ops = []
    for dname in dtypes:
        dt = common.parse_dtype(dname)
        for fmt in formats:
            if fmt.startswith("mlp"):
                ops += _mlp_ops(fmt, tokens, dname, dt, device)
                continue
            for lname in layers:
                ops += layer_ops(fmt, lname, *LAYERS[lname], tokens, dname, device)
    return ops


def layer_ops(fmt: str, lname: str, n_in: int, n_out: int, tokens, dname: str, device,
              products=None) -> list[Op]:
    """The ops of one sparse layer (format ``fmt``, n_in -> n_out, named ``lname``) at each of
    ``tokens``: forward, input grad and weight grad (``products`` to choose; the unstructured
    format: its weight grad only); none where the block size does not divide the widths."""
    dt = common.parse_dtype(dname)
    b = int(fmt[4:]) if fmt.startswith("diag") else 1
    if n_in % b or n_out % b:
        return []
    try:
        layer = _layer(fmt, n_in, n_out, dt, device)
    except Exception as e:  # noqa: BLE001 - a layer that cannot be built gets a row
        return [Op(fmt, lname, n_in, n_out, 0, dname, "fwd", b, 0, 0, None, error=f"layer: {type(e).__name__}: {e}")]
    nnz = layer.values.numel()
    if fmt == "fanin":
        index_bytes, params = 4 * (nnz + layer.values.shape[0]), f"k={layer.values.shape[1]}"
    elif fmt.startswith("diag"):
        index_bytes, params = 4 * layer.offsets.numel(), f"K={layer.offsets.numel()}"
    else:
        index_bytes, params = 8 * nnz, f"nnz={nnz}"
    ops = []
    for T in tokens:
        for product in products or (("dw",) if fmt == "sparse" else ("fwd", "dx", "dw")):
            run, dense = _layer_closures(layer, fmt, product, T, n_in, n_out, dt, device)
            ops.append(Op(fmt, lname, n_in, n_out, T, dname, product, b, nnz, index_bytes, run,
                          dense, flops_dense=2.0 * T * n_in * n_out, params=params))
    return ops


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def _layer_closures(layer, fmt, product, T, n_in, n_out, dt, device):
    """(run, dense): the op through the public layer / autograd, and the dense cuBLAS product
    of the same shape (GPU timing)."""
    w = None

    def dense_w():
        nonlocal w
        if w is None:
            w = torch.randn(n_out, n_in, device=device, dtype=dt)
        return w

    if product == "fwd":
        def run():
            x = _act(T, n_in, dt, device)
            return lambda: _no_grad(layer, x)

        def dense():
            x, wt = _act(T, n_in, dt, device), dense_w()
            return lambda: torch.matmul(x, wt.t())
        return run, dense
    if fmt == "sparse":  # the unstructured weight gradient: the SDDMM at the stored coordinates
        def run():
            x, dy = _act(T, n_in, dt, device), _act(T, n_out, dt, device)
            return lambda: kernels.sddmm(dy, x, layer.rows, layer.cols)
    else:
        def run():
            # autograd's needs_input_grad follows requires_grad, not the inputs asked for:
            # only the wanted input requires a gradient while the graph is built
            # (and for dW the values only: a bias gradient is a column sum dense cuBLAS does not do)
            x, dy = _act(T, n_in, dt, device, grad=product == "dx"), _act(T, n_out, dt, device)
            layer.requires_grad_(False)
            layer.values.requires_grad_(product == "dw")
            try:
                y = layer(x)
            finally:
                layer.requires_grad_(True)
            wrt = x if product == "dx" else layer.values
            return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)

    def dense():
        x, dy, wt = _act(T, n_in, dt, device), _act(T, n_out, dt, device), dense_w()
        return (lambda: torch.matmul(dy, wt)) if product == "dx" else (lambda: torch.matmul(dy.t(), x))
    return run, dense


def _mlp_ops(fmt, tokens, dname, dt, device, dim: int | None = None, hidden: int | None = None) -> list[Op]:
    """The fused MLP's forward and backward (``fmt`` mlp<b>) at each of ``tokens``; ViT-B's
    768 -> 3072 -> 768 unless ``dim`` and ``hidden`` say otherwise."""
    b = int(fmt[3:])
    dim, hidden = (dim, hidden) if dim else LAYERS["fc1"]
    g = torch.Generator().manual_seed(0)
    try:
        fc1 = kernels.DiagLinear(dim, hidden, DENSITY, block_size=b, dtype=dt, generator=g).to(device)
        fc2 = kernels.DiagLinear(hidden, dim, DENSITY, block_size=b, dtype=dt, generator=g).to(device)
    except Exception as e:  # noqa: BLE001
        return [Op(fmt, "mlp", dim, hidden, 0, dname, "fwd", b, 0, 0, None, error=f"layer: {e}")]
    nnz = fc1.values.numel() + fc2.values.numel()
    recompute = _recompute(fc1, fc2, b, dim, hidden)
    params = f"K1={fc1.offsets.numel()} K2={fc2.offsets.numel()} recompute={recompute:.2f}"
    ops = []
    for T in tokens:
        for product in ("fwd", "bwd"):
            def run(T=T, product=product):
                if product == "fwd":
                    x = _act(T, dim, dt, device)
                    return lambda: _no_grad(kernels.fused_mlp, fc1, fc2, x)
                x, dy = _act(T, dim, dt, device, grad=True), _act(T, dim, dt, device)
                y = kernels.fused_mlp(fc1, fc2, x)
                wrt = [x, fc1.values, fc1.bias, fc2.values, fc2.bias]
                return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)

            def dense(T=T, product=product):
                w1 = torch.randn(hidden, dim, device=device, dtype=dt, requires_grad=product == "bwd")
                w2 = torch.randn(dim, hidden, device=device, dtype=dt, requires_grad=product == "bwd")
                b1, b2 = torch.zeros(hidden, device=device, dtype=dt), torch.zeros(dim, device=device, dtype=dt)
                x = _act(T, dim, dt, device, grad=product == "bwd")
                if product == "fwd":
                    return lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
                y, dy = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), torch.randn(T, dim, device=device, dtype=dt)
                return lambda: torch.autograd.grad(y, [x, w1, w2], dy, retain_graph=True)
            mult = 2 if product == "fwd" else 4  # dense: 2 GEMMs forward, 4 backward (dx, dW of each)
            ops.append(Op(fmt, "mlp", dim, hidden, T, dname, product, b, nnz, 4 * (fc1.offsets.numel()
                          + fc2.offsets.numel()), run, dense, recompute=recompute,
                          flops_dense=mult * 2.0 * T * dim * hidden, params=params))
    return ops


def _recompute(fc1, fc2, b, dim, hidden) -> float:
    """fc1 blocks the fused forward computes per stored fc1 block (bench/fused_mlp.py's model:
    hidden block j once for every fc2 block that reads it)."""
    try:
        from bench.fused_mlp import flop_model
        m = flop_model(dim, hidden, 1, b, fc1.offsets.cpu(), fc2.offsets.cpu())
        return float(m["recompute"])
    except Exception:  # noqa: BLE001 - the model moved: count it here
        return 1.0


def capture(op: Op, execute: bool) -> None:
    """Run the op's set-up, then record its launches and its torch glue."""
    if op.run is None:
        return
    try:
        with sass.recording(execute=execute):  # the set-up's own launches (a forward before a backward)
            call = op.run()
            call()  # once before counting: per-pattern index lists are built on the first call only
        glue = GlueBytes()
        with sass.recording(execute=execute) as seen, glue:
            call()
        op.launches, op.glue_bytes, op.glue_ops = seen, glue.bytes, glue.ops
        if not seen:
            op.error = "no Triton launch captured (a torch path ran)"
    except Exception as e:  # noqa: BLE001 - reported as a row
        op.error = f"{type(e).__name__}: {str(e)[:300]}"


_COMPILED: dict = {}


def compiled_sass(launch: sass.Launch, cc: int) -> tuple[sass.Sass | None, str, str]:
    """(SASS summary, cache key, error) of a launch on sm_<cc>, compiled once per specialisation."""
    try:
        if launch.compiled is not None and cc == _device_cc():
            key = ("jit", id(launch.compiled))
            kernel = launch.compiled
        else:
            key, _, _, _ = sass.specialise(launch, cc)
            kernel = None
        if key not in _COMPILED:
            kernel = kernel or sass.compile_launch(launch, cc)
            shared = getattr(kernel.metadata, "shared", None)
            _COMPILED[key] = sass.analyse(kernel.asm["cubin"], shared)
        return _COMPILED[key], str(hash(key)), ""
    except sass.Unsupported:
        if not GPU:
            raise
        return None, "", f"not compiled for sm_{cc}: this triton's JIT internals differ (only the device's own)"
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile gets a row saying so
        return None, "", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _device_cc() -> int | None:
    if not GPU:
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def l1_cached(s: sass.Sass | None) -> bool:
    """Whether the main loop's global loads can hit in L1: 16-byte cp.async (LDGSTS.*.BYPASS,
    what Triton emits for pipelined 128-bit loads) goes from L2 straight to shared memory, so
    a re-read of the same x block is another L2 read."""
    loads = (s.loop_loads or "") if s is not None else ""
    return not any(w.startswith("LDGSTS") and "BYPASS" in w for w in loads.split())


def stacked_slices(launch: sass.Launch | None) -> int | None:
    """T x b activation slices the weight-gradient kernel's tensor-core path reads per token:
    each of its N_GROUPS programs loads its G stacked blocks (padding lanes included) and the
    one block they share, so N_GROUPS x (G + 1) instead of 2 per stored block. None for any
    other launch."""
    if launch is None or launch.name not in ("diag_dw_kernel", "diag_dw_band_kernel"):
        return None
    bound = launch.bound()
    if launch.name == "diag_dw_band_kernel":
        # the band variant: each program's distinct dy and x blocks (its repeats hit in L1:
        # synchronous LDG.E.128, NUM_STAGES = 1)
        from kernels.diag.pattern import dw_band_slices
        return dw_band_slices(bound["table_ptr"], int(bound["NB"]))
    groups, stack = bound.get("groups_ptr"), bound.get("G")
    # the stacked table is [N_GROUPS, 1 + 2 G] (the run-of-blocks table, [N_GROUPS, 4], is not)
    if not bound.get("USE_DOT") or not isinstance(groups, torch.Tensor) or groups.shape[-1] != 1 + 2 * stack:
        return None
    return int(bound["N_GROUPS"]) * (int(stack) + 1)


def l1_slices(launch: sass.Launch) -> int | None:
    """Slices (BLOCK_T tokens x b features) of the gathered operand the programs of one token
    tile of ``diag_block_kernel`` read from L2 (model; so a token reads that many): each
    program's loads replayed in the kernel's order through an LRU of L1_MODEL_BYTES
    (``kernels.diag.pattern.tile_l1_slices``, from the launch's own tile list and
    TILE_GROUP). The values load .cg (L2 only) and stores do not allocate in L1: neither
    takes a place in it. Only for loads through L1 (``l1_cached``; the caller checks)."""
    if launch is None or launch.name != "diag_block_kernel":
        return None
    bound = launch.bound()
    if tile_l1_slices is None or not {"tile_ptr", "entries_ptr", "NB", "TILE_GROUP"} <= bound.keys():
        return None  # an older kernel without tile lists (a baseline): the tile rule
    slice_bytes = int(bound["BLOCK_T"]) * int(bound["B"]) * bound["a_ptr"].element_size()
    return tile_l1_slices(bound["tile_ptr"], bound["entries_ptr"], int(bound["N_OUT"]), int(bound["P"]),
                          int(bound["D"]), bool(bound["BY_OUT"]), int(bound["NB"]), int(bound["TILE_GROUP"]),
                          L1_MODEL_BYTES // slice_bytes)


def launch_slices(launch: sass.Launch | None, s: sass.Sass | None) -> int | None:
    """Activation slices of b features a token the launch reads from L2 where the model counts
    them from its tables: the weight gradient's stacks and bands (``stacked_slices``), the
    block kernel's L1 replay (``l1_slices``) when its loads go through L1; else None."""
    if launch is not None and launch.name == "diag_block_kernel":
        return l1_slices(launch) if l1_cached(s) else None
    return stacked_slices(launch)


def traffic(op: Op, e: int, block_t: int | None, programs: int | None,
            l1: bool = True, slices: int | None = None) -> tuple[float, float]:
    """(compulsory HBM bytes, L2-to-SM bytes) of the op (model).

    HBM: activations in and out once, values and indices once (and the glue's passes, added by
    the caller). L2: every stored element (b = 1) or b x b block (b >= 16) re-reads the
    activation slice it multiplies, T x b elements (x for fwd, dy for dx, both for dw) - but no
    program reads more than its whole token tile (BLOCK_T x width) when that fits in L1 - and
    every token tile of fwd / dx re-reads the values (dW reads none, it writes the gradient:
    its values term counts once). A model: L1 is taken as an LRU of 128 KB, and no L1 hit is
    counted when the main loop loads through L1-bypassing cp.async (``l1``). ``slices``
    (``launch_slices``): the slices of b features a token reads from L2, counted from the
    launch's own tables - a stacked or band weight gradient's (2 per block otherwise), the
    block kernel's L1 replay (``l1_slices``) - replacing the count above (no L1 hit on top:
    the tile rule stays for the other kernels). An MLP op
    here is the fused kernel's forward; separate launches are modelled one by one
    (``predict_by_launch``)."""
    T, n_in, n_out, nnz, b = op.tokens, op.n_in, op.n_out, op.nnz, op.block
    weights = nnz * e + op.index_bytes
    if op.fmt.startswith("mlp"):  # the fused kernel (the separate launches: predict_by_launch)
        if op.product != "fwd":
            raise ValueError("no model for this MLP backward: it is modelled launch by launch "
                             "(predict_by_launch), and a launch is of a kind it does not read")
        hbm = 2 * T * n_in * e + weights
        l2 = T * (nnz / 2) * op.recompute / b * e + nnz * e * math.ceil(T / (block_t or T))
        return hbm, l2
    act = T * (n_in + n_out) * e
    hbm = act + weights
    width = {"fwd": n_in, "dx": n_out, "dw": n_in + n_out}[op.product]  # the gathered operand(s)
    gathered = (2 if op.product == "dw" else 1) * T * nnz / b * e
    if slices:
        gathered = T * slices * b * e
    elif block_t and programs and l1:
        # A program touches at most its token tile of the gathered operand; re-reads of it hit
        # in L1 as far as the tile fits (a tile twice L1's share hits half of its re-reads).
        tile = min(block_t, T) * width * e
        unique = min(gathered, programs * tile)
        gathered = unique + (gathered - unique) * (1 - min(1.0, L1_MODEL_BYTES / tile))
    # Every token tile re-reads the values - except in dW, which reads none: it writes the
    # gradient (per token chunk; the partials' sum is glue) and reads its index tables once.
    l2 = gathered + weights * (1 if op.product == "dw" else math.ceil(T / (block_t or T)))
    return hbm, l2


def useful_flops(op: Op) -> float:
    if op.fmt.startswith("mlp"):
        half = op.nnz / 2  # fc1 and fc2 hold the same count at 768 <-> 3072
        if op.product == "fwd":
            return 2.0 * op.tokens * (half * op.recompute + half)
        return 2.0 * op.tokens * 5 * half  # h recomputed once (unfused), then dx and dW of both
    return 2.0 * op.tokens * op.nnz


def compute_peak(s: sass.Sass, gpu: dict, dtype: str) -> tuple[float, str]:
    """FLOP/s the main loop can reach (model) and why."""
    if s.mma != "none":
        peak = gpu["tc_bf16"] * (TF32_OF_BF16 if dtype == "float32" else 1.0)
        why = "tensor"
        if s.mma == "mma.sync":
            peak *= MMA_SYNC_OF_WGMMA
            why += f" x{MMA_SYNC_OF_WGMMA} mma.sync"
        elif s.mma_shape:
            m, n, k = (int(v) for v in s.mma_shape.split("x"))
            el = common.parse_dtype(dtype).itemsize
            # wgmma reads its B tile (and A unless from registers) from shared memory
            flop_per_clk = 2 * m * n * k / ((m * k + k * n) * el / SMEM_BYTES_PER_CLK)
            f = min(1.0, flop_per_clk / TC_FLOP_PER_CLK / (2 if dtype == "float32" else 1))
            if f < 1:
                peak *= f
                why += f" x{f:.2f} smem-fed {s.mma_shape}"
        if s.pipelined == "no":
            why += " (loads not pipelined: latency not modelled)"
        return peak, why
    peak = gpu["fp32"]
    if s.loop_insts and s.loop_fma:
        slots = max(s.loop_insts, LSU_CYCLES * s.loop_mem)
        f = min(1.0, s.loop_fma / slots)
        return peak * f, f"CUDA cores x{f:.3f} ({s.loop_fma} FMA / {slots} issue slots a loop iteration)"
    return peak, "CUDA cores (no FMA loop found)"


def predict(op: Op, primary: sass.Sass | None, programs: int | None, gpu: dict, block_t, slices=None):
    """Model time (s) of the op, of dense cuBLAS at the shape, and the bound that decides."""
    e = common.parse_dtype(op.dtype).itemsize
    hbm, l2 = traffic(op, e, block_t, programs, l1_cached(primary), slices)
    hbm += op.glue_bytes
    flops = useful_flops(op)
    if primary is not None:
        peak, why = compute_peak(primary, gpu, op.dtype)
    else:
        peak, why = gpu["fp32"], "CUDA cores (no SASS)"
    fill = min(1.0, (programs or gpu["sms"]) / gpu["sms"])  # a grid smaller than the SMs leaves some idle
    terms = {"compute": flops / (peak * fill), "HBM": hbm / (gpu["hbm"] * fill), "L2": l2 / (gpu["l2"] * fill)}
    bound = max(terms, key=terms.get)
    t = terms[bound] + LAUNCH_S * len(op.launches) + TORCH_OP_S * op.glue_ops
    return dict(t=t, t_dense=dense_time(op, gpu), bound=bound, why=why, flops=flops, hbm=hbm, l2=l2, fill=fill)


def dense_time(op: Op, gpu: dict) -> float:
    """Model time (s) of dense cuBLAS at the op's shape (bf16 tensor cores; fp32 FFMA: torch's
    default fp32 matmul); the MLP: its two GEMMs forward, four backward, the hidden via HBM."""
    e = common.parse_dtype(op.dtype).itemsize
    if op.fmt.startswith("mlp"):
        n_gemm = 2 if op.product == "fwd" else 4
        dense_bytes = (op.tokens * (2 * op.n_in + 4 * op.n_out) * e * (1 if op.product == "fwd" else 2)
                       + 2 * op.n_in * op.n_out * e)
        return gemm_time(op.flops_dense, dense_bytes, op.dtype, gpu, n_gemm) + TORCH_OP_S
    dense_bytes = op.tokens * (op.n_in + op.n_out) * e + op.n_in * op.n_out * e
    return gemm_time(op.flops_dense, dense_bytes, op.dtype, gpu)


def gemm_time(flops: float, nbytes: float, dtype: str, gpu: dict, calls: int = 1) -> float:
    """Model time (s) of ``calls`` dense cuBLAS GEMMs doing ``flops`` and moving ``nbytes`` in
    all: bf16 / fp16 on the tensor cores, fp32 as torch's default (FFMA, CUBLAS_FP32_OF_PEAK)."""
    peak = gpu["tc_bf16"] if dtype != "float32" else gpu["fp32"] * CUBLAS_FP32_OF_PEAK
    return max(flops / peak, nbytes / gpu["hbm"]) + calls * CUBLAS_S


_DW_KERNELS = ("diag_dw_kernel", "diag_dw_band_kernel")


def _layer_view(op: Op, launch: sass.Launch) -> Op:
    """The single-layer op one launch of a multi-kernel MLP op is (its tensors' widths and
    values; a GELU epilogue's second tensor, h or gelu(h), counted as HBM beside it)."""
    bound = launch.bound()
    e = common.parse_dtype(op.dtype).itemsize
    if launch.name in _DW_KERNELS:
        dy, x = bound["dy_ptr"], bound["x_ptr"]
        return replace(op, fmt=f"diag{op.block}", product="dw", n_in=x.shape[1], n_out=dy.shape[1],
                       nnz=int(bound["N_VALUES"]), index_bytes=op.index_bytes // 2, recompute=1.0,
                       launches=[launch], glue_bytes=0, glue_ops=0)
    a, values, out = bound["a_ptr"], bound["values_ptr"], bound["out_ptr"]
    aux = op.tokens * out.shape[1] * e if bound.get("EPILOGUE") in (1, 2) else 0
    return replace(op, fmt=f"diag{op.block}", product="fwd", n_in=a.shape[1], n_out=out.shape[1],
                   nnz=values.numel(), index_bytes=op.index_bytes // 2, recompute=1.0,
                   launches=[launch], glue_bytes=aux, glue_ops=0)


def predict_by_launch(op: Op, stats: list, gpus: dict) -> dict | None:
    """Model of an MLP op that runs as separate products (the backward; the forward where the
    launcher does not fuse it, kernels.fused's UNFUSED): each launch modelled as the layer op
    it is (its own tiles, L1 rule, stacked slices and SASS: ``_layer_view``), the times
    summed, the op's torch glue added once; the dense MLP's time as for the fused kernel.
    None where the fused kernel runs, or a launch is of another kind."""
    kinds = ("diag_block_kernel",) + _DW_KERNELS
    if not (op.fmt.startswith("mlp") and op.launches and all(l.name in kinds for l in op.launches)):
        return None
    parts = []  # per launch: its layer op, SASS, programs, BLOCK_T, slices (the same on every GPU)
    for launch, s in zip(op.launches, stats):
        block_t = launch.constexprs().get("BLOCK_T")
        parts.append((_layer_view(op, launch), s, launch.programs(), block_t if isinstance(block_t, int) else None,
                      launch_slices(launch, s)))
    models = {}
    for name, gpu in gpus.items():
        total = None
        for layer, s, programs, block_t, slices in parts:
            m = predict(layer, s, programs, gpu, block_t, slices)
            if total is None:
                total = dict(m, slowest=m["t"])
            else:
                for k in ("t", "flops", "hbm", "l2"):
                    total[k] += m[k]
                if m["t"] > total["slowest"]:
                    total.update(bound=m["bound"], why=m["why"], slowest=m["t"])
        total["t"] += TORCH_OP_S * op.glue_ops + op.glue_bytes / gpu["hbm"]
        total["hbm"] += op.glue_bytes
        total["t_dense"] = dense_time(op, gpu)
        models[name] = total
    return models


def primary_launch(op: Op, stats: list) -> int | None:
    """Index of the launch that dominates the op: most programs x main-loop instructions."""
    best, best_i = -1.0, None
    for i, (launch, s) in enumerate(zip(op.launches, stats)):
        if s is None:
            continue
        w = (launch.programs() or 1) * (s.loop_insts or s.instructions or 1)
        if w > best:
            best, best_i = w, i
    return best_i


CSV_FIELDS = [
    "op", "format", "product", "layer", "in", "out", "tokens", "dtype", "block", "params", "kernel", "launch",
    "launches", "cc", "num_warps", "num_stages", "constexprs", "programs", "registers", "spill_bytes",
    "shared_bytes", "blocks_per_sm", "mma", "mma_shape", "pipelined", "fences", "gpu_fences", "atomics", "calls",
    "loop_insts", "loop_fma", "loop_mma", "loop_mem", "loop_async", "loop_sync", "loop_loads",
    "insts_per_fma_or_mma",
    "gflop", "hbm_mb_model", "l2_mb_model", "glue_mb_model", "glue_ops",
    "model_not_measured_bound", "model_not_measured_compute_peak",
    "model_not_measured_h100_us", "model_not_measured_h200_us",
    "model_not_measured_dense_h100_us", "model_not_measured_dense_h200_us",
    "model_not_measured_x_dense_h100", "model_not_measured_x_dense_h200",
    "measured_us", "measured_dense_us", "measured_x_dense", "model_error", "error"]


def op_models(op: Op, cc: int) -> tuple[list, list, int | None, dict]:
    """(SASS of each launch, its compile error, the dominant launch's index, the model on each
    GPU: ``predict``'s dict by name) of a captured op compiled for sm_<cc>. Raises ValueError
    where the model cannot read the op."""
    stats, errors = [], []
    for launch in op.launches:
        s, _, err = compiled_sass(launch, cc)
        if s is not None and s.shared is not None and s.shared > sass.SMEM_LIMIT[cc]:
            err = f"shared memory {s.shared} B > the {sass.SMEM_LIMIT[cc]} B a block may have on sm_{cc}"
        stats.append(s)
        errors.append(err)
    p = primary_launch(op, stats)
    primary = stats[p] if p is not None else None
    block_t = op.launches[p].constexprs().get("BLOCK_T") if p is not None else None
    programs = op.launches[p].programs() if p is not None else None
    models = predict_by_launch(op, stats, GPUS)
    if models is None:
        slices = launch_slices(op.launches[p] if p is not None else None, primary)
        models = {name: predict(op, primary, programs, gpu, block_t if isinstance(block_t, int) else None,
                                slices) for name, gpu in GPUS.items()}
    return stats, errors, p, models


def rows_for(op: Op, cc: int, measured: dict | None) -> list[dict]:
    base = dict(op=op.label, format=op.fmt, product=op.product, layer=op.layer, tokens=op.tokens, dtype=op.dtype,
                block=op.block, params=op.params, launches=len(op.launches), cc=cc, error=op.error)
    base["in"], base["out"] = op.n_in, op.n_out
    if op.error and not op.launches:
        return [base]
    try:
        stats, errors, p, models = op_models(op, cc)
    except ValueError as e:
        return [dict(base, error="; ".join(x for x in (op.error, str(e)) if x))]
    out = []
    for i, (launch, s, err) in enumerate(zip(op.launches, stats, errors)):
        r = dict(base)
        kw = launch.kwargs
        consts = {k: v for k, v in launch.constexprs().items() if k.isupper() or k in ("ACC",)}
        r.update(kernel=launch.name, launch=i, num_warps=kw.get("num_warps", 4), num_stages=kw.get("num_stages", ""),
                 constexprs=" ".join(f"{k}={v}" for k, v in consts.items()), programs=launch.programs(),
                 error="; ".join(x for x in (op.error, err) if x))
        if s is not None:
            r.update(registers=s.registers, spill_bytes=s.spill_bytes, shared_bytes=s.shared,
                     blocks_per_sm=sass.blocks_per_sm(s.registers, r["num_warps"], s.shared, cc),
                     mma=s.mma, mma_shape=s.mma_shape, pipelined=s.pipelined, fences=s.fences,
                     gpu_fences=s.gpu_fences, atomics=s.atomics, calls=s.calls, loop_insts=s.loop_insts,
                     loop_fma=s.loop_fma, loop_mma=s.loop_mma, loop_mem=s.loop_mem, loop_async=s.loop_async,
                     loop_sync=s.loop_sync, loop_loads=s.loop_loads,
                     insts_per_fma_or_mma=None if s.insts_per_op is None else round(s.insts_per_op, 2))
        if i == (p if p is not None else 0):  # the op's model sits on its dominant launch's row
            h1, h2 = models["H100"], models["H200"]
            r.update(gflop=round(h1["flops"] / 1e9, 4), hbm_mb_model=round(h1["hbm"] / 1e6, 3),
                     l2_mb_model=round(h1["l2"] / 1e6, 3), glue_mb_model=round(op.glue_bytes / 1e6, 3),
                     glue_ops=op.glue_ops, model_not_measured_bound=h2["bound"],
                     model_not_measured_compute_peak=h2["why"],
                     model_not_measured_h100_us=round(h1["t"] * 1e6, 2),
                     model_not_measured_h200_us=round(h2["t"] * 1e6, 2),
                     model_not_measured_dense_h100_us=round(h1["t_dense"] * 1e6, 2),
                     model_not_measured_dense_h200_us=round(h2["t_dense"] * 1e6, 2),
                     model_not_measured_x_dense_h100=round(h1["t_dense"] / h1["t"], 3),
                     model_not_measured_x_dense_h200=round(h2["t_dense"] / h2["t"], 3))
            if measured:
                r.update(measured)
                if measured.get("measured_us"):
                    name = "H200" if "H200" in torch.cuda.get_device_name() else "H100"
                    r["model_error"] = round(models[name]["t"] * 1e6 / measured["measured_us"], 3)
        out.append(r)
    return out


def measure(op: Op) -> dict:
    """Median GPU times of the op and of dense cuBLAS at its shape (GPU only)."""
    import triton.testing

    try:
        call = op.run()
        t = triton.testing.do_bench(call, warmup=5, rep=20, return_mode="median")
        d = triton.testing.do_bench(op.dense(), warmup=5, rep=20, return_mode="median")
        return dict(measured_us=round(t * 1e3, 2), measured_dense_us=round(d * 1e3, 2),
                    measured_x_dense=round(d / t, 3))
    except Exception as e:  # noqa: BLE001
        return dict(error=f"timing: {type(e).__name__}: {str(e)[:200]}")


def _fmt(v, nd=2):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def read_baseline(path: str | None, cc: int) -> dict:
    """op -> its row (the op's model row) in an earlier report's sm<cc>.csv: the figures of
    the kernels before a change, beside today's. {} without one."""
    if not path:
        return {}
    p = Path(path)
    p = p / f"sm{cc}.csv" if p.is_dir() else p
    if not p.exists() or f"sm{cc}" not in p.name:  # a file is one architecture's (baseline_sm90.csv)
        return {}
    with open(p, newline="") as f:
        return {r["op"]: r for r in csv.DictReader(f) if r.get("model_not_measured_x_dense_h200")}


def write_report(rows: list[dict], cc: int, out: Path, header: dict, baseline: dict | None = None,
                 step: list[dict] | None = None) -> None:
    baseline = baseline or {}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"sm{cc}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    measured = any(r.get("measured_us") for r in rows)
    lines = [f"# Static report, sm_{cc} (compiled; times are a MODEL, not measured)", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "Regenerate: `python bench/static.py`. Columns, constants and the model: bench/README.md "
              "(\"The static report\"). `model` columns are predictions from the compiled code and a roofline, "
              "**not measurements**" + (" ; `measured` columns are do_bench medians on the GPU named above."
                                         if measured else "; no GPU was at hand, so nothing here is measured."), ""]
    lines += ["## Kernels (one row per compiled specialisation)", "",
              "| kernel | where (first op) | warps | regs | spill B | smem B | blocks/SM | MMA | pipelined | "
              "fences (GPU scope) | atomics | calls | main loop: insts / FMA / MMA / mem | insts per FMA or MMA | "
              "main-loop global loads |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if not r.get("kernel") or r.get("registers") is None:
            continue
        key = (r["kernel"], r["registers"], r["shared_bytes"], r["loop_insts"], r["constexprs"], r["dtype"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| `{r['kernel']}` | {r['op']} | {r['num_warps']} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes']} | {_fmt(r['blocks_per_sm'])} | {r['mma']} {r['mma_shape']} | "
                     f"{r['pipelined']} | {r['fences'] or '-'} ({r['gpu_fences']}) | {r['atomics'] or '-'} | "
                     f"{r['calls']} | {_fmt(r['loop_insts'])} / {r['loop_fma']} / {r['loop_mma']} / "
                     f"{r['loop_mem']} | {_fmt(r['insts_per_fma_or_mma'])} | {r.get('loop_loads') or '-'} |")
    lines += ["", "## Ops at the target shapes (90% sparse)", "",
              "`x dense` = dense cuBLAS time / op time at the same shape (> 1: faster than dense). "
              "The model's bound is the roofline term that decides.", "",
              "| op | params | kernels | GFLOP | HBM MB | L2 MB | glue MB | bound (model) | H100 us (model) | "
              "H200 us (model) | x dense H100 (model) | x dense H200 (model) |"
              + (" before: x dense H200 (model) |" if baseline else "")
              + (" measured us | x dense measured | model / measured |" if measured else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if baseline else "")
              + ("---|---|---|" if measured else "")]
    for r in rows:
        if r.get("model_not_measured_h100_us") is None:
            if r.get("error") and r.get("launch") in (None, 0):
                lines.append(f"| {r['op']} | {r.get('params', '')} | {r.get('kernel', '')} | failed: "
                             f"{r['error'][:160]} |" + " |" * (8 + bool(baseline) + 3 * measured))
            continue
        kern = r["kernel"] + (f" (+{r['launches'] - 1})" if r["launches"] > 1 else "")
        lines.append(f"| {r['op']} | {r['params']} | {kern} | {_fmt(r['gflop'], 3)} | {_fmt(r['hbm_mb_model'], 1)} | "
                     f"{_fmt(r['l2_mb_model'], 1)} | {_fmt(r['glue_mb_model'], 1)} | {r['model_not_measured_bound']} | "
                     f"{_fmt(r['model_not_measured_h100_us'], 1)} | {_fmt(r['model_not_measured_h200_us'], 1)} | "
                     f"{_fmt(r['model_not_measured_x_dense_h100'], 3)} | "
                     f"{_fmt(r['model_not_measured_x_dense_h200'], 3)} |"
                     + (f" {_before(baseline, r['op'])} |" if baseline else "")
                     + (f" {_fmt(r.get('measured_us'), 1)} | {_fmt(r.get('measured_x_dense'), 3)} | "
                        f"{_fmt(r.get('model_error'), 2)} |" if measured else ""))
    lines += ["", "## The issue's targets, judged by the model (not measured)", ""]
    lines += targets(rows)
    lines += ["", "## Block-diagonal and fused-MLP targets (issue 12), judged by the model (not measured)", "",
              "`before` = the same op in the baseline report (`--baseline`; see its header line above)."
              if baseline else "No baseline report for this architecture (`--baseline`).", ""]
    lines += block_targets(rows, baseline, step)
    if step:
        from bench import step_model

        lines += [""] + step_model.markdown(step)
        common.write_csv(out / f"step_sm{cc}.csv", step, step_model.FIELDS)
    lines += ["", "## Compute ceilings the model used (per op, H200)", ""]
    for r in rows:
        if r.get("model_not_measured_compute_peak"):
            lines.append(f"- {r['op']}: {r['model_not_measured_compute_peak']}")
    (out / f"sm{cc}.md").write_text("\n".join(lines) + "\n")


def _before(baseline: dict, op: str) -> str:
    r = baseline.get(op)
    if not r:
        return "-"
    return f"{float(r['model_not_measured_x_dense_h200']):.3f} ({r['kernel']})"


def block_targets(rows: list[dict], baseline: dict, step: list[dict] | None = None) -> list[str]:
    """Issue 12's targets (H200, bf16, T = 50,432): the model's ratio now, before (the
    baseline's) and how far from the target; with ``step`` (bench/step_model.py's rows) also
    the ViT-B/16 step and batch-1 inference against torch CSR (its floor)."""
    ops = {r["op"]: r for r in rows if r.get("model_not_measured_h200_us") is not None}
    out = ["| target | op | model H200 now | before | met (model) | missed by |", "|---|---|---|---|---|---|"]

    def ratio(names, table):
        got = [table.get(n) for n in names]
        if not all(got):
            return None
        dense = sum(float(r["model_not_measured_dense_h200_us"]) for r in got)
        return dense / sum(float(r["model_not_measured_h200_us"]) for r in got)

    def line(target, goal, names, label, now=None, before=None):
        if now is None:
            now, before = ratio(names, ops), ratio(names, baseline)
        if now is None:
            return
        out.append(f"| {target} | {label} | {now:.2f}x | {'-' if before is None else f'{before:.2f}x'} | "
                   f"{'-' if not goal else 'yes' if now >= goal else 'no'} | "
                   f"{'-' if now >= goal else f'{(1 - now / goal) * 100:.0f}%'} |")

    for layer in ("fc1", "fc2"):
        n_in, n_out = LAYERS[layer]
        shape = f"{layer} {n_in}->{n_out} T=50432 bfloat16"
        for b, goal in ((64, 2.5), (16, 2.0)):
            line(f"block-diagonal forward, b = {b}, >= {goal}x", goal, [f"diag{b} fwd {shape}"], f"diag{b} fwd {shape}")
        for b in (16, 64):
            line(f"forward + dX + dW, b = {b}, >= 2.0x", 2.0, [f"diag{b} {p} {shape}" for p in ("fwd", "dx", "dw")],
                 f"diag{b} fwd+dx+dw {shape}")
    for b, goal in ((64, 4.0), (16, 3.0)):
        name = f"mlp{b} fwd mlp 768->3072->768 T=50432 bfloat16"
        line(f"fused MLP forward, b = {b}, >= {goal}x the dense MLP", goal, [name], name)
        name_b = f"mlp{b} bwd mlp 768->3072->768 T=50432 bfloat16"
        line(f"fused MLP backward, b = {b} (no target; beside the forward)", 0.0, [name_b], name_b)
    from bench.step_model import csr_floor

    for layer in ("fc1", "fc2"):  # one token: the layer against torch CSR at its floor
        n_in, n_out = LAYERS[layer]
        for b in (16, 64):
            r = ops.get(f"diag{b} fwd {layer} {n_in}->{n_out} T=1 bfloat16")
            if r:
                csr = csr_floor(DENSITY * n_in * n_out, n_in, n_out, 1, "bfloat16", GPUS["H200"])
                line("batch-1 inference vs torch CSR (at its floor), >= 3.13x", 3.13, [],
                     f"diag{b} fwd {layer} T=1 bfloat16 vs CSR", now=csr / (float(r["model_not_measured_h200_us"]) * 1e-6))
    by = {(r["phase"], r["batch"], r["format"]): r for r in step or [] if not r.get("error")}
    for fmt in ("diag16", "diag64", "diag64-fused"):
        own, csr = by.get(("infer", 1, fmt)), by.get(("infer", 1, "csr"))
        if own and csr:
            line("batch-1 inference vs torch CSR (at its floor), >= 3.13x", 3.13, [],
                 f"ViT-B/16 inference, batch 1 (197 tokens), {fmt} vs csr (bench/step_model.py)",
                 now=float(csr["model_not_measured_h200_ms"]) / float(own["model_not_measured_h200_ms"]))
    for fmt in ("diag64", "diag64-fused", "diag16", "diag16-fused"):
        own = by.get(("train", 256, fmt))
        if own and own.get("model_not_measured_x_dense_h200"):
            line("ViT-B/16 training step, DynaDiag b = 64, >= 1.5x dense" + ("" if fmt == "diag64" else
                 " (beside it: " + ("fused MLP)" if fmt == "diag64-fused" else f"b = 16{fmt[6:].replace('-', ', ')})")),
                 1.5, [], f"bench/e2e.py's step, batch 256, {fmt} (bench/step_model.py)",
                 now=float(own["model_not_measured_x_dense_h200"]))
    return out


FP32_FLOOR_TFLOPS = 67.0  # the CUDA-core floor of the targets: sparse FLOPs / 67 TFLOP/s


def targets(rows: list[dict]) -> list[str]:
    """Issue 11's targets for the element-wise kernels, each with the model's figure (H200 and
    H100) and whether it meets it; measured figures beside them when there are any."""
    ops = {r["op"]: r for r in rows if r.get("model_not_measured_h200_us") is not None}

    def get(fmt, product, layer, T, dtype):
        n_in, n_out = LAYERS[layer]
        return ops.get(f"{fmt} {product} {layer} {n_in}->{n_out} T={T} {dtype}")

    out = ["| target | op | model H200 | model H100 | measured | met (model H200) |", "|---|---|---|---|---|---|"]

    def line(target, r, value_h200, value_h100, measured, ok):
        out.append(f"| {target} | {r['op']} | {value_h200} | {value_h100} | {measured} | "
                   f"{'yes' if ok else 'no'} |")

    r = get("fanin", "fwd", "fc2", 256, "float32")
    if r:
        line("fan-in fwd >= 1.7x dense at SRigL's setting (fp32)", r, r["model_not_measured_x_dense_h200"],
             r["model_not_measured_x_dense_h100"], _fmt(r.get("measured_x_dense"), 3),
             r["model_not_measured_x_dense_h200"] >= 1.7)
    for layer in LAYERS:
        for T in (1, 256):
            r = get("fanin", "fwd", layer, T, "bfloat16")
            if r:
                line("fan-in fwd >= 1x dense in bf16, batch <= 256", r, r["model_not_measured_x_dense_h200"],
                     r["model_not_measured_x_dense_h100"], _fmt(r.get("measured_x_dense"), 3),
                     r["model_not_measured_x_dense_h200"] >= 1.0)
    for dtype in DTYPES:
        for layer in LAYERS:
            for T in TOKENS:
                f, d = get("fanin", "fwd", layer, T, dtype), get("fanin", "dx", layer, T, dtype)
                if f and d:
                    r2 = d["model_not_measured_h200_us"] / f["model_not_measured_h200_us"]
                    r1 = d["model_not_measured_h100_us"] / f["model_not_measured_h100_us"]
                    m = (_fmt(d["measured_us"] / f["measured_us"], 2) if d.get("measured_us") and f.get("measured_us")
                         else "")
                    line("fan-in dx time <= 1.5x the forward's", d, f"{r2:.2f}x", f"{r1:.2f}x", m, r2 <= 1.5)
    for dtype in DTYPES:
        for fmt in ("fanin", "diag1"):
            for product in ("fwd", "dx"):
                for layer in LAYERS:
                    r = get(fmt, product, layer, 50432, dtype)
                    if r:
                        floor = r["gflop"] * 1e9 / (FP32_FLOOR_TFLOPS * 1e12) * 1e6
                        line("T = 50,432 within 1.3x of the CUDA-core floor", r,
                             f"{r['model_not_measured_h200_us'] / floor:.2f}x of {floor:.0f} us",
                             f"{r['model_not_measured_h100_us'] / floor:.2f}x",
                             _fmt(r["measured_us"] / floor, 2) if r.get("measured_us") else "",
                             r["model_not_measured_h200_us"] <= 1.3 * floor)
    return out


def header(args) -> dict:
    import platform
    import subprocess

    import triton

    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    h = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": sha, "torch": torch.__version__,
         "triton": triton.__version__, "python": platform.python_version(),
         "compiled on": torch.cuda.get_device_name() if GPU else "CPU (no GPU; ptxas of the triton wheel)",
         "launch configs": f"the launchers' own choice (table key {kernels.runtime.device_key()!r})",
         "per-call index checks": "off (kernels.set_checks(False), as benchmarks run)",
         "model constants": "; ".join(f"{k}: HBM {v['hbm'] / 1e12:.2f} TB/s, L2 {v['l2'] / 1e12:.1f} TB/s, "
                                      f"bf16 tensor {v['tc_bf16'] / 1e12:.0f} TFLOP/s, fp32 FMA "
                                      f"{v['fp32'] / 1e12:.0f} TFLOP/s, {v['sms']} SMs" for k, v in GPUS.items())}
    return h


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--archs", default="90,80")
    p.add_argument("--products", default="", help="only these products (fwd,dx,dw,bwd); default all")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--json", action="store_true", help="one JSON line per launch on stdout, no files")
    p.add_argument("--no-measure", action="store_true", help="on a GPU: compile and model only")
    p.add_argument("--baseline", default="",
                   help="an earlier report's folder or sm<cc>.csv: its x dense figures go beside today's")
    p.add_argument("--no-step", action="store_true",
                   help="leave out the ViT-B/16 step model (bench/step_model.py; ~1-2 min on CPU, off on a GPU)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="stop starting new ops after this many seconds and write what is done (0: no limit)")
    args = p.parse_args(argv)
    kernels.set_checks(False)
    if not GPU:
        kernels.set_backend("triton")  # CPU tensors take the Triton launchers (captured, never run)
    device = torch.device("cuda" if GPU else "cpu")
    t0 = time.time()
    ops = build_ops(args.formats.split(","), args.layers.split(","), [int(t) for t in args.tokens.split(",")],
                    args.dtypes.split(","), device)
    if args.products:
        keep = set(args.products.split(","))
        ops = [op for op in ops if op.product in keep]
    if GPU:  # a time-boxed GPU run measures what matters first: SRigL's setting, then bf16 at scale
        ops.sort(key=lambda op: (not (op.fmt == "fanin" and op.layer == "fc2" and op.tokens == 256),
                                 op.tokens == 1, op.dtype != "bfloat16"))
    archs = [int(a) for a in args.archs.split(",")]
    rows = {cc: [] for cc in archs}
    baselines = {cc: read_baseline(args.baseline, cc) for cc in archs}  # read before --out is written
    failed = 0
    h = header(args)
    if args.baseline:
        h["baseline (before column)"] = (f"{args.baseline}: the kernels at 226cef5 under this model, but "
                                         "the MLP backward's rows under the earlier one-formula model "
                                         "(bench/README.md)" if "baseline_sm" in args.baseline else args.baseline)

    step = None

    def write(done: int) -> None:
        h["run time"] = f"{time.time() - t0:.0f} s" + (f" ({done} of {len(ops)} ops: budget spent)"
                                                       if done < len(ops) else "")
        for cc in archs:
            write_report(rows[cc], cc, Path(args.out), h, baselines[cc], step if cc == 90 else None)

    done = 0
    for n, op in enumerate(ops):
        if args.budget_s and time.time() - t0 > args.budget_s:
            break
        print(f"[{time.time() - t0:6.0f} s] {n + 1}/{len(ops)} {op.label}", file=sys.stderr, flush=True)
        capture(op, execute=GPU)
        measured = measure(op) if GPU and not args.no_measure and not op.error else None
        for cc in archs:
            rs = rows_for(op, cc, measured)
            rows[cc] += rs
            failed += sum(1 for r in rs if r.get("error"))
            if args.json:
                for r in rs:
                    print(json.dumps(r, default=str), flush=True)
        op.launches = [sass.Launch(launch.fn, (), {}, None) for launch in op.launches]  # free the tensors
        if GPU:
            torch.cuda.empty_cache()
        done = n + 1
        if not args.json and GPU and done % 10 == 0:  # a run stopped by its timeout keeps what it measured
            write(done)
    if not args.json:
        if 90 in archs and not (GPU or args.no_step or (args.budget_s and time.time() - t0 > args.budget_s)):
            from bench import step_model

            step = step_model.rows(log=lambda m: print(f"[{time.time() - t0:6.0f} s] {m}", file=sys.stderr,
                                                       flush=True))
            failed += sum(1 for r in step if r.get("error"))
        write(done)
        print(f"wrote {args.out}/sm{{{','.join(map(str, archs))}}}.md/.csv: {done} of {len(ops)} ops, "
              f"{len(_COMPILED)} compiled kernels, {failed} rows with errors, {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except sass.Unsupported as e:
        print(json.dumps(dict(unsupported=str(e))))
        sys.exit(3)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
