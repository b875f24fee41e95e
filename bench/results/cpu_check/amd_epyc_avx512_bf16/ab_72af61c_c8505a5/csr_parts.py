import sys, time, torch
import kernels.cpu as kc
from kernels import FanInLinear
torch.set_num_threads(1)
def tt(f, n=5):
    f(); t = time.thread_time()
    for _ in range(n): f()
    return (time.thread_time() - t) / n * 1e3
T = int(sys.argv[1]); inf, outf = int(sys.argv[2]), int(sys.argv[3])
so = kc.lib()
torch.manual_seed(0)
layer = FanInLinear(inf, outf, density=0.1)
k = layer.k
crow = torch.arange(0, outf * k + 1, k, dtype=torch.int32)
cols = layer.indices.reshape(-1).sort(dim=-1).values if False else layer.indices.reshape(-1).contiguous()
vals = layer.values.detach().reshape(-1).bfloat16()
x = torch.randn(T, inf).bfloat16()
w = kc.NativeWeight("csr", outf, inf, crow, cols, vals)
tiles = -(-T // 32)
xt = torch.empty(tiles, inf, 32, dtype=torch.bfloat16)
yt = torch.empty(tiles, outf, 32, dtype=torch.float32)
y = torch.empty(T, outf, dtype=torch.bfloat16)
pack = lambda: so.pack_tokens_dpbf16(T, inf, x.data_ptr(), x.stride(0), 1, xt.data_ptr())
kern = lambda: None
unp = lambda: None
whole = lambda: kc.matmul(w, x, None)
dense = lambda: torch.nn.functional.linear(x, torch.randn(outf, inf).bfloat16() if False else Wd)
Wd = torch.randn(outf, inf).bfloat16()
macs = T * outf * k
r = {n: tt(f) for n, f in [("pack", pack), ("kernel", kern), ("unpack", unp), ("whole", whole), ("dense", dense)]}
print(f"T={T} {inf}->{outf} k={k}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in r.items()),
      f"| kernel {macs / r['kernel'] / 1e6:.1f} GMAC/s, dense {T*outf*inf / r['dense'] / 1e6:.1f} GMAC/s")
