"""Compile captured Triton launches for NVIDIA targets without a GPU and read their SASS.

One compile path for the project (bench/static.py's report and the CPU tests in
tests/kernels/test_gpu_compile.py): the real launchers are called on CPU tensors with
TRITON_INTERPRET=0; ``JITFunction.run`` is replaced by a recorder, so a launch is captured
with its exact arguments, constexprs, options and grid and nothing runs; each captured launch
is bound by Triton's own binder (integers equal to 1 become constants, pointers, strides and
sizes divisible by 16 are marked so - why a probe must use the real shapes) and compiled with
``triton.compile`` for sm_90 / sm_80 with the ptxas of the triton wheel. On a GPU machine
(whose triton may differ from the one the binder calls were written for, 3.8) the launches run
for real and the JIT's own compiled kernel is read instead.

SASS comes from the wheel's nvdisasm; ``analyse`` finds the loops (a branch back to a lower
address), picks the main loop (the innermost loop with the most MMA, then FMA, then
instructions) and counts what it issues per iteration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.runtime.jit import JITFunction

# Shared memory per block the devices allow (bytes): H100 227 KB, A100 163 KB.
SMEM_LIMIT = {90: 232448, 80: 166912}
# Per SM: 64K 32-bit registers, 64 resident warps (H100 and A100), 32 resident blocks.
REGS_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 64, 32


def _tool(name: str) -> str:
    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(here) if here.exists() else name


@dataclass
class Launch:
    """One kernel launch as a launcher made it (nothing executed)."""
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: object
    compiled: object = None  # on a GPU: the JIT's own CompiledKernel

    @property
    def name(self) -> str:
        return self.fn.__name__

    def bound(self) -> dict:
        """The launch's arguments by parameter name (positional and keyword)."""
        out = dict(zip([p.name for p in self.fn.params], self.args))
        out.update(self.kwargs)
        return out

    def programs(self) -> int | None:
        """Number of programs in the grid (None when it cannot be evaluated here)."""
        grid = self.grid
        try:
            if callable(grid):
                grid = grid(self.bound())
            n = 1
            for g in grid:
                n *= int(g)
            return n
        except Exception:  # noqa: BLE001 - a grid lambda needing more than we have
            return None

    def constexprs(self) -> dict:
        out = {}
        names = [p.name for p in self.fn.params]
        for p, value in zip(self.fn.params, self.args):
            if p.is_constexpr:
                out[p.name] = value
        for k, v in self.kwargs.items():
            if k in names:
                out[k] = v
        return out


@contextlib.contextmanager
def recording(execute: bool = False):
    """Record every ``JITFunction.run`` inside the block into the yielded list. ``execute``:
    also run it (on a GPU: the launch happens and its CompiledKernel is kept); otherwise the
    launch returns None at once and the launcher goes on with an unwritten output."""
    seen: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launch = Launch(self, args, dict(kwargs), grid)
        seen.append(launch)
        if execute:
            launch.compiled = original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return launch.compiled
        return None

    JITFunction.run = record
    try:
        yield seen
    finally:
        JITFunction.run = original


class Unsupported(Exception):
    """This triton's JIT internals differ from the ones ``compile_launch`` drives."""


def _binder(fn, backend):
    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        raise Unsupported(f"triton {triton.__version__}: {e}") from e
    return create_function_from_signature(fn.signature, fn.params, backend)


