"""03 under torchrun's setting, tried on CPU with gloo: for every method (and every ablation), one DDP step of W
processes with B images each equals the one-process step on all W*B images: the loss, the gradient of every parameter,
and the keys that enter MoCo's queue on every rank. So the batch statistics (NT-Xent's and InfoNCE's negatives, Barlow
Twins' cross-correlation, VICReg's variance and covariance, the triplets' mined negatives) are the global batch's.
BatchNorm runs in eval mode here (its running statistics: the step does not depend on the split); on GPUs
common.GlobalBatchNorm does that job in training mode, and tests/test_distributed.py checks it on two GPUs."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from test_distributed import free_port, join

PER_RANK = 4
RUNS = [(method, False) for method in ("simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "triplet")] + \
       [(method, True) for method in ("simclr", "moco", "byol", "simsiam", "barlow", "vicreg")]


def one_step(method, ablate, view1, view2):
    """One contrastive_step of a tiny float64 model of `method` on this process's views, as pretrain sets it up."""
    contrastive = common.import_script("03_contrastive")
    cfg = contrastive.Config(method=method, ablate=ablate, width=2, hidden=8, projection=4, mining="semi-hard")
    torch.manual_seed(0)
    model = contrastive.build_model(cfg, 3, torch.device("cpu")).double().eval()
    target = None
    if method in ("moco", "byol"):
        target = copy.deepcopy(model).requires_grad_(False)
        target.predictor = torch.nn.Identity()
        with torch.no_grad():                          # a target a little away from the online network
            for t in target.parameters():
                t.mul_(0.9)
    queue = torch.nn.functional.normalize(torch.randn(16, 4, generator=torch.Generator().manual_seed(1),
                                                      dtype=torch.float64), dim=1)
    loss_fn = contrastive.pair_loss(cfg, queue)
    trained = common.data_parallel(model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, keys = contrastive.contrastive_step(trained, optimizer, view1, view2, 0.5, loss_fn, torch.device("cpu"),
                                              target, method == "simsiam" and not ablate)
    contrastive.enqueue(queue, keys)
    return {"loss": loss, "queue": queue, **{name: p.grad.clone() for name, p in model.named_parameters()}}


def worker(rank, world, port, views, results):
    join(rank, port, world)
    try:
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results[rank] = {run: one_step(*run, views[0][mine], views[1][mine]) for run in RUNS}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_every_methods_step_on_several_processes_equals_one_process_on_the_whole_batch(world):
    g = torch.Generator().manual_seed(world)
    views = [torch.rand(world * PER_RANK, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    results = mp.Manager().dict()
    mp.start_processes(worker, args=(world, free_port(), views, results), nprocs=world, start_method="spawn")
    for run in RUNS:
        whole = one_step(*run, *views)
        for rank in range(world):
            got = results[rank][run]
            assert set(got) == set(whole)
            for name in whole:
                torch.testing.assert_close(got[name], whole[name], msg=f"{run} rank {rank}: {name}")


def test_the_loss_sees_every_ranks_rows_so_splitting_would_change_it():
    # the check above could pass if every method's loss were a mean of per-image terms; Barlow Twins and VICReg are
    # not: on half the batch they give other values, so equal values above mean the statistics were global
    contrastive = common.import_script("03_contrastive")
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    for loss in (lambda a, b: contrastive.barlow_twins(a, b, 0.1), lambda a, b: contrastive.vicreg(a, b, 25, 25, 1),
                 lambda a, b: contrastive.nt_xent(a, b, 0.5)):
        halves = (loss(z1[:4], z2[:4]) + loss(z1[4:], z2[4:])) / 2
        assert not torch.allclose(loss(z1, z2), halves)
