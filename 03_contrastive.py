"""03 -- Self-supervised learning: learn features without labels from two views of each image, with seven methods
on one loop (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins, VICReg, triplets), each with the collapse it avoids shown.

What it teaches
  1. An encoder f (a small ResNet) and a projection head g; downstream tasks use h = f(x), not z = g(h).
  2. NT-Xent: a softmax over cosine similarities in which each view must pick out its partner (SimCLR).
  3. What keeps a method from collapsing: negatives from the batch (SimCLR) or from a queue of a momentum encoder's
     keys (MoCo); a predictor against a moving-average target (BYOL) or against a stop-gradient (SimSiam); decorrelated
     dimensions (Barlow Twins); a variance hinge (VICReg); a margin to a mined negative (triplet). --ablate takes it
     away, and the std of z, its effective rank and its singular-value spectrum show the collapse that follows.
  4. Two random views of each image (crop, flip, colour jitter, grayscale, blur), made on the GPU as batched
     tensor ops: the augmentations decide what the representation learns to ignore.
  5. Evaluation of the frozen encoder (linear probe, weighted kNN, few-shot) against a random one and pixels; geometry
     (alignment, uniformity, effective rank, spread); invariance: how far h moves under each augmentation.
  6. Several GPUs (torchrun): batch statistics (negatives, cross-correlations, BatchNorm, MoCo's queue) over all GPUs.

Papers
  Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual Representations"
    (SimCLR): Eq. 1 is the NT-Xent loss, Section 2.1 the framework, Section 2.2 global BN, Appendix A the augmentations.
  He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast" (MoCo): Eq. 1 InfoNCE over a queue, Eq. 2 the momentum
    update; Chen, Fan, Girshick, He 2020 (MoCo v2): an MLP head, tau 0.2.
  Grill et al. 2020, "Bootstrap Your Own Latent" (BYOL): Eq. 2 the loss, Section 3.1 the EMA target and its schedule.
  Chen and He 2021, "Exploring Simple Siamese Representation Learning" (SimSiam): Eqs. 1 to 4, stop-gradient.
  Zbontar, Jing, Misra, LeCun, Deny 2021, "Barlow Twins": Eq. 1 the loss, Eq. 2 the cross-correlation matrix.
  Bardes, Ponce, LeCun 2022, "VICReg": Eq. 1 variance, Eqs. 3 and 4 covariance, Eq. 5 invariance, Eq. 6 the sum.
  Schroff, Kalenichenko, Philbin 2015, "FaceNet": Eq. 1 the triplet loss, Section 3.2 hard and semi-hard negatives.
  Wang and Isola 2020, "Understanding Contrastive Representation Learning through Alignment and Uniformity on
    the Hypersphere": Eqs. 4 and 5 (alignment, uniformity).
  Roy and Vetterli 2007, "The effective rank: a measure of effective dimensionality": Eq. 1.
  Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination": Eq. 7, the
    weighted kNN of the evaluation, here on features centred by the training mean (SimpleShot's CL2N; evaluation.py).
  He, Zhang, Ren, Sun 2016, "Deep Residual Learning for Image Recognition": the residual block.

Run
  python 03_contrastive.py                                   # SimCLR on the embedded shapes, about a minute on one GPU
  python 03_contrastive.py --dataset fashion-mnist --width 64 --epochs 80 --crop 0.5 --temperature 0.05 --jitter 1.5
  python 03_contrastive.py --method byol                     # or moco, simsiam, barlow, vicreg, triplet
  python 03_contrastive.py --method simsiam --ablate         # no stop-gradient: watch it collapse
  torchrun --nproc_per_node=2 03_contrastive.py              # 2 GPUs, 1024 images each: 4094 negatives per view

Measured on one H200 (torch 2.11, bf16), linear probe / weighted-kNN top-1 of the frozen encoder's h (RESULTS.md):
  shapes (default SimCLR, 40 epochs, 28.4 s of pre-training at 69k img/s, 53 s process wall): 0.797 / 0.689;
    random encoder 0.199 / 0.149, raw pixels 0.138 / 0.209.
  Fashion-MNIST, 60 s of pre-training each (benchmarks/bench_03_methods.py): SimCLR 0.907 / 0.901, MoCo 0.907,
    BYOL 0.904, SimSiam 0.881, Barlow Twins 0.900, VICReg 0.904, triplet 0.908; random encoder 0.829, pixels 0.845.
"""
import copy
import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluation


# Shape legend: B images in a batch, V = 2B views, C channels, H x W pixels, w encoder width,
# D feature size (h: D = 4w), P projection size (z), K keys in MoCo's queue, N images in an evaluation set.

AUGMENTATIONS = ("crop", "flip", "jitter", "grayscale", "blur")      # SimCLR's chain, in its order (Appendix A)
METHODS = ("simclr", "moco", "byol", "simsiam", "barlow", "vicreg", "triplet")
ABLATION = {"simclr": "no negatives", "moco": "no negatives", "byol": "no predictor", "simsiam": "no stop-gradient",
            "barlow": "no off-diagonal term", "vicreg": "no variance term"}     # what --ablate takes away


@dataclasses.dataclass
class Config(common.RunConfig):
    method: str = common.arg("simclr", "the self-supervised objective", choices=list(METHODS))
    ablate: bool = common.arg(False, "take away what keeps the method from collapsing: " + "; ".join(
        f"{m}: {a}" for m, a in ABLATION.items()))
    epochs: int = common.arg(40, "passes over the training images during pre-training")
    batch_size: int = common.arg(1024, "images per step on each GPU (2 views each; on N GPUs, 2NB - 2 negatives per view)")
    lr: float = common.arg(2e-3, "peak AdamW learning rate (linear warm-up, then cosine decay to 0)")
    warmup: float = common.arg(0.025, "share of the steps in which the learning rate rises linearly from 0 (0.025: 1 of 40 epochs)")
    weight_decay: float = common.arg(1e-4, "AdamW weight decay")
    temperature: float = common.arg(0.2, "NT-Xent / InfoNCE temperature tau > 0 (simclr, moco): lower sharpens the softmax over negatives")
    queue: int = common.arg(4096, "moco: keys K in the queue of negatives, at least one step's 2 x batch-size x GPUs")
    ema: float = common.arg(0.99, "moco, byol: the target's EMA rate at the start, in [0, 1], rising to 1 on a cosine")
    barlow_lambda: float = common.arg(5e-3, "barlow: weight lambda > 0 of the off-diagonal (redundancy) term")
    margin: float = common.arg(0.2, "triplet: margin alpha > 0 between squared distances of unit vectors")
    mining: str = common.arg("semi-hard", "triplet: the negative mined in the batch", choices=["hard", "semi-hard"])
    width: int = common.arg(32, "encoder width w: stages of w, 2w and 4w channels; h has D = 4w features")
    hidden: int = common.arg(512, "hidden width of the projection head (and of BYOL's predictor)")
    projection: int = common.arg(128, "size P of the projection z that the loss sees")
    augmentations: str = common.arg(",".join(AUGMENTATIONS), "augmentations to use, comma-separated; the others are off")
    crop: float = common.arg(0.6, "random resized crop: share of the area it may cut away, in [0, 1)")
    flip: float = common.arg(0.5, "probability of a left-right flip")
    jitter: float = common.arg(0.5, "colour jitter strength s in [0, 100] (SimCLR's CIFAR-10 value: 0.5), on 80%% of views")
    grayscale: float = common.arg(0.2, "probability of dropping colour")
    blur: float = common.arg(0.5, "probability of a Gaussian blur")
    n_train: int = common.arg(0, "training images to use (0: all)")
    n_test: int = common.arg(0, "test images to use (0: all)")
    validation: int = common.arg(0, "hold out the last N training images and evaluate on them instead of the test set (tuning)")
    image_size: int = common.arg(0, "resize images to this side (0: the dataset's own)")
    probe_steps: int = common.arg(2000, "least number of Adam steps of each linear probe")
    save_features: bool = common.arg(False, "also write features.npz: h (N, D) float32, images uint8, labels of the test set")


