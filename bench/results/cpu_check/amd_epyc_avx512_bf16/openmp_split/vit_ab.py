"""ViT-B/16 training step under bf16 autocast at 2 threads (bench/e2e.py's Runner), the products split
over torch's OpenMP threads against the Python pool, alternating step by step in one process;
wall time. PYTHONPATH=. python vit_ab.py 8 fanin,diag16,dense"""
import sys, os, time, statistics, argparse, torch
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import e2e
import kernels.cpu as kc
torch.set_num_threads(2)
batch = int(sys.argv[1])
args = argparse.Namespace(sparsity=0.9, seed=0, batch=batch, quick=False, seq=128, autocast=torch.bfloat16)
for fmt in sys.argv[2].split(","):
    r = e2e.Runner("vit-b16", fmt, args, "cpu", torch.float32)
    r.train_step()
    res = {True: [], False: []}
    for turn in range(6):
        kc.SPLIT_ON_OPENMP = on = turn % 2 == 0
        t = time.perf_counter(); r.train_step(); res[on].append(time.perf_counter() - t)
    print(f"vit-b16 batch {batch} {fmt}, 2 threads: openmp {' '.join(f'{v:.2f}' for v in res[True])} s | python pool "
          f"{' '.join(f'{v:.2f}' for v in res[False])} s | ratio of medians "
          f"{statistics.median(res[False]) / statistics.median(res[True]):.2f}x", flush=True)
    del r
