"""04 under torchrun, tried on CPU with gloo: DINO's centre is the mean of the teacher's outputs over every process's
batch, the same on every rank, so that C <- m C + (1 - m) mean equals the one-process update on the whole batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from test_distributed import free_port, join

WORLD, PER_RANK, K = 2, 3, 5


def centre_on_rank(rank, port, center, outputs, results):
    join(rank, port, WORLD)
    try:
        vit = common.import_script("04_vit")
        mine = outputs[rank * PER_RANK:(rank + 1) * PER_RANK]
        results[rank] = vit.update_center(center, mine, 0.9)
    finally:
        dist.destroy_process_group()


def test_dino_centre_is_the_mean_over_every_process():
    generator = torch.Generator().manual_seed(0)
    center = torch.randn(K, generator=generator, dtype=torch.float64)
    # the ranks' batches differ in their means: a rank-local centre would differ from rank to rank
    outputs = torch.randn(WORLD * PER_RANK, K, generator=generator, dtype=torch.float64)
    outputs[PER_RANK:] += 3
    results = mp.Manager().dict()
    mp.start_processes(centre_on_rank, args=(free_port(), center, outputs, results), nprocs=WORLD, start_method="spawn")
    expected = 0.9 * center + 0.1 * outputs.mean(0)
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank], expected)