QUICK = dict(epochs=6, batch_size=64, lr=5e-3, width=8, hidden=64, projection=32, n_train=1024, n_test=256,
             image_size=16, probe_steps=100, queue=256)


# ---- 1. Model: an encoder f, a projection head g, and for BYOL and SimSiam a predictor q ----

def conv_bn(c_in, c_out, stride=1):
    """3x3 convolution and BatchNorm; no conv bias, since BatchNorm's shift would cancel it."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class ResidualBlock(nn.Module):
    """He et al. 2016's basic block, y = ReLU(x + F(x)) with F = conv-BN-ReLU-conv-BN: the identity path
    lets the gradient reach early layers undiminished, and F only learns a correction."""

    def __init__(self, channels):
        super().__init__()
        self.residual = nn.Sequential(conv_bn(channels, channels), nn.ReLU(inplace=True), conv_bn(channels, channels))

    def forward(self, x):                                          # (B, c, H, W) -> (B, c, H, W)
        return F.relu(x + self.residual(x))


class Encoder(nn.Module):
    """f: a small ResNet. Three stages of w, 2w, 4w channels at full, half and quarter resolution (a stride-2
    convolution halves the side and doubles the channels), then the average over positions.
    (B, C, H, W) -> h (B, D), D = 4w: the representation every evaluation uses."""

    def __init__(self, in_channels=3, width=32):
        super().__init__()
        w = width
        self.stages = nn.Sequential(
            conv_bn(in_channels, w), nn.ReLU(inplace=True), ResidualBlock(w),              # (B, w, H, W)
            conv_bn(w, 2 * w, stride=2), nn.ReLU(inplace=True), ResidualBlock(2 * w),        # (B, 2w, H/2, W/2)
            conv_bn(2 * w, 4 * w, stride=2), nn.ReLU(inplace=True), ResidualBlock(4 * w))    # (B, 4w, H/4, W/4)
        self.dim = 4 * w

    def forward(self, x):                                          # (B, C, H, W) -> (B, D)
        return self.stages(x).mean((2, 3))                          # global average pool: position is forgotten


class ProjectionHead(nn.Module):
    """g: z = W2 ReLU(BN(W1 h)) (SimCLR Section 2.1, with the BatchNorm of SimCLR v2). The loss acts on z,
    so z is pushed to drop whatever the augmentations change; h, one layer back, keeps more of it, which is
    why downstream tasks read h (SimCLR Section 4.2, Fig. 8; the linear probe on both shows it).
    BYOL's and SimSiam's predictor q is the same two-layer MLP, from z to z."""

    def __init__(self, dim, hidden=512, out=128):
        super().__init__()
        # EXERCISE: replace the head by nn.Identity() (the loss then acts on h) and compare the linear probes
        self.layers = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, out))

    def forward(self, h):                                          # (B, D) -> (B, P)
        return self.layers(h)


class SimCLR(nn.Module):
    """The online network of every method (named after the first one here): encoder f, head g and, when predictor
    (its hidden width) is not 0, a predictor q. forward: x -> h (B, D), z = g(h) (B, P), p = q(z) (B, P), which is
    z itself without a predictor. One module, so that one checkpoint holds it all."""

    def __init__(self, in_channels=3, width=32, hidden=512, projection=128, predictor=0):
        super().__init__()
        self.encoder = Encoder(in_channels, width)
        self.head = ProjectionHead(self.encoder.dim, hidden, projection)
        self.predictor = ProjectionHead(projection, predictor, projection) if predictor else nn.Identity()

    def forward(self, x):                                          # (B, C, H, W) -> (B, D), (B, P), (B, P)
        h = self.encoder(x)
        z = self.head(h)
        return h, z, self.predictor(z)


def predictor_width(cfg):
    """BYOL's predictor is as wide as its projector's hidden layer (Sec. 3.3), SimSiam's a bottleneck (Sec. 4.4)"""
    if cfg.method == "byol" and not cfg.ablate:
        return cfg.hidden
    return max(1, cfg.projection // 4) if cfg.method == "simsiam" else 0


def build_model(cfg, in_channels, device):
    # channels_last: the layout that the tensor cores' convolution kernels read without a transpose
    model = SimCLR(in_channels, cfg.width, cfg.hidden, cfg.projection, predictor_width(cfg))
    return model.to(device, memory_format=torch.channels_last)


# ---- 2. Objectives: plain functions of the two views' outputs (B, P) ----
#
# Losses work in float32 (or float64) even under autocast: bf16 keeps 8 bits of mantissa, too coarse for logits
# of size 1/tau or for the sums of squares of Barlow Twins and VICReg. What must not carry a gradient is detached
# (or computed under no_grad) by the caller, where the reader sees it: pretrain and contrastive_step.

def float32(*tensors):
    return [common.at_least_float32(t) for t in tensors]


def nt_xent(z1, z2, temperature):
    """SimCLR's loss (Eq. 1) over the 2B views of a batch. z1, z2 (B, P): projections of the two views
    of the same B images (normalised here). Each view is an anchor whose positive is its partner view
    and whose 2B - 2 negatives are all other views; the loss is the softmax cross-entropy of picking
    the positive, averaged over all 2B anchors. Returns a scalar."""
    B = z1.shape[0]
    common.check(B >= 2, f"NT-Xent needs at least 2 images per batch (1 has no negatives), got {B}")
    common.check(0 < temperature < math.inf, f"temperature must be positive and finite, got {temperature}")
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat(float32(z1, z2)), dim=1)                     # (V, P) unit vectors, V = 2B
        # EXERCISE: make 1 / temperature a learned parameter (log-parametrised, as CLIP's logit_scale)
        logits = z @ z.T / temperature                                          # (V, P) @ (P, V) -> (V, V): cos / tau
        self_pair = torch.eye(2 * B, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pair, float("-inf"))                   # the sum in Eq. 1 skips k = i
        partner = (torch.arange(2 * B, device=z.device) + B) % (2 * B)          # view i's positive sits at i + B (mod 2B)
        positive = logits[torch.arange(2 * B, device=z.device), partner]        # (V,)
        # -log softmax at the positive = log sum_k exp(s_ik / tau) - s_i,partner / tau
        return (torch.logsumexp(logits, dim=1) - positive).mean()


def positives_only(z1, z2, temperature):
    """The ablation of SimCLR and MoCo: Eq. 1 without its denominator, -cos(z_i, z_partner) / tau averaged.
    Nothing pushes different images apart, so the cheapest minimum maps every image to one point: collapse."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = (F.normalize(z, dim=1) for z in float32(z1, z2))
        return -(z1 * z2).sum(1).mean() / temperature


def info_nce(q, k, temperature, queue):
    """MoCo's InfoNCE (Eq. 1 of He et al. 2020): each query q_i (B, P) must pick its own key k_i (B, P), made by the
    momentum encoder from the other view, out of k_i and the K keys of the queue (K, P, unit rows): negatives from
    earlier batches, as many as the queue holds, however small the batch."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = (F.normalize(x, dim=1) for x in float32(q, k))
        positive = (q * k).sum(1, keepdim=True)                                 # (B, 1): l_pos
        negatives = q @ queue.to(q.dtype).T                                     # (B, P) @ (P, K) -> (B, K): l_neg
        logits = torch.cat([positive, negatives], 1) / temperature              # (B, 1 + K), the positive first
        return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


@torch.no_grad()
def enqueue(queue, keys):
    """MoCo's queue, first in first out: the newest keys (N, P) enter at the front, the oldest N leave at the back,
    the size K stays. In place, so the loss that holds the queue sees the new keys."""
    queue.copy_(torch.cat([keys.to(queue.dtype), queue])[: len(queue)])


