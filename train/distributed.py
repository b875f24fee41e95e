"""Data parallelism for the training entry points, on one machine or several.

    torchrun --nproc_per_node=2 -m train.vit --method rigl            # 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 -m train.vit ...

Each rank trains on its own slice of every batch. After backward the gradients are averaged
over ranks by an all-reduce per parameter rather than by DistributedDataParallel: a mask
update changes the shapes of the sparse values (SRigL's k, DynaDiag's diagonals), which
DDP's fixed gradient buckets do not allow. Mask updates stay identical on every rank: every
batch-dependent score is summed over ranks in dst (``dst.candidates.reduce_across_ranks``),
and ties and sampling use generators seeded alike. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
