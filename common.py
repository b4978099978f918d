"""Plumbing shared by the numbered scripts, and nothing else: no model, loss or evaluation lives here
(the evaluation protocol is evaluation.py).

1. Errors a user can fix          UserError, check, check_file, run
2. Configuration                  arg, RunConfig, parse_config, config_overrides
3. Device, seeds, speed           setup, finish_run, cpu_notice, autocast, grad_scaler, Stopwatch, warmup_cosine,
                                  to_float, at_least_float32, constant, progress
4. Outputs                        one run per folder (staged, then published); save_json, save_figure,
                                  save_checkpoint, load_checkpoint; figures: tile, tsne
5. Reusing an earlier script      import_script
6. The embedded image set         make_shapes, caption
7. Real datasets                  DATASETS, load_images (MNIST, Fashion-MNIST, CIFAR-10); read_text, read_text8;
                                  captions: read_caption_folder (captions.csv), read_flickr8k
8. Several GPUs (torchrun)        rank, world_size, is_main, rank_share, data_parallel, backward_full_batch,
                                  gather_with_grad, GlobalBatchNorm, mean_over_ranks
"""
import argparse
import atexit
import csv
import dataclasses
import functools
import gzip
import hashlib
import http.client
import importlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent


# ---- 1. Errors a user can fix ----

class UserError(Exception):
    """Bad input (an option, a file, a folder): reported as one line, never as a traceback."""


def check(condition, message):
    if not condition:
        raise UserError(message)