def prediction_loss(p, z):
    """BYOL's loss (Eq. 2): the squared distance of the normalised prediction p and target z (B, P),
    ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), averaged over the batch. SimSiam's D (Eq. 1) is -cos(p, z): the same
    loss less 2, halved, so one function serves both. The target must arrive detached: that is the method."""
    with torch.autocast(p.device.type, enabled=False):
        return (2 - 2 * F.cosine_similarity(*float32(p, z), dim=1)).mean()


def standardise(z, eps=1e-5):
    """Each column of z (B, P) to mean 0, variance 1 over the batch: BatchNorm without its affine (Barlow Twins' code)."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins(z1, z2, off_diagonal):
    """Barlow Twins' loss (Eq. 1) of z1, z2 (B, P). C (P, P) is the cross-correlation of the standardised views
    (Eq. 2). Its diagonal is pulled to 1: every dimension agrees across the views (invariance); its off-diagonal to 0
    with weight lambda: different dimensions carry different information (redundancy reduction)."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = float32(z1, z2)
        c = standardise(z1).T @ standardise(z2) / len(z1)                      # (P, B) @ (B, P) -> (P, P), Eq. 2
        on = torch.diagonal(c)                                                  # (P,)
        return (1 - on).pow(2).sum() + off_diagonal * (c.pow(2).sum() - on.pow(2).sum())


VICREG_WEIGHTS = (25.0, 25.0, 1.0)   # lambda, mu, nu of Eq. 6: invariance, variance, covariance (the paper's)


def vicreg(z1, z2, invariance, variance, covariance, gamma=1.0, eps=1e-4):
    """VICReg's loss (Eq. 6) of z1, z2 (B, P), as the paper's code computes it. Invariance (Eq. 5): the mean squared
    distance of the views. Variance (Eq. 1): a hinge at gamma on each dimension's standard deviation over the batch,
    so no dimension may shrink to a constant. Covariance (Eqs. 3, 4): the squared off-diagonal covariances over P,
    so dimensions decorrelate. NOTE: the code averages the squared distance over dimensions too, and halves the
    two views' variance terms; the weights 25, 25, 1 were tuned with those choices."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = float32(z1, z2)
        B, P = z1.shape
        total = invariance * F.mse_loss(z1, z2)
        for z in (z1, z2):
            z = z - z.mean(0)
            std = torch.sqrt(z.var(0) + eps)                                    # (P,) unbiased, as Eq. 1
            cov = z.T @ z / (B - 1)                                             # (P, B) @ (B, P) -> (P, P), Eq. 3
            total = total + variance * F.relu(gamma - std).mean() / 2
            total = total + covariance * (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / P
        return total


def triplet_margins(anchor, positive, margin, mining):
    """FaceNet's triplets within a batch of unit vectors: anchor and positive (B, P) are the two views of an image;
    the negative is the positive of another image, mined (Section 3.2) as the nearest one (hard) or the nearest one
    farther than the positive (semi-hard; the hardest where there is none). Returns ||a-p||^2 - ||a-n||^2 + alpha,
    (B,): a triplet violates the margin where it is above 0."""
    with torch.autocast(anchor.device.type, enabled=False):
        a, p = (F.normalize(x, dim=1) for x in float32(anchor, positive))
        distance = 2 - 2 * a @ p.T                                              # (B, P) @ (P, B) -> (B, B) squared
        with torch.no_grad():                                                   # mining picks indices: no gradient
            own = torch.eye(len(a), dtype=torch.bool, device=a.device)
            others = distance.masked_fill(own, math.inf)                        # (B, B) candidate negatives
            negative = others.argmin(1)                                         # hard
            if mining == "semi-hard":
                farther = others.masked_fill(others <= distance.diagonal()[:, None], math.inf)
                negative = torch.where(farther.isfinite().any(1), farther.argmin(1), negative)
        rows = torch.arange(len(a), device=a.device)
        return distance.diagonal() - distance[rows, negative] + margin


def triplet_loss(anchor, positive, margin, mining):
    """FaceNet's Eq. 1: [||a - p||^2 - ||a - n||^2 + alpha]_+ averaged over the triplets of the batch."""
    return F.relu(triplet_margins(anchor, positive, margin, mining)).mean()


def pair_loss(cfg, queue=None):
    """The chosen method's loss of (one view's prediction, the other view's target), (B, P) each, and temperature.
    --ablate takes away what keeps it from collapsing (for BYOL the predictor and for SimSiam the stop-gradient:
    build_model and pretrain)."""
    # EXERCISE: add a method: its loss as a function of (prediction, target) above, a branch here, a name in METHODS
    if cfg.method in ("simclr", "moco") and cfg.ablate:
        return positives_only
    if cfg.method == "simclr":
        return nt_xent
    if cfg.method == "moco":
        return lambda q, k, temperature: info_nce(q, k, temperature, queue)
    if cfg.method in ("byol", "simsiam"):
        return lambda p, z, _: prediction_loss(p, z)
    if cfg.method == "barlow":
        return lambda z1, z2, _: barlow_twins(z1, z2, 0.0 if cfg.ablate else cfg.barlow_lambda)
    if cfg.method == "vicreg":
        invariance, variance, covariance = VICREG_WEIGHTS
        return lambda z1, z2, _: vicreg(z1, z2, invariance, 0.0 if cfg.ablate else variance, covariance)
    return lambda anchor, positive, _: triplet_loss(anchor, positive, cfg.margin, cfg.mining)


def ema_rate(step, total, base):
    """BYOL's schedule of the target's rate (Sections 3.1, 3.2; MoCo v3 uses it too): tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, from
    tau_base at step k = 0 to 1 at the last step K: the target moves less and less as training settles."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


@torch.no_grad()
def ema_update(target, online, rate):
    """xi <- tau xi + (1 - tau) theta for every parameter xi of the target and theta of the online network of the
    same name (BYOL Section 3.1; MoCo's Eq. 2 with m = tau); the online predictor has no counterpart.
    BatchNorm's running mean and variance are copied, not averaged: the target runs in training mode, where
    BatchNorm normalises by the batch's own statistics and never reads them, so copying only keeps them valid."""
    theta = dict(online.named_parameters())
    for name, xi in target.named_parameters():
        xi.mul_(rate).add_(theta[name], alpha=1 - rate)
    buffers = dict(online.named_buffers())
    for name, buffer in target.named_buffers():
        buffer.copy_(buffers[name])


# ---- 3. Data: two random views of every image, made on the GPU as batched tensor ops ----
#
# Each augmentation takes a strength whose identity setting (0) returns its input untouched, and draws
# one set of random numbers per image, so the whole batch is transformed by a few kernels, not a loop.
# Random numbers come from `generator` (on its own device) when one is given, for reproducible views.

JITTER_PROBABILITY = 0.8            # SimCLR applies colour jitter to 80% of the views (Appendix A)
MAX_JITTER = 100.0                  # the largest jitter strength accepted (check_strengths says why)
LUMA = (0.299, 0.587, 0.114)        # ITU-R 601 luminance weights, as PIL's convert("L") uses
BLUR_SIGMA = (0.1, 1.0)             # pixels; SimCLR's (0.1, 2.0) was for 224-pixel images, ours are ~32
BLUR_RADIUS = 3                     # taps either side: 7 taps cover +-3 sigma at the largest sigma
# RGB -> YIQ (NTSC): Y is luminance, (I, Q) a plane of chroma in which a hue shift is a rotation; and back
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).tolist()))


def _uniform(n, low, high, generator, device):
    """(n,) floats in [low, high) drawn from generator (on its own device), moved to device."""
    source = generator.device if generator is not None else device
    return (low + (high - low) * torch.rand(n, generator=generator, device=source)).to(device)


