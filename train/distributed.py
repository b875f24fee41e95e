"""Data parallelism for the training entry points, on one machine or several.

    torchrun --nproc_per_node=2 -m train.vit --method rigl            # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 -m train.vit ...

Each rank trains on its own slice of every batch. Gradients are averaged by torch's
DistributedDataParallel (``Dist.wrap``, ``--grad-sync ddp``, the default): its bucketed
all-reduces start during backward, as soon as a bucket's gradients are ready, so
communication overlaps the rest of backward instead of following it. A mask update changes
the shapes of always-sparse values (SRigL's k, DynaDiag's freeze drops the candidates and the
gate scores), which DDP's fixed buckets and the gradient accumulators it holds do not allow:
``ParallelModel`` compares the trainable parameters (object, shape, dtype) before each forward
and builds a new DDP when they differ - on every rank at the same step, since mask updates are
identical on every rank. ``--grad-sync flat`` keeps the older path (one flat all-reduce after
backward, ``Dist.all_reduce_grads``), for comparison and as a fallback.

Mask updates stay identical on every rank: every batch-dependent score is summed over ranks in
dst (``dst.candidates.reduce_across_ranks``), and ties and sampling use generators seeded alike.
Only rank 0 writes files.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .flags import GRAD_SYNCS

# No per-forward buffer broadcast: torch 2.13 names it forward_sync_buffers (broadcast_buffers
# deprecated), torch 2.11 only broadcast_buffers.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's rows of a batch (rows rank, rank + world, ...)."""
        if not self.active:
            return tensors
        return tuple(t[self.rank::self.world] for t in tensors)

    def all_reduce_grads(self, model: torch.nn.Module) -> None:
        """Average every gradient over the ranks (one flat all-reduce)."""
        if not self.active:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def wrap(self, model: torch.nn.Module, grad_sync: str = "ddp"):
        """What the training forward calls: ``model`` itself in one process or with
        grad_sync="flat" (then call ``all_reduce_grads`` after backward), else a ParallelModel
        whose backward leaves the gradients averaged over the ranks. Evaluation, state dicts,
        the optimizer and the Sparsifier keep using ``model``."""
        if grad_sync not in GRAD_SYNCS:
            raise ValueError(f"grad_sync must be one of {', '.join(GRAD_SYNCS)}, got {grad_sync!r}")
        if not self.active or grad_sync == "flat":
            return model
        return ParallelModel(model, self.local_rank)

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (start and resume)."""
        if not self.active:
            return
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)

    def all_agree(self, value: float) -> bool:
        """Whether every rank holds the same number (a cheap divergence check)."""
        if not self.active:
            return True
        t = torch.tensor([value, -value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0]) == value and float(-t[1]) == value

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class ParallelModel:
    """``module`` under DistributedDataParallel, rebuilt before a forward when the trainable
    parameters changed (a mask update resized a values tensor, a gate was removed).

    DDP keeps, per parameter, the autograd accumulator of its shape and a slot of that size in
    a gradient bucket; a resized values tensor no longer fits either. A parameter whose
    ``.data`` was replaced by a tensor of the same shape (RigL's, SET's, GSE's updates) keeps
    its object and its slot, so no rebuild is needed. The states are not broadcast again at a
    rebuild (``init_sync=False``): the ranks hold the same model, which ``Dist.broadcast_model``
    set at the start and identical mask updates keep. Buffers (sparse index patterns) are not
    broadcast per forward for the same reason."""

    def __init__(self, module: torch.nn.Module, local_rank: int = 0):
        self.module = module
        self.device_ids = [local_rank] if next(module.parameters()).is_cuda else None
        self.ddp: DistributedDataParallel | None = None
        self.signature = None
        self.builds = 0

    def _signature(self) -> tuple:
        return tuple((id(p), tuple(p.shape), p.dtype) for p in self.module.parameters() if p.requires_grad)

    def __call__(self, *args, **kwargs):
        signature = self._signature()
        if signature != self.signature:
            self.ddp = None   # drop the old reducer (and the autograd hooks it put on the parameters) first
            self.ddp = DistributedDataParallel(self.module, device_ids=self.device_ids, init_sync=self.builds == 0,
                                               **_NO_BUFFER_SYNC)
            self.signature = signature
            self.builds += 1
        return self.ddp(*args, **kwargs)


def init(device_name: str = "auto") -> Dist:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)
