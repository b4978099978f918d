"""05_clip on a GPU: training throughput in image-caption pairs per second, the share of a training step spent
in each encoder, and (with --table) the README's comparison of image-encoder starts: random, 04's SimCLR
checkpoint, and that checkpoint frozen, each with few paired captions and with all of them.

Run on a GPU:  python benchmarks/bench_05_clip.py [--table runs/04_vit/vit_simclr.pt] [--default-run runs/05_clip]
(the checkpoint comes from `python 04_vit.py --pretrain simclr`; --default-run reuses a finished default run as
the table's "random, all pairs" row instead of training it again)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

clip = common.import_script("05_clip")


def seconds_per_call(function, device, calls=30, warmup=10):
    for _ in range(warmup):
        function()
    clock = common.Stopwatch(device)
    for _ in range(calls):
        function()
    return clock.seconds() / calls


def gpu_seconds_per_call(function, calls=5):
    """Time the GPU spends running kernels per call (the profiler's sum over kernels), without the gaps between them."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            function()
        torch.cuda.synchronize()
    on_gpu = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    return sum(event.time_range.elapsed_us() for event in on_gpu) / 1e6 / calls


def throughput(device, argv):
    """Pairs per second of a training step (the default configuration, or argv's), and what each encoder costs:
    forward and backward timed alone on the wall clock, and the GPU's kernel time in each."""
    cfg = common.parse_config(clip.Config, argv, clip.__doc__, quick=clip.QUICK)
    clip.validate(cfg)
    cfg, data, _, tokenizer, tokens, _, model = clip.prepare(cfg, device)
    optimizer, _ = clip.make_optimizer(model, cfg)
    generator = torch.Generator(device=device).manual_seed(0)
    index = torch.randperm(len(data.train), generator=generator, device=device)[:cfg.batch_size]
    caption_ids = clip.pick_captions(data.train, index, generator)
    images, batch_tokens = data.train.images[index], tokens[caption_ids]

    def full_step():
        clip.train_step(model, optimizer, images, batch_tokens, caption_ids, device)

    def forward_backward(encode, inputs):
        def run():
            with common.autocast(device):
                embeddings = encode(inputs)
            embeddings.float().square().sum().backward()     # any scalar: the backward pass costs the same
        return run

    parts = {"step": full_step, "image_encoder": forward_backward(model.encode_image, images),
             "text_encoder": forward_backward(model.encode_text, batch_tokens)}
    wall = {name: seconds_per_call(function, device) for name, function in parts.items()}
    features = model.image_features(images).detach()
    # the step of --freeze-image: cached features (B, E) in place of the images, no gradient reaches the image encoder
    frozen = seconds_per_call(lambda: clip.train_step(model, optimizer, features, batch_tokens, caption_ids, device), device)
    result = {"batch_size": cfg.batch_size, "tokens_per_caption": batch_tokens.shape[1], "pairs_per_second": cfg.batch_size / wall["step"],
              "wall_ms": {name: 1e3 * t for name, t in wall.items()}, "frozen_image_pairs_per_second": cfg.batch_size / frozen}
    print(f"training step (B={cfg.batch_size}, L={batch_tokens.shape[1]} tokens): {1e3 * wall['step']:.1f} ms = "
          f"{result['pairs_per_second'] / 1e3:.1f}k pairs/s; forward+backward alone: image encoder {1e3 * wall['image_encoder']:.1f} ms, "
          f"text encoder {1e3 * wall['text_encoder']:.1f} ms; frozen image encoder (cached features): "
          f"{result['frozen_image_pairs_per_second'] / 1e3:.1f}k pairs/s")
    if device.type == "cuda":
        gpu = {name: gpu_seconds_per_call(function) for name, function in parts.items()}
        result["gpu_ms"] = {name: 1e3 * t for name, t in gpu.items()}
        result["image_encoder_share"] = gpu["image_encoder"] / gpu["step"]
        result["text_encoder_share"] = gpu["text_encoder"] / gpu["step"]
        print(f"GPU kernel time per step {1e3 * gpu['step']:.1f} ms ({100 * gpu['step'] / wall['step']:.0f}% of the wall time): "
              f"image encoder {100 * result['image_encoder_share']:.0f}%, text encoder {100 * result['text_encoder_share']:.0f}%, "
              f"loss, optimizer and the rest {100 * (1 - result['image_encoder_share'] - result['text_encoder_share']):.0f}%")
    return result


ROWS = [("random", []), ("SimCLR", ["--init-image", "{checkpoint}"]),
        ("SimCLR, frozen", ["--init-image", "{checkpoint}", "--freeze-image"])]


def table(checkpoint, few, default_run, extra):
    """Each start with --paired few and with all pairs; returns a list of result dicts and prints a Markdown table.
    The random encoder takes the checkpoint's shape, so that only the starting weights differ."""
    arch = torch.load(checkpoint, map_location="cpu", weights_only=True)["arch"]
    shape = ["--patch-size", str(arch["patch_size"]), "--image-dim", str(arch["dim"]),
             "--image-depth", str(arch["depth"]), "--image-heads", str(arch["heads"])]
    results = []
    for paired in (few, 0):
        for name, argv in ROWS:
            if name == "random" and paired == 0 and default_run:
                metrics = json.loads((Path(default_run) / "metrics.json").read_text())
            else:
                out = Path(common.ROOT) / "runs" / "bench_05_clip" / f"{name.replace(', ', '-')}-{paired or 'all'}"
                argv = [a.format(checkpoint=checkpoint) for a in argv] + (shape if name == "random" else [])
                argv += ["--paired", str(paired), "--out", str(out), *extra]
                metrics = clip.main(argv)[1]
            row = {"start": name, "paired_images": metrics["train_images"], "zero_shot_top1": metrics["zero_shot"]["top1"],
                   "heldout_pair_top1": metrics["compositional"]["heldout_pair_top1"],
                   "seen_pair_top1": metrics["compositional"]["seen_pair_top1"],
                   "i2t_r1": metrics["retrieval"]["i2t_r1"], "t2i_r1": metrics["retrieval"]["t2i_r1"],
                   "t2i_r10": metrics["retrieval"]["t2i_r10"], "probe_top1": metrics["linear_probe"]["top1"],
                   "seconds": metrics["seconds"]}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("| image encoder | paired images | zero-shot top-1 | held-out colour+shape top-1 (seen) | "
          "image->text R@1 | text->image R@1 / R@10 | linear probe | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['start']} | {r['paired_images']} | {r['zero_shot_top1']:.3f} | {r['heldout_pair_top1']:.3f} "
              f"({r['seen_pair_top1']:.3f}) | {r['i2t_r1']:.3f} | {r['t2i_r1']:.3f} / {r['t2i_r10']:.3f} | "
              f"{r['probe_top1']:.3f} | {r['seconds']:.0f} |")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="", help="04's SimCLR checkpoint: also run the comparison of starts")
    parser.add_argument("--few", type=int, default=2000, help="paired images of the 'few' rows (at least --batch-size)")
    parser.add_argument("--default-run", default="", help="a finished default run's folder, reused as 'random, all'")
    parser.add_argument("--json", default="", help="also write the results here")
    args, extra = parser.parse_known_args()      # anything else goes to 05_clip.py, e.g. --steps 1000
    device = common.pick_device("auto")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
               "throughput": throughput(device, extra)}
    if args.table:
        results["table"] = table(args.table, args.few, args.default_run, extra)
    if args.json:
        common.save_json(args.json, results)


if __name__ == "__main__":
    common.run(main)
