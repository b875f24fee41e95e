"""The element-wise kernels' compiled code for H100 (sm_90): the fan-in kernels use no atomics
(the input gradient is a gather over W^T), and the kernels that keep atomics (the split-token
SDDMMs) have no GPU-scope fence - ``tl.atomic_add``'s default ``acq_rel`` puts MEMBAR.ALL.GPU
and CCTL.IVALL around every atomic. Compiled without a GPU by the ptxas of the triton wheel
(tests/kernels/gpu_compile.py), disassembled by its cuobjdump."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_gpu_compile import _ptxas_available

ROOT = Path(__file__).resolve().parents[2]

# Runs with TRITON_INTERPRET=0 in a subprocess (the test session interprets the kernels).
# Launches at the target shapes (Linear 3072 -> 768 at 90%, T = 256 and 1), one line of
# opcodes of interest per kernel.
_PROBE = r'''
import json, os, re, subprocess, torch, triton, kernels
from tests.kernels.gpu_compile import capture, compile_launch
from kernels.coords import random_rows_of_distinct
kernels.set_checks(False)
g = torch.Generator().manual_seed(0)
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
idx = random_rows_of_distinct(768, 3072, 307, generator=g)
pair = torch.tensor([0, 3], dtype=torch.int32)
for dt in (torch.float32, torch.bfloat16):
    v = torch.randn(768, 307).to(dt)
    cases = {
        "fanin_fwd T=256": lambda: kernels.fanin_fwd(torch.randn(256, 3072).to(dt), v, idx, None, 768),
        "fanin_fwd T=1": lambda: kernels.fanin_fwd(torch.randn(1, 3072).to(dt), v, idx, None, 768),
        "fanin_dx T=256": lambda: kernels.fanin_dx(torch.randn(256, 768).to(dt), v, idx, None, 3072),
        "fanin_dx T=1": lambda: kernels.fanin_dx(torch.randn(1, 768).to(dt), v, idx, None, 3072),
        "sddmm split-T": lambda: kernels.sddmm_fwd(torch.randn(16384, 4).to(dt), torch.randn(16384, 4).to(dt), pair, pair),
        "sddmm block split-T": lambda: kernels.sddmm_fwd(torch.randn(16384, 32).to(dt), torch.randn(16384, 32).to(dt), pair % 2, pair % 2, 16),
    }
    for name, launch in cases.items():
        for fn, args, kwargs in capture(launch):
            compiled, _, _ = compile_launch(fn, args, dict(kwargs), 90)
            path = f"/tmp/_sass_probe_{os.getpid()}.cubin"
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
            os.remove(path)
            ops = re.findall(r"\b(ATOMG|ATOM|RED|REDG|MEMBAR|CCTL|ERRBAR)\.?([\w.]*)", sass)
            print(json.dumps(dict(case=f"{name} {str(dt)[6:]}", kernel=fn.__name__,
                                  ops=sorted({a + "." + b for a, b in ops}))))
'''


@pytest.mark.skipif(not _ptxas_available(), reason="this triton install has no NVIDIA backend / ptxas to compile with")
def test_fan_in_kernels_use_no_atomics_and_atomic_kernels_no_gpu_fence():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode and "internals" in done.stderr:  # pragma: no cover - another triton
        pytest.skip(done.stderr[-300:])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 12, done.stdout
    for r in rows:
        if r["kernel"].startswith("_fanin"):
            assert not r["ops"], r  # no atomics, no fences
        else:
            assert any(op.startswith("RED") for op in r["ops"]), r  # the split path was compiled
            assert not [op for op in r["ops"] if op.startswith(("MEMBAR", "CCTL", "ERRBAR"))], r
