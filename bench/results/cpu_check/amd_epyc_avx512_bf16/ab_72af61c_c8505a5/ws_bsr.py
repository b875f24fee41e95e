import time, statistics, torch, sys
import kernels.cpu as kc
from kernels import DiagLinear
torch.set_num_threads(1)
T = int(sys.argv[1]); inf, outf = int(sys.argv[2]), int(sys.argv[3])
layer = DiagLinear(inf, outf, density=0.1, block_size=16)
x = torch.randn(T, inf).bfloat16().requires_grad_()
g = torch.randn(T, outf).bfloat16()
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
default = kc.WORKSPACE_MAX_BYTES
res = {"off": [], "on": []}
for rnd in range(8):
    for name, cap in (("off", 0), ("on", default)):
        kc.WORKSPACE_MAX_BYTES = cap
        step()
        t = time.thread_time(); step(); step(); res[name].append((time.thread_time() - t) / 2 * 1e3)
for k, v in res.items():
    print(f"T={T} {inf}->{outf} diag16 step, workspaces {k}: median {statistics.median(v):.2f} ms ({min(v):.2f}-{max(v):.2f})")
