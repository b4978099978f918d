"""03_contrastive.py's seven methods and their ablations under the same pre-training time: ms per step, epochs
reached, linear probe and weighted kNN of the frozen h, effective rank and std x sqrt(P) of z (the two collapses);
linear probe against batch size for SimCLR and MoCo; hard against semi-hard triplets with the share of triplets that
still violate the margin. One process, data loaded once per dataset; every run is timed from 03's own pretrain().

Each run gets the same --seconds of pre-training: a short calibration (40 steps, run twice so that cuDNN's kernel
search is not timed) measures its ms per step, and the run gets the whole epochs that fit. A run is
`method[+ablate][:option=value,...]` over 03's Config (e.g. `byol:ema=0.9`, `triplet:mining=hard`).
Tune with --validation N (the last N training images become the evaluation set), never on the test set.

Run on one GPU:
  python benchmarks/bench_03_methods.py --seconds 60 --ablation-seconds 10 --batch-seconds 10 \\
      --out runs/bench_03_methods                                                         # the whole programme
  python benchmarks/bench_03_methods.py --seconds 10 --datasets fashion-mnist --validation 10000 \\
      --runs byol byol:ema=0.9 --batch-sizes "" --out runs/tune                          # tuning, on validation
Writes results.json, results.md (the tables) and spectra_<dataset>.png (the z spectra of methods and ablations).
Programmes run in parts merge, on any machine, without training:
  python benchmarks/bench_03_methods.py --merge runs/part1 runs/part2 --out runs/bench_03_methods
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

contrastive = common.import_script("03_contrastive")

METHOD_RUNS = list(contrastive.METHODS) + ["triplet:mining=hard"]
ABLATION_RUNS = [f"{method}+ablate" for method in contrastive.ABLATION]
# the settings shared by every method on each dataset: the README's Fashion-MNIST command, 03's defaults on shapes
DATASET_SETTINGS = {"fashion-mnist": dict(width=64, crop=0.5, jitter=1.5, temperature=0.05), "shapes": {}}
# per-method settings, chosen on a validation split of Fashion-MNIST (RESULTS.md says how): MoCo v2's own temperature
# beat the 0.05 tuned for SimCLR; SimSiam preferred a lower learning rate
METHOD_SETTINGS = {"moco": dict(temperature=0.2), "simsiam": dict(lr=5e-4)}


def parse_run(spec):
    """'byol+ablate:ema=0.9,lr=1e-3' -> ('byol', True, {'ema': 0.9, 'lr': 0.001}), values typed as Config's fields."""
    name, _, options = spec.partition(":")
    method, _, ablate = name.partition("+")
    common.check(method in contrastive.METHODS and ablate in ("", "ablate"), f"bad run {spec!r}")
    return method, ablate == "ablate", parse_options(options, f"run {spec!r}:")


def parse_options(options, where):                   # 'ema=0.9,lr=1e-3' -> {'ema': 0.9, 'lr': 0.001}
    return common.config_overrides(contrastive.Config, filter(None, options.split(",")), where)


def config(dataset, spec, args, **extra):
    method, ablate, overrides = parse_run(spec)
    cfg = contrastive.Config(dataset=dataset, data_dir=args.data_dir, method=method, ablate=ablate, seed=args.seed,
                             **{**DATASET_SETTINGS.get(dataset, {}), **METHOD_SETTINGS.get(method, {}),
                                **parse_options(args.set, "--set"), **overrides, **extra})
    contrastive.validate(cfg)
    return cfg


