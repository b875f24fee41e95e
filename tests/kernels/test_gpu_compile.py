"""Every Triton kernel compiles for H100 (sm_90) and A100 (sm_80) with the configs its
launchers pick on a GPU, fits the device's shared memory and, in bf16 on sm_90, spills no
registers - checked on any machine: Triton's compiler and ptxas ship in the triton wheel (see
tests/kernels/gpu_compile.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_fanin_fwd_kernel", "_fanin_dx_kernel", "_sddmm_kernel", "_sddmm_block_kernel",
           "_diag_block_kernel", "_diag_elem_kernel", "_fused_diag_mlp_kernel"}


def _ptxas_available() -> bool:
    probe = "from triton.backends.nvidia.compiler import get_ptxas; print(get_ptxas(90).path)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and Path(done.stdout.strip()).exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this triton install has no NVIDIA backend / ptxas to compile with")
def test_every_kernel_compiles_for_sm90_and_sm80_within_shared_memory():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 3 and rows and "unsupported" in rows[0]:
        pytest.skip(f"the compile probe drives triton internals of 3.8; here: {rows[0]['unsupported']}")
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(json.dumps(r) for r in bad) + done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["cc"] for r in rows} == {80, 90}
    assert all(r["cubin_bytes"] > 0 for r in rows)
    # The default configs of the training dtype keep every kernel out of local memory on H100
    # (fp32 tiles take twice the registers; some spill there, see kernels/diag.py).
    spilled = [(r["case"], r["spill_bytes"]) for r in rows if r["cc"] == 90 and "bfloat16" in r["case"]
               and r["spill_bytes"]]
    assert not spilled, spilled
