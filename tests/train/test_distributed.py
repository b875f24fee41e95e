"""Data parallelism: two CPU processes (gloo) training with each DST method end with the same
masks and values on both ranks, although each saw different data - with the flat all-reduce
after backward and with DistributedDataParallel (rebuilt when a mask update resizes values),
whose averaged gradients equal the flat all-reduce's at every step; torchrun runs of train.vit
and train.gpt (both ranks with one tokenizer) end with identical checkpoints on both ranks."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
from dst import DSTConfig, Sparsifier, make_layer
from train.distributed import Dist, ParallelModel

METHODS = {"rigl": {}, "set": {}, "gse": {"grow": "graest"}, "srigl": {"gamma_sal": 0.3},
           "dynadiag": {"freeze_at": 0.6}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, method, overrides, out_dir, sync="flat"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A collective that one rank never reaches fails in 2 minutes instead of gloo's 30.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    ddp = Dist(rank=rank, world=world)
    cfg = DSTConfig(method=method, sparsity=0.8, delta_t=2, t_end=1.0, seed=0, **overrides)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_layer(cfg, 16, 32, 0.2, generator=gen), torch.nn.GELU(),
                                make_layer(cfg, 32, 8, 0.2, generator=gen))
    sparsifier = Sparsifier(model, cfg, total_steps=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ddp.broadcast_model(model)
    initial = [m.mask() for m in model.modules() if isinstance(m, kernels.SparseLayer)]
    net = ddp.wrap(model, sync)
    assert isinstance(net, ParallelModel) == (sync == "ddp")
    data = torch.Generator().manual_seed(100 + rank)  # every rank its own data
    shapes = lambda: tuple((n, tuple(p.shape)) for n, p in model.named_parameters())  # noqa: E731
    seen, changes = shapes(), 0
    for step in range(10):
        x, y = torch.randn(12, 16, generator=data), torch.randn(12, 8, generator=data)
        if sync == "ddp":   # what the flat all-reduce gives: this rank's own gradient, averaged by hand
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            ddp.all_reduce_grads(model)
            expected = [p.grad.clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        with sparsifier.capture(step):
            torch.nn.functional.mse_loss(net(x), y).backward()
        if sync == "flat":
            ddp.all_reduce_grads(model)
        else:
            got = [p.grad for p in model.parameters()]
            assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected)), step
        opt.step()
        sparsifier.step(step, opt)
        changes, seen = changes + (shapes() != seen), shapes()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["masks"] = [m.mask() for m in model.modules() if isinstance(m, kernels.SparseLayer)]
    state["initial_masks"] = initial
    state["builds"] = torch.tensor(net.builds if sync == "ddp" else 0)
    state["shape_changes"] = torch.tensor(changes)
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Both ranks have saved: leave without tearing the gloo group down. In CI once, after both
    # ranks of a DDP pair had written their results, one process hung in the teardown for 15
    # minutes (forked workers, DDP's reducer alive); the results are what the test checks.
    os._exit(0)


def _run_pair(tmp_path, method, sync):
    mp.start_processes(_worker, args=(2, _free_port(), method, METHODS[method], str(tmp_path), sync),
                       nprocs=2, join=True, start_method="fork")
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for key in a:
        if key in ("masks", "initial_masks"):
            for ma, mb in zip(a[key], b[key]):
                assert torch.equal(ma, mb)
        else:
            assert torch.equal(a[key], b[key]), key
    # the updates really changed the masks
    assert any(not torch.equal(m, m0) for m, m0 in zip(a["masks"], a["initial_masks"]))
    return a


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ranks_agree_on_masks_and_values_after_updates(tmp_path, method):
    _run_pair(tmp_path, method, "flat")


# DDP: RigL's updates keep every values tensor's shape (one DDP for the run); SRigL's change its
# fan-in k and DynaDiag's freeze drops the candidates and the gate scores (DDP rebuilt).
@pytest.mark.parametrize("method", ["rigl", "srigl", "dynadiag"])
def test_ddp_averages_like_the_flat_all_reduce_and_is_rebuilt_on_resized_values(tmp_path, method):
    a = _run_pair(tmp_path, method, "ddp")
    changes = int(a["shape_changes"])
    assert (changes == 0) == (method == "rigl")
    assert int(a["builds"]) == 1 + changes   # one DDP at the start, a new one after each resizing update


def test_single_process_is_a_no_op():
    d = Dist()
    x = torch.arange(6)
    assert d.shard(x)[0] is x and d.is_main and not d.active
    assert Dist(rank=1, world=2).shard(x)[0].tolist() == [1, 3, 5]


def test_torchrun_trains_vit_on_two_processes_with_identical_states(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "train.vit",
           "--method", "srigl", "--preset", "micro", "--steps", "16", "--delta-t", "4", "--batch-size", "64",
           "--eval-every", "8", "--eval-examples", "100", "--threads", "1", "--no-progress", "--no-plots",
           "--out-dir", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()   # rank 0 speaks for the run: each line once, not once a rank
    assert sum("test accuracy" in line for line in lines) == 1, done.stdout
    assert sum(line.startswith("step 8: val") for line in lines) == 1, done.stdout
    import json
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["grad_sync"] == "ddp"   # the default
    a = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "run" / "rank1" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_bad_grad_sync_is_refused_naming_the_flag(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "train.vit", "--grad-sync", "ring", "--out-dir", str(tmp_path / "r")],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--grad-sync must be ddp or flat, got 'ring'" in done.stderr, done.stderr
    assert not (tmp_path / "r").exists()


def test_torchrun_trains_gpt_on_two_processes_with_one_tokenizer_and_identical_states(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from pydoc_data.topics import topics
    root = Path(__file__).resolve().parents[2]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "train.gpt",
           "--dataset", str(corpus), "--method", "srigl", "--preset", "micro", "--vocab-size", "512", "--seq-len", "32",
           "--steps", "16", "--warmup", "2", "--delta-t", "4", "--batch-size", "16", "--eval-every", "8",
           "--eval-examples", "32", "--threads", "1", "--no-progress", "--no-plots", "--out-dir", str(tmp_path / "run")]
    # An empty cache: both ranks train the tokenizer at once, and must get the same one.
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DST_DATA_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()   # rank 0 speaks for the run: each line once, not once a rank
    assert sum("test perplexity" in line for line in lines) == 1, done.stdout
    assert sum(line.startswith("step 8: val LM loss") for line in lines) == 1, done.stdout
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["config"]["grad_sync"] == "ddp"
    assert (run / "tokenizer.json").read_text() == (run / "rank1" / "tokenizer.json").read_text()   # the same ids
    a = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(run / "rank1" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
