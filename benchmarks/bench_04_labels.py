"""The data-efficiency answer and the inductive-bias answer of the homework, in one command: with 1%, 10% and 100% of
Fashion-MNIST's labels, a ViT from scratch, the CNN from scratch, and the ViT after each self-supervised
pre-training (04's --pretrain mae | dino | simclr, on all training images, no labels), each pre-trained ViT read
by a linear probe and a kNN classifier on its frozen class token and fine-tuned. Every supervised run takes the same
number of steps (--epochs passes' worth over the full training set, as 04 does for fewer labels); the time column
counts the pre-training too. Also the cost of MAE's step at --mask-ratio 0.75 against a step over all patches.
The defaults: 28 px, patch 4, batch 1024, crop 0.3, learning rate 1e-3, and 60 epochs' steps for every supervised
run, which bring the from-scratch ViT's 100% point within a point of its 80-epoch run (RESULTS.md).

Run: python benchmarks/bench_04_labels.py --data-dir data            (the whole programme)
     python benchmarks/bench_04_labels.py --fractions 0.01 --methods dino --epochs 20 --pretrain-seconds 30
Writes metrics.json (one row per model, share of labels and read-out), labels.png (test top-1 against the number of
labels, log scale) and table.md into --out. --val-split N scores on the last N training images instead of the test
set, for tuning."""
import argparse
import dataclasses
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

vit_script = common.import_script("04_vit")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", default=str(common.ROOT / "runs" / "bench_04_labels"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fractions", default="0.01,0.1,1", help="shares of the training labels, comma-separated")
    parser.add_argument("--methods", default="mae,dino,simclr", help="pre-trainings to compare ('' = none)")
    parser.add_argument("--baselines", default="vit,cnn", help="models trained from scratch ('' = none)")
    parser.add_argument("--finetune-fractions", default=None, help="the shares at which to train and fine-tune "
                        "(default: all of --fractions; the probe and kNN rows are made at every share)")
    parser.add_argument("--epochs", type=int, default=60, help="fine-tuning and from-scratch steps, in passes' worth")
    parser.add_argument("--pretrain-seconds", type=float, default=0, help="the epochs of each pre-training that take "
                        "about this long, from the speed of a short run (0 = its pretrain_epochs)")
    parser.add_argument("--n-train", type=int, default=0, help="training images to load (0 = all)")
    parser.add_argument("--val-split", type=int, default=0, help="score on the last N training images, not the test set")
    parser.add_argument("--encoders", default="", help="a folder for each pre-trained encoder (vit_METHOD.pt): one "
                        "saved there with the same settings is loaded instead of pre-training again, e.g. to fine-tune "
                        "at other --fractions in a second run")
    parser.add_argument("--timing-steps", type=int, default=50, help="steps of each timed MAE step (0 = skip)")
    parser.add_argument("--set", nargs="*", default=[], help="other 04 options, e.g. lr=1e-3; METHOD.option=value "
                        "for one pre-training's run only (its fine-tuning too), e.g. dino.local_crops=8 "
                        "mae.pretrain_epochs=60")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# Each pre-training's own settings on 28-pixel images: its epochs, and DINO's chosen from short runs' probes
# (RESULTS.md): four local crops of 12 pixels, a teacher that follows the student faster (0.99) over the few steps of
# a short run, and a lower learning rate
METHOD_SETTINGS = {"mae": ["pretrain_epochs=40"],
                   "dino": ["pretrain_epochs=20", "local_crops=4", "ema=0.99", "pretrain_lr=1e-3"],
                   "simclr": ["pretrain_epochs=20"]}


def configs(args):
    """(the 04 Config of the supervised runs, {method: the Config of its pre-training and fine-tuning}): --set's
    plain options reach every run, METHOD.option=value only that method's, over METHOD_SETTINGS."""
    shared, own = [], {m: list(o) for m, o in METHOD_SETTINGS.items()}
    for option in args.set:
        method, dot, rest = option.partition(".")
        if not dot or "=" in method:
            shared.append(option)
            continue
        common.check(method in own, f"--set {option!r}: {method!r} is not a pre-training ({', '.join(own)})")
        own[method].append(rest)
    options = dict(dataset=args.dataset, data_dir=args.data_dir, device=args.device, seed=args.seed, n_train=args.n_train,
                   val_split=args.val_split, epochs=args.epochs, image_size=28, patch_size=4, batch_size=1024, crop=0.3,
                   lr=1e-3)
    cfg = vit_script.Config(**{**options, **common.config_overrides(vit_script.Config, shared, "--set")})
    return cfg, {m: replace(cfg, pretrain=m, **common.config_overrides(vit_script.Config, o, f"--set ({m})"))
                 for m, o in own.items()}


