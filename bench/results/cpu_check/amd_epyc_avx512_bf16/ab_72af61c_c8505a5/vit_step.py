"""ViT-B/16 batch 32 under bf16 autocast, one thread: median train / infer step (process CPU time)
of the given formats, with minor faults per train step."""
import sys, time, resource, argparse, statistics, os, torch
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import e2e
torch.set_num_threads(1)
args = argparse.Namespace(sparsity=0.9, seed=0, batch=32, quick=False, seq=128, autocast=torch.bfloat16)
for fmt in sys.argv[1].split(","):
    r = e2e.Runner("vit-b16", fmt, args, "cpu", torch.float32)
    r.train_step()
    tr, fl = [], []
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.process_time()
        r.train_step()
        tr.append(time.process_time() - t0); fl.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    r.drop_optimizer()
    r.infer_step()
    inf = []
    for _ in range(3):
        t0 = time.process_time(); r.infer_step(); inf.append(time.process_time() - t0)
    print(f"{os.path.basename(os.getcwd())} {fmt}: train {statistics.median(tr):.2f} s ({min(tr):.2f}-{max(tr):.2f}), "
          f"{statistics.median(fl)/1e3:.0f}k faults; infer {statistics.median(inf):.2f} s ({min(inf):.2f}-{max(inf):.2f})", flush=True)
    del r