def timed_run(cfg, data, device, seconds):
    """Pre-train cfg for the whole epochs that fit in `seconds`, then evaluate h and z on data's test split."""
    steps = 40                                                  # the geometry read every 2nd step costs a sync
    few = dataclasses.replace(data, x_train=data.x_train[: steps * cfg.batch_size])
    short = dataclasses.replace(cfg, epochs=1)
    for _ in range(2):                                          # the first call also times cuDNN's kernel search
        _, _, calibration = contrastive.pretrain(short, few, device, "calibrate")
    steps_per_epoch = len(data.x_train) // cfg.batch_size
    epochs = max(1, int(seconds * 1000 / (calibration["ms_per_step"] * steps_per_epoch)))
    cfg = dataclasses.replace(cfg, epochs=epochs)
    model, history, stats = contrastive.pretrain(cfg, data, device, cfg.method)
    h_train, _ = contrastive.embed(model, data.x_train, device)
    h_test, z_test = contrastive.embed(model, data.x_test, device)
    scores = contrastive.evaluate_features({"h": (h_train, h_test)}, data, cfg)["h"]
    shape = contrastive.final_geometry(h_test, z_test)
    row = {"epochs": epochs, "ms_per_step": stats["ms_per_step"], "seconds": stats["seconds"],
           "linear_top1": scores["linear_top1"], "knn_top1": scores["knn_top1"],
           "z_effective_rank": shape["z_effective_rank"], "z_std_sqrt_dim": shape["z_std_sqrt_dim"],
           "h_effective_rank": shape["h_effective_rank"], "final_loss": history["loss"][-1],
           "z_spectrum": shape["z_spectrum"]}
    if cfg.method == "triplet":
        row["violating_triplets"] = contrastive.violating_triplets(model, data.x_test, contrastive.strengths(cfg),
                                                                   cfg, device)
    return row


def run_or_divergence(cfg, data, device, seconds):
    """timed_run, or the one-line reason where the run diverged (the other runs go on)."""
    try:
        return timed_run(cfg, data, device, seconds)
    except common.UserError as error:
        return {"diverged": str(error)}


def baselines(cfg, data, device):
    """A random encoder's h and the raw pixels, probed as the runs are."""
    torch.manual_seed(cfg.seed)
    random_model = contrastive.build_model(cfg, data.shape[0], device)
    r_train, _ = contrastive.embed(random_model, data.x_train, device)
    r_test, rz_test = contrastive.embed(random_model, data.x_test, device)
    pixels = lambda images: common.to_float(images).flatten(1)
    scores = contrastive.evaluate_features({"random encoder": (r_train, r_test),
                                            "pixels": (pixels(data.x_train), pixels(data.x_test))}, data, cfg)
    shape = contrastive.final_geometry(r_test, rz_test)
    return {"random encoder": {**scores["random encoder"], "z_effective_rank": shape["z_effective_rank"],
                               "z_std_sqrt_dim": shape["z_std_sqrt_dim"]}, "pixels": scores["pixels"]}


