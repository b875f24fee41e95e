"""GraEst under data parallelism: two gloo processes sketch their own rows of a global batch
with one random sign per global row, so the all-reduced sketch equals the single-process one
over the concatenated batch (a sign vector shared by the ranks would sketch sum_r s^T dy_r)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dst.candidates import sampling_weights

SIZES = (5, 7)  # rows of each rank's batch: unequal, so slicing by rank offset is tested


def _global_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(sum(SIZES), 6, generator=g, dtype=torch.float64), torch.randn(sum(SIZES), 9, generator=g,
                                                                                    dtype=torch.float64)


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dy, x = _global_batch()
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    row_w, col_w = sampling_weights("graest", dy[rows], x[rows], torch.Generator().manual_seed(0))
    torch.save((row_w, col_w), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_sketch_the_concatenated_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    dy, x = _global_batch()
    row_w, col_w = sampling_weights("graest", dy, x, torch.Generator().manual_seed(0))
    for rank in range(2):
        r_w, c_w = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(r_w, row_w, rtol=1e-5, atol=1e-5)  # the sketch is fp32: sums in another order
        torch.testing.assert_close(c_w, col_w, rtol=1e-5, atol=1e-5)
