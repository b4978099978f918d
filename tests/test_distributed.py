"""Several processes (torchrun's setting), tried on CPU with the gloo backend: losses over gathered embeddings
equal the single-process loss on the concatenated batch, values and gradients; so do whole DDP training steps
of 03 and 05; torchrun runs of 03, 04 and 05 write their outputs once; bad setups fail with one line. On a machine
with two GPUs, also NCCL: GlobalBatchNorm split over them equals BatchNorm on the whole batch."""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common

ROOT = Path(__file__).resolve().parents[1]
WORLD, PER_RANK, DIM = 2, 5, 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank, port, world=WORLD):
    """What torchrun sets up for each of its processes, then common's process group over gloo. The gloo tests of
    03's and 04's objectives (test_distributed_03.py, test_distributed_04.py) use it too."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    common.init_distributed(torch.device("cpu"))


def gathered_losses(rank, port, inputs, results):
    join(rank, port)
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


# ---- Global BatchNorm: statistics over the batches of all GPUs ----

def test_global_batchnorm_keeps_weights_and_is_batchnorm_in_one_process():
    torch.manual_seed(3)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 36, 6), torch.nn.BatchNorm1d(6))
    for _ in range(2):
        plain(torch.randn(5, 3, 8, 8))                                  # running statistics away from their start
    converted = common.global_batchnorm(copy.deepcopy(plain))
    assert [type(m) for m in converted.modules()].count(common.GlobalBatchNorm) == 2
    assert converted.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    x = torch.randn(6, 3, 8, 8)
    for mode in (True, False):                                          # training and eval mode
        torch.testing.assert_close(converted.train(mode)(x), plain.train(mode)(x))
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var)


def global_batchnorm_on_gpus(rank, port, inputs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    device = common.init_distributed(torch.device("cuda"))
    try:
        out = {}
        for name, (x, upstream, memory_format) in inputs.items():
            layer = common.GlobalBatchNorm(x.shape[1]).to(device, torch.float64)
            with torch.no_grad():
                layer.weight.copy_(torch.linspace(0.5, 2, x.shape[1]))
                layer.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
            mine = x.chunk(WORLD)[rank].to(device).contiguous(memory_format=memory_format).requires_grad_()
            y = layer(mine)
            (y * upstream.chunk(WORLD)[rank].to(device)).sum().backward()
            out[name] = {"y": y.detach().cpu(), "grad_x": mine.grad.cpu(), "grad_weight": layer.weight.grad.cpu(),
                         "grad_bias": layer.bias.grad.cpu(), "running_mean": layer.running_mean.cpu(),
                         "running_var": layer.running_var.cpu()}
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs two GPUs (its kernels are CUDA-only)")
def test_global_batchnorm_on_two_gpus_equals_batchnorm_on_the_whole_batch():
    g = torch.Generator().manual_seed(4)
    inputs = {name: (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1,
                     torch.randn(shape, generator=g, dtype=torch.float64), memory_format)
              for name, shape, memory_format in (("images_channels_last", (12, 5, 4, 4), torch.channels_last),
                                                 ("images", (12, 5, 4, 4), torch.contiguous_format),
                                                 ("vectors", (12, 7), torch.contiguous_format))}
    results = mp.Manager().dict()
    mp.start_processes(global_batchnorm_on_gpus, args=(free_port(), inputs, results), nprocs=WORLD, start_method="spawn")
    for name, (x, upstream, _) in inputs.items():
        whole = x.clone().requires_grad_()
        weight = torch.linspace(0.5, 2, x.shape[1], dtype=torch.float64).requires_grad_()
        bias = torch.linspace(-1, 1, x.shape[1], dtype=torch.float64).requires_grad_()
        running_mean, running_var = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
        y = torch.nn.functional.batch_norm(whole, running_mean, running_var, weight, bias, training=True)
        (y * upstream).sum().backward()
        for rank in range(WORLD):
            got = results[rank][name]
            torch.testing.assert_close(got["y"], y.detach().chunk(WORLD)[rank])
            torch.testing.assert_close(got["grad_x"], whole.grad.chunk(WORLD)[rank])
            torch.testing.assert_close(got["running_mean"], running_mean)
            torch.testing.assert_close(got["running_var"], running_var)
        # each rank holds its share of the weight's and bias's gradient; DDP adds the shares
        torch.testing.assert_close(sum(results[r][name]["grad_weight"] for r in range(WORLD)), weight.grad)
        torch.testing.assert_close(sum(results[r][name]["grad_bias"] for r in range(WORLD)), bias.grad)


# ---- Whole training steps: DDP on W processes with per-process batch B == one process with batch W*B ----

def tiny_models():
    """03's SimCLR (float64, eval mode: BatchNorm then uses its running statistics, so the step does not depend on
    how the batch is split; on GPUs GlobalBatchNorm does that job in training mode) and a small 05 CLIP."""
    contrastive, clip = common.import_script("03_contrastive"), common.import_script("05_clip")
    torch.manual_seed(0)
    simclr = contrastive.SimCLR(3, width=2, hidden=8, projection=4).double().eval()
    image = clip.vit.ViT(image_size=8, patch_size=4, dim=8, depth=1, heads=2)
    pairs = clip.CLIP(image, clip.TextTransformer(vocab_size=260, context=6, dim=8, depth=1, heads=2), embed_dim=4)
    return simclr, pairs


def step_gradients(inputs, data_parallel):
    """Gradients of one 03 step (contrastive_step: gather, loss, backward scaled by W) and one 05 step
    (train_step: CLIP.forward, gather, clip_loss, backward_full_batch) on inputs, the rows of this process."""
    contrastive, clip = common.import_script("03_contrastive"), common.import_script("05_clip")
    cpu = torch.device("cpu")
    simclr, pairs = tiny_models()
    optimizer = torch.optim.SGD(simclr.parameters(), lr=0.0)
    contrastive.contrastive_step(data_parallel(simclr), optimizer, inputs["view1"], inputs["view2"], 0.3,
                                 contrastive.nt_xent, cpu)
    clip_optimizer = torch.optim.SGD(pairs.parameters(), lr=0.0)             # zero_grad before backward: the grads stay
    loss = clip.train_step(pairs, clip_optimizer, inputs["images"], inputs["tokens"], inputs["caption_ids"], cpu,
                           data_parallel(pairs))
    named = [*(("simclr." + n, p) for n, p in simclr.named_parameters()), *(("clip." + n, p) for n, p in pairs.named_parameters())]
    return {"clip_loss": loss.detach(), **{name: p.grad.clone() for name, p in named}}


def ddp_steps(rank, port, inputs, results):
    join(rank, port)
    try:
        mine = {name: tensor[rank * PER_RANK:(rank + 1) * PER_RANK] for name, tensor in inputs.items()}
        results[rank] = step_gradients(mine, torch.nn.parallel.DistributedDataParallel)
    finally:
        dist.destroy_process_group()


def test_ddp_steps_equal_the_single_process_step_on_the_whole_batch():
    generator = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    tokens = torch.randint(0, 259, (n, 6), generator=generator)
    tokens[:, -1] = 259                                                        # the end-of-text token
    inputs = {"view1": torch.rand(n, 3, 8, 8, generator=generator, dtype=torch.float64),
              "view2": torch.rand(n, 3, 8, 8, generator=generator, dtype=torch.float64),
              "images": torch.randint(0, 256, (n, 3, 8, 8), generator=generator, dtype=torch.uint8),
              "tokens": tokens,
              "caption_ids": torch.randint(0, 3, (n,), generator=generator)}   # repeats, on both ranks
    results = mp.Manager().dict()
    mp.start_processes(ddp_steps, args=(free_port(), inputs, results), nprocs=WORLD, start_method="spawn")

    whole = step_gradients(inputs, lambda model: model)
    for rank in range(WORLD):
        got = results[rank]
        assert set(got) == set(whole)
        for name in whole:   # float32 CLIP: the sums run in another order
            torch.testing.assert_close(got[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- The scripts under torchrun ----

SMALL = {"03_contrastive": ["--epochs", "1", "--n-train", "256", "--n-test", "128", "--probe-steps", "10"],
         "04_vit": ["--epochs", "1", "--n-train", "400", "--n-test", "200", "--probe-samples", "200", "--probe-steps", "10"],
         "05_clip": ["--steps", "8", "--n-train", "300", "--n-test", "100", "--eval-images", "50", "--probe-steps", "10"]}


def torchrun(*command, processes=WORLD):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                           f"--master_port={free_port()}", *command],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def fresh_model(script, config):
    """The model a checkpoint of script holds, built from its saved config."""
    module = common.import_script(script)
    if script == "03_contrastive":
        return module.SimCLR(3, config["width"], config["hidden"], config["projection"]), "simclr"
    if script == "04_vit":
        return module.build_model("vit", module.Config(**config), num_classes=10), "vit-classifier"
    cfg = module.Config(**config)
    text = module.TextTransformer(cfg.vocab_size, cfg.context, cfg.text_dim, cfg.text_depth, cfg.text_heads)
    return module.CLIP(module.image_encoder(cfg, torch.device("cpu")), text, cfg.embed_dim), "clip"


@pytest.mark.parametrize("script", SMALL)
def test_two_processes_run_and_only_rank_0_writes(tmp_path, script):
    argv = ["--quick", "--device", "cpu", *SMALL[script]]
    # each process gets a folder of its own (torchrun sets RANK), so a file written by rank 1 would show
    result = torchrun("--no-python", "sh", "-c", f'exec "{sys.executable}" {script}.py {" ".join(argv)} --out "{tmp_path}/rank$RANK"')
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "rank1").exists()                                  # rank 1 made no folder at all
    written = {p.name for p in (tmp_path / "rank0").iterdir()}
    common.import_script(script).main([*argv, "--out", str(tmp_path / "single")])
    assert written == {p.name for p in (tmp_path / "single").iterdir()} and "metrics.json" in written
    summaries = [line for line in result.stdout.splitlines() if line.startswith(script)]
    assert len(summaries) == 1                                                 # one summary line, from rank 0
    assert json.loads((tmp_path / "rank0" / "metrics.json").read_text())["processes"] == WORLD
    checkpoint = next(p for p in (tmp_path / "rank0").iterdir() if p.suffix == ".pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model, kind = fresh_model(script, state["config"])
    common.load_checkpoint(checkpoint, model, kind)                            # no DDP "module." prefix: loads on CPU


def test_a_batch_larger_than_each_process_share_fails_before_training(tmp_path):
    # 100 training images over 2 processes: 50 each, fewer than a batch of 64. Every rank checks this before any
    # collective, so none waits on another; torchrun stops the other ranks once the first exits, so how many of
    # them print their line before being stopped depends on timing, but every line printed is this one.
    result = torchrun("03_contrastive.py", "--quick", "--device", "cpu", "--n-train", "100", "--out", str(tmp_path))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= WORLD and all("--batch-size 64" in e and "each of the 2 processes" in e for e in errors)
    assert not (tmp_path / "metrics.json").exists()


def test_more_processes_per_machine_than_gpus_with_nccl_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(common.UserError, match="2 processes per machine asked for, but it has 1 GPUs"):
        common.init_distributed(torch.device("cuda"))
    assert not dist.is_initialized()
