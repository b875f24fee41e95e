"""A B A B within one process: ViT-B/16 batch 32 bf16 autocast training steps with the workspaces
on (default) and off (WORKSPACE_MAX_BYTES = 0: a fresh tensor per call); minor faults per step."""
import sys, time, resource, argparse, torch
sys.path.insert(0, "bench")
import e2e
import kernels.cpu as kc
torch.set_num_threads(1)
fmt = sys.argv[1]
args = argparse.Namespace(sparsity=0.9, seed=0, batch=int(sys.argv[2]) if len(sys.argv) > 2 else 32, quick=False, seq=128, autocast=torch.bfloat16)
r = e2e.Runner("vit-b16", fmt, args, "cpu", torch.float32)
r.train_step()
default = kc.WORKSPACE_MAX_BYTES
for rnd in range(2):
    for name, cap in (("off", 0), ("on", default)):
        kc.WORKSPACE_MAX_BYTES = cap
        kc.release_workspaces()
        r.train_step()  # (one to settle)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.process_time()
        r.train_step()
        dt = time.process_time() - t0; f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        print(f"{fmt} workspaces {name}: train step {dt:.2f} s, {f} minor faults", flush=True)