def _per_image(values):
    return values[:, None, None, None]                          # (B,) -> (B, 1, 1, 1), broadcasts over C, H, W


def random_resized_crop(x, crop, generator=None):
    """Crop a random rectangle keeping a share in [1 - crop, 1] of the area, aspect ratio in [3/4, 4/3],
    and stretch it back to H x W with bilinear sampling. x (B, C, H, W) -> (B, C, H, W)."""
    B = x.shape[0]
    area = 1 - crop * _uniform(B, 0, 1, generator, x.device)            # (B,) share of the image kept
    # log aspect ratio in [log 3/4, log 4/3], narrowed so that neither side exceeds the image (w, h <= 1)
    bound = torch.clamp(-area.log(), max=math.log(4 / 3))
    ratio = (bound * _uniform(B, -1, 1, generator, x.device)).exp()
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()                  # (B,) sides as shares of the image
    cx = (1 - w) * _uniform(B, -1, 1, generator, x.device)              # centre in [-1, 1] image coordinates,
    cy = (1 - h) * _uniform(B, -1, 1, generator, x.device)              # placed so the crop stays inside
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1).to(x.dtype)  # (B, 2, 3)
    # an affine grid maps each output pixel to where it reads from in the input (normalised coordinates)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)    # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_flip(x, probability, generator=None):
    """Mirror each image left-right with the given probability. x (B, C, H, W) -> (B, C, H, W)."""
    flipped = _uniform(x.shape[0], 0, 1, generator, x.device) < probability
    return torch.where(_per_image(flipped), x.flip(-1), x)


def to_gray(x):
    """Luminance (B, 1, H, W) of RGB images (B, 3, H, W); grayscale images are their own luminance."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("bchw,c->bhw", x, common.constant(LUMA, x.device, x.dtype))[:, None]


def rotate_hue(x, angle):
    """Turn every pixel's chroma by angle (B,) radians in the YIQ plane: luminance is kept, hue shifts.
    NOTE: torchvision shifts hue in HSV space; a YIQ rotation is the linear-algebra cousin of it."""
    to_yiq, from_yiq = (common.constant(m, x.device, x.dtype) for m in (RGB_TO_YIQ, YIQ_TO_RGB))   # (3, 3) each
    angle = angle.to(x.dtype)
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rotation = torch.stack([torch.stack([one, zero, zero], 1),
                            torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)               # (B, 3, 3) about the Y axis
    colour_map = from_yiq @ rotation @ to_yiq                                   # (B, 3, 3) RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", colour_map, x)


def colour_jitter(x, strength, generator=None):
    """SimCLR's colour distortion of strength s (Appendix A): brightness, contrast and saturation factors
    in [1 - 0.8s, 1 + 0.8s], hue shifted by up to 0.2s of a turn, applied to 80% of the images.
    Grayscale images get brightness and contrast only. x (B, C, H, W) in [0, 1] -> same shape, in [0, 1].
    NOTE: the four distortions run in a fixed order; torchvision shuffles it per call."""
    B, C = x.shape[:2]
    factor = lambda: _per_image(_uniform(B, max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength, generator, x.device))
    y = (x * factor()).clamp(0, 1)                                              # brightness: scale every pixel
    mean = to_gray(y).mean((1, 2, 3), keepdim=True)                             # (B, 1, 1, 1)
    y = ((y - mean) * factor() + mean).clamp(0, 1)                              # contrast: stretch about the mean
    if C == 3:
        gray = to_gray(y)                                                       # (B, 1, H, W)
        y = ((y - gray) * factor() + gray).clamp(0, 1)                          # saturation: away from gray
        turn = _uniform(B, -0.2 * strength, 0.2 * strength, generator, x.device)
        y = rotate_hue(y, 2 * math.pi * turn).clamp(0, 1)
    applied = _uniform(B, 0, 1, generator, x.device) < JITTER_PROBABILITY
    return torch.where(_per_image(applied), y, x)


def random_grayscale(x, probability, generator=None):
    """Replace a share `probability` of RGB images by their luminance (kept as 3 channels)."""
    if x.shape[1] == 1:
        return x
    chosen = _uniform(x.shape[0], 0, 1, generator, x.device) < probability
    return torch.where(_per_image(chosen), to_gray(x).expand_as(x), x)


def gaussian_blur(x, sigma):
    """Blur each image with its own Gaussian of std sigma (B,) pixels: a weighted sum of shifted copies,
    along rows and then along columns (the 2-D Gaussian is separable). x (B, C, H, W) -> same shape."""
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)   # (K,)
    taps = torch.exp(-offsets**2 / (2 * sigma[:, None] ** 2))                              # (B, K)
    taps = taps / taps.sum(1, keepdim=True)
    H, W = x.shape[-2:]
    padded = F.pad(x, (BLUR_RADIUS,) * 4, mode="reflect")                                   # (B, C, H+2R, W+2R)
    rows = sum(_per_image(taps[:, k]) * padded[..., k:k + W] for k in range(len(offsets)))   # (B, C, H+2R, W)
    return sum(_per_image(taps[:, k]) * rows[..., k:k + H, :] for k in range(len(offsets)))  # (B, C, H, W)


def random_blur(x, probability, generator=None):
    """Gaussian blur with sigma uniform in BLUR_SIGMA pixels on a share `probability` of the images."""
    chosen = _uniform(x.shape[0], 0, 1, generator, x.device) < probability
    sigma = _uniform(x.shape[0], *BLUR_SIGMA, generator, x.device)
    return torch.where(_per_image(chosen), gaussian_blur(x, sigma), x)


def check_strengths(crop, flip, jitter, grayscale, blur):
    common.check(0 <= crop < 1, f"crop must be in [0, 1) (the share of the area a crop may remove), got {crop}")
    # beyond 2.5 the hue turn already spans a whole turn and the other factors reach 0: larger only saturates more,
    # and a huge strength overflows float32 into NaN views
    common.check(0 <= jitter <= MAX_JITTER, f"jitter strength must be in [0, {MAX_JITTER:g}] (SimCLR uses 0.5 to 1), "
                                            f"got {jitter}")
    for name, p in (("flip", flip), ("grayscale", grayscale), ("blur", blur)):
        common.check(0 <= p <= 1, f"{name} is a probability and must be in [0, 1], got {p}")


def augment(x, crop=0.6, flip=0.5, jitter=0.5, grayscale=0.2, blur=0.5, generator=None):
    """One random view of each image, SimCLR's chain in SimCLR's order (Appendix A), with the strengths of
    Config's options of the same names; a strength of 0 skips its step, so all at 0 return x itself.
    x: float (B, C, H, W) in [0, 1], on any device -> a view of the same shape, in [0, 1].
    Defaults: SimCLR's CIFAR-10 recipe, with a gentler crop (area >= 0.4, not 0.08) so that the small shapes
    of the embedded set survive it, and blur on half the views."""
    check_strengths(crop, flip, jitter, grayscale, blur)
    # EXERCISE: SimCLR's Fig. 5 in small: train with --augmentations crop,flip (no colour distortion) and watch
    # the colour bar of invariance.png, and the probes, as the network solves the task by matching colours.
    for transform, strength in ((random_resized_crop, crop), (random_flip, flip), (colour_jitter, jitter),
                                (random_grayscale, grayscale), (random_blur, blur)):
        if strength > 0:
            x = transform(x, strength, generator)
    return x


def strengths(cfg):
    """The augment() keywords of a config: each augmentation not listed in cfg.augmentations is set to 0."""
    chosen = set(cfg.augmentations.split(","))
    return {name: getattr(cfg, name) if name in chosen else 0.0 for name in AUGMENTATIONS}


def two_views(images, strength, generator=None):
    """Two independent views of each image: uint8 (B, C, H, W) -> two float (B, C, H, W) in [0, 1]."""
    x = common.to_float(images)
    both = augment(torch.cat([x, x]), **strength, generator=generator)   # one call: each row draws its own
    return both.chunk(2)


VIEW_STEPS = 8             # training batches whose views are made together


def view_batches(images, order, batch_size, strength, generator=None):
    """(view1, view2) of images[idx] for each run of batch_size indices idx in order (whose length is a multiple).
    NOTE: the views of VIEW_STEPS batches are made in one call. The augmentations are some 250 small tensor ops,
    each launched by the CPU; once per training step, launching them kept the CPU as busy as the GPU, and under
    torchrun the CPU set the pace."""
    for chunk in order.split(VIEW_STEPS * batch_size):
        views1, views2 = two_views(images[chunk], strength, generator)
        yield from zip(views1.split(batch_size), views2.split(batch_size))

# ---- 4. Training: pre-training without labels ----

def contrastive_step(model, optimizer, view1, view2, temperature, loss_fn, device, target=None, stop_gradient=False,
                     scaler=None):
    """One step of any method on view pairs (B, C, H, W) each. loss_fn compares each view's prediction p (z itself
    without a predictor) with the other view's target, both ways round, averaged (BYOL's L + L~ halved, SimSiam's
    Eq. 4; NT-Xent's two terms are equal). The target is the EMA network's z (MoCo's keys, BYOL), or the online z,
    a constant under stop_gradient (SimSiam). Returns the loss and the targets (2WB, P), on the device (reading them
    would make the CPU wait for the GPU). scaler: pretrain's, kept across steps."""
    scaler = scaler or common.grad_scaler(device)
    views = torch.cat([view1, view2]).contiguous(memory_format=torch.channels_last)   # (V, C, H, W)
    with common.autocast(device):
        _, z, p = model(views)                                      # both views in one batch: one set of BN statistics
        if target is not None:
            with torch.no_grad():                                   # nothing flows back into the EMA network
                _, z, _ = target(views)
    if stop_gradient:
        z = z.detach()                                              # SimSiam's stop-gradient (Eq. 3)
    # torchrun: every rank's rows, (W, 2, B, P): rank, view, image; so batch statistics are the global batch's
    by_view = lambda x: common.gather_with_grad(x).unflatten(0, (-1, 2, len(view1))).transpose(0, 1).flatten(1, 2)
    z1, z2 = by_view(z)                                             # (W*B, P) each; row i of both is one image
    p1, p2 = (z1, z2) if p is z else by_view(p)                     # no predictor: p is z, gathered once
    loss = (loss_fn(p1, z2, temperature) + loss_fn(p2, z1, temperature)) / 2
    optimizer.zero_grad(set_to_none=True)
    common.backward_full_batch(scaler.scale(loss))
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), torch.cat([z1, z2]).detach()