def check_file(path, what, hint=""):
    """A one-line error unless path is a file: a folder given where a file is wanted is called a folder."""
    path = Path(path)
    check(not path.is_dir(), f"{what} {str(path)!r} is a folder, not a file{hint}")
    check(path.is_file(), f"{what} {str(path)!r} does not exist{hint}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's or torchrun's stop), raised like Ctrl-C's KeyboardInterrupt so that the same
    clean-up runs: temporary files and the unfinished run's staging folder are removed."""


def _terminate(signum, frame):
    raise Terminated


def run(main):
    """The `__main__` guard of every script: a UserError becomes one line on stderr and exit code 2, Ctrl-C and
    SIGTERM one line and 130 or 143. However it ends, a run that did not reach finish_run leaves --out as it was
    and no temporary file. Anything else is a bug and keeps its traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        print("terminated" if isinstance(stop, Terminated) else "interrupted", file=sys.stderr)
        sys.exit(143 if isinstance(stop, Terminated) else 130)
    finally:
        for name in ("SIGINT", "SIGTERM"):           # the process is ending: a second Ctrl-C must not stop the clean-up
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        discard_unfinished_runs()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- 2. Configuration: a dataclass turned into argparse options ----

def arg(default, help, choices=None):
    """A Config field with its help text (and allowed values), shown by --help."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    """Options every script shares; each script's Config adds its own after these."""
    dataset: str = arg("shapes", "shapes (embedded, offline) | mnist | fashion-mnist | cifar10")
    data_dir: str = arg("data", "where real datasets are read from, or downloaded to once")
    device: str = arg("auto", "auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu")
    seed: int = arg(0, "seed for data, initialisation and sampling")
    out: str = arg("", "output folder; empty means runs/<script name>")
    quick: bool = arg(False, "shrink everything so the whole script runs on a CPU in seconds")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise UserError(message)


def parse_config(config_class, argv, description, quick=None):
    """Parse argv into config_class. With --quick, the `quick` overrides apply to every field
    the user did not set on the command line."""
    parser = _Parser(description=description.split("\n\n")[0],
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=type(f.default), choices=f.metadata.get("choices"),
                                help=text, metavar=f.name.upper())
    given = vars(parser.parse_args(argv))
    shrunk = quick if given.get("quick") and quick else {}
    cfg = config_class(**{**shrunk, **given})
    # torch.manual_seed takes 64 bits; a larger seed would end in an OverflowError traceback in setup
    check(not isinstance(cfg, RunConfig) or 0 <= cfg.seed <= 2**63 - 1, f"--seed must be between 0 and 2**63 - 1, "
                                                                        f"got {cfg.seed}")
    return cfg


def config_overrides(config_class, options, where):
    """['lr=1e-3', 'ablate=True'] -> {'lr': 0.001, 'ablate': True}: a benchmark's settings for its runs, each value
    read as parse_config reads the option's flag. where names them in the one-line error of a bad one."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    parsed = {}
    for option in options:
        key, _, value = option.partition("=")
        check(key in fields, f"{where} {option!r}: there is no option {key!r}")
        kind = type(fields[key].default)
        try:
            parsed[key] = value == "True" if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"{where} {option!r}: {value!r} is not a {kind.__name__}") from None
    return parsed


# ---- 3. Device, seeds and speed ----

def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu") from None
    check(device.type != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no CUDA GPU is visible")
    check(device.type != "mps" or torch.backends.mps.is_available(), "--device mps asked for, but MPS is not available")
    check(device.type in ("cpu", "cuda", "mps"), f"unsupported device {name!r}")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg, script_file):
    """Device, seeds, TF32 and the run's output folder for a parsed config. Returns (device, out) and saves the
    resolved config in out. out is a staging folder beside the --out folder (see stage_out): main writes every output
    there and ends with `out = finish_run(out)`, which makes it the --out folder."""
    device = init_distributed(pick_device(cfg.device))
    seed_everything(cfg.seed + rank())     # ranks draw different augmentations; DDP copies rank 0's weights
    if device.type == "cuda":
        # TF32 matrix units for the float32 matmuls that autocast leaves alone (10-bit mantissa is plenty here)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = stage_out(cfg.out or ROOT / "runs" / Path(script_file).stem)
    if is_main():
        save_json(out / "config.json", dataclasses.asdict(cfg))
        print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
              + f" -> {device}" + (f" x {world_size()} processes" if world_size() > 1 else ""))
    return device, out


def finish_run(out):
    """The last step of main, after every output is written: the staging folder out becomes the --out folder in one
    rename, replacing the folder that was there as a whole (two runs' files are never mixed). Returns the --out
    folder. Other ranks wrote nothing and get the same path."""
    run = _runs.pop(Path(out))
    if run.owner:
        with _signals_held():                  # Ctrl-C between the two renames would leave no --out folder at all
            old = run.final.with_name(f".{run.final.name}.old-{os.getpid()}")
            if run.final.exists():
                os.rename(run.final, old)
            try:
                os.rename(out, run.final)
            except OSError as error:
                if old.exists():
                    os.rename(old, run.final)
                _runs[Path(out)] = run                 # still unfinished: common.run removes it
                raise UserError(f"cannot move the run's outputs to {str(run.given)!r}: {error.strerror or error}") from None
            shutil.rmtree(old, ignore_errors=True)
    return run.given


# The float32 matmul speed of the CPU that the scripts' estimates for cpu_notice are given for (about two cores);
# they were measured on a busy 2-core machine and rescaled to it by cpu_gflops measured alongside
REFERENCE_CPU_GFLOPS = 60.0


def cpu_gflops(size=512, repeats=8):
    """This CPU's float32 matmul speed in GFLOP/s, measured in about 0.1 s."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    a @ a                                                                     # warm-up: threads, caches
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def cpu_notice(cfg, device, reference_seconds):
    """One line at the start of a run sized for a GPU that got a CPU: roughly how long it will take here, and that
    --quick is the CPU's size. reference_seconds is the script's estimate of this run on the reference CPU
    (REFERENCE_CPU_GFLOPS), scaled here by this CPU's matmul speed. Silent on a GPU, with --quick, on other ranks
    and for runs of under a minute."""
    if device.type != "cpu" or cfg.quick or not is_main():
        return
    seconds = reference_seconds * REFERENCE_CPU_GFLOPS / cpu_gflops()
    if seconds < 60:
        return
    minutes = round(seconds / 60)
    took = f"{minutes} minute{'s' * (minutes > 1)}" if seconds < 5400 else f"{seconds / 3600:.1f} hours"
    print(f"note: this run is sized for a GPU; on this CPU it takes roughly {took}. "
          "Add --quick for a CPU-sized run of seconds (smaller data and model, the same steps and outputs).")


def autocast_dtype(device):
    """bf16 on a CUDA GPU that has it, fp16 on one that does not (a T4, a V100), None (float32) elsewhere:
    CPU bf16 is slow, and tests check the CPU path in float32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device):
    dtype = autocast_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype else nullcontext()


def grad_scaler(device):
    """fp16 has 5 exponent bits, so small gradients underflow to 0: a GradScaler multiplies the loss before backward
    and divides the gradients before the step (nanoGPT's fallback). With bf16 or float32 it does nothing:
    scaler.scale(loss) is loss and scaler.step(optimizer) is optimizer.step(). Call scaler.unscale_(optimizer)
    before clipping gradients."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device) == torch.float16)


class Stopwatch:
    """Wall-clock seconds that include the GPU's queued work (it synchronises before reading the clock)."""

    def __init__(self, device):
        self.device = device
        self.start = self._now()

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def seconds(self):
        return self._now() - self.start


def warmup_cosine(step, total, warmup_steps):
    """The learning-rate multiplier of every script: a linear warm-up over the first warmup_steps, then a cosine
    decay to 0 over the rest (SGDR, Eq. 5 of Loshchilov and Hutter 2017, one cycle). Adam's early steps rest on
    poor second-moment estimates, and attention logits can blow up then: the warm-up keeps those steps small."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))


def to_float(images):
    """uint8 (B, C, H, W) -> float32 in [0, 1]. Float input (already converted) passes through."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def at_least_float32(x):
    """x in float32, or kept in float64: losses and measures stay precise under bf16 autocast and in tests."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@functools.cache
def constant(values, device, dtype):
    """A tensor of fixed numbers, made once per device and dtype. On a GPU, torch.tensor(numbers) copies them from
    the CPU and makes the CPU wait until the GPU has finished all its queued work: once per training step, that
    wait would stop the CPU from queueing kernels ahead (and on several GPUs, hold up every GPU)."""
    return torch.tensor(values, device=device, dtype=dtype)


class _ProgressLines(tqdm):
    """tqdm for a log file: a plain line at most every mininterval seconds, and one at the end (none for a phase that
    took less), instead of a bar redrawn in place with carriage returns, which a log shows as one endless line."""
    printed_at, printed_n = 0.0, None

    def display(self, msg=None, pos=None, final=False):
        elapsed = self.format_dict["elapsed"]
        due = elapsed - self.printed_at >= self.mininterval or (final and self.printed_n not in (None, self.n))
        if msg is None and due:
            print(self, file=self.fp, flush=True)
            self.printed_at, self.printed_n = elapsed, self.n
        return False                                  # nothing on screen to clear afterwards

    def close(self):
        if not self.disable:
            self.display(final=True)
        super().close()


PROGRESS_LINE_SECONDS = 5     # how often a log file gets a progress line


def progress(total, desc, unit="img"):
    """A tqdm bar counted in samples, so its rate reads as throughput (img/s, pairs/s, words/s): redrawn in place on a
    terminal, a plain line every few seconds when stderr goes to a file. Set postfix(loss=...) every few steps:
    reading a GPU loss forces a synchronisation."""
    options = dict(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, disable=not is_main())  # one under torchrun
    if sys.stderr.isatty():
        return tqdm(**options, dynamic_ncols=True, mininterval=0.5)
    return _ProgressLines(**options, ascii=True, mininterval=PROGRESS_LINE_SECONDS)


# ---- 4. Outputs: one run per folder, each file written atomically ----
#
# A run writes into a staging folder beside --out (.NAME.run-PID, only on rank 0) and finish_run renames it to --out:
# after any run, finished, failed or interrupted, --out holds the complete outputs of one run, or what it held before.

@dataclass
class _Run:
    final: Path              # the --out folder, resolved
    given: Path              # the --out folder as given, which finish_run returns
    created: Path = None     # the highest folder above the staging folder that set-up had to create
    owner: bool = True       # this process made the staging folder (rank 0)


_runs = {}                   # staging folder -> _Run, for the runs of this process that have not reached finish_run


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done: folders are never left half renamed or half removed."""
    if not hasattr(signal, "pthread_sigmask"):                          # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _new_staging_folder(path):
    """(staging folder, _Run) for the outputs of a run into path, after checking that path may be replaced."""
    given = Path(path)
    final = given.resolve()
    where = repr(str(given))
    check(not final.is_file(), f"--out {where} is a file, not a folder")
    if final.is_dir():
        check(not Path.cwd().is_relative_to(final), f"--out {where} holds the current folder; a run replaces its "
                                                    "folder as a whole, so choose another one")
        others = sorted(p.name for p in final.iterdir())
        # a run replaces its folder as a whole: only a folder of an earlier run (its config.json) or an empty one
        check(not others or "config.json" in others,
              f"--out {where} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} and is not the folder "
              "of an earlier run (no config.json); a run replaces its folder as a whole, so choose a new or empty one")
    created = next((p for p in reversed(final.parents) if not p.exists()), None)
    staging = final.with_name(f".{final.name}.run-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)                     # left by an earlier process with this id
        staging.mkdir()                                                 # with the umask's permissions
    except OSError as error:
        raise UserError(f"cannot write to output folder {where}: {error.strerror or error}") from None
    return staging, _Run(final, given, created)


def stage_out(path):
    """The staging folder of a new run whose outputs go to path (see finish_run). Under torchrun rank 0 makes it and
    every rank gets the same paths, or rank 0's error."""
    discard_unfinished_runs()
    try:
        made = _new_staging_folder(path) if is_main() else None
    except UserError as error:
        made = error
    if world_size() > 1:
        shared = [made]
        dist.broadcast_object_list(shared, src=0)
        made = shared[0]
    if isinstance(made, UserError):
        raise made
    staging, run = made
    _runs[staging] = dataclasses.replace(run, owner=is_main())
    return staging


def discard_unfinished_runs():
    """Remove the staging folders of this process's runs that did not reach finish_run (a UserError, a traceback,
    Ctrl-C, SIGTERM), and the folders that set-up created above them: --out stays as it was. common.run calls it
    when a script ends; for a main() called in a notebook or a test, the next setup and the exit of Python do."""
    with _signals_held():
        for staging, run in list(_runs.items()):
            if run.owner:
                shutil.rmtree(staging, ignore_errors=True)
                folder = staging.parent
                while run.created is not None and folder.is_relative_to(run.created):
                    try:
                        folder.rmdir()                                  # only while empty
                    except OSError:
                        break
                    folder = folder.parent
            del _runs[staging]


atexit.register(discard_unfinished_runs)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    """Call write(tmp_path), then rename over path: readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp makes 0600; outputs are as readable as the umask allows
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=float) + "\n"))


def save_text(path, text):
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _non_finite(state_dict):
    """The name of the first tensor of a state_dict that holds a NaN or an infinity; None when all are finite."""
    return next((name for name, t in state_dict.items() if torch.is_tensor(t) and not torch.isfinite(t).all()), None)


def save_checkpoint(path, model, cfg, kind, **extra):
    """{"kind", "model": state_dict, "config"}: plain tensors and dicts, loadable with weights_only=True.
    Weights that are not finite are never written: they would load silently and poison every later run."""
    state = {"kind": kind, "model": model.state_dict(), "config": dataclasses.asdict(cfg), **extra}
    bad = _non_finite(state["model"])
    check(bad is None, f"the run diverged ({bad} holds NaN or infinite weights), so {path} was not written; lower --lr")
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, model, kind, device="cpu"):
    """Load weights saved by save_checkpoint into model; a clear UserError when the file is missing,
    unreadable, of another kind of model, of other shapes, or holds non-finite weights (the model is then left
    as it was). Returns the whole checkpoint dict."""
    path = Path(path)
    check_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}); is it a file this project saved?") from None
    check(isinstance(state, dict) and isinstance(state.get("model"), dict) and "kind" in state,
          f"checkpoint {str(path)!r} was not saved by this project")
    check(state["kind"] == kind, f"checkpoint {str(path)!r} holds a {state['kind']!r} model, not a {kind!r}")
    bad = _non_finite(state["model"])
    check(bad is None, f"checkpoint {str(path)!r} holds NaN or infinite weights ({bad}): the run that saved it diverged")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise UserError(f"checkpoint {str(path)!r} does not fit this model's shapes: {first}") from None
    return state


# Figures: an image grid, and a 2-D map of features that keeps neighbours together

def tile(images, columns):
    """A grid image (rows*H, columns*W, C) in [0, 1] from images (N, C, H, W), for imshow."""
    N, C, H, W = images.shape
    rows = -(-N // columns)
    padded = torch.cat([images.float(), images.new_zeros(rows * columns - N, C, H, W, dtype=torch.float)])
    grid = padded.reshape(rows, columns, C, H, W).permute(0, 3, 1, 4, 2)       # (rows, H, columns, W, C)
    return grid.reshape(rows * H, columns * W, C).clamp(0, 1).cpu().numpy()


def tsne_affinities(x, perplexity=30.0):
    """t-SNE's P (N, N) for points x (N, D): Gaussian affinities, each row's width set by bisection so that its
    entropy is log(perplexity) (Eq. 1), then symmetrised (Sec. 3.1): symmetric, zero diagonal, sums to 1."""
    N = len(x)
    squared = torch.cdist(x, x).square()                                       # (N, N)
    beta = torch.ones(N, 1, device=x.device)                                   # 1 / (2 sigma_i^2)
    low, high = torch.zeros_like(beta), torch.full_like(beta, float("inf"))
    target = math.log(min(perplexity, (N - 1) / 3))
    for _ in range(60):
        p = torch.exp(-squared * beta).fill_diagonal_(0)                       # (N, N)
        total = p.sum(1, keepdim=True).clamp(min=1e-12)
        entropy = total.log() + beta * (squared * p).sum(1, keepdim=True) / total
        too_wide = entropy > target                                            # too many neighbours: narrow it
        low, high = torch.where(too_wide, beta, low), torch.where(too_wide, high, beta)
        beta = torch.where(high.isinf(), beta * 2, (low + high) / 2)
    p = p / total
    return (p + p.T) / (2 * N)


def tsne_gradient(P, y, exaggeration=1.0):
    """Eq. 5, the gradient of KL(P || Q) with respect to the map y (N, 2), as matrix products:
    4 sum_j (p_ij - q_ij) (y_i - y_j) / (1 + ||y_i - y_j||^2), with Q the Student-t affinities of y (Eq. 4).
    Early exaggeration multiplies P alone, as t-SNE does."""
    kernel = (1 / (1 + torch.cdist(y, y).square())).fill_diagonal_(0)    # (N, N) Student-t, one degree of freedom
    Q = kernel / kernel.sum()
    weights = (exaggeration * P - Q) * kernel                              # (N, N)
    return 4 * (weights.sum(1, keepdim=True) * y - weights @ y)           # (N, 2)


def tsne(x, perplexity=30.0, steps=500, seed=0):
    """A 2-D map (N, 2) of points x (N, D) that keeps neighbours together: t-SNE (van der Maaten and Hinton 2008),
    exact, as N x N tensor ops: gradient descent with momentum on KL(P || Q) from a small random start."""
    P = tsne_affinities(x, perplexity)
    y = 1e-4 * torch.randn(len(x), 2, generator=torch.Generator().manual_seed(seed)).to(x.device)
    velocity = torch.zeros_like(y)
    for step in range(steps):
        early = step < steps // 4                                              # early exaggeration forms clusters first
        velocity = (0.5 if early else 0.8) * velocity - 200.0 * tsne_gradient(P, y, 12.0 if early else 1.0)
        y = y + velocity
    return y


# ---- 5. Reusing an earlier script ----

def import_script(name):
    """importlib.import_module("04_vit"): numbered scripts are not valid identifiers for `import`."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


# ---- 6. The embedded image set: procedural shapes with known factors and captions ----
#
# Every image is a pure function of (seed, image index): its factors come from a counter-based hash,
# so image i is the same whether 100 or 100 000 are generated, on the CPU or the GPU, and the train
# split (indices [0, n_train)) and the test split (indices from 2**30 on) can never share an image.
# A shape is drawn from its signed distance function (negative inside), anti-aliased over one pixel.

SHAPES = ["circle", "ring", "square", "triangle", "cross", "star", "hexagon", "moon", "heart", "arrow"]
COLOURS = {"red": (0.9, 0.15, 0.1), "orange": (0.95, 0.55, 0.05), "yellow": (0.95, 0.9, 0.15),
           "green": (0.2, 0.8, 0.2), "cyan": (0.1, 0.8, 0.85), "blue": (0.15, 0.3, 0.95),
           "purple": (0.6, 0.2, 0.85), "white": (0.95, 0.95, 0.95)}
TEXTURES = ["solid", "striped", "checked"]
SIZES = ["small", "medium", "large"]
PLACES = ["in the top left", "at the top", "in the top right",          # row-major over a 3 x 3 grid
          "on the left", "in the centre", "on the right",
          "in the bottom left", "at the bottom", "in the bottom right"]
TEST_OFFSET = 2**30


def _hash_uniform(index, stream, seed):
    """Uniform floats in [0, 1) from integers (splitmix-style mixing in int64), identical on every device."""
    mask = (1 << 31) - 1
    h = ((index & mask) * 0x9E3779B1 + (index >> 31) * 0x7FEB352D + stream * 0x85EBCA77 + seed * 0xC2B2AE3D) & mask
    for multiplier in (0x2C1B3C6D, 0x297A2D39, 0x165667B1):
        h = ((h ^ (h >> 15)) * multiplier) & mask
    h = h ^ (h >> 13)
    return (h & 0xFFFFFF).float() / (1 << 24)   # 24 bits: exact in float32


def _shape_factors(index, seed):
    """The nuisance and class factors of each image; (N,) tensors, all recorded for later analysis."""
    u = lambda stream: _hash_uniform(index, stream, seed)
    scale = 0.3 + 0.3 * u(2)                                    # half-width of the shape, as a share of the image
    reach = (1.0 - scale) * 0.9                                   # keeps the shape inside the image
    return {
        "label": (u(0) * len(SHAPES)).long(),
        "colour": (u(1) * len(COLOURS)).long(),
        "scale": scale,
        "x": (2 * u(3) - 1) * reach,                              # centre in [-1, 1] image coordinates
        "y": (2 * u(4) - 1) * reach,
        "rotation": (2 * u(5) - 1) * math.pi,
        "texture": (u(6) * len(TEXTURES)).long(),
        "brightness": 0.7 + 0.3 * u(7),
        "background": 0.05 + 0.3 * u(8),                          # grey level of the background
        "noise": 0.12 * u(9),                                     # std of the pixel noise
        "stripe_angle": u(10) * math.pi,
    }


def _sdf(label, px, py):
    """Signed distance of points (n, P) to a shape of half-width 1, per class; negative inside."""
    r = torch.sqrt(px**2 + py**2)
    theta = torch.atan2(py, px)
    box = lambda hx, hy, x=px, y=py: torch.maximum((x.abs() - hx), (y.abs() - hy))
    if label == 0:                                        # circle
        return r - 0.9
    if label == 1:                                        # ring
        return (r - 0.7).abs() - 0.25
    if label == 2:                                        # square
        return box(0.8, 0.8)
    if label == 3:                                        # triangle (equilateral, pointing up)
        return torch.maximum(-py - 0.5, (py * 0.5 + px.abs() * 0.866) - 0.5)
    if label == 4:                                        # cross
        return torch.minimum(box(0.95, 0.3), box(0.3, 0.95))
    if label == 5:                                        # five-pointed star: radius swings with angle
        return r - (0.55 + 0.45 * torch.cos(5 * theta).clamp(min=0) ** 2)
    if label == 6:                                        # hexagon
        a = torch.remainder(theta, math.pi / 3) - math.pi / 6
        return r * torch.cos(a) - 0.8
    if label == 7:                                        # moon: a disk minus a shifted disk
        return torch.maximum(r - 0.9, 0.75 - torch.sqrt((px - 0.45) ** 2 + (py - 0.2) ** 2))
    if label == 8:                                        # heart: two disks over a square turned 45 degrees
        qx, qy = (px + py) * 0.7071, (py - px) * 0.7071
        lobes = torch.minimum(torch.sqrt((px + 0.35) ** 2 + (py - 0.3) ** 2), torch.sqrt((px - 0.35) ** 2 + (py - 0.3) ** 2)) - 0.5
        return torch.minimum(lobes, box(0.5, 0.5, qx, qy + 0.35))
    # arrow: a shaft and a triangular head, pointing right
    head = torch.maximum(-(px - 0.1), (px - 0.1) * 0.6 + py.abs() - 0.55)
    return torch.minimum(box(0.55, 0.22, px + 0.35, py), head - 0.05)


@functools.lru_cache(maxsize=4)
def _noise_bank(seed, pixels, device, bank_size=1024):
    """1024 hashed noise images of unit variance (bank_size, pixels); each image reads one of them.
    Hashing every pixel of every image would cost ten times the rest of the rendering."""
    index = torch.arange(bank_size * pixels, device=device)
    return ((_hash_uniform(index, 11, seed) - 0.5) * 12 ** 0.5).reshape(bank_size, pixels)


def render_shapes(factors, size=32):
    """Images (N, 3, size, size) uint8 from factors, rendered with tensor ops on factors' device."""
    label, n, device = factors["label"], factors["label"].shape[0], factors["label"].device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    gx, gy = gx.reshape(1, -1), gy.reshape(1, -1)                                   # (1, P) pixel centres
    cos, sin = torch.cos(factors["rotation"])[:, None], torch.sin(factors["rotation"])[:, None]
    dx, dy = gx - factors["x"][:, None], gy - factors["y"][:, None]                 # (N, P)
    s = factors["scale"][:, None]
    px, py = (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s                  # shape frame, half-width 1
    sdf = torch.empty(n, size * size, device=device)
    for c in range(len(SHAPES)):
        rows = (label == c).nonzero().squeeze(1)
        if len(rows):
            sdf[rows] = _sdf(c, px[rows], py[rows])
    pixel = 2.0 / size / s                                                          # one pixel in shape units
    coverage = (0.5 - sdf / pixel).clamp(0, 1)                                      # anti-aliased edge
    angle = factors["stripe_angle"][:, None]
    u = (torch.cos(angle) * px + torch.sin(angle) * py) * 3
    v = (-torch.sin(angle) * px + torch.cos(angle) * py) * 3
    stripe_u, stripe_v = (u - u.floor()) < 0.5, (v - v.floor()) < 0.5
    texture = factors["texture"][:, None]
    lit = torch.where(texture == 2, stripe_u ^ stripe_v, stripe_u)                  # stripes or checks
    fill = torch.where(texture == 0, 1.0, 0.35 + 0.65 * lit.float())                # (N, P)
    palette = torch.tensor(list(COLOURS.values()), device=device)
    rgb = palette[factors["colour"]] * factors["brightness"][:, None]               # (N, 3)
    shape = (coverage * fill)[:, None, :]                                           # (N, 1, P)
    image = factors["background"][:, None, None] * (1 - coverage[:, None, :]) + rgb[:, :, None] * shape
    bank = _noise_bank(factors["seed"], 3 * size * size, device)
    entry = (_hash_uniform(factors["index"], 12, factors["seed"]) * len(bank)).long()
    image = image.reshape(n, -1) + factors["noise"][:, None] * bank[entry]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, 3, size, size)


def make_shapes(n, seed=0, split="train", device="cpu", size=32, chunk=8192):
    """The first n images of a split of the embedded set:
    (images (n, 3, size, size) uint8, labels (n,), factors dict of (n,))."""
    check(n > 0, f"the embedded set needs a positive number of images, got {n}")
    start = 0 if split == "train" else TEST_OFFSET
    index = torch.arange(start, start + n, device=device, dtype=torch.int64)
    factors = _shape_factors(index, seed)
    factors["index"], factors["seed"] = index, seed
    images = torch.cat([render_shapes({k: (v[i:i + chunk] if torch.is_tensor(v) else v) for k, v in factors.items()}, size)
                        for i in range(0, n, chunk)])
    del factors["seed"]
    factors["size"] = (((factors["scale"] - 0.3) / 0.3) * 3).long().clamp(max=2)   # small / medium / large
    reach = (1 - factors["scale"]) * 0.9                                              # how far the centre may move
    factors["row"] = ((factors["y"] / reach + 1) / 2 * 3).long().clamp(0, 2)         # y grows downwards
    factors["column"] = ((factors["x"] / reach + 1) / 2 * 3).long().clamp(0, 2)
    return images, factors["label"], factors


def caption(factors, i):
    """'a small red striped star in the top left' from image i's factors."""
    colour = list(COLOURS)[int(factors["colour"][i])]
    texture = TEXTURES[int(factors["texture"][i])]
    texture = "" if texture == "solid" else texture + " "
    where = PLACES[int(factors["row"][i]) * 3 + int(factors["column"][i])]
    return f"a {SIZES[int(factors['size'][i])]} {colour} {texture}{SHAPES[int(factors['label'][i])]} {where}"


# ---- 7. Real datasets: downloaded once, verified, read from the standard formats ----

@dataclass
class RemoteFile:
    name: str        # file name as published
    md5: str         # MD5 of the published file, as its publisher lists it
    content_sha256: str = ""   # SHA-256 of the decompressed bytes, where known: accepts re-compressed copies
    sha256: str = ""           # SHA-256 of the published file, for files whose publisher lists no MD5 (md5="")


@dataclass
class RemoteDataset:
    urls: list       # base URLs, tried in order
    files: list      # RemoteFile
    classes: list


_FASHION = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DATASETS = {
    "mnist": RemoteDataset(
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        [RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
         RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
         RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
         RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")],
        [str(d) for d in range(10)]),
    "fashion-mnist": RemoteDataset(
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        [RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
         RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
         RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
         RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")],
        _FASHION),
    "cifar10": RemoteDataset(
        ["https://www.cs.toronto.edu/~kriz/"],
        [RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]),
}


def _digest(path, algorithm, opener=open):
    h = hashlib.new(algorithm)
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path, remote):
    """True when path holds the published bytes, or a re-compressed copy of the same content."""
    if remote.sha256 and _digest(path, "sha256") == remote.sha256:
        return True
    if _digest(path, "md5") == remote.md5:
        return True
    if remote.content_sha256:
        try:
            return _digest(path, "sha256", gzip.open) == remote.content_sha256
        except (OSError, EOFError):
            return False
    return False


def _checksum(remote):
    """The checksum a good copy has, for error messages."""
    return f"MD5 is not {remote.md5}" if remote.md5 else f"SHA-256 is not {remote.sha256}"


def _download(url, dest, remote):
    """Fetch url to dest through a temporary file; dest appears only once its checksum is right."""
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.part")   # one per process: torchrun's ranks may download at once
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(total, dest.name, unit="B") as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    f.write(block)
                    bar.update(len(block))
        if not _verified(tmp, remote):
            raise UserError(f"downloaded {url} but its {_checksum(remote)}; the file was discarded")
        os.replace(tmp, dest)
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts, IncompleteRead
        raise ConnectionError(f"{url}: {getattr(error, 'reason', error)}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_dataset(name):
    """A one-line error for a --dataset that is neither the embedded set nor a known real one."""
    check(name in ("shapes", *DATASETS), f"unknown dataset {name!r}; choose shapes, {', '.join(DATASETS)}")


def fetch(name, data_dir, spec=None):
    """Paths of the dataset's files, downloading what is missing into data_dir/name/.
    A file is looked for in data_dir/name/, then data_dir/ (e.g. a folder of Debian's copies).
    spec: a RemoteDataset that a script declares itself (05's Flickr8k); DATASETS[name] by default."""
    check(spec is not None or name in DATASETS, f"unknown dataset {name!r}; choose shapes, {', '.join(DATASETS)}")
    check(not Path(data_dir).is_file(), f"--data-dir {str(data_dir)!r} is a file, not a folder")
    spec, folder = spec or DATASETS[name], Path(data_dir) / name
    paths = []
    for remote in spec.files:
        found = next((p for p in (folder / remote.name, Path(data_dir) / remote.name) if p.is_file()), None)
        if found is not None:
            check(_verified(found, remote), f"{found} is corrupt (its {_checksum(remote)}); delete it to download again, "
                                            f"or put a good copy from {spec.urls[0]}{remote.name} there")
            paths.append(found)
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create data folder {str(folder)!r}: {error.strerror}") from None
        errors = []
        for base in spec.urls:
            try:
                _download(base + remote.name, folder / remote.name, remote)
                break
            except ConnectionError as error:
                errors.append(str(error))
        else:
            raise UserError(f"cannot download {remote.name} ({'; '.join(errors)}); "
                            f"fetch {spec.urls[0]}{remote.name} by hand and put it in {folder}/")
        paths.append(folder / remote.name)
    return paths


def read_text(path, what="text file"):
    """A user's UTF-8 text file as a string; a one-line error for one that cannot be read, is empty or is binary."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text (bad byte at offset {error.start}); "
                        "is it a binary file?") from None
    except OSError as error:
        raise UserError(f"cannot read {what} {str(path)!r}: {error.strerror or error}") from None
    check(text.strip(), f"{what} {str(path)!r} is empty")
    check("\0" not in text, f"{what} {str(path)!r} holds NUL bytes; is it a binary file?")
    return text


# text8 (Mahoney 2006), 02's real corpus: the first 10^8 bytes of an English Wikipedia dump of 2006, lower-cased
# letters and spaces. Its publisher lists no MD5; the SHA-256 of text8.zip (31 344 016 bytes) is the one other
# projects pin.
TEXT8 = RemoteDataset(["http://mattmahoney.net/dc/"],
                      [RemoteFile("text8.zip", md5="",
                                  sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232")], classes=[])


def read_text8(data_dir):
    """text8 as one string of 17M words, downloaded into data_dir/text8/ once."""
    (archive,) = fetch("text8", data_dir, spec=TEXT8)
    try:
        with zipfile.ZipFile(archive) as z:
            return z.read("text8").decode("ascii")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as error:
        raise UserError(f"{archive} is not the text8 archive ({error}); delete it to download again") from None


def read_idx(path, ndim):
    """An IDX file (gzipped or not) as a numpy array: magic 0x0000080N (N dims) of uint8, big-endian sizes.
    ndim is the number of dimensions the file must have (3 for images, 1 for labels): the checksum is not checked for
    decompressed files, so a labels file that holds images must be caught here."""
    path, kind = Path(path), "images" if ndim == 3 else "labels"
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise UserError(f"{path} cannot be read as IDX: {error}") from None
    check(len(data) >= 4 and data[:2] == b"\0\0" and data[2] == 8, f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    check(len(data) == 4 + 4 * dims + math.prod(shape), f"{path} is truncated or corrupt: header says {shape}")
    check(len(shape) == ndim, f"{path} holds a {len(shape)}-D array {shape}; an IDX {kind} file holds a {ndim}-D one "
                              "(are the images and labels files swapped?)")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow numpy arrays and nothing that could run code."""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        check((module, name) in self.allowed, f"CIFAR-10 batch holds an unexpected object {module}.{name}")
        return super().find_class(module, name)


def _check_labels(labels, where, classes):
    """Labels (N,) must be integers that name one of `classes` classes: a label of 200 would index past the
    classifier's outputs, and the traceback would come only after training."""
    check(labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer), f"{where} holds no list of integer labels")
    outside = labels[(labels < 0) | (labels >= classes)]
    if len(outside):
        raise UserError(f"{where} holds label {outside[0]}; the dataset's labels run from 0 to {classes - 1}")


def _read_cifar_batches(open_member, classes):
    def batch(name):
        try:
            d = _ArrayUnpickler(open_member(name), encoding="bytes").load()
            images, labels = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError, tarfile.TarError) as error:
            raise UserError(f"CIFAR-10 batch {name} is corrupt: {error}") from None
        check(len(images) == len(labels), f"CIFAR-10 batch {name} is corrupt: {len(images)} images but {len(labels)} labels")
        _check_labels(labels, f"CIFAR-10 batch {name}", classes)
        return images, labels
    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test = batch("test_batch")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), *test)


def _load_arrays(name, data_dir):
    """(x_train, y_train, x_test, y_test) as numpy uint8 (N, C, H, W) and int labels."""
    data_dir = Path(data_dir)
    if name == "cifar10":
        extracted = next((p for p in (data_dir / name / "cifar-10-batches-py", data_dir / "cifar-10-batches-py")
                          if (p / "test_batch").is_file()), None)
        classes = len(DATASETS[name].classes)
        if extracted is not None:
            return _read_cifar_batches(lambda member: open(extracted / member, "rb"), classes)
        (archive,) = fetch(name, data_dir)
        with tarfile.open(archive, "r:gz") as tar:
            return _read_cifar_batches(lambda member: tar.extractfile(f"cifar-10-batches-py/{member}"), classes)
    check_dataset(name)
    extracted = [next((p for p in (data_dir / name / r.name[:-3], data_dir / r.name[:-3]) if p.is_file()), None)
                 for r in DATASETS[name].files]
    paths = extracted if all(extracted) else fetch(name, data_dir)
    x_train, y_train, x_test, y_test = (read_idx(p, ndim) for p, ndim in zip(paths, (3, 1, 3, 1)))
    for images, labels, image_path, label_path in ((x_train, y_train, *paths[:2]), (x_test, y_test, *paths[2:])):
        check(images.shape[1:] == (28, 28), f"{image_path} holds {images.shape[1]}x{images.shape[2]} images; "
                                            f"{name}'s are 28x28")
        check(len(images) == len(labels), f"{image_path} holds {len(images)} images but {label_path} "
                                          f"{len(labels)} labels")
        _check_labels(labels, label_path, len(DATASETS[name].classes))
    return x_train[:, None], y_train, x_test[:, None], y_test


@dataclass
class ImageData:
    """A labelled image dataset resident on one device: images uint8 (N, C, H, W), labels int64 (N,)."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list
    factors_train: dict = None   # the embedded set's factors, (N,) tensors; None for real data
    factors_test: dict = None

    @property
    def shape(self):
        return tuple(self.x_train.shape[1:])


def to_format(images, size=None, channels=None):
    """The one place where datasets are brought to a common format: zero-pad (or resize, when larger)
    to size x size, and repeat grayscale to 3 channels when channels=3. uint8 in, uint8 out."""
    if channels is not None and images.shape[1] != channels:
        check(images.shape[1] == 1 and channels == 3, f"cannot turn {images.shape[1]} channels into {channels}")
        images = images.expand(-1, 3, -1, -1)
    if size is not None and images.shape[-1] != size:
        if images.shape[-1] < size:
            low = (size - images.shape[-1]) // 2
            high = size - images.shape[-1] - low
            images = F.pad(images, (low, high, low, high))
        else:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True).round().to(torch.uint8)
    return images.contiguous()


def load_images(name, data_dir="data", device="cpu", n_train=None, n_test=None, seed=0, size=None, channels=None):
    """A dataset by name, on device. `shapes` is generated (n_train defaults to 50 000, n_test to 10 000);
    real ones are read from data_dir (downloaded once) and cut to n_train / n_test when given."""
    if name == "shapes":
        x_train, y_train, f_train = make_shapes(n_train or 50_000, seed, "train", device)
        x_test, y_test, f_test = make_shapes(n_test or 10_000, seed, "test", device)
        data = ImageData(name, x_train, y_train, x_test, y_test, list(SHAPES), f_train, f_test)
    else:
        x_train, y_train, x_test, y_test = _load_arrays(name, data_dir)
        as_tensor = lambda a, n: torch.from_numpy(np.array(a[:n])).to(device)
        data = ImageData(name, as_tensor(x_train, n_train or len(x_train)), as_tensor(y_train, n_train or len(y_train)).long(),
                         as_tensor(x_test, n_test or len(x_test)), as_tensor(y_test, n_test or len(y_test)).long(),
                         DATASETS[name].classes)
    data.x_train, data.x_test = to_format(data.x_train, size, channels), to_format(data.x_test, size, channels)
    return data


# Images paired with captions, for 05_clip. Every image has one or more captions. A dataset is a table of unique
# caption strings plus, per image, the ids of its captions (padded with -1), so a training step picks one caption
# per image with tensor ops, and two images with the same caption string have the same caption id.

@dataclass
class Pairs:
    images: torch.Tensor      # (N, 3, S, S) uint8
    captions: torch.Tensor    # (N, most captions of an image) int64 ids into CaptionData.texts, -1 where none
    counts: torch.Tensor      # (N,) captions per image (>= 1)
    labels: torch.Tensor = None   # (N,) shape classes (embedded set only)
    factors: dict = None          # the embedded set's factors, (N,) tensors

    def __len__(self):
        return len(self.images)

    def subset(self, keep):
        return Pairs(self.images[keep], self.captions[keep], self.counts[keep],
                     None if self.labels is None else self.labels[keep],
                     None if self.factors is None else {k: v[keep] for k, v in self.factors.items()})


@dataclass
class CaptionData:
    name: str
    train: Pairs
    test: Pairs
    texts: list               # unique caption strings; ids index this list
    classes: list = None      # class names, for zero-shot classification (embedded set only)
    skipped: dict = None      # rows left out while reading, counted by reason


def index_captions(captions_per_image, texts, device):
    """Lists of caption strings per image -> (ids (N, most) with -1 padding, counts (N,)); new strings join texts."""
    ids = {text: i for i, text in enumerate(texts)}
    most = max(len(c) for c in captions_per_image)
    table = torch.full((len(captions_per_image), most), -1, dtype=torch.int64)
    for row, captions in enumerate(captions_per_image):
        for column, text in enumerate(captions):
            if text not in ids:
                ids[text] = len(texts)
                texts.append(text)
            table[row, column] = ids[text]
    counts = torch.tensor([len(c) for c in captions_per_image], dtype=torch.int64)
    return table.to(device), counts.to(device)


def caption_data(name, x_train, c_train, x_test, c_test, skipped, device):
    """CaptionData from images (N, 3, S, S) uint8 and each image's list of caption strings, per split."""
    texts = []
    (ids_train, n_train), (ids_test, n_test) = (index_captions(c, texts, device) for c in (c_train, c_test))
    if skipped and is_main():
        print(f"{name}: skipped " + ", ".join(f"{count} rows ({reason})" for reason, count in skipped.items()))
    return CaptionData(name, Pairs(x_train.to(device), ids_train, n_train), Pairs(x_test.to(device), ids_test, n_test),
                       texts, None, skipped)


# Captioned photos: a folder with a captions.csv, or Flickr8k. Images may be of any size, PNG or JPEG, grey, RGB or
# RGBA: matplotlib.image.imread reads PNG itself and everything else through Pillow (a dependency of matplotlib).
# Each is centre-cropped to a square and brought to S x S by to_format, the project's one resizing function.

def read_image(source, name, size):
    """(3, S, S) uint8 tensor from a path or an open file; name gives the format and the error message."""
    import matplotlib.image
    try:
        array = matplotlib.image.imread(source, format=Path(name).suffix.lstrip(".").lower() or None)
    except Exception as error:  # Pillow and matplotlib raise many types for a bad file
        raise UserError(f"image {name} cannot be read: {error}") from None
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        array = array / np.iinfo(array.dtype).max                 # a 16-bit TIFF comes as uint16: scale by its own range
    if array.dtype != np.uint8:                                   # PNG comes as floats in [0, 1], whatever its depth
        array = (np.asarray(array, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    image = torch.from_numpy(np.array(array[:, :, :3])).permute(2, 0, 1)             # (3 or 1, h, w), a writable copy
    h, w = image.shape[1:]
    side = min(h, w)
    image = image[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return to_format(image[None], size=size, channels=3)[0]


def read_images(open_image, names, size, desc):
    """Decode names with open_image(name) -> path or file, into (N, 3, S, S) uint8, with a progress bar."""
    images = torch.empty(len(names), 3, size, size, dtype=torch.uint8)
    bar = progress(len(names), desc)
    for i, name in enumerate(names):
        images[i] = read_image(open_image(name), name, size)
        bar.update(1)
    bar.close()
    return images


def read_captions_csv(folder, size):
    """folder/captions.csv (header image,caption; several rows per image allowed) and the images it names.
    A malformed row (a stray or unclosed quote, a row over several lines, an image outside the folder) is an error
    that names its line; a row with an empty caption or a missing image is skipped and counted.
    Returns (images (N, 3, S, S) uint8, captions per image, skipped counts)."""
    path = Path(folder) / "captions.csv"
    check_file(path, "captions file", "; --dataset captions needs DIR/captions.csv "
                                      "(or DIR/train/captions.csv and DIR/test/captions.csv)")
    captions, skipped = defaultdict(list), Counter()
    line = 1                                                          # the line the next row starts on
    try:
        # utf-8-sig: a spreadsheet saving "CSV UTF-8" starts the file with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)                       # strict: a stray quote is an error, not text
            header = [cell.strip().lower() for cell in next(reader, [])]
            check(header == ["image", "caption"], f"{path}: the first row must be the header 'image,caption', got {header}")
            line = reader.line_num + 1
            for row in reader:
                start, line = line, reader.line_num + 1               # this row's first line, and the next row's
                if not row:
                    continue                                          # a blank line holds no row
                # an unclosed quote would swallow the rows after it into one caption: a caption is one line
                check(reader.line_num == start, f"{path} line {start}: a quoted caption runs on to line "
                                                f"{reader.line_num}; close its quote (a caption is one line)")
                check(len(row) == 2, f"{path} line {start}: expected 2 fields (image,caption), "
                                     f"got {len(row)}; quote captions that contain commas")
                name, text = row[0].strip(), " ".join(row[1].split())
                check(not Path(name).is_absolute() and ".." not in Path(name).parts,
                      f"{path} line {start}: image {name!r} lies outside {folder}; name images by their path inside it")
                if not text:
                    skipped["empty caption"] += 1
                elif not (Path(folder) / name).is_file():
                    skipped["missing image"] += 1
                else:
                    captions[name].append(text)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not a UTF-8 CSV file: {error}") from None
    except csv.Error as error:
        raise UserError(f"{path} line {line}: {error}; is a quote left open or stray there?") from None
    check(len(captions) > 0, f"{path} names no readable image with a caption (skipped: {dict(skipped)})")
    names = sorted(captions)
    images = read_images(lambda name: Path(folder) / name, names, size, f"reading {path.parent.name or path.parent}")
    return images, [captions[name] for name in names], skipped


# The split of a caption set that has no split of its own is drawn with this seed, whatever a run's --seed: 04
# pre-trains on a set's training images and 05 then trains and tests on the same set, so a test image must never
# be among the images 04 saw. Seeds vary the training, not the test set.
CAPTION_SPLIT_SEED = 0


def read_caption_folder(folder, size, device):
    """CaptionData of a folder: DIR/train and DIR/test, each with a captions.csv, are the splits; otherwise
    DIR/captions.csv is split by image (10% of the images, at least one, for testing; CAPTION_SPLIT_SEED), so all
    captions of an image land on one side."""
    folder = Path(folder)
    check(folder.is_dir(), f"--data-dir {str(folder)!r} is not a folder")
    if (folder / "train" / "captions.csv").is_file() and (folder / "test" / "captions.csv").is_file():
        (x_train, c_train, s_train), (x_test, c_test, s_test) = (read_captions_csv(folder / s, size)
                                                                  for s in ("train", "test"))
        skipped = s_train + s_test
    else:
        images, captions, skipped = read_captions_csv(folder, size)
        check(len(images) >= 2, f"{folder}/captions.csv has {len(images)} usable image; a train/test split needs 2")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(CAPTION_SPLIT_SEED)).tolist()
        n_test = max(1, round(0.1 * len(images)))
        test, train = order[:n_test], order[n_test:]
        x_train, c_train = images[train], [captions[i] for i in train]
        x_test, c_test = images[test], [captions[i] for i in test]
    return caption_data("captions", x_train, c_train, x_test, c_test, dict(skipped), device)


# Flickr8k (Hodosh, Young, Hockenmaier 2013): 8091 photos, 5 captions each, with an official split of 6000
# training, 1000 development (unused here) and 1000 test images. The published zips, as their mirror
# lists them; the MD5s are the ones torchvision's R port (mlverse/torchvision) checks.
FLICKR8K = RemoteDataset(
    ["https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"],
    [RemoteFile("Flickr8k_text.zip", "bf6c1abcb8e4a833b7f922104de18627"),
     RemoteFile("Flickr8k_Dataset.zip", "f18a1e2920de5bd84dae7cf08ec78978")],
    classes=[])
FLICKR8K_IMAGES = "Flicker8k_Dataset/"     # sic: the folder inside the published zip is misspelt


def read_flickr8k_text(text_zip):
    """(captions by image name, training names, test names) from Flickr8k_text.zip."""
    try:
        with zipfile.ZipFile(text_zip) as archive:
            read = lambda member: archive.read(member).decode("utf-8").splitlines()
            tokens, train, test = (read(m) for m in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt",
                                                     "Flickr_8k.testImages.txt"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as error:
        raise UserError(f"{text_zip} is not Flickr8k's text archive: {error}") from None
    captions = defaultdict(list)
    for number, line in enumerate(tokens, 1):
        if line.strip():
            key, tab, text = line.partition("\t")
            check(tab and "#" in key, f"Flickr8k.token.txt line {number} is not 'image#k<TAB>caption'")
            captions[key.rsplit("#", 1)[0]].append(" ".join(text.split()))
    return captions, [n.strip() for n in train if n.strip()], [n.strip() for n in test if n.strip()]


def read_flickr8k(data_dir, size, device):
    """CaptionData of Flickr8k's split at S x S, downloaded into data_dir/flickr8k/ once; the images are decoded
    once into a cache beside the zips (images-S.npz)."""
    folder = Path(data_dir) / "flickr8k"
    (text_zip,) = fetch("flickr8k", data_dir, dataclasses.replace(FLICKR8K, files=FLICKR8K.files[:1]))
    captions, train, test = read_flickr8k_text(text_zip)
    cache = folder / f"images-{size}.npz"
    if not cache.is_file():
        (image_zip,) = fetch("flickr8k", data_dir, dataclasses.replace(FLICKR8K, files=FLICKR8K.files[1:]))
        try:
            with zipfile.ZipFile(image_zip) as archive:
                present = {m[len(FLICKR8K_IMAGES):] for m in archive.namelist() if m.startswith(FLICKR8K_IMAGES)}
                names = sorted(n for n in set(train + test) if n in present)
                images = read_images(lambda name: archive.open(FLICKR8K_IMAGES + name), names, size, "decoding Flickr8k")
        except zipfile.BadZipFile as error:
            raise UserError(f"{image_zip} is not a zip archive: {error}") from None
        _atomic_write(cache, lambda tmp: np.savez(open(tmp, "wb"), names=np.array(names), images=images.numpy()))
    try:
        with np.load(cache, allow_pickle=False) as stored:
            names, images = list(stored["names"]), torch.from_numpy(stored["images"])
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{cache} is corrupt ({error}); delete it to decode the images again") from None
    row = {name: i for i, name in enumerate(names)}
    skipped = Counter()

    def split(wanted):
        usable = []
        for name in wanted:
            if name not in row:
                skipped["image missing from the zip"] += 1
            elif not captions.get(name):
                skipped["image without captions"] += 1
            else:
                usable.append(name)
        return images[[row[n] for n in usable]], [captions[n] for n in usable]

    (x_train, c_train), (x_test, c_test) = split(train), split(test)
    check(len(x_train) >= 2 and len(x_test) >= 1, f"Flickr8k in {folder} has too few usable images")
    return caption_data("flickr8k", x_train, c_train, x_test, c_test, dict(skipped), device)


# Openclipart (openclipart.org, public domain), as Debian's openclipart-png installs it: 6,900 clip-art PNGs in a
# category tree (animals/birds/eagle_01.png, signs_and_symbols/flags/asia/kuwait.png), and 1,221 links that file an
# image under a second category too. A file's name is the drawing's title, then often its author and a number, the
# title and author cut to 25 characters: seagull_contour_nicu_buc_01.png. A caption is the title without the author
# and the numbering, then the categories from the leaf up, leaving out those the title names: "seagull contour,
# birds, animals"; an image reached by several paths has a caption for each. The top-level categories are the
# classes; "unsorted" is none (label -1, and no category words). Stars and computer icons are 45% of the images.
OPENCLIPART_TREE = Path("/usr/share/openclipart/png")
# the authors who drew most of the set, as the file names spell them; a name cut short ("architetto_fran") matches
OPENCLIPART_AUTHORS = [
    "architetto francesco rollandin", "ganson", "benji park", "juliane krug", "nicu buculei", "jean victor balin",
    "jarno vasamaa", "jon phillips", "gerald g", "linda kim", "yves guillou", "sergio luiz araujo silva",
    "lumen design studio", "peterm", "aj ashton", "enrique meza c", "dan gerhards", "dan gerhrads", "matthew gates",
    "mimooh", "jonadab", "patricia fidi", "nurbldoff", "nubldoff", "kurt cagle", "costea bogdan", "frouke",
    "susan park", "frederic moser", "matt todd", "dave pena", "anthony liekens", "mauro olivo", "yen cheng",
    "roman bertle", "christoph brill", "nathan eady", "guillaume boitel", "leif lodahl", "jonathan dietrich",
    "charles mccolm", "jakob chaosinfanterie", "andy fitzsimon", "ruairi hanna", "michael breuer", "dirk struve",
    "stefan bazelkov", "brice boyer", "aubanel monnier", "daniel steele", "marcelo staudt", "shandy brown",
    "wolfram esser", "andreas nilsson", "cedric bosdonnat", "richard torkar", "k yager", "glenn rolland",
    "raphael seban", "tatiana coutinho", "angelo gelmi", "fudriot omic ch", "petri lummemaki", "kexi team",
    "nicolas cle", "mateya", "dave reckoning", "lauris kaplinski", "mikhail a medvedev", "miguel s nchez"]


def openclipart_caption(path):
    """The caption of a file, from its path in the tree: 'food/fruit/banana_mateya_01.png' -> 'banana, fruit, food'."""
    *folders, name = Path(path).parts
    words = Path(name).stem.lower().replace("-", "_").replace(".", "_").replace(" ", "_").split("_")
    numbering = lambda word: word in ("", "r") or word.isdigit() or (word[:-1].isdigit() and word[-1].isalpha())
    while words and numbering(words[-1]):                                 # _01, _06c, _r, a trailing _
        words.pop()
    for start in range(1, len(words)):                                    # an author's name, perhaps cut, ends it
        tail = " ".join(words[start:])
        if len(tail) >= 3 and any(author.startswith(tail) for author in OPENCLIPART_AUTHORS):
            words = words[:start]
            break
    words = [word.rstrip("0123456789") for word in words]                 # home15, arrow1: numbered titles
    words = [{"bw": "black and white"}.get(w, w) for w in words if w and not any(c.isdigit() for c in w)]
    categories = [folder.replace("_", " ").replace("-", " ") for folder in reversed(folders) if folder != "unsorted"]
    named = lambda category: any(w in words or w.rstrip("s") in words for w in category.split())
    return ", ".join([" ".join(words)] * bool(words) + [c for c in categories if not named(c)])


def decode_clipart(path, size, min_side=8):
    """(3, S, S) uint8 of a clip-art file: transparent pixels laid on white, cut to the bounding box of what is not
    white, padded to a square with white, resized. Returns a reason string instead for a file to skip."""
    import warnings
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)     # a few drawings are 10k x 16k
            with Image.open(path) as picture:
                if min(picture.size) < min_side:
                    return f"smaller than {min_side} pixels"
                picture = picture.convert("RGBA")
                picture.thumbnail((16 * size, 16 * size), reducing_gap=2.0)  # box-filter huge drawings down first
    except Image.DecompressionBombError:
        return "over Pillow's pixel limit"
    except Exception:  # Pillow raises many types for a broken file
        return "unreadable PNG"
    x = np.asarray(picture, dtype=np.float32) / 255                             # (h, w, 4)
    rgb = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])                            # over white
    rows, columns = ((rgb < 0.98).any(-1).any(axis).nonzero()[0] for axis in (1, 0))
    if not len(rows):
        return "blank (white or transparent)"
    rgb = rgb[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    side = max(rgb.shape[:2])
    square = np.ones((side, side, 3), dtype=np.float32)
    top, left = (side - rgb.shape[0]) // 2, (side - rgb.shape[1]) // 2
    square[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
    square = Image.fromarray((square * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(square)).permute(2, 0, 1)


def read_openclipart(data_dir, size, device, test_share=0.15):
    """CaptionData of the clip art at S x S, with classes and labels, split by image (test_share of them, drawn with
    CAPTION_SPLIT_SEED).
    The tree is data_dir/openclipart/png if there is one, else the package's. The images are decoded once into
    data_dir/openclipart/images-S.npz, which holds everything read later: the tree is not needed again."""
    folder = Path(data_dir) / "openclipart"
    cache = folder / f"images-{size}.npz"
    if not cache.is_file():
        tree = folder / "png" if (folder / "png").is_dir() else OPENCLIPART_TREE
        check(tree.is_dir(), f"--dataset openclipart needs the clip art: sudo apt-get install openclipart-png "
                             f"(into {OPENCLIPART_TREE}), or a copy of that tree in {folder / 'png'}")
        files, links, skipped = [], [], Counter()
        for parent, _, names in sorted(os.walk(tree)):
            for name in sorted(names):
                path = Path(parent) / name
                if path.suffix.lower() != ".png":
                    skipped["not a PNG file"] += 1
                else:
                    (links if path.is_symlink() else files).append(path)
        images, paths, bar = [], [], progress(len(files), f"decoding {tree}")
        for path in files:
            image = decode_clipart(path, size)
            if isinstance(image, str):
                skipped[image] += 1
            else:
                images.append(image)
                paths.append(path)
            bar.update(1)
        bar.close()
        check(len(images) >= 2, f"{tree} holds {len(images)} readable PNG (skipped: {dict(skipped)})")
        row = {path.resolve(): i for i, path in enumerate(paths)}
        image_of = list(range(len(paths)))
        for link in links:
            if link.resolve() in row:
                paths.append(link)
                image_of.append(row[link.resolve()])
            else:
                skipped["link to no usable image"] += 1
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache, lambda tmp: np.savez_compressed(
            open(tmp, "wb"), paths=np.array([p.relative_to(tree).as_posix() for p in paths]), image_of=np.array(image_of),
            images=torch.stack(images).numpy(), skipped=np.array(list(skipped)), skipped_counts=np.array(list(skipped.values()))))
    try:
        with np.load(cache, allow_pickle=False) as stored:
            paths, image_of, images = list(stored["paths"]), stored["image_of"].tolist(), torch.from_numpy(stored["images"])
            skipped = dict(zip(stored["skipped"].tolist(), stored["skipped_counts"].tolist()))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{cache} is corrupt ({error}); delete it to decode the images again") from None
    captions = [[] for _ in images]
    for path, i in zip(paths, image_of):
        caption = openclipart_caption(path)
        if caption not in captions[i]:
            captions[i].append(caption)
    top = [Path(paths[i]).parts[0] if len(Path(paths[i]).parts) > 1 else "unsorted" for i in range(len(images))]
    classes = sorted(set(top) - {"unsorted"})
    labels = torch.tensor([classes.index(t) if t in classes else -1 for t in top])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(CAPTION_SPLIT_SEED))
    n_test = max(1, round(test_share * len(images)))
    test, train = order[:n_test], order[n_test:]
    data = caption_data("openclipart", images[train], [captions[i] for i in train], images[test],
                        [captions[i] for i in test], skipped, device)
    data.train.labels, data.test.labels = labels[train].to(device), labels[test].to(device)
    data.classes = [name.replace("_", " ") for name in classes]
    return data


# ---- 8. Several GPUs: torchrun starts one process per GPU and sets RANK, LOCAL_RANK, WORLD_SIZE ----

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Only rank 0 prints results and writes files."""
    return rank() == 0


def init_distributed(device):
    """Join the process group when started by torchrun with more than one process; returns this process's
    device (its own GPU). Without torchrun it returns device unchanged and nothing else happens."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        local, per_machine = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        check(per_machine <= gpus, f"{per_machine} processes per machine asked for, but it has {gpus} GPUs; "
                                   f"use --nproc_per_node={gpus} or fewer")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)   # NCCL between GPUs
    else:
        dist.init_process_group("gloo")                     # gloo between CPU processes (the tests use it)
    return device


def rank_share(n):
    """This rank's contiguous share of n training items, as a slice (all of them in one process)."""
    share = n // world_size()
    return slice(rank() * share, (rank() + 1) * share)


def data_parallel(module, device, **options):
    """module itself in one process. Under torchrun, DistributedDataParallel around it: every rank starts from
    rank 0's weights, and backward averages the gradients over the ranks. options go to DDP."""
    if world_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                                     **options)


