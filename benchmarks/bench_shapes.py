"""How hard is the embedded image set? Generation time, and a linear classifier on raw pixels against a
small CNN trained for a fixed time. Run on a GPU: python benchmarks/bench_shapes.py"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import evaluation  # noqa: E402


def small_cnn():
    block = lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                              nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                              nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def main():
    device = common.pick_device("auto")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for target in ["cpu", device.type] if device.type != "cpu" else ["cpu"]:
        watch = common.Stopwatch(torch.device(target))
        common.load_images("shapes", device=target)
        print(f"generate 50k train + 10k test on {target}: {watch.seconds():.2f} s")
    data = common.load_images("shapes", device=device)
    flat = lambda x: x.flatten(1).float() / 255
    raw = evaluation.linear_probe(flat(data.x_train), data.y_train, flat(data.x_test), data.y_test, 10, epochs=30)
    print(f"linear classifier on raw pixels: top-1 {raw['top1']:.3f}")
    model = small_cnn().to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    epochs, batch = 10, 256
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * (len(data.x_train) // batch))
    watch = common.Stopwatch(device)
    for _ in range(epochs):
        for idx in torch.randperm(len(data.x_train), device=device)[: len(data.x_train) // batch * batch].split(batch):
            with common.autocast(device):
                loss = F.cross_entropy(model(data.x_train[idx].float() / 255), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = watch.seconds()
    model.eval()
    with torch.no_grad(), common.autocast(device):
        logits = torch.cat([model(x.float() / 255) for x in data.x_test.split(1000)])
    cnn = evaluation.topk_accuracy(logits.float(), data.y_test)
    params = sum(p.numel() for p in model.parameters())
    print(f"small CNN ({params / 1e3:.0f}k parameters, {epochs} epochs, {seconds:.1f} s): top-1 {cnn['top1']:.3f}")


if __name__ == "__main__":
    main()
