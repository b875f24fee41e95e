"""One layer's bf16 autocast training step (forward + backward) at 2 threads, alternating in one
process; wall time, median of 5 steps per turn. Mode "split" (the default): the products split over
torch's OpenMP threads (kernels.cpu.SPLIT_ON_OPENMP = True, parallel_rows) against the Python thread
pool (False). Mode "packs": the products on OpenMP in both, the packs split too (PARALLEL_MIN_PACK
2^18) against the packs on one thread.
    PYTHONPATH=. python split_ab.py 1576 fanin 768 3072 [threads] [split|packs]"""
import sys, time, statistics, torch
import kernels.cpu as kc
from kernels import FanInLinear, DiagLinear
T, fmt, inf, outf = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
mode = sys.argv[6] if len(sys.argv) > 6 else "split"
torch.set_num_threads(threads)
torch.manual_seed(0)
layer = FanInLinear(inf, outf, density=0.1) if fmt == "fanin" else DiagLinear(inf, outf, density=0.1, block_size=16)
x = torch.randn(T, inf).bfloat16().requires_grad_()
g = torch.randn(T, outf).bfloat16()
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
res = {True: [], False: []}
for turn in range(8):
    on = turn % 2 == 0
    if mode == "packs":
        kc.PARALLEL_MIN_PACK = (1 << 18) if on else (1 << 62)
    else:
        kc.SPLIT_ON_OPENMP = on
    step()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    res[on].append(statistics.median(ts) * 1e3)
a, b = ("packs split", "packs on one thread") if mode == "packs" else ("openmp", "python pool")
print(f"{fmt} {inf}->{outf} T={T}, {threads} threads, {kc.features() >= {'openmp'} and 'openmp' or 'no openmp'}: "
      f"{a} {' '.join(f'{v:.1f}' for v in res[True])} ms | {b} {' '.join(f'{v:.1f}' for v in res[False])} ms "
      f"| ratio of medians {statistics.median(res[False]) / statistics.median(res[True]):.2f}x")