TRACK_POINTS = 25          # geometry measurements per pre-training run
TRACK_IMAGES = 512         # test images whose views are measured, the same ones each time
GEOMETRY = ("alignment", "uniformity", "effective_rank", "std")   # what geometry() measures of z


def check_finite(desc, loss, alignment, step, lr):
    """Stop a run that diverged, on values the loop reads anyway (no extra wait for the GPU). A non-finite loss
    means Adam overshot; so does a NaN alignment with a finite loss: the loss was taken before the step's update,
    the geometry after it, and alignment is NaN exactly when the updated model's z is not finite."""
    common.check(math.isfinite(loss) and math.isfinite(alignment),
                 f"training diverged ({desc}: the loss is {loss} at step {step}"
                 f"{'' if math.isfinite(alignment) else ' and z is not finite after it'}); lower --lr (it is {lr:g})")


def pretrain(cfg, data, device, desc="pre-train"):
    """Pre-training of cfg.method on data.x_train (labels unused). Returns (model, history, stats); the model is the
    plain online module, with the same weights on every rank, and stats times the training steps alone (not the
    geometry measurements of history)."""
    # Several GPUs (torchrun, W processes; in one process nothing changes): each rank trains on its share of the
    # images with views of its own; contrastive_step gathers every rank's z (2WB - 2 negatives per view; global
    # statistics for Barlow Twins and VICReg) and scales the loss by W against DDP's average. Global BN (SimCLR
    # Sec. 2.2; CUDA only): with per-GPU statistics a view could find its partner, always on its own GPU, through the
    # batch they share. DDP keeps gradients in its buckets, plans once (each step runs the same layers), and need not
    # broadcast running statistics that global BN keeps equal.
    model = build_model(cfg, data.shape[0], device)
    if common.world_size() > 1 and device.type == "cuda":
        model = common.global_batchnorm(model)
    trained = common.data_parallel(model, device, gradient_as_bucket_view=True, static_graph=True,
                                   broadcast_buffers=device.type != "cuda")
    target = queue = None
    if cfg.method in ("moco", "byol"):          # the EMA network starts as a copy (after DDP gave every rank rank 0's)
        target = copy.deepcopy(model).requires_grad_(False)
        target.predictor = nn.Identity()        # BYOL's target has a projector but no predictor
    if cfg.method == "moco" and not cfg.ablate:   # random unit keys until real ones arrive; the same on every rank
        start = torch.randn(cfg.queue, cfg.projection, generator=torch.Generator().manual_seed(cfg.seed))
        queue = F.normalize(start, dim=1).to(device)                            # (K, P)
    images = data.x_train[common.rank_share(len(data.x_train))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scaler = common.grad_scaler(device)
    n, B = len(images), cfg.batch_size
    steps_per_epoch = n // B                                        # the last partial batch is dropped
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: common.warmup_cosine(s, total, warmup))
    strength, loss_fn = strengths(cfg), pair_loss(cfg, queue)
    stop_gradient = cfg.method == "simsiam" and not cfg.ablate
    generator = torch.Generator(device).manual_seed(cfg.seed + common.rank())   # each rank its own order and views
    tracked = data.x_test[: min(TRACK_IMAGES, B)]                    # at most a batch: cheap next to training
    track_every = max(1, total // TRACK_POINTS)
    history = {"step": [], "loss": [], **{key: [] for key in GEOMETRY}}
    bar = common.progress(total * B, desc)
    watch, seconds, step = common.Stopwatch(device), 0.0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, device=device, generator=generator)[: steps_per_epoch * B]
        for view1, view2 in view_batches(images, order, B, strength, generator):
            loss, keys = contrastive_step(trained, optimizer, view1, view2, cfg.temperature, loss_fn, device, target,
                                          stop_gradient, scaler)
            schedule.step()
            step += 1
            if target is not None:
                ema_update(target, model, ema_rate(step, total, cfg.ema))
            if queue is not None:
                enqueue(queue, F.normalize(keys.float(), dim=1))    # every rank's keys, so the queues stay equal
            bar.update(B)
            if step % track_every == 0 or step == 1 or step == total:
                seconds += watch.seconds()                          # the clock stops while the geometry is measured
                history["step"].append(step)
                history["loss"].append(loss.item())                 # the full batch's loss: the same on every rank
                for key, value in geometry(model, tracked, strength, device, cfg.seed).items():
                    history[key].append(value)
                check_finite(desc, history["loss"][-1], history["alignment"][-1], step, cfg.lr)
                bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
                watch = common.Stopwatch(device)
    seconds = common.mean_over_ranks(seconds + watch.seconds())
    bar.close()
    return model, history, {"seconds": seconds, "images_per_second": total * B * common.world_size() / seconds,
                            "steps": total, "ms_per_step": 1000 * seconds / total}


# ---- 5. Evaluation: geometry of the embedding, and what a frozen encoder is good for ----

