"""Pre-training throughput of 03_contrastive.py: its GPU augmentations against the common pipeline, torchvision
transforms on PIL images in DataLoader worker processes, feeding the same encoder, loss and optimizer at the same
batch size. Both make SimCLR's two views of every image; throughput counts images (each gives 2 views).

Run on a GPU machine with torchvision installed (torchvision is used here only, never by the scripts):
  python benchmarks/bench_03_contrastive.py [--workers 15] [--width 32] [--batch-size 1024] [--steps 150]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

contrastive = common.import_script("03_contrastive")


class TwoViews(torch.utils.data.Dataset):
    """uint8 images (N, H, W, C) as PIL images, two views of each through a torchvision pipeline."""

    def __init__(self, images, pipeline):
        self.images, self.pipeline = images, pipeline

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i].squeeze(-1) if self.images.shape[-1] == 1 else self.images[i])
        return self.pipeline(image), self.pipeline(image)


def torchvision_pipeline(cfg, size):
    """The same chain and strengths as contrastive.augment, in torchvision's usual SimCLR form."""
    s = cfg.jitter
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(1 - cfg.crop, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(cfg.flip),
        transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=contrastive.JITTER_PROBABILITY),
        transforms.RandomGrayscale(cfg.grayscale),
        transforms.RandomApply([transforms.GaussianBlur(2 * contrastive.BLUR_RADIUS + 1, contrastive.BLUR_SIGMA)], p=cfg.blur),
        transforms.ToTensor()])


def train_rate(cfg, device, in_channels, batches, steps, warmup):
    """Images per second of pre-training steps fed by the iterator `batches` of (view1, view2)."""
    model = contrastive.build_model(cfg, in_channels, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    for step in range(warmup + steps):
        if step == warmup:
            watch = common.Stopwatch(device)
        view1, view2 = next(batches)
        contrastive.contrastive_step(model, optimizer, view1, view2, cfg.temperature, contrastive.nt_xent, device)
    return steps * cfg.batch_size / watch.seconds()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--width", type=int, default=contrastive.Config.width)
    parser.add_argument("--batch-size", type=int, default=contrastive.Config.batch_size)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    device = common.pick_device("auto")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    cfg = contrastive.Config(width=args.width, batch_size=args.batch_size)
    data = common.load_images(args.dataset, args.data_dir, device)
    channels, size = data.shape[0], data.shape[-1]
    strength = contrastive.strengths(cfg)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, {args.dataset} {data.shape}, "
          f"batch {cfg.batch_size} images (x2 views), encoder width {cfg.width}, {args.workers} workers")

    def gpu_batches():
        """(view1, view2) batches, made as the script's pre-training makes them."""
        generator = torch.Generator(device).manual_seed(0)
        usable = len(data.x_train) // cfg.batch_size * cfg.batch_size      # every batch full
        while True:
            order = torch.randperm(len(data.x_train), device=device, generator=generator)[:usable]
            yield from contrastive.view_batches(data.x_train, order, cfg.batch_size, strength, generator)

    watch, batches = common.Stopwatch(device), gpu_batches()
    for _ in range(args.steps):
        next(batches)
    print(f"GPU augmentations alone:            {args.steps * cfg.batch_size / watch.seconds():10,.0f} img/s")
    gpu = train_rate(cfg, device, channels, gpu_batches(), args.steps, warmup=20)
    print(f"GPU augmentations + pre-training:   {gpu:10,.0f} img/s")

    loader = torch.utils.data.DataLoader(
        TwoViews(data.x_train.permute(0, 2, 3, 1).cpu().numpy(), torchvision_pipeline(cfg, size)),
        batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=True)

    def cpu_batches():
        while True:
            for view1, view2 in loader:
                yield view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)

    batches = cpu_batches()
    for _ in range(2 * args.workers):                 # let every worker start and fill its queue
        next(batches)
    start = time.perf_counter()
    for _ in range(args.steps // 2):
        next(batches)
    print(f"CPU torchvision DataLoader alone:   {args.steps // 2 * cfg.batch_size / (time.perf_counter() - start):10,.0f} img/s")
    cpu = train_rate(cfg, device, channels, batches, args.steps // 2, warmup=5)
    print(f"CPU DataLoader + pre-training:      {cpu:10,.0f} img/s")
    print(f"bench_03_contrastive: GPU augmentations {gpu:,.0f} img/s vs CPU torchvision pipeline with {args.workers} "
          f"workers {cpu:,.0f} img/s: {gpu / cpu:.2f}x (batch {cfg.batch_size}, width {cfg.width}, {args.dataset})")


if __name__ == "__main__":
    main()
