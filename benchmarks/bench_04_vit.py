"""04's models against the usual peers, on a GPU (timm and torchvision are needed here only):
  1. training throughput (images/s, bf16, AdamW step included) of 04's ViT, eager and under torch.compile
     (mode "reduce-overhead", as 04 compiles on one GPU: fused kernels replayed as a CUDA graph), against
     timm's VisionTransformer of the same depth, width, heads and patch size (fused attention kernels);
  2. Fashion-MNIST: 04's CNN against torchvision's ResNet-18 (CIFAR stem) trained for the same time,
     both through 04's training loop (same augmentations, optimiser and schedule).
Run: python benchmarks/bench_04_vit.py --data-dir data [--cnn-epochs 10] [--part throughput|fashion]
(the defaults, batch 512, patch 4 and crop 0.3, are the settings of the numbers in RESULTS.md)"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

vit_script = common.import_script("04_vit")


def throughput(model, device, batch_size, warmup=15, steps=60):
    """Training images per second of model on random 32x32 inputs: forward, backward and a fused AdamW step,
    under bf16 autocast. The warm-up steps include any compilation."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        with common.autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    watch = common.Stopwatch(device)
    for _ in range(warmup):
        step()
    first = watch.seconds()
    watch = common.Stopwatch(device)
    for _ in range(steps):
        step()
    return steps * batch_size / watch.seconds(), first


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def resnet18(classes):
    """torchvision's ResNet-18 with the usual stem for 32x32 images: a 3x3 stride-1 first conv, no max-pool."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--cnn-epochs", type=int, default=10)
    parser.add_argument("--crop", type=float, default=0.3, help="crop augmentation of the CNN and ResNet-18 runs")
    parser.add_argument("--patch-size", type=int, default=4, help="patch size of the ViTs whose throughput is compared")
    parser.add_argument("--part", choices=["all", "throughput", "fashion"], default="all")
    args = parser.parse_args()
    device = common.pick_device("auto")
    assert device.type == "cuda", "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = vit_script.Config(patch_size=args.patch_size)
    if args.part != "fashion":
        compare_throughput(cfg, device, args.batch_size)
    if args.part != "throughput":
        compare_with_resnet(cfg, device, args)


def compare_throughput(cfg, device, batch_size):
    import timm
    shape = dict(img_size=32, patch_size=cfg.patch_size, embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                 mlp_ratio=cfg.mlp_ratio, num_classes=10)
    print(f"ViT: patch {cfg.patch_size}, width {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}; batch {batch_size}; "
          f"torch {torch.__version__}, timm {timm.__version__}, {torch.cuda.get_device_name()}")
    results = {}
    for name, make, compiled in [
        ("04 ViT, eager", lambda: vit_script.build_model("vit", cfg, 10), False),
        ("04 ViT, torch.compile", lambda: vit_script.build_model("vit", cfg, 10), True),
        ("timm ViT, eager", lambda: timm.models.vision_transformer.VisionTransformer(**shape), False),
        ("timm ViT, torch.compile", lambda: timm.models.vision_transformer.VisionTransformer(**shape), True),
    ]:
        torch.manual_seed(0)
        model = make().to(device)
        params = count_parameters(model)
        rate, first = throughput(torch.compile(model, mode="reduce-overhead") if compiled else model, device, batch_size)
        results[name] = rate
        print(f"{name:26s} {params / 1e6:.3f}M params  {rate / 1e3:7.1f}k train img/s  (warm-up incl. compile {first:.1f} s)")
    ratio = results["04 ViT, torch.compile"] / results["timm ViT, torch.compile"]
    print(f"04 compiled / timm compiled = {ratio:.2f}; 04 compiled / timm eager = "
          f"{results['04 ViT, torch.compile'] / results['timm ViT, eager']:.2f}")


def compare_with_resnet(cfg, device, args):
    fashion = dataclasses.replace(cfg, dataset="fashion-mnist", data_dir=args.data_dir, model="cnn", epochs=args.cnn_epochs,
                                  batch_size=args.batch_size, crop=args.crop, compile="off")   # both eager: no compile time
    common.seed_everything(0)
    data = vit_script.load_data(fashion, device)
    stats = vit_script.channel_stats(data.x_train)
    pool = torch.arange(len(data.x_train), device=device)
    cnn = vit_script.build_model("cnn", fashion, 10).to(device)
    history = vit_script.train_classifier(cnn, data, stats, pool, fashion, device, "04 CNN")
    budget, cnn_top1 = history[-1]["seconds"], history[-1]["test_top1"]      # the test set after the last step
    print(f"04 CNN ({count_parameters(cnn) / 1e6:.2f}M): fashion-mnist test top-1 {cnn_top1:.4f} "
          f"after {fashion.epochs} epochs, {budget:.1f} s")
    # ResNet-18 gets as many epochs as fit in the CNN's time, from the speed of a short timed run
    probe = resnet18(10).to(device)
    rate, _ = throughput(probe, device, args.batch_size, warmup=5, steps=30)
    epochs = max(1, round(budget * rate / len(data.x_train)))
    torch.manual_seed(0)
    resnet = resnet18(10).to(device)
    history = vit_script.train_classifier(resnet, data, stats, pool, dataclasses.replace(fashion, epochs=epochs), device, "ResNet-18")
    resnet_top1 = history[-1]["test_top1"]
    print(f"ResNet-18 ({count_parameters(resnet) / 1e6:.2f}M): fashion-mnist test top-1 {resnet_top1:.4f} "
          f"after {epochs} epochs, {history[-1]['seconds']:.1f} s (budget {budget:.1f} s)")
    print(f"CNN - ResNet-18 = {100 * (cnn_top1 - resnet_top1):+.2f} points")


if __name__ == "__main__":
    main()
