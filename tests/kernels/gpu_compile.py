"""Compile every Triton kernel for NVIDIA GPUs on a machine without one.

The interpreter runs the kernels' Python semantics; it does not run Triton's compiler, which
rejects things the interpreter accepts (types that do not unify across branches, non-constexpr
shapes, shared memory beyond the device). This script calls the real launchers on small CPU
tensors with TRITON_INTERPRET=0, stops each launch at ``JITFunction.run`` (nothing runs), and
compiles what was captured - the exact arguments, constexprs and launch options a GPU would
get from the default configs - to a cubin for sm_90 (H100) and sm_80 (A100) with the ptxas
that ships in the triton wheel. One JSON line per compilation on stdout.

    TRITON_INTERPRET=0 python -m tests.kernels.gpu_compile
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the kernels this compiles")
# ptxas prints registers and spills per kernel with -v, which Triton passes and shows with
# this knob; a cached kernel skips ptxas, so compile every time.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"

import torch  # noqa: E402

import kernels  # noqa: E402
import triton  # noqa: E402
import triton.compiler as tc  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Exit status when this triton's internals (the JIT binder, _pack_args) differ from the ones
# this script drives (written against triton 3.8): the test then skips, naming the version.
UNSUPPORTED = 3
try:
    from triton.compiler import make_backend  # noqa: E402
    from triton.runtime.jit import create_function_from_signature  # noqa: E402
except ImportError as e:  # pragma: no cover - other triton versions
    print(json.dumps(dict(unsupported=f"triton {triton.__version__}: {e}")))
    sys.exit(UNSUPPORTED)

# Shared memory per block the devices allow (bytes): H100 227 KB, A100 163 KB.
TARGETS = {90: 232448, 80: 166912}


class _Captured(Exception):
    pass


def capture(launch) -> list[tuple]:
    """The (kernel, args, kwargs) of every kernel launch ``launch()`` makes, none executed."""
    seen = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, dict(kwargs)))
        raise _Captured

    JITFunction.run = record
    try:
        launch()
    except _Captured:
        pass
    finally:
        JITFunction.run = original
    return seen


def compile_launch(fn, args, kwargs, cc: int):
    """Compile one captured launch as Triton's JIT would on that device: its own binder makes
    the specialisation (integers equal to 1 become constants, pointers and integers divisible
    by 16 are marked so), then ``triton.compile`` for the target. Returns (compiled, registers
    a thread, spilled bytes) from ptxas's report."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = tc.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return compiled, (int(regs.group(1)) if regs else None), (max(spills) if spills else None)


