"""Disentanglement, measured: the MIG (Chen et al. 2018) of 01_autoencoder.py's codes against the shapes set's
factors, for the autoencoder, the VAE and the beta-VAE, several seeds each. Does beta move MIG more than the seed
does? (Locatello et al. 2019 found, over 12 000 models, that the random seed and the hyperparameters matter more
than the choice of objective, and that without supervision no method reliably gives a disentangled code.)
Each run trains one model with 01's own loop and defaults (data fixed at seed 0; the seed sets the initialisation
and the order of the batches), then scores the posterior-mean code of the test images with 01's mig().
    python benchmarks/bench_01_mig.py          (--runs ae,vae:1,vae:4,vae:8 --seeds 0,1,2 --epochs 20)
Writes results.json (every run, per-factor gaps), table.md and mig.png (MIG and test error per run, seed by seed).
"""
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

autoencoder = common.import_script("01_autoencoder")


@dataclass
class Config(common.RunConfig):
    runs: str = common.arg("ae,vae:1,vae:4,vae:8", "comma-separated --model values of 01, vae:BETA for a (beta-)VAE")
    seeds: str = common.arg("0,1,2", "comma-separated seeds, one model per run and seed")
    epochs: int = common.arg(autoencoder.Config.epochs, "passes over the training images per model (shrink to fit time)")
    train_size: int = common.arg(50_000, "training images of the shapes set")
    test_size: int = common.arg(10_000, "test images the MIG is measured on")
    latent_dim: int = common.arg(32, "L: width of every code")


QUICK = dict(runs="ae,vae:4", seeds="0,1", epochs=2, train_size=600, test_size=300)


def parse_runs(text):
    """'ae,vae:4' -> [('ae', 1.0), ('vae', 4.0)]: the model and its beta."""
    runs = []
    for item in text.split(","):
        model, _, beta = item.partition(":")
        common.check(model in ("ae", "dae", "vae") and (not beta or model == "vae"),
                     f"--runs: {item!r} is not ae, dae, vae or vae:BETA")
        try:
            runs.append((model, float(beta or 1)))
        except ValueError:
            raise common.UserError(f"--runs: the beta in {item!r} is not a number") from None
    return runs


def parse_seeds(text):
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise common.UserError(f"--seeds must be comma-separated integers, got {text!r}") from None


def score(model_name, beta, seed, data, factors, cfg, device):
    """Train one model as 01 does and measure its code: MIG (and per factor), test error, active units."""
    common.seed_everything(seed)
    script_cfg = autoencoder.Config(model=model_name, beta=beta, latent_dim=cfg.latent_dim)
    model = autoencoder.build_model(script_cfg, data.shape).to(device).set_mean_image(data.x_train)
    history = autoencoder.train(model, data.x_train, cfg.epochs, script_cfg.batch_size, script_cfg.lr, device,
                                script_cfg.warmup, desc=f"{model_name} beta {beta:g} seed {seed}")
    codes = autoencoder.encode_all(model, data.x_test)                                # (N, L)
    value, gaps = autoencoder.mig(codes, factors)
    return {"mig": value, "per_factor": gaps, "test_mse": autoencoder.reconstruction_error(model, data.x_test),
            "active_units": autoencoder.active_units(model, data.x_test)[0], "train_seconds": history["seconds"]}


def plot(rows, names, path):
    """MIG (left) and test error (right) per run: one dot per seed, a bar at the mean."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("mig", "test_mse"), ("MIG (test codes, 20 bins)", "test squared error per pixel")):
        for i, name in enumerate(names):
            values = [row[key] for row in rows if row["run"] == name]
            ax.scatter([i + 0.06 * (s - (len(values) - 1) / 2) for s in range(len(values))], values, s=22, zorder=3)
            ax.hlines(statistics.mean(values), i - 0.25, i + 0.25, color="k")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("spread across seeds (dots) beside the change across beta (bars: means)", fontsize=10)
    axes[1].set_title("what the KL weight costs in reconstruction", fontsize=10)
    common.save_figure(fig, path)


def table(rows, names, seeds):
    lines = [f"| run | MIG, seeds {', '.join(map(str, seeds))} | MIG mean ± sd | best factor (gap) | test MSE | active units |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in names:
        mine = [row for row in rows if row["run"] == name]
        migs = [row["mig"] for row in mine]
        gaps = {f: statistics.mean(row["per_factor"][f] for row in mine) for f in mine[0]["per_factor"]}
        best = max(gaps, key=gaps.get)
        spread = statistics.stdev(migs) if len(migs) > 1 else 0.0
        lines.append(f"| {name} | {' / '.join(f'{m:.3f}' for m in migs)} | {statistics.mean(migs):.3f} ± {spread:.3f} "
                     f"| {best} ({gaps[best]:.2f}) | {statistics.mean(row['test_mse'] for row in mine):.5f} "
                     f"| {statistics.mean(row['active_units'] for row in mine):.1f} |")
    return "\n".join(lines)


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    runs, seeds = parse_runs(cfg.runs), parse_seeds(cfg.seeds)
    common.check(cfg.epochs > 0 and cfg.train_size >= autoencoder.Config.batch_size and cfg.test_size >= 2 and
                 cfg.latent_dim >= 2, f"--epochs must be positive, --train-size at least one batch "
                                      f"({autoencoder.Config.batch_size}), --test-size and --latent-dim at least 2")
    device, out = common.setup(cfg, __file__)
    data = common.load_images("shapes", device=device, n_train=cfg.train_size, n_test=cfg.test_size, seed=0)
    factors = autoencoder.mig_factors(data.factors_test)
    rows, names = [], []
    for model_name, beta in runs:
        name = model_name if model_name != "vae" else f"vae, beta {beta:g}"
        names.append(name)
        for seed in seeds:
            rows.append({"run": name, "model": model_name, "beta": beta, "seed": seed,
                         **score(model_name, beta, seed, data, factors, cfg, device)})
            print(f"{name}, seed {seed}: MIG {rows[-1]['mig']:.3f}, test MSE {rows[-1]['test_mse']:.5f}", flush=True)
    text = table(rows, names, seeds)
    common.save_json(out / "results.json", {"epochs": cfg.epochs, "train_size": cfg.train_size,
                                            "test_size": cfg.test_size, "bins": autoencoder.MIG_BINS, "runs": rows})
    common.save_text(out / "table.md", text + "\n")
    plot(rows, names, out / "mig.png")
    out = common.finish_run(out)
    print(text)
    return rows


if __name__ == "__main__":
    common.run(main)