def alignment(a, b, alpha=2):
    """Wang and Isola 2020, Eq. 4: E ||f(x) - f(y)||^alpha over positive pairs, rows normalised first.
    a, b (N, D) -> scalar; 0 when each pair maps to one point."""
    a, b = F.normalize(common.at_least_float32(a), dim=1), F.normalize(common.at_least_float32(b), dim=1)
    return (a - b).norm(dim=1).pow(alpha).mean()


def uniformity(x, t=2):
    """Wang and Isola 2020, Eq. 5: log E exp(-t ||f(x) - f(y)||^2) over all pairs of distinct rows, normalised
    first. x (N, D) -> scalar; 0 when everything collapses to one point, lower when spread over the sphere."""
    x = F.normalize(common.at_least_float32(x), dim=1)
    squared = (2 - 2 * x @ x.T).clamp(min=0)                        # (N, N) ||x_i - x_j||^2 of unit vectors
    distinct = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return torch.logsumexp(-t * squared[distinct], 0) - math.log(distinct.sum().item())


def spectrum(x):
    """The eigenvalues (D,) of the covariance of x (N, D), largest first: the squared singular values of the centred
    x, over N. All NaN when x is not finite (a diverged run), where eigvalsh would fail to converge; torch.where
    decides that on the device, since an `if` would make the CPU wait for the GPU."""
    x = x.double() - x.double().mean(0)
    finite = torch.isfinite(x).all()
    eigenvalues = torch.linalg.eigvalsh(torch.where(finite, x.T @ x / len(x), 0.0)).clamp(min=0).flip(0)
    return torch.where(finite, eigenvalues, math.nan)


def effective_rank(x):
    """Roy and Vetterli 2007, Eq. 1: exp(entropy) of the covariance's normalised eigenvalues. x (N, D) ->
    a number between 1 (all variance along one direction: collapse) and D (variance spread evenly)."""
    eigenvalues = spectrum(x)
    p = eigenvalues / eigenvalues.sum()
    return torch.exp(-(p * torch.log(p.clamp(min=1e-30))).sum())


def feature_std(x):
    """Mean over dimensions of the standard deviation across rows of the normalised features (SimSiam's collapse
    monitor): about 1/sqrt(D) for points spread over the sphere, 0 when collapsed."""
    return F.normalize(common.at_least_float32(x), dim=1).std(0).mean()


@torch.no_grad()
def embed(model, images, device, batch=2048):
    """h (N, D) and z (N, P) in float32 for images (N, C, H, W), uint8 or float in [0, 1], in eval mode
    (BatchNorm uses its running statistics, so an image's features do not depend on the rest of the batch)."""
    was_training = model.training
    model.eval()
    hs, zs = [], []
    for chunk in images.split(batch):
        with common.autocast(device):
            h, z, _ = model(common.to_float(chunk).contiguous(memory_format=torch.channels_last))
        hs.append(h.float())
        zs.append(z.float())
    model.train(was_training)
    return torch.cat(hs), torch.cat(zs)


@torch.no_grad()
def geometry(model, images, strength, device, seed):
    """Alignment of the two views' z, and uniformity, effective rank and spread of the first views' z,
    on the same views each time (a fixed seed), so a curve over training compares like with like."""
    view1, view2 = two_views(images, strength, torch.Generator(device).manual_seed(seed + 1))
    _, z = embed(model, torch.cat([view1, view2]), device)         # (2N, P): first views, then second views
    z1, z2 = z.chunk(2)
    return {"alignment": alignment(z1, z2).item(), "uniformity": uniformity(z1).item(),
            "effective_rank": effective_rank(z1).item(), "std": feature_std(z1).item()}


@torch.no_grad()
def view_retrieval(model, images, strength, device, seed):
    """The pretext task on held-out images: the share of first views whose nearest second view (cosine of h,
    about the mean) is their own partner, among all N second views. Chance is 1/N."""
    view1, view2 = two_views(images, strength, torch.Generator(device).manual_seed(seed + 5))
    h1, _ = embed(model, view1, device)
    h2, _ = embed(model, view2, device)
    centre = torch.cat([h1, h2]).mean(0)
    similarity = F.normalize(h1 - centre, dim=1) @ F.normalize(h2 - centre, dim=1).T     # (N, N)
    return (similarity.argmax(1) == torch.arange(len(images), device=similarity.device)).float().mean().item()