def plot_spectra(path, dataset, rows, projection):
    """Methods in solid lines, their ablations dashed in the same colour: dimensional collapse is a cliff, constant
    collapse a low std (in the legend)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = dict(zip(contrastive.METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for spec, row in rows.items():
        if "z_spectrum" not in row:
            continue
        method, ablate, overrides = parse_run(spec)
        values = np.sqrt(np.clip(row["z_spectrum"], 1e-30, None))
        ax.plot(np.arange(1, len(values) + 1), values / values[0], "--" if ablate else ":" if overrides else "-",
                color=colours[method], label=f"{spec}: rank {row['z_effective_rank']:.1f}/{projection}, "
                                             f"std x sqrt(P) {row['z_std_sqrt_dim']:.2f}")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.5)
    ax.set_xlabel("index of the singular value of z")
    ax.set_ylabel("singular value / the largest")
    ax.legend(fontsize=6.5, ncol=2)
    ax.set_title(f"spectra of the test embeddings z on {dataset}: methods (solid) and ablations (dashed)", fontsize=9)
    common.save_figure(fig, path)


def table(rows, columns):
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out, results, header, projection):
    """results.md and a spectra figure per dataset from {dataset: {runs, batch_sizes, baselines}}."""
    report = [header]
    columns = ["epochs", "ms_per_step", "seconds", "linear_top1", "knn_top1", "z_effective_rank", "z_std_sqrt_dim",
               "h_effective_rank", "violating_triplets", "diverged"]
    for dataset, result in results.items():
        report += [f"\n## {dataset}\n", table({**result["runs"], **result.get("baselines", {})}, columns)]
        if result["batch_sizes"]:
            report += ["\n### batch size\n", table(result["batch_sizes"], ["epochs", "ms_per_step", "linear_top1",
                                                                            "knn_top1"])]
        if result["runs"]:
            plot_spectra(out / f"spectra_{dataset}.png", dataset, result["runs"], projection)
    common.save_text(out / "results.md", "\n".join(report) + "\n")
    return report


def merge(args):
    """The runs of several earlier outputs as one report: rows of the same dataset side by side, later folders
    winning where a run repeats."""
    results, headers = {}, []
    for folder in args.merge:
        saved = json.loads((Path(folder) / "results.json").read_text())
        headers.append(f"{folder}: {saved.pop('args', 'merged')}")
        for dataset, result in saved.items():
            merged = results.setdefault(dataset, {"runs": {}, "batch_sizes": {}, "baselines": {}})
            for part in merged:
                merged[part].update(result.get(part, {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.save_json(out / "results.json", results)
    print("\n".join(write_report(out, results, "# bench_03_methods, merged from\n" + "\n".join(
        f"- {h}" for h in headers), contrastive.Config.projection)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="pre-training seconds of every run")
    parser.add_argument("--ablation-seconds", type=float, default=0, help="of the +ablate runs (0: --seconds); a "
                        "collapse shows in seconds")
    parser.add_argument("--datasets", default="fashion-mnist,shapes")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--runs", nargs="*", default=METHOD_RUNS + ABLATION_RUNS, help="method[+ablate][:k=v,...]")
    parser.add_argument("--batch-sizes", default="128,256,1024", help="for the table of simclr and moco; '' skips it")
    parser.add_argument("--batch-seconds", type=float, default=0, help="of each run of the batch-size table "
                        "(0: --seconds)")
    parser.add_argument("--validation", type=int, default=0, help="evaluate on the last N training images (tuning)")
    parser.add_argument("--n-train", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--n-test", type=int, default=0, help="test images (0: all)")
    parser.add_argument("--set", default="", help="Config options for every run, e.g. probe_steps=500,width=32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", nargs="*", default=[], help="folders of earlier runs: merge their results.json, "
                        "train nothing")
    parser.add_argument("--out", default="runs/bench_03_methods")
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    device = common.pick_device("auto")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    for spec in args.runs:
        parse_run(spec)                                         # a typo fails now, not after an hour
    header = (f"# bench_03_methods: {args.seconds:g} s of pre-training per run"
              f"{f' ({args.ablation_seconds:g} s per ablation)' if args.ablation_seconds else ''}"
              f"{f' ({args.batch_seconds:g} s per batch-size run)' if args.batch_seconds else ''}, "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, torch {torch.__version__}, "
              f"{'validation ' + str(args.validation) if args.validation else 'test set'}")
    results = {}
    for dataset in args.datasets.split(","):
        data = common.load_images(dataset, args.data_dir, device, n_train=args.n_train or None,
                                  n_test=args.n_test or None, seed=args.seed)
        if args.validation:
            data = contrastive.hold_out(data, args.validation)
        rows, sizes = {}, {}
        results[dataset] = {"runs": rows, "batch_sizes": sizes}
        jobs = [(rows, spec, config(dataset, spec, args),
                 args.ablation_seconds if "+ablate" in spec and args.ablation_seconds else args.seconds)
                for spec in args.runs]
        jobs += [(sizes, f"{method} B={size}", config(dataset, method, args, batch_size=size),
                  args.batch_seconds or args.seconds)
                 for method in ("simclr", "moco") for size in batch_sizes]
        for where, name, cfg, seconds in jobs:             # saved after every run: a cut-off programme keeps its rows
            where[name] = run_or_divergence(cfg, data, device, seconds)
            print(f"{dataset} {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in where[name].items() if k != "z_spectrum"), flush=True)
            common.save_json(out / "results.json", {"args": vars(args), **results})
        results[dataset]["baselines"] = baselines(config(dataset, "simclr", args), data, device)
        common.save_json(out / "results.json", {"args": vars(args), **results})
    print("\n".join(write_report(out, results, header, config(args.datasets.split(",")[0], "simclr", args).projection)))

if __name__ == "__main__":
    main()