def specialise(launch: Launch, cc: int):
    """(cache key, ASTSource, options) of a launch on target sm_<cc>, as the JIT binds it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    try:
        binder = _binder(launch.fn, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization,
                                                                     options)
    except Unsupported:
        raise
    except (AttributeError, TypeError, KeyError) as e:  # internals of another triton
        raise Unsupported(f"triton {triton.__version__}: {type(e).__name__}: {e}") from e
    src = triton.compiler.ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    key = (launch.fn.__module__, launch.fn.__name__, cc, repr(signature), repr(sorted(constexprs.items(), key=str)),
           repr(attrs), repr(sorted(options.__dict__.items(), key=str)))
    return key, src, target, options


def compile_launch(launch: Launch, cc: int):
    """The compiled kernel of a captured launch for sm_<cc> (Triton's on-disk cache applies)."""
    _, src, target, options = specialise(launch, cc)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return triton.compile(src, target=target, options=options.__dict__)


@dataclass
class Sass:
    """What the SASS of one kernel says (counts per thread of one warp instruction each)."""
    registers: int | None = None
    spill_bytes: int | None = None   # local memory per thread (register spills and stack arrays)
    shared: int | None = None        # bytes per block, Triton's own count (dynamic + static)
    instructions: int = 0
    mma: str = "none"                # "wgmma" (HGMMA), "mma.sync" (HMMA), "none"
    mma_shape: str = ""              # e.g. 64x16x16
    pipelined: str = "no"            # async copies / TMA in the kernel
    fences: str = ""                 # MEMBAR variants with counts
    gpu_fences: int = 0              # MEMBAR at GPU or system scope, CCTL.IVALL
    atomics: str = ""                # RED / ATOM variants with counts
    calls: int = 0                   # CALL instructions (slow paths such as 64-bit division)
    loops: int = 0
    loop_insts: int | None = None    # instructions in the main loop's body
    loop_fma: int = 0                # FMA lanes per thread in it (FFMA 1, HFMA2 2, DFMA 1)
    loop_mma: int = 0                # MMA instructions in it
    loop_mem: int = 0                # memory instructions in it (global, shared, atomics)
    loop_global_loads: int = 0
    loop_async: int = 0              # LDGSTS / UTMALDG in it
    loop_sync: int = 0               # BAR.SYNC / WARPSYNC / DEPBAR waits in it
    loop_calls: int = 0
    loop_fences: int = 0
    loop_loads: str = ""             # the main loop's global loads by width, e.g. LDG.E.128x2
    notes: list = field(default_factory=list)

    @property
    def insts_per_op(self) -> float | None:
        """Main-loop instructions per MMA (MMA kernels) or per FMA lane (CUDA-core kernels)."""
        if self.loop_insts is None:
            return None
        if self.loop_mma:
            return self.loop_insts / self.loop_mma
        if self.loop_fma:
            return self.loop_insts / self.loop_fma
        return None


_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_MEM = ("LDG", "STG", "LDS", "STS", "LDSM", "LDGSTS", "RED", "ATOM", "ATOMG", "ATOMS", "REDG", "LD", "ST",
        "UTMALDG", "UTMASTG", "LDL", "STL")


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, timeout=120)
    return done.stdout


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local bytes) from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              timeout=120)
    regs = re.search(r"REG:(\d+)", done.stdout)
    local = re.search(r"LOCAL:(\d+)", done.stdout)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


def _parse(text: str):
    insts, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INST.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            insts.append((addr, m.group(3), m.group(4)))
    for lab in pending:
        labels[lab] = insts[-1][0] + 16 if insts else 0
    return insts, labels


def _is_fma(op: str) -> int:
    base = op.split(".")[0]
    if base == "FFMA" or base == "DFMA":
        return 1
    if base == "HFMA2" and ".MMA" not in op:  # HFMA2.MMA is ptxas's register-move idiom
        return 2
    return 0


def _is_mma(op: str) -> bool:
    return op.startswith(("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA"))


_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alwayssparse-sass"


def analyse(cubin: bytes, shared: int | None = None) -> Sass:
    """The summary of a cubin's SASS, cached on disk by the cubin's hash (nvdisasm takes
    ~1 s a kernel on a shared core)."""
    path = _CACHE / f"{hashlib.sha256(cubin).hexdigest()}.json"
    try:
        s = Sass(**json.loads(path.read_text()))
        s.shared = shared
        return s
    except (OSError, ValueError, TypeError):
        pass
    s = _analyse(cubin, shared)
    try:
        _CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(s)))
        tmp.replace(path)
    except OSError:
        pass
    return s