def launches():
    """(name, launch) pairs covering every kernel and each constexpr branch the launchers use."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    def i32(*values):
        return torch.tensor(values, dtype=torch.int32)

    out = []
    for dt in (torch.bfloat16, torch.float32):  # fp16 takes bf16's code paths
        tag = str(dt)[6:]
        idx = torch.stack([torch.randperm(96, generator=g)[:8] for _ in range(24)]).to(torch.int32)
        v = rnd(24, 8, dtype=dt)
        out += [
            (f"fanin_fwd {tag}", lambda v=v, dt=dt, idx=idx: kernels.fanin_fwd(rnd(40, 96, dtype=dt), v, idx, None, 24)),
            (f"fanin_fwd ablated {tag}", lambda v=v, dt=dt, idx=idx: kernels.fanin_fwd(
                rnd(40, 96, dtype=dt), v, idx, torch.arange(0, 48, 2, dtype=torch.int32), 48)),
            (f"fanin_dx {tag}", lambda v=v, dt=dt, idx=idx: kernels.fanin_dx(rnd(40, 24, dtype=dt), v, idx, None, 96)),
            (f"sddmm elem {tag}", lambda dt=dt: kernels.sddmm_fwd(rnd(40, 24, dtype=dt), rnd(40, 96, dtype=dt),
                                                                i32(0, 5, 23), i32(1, 95, 7))),
            # many tokens, few coordinates: the split-token (atomic) path
            (f"sddmm elem split-T {tag}", lambda dt=dt: kernels.sddmm_fwd(
                rnd(16384, 4, dtype=dt), rnd(16384, 4, dtype=dt), i32(0, 3), i32(1, 2))),
            (f"sddmm block b=16 split-T {tag}", lambda dt=dt: kernels.sddmm_fwd(
                rnd(16384, 32, dtype=dt), rnd(16384, 32, dtype=dt), i32(0, 1), i32(1, 0), 16)),
            (f"sddmm block b=64 {tag}", lambda dt=dt: kernels.sddmm_fwd(
                rnd(64, 128, dtype=dt), rnd(64, 192, dtype=dt), i32(0, 1), i32(2, 0), 64)),
            (f"diag b=1 wide fwd {tag}", lambda dt=dt: kernels.diag_fwd(
                rnd(40, 96, dtype=dt), rnd(3, 24, 1, 1, dtype=dt), i32(0, 5, 9), 1, 24)),
            (f"diag b=1 wide dx {tag}", lambda dt=dt: kernels.diag_dx(
                rnd(40, 24, dtype=dt), rnd(3, 24, 1, 1, dtype=dt), i32(0, 5, 9), 1, 96)),
        ]
        for b in (16, 32, 64):
            n_small, n_big = 2 * b, 6 * b  # fc1-like tall (small -> big) and fc2-like wide
            vals = rnd(2, 2, b, b, dtype=dt)
            out += [
                (f"diag b={b} tall fwd {tag}", lambda b=b, vals=vals, dt=dt, n_small=n_small, n_big=n_big: kernels.diag_fwd(
                    rnd(40, n_small, dtype=dt), vals, i32(0, 3), b, n_big)),
                (f"diag b={b} tall dx {tag}", lambda b=b, vals=vals, dt=dt, n_small=n_small, n_big=n_big: kernels.diag_dx(
                    rnd(40, n_big, dtype=dt), vals, i32(0, 3), b, n_small)),
                (f"diag b={b} wide fwd {tag}", lambda b=b, vals=vals, dt=dt, n_small=n_small, n_big=n_big: kernels.diag_fwd(
                    rnd(40, n_big, dtype=dt), vals, i32(0, 3), b, n_small)),
                (f"fused mlp b={b} {tag}", lambda b=b, dt=dt, n_small=n_small, n_big=n_big: kernels.fused_diag_mlp_fwd(
                    rnd(40, n_small, dtype=dt), rnd(2, 2, b, b, dtype=dt), i32(0, 3), rnd(n_big, dtype=dt),
                    rnd(2, 2, b, b, dtype=dt), i32(1, 4), rnd(n_small, dtype=dt), b, n_big, n_small)),
            ]
    return out


def main() -> int:
    kernels.set_checks(True)
    probe = capture(lambda: kernels.sddmm_fwd(torch.ones(16, 2), torch.ones(16, 2),
                                              torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)))
    try:
        compile_launch(*probe[0][:2], dict(probe[0][2]), 90)
    except (AttributeError, TypeError, ValueError, KeyError) as e:  # internals of another triton
        print(json.dumps(dict(unsupported=f"triton {triton.__version__}: {type(e).__name__}: {e}")))
        return UNSUPPORTED
    failed = 0
    for name, launch in launches():
        calls = capture(launch)
        if not calls:
            print(json.dumps(dict(case=name, ok=False, error="no kernel launch captured")))
            failed += 1
        for fn, args, kwargs in calls:
            for cc, smem_limit in TARGETS.items():
                row = dict(case=name, kernel=fn.__name__, cc=cc, num_warps=kwargs.get("num_warps"),
                           num_stages=kwargs.get("num_stages"))
                try:
                    compiled, regs, spill_bytes = compile_launch(fn, args, dict(kwargs), cc)
                    row.update(ok=compiled.metadata.shared <= smem_limit, shared=compiled.metadata.shared,
                               smem_limit=smem_limit, registers=regs, spill_bytes=spill_bytes,
                               cubin_bytes=len(compiled.asm["cubin"]))
                except Exception as e:  # noqa: BLE001 - reported per case, the test fails on it
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
                failed += not row["ok"]
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
