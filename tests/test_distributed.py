"""Several processes (torchrun's setting), tried on CPU with the gloo backend: losses over gathered embeddings
equal the single-process loss on the concatenated batch, values and gradients."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common

WORLD, PER_RANK, DIM = 2, 5, 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gathered_losses(rank, port, inputs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    common.init_distributed(torch.device("cpu"))
    try:
        contrastive, clip = common.import_script("03_contrastive"), common.import_script("05_clip")
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local = {name: tensor[mine].clone().requires_grad_() for name, tensor in inputs.items()}
        everyone = {name: common.gather_with_grad(tensor) for name, tensor in local.items()}
        nt_xent = contrastive.nt_xent(everyone["z1"], everyone["z2"], 0.3)
        logits = clip.clip_logits(everyone["image"], everyone["text"], 7.0)
        clip_loss = clip.clip_loss(logits)
        (nt_xent + clip_loss).backward()
        results[rank] = {"nt_xent": nt_xent.detach(), "clip": clip_loss.detach(),
                         **{name: tensor.grad for name, tensor in local.items()},
                         "mean": common.mean_over_ranks(rank + 1.0), "world": common.world_size()}
    finally:
        dist.destroy_process_group()


def test_gathered_losses_and_gradients_equal_the_single_process_ones():
    generator = torch.Generator().manual_seed(0)
    n = WORLD * PER_RANK
    inputs = {"z1": torch.randn(n, DIM, generator=generator, dtype=torch.float64),
              "z2": torch.randn(n, DIM, generator=generator, dtype=torch.float64),
              "image": torch.nn.functional.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=1),
              "text": torch.nn.functional.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=1)}
    results = mp.Manager().dict()
    mp.start_processes(gathered_losses, args=(free_port(), inputs, results), nprocs=WORLD, start_method="spawn")

    contrastive, clip = common.import_script("03_contrastive"), common.import_script("05_clip")
    whole = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
    nt_xent = contrastive.nt_xent(whole["z1"], whole["z2"], 0.3)
    clip_loss = clip.clip_loss(clip.clip_logits(whole["image"], whole["text"], 7.0))
    (nt_xent + clip_loss).backward()
    for rank in range(WORLD):
        got = results[rank]
        assert got["world"] == WORLD and got["mean"] == pytest.approx(1.5)
        torch.testing.assert_close(got["nt_xent"], nt_xent.detach())
        torch.testing.assert_close(got["clip"], clip_loss.detach())
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name in inputs:   # each rank's rows get exactly their share of the full-batch gradient
            torch.testing.assert_close(got[name], whole[name].grad[mine])


def test_without_torchrun_nothing_changes():
    x = torch.randn(3, 4, requires_grad=True)
    assert common.gather_with_grad(x) is x and common.world_size() == 1 and common.is_main()
    assert common.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert common.mean_over_ranks(2.5) == 2.5
