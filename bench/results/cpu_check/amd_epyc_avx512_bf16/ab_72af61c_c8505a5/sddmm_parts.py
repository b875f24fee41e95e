import sys, time, torch
import kernels.cpu as kc
from kernels import FanInLinear
torch.set_num_threads(1)
def tt(f, n=3):
    f(); t = time.thread_time()
    for _ in range(n): f()
    return (time.thread_time() - t) / n * 1e3
T = int(sys.argv[1]); inf, outf = int(sys.argv[2]), int(sys.argv[3])
so = kc.lib()
torch.manual_seed(0)
layer = FanInLinear(inf, outf, density=0.1)
k = layer.k
rows, cols = layer.coords()
rows, cols = rows.int().contiguous(), cols.int().contiguous()
x = torch.randn(T, inf).bfloat16(); dy = torch.randn(T, outf).bfloat16()
crow = kc._row_pointers(rows, outf)
tw = kc._tile_width(T, inf, (32, 64, 128), elem_bytes=2)
tiles = -(-T // tw)
dyt = torch.empty(tiles, outf, tw, dtype=torch.bfloat16); xt = torch.empty(tiles, inf, tw, dtype=torch.bfloat16)
g = torch.empty(rows.numel())
packs = lambda: (so.pack_tokens_bf16_tiles(T, outf, dy.data_ptr(), outf, 1, tw, dyt.data_ptr()), so.pack_tokens_bf16_tiles(T, inf, x.data_ptr(), inf, 1, tw, xt.data_ptr()))
kern = lambda: so.sddmm_rows_dpbf16(0, outf, tiles, tw, outf, inf, crow.data_ptr(), cols.data_ptr(), dyt.data_ptr(), xt.data_ptr(), g.data_ptr())
whole = lambda: kc.sddmm(dy, x, rows, cols)
dense = lambda: dy.t() @ x
r = {n: tt(f) for n, f in [("packs", packs), ("kernel", kern), ("whole", whole), ("dense dW", dense)]}
macs = T * rows.numel()
print(f"T={T} {inf}->{outf} k={k} tw={tw}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in r.items()),
      f"| kernel {macs / r['kernel'] / 1e6:.1f} GMAC/s, dense {T*outf*inf / r['dense dW'] / 1e6:.1f}")