def _analyse(cubin: bytes, shared: int | None = None) -> Sass:
    s = Sass(shared=shared)
    s.registers, s.spill_bytes = resource_usage(cubin)
    insts, labels = _parse(disassemble(cubin))
    s.instructions = len(insts)
    ops = [op for _, op, _ in insts]
    mmas = [op for op in ops if _is_mma(op)]
    if any(op.startswith("HGMMA") for op in mmas):
        s.mma = "wgmma"
        m = re.search(r"HGMMA\.(\d+x\d+x\d+)", next(op for op in mmas if op.startswith("HGMMA")))
        s.mma_shape = m.group(1) if m else ""
    elif mmas:
        s.mma = "mma.sync"
        m = re.search(r"HMMA\.(\d+)", mmas[0])
        s.mma_shape = {"16816": "16x8x16", "1688": "16x8x8", "1684": "16x8x4"}.get(m.group(1), m.group(1)) if m else ""
    async_ops = sorted({op.split(".")[0] for op in ops if op.startswith(("LDGSTS", "UTMALDG", "UBLKCP"))})
    s.pipelined = "+".join(async_ops) if async_ops else "no"
    s.fences = _counts(op for op in ops if op.startswith(("MEMBAR", "CCTL.IVALL")))
    # a release / acquire at GPU scope: MEMBAR.*.GPU / .SYS, and the L1 invalidation of an acquire
    s.gpu_fences = sum(1 for op in ops if (op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op))
                       or op.startswith("CCTL.IVALL"))
    s.atomics = _counts(op for op in ops if op.startswith(("RED", "ATOM")))
    s.calls = sum(1 for op in ops if op.startswith("CALL"))
    # Loops: a branch to a label at or below its own address.
    loops = []
    for i, (addr, op, rest) in enumerate(insts):
        if op.startswith("BRA") or op.startswith("JMP"):
            t = _TARGET.search(rest)
            if t and t.group(1) in labels and labels[t.group(1)] <= addr:
                loops.append((labels[t.group(1)], addr))
    loops = [lp for lp in loops if lp[0] < lp[1] or lp[0] == lp[1]]
    # an idle loop `.L: BRA .L` after EXIT is the kernel's end marker, not a loop
    loops = [lp for lp in loops if lp[1] > lp[0]]
    s.loops = len(loops)
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    best = None
    for lo, hi in innermost:
        body = [op for addr, op, _ in insts if lo <= addr <= hi]
        score = (sum(_is_mma(op) for op in body), sum(_is_fma(op) for op in body), len(body))
        if best is None or score > best[0]:
            best = (score, body)
    if best is not None:
        body = best[1]
        s.loop_insts = len([op for op in body if not op.startswith("NOP")])
        s.loop_fma = sum(_is_fma(op) for op in body)
        s.loop_mma = sum(_is_mma(op) for op in body)
        s.loop_mem = sum(1 for op in body if op.split(".")[0] in _MEM)
        s.loop_global_loads = sum(1 for op in body if op.split(".")[0] in ("LDG", "LDGSTS", "UTMALDG"))
        s.loop_async = sum(1 for op in body if op.startswith(("LDGSTS", "UTMALDG", "UBLKCP")))
        s.loop_sync = sum(1 for op in body if op.startswith(("BAR.SYNC", "WARPSYNC", "DEPBAR", "WARPGROUP.DEPBAR")))
        s.loop_calls = sum(1 for op in body if op.startswith("CALL"))
        s.loop_fences = sum(1 for op in body if op.startswith("MEMBAR"))
        s.loop_loads = _counts(op for op in body if op.startswith(("LDG", "UTMALDG")))
    return s


def _counts(ops) -> str:
    c: dict[str, int] = {}
    for op in ops:
        c[op] = c.get(op, 0) + 1
    return " ".join(f"{k}x{v}" for k, v in sorted(c.items()))


def blocks_per_sm(registers: int | None, num_warps: int, shared: int | None, cc: int) -> int | None:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256),
    shared memory and the warp / block limits."""
    if registers is None:
        return None
    per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = SMEM_LIMIT[cc] // shared if shared else BLOCKS_PER_SM
    return max(0, min(BLOCKS_PER_SM, WARPS_PER_SM // num_warps, by_regs, by_smem))
