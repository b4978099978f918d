"""Training throughput of 01_autoencoder.py's models, in images per second, fed two ways on the same GPU:
  - resident: the script's own loop (uint8 images resident on the GPU, batches indexed and converted there);
  - DataLoader: the common pipeline, float32 CPU tensors through torch.utils.data.DataLoader (shuffled,
    pinned memory, N workers) and copied to the GPU each step.
The model, batch size, optimizer, bf16 autocast and step are the same in both; only the feeding differs.
Also times evaluation.py's linear probe on 60 000 x 512 features. Run on a GPU:
    python benchmarks/bench_01_autoencoder.py            (--models ae,vae --workers 0,4,8 --epochs 3)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import evaluation  # noqa: E402

autoencoder = common.import_script("01_autoencoder")


@dataclass
class Config(common.RunConfig):
    models: str = common.arg("ae,vae", "comma-separated --model values of 01_autoencoder.py to time")
    workers: str = common.arg("0,4,8", "comma-separated DataLoader worker counts to time")
    epochs: int = common.arg(3, "timed passes over the 50 000 training images, after one untimed warm-up pass")
    batch_size: int = common.arg(autoencoder.Config.batch_size, "images per step, as in the script's default run")
    train_size: int = common.arg(50_000, "training images of the embedded set to feed")


QUICK = dict(models="ae", workers="0", epochs=1, train_size=1000)   # a CPU smoke run of the benchmark itself


def dataloader_throughput(model, images, batch_size, workers, epochs, device):
    """Images per second of the same training step, fed by a DataLoader over CPU float32 tensors."""
    dataset = torch.utils.data.TensorDataset(images.cpu().float() / 255)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    model.train()
    for epoch in range(epochs + 1):                 # the first pass warms up workers, allocator and kernels
        if epoch == 1:
            clock = common.Stopwatch(device)
        for (x,) in loader:
            x = x.to(device, non_blocking=True)
            with common.autocast(device):
                loss, _ = model.objective(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epochs * len(loader) * batch_size / clock.seconds()


def resident_throughput(model, images, batch_size, epochs, device):
    """Images per second of the script's own train() loop, after one untimed warm-up pass."""
    autoencoder.train(model, images, 1, batch_size, 1e-3, device, desc="warm-up")
    history = autoencoder.train(model, images, epochs, batch_size, 1e-3, device, desc="timed")
    return history["images"] / history["seconds"]


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    common.check(cfg.epochs > 0 and cfg.batch_size > 0 and cfg.train_size >= cfg.batch_size,
                 "--epochs and --batch-size must be positive, and --train-size at least one batch")
    device, out = common.setup(cfg, __file__)
    data = common.load_images("shapes", device=device, n_train=cfg.train_size, n_test=1, seed=cfg.seed)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)}
    for name in cfg.models.split(","):
        script_cfg = common.parse_config(autoencoder.Config, ["--model", name], "")
        make = lambda: autoencoder.build_model(script_cfg, data.shape).to(device).set_mean_image(data.x_train)
        results[f"{name} resident"] = resident_throughput(make(), data.x_train, cfg.batch_size, cfg.epochs, device)
        print(f"{name}: resident uint8 on the device: {results[f'{name} resident']:,.0f} img/s", flush=True)
        for workers in (int(w) for w in cfg.workers.split(",")):
            key = f"{name} DataLoader, {workers} workers"
            results[key] = dataloader_throughput(make(), data.x_train, cfg.batch_size, workers, cfg.epochs, device)
            print(f"{name}: DataLoader with {workers} workers: {results[key]:,.0f} img/s "
                  f"(resident feeds {results[f'{name} resident'] / results[key]:.1f}x as many)", flush=True)

    features = torch.randn(60_000, 512, device=device)
    labels = torch.randint(0, 10, (60_000,), device=device)
    watch = common.Stopwatch(device)
    evaluation.linear_probe(features, labels, features[:10_000], labels[:10_000], 10)
    results["linear probe seconds (60k x 512, default steps)"] = watch.seconds()
    print(f"linear_probe on 60 000 x 512 features: {results['linear probe seconds (60k x 512, default steps)']:.2f} s "
          f"on {results['device']}")
    common.save_json(out / "results.json", results)
    common.finish_run(out)


if __name__ == "__main__":
    common.run(main)