def epochs_for(seconds, settings, data, stats, device):
    """Pre-training epochs that take about `seconds` over all of data, from the speed of the second of two epochs
    over 20 batches (the first one holds any compiling)."""
    sample = common.ImageData(data.name, data.x_train[:20 * settings.batch_size], None, data.x_test, None, [])
    encoder = vit_script.build_model("vit", settings, num_classes=0).to(device)
    history, _ = vit_script.PRETRAINERS[settings.pretrain](encoder, sample, stats, replace(settings, pretrain_epochs=2), device)
    per_image = (history[1]["seconds"] - history[0]["seconds"]) / (history[1]["images"] - history[0]["images"])
    return max(1, round(seconds / (per_image * len(data.x_train))))


def time_mae_steps(cfg, data, stats, device, steps):
    """Seconds per MAE training step (forward, backward, AdamW) at cfg.mask_ratio against one over all N patches
    (every patch visible to the encoder, the loss on all of them), after a warm-up that holds any compiling."""
    result = {}
    for name, ratio in (("masked", cfg.mask_ratio), ("all_patches", 0.0)):
        torch.manual_seed(cfg.seed)
        mae = vit_script.MAE(vit_script.build_model("vit", cfg, 0), cfg.decoder_dim, cfg.decoder_depth).to(device)
        forward = vit_script.compiled(mae, cfg, device)
        optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = vit_script.normalise(data.x_train[:cfg.batch_size], stats)
        keep, restore, mask = vit_script.random_masking(len(x), mae.encoder.num_patches, ratio, device)
        mask = mask if ratio > 0 else torch.ones_like(mask)

        def step():
            with common.autocast(device):
                prediction = forward(x, keep, restore)
            loss = vit_script.mae_loss(prediction.float(), x, mask, cfg.patch_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(10):
            step()
        watch = common.Stopwatch(device)
        for _ in range(steps):
            step()
        result[f"{name}_step_seconds"] = watch.seconds() / steps
    result["ratio"] = result["masked_step_seconds"] / result["all_patches_step_seconds"]
    print(f"MAE step at mask ratio {cfg.mask_ratio}: {1e3 * result['masked_step_seconds']:.2f} ms, over all patches "
          f"{1e3 * result['all_patches_step_seconds']:.2f} ms (ratio {result['ratio']:.2f})")
    return result


def pretrained_encoder(settings, data, stats, device, folder):
    """The ViT after settings.pretrain's pre-training, and its record (epochs, losses, seconds, collapse checks):
    pre-trained here, or loaded from folder/vit_METHOD.pt when a run with the same settings saved it there."""
    torch.manual_seed(settings.seed)
    encoder = vit_script.build_model("vit", settings, num_classes=0).to(device)
    path = Path(folder) / f"vit_{settings.pretrain}.pt" if folder else None
    if path and path.is_file():
        saved = common.load_checkpoint(path, encoder, kind="vit", device=device)
        common.check(saved["config"] == dataclasses.asdict(settings), f"{path} was pre-trained with other settings: "
                     "remove it, or run with the settings it was saved with")
        return encoder, saved["pretrain"]
    history, _ = vit_script.PRETRAINERS[settings.pretrain](encoder, data, stats, settings, device)
    record = {"epochs": settings.pretrain_epochs or vit_script.PRETRAIN_EPOCHS[settings.pretrain],
              "loss": [r["loss"] for r in history], "seconds": history[-1]["seconds"],
              **{k: [r[k] for r in history] for k in history[-1] if "entropy" in k}}
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        common.save_checkpoint(path, encoder, settings, kind="vit", arch=encoder.arch, pretrain=record)
    return encoder, record


def supervised(kind, cfg, data, stats, pool, device, desc, init=None):
    """Test top-1 and seconds of a classifier trained on the labelled pool, from scratch or from init's weights."""
    torch.manual_seed(cfg.seed)
    model = vit_script.build_model(kind, cfg, len(data.classes)).to(device)
    if init is not None:
        model.load_state_dict({**model.state_dict(), **init.state_dict()})         # a fresh head on the encoder
    history = vit_script.train_classifier(model, data, stats, pool, cfg, device, desc)
    return history[-1]["test_top1"], history[-1]["seconds"]


def run(args, out=None):
    cfg, method_configs = configs(args)
    for settings in (cfg, *method_configs.values()):
        vit_script.validate(settings)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fractions = sorted(float(f) for f in args.fractions.split(",") if f)
    methods = [m for m in args.methods.split(",") if m]
    common.check(all(m in vit_script.PRETRAINERS for m in methods), f"--methods: choose from {list(vit_script.PRETRAINERS)}")
    data = vit_script.load_data(cfg, device)
    stats = vit_script.channel_stats(data.x_train)
    pools = {f: vit_script.subset(len(data.x_train), f, cfg.seed, device) for f in fractions}
    trained = fractions if args.finetune_fractions is None else [float(f) for f in args.finetune_fractions.split(",") if f]
    common.check(set(trained) <= set(fractions), "--finetune-fractions must be among --fractions")
    rows, metrics = [], {"config": vars(args), "torch": torch.__version__,
                         "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if args.timing_steps and "mae" in methods:
        metrics["mae_timing"] = time_mae_steps(method_configs["mae"], data, stats, device, args.timing_steps)

    def add(model, mode, fraction, top1, seconds, pretrain_seconds=0.0):
        rows.append({"model": model, "mode": mode, "fraction": fraction, "labels": len(pools[fraction]),
                     "test_top1": top1, "seconds": seconds + pretrain_seconds, "pretrain_seconds": pretrain_seconds})
        print(f"{model:8s} {mode:9s} {len(pools[fraction]):6d} labels: test top-1 {top1:.4f} ({seconds + pretrain_seconds:.1f} s)")
        if out:                                               # after every row: a run cut short keeps what it measured
            common.save_json(out / "metrics.json", {**metrics, "rows": rows})

    for kind in filter(None, args.baselines.split(",")):
        for f in trained:
            add(kind, "scratch", f, *supervised(kind, cfg, data, stats, pools[f], device, f"{kind} on {len(pools[f])} labels"))
    # kNN on centred features too (SimpleShot's CL2N): subtracting the training mean removes the direction every
    # image shares, which otherwise adds to every cosine (the final LayerNorm's bias, the pixels' mean image)
    knn = lambda encoder, f, centre=False: vit_script.probe_features(encoder, data, stats, pools[f], cfg, True, centre=centre)
    metrics["pixels_knn"] = {f: knn(None, f) for f in fractions}
    metrics["centred_knn"] = {"pixels": {f: knn(None, f, centre=True) for f in fractions}}
    for method in methods:
        settings = method_configs[method]
        if args.pretrain_seconds:
            settings = replace(settings, pretrain_epochs=epochs_for(args.pretrain_seconds, settings, data, stats, device))
        encoder, metrics[f"{method}_pretrain"] = pretrained_encoder(settings, data, stats, device, args.encoders)
        seconds = metrics[f"{method}_pretrain"]["seconds"]
        metrics["centred_knn"][method] = {}
        for f in fractions:
            add(method, "probe", f, vit_script.probe_features(encoder, data, stats, pools[f], settings), 0.0, seconds)
            add(method, "knn", f, knn(encoder, f), 0.0, seconds)
            metrics["centred_knn"][method][f] = knn(encoder, f, centre=True)
            if f in trained:
                add(method, "finetune", f, *supervised("vit", settings, data, stats, pools[f], device,
                                                        f"{method} fine-tuned on {len(pools[f])} labels", encoder), seconds)
    metrics["rows"] = rows
    return metrics


def plot(metrics, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {model: f"C{i}" for i, model in enumerate(dict.fromkeys(r["model"] for r in metrics["rows"]))}
    styles = {"scratch": "o-", "finetune": "o-", "probe": "s--", "knn": "^:"}      # a colour per model, a line per read-out
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in metrics["rows"]):
        chosen = [r for r in metrics["rows"] if (r["model"], r["mode"]) == (model, mode)]
        ax.plot([r["labels"] for r in chosen], [100 * r["test_top1"] for r in chosen], styles[mode],
                color=colours[model], label=f"{model} {mode}")
    ax.set(xscale="log", xlabel="labelled training images", ylabel="test top-1 (%)",
           title="what labels buy: from scratch, probed and fine-tuned after pre-training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    common.save_figure(fig, path)


def table(metrics):
    lines = ["| model | read-out | labels | test top-1 | seconds (pre-training included) |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['labels']} | {100 * r['test_top1']:.1f} | {r['seconds']:.0f} |"
              for r in metrics["rows"]]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = run(args, out)
    common.save_json(out / "metrics.json", metrics)
    common.save_text(out / "table.md", table(metrics) + "\n")
    if metrics["rows"]:
        plot(metrics, out / "labels.png")
    print(table(metrics))
    return metrics


if __name__ == "__main__":
    common.run(main)
