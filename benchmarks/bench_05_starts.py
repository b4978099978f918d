"""05 on a real captioned set: the homework's programme as one table. Image-encoder starts {random, 04's SimCLR,
MAE, DINO} x {fine-tuned, frozen (LiT)} x paired images {10%, 100%}; each pre-trained start is 04_vit.py --pretrain
on the same set's training images without their captions (the split is fixed, so no test image is pre-trained on).
Every row: test recall@1/5/10 both ways, zero-shot top-1 (plain and balanced over classes) where the set has
classes, the kept validation step with the gap between validation and training loss there, and training seconds;
with several --seeds, the mean and the spread (min..max) of each.

Run on a GPU (the whole table is 4 x 2 x 2 - 2 = 14 rows per seed, some 40 s each at the defaults):
  python benchmarks/bench_05_starts.py --out runs/bench_05_starts
  python benchmarks/bench_05_starts.py --starts random,mae --modes fine-tuned --paired 1 --seeds 0 --steps 300
--checkpoint simclr=PATH reuses an encoder 04 pre-trained before; arguments it does not know go to 05_clip.py
(e.g. --steps 600 --batch-size 512); --pretrain-args goes to 04_vit.py. The random start takes the pre-trained
encoders' shape (04's default ViT), so that only the starting weights differ. Frozen random is no row: a locked
random encoder learns nothing (05 refuses it)."""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

clip = common.import_script("05_clip")
vit = common.import_script("04_vit")

STARTS = ("random", "simclr", "mae", "dino")
MODES = ("fine-tuned", "frozen")
COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def pretrained(start, args, out):
    """04's encoder for a start: the --checkpoint given, or 04_vit.py --pretrain START run here."""
    given = dict(item.split("=", 1) for item in args.checkpoint)
    if start in given:
        return given[start]
    folder = out / f"pretrain_{start}"
    vit.main(["--dataset", args.dataset, "--data-dir", args.data_dir, "--pretrain", start, "--out", str(folder),
              *args.pretrain_args.split()])
    return str(folder / f"vit_{start}.pt")


def shape_of(checkpoint):
    """05's image-shape options for an encoder of the checkpoint's shape (04's default ViT when there is none)."""
    arch = torch.load(checkpoint, map_location="cpu", weights_only=True)["arch"] if checkpoint else None
    default = vit.Config()
    arch = arch or dict(patch_size=default.patch_size, dim=default.dim, depth=default.depth, heads=default.heads)
    return ["--patch-size", str(arch["patch_size"]), "--image-dim", str(arch["dim"]),
            "--image-depth", str(arch["depth"]), "--image-heads", str(arch["heads"])]


def row_of(metrics):
    """The numbers of one 05 run that the table shows."""
    row = {key: metrics["retrieval"][key] for key in COLUMNS}
    if "zero_shot" in metrics:
        row.update(zero_shot_top1=metrics["zero_shot"]["top1"], zero_shot_balanced=metrics["zero_shot"]["balanced_top1"])
    validation = metrics.get("validation")
    if validation:
        row.update(kept_step=validation["kept_step"], loss_gap=validation["loss_gap_at_kept"])
    return {**row, "paired_images": metrics["train_images"], "batch_size": metrics["batch_size"], "seconds": metrics["seconds"]}


def spread(values):
    return f"{statistics.mean(values):.3f}" + (f" ({min(values):.3f}..{max(values):.3f})" if len(values) > 1 else "")


def table(rows):
    """A Markdown table: one line per start, mode and share, each number the mean over seeds (and the spread)."""
    keys = [k for k in (*COLUMNS, "zero_shot_top1", "zero_shot_balanced", "loss_gap", "seconds") if k in rows[0]]
    lines = ["| image encoder | paired images | " + " | ".join(keys) + " | kept step |", "|" + " --- |" * (len(keys) + 3)]
    groups = {}
    for row in rows:
        groups.setdefault((row["start"], row["mode"], row["paired_images"], row["batch_size"]), []).append(row)
    for (start, mode, paired, batch), runs in groups.items():
        cells = [spread([run[k] for run in runs]) for k in keys]
        steps = "/".join(str(run.get("kept_step", "-")) for run in runs)
        lines.append(f"| {start}, {mode} | {paired} (batch {batch}) | " + " | ".join(cells) + f" | {steps} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="openclipart", help="05's real captioned set (openclipart, flickr8k, captions)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--starts", default=",".join(STARTS), help="comma-separated, from " + ",".join(STARTS))
    parser.add_argument("--modes", default=",".join(MODES), help="fine-tuned and/or frozen (LiT)")
    parser.add_argument("--paired", default="0.1,1", help="shares of the training images that keep their captions")
    parser.add_argument("--seeds", default="0,1,2", help="05's --seed of each run (the split stays the same)")
    parser.add_argument("--checkpoint", action="append", default=[], help="START=PATH: a pre-trained encoder to reuse")
    parser.add_argument("--pretrain-args", default="", help="more options for 04_vit.py --pretrain, e.g. '--pretrain-epochs 20'")
    parser.add_argument("--out", default=str(common.ROOT / "runs" / "bench_05_starts"))
    args, extra = parser.parse_known_args()
    starts, modes = args.starts.split(","), args.modes.split(",")
    common.check(set(starts) <= set(STARTS) and set(modes) <= set(MODES), f"--starts from {STARTS}, --modes from {MODES}")
    shares, seeds = [float(s) for s in args.paired.split(",")], [int(s) for s in args.seeds.split(",")]
    common.check(all(0 < s <= 1 for s in shares), f"--paired takes shares in (0, 1], got {args.paired}")
    common.check(all("=" in item for item in args.checkpoint), f"--checkpoint takes START=PATH, got {args.checkpoint}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the training images left once 05 has held out its validation share: --paired counts from them
    cfg = common.parse_config(clip.Config, ["--dataset", args.dataset, "--data-dir", args.data_dir, *extra], clip.__doc__,
                              quick=clip.QUICK)
    n_train = len(clip.load_data(cfg, "cpu")[0].train)
    checkpoints = {start: pretrained(start, args, out) for start in starts if start != "random"}
    shape = shape_of(next(iter(checkpoints.values()), None))
    rows = []
    for share in shares:
        for start in starts:
            for mode in modes:
                if start == "random" and mode == "frozen":
                    continue
                for seed in seeds:
                    name = f"{start}-{mode}-{share:g}-seed{seed}"
                    paired = round(share * n_train) if share < 1 else n_train
                    # a few paired images take a smaller batch: half of them, so that each epoch has 2 steps at least
                    argv = ["--dataset", args.dataset, "--data-dir", args.data_dir, "--seed", str(seed),
                            "--paired", str(paired), "--out", str(out / name), *extra,
                            "--batch-size", str(min(cfg.batch_size, paired // 2))]
                    argv += shape if start == "random" else ["--init-image", checkpoints[start]]
                    argv += ["--freeze-image"] * (mode == "frozen")
                    row = {"start": start, "mode": mode, "share": share, "seed": seed, **row_of(clip.main(argv)[1])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    common.save_json(out / "rows.json", rows)         # after every run: a cut-short table keeps its rows
    print(table(rows))
    common.save_text(out / "table.md", table(rows) + "\n")


if __name__ == "__main__":
    common.run(main)
