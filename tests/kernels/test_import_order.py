"""kernels/__init__.py + runtime.interpretable_triton_library: the Triton kernels run under the
interpreter on a CPU machine whatever was imported first (another project importing triton
before kernels, TRITON_INTERPRET unset). Each order runs in a fresh process: the order of
first imports is the thing under test."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import torch
torch.manual_seed(0)
x = torch.randn(8, 32, dtype=torch.float64)
idx = torch.stack([torch.randperm(32)[:4] for _ in range(16)]).to(torch.int32)
v = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
y = kernels.fanin_fwd(x, v.detach(), idx, None, 16)   # raw launcher: tl.cdiv inside
ref = kernels.fanin_matmul_ref(x, v, idx)
assert torch.allclose(y, ref.detach()), (y - ref).abs().max()
with kernels.use_backend("triton"):                  # custom op forward and backward (SDDMM: tl.sum)
    out = kernels.fanin_matmul(x, v, idx)
    (g,) = torch.autograd.grad(out.square().sum(), v)
(g_ref,) = torch.autograd.grad(ref.square().sum(), v)
assert torch.allclose(out, ref) and torch.allclose(g, g_ref), (g - g_ref).abs().max()
import triton.language as tl
from triton.runtime.jit import JITFunction
# imported uninterpreted, tl.cdiv stays a JITFunction (what Triton's compiler inlines)
assert isinstance(tl.cdiv, JITFunction) == TRITON_FIRST, type(tl.cdiv)
print("ok")
"""

ORDERS = {
    "triton first": "import torch, triton, kernels",
    "triton.language first": "import triton.language\nimport torch\nimport kernels",
    "kernels first": "import kernels, triton",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without a GPU")
@pytest.mark.parametrize("order", list(ORDERS))
def test_kernels_run_under_the_interpreter_in_any_import_order(order):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DST_KERNELS_BACKEND")}
    env["PYTHONPATH"] = str(ROOT)
    first = f"TRITON_FIRST = {order != 'kernels first'}\n{ORDERS[order]}\n"
    done = subprocess.run([sys.executable, "-c", first + SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
