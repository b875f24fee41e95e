"""In one process, alternating: ViT-B/16 batch 32 fan-in training steps under bf16 autocast with
the bias added in place (module.bias_add) and out of place (y + bias, the same column sums)."""
import sys, os, time, resource, argparse, statistics, torch
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import e2e
import kernels.module as m
torch.set_num_threads(1)
args = argparse.Namespace(sparsity=0.9, seed=0, batch=32, quick=False, seq=128, autocast=torch.bfloat16)
r = e2e.Runner("vit-b16", sys.argv[1] if len(sys.argv) > 1 else "fanin", args, "cpu", torch.float32)
inplace = m.bias_add


class OutOfPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bias):
        ctx.bias_dtype = bias.dtype
        return y + bias.to(y.dtype)

    @staticmethod
    def backward(ctx, dy):
        return m._BiasAdd.backward(ctx, dy)


def out_of_place(y, bias):
    if bias is None:
        return y
    return OutOfPlace.apply(y, bias) if (bias.requires_grad and torch.is_grad_enabled()) else y + bias.to(y.dtype)


import kernels.fanin as fanin
r.train_step()
res = {"in place": [], "out of place": []}
for rnd in range(3):
    for name, fn in (("out of place", out_of_place), ("in place", inplace)):
        fanin.bias_add = fn
        r.train_step()
        t0 = time.process_time(); r.train_step(); res[name].append(time.process_time() - t0)
for k, v in res.items():
    print(f"fan-in bias {k}: train step median {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})", flush=True)