def per_class_subset(labels, shots, num_classes, seed):
    """Indices of `shots` random training images of each class (all of a class's images if it has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


FEW_SHOTS = (1, 10, 100)


def stack_features(features):
    """S feature sets of the same images, (N, D_s) each, as one (S, N, max D_s) stack for side-by-side probes.
    Narrower sets get zero columns: a zero input has zero gradient, so Adam never moves its weights and each
    probe in the stack learns what it would learn alone."""
    width = max(f.shape[1] for f in features)
    return torch.stack([F.pad(f.float(), (0, width - f.shape[1])) for f in features])


def evaluate_features(features, data, cfg, few_shot=()):
    """Frozen features {name: (train (N, D), test (M, D))} -> {name: scores}: linear probe and weighted kNN (top-1,
    top-5), and for the names in few_shot, linear probes trained on FEW_SHOTS labelled images per class. The kNN
    centres the features on the training mean first (h comes out of a ReLU: all non-negative); the uncentred top-1
    is kept beside it for comparison. The probes of all sets train side by side, as one stack (stack_features)."""
    classes, names = len(data.classes), list(features)
    train, test = stack_features([features[n][0] for n in names]), stack_features([features[n][1] for n in names])
    linear = evaluation.linear_probe(train, data.y_train, test, data.y_test, classes, seed=cfg.seed,
                                      min_steps=cfg.probe_steps)
    results = {}
    for name, probe in zip(names, linear):
        train_f, test_f = features[name]
        knn = evaluation.knn_classify(train_f, data.y_train, test_f, data.y_test, classes, centre=True)
        raw = evaluation.knn_classify(train_f, data.y_train, test_f, data.y_test, classes)
        results[name] = {"linear_top1": probe["top1"], "linear_top5": probe["top5"], "knn_top1": knn["top1"],
                         "knn_top5": knn["top5"], "knn_uncentred_top1": raw["top1"]}
    if few_shot:
        chosen = [names.index(n) for n in few_shot]
        test = test[chosen]
        for shots in FEW_SHOTS:
            idx = per_class_subset(data.y_train, shots, classes, cfg.seed).to(train.device)
            probes = evaluation.linear_probe(train[:, idx][chosen], data.y_train[idx], test, data.y_test,
                                              classes, seed=cfg.seed, min_steps=cfg.probe_steps)
            for i, probe in zip(chosen, probes):
                results[names[i]][f"{shots}_shot_top1"] = probe["top1"]
    return results


def final_geometry(h, z):
    """Effective rank, spread and spectrum of the test images' h and z (N, D), (N, P). Unit vectors that cover the
    sphere spread by about 1/sqrt(P) per dimension: std x sqrt(P) is 1 for them, 0 under constant collapse; an
    effective rank far below P is dimensional collapse."""
    shape = {"z_uniformity": uniformity(z[:TRACK_IMAGES]).item()}
    for name, x in (("h", h), ("z", z)):
        std = feature_std(x).item()
        shape.update({f"{name}_effective_rank": effective_rank(x).item(), f"{name}_std": std,
                      f"{name}_std_sqrt_dim": std * x.shape[1] ** 0.5, f"{name}_spectrum": spectrum(x).tolist()})
    return shape


@torch.no_grad()
def violating_triplets(model, images, strength, cfg, device):
    """The share of the triplets mined among held-out views (of the first TRACK_IMAGES images) that still violate
    the margin: the triplets that still give a gradient."""
    view1, view2 = two_views(images[:TRACK_IMAGES], strength, torch.Generator(device).manual_seed(cfg.seed + 6))
    margins = triplet_margins(embed(model, view1, device)[1], embed(model, view2, device)[1], cfg.margin, cfg.mining)
    return (margins > 0).float().mean().item()


# ---- 6. Invariance: what does the representation ignore? ----
#
# The cosine distance 1 - cos(h(x), h(x')) between an image and a changed copy, averaged over test images.
# The copy is an augmented view (one augmentation at a time), or, on the embedded set, the same image
# re-rendered with one recorded factor taken from another image; the yardstick is a change of class.

FACTORS = {"colour": ["colour"], "texture": ["texture", "stripe_angle"], "position": ["x", "y"], "scale": ["scale"],
           "rotation": ["rotation"], "brightness": ["brightness"], "background": ["background"], "noise": ["noise"],
           "class": ["label"]}
INVARIANCE_IMAGES = 2048


def cosine_distance(a, b, centre):
    """Mean 1 - cos between rows of a and b (N, D), measured about `centre` (D,): features after a ReLU all
    lie in one orthant, where every cosine is near 1; about the mean they spread over the whole sphere."""
    return (1 - F.cosine_similarity(a - centre, b - centre, dim=1)).mean().item()


@torch.no_grad()
def invariance(model, data, strength, device, seed):
    """{change: mean cosine distance of h} for each augmentation on its own, and for each factor of the
    embedded set (or, on real data, for another image of another class)."""
    images = data.x_test[:INVARIANCE_IMAGES]
    h, _ = embed(model, images, device)
    centre = h.mean(0)
    generator = torch.Generator(device).manual_seed(seed + 2)
    distances = {}
    for name in AUGMENTATIONS:
        if strength[name] > 0:
            alone = {other: (strength[name] if other == name else 0.0) for other in AUGMENTATIONS}
            view = augment(common.to_float(images), **alone, generator=generator)
            distances[f"augment: {name}"] = cosine_distance(h, embed(model, view, device)[0], centre)
    shuffle = torch.randperm(len(images), device=device, generator=generator)
    if data.factors_test is not None:
        for factor, keys in FACTORS.items():
            changed = {k: v[: len(images)] for k, v in data.factors_test.items()}
            changed.update({k: changed[k][shuffle] for k in keys})       # this factor from another image
            changed["seed"] = seed
            rendered = common.to_format(common.render_shapes(changed), size=images.shape[-1])   # as load_images does
            distances[f"factor: {factor}"] = cosine_distance(h, embed(model, rendered, device)[0], centre)
    else:
        labels = data.y_test[: len(images)]
        other = labels != labels[shuffle]                                   # pairs of different classes
        distances["another class"] = cosine_distance(h[other], h[shuffle][other], centre)
    return distances


# ---- 7. Figures ----

def plot_views(ax, images, strength, device, seed, count=8):
    """Each column: an image, then its two views (rows)."""
    view1, view2 = two_views(images[:count], strength, torch.Generator(device).manual_seed(seed + 3))
    grid = common.tile(torch.cat([common.to_float(images[:count]), view1, view2]), count)
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("originals, view 1, view 2", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_similarity(ax, model, images, strength, device, seed, count=16):
    """Cosine similarities of z for `count` images x 2 views: the positives are the two off-diagonal lines."""
    view1, view2 = two_views(images[:count], strength, torch.Generator(device).manual_seed(seed + 4))
    _, z = embed(model, torch.cat([view1, view2]), device)
    z = F.normalize(z, dim=1)
    shown = ax.imshow((z @ z.T).cpu().numpy(), cmap="RdBu_r", vmin=-1, vmax=1)   # (V, V)
    ax.set_title(f"cos(z_i, z_j): {count} images, views 1 then 2", fontsize=9)
    ax.figure.colorbar(shown, ax=ax, fraction=0.046)


def plot_training(ax, history):
    ax.plot(history["step"], history["loss"], color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pre-training loss", fontsize=9)


def plot_geometry(ax, history, projection):
    ax.plot(history["step"], history["alignment"], label="alignment (lower: views agree)")
    ax.plot(history["step"], history["uniformity"], label="uniformity (lower: spread out)")
    ax.plot(history["step"], [r / projection for r in history["effective_rank"]], label="effective rank of z / P")
    ax.plot(history["step"], [s * projection**0.5 for s in history["std"]], label="std of z x sqrt(P) (0: collapse)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.set_title("geometry of z on held-out views", fontsize=9)


def plot_invariance(ax, distances):
    names = list(distances["trained"])
    rows = torch.arange(len(names)).numpy()
    ax.barh(rows - 0.2, [distances["trained"][n] for n in names], height=0.4, label="trained encoder")
    ax.barh(rows + 0.2, [distances["random"][n] for n in names], height=0.4, label="random encoder")
    ax.set_yticks(rows, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean cosine distance of h")
    ax.legend(fontsize=7)
    ax.set_title("how far h moves under each change", fontsize=9)


MAP_POINTS = 2000


def plot_map(ax, xy, labels, classes):
    """Map coordinates xy (N, 2) of the first N test images, coloured by class."""
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels[: len(xy)].cpu().numpy(), cmap="tab10", s=3, vmin=-0.5, vmax=9.5)
    ax.legend(points.legend_elements()[0], classes, fontsize=6, markerscale=0.8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of h for test images, coloured by class", fontsize=9)


def plot_spectrum(ax, shape, title):
    """Singular values of the centred test embeddings, each over its largest, largest first: a flat spectrum uses
    every dimension; one that drops off a cliff after a few is dimensional collapse; a constant collapse leaves
    nothing (all values near 0, before the division: the legend gives std x sqrt(P))."""
    for name, style in (("trained", "-"), ("random", ":")):
        for key, colour in (("h", "tab:blue"), ("z", "tab:orange")):
            values = np.sqrt(np.clip(shape[name][f"{key}_spectrum"], 1e-30, None))
            ax.plot(np.arange(1, len(values) + 1), values / values[0], style, color=colour,
                    label=f"{name} {key}: eff. rank {shape[name][f'{key}_effective_rank']:.1f}, "
                          f"std x sqrt(dim) {shape[name][f'{key}_std_sqrt_dim']:.2f}")
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.5)
    ax.set_xlabel("index of the singular value")
    ax.set_ylabel("singular value / the largest")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


def save_figures(out, model, data, history, distances, shape, h_test, cfg, device):
    """A PNG for each panel (training.png holds the loss and the geometry), and the first six in overview.png."""
    strength = strengths(cfg)
    xy = common.tsne(F.normalize(h_test[:MAP_POINTS], dim=1), seed=cfg.seed).cpu().numpy()     # (N, 2)
    panels = {"views": lambda ax: plot_views(ax, data.x_test, strength, device, cfg.seed),
              "similarity": lambda ax: plot_similarity(ax, model, data.x_test, strength, device, cfg.seed),
              "embedding_map": lambda ax: plot_map(ax, xy, data.y_test, data.classes),
              "loss": lambda ax: plot_training(ax, history),
              "geometry": lambda ax: plot_geometry(ax, history, cfg.projection),
              "invariance": lambda ax: plot_invariance(ax, distances),
              "spectrum": lambda ax: plot_spectrum(ax, shape, f"spectrum of the test embeddings: {run_name(cfg)}")}
    for name in ("views", "embedding_map", "similarity", "invariance", "spectrum"):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        panels[name](ax)
        common.save_figure(fig, out / f"{name}.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels["loss"](axes[0])
    panels["geometry"](axes[1])
    common.save_figure(fig, out / "training.png")
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    for ax, name in zip(axes.flat, ("views", "similarity", "embedding_map", "loss", "geometry", "invariance")):
        panels[name](ax)
    fig.suptitle(f"{run_name(cfg)} on {data.name}", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, out / "overview.png")


# ---- 8. Putting it together ----

def run_name(cfg):
    return cfg.method + (f" --ablate ({ABLATION[cfg.method]})" if cfg.ablate else "")


def validate(cfg):
    """Check the options before any expensive work."""
    common.check_dataset(cfg.dataset)
    common.check(cfg.batch_size >= 2, f"--batch-size must be at least 2 (one image has no negatives), got {cfg.batch_size}")
    common.check(0 < cfg.temperature < math.inf, f"--temperature must be positive and finite, got {cfg.temperature}")
    for name in ("epochs", "width", "hidden", "projection", "probe_steps"):
        common.check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    common.check(cfg.n_train >= 0, f"--n-train must be >= 0, got {cfg.n_train}")
    # uniformity and view retrieval compare pairs of test images and t-SNE maps their neighbours: one image has none
    common.check(cfg.n_test == 0 or cfg.n_test >= 2, f"--n-test must be 0 (all) or at least 2 (the geometry "
                                                     f"compares pairs of test images), got {cfg.n_test}")
    common.check(cfg.validation == 0 or cfg.validation >= 2, f"--validation must be 0 (the test set) or at least 2, "
                                                             f"got {cfg.validation}")
    common.check(0 <= cfg.weight_decay < math.inf, f"--weight-decay must be finite and >= 0, got {cfg.weight_decay}")
    common.check(0 < cfg.lr < math.inf, f"--lr must be positive and finite, got {cfg.lr}")
    common.check(0 <= cfg.warmup < 1, f"--warmup must be in [0, 1) (a share of the steps), got {cfg.warmup}")
    common.check(cfg.image_size == 0 or cfg.image_size >= 8, f"--image-size must be 0 or at least 8, got {cfg.image_size}")
    common.check(not cfg.ablate or cfg.method in ABLATION, f"--ablate does not apply to --method {cfg.method}; it "
                 f"applies to {', '.join(ABLATION)}")
    common.check(cfg.method != "moco" or cfg.queue >= 2 * cfg.batch_size, f"--queue {cfg.queue} is smaller than "
                 f"the {2 * cfg.batch_size} keys of one step (2 x --batch-size): raise it or lower --batch-size")
    common.check(0 <= cfg.ema <= 1, f"--ema is a rate and must be in [0, 1], got {cfg.ema}")
    for name in ("barlow_lambda", "margin"):
        common.check(0 < getattr(cfg, name) < math.inf, f"--{name.replace('_', '-')} must be positive and finite, "
                                                       f"got {getattr(cfg, name)}")
    unknown = [name for name in cfg.augmentations.split(",") if name not in AUGMENTATIONS]
    common.check(not unknown, f"unknown augmentation {', '.join(map(repr, unknown))} in --augmentations; "
                              f"choose from {', '.join(AUGMENTATIONS)}")
    check_strengths(*(getattr(cfg, name) for name in AUGMENTATIONS))


def hold_out(data, n):
    """data with its last n training images as the test set, for tuning without looking at the test set."""
    common.check(n < len(data.x_train), f"--validation {n} leaves no training images of {len(data.x_train)}")
    return dataclasses.replace(data, x_train=data.x_train[:-n], y_train=data.y_train[:-n], x_test=data.x_train[-n:],
                               y_test=data.y_train[-n:], factors_train=None, factors_test=None)


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    validate(cfg)
    device, out = common.setup(cfg, __file__)
    common.cpu_notice(cfg, device, cfg.epochs * (cfg.n_train or 50_000) / 90)
    torch.backends.cudnn.benchmark = True           # fixed shapes: let cuDNN time its kernels once and keep the fastest
    watch = common.Stopwatch(device)
    data = common.load_images(cfg.dataset, cfg.data_dir, device, n_train=cfg.n_train or None,
                              n_test=cfg.n_test or None, seed=cfg.seed, size=cfg.image_size or None)
    if cfg.validation:
        data = hold_out(data, cfg.validation)
    processes = common.world_size()
    common.check(cfg.batch_size <= len(data.x_train) // processes,
                 f"--batch-size {cfg.batch_size} is larger than the {len(data.x_train) // processes} training images"
                 + (f" of each of the {processes} processes (the batch is per process)" if processes > 1 else ""))
    strength = strengths(cfg)

    model, history, stats = pretrain(cfg, data, device)
    # Baselines: the same architecture with its random initial weights, and the pixels themselves
    torch.manual_seed(cfg.seed)
    random_model = build_model(cfg, data.shape[0], device)
    h_train, z_train = embed(model, data.x_train, device)
    h_test, z_test = embed(model, data.x_test, device)
    r_train, _ = embed(random_model, data.x_train, device)
    r_test, rz_test = embed(random_model, data.x_test, device)
    pixels = lambda images: common.to_float(images).flatten(1)
    scores = evaluate_features({"h": (h_train, h_test), "z": (z_train, z_test), "random_h": (r_train, r_test),
                                "pixels": (pixels(data.x_train), pixels(data.x_test))},
                               data, cfg, few_shot=("h", "random_h", "pixels"))
    shape = {"trained": final_geometry(h_test, z_test), "random": final_geometry(r_test, rz_test)}
    if cfg.method == "triplet":
        shape["trained"]["violating_triplets"] = violating_triplets(model, data.x_test, strength, cfg, device)
    retrieval_images = data.x_test[:INVARIANCE_IMAGES]
    retrieval = {"trained": view_retrieval(model, retrieval_images, strength, device, cfg.seed),
                 "random": view_retrieval(random_model, retrieval_images, strength, device, cfg.seed),
                 "chance": 1 / len(retrieval_images)}
    distances = {"trained": invariance(model, data, strength, device, cfg.seed),
                 "random": invariance(random_model, data, strength, device, cfg.seed)}

    # under torchrun every rank computes the same numbers (no rank waits on another) and rank 0 writes them
    if common.is_main():
        common.save_checkpoint(out / "model.pt", model, cfg, kind="simclr")   # the plain module: loads anywhere
        save_figures(out, model, data, history, distances, shape, h_test, cfg, device)
        if cfg.save_features:                       # for 01's sparse autoencoder over learned features
            np.savez(out / "features.npz", features=h_test.cpu().numpy().astype(np.float32),
                     images=data.x_test.cpu().numpy(), labels=data.y_test.cpu().numpy().astype(np.int64))
    total = watch.seconds()
    metrics = {"dataset": data.name, "method": cfg.method, "ablate": cfg.ablate, "validation": cfg.validation,
               "epochs": cfg.epochs, "pretrain": stats, "total_seconds": total, "evaluation": scores,
               "view_retrieval": retrieval, "geometry": shape, "history": history, "invariance": distances,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "processes": processes}
    if common.is_main():
        common.save_json(out / "metrics.json", metrics)
    out = common.finish_run(out)
    if common.is_main():
        ours, rand, raw, trained = scores["h"], scores["random_h"], scores["pixels"], shape["trained"]
        print(f"03_contrastive {run_name(cfg)} {data.name}: linear probe top-1 {ours['linear_top1']:.3f} (on z "
              f"{scores['z']['linear_top1']:.3f}, random encoder {rand['linear_top1']:.3f}, pixels {raw['linear_top1']:.3f}) "
              f"| kNN top-1 {ours['knn_top1']:.3f} (random {rand['knn_top1']:.3f}, pixels {raw['knn_top1']:.3f}) | "
              f"10-shot {ours['10_shot_top1']:.3f} (pixels {raw['10_shot_top1']:.3f}) | z effective rank "
              f"{trained['z_effective_rank']:.1f}/{cfg.projection}, std x sqrt(P) {trained['z_std_sqrt_dim']:.2f} | "
              f"{cfg.epochs} epochs in {stats['seconds']:.1f} s, {stats['images_per_second'] / 1e3:.1f}k img/s | "
              f"total {total:.1f} s")
    return model, metrics


if __name__ == "__main__":
    common.run(main)
