"""Per-call times of the kernels.cpu entry points in one layer's training step under bf16 autocast."""
import sys, time, collections, torch
import kernels.cpu as kc
from kernels import FanInLinear, DiagLinear
torch.set_num_threads(1)
T = int(sys.argv[1]) if len(sys.argv) > 1 else 1576
fmt = sys.argv[2] if len(sys.argv) > 2 else "fanin"
inf, outf = (int(a) for a in (sys.argv[3:5] if len(sys.argv) > 4 else (768, 3072)))
acc = collections.defaultdict(float); cnt = collections.Counter()
def wrap(name):
    f = getattr(kc, name)
    def g(*a, **k):
        t = time.thread_time(); r = f(*a, **k); acc[name] += time.thread_time() - t; cnt[name] += 1; return r
    setattr(kc, name, g)
for n in ["csr_matmul", "sddmm", "bsr_matmul", "sddmm_blocks", "column_sums", "matmul", "_pack", "_pack_blocks", "_pack_token_pairs16", "_row_pointers"]:
    if hasattr(kc, n): wrap(n)
torch.manual_seed(0)
if fmt == "fanin":
    layer = FanInLinear(inf, outf, density=0.1)
elif fmt == "dense":
    layer = torch.nn.Linear(inf, outf)
else:
    b = int(fmt[4:]) if fmt.startswith("diag") and len(fmt) > 4 else 16
    layer = DiagLinear(inf, outf, density=0.1, block_size=b)
x = torch.randn(T, inf).bfloat16().requires_grad_()
g = torch.randn(T, outf).bfloat16()
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
for _ in range(2): step()
acc.clear(); cnt.clear()
n = 5
t0 = time.thread_time()
for _ in range(n): step()
tot = (time.thread_time() - t0) / n
print(f"{fmt} {inf}->{outf} T={T}: step {tot*1e3:.1f} ms")
# names wrap each other (bsr_matmul calls _pack...), so these are inclusive
for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
    print(f"  {k:22s} {v/n*1e3:8.2f} ms  ({cnt[k]//n} calls/step)")