def backward_full_batch(loss, replicated=()):
    """loss.backward() for a loss that every rank computes over the gathered batch of all W ranks (gather_with_grad).
    Each rank then holds the exact full-batch gradient for its own rows, and DDP AVERAGES gradients over the W
    ranks: multiplying by W makes the update equal to the one-GPU update with batch W*B. `replicated` parameters
    act on the gathered batch directly (CLIP's logit scale): each rank's loss gives them their whole gradient,
    not a share, so dividing by W again leaves DDP's average equal to it. With W = 1 this is loss.backward()."""
    W = world_size()
    (loss * W).backward()
    for parameter in replicated:
        if W > 1 and parameter.grad is not None:
            parameter.grad /= W


def gather_with_grad(x):
    """Stack every rank's (B, D) rows into (W*B, D), rank order, keeping this rank's rows in the autograd graph.
    NOTE: dist.all_gather writes into fresh tensors that autograd knows nothing about, so a loss built on its
    output alone would give this rank's encoder no gradient at all, and nothing would warn. Putting the
    local tensor back at its own slice restores that path. Every rank computes the loss over the whole
    gathered batch, so every term that involves its own rows is in its graph, and its rows get exactly the
    gradient of the full-batch loss; other ranks' rows are constants here and get theirs on their own rank."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)                                          # (W*B, D)


class _GlobalBatchNormFunction(torch.autograd.Function):
    """BatchNorm in training mode with the statistics of the batches of all ranks, on PyTorch's fused batch-norm
    kernels (CUDA only). Forward: each rank's per-channel mean and 1/std and its row count are all-gathered and
    combined. Backward: the input gradient needs two per-channel sums over the whole batch, sum(dy) and
    sum(dy * (x - mean)); each rank computes its part, and one all-reduce adds them up.
    NOTE: nn.SyncBatchNorm does the same, but first drops the statistics of ranks that had no rows, by boolean
    indexing: the CPU must wait for the GPU to learn how many are left (PyTorch issue 78656), once per layer and
    step, and can no longer queue kernels ahead. Here every rank always has rows, so nothing is dropped."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        C = x.shape[1]
        mean, invstd = torch.batch_norm_stats(x, eps)                       # (C,), (C,): this rank's batch
        count = torch.full((1,), x.numel() // C, dtype=mean.dtype, device=x.device)
        everyone = torch.empty(world_size(), 2 * C + 1, dtype=mean.dtype, device=x.device)
        dist.all_gather_into_tensor(everyone, torch.cat([mean, invstd, count]))     # (W, 2C + 1)
        counts = everyone[:, 2 * C]
        # the whole batch's mean and 1/std, and the running statistics updated with them (unbiased variance)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, everyone[:, :C], everyone[:, C:2 * C], running_mean, running_var, momentum, eps, counts.to(running_mean.dtype))
        ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        if not grad_y.is_contiguous(memory_format=torch.channels_last):
            grad_y = grad_y.contiguous()
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
            grad_y, x, mean, invstd, weight, True, True, True)              # this rank's sums, (C,) each
        sums = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums)                                                # the whole batch's sums
        sum_dy, sum_dy_xmu = sums.chunk(2)
        grad_x = torch.batch_norm_backward_elemt(grad_y, x, mean, invstd, weight.to(mean.dtype), sum_dy, sum_dy_xmu,
                                                 counts)
        # weight and bias get this rank's share of their gradient: DDP adds the shares up, as for any parameter
        return grad_x, grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer for (B, C) or (B, C, H, W) inputs whose training-mode statistics are those of the batches of
    all GPUs together (SimCLR's global BN). In eval mode, in one process or on CPU it is the ordinary BatchNorm.
    It has PyTorch's default BatchNorm settings: a weight and a bias, running statistics, a fixed momentum."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"GlobalBatchNorm takes (B, C) or (B, C, H, W) inputs, got {x.dim()} dimensions")

    def forward(self, x):
        if not (self.training and world_size() > 1 and x.is_cuda):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        return _GlobalBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                              self.eps, self.momentum)


def global_batchnorm(module):
    """module with every BatchNorm layer replaced by a GlobalBatchNorm with the same weights and statistics."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        layer = GlobalBatchNorm(module.num_features, module.eps, module.momentum)
        layer.load_state_dict(module.state_dict())
        return layer.to(module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, global_batchnorm(child))
    return module


def mean_over_ranks(value):
    """A float averaged over all ranks (every rank must call it)."""
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return tensor.item() / world_size()
