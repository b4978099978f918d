"""04 -- A Vision Transformer from matrix products: patches as tokens, self-attention, and what depth buys.

An image is cut into P x P patches; each patch becomes a token by one linear map, a learned class token and
learned position embeddings are added, and a stack of pre-norm Transformer blocks (self-attention, then a
per-token MLP) lets the tokens exchange information. The class token's final state is the representation.
This script writes all of it from tensor operations, trains it, and then looks inside:
  - a linear probe on the class token after every block: how linearly separable the classes become with depth;
  - where the class token attends, per head and rolled out over the layers, and what the position embeddings learned;
  - inductive bias: a CNN of about the same size under the same budget, and the symmetries each architecture
    has built in, measured on real images;
  - self-supervised pre-training without labels, on any images 04 can read (a captions folder and Flickr8k too):
    --pretrain mae (masked autoencoding), dino (self-distillation) or simclr (03's contrastive views), each then
    probed, fine-tuned and compared with training from scratch when the images have labels.

Papers:
  Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (ViT): Eqs. 1-4 are the model.
  Vaswani et al. 2017, "Attention Is All You Need": Eq. 1 scaled dot-product attention, Eq. 5 multi-head.
  Ba, Kiros, Hinton 2016, "Layer Normalization": Eq. 4.
  Abnar, Zuidema 2020, "Quantifying Attention Flow in Transformers": attention rollout (Eq. 1 there).
  Loshchilov, Hutter 2019, "Decoupled Weight Decay Regularization" (AdamW); Szegedy et al. 2016 (label smoothing).
  He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (MAE), Sec. 3, for --pretrain mae.
  Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers" (DINO), Algorithm 1 and Eq. 2-4.
  Chen et al. 2020 (SimCLR), Eq. 1, for --pretrain simclr.

Run:  python 04_vit.py            (the embedded shapes set; --dataset fashion-mnist|cifar10 for real data)
      python 04_vit.py --model cnn  (the CNN baseline)   --pretrain mae|dino|simclr --train-fraction 0.02
      python 04_vit.py --pretrain dino --dataset captions --data-dir DIR   (no labels: pre-trains and saves the ViT)
      torchrun --nproc_per_node=2 04_vit.py   (supervised training, or --pretrain mae|dino, on 2 GPUs)
      benchmarks/bench_04_labels.py: 1%, 10%, 100% of Fashion-MNIST's labels, from scratch and after each pre-training
Measured on one H200 (torch 2.11, bf16; compiled, as the default is on one GPU), RESULTS.md:
  python 04_vit.py: ViT 2.71M parameters (patch 8), 25 epochs: test top-1 88.3% on the shapes set (chance 10%,
    raw-pixel probe 13%); the class-token probe climbs from 10% before block 1 to 88% after block 6; 50 s wall.
  bench_04_labels.py, Fashion-MNIST, 600 labels: fine-tuned after MAE 81.1% against 78.6% from scratch
    (CNN 84.5%); all labels: 93.8% against 92.0%. --no-centering and --no-sharpening: the teacher's output
    per image near one-hot (entropy 0.12 nats) and uniform (6.87 of ln K = 6.93).

Shapes legend: B batch, C channels, P patch size, N patches, T tokens (1 + N), E embedding width,
H heads, D head size (E / H), L layers, n visible patches (MAE), K outputs of DINO's head.
"""
import copy
import math
from dataclasses import dataclass, replace
from functools import partial

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

import common
import evaluation

autoencoder = common.import_script("01_autoencoder")    # image_rows
contrastive = common.import_script("03_contrastive")    # augment, nt_xent, ema_rate, ema_update


# passes over the 50 000 images of the shapes set, chosen for about a minute each on one H200 with the compiling
# (DINO's default run: 84 s of pre-training while it shared the GPU with three other runs, RESULTS.md)
PRETRAIN_EPOCHS = {"mae": 40, "dino": 25, "simclr": 20}
UNLABELLED = {"captions": common.read_caption_folder, "flickr8k": common.read_flickr8k,    # image sets 04 pre-trains
              "openclipart": common.read_openclipart}                                      # on without labels: readers


@dataclass
class Config(common.RunConfig):
    dataset: str = common.arg("shapes", "shapes (embedded, offline) | mnist | fashion-mnist | cifar10, or for --pretrain "
                                        "alone the images of captions (--data-dir DIR) | flickr8k | openclipart")
    model: str = common.arg("vit", "the model trained and examined: vit | cnn (the baseline)", choices=["vit", "cnn"])
    image_size: int = common.arg(32, "images are padded or resized to this many pixels a side")
    # NOTE: patch 8 (16 tokens), not the usual 4 for 32x32 images (64 tokens): with 4 times fewer tokens a step
    # costs less, so that the default run, compile included, takes about a minute on one GPU
    patch_size: int = common.arg(8, "P: pixels per patch side; image_size must be a multiple of it")
    dim: int = common.arg(192, "E: token width of the ViT; the CNN's stage widths are E/2, E, 2E (about as many parameters)")
    depth: int = common.arg(6, "L: number of Transformer blocks")
    heads: int = common.arg(3, "H: attention heads per block; dim must be a multiple of it")
    mlp_ratio: int = common.arg(4, "hidden width of each block's MLP, as a multiple of dim")
    epochs: int = common.arg(25, "passes over the full training set; fewer labels (--train-fraction) get the same steps")
    batch_size: int = common.arg(512, "images per step on each GPU (N GPUs under torchrun: N x this per step)")
    lr: float = common.arg(2e-3, "peak learning rate of AdamW, reached after the warm-up")
    warmup: float = common.arg(0.1, "share of the steps over which the learning rate rises linearly from 0")
    weight_decay: float = common.arg(0.05, "AdamW's decoupled weight decay, on weight matrices only")
    label_smoothing: float = common.arg(0.1, "share of each target's probability spread evenly over all classes")
    clip_grad: float = common.arg(1.0, "gradients are rescaled to at most this global norm (0 = no clipping)")
    crop: float = common.arg(0.0, "03's random resized crop while training: the share of the area it may cut away (0 = none)")
    train_fraction: float = common.arg(1.0, "share of the labelled training images used, in (0, 1]")
    pretrain: str = common.arg("", "pre-train the ViT on the training images, labels unused, before fine-tuning: "
                                   "mae | dino | simclr", choices=["", *PRETRAIN_EPOCHS])
    pretrain_epochs: int = common.arg(0, "passes over the training images for --pretrain (0 = the method's default, "
                                         "PRETRAIN_EPOCHS: about a minute on one GPU)")
    mask_ratio: float = common.arg(0.75, "MAE: share r of each image's patches hidden from the encoder, in (0, 1)")
    decoder_dim: int = common.arg(128, "MAE: token width of the light decoder")
    decoder_depth: int = common.arg(2, "MAE: Transformer blocks of the decoder")
    dino_dim: int = common.arg(1024, "DINO: K, the outputs of the head (prototypes) that teacher and student share")
    student_temp: float = common.arg(0.1, "DINO: temperature of the student's softmax")
    teacher_temp: float = common.arg(0.04, "DINO: temperature of the teacher's softmax; below the student's, it sharpens")
    ema: float = common.arg(0.996, "DINO: the teacher's momentum l at the start, in [0, 1], then up to 1 on a cosine: "
                                   "teacher <- l teacher + (1 - l) student")
    center_momentum: float = common.arg(0.9, "DINO: momentum m in [0, 1] of the centre C of the teacher's outputs")
    local_crops: int = common.arg(0, "DINO: extra small views per image (half the side), seen by the student only")
    no_centering: bool = common.arg(False, "DINO ablation: the teacher's outputs are not centred (C stays 0)")
    no_sharpening: bool = common.arg(False, "DINO ablation: the teacher's temperature is the student's")
    temperature: float = common.arg(0.2, "NT-Xent temperature for --pretrain simclr")
    pretrain_lr: float = common.arg(0.0, "peak learning rate of the pre-training (0 = --lr)")
    init: str = common.arg("", "start the ViT from a checkpoint saved by --pretrain (kind 'vit'), e.g. runs/04_vit/vit_simclr.pt")
    compile: str = common.arg("auto", "torch.compile the training forward pass: auto (the ViT on one GPU), on, off; "
                                      "about 20 s of compiling, then 2-4x the images per second", choices=["auto", "on", "off"])
    n_train: int = common.arg(0, "training images to load (0 = all of the dataset's)")
    n_test: int = common.arg(0, "test images to load (0 = all of the dataset's)")
    val_split: int = common.arg(0, "evaluate on the last this many training images instead of the test set (for tuning)")
    probe_samples: int = common.arg(10_000, "training images the per-layer linear probes are fitted on")
    probe_steps: int = common.arg(300, "Adam steps of each linear probe (evaluation.linear_probe runs at least this many)")


QUICK = dict(n_train=1200, n_test=1000, patch_size=8, dim=48, depth=2, heads=2, mlp_ratio=2, epochs=6, batch_size=100,
             lr=3e-3, pretrain_epochs=3, probe_samples=600, probe_steps=100, decoder_dim=32, decoder_depth=1, dino_dim=128)


# ---- 1. Model: a Vision Transformer, built up from its smallest parts ----
#
# Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Eqs. 1-4:
#   z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos         (1) patches as tokens
#   z'_l = MSA(LN(z_{l-1})) + z_{l-1}                      (2) pre-norm attention, residual
#   z_l = MLP(LN(z'_l)) + z'_l                             (3) pre-norm MLP, residual
#   y = LN(z_L^0)                                          (4) the class token is the image's representation

def patchify(images, patch_size):
    """Non-overlapping P x P patches in row-major order, by reshaping alone: (B, C, H, W) -> (B, N, C*P*P).
    A patch's pixels are flattened channel first, the order nn.Conv2d's weight (E, C, P, P) uses."""
    B, C, H, W = images.shape
    P = patch_size
    x = images.reshape(B, C, H // P, P, W // P, P)            # (B, C, H/P, P, W/P, P)
    x = x.permute(0, 2, 4, 1, 3, 5)                            # (B, H/P, W/P, C, P, P)
    return x.reshape(B, (H // P) * (W // P), C * P * P)        # (B, N, C*P*P)


def unpatchify(patches, patch_size, channels):                 # patchify's inverse: (B, N, C*P*P) -> (B, C, H, W)
    B, N, _ = patches.shape
    P, side = patch_size, math.isqrt(N)
    x = patches.reshape(B, side, side, channels, P, P)          # (B, H/P, W/P, C, P, P)
    x = x.permute(0, 3, 1, 4, 2, 5)                             # (B, C, H/P, P, W/P, P)
    return x.reshape(B, channels, side * P, side * P)           # (B, C, H, W)


class LayerNorm(nn.Module):
    """Ba et al. 2016, Eq. 4: normalise each token over its E features, then a learned scale and shift.
    Unlike BatchNorm it needs no batch statistics, so a token's output never depends on the other images."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):                                       # (..., E)
        variance, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)   # (..., 1) each, biased variance
        return (x - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias


def attention_weights(q, k, mask=None):                      # q, k (B, H, T, D); mask True where a token may attend
    """softmax(Q K^T / sqrt(D)) of Vaswani et al. 2017, Eq. 1: row t says how much token t reads from each token."""
    # dividing by sqrt(D) keeps the scores' variance near 1 whatever the head size, so the softmax
    # starts out soft instead of picking one token (a dot product of D unit-variance terms has variance D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B,H,T,D) @ (B,H,D,T) -> (B,H,T,T)
    if mask is not None:
        # NOTE: a row that may attend to nothing (all False) becomes 0/0 = NaN here; recent SDPA returns 0 there
        scores = scores.masked_fill(~mask, float("-inf"))       # exp(-inf) = 0: no weight at all
    return scores.softmax(dim=-1)                              # (B, H, T, T), each row sums to 1


def attention(q, k, v, mask=None):                           # q, k, v (B, H, T, D) -> (B, H, T, D)
    """Eq. 1 of Vaswani et al.: each token's output is a weighted mean of the values; the models' only attention."""
    return attention_weights(q, k, mask) @ v                  # (B,H,T,T) @ (B,H,T,D) -> (B,H,T,D)


class MultiHeadAttention(nn.Module):
    """Vaswani et al., Eq. 5: H heads attend in H subspaces of size D = E / H, side by side, then mix.
    One matrix makes Q, K and V for all heads at once (the layout of nn.MultiheadAttention's in_proj)."""

    def __init__(self, dim, heads):
        super().__init__()
        common.check(dim % heads == 0, f"the embedding width {dim} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                     # W^Q, W^K, W^V of every head, stacked
        self.proj = nn.Linear(dim, dim)                        # W^O: mixes what the heads found

    def _queries_keys_values(self, x):                         # (B, T, E) -> 3 x (B, H, T, D)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))            # (B, T, 3E) -> (B, T, 3, H, D)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)            # (3, B, H, T, D) -> q, k, v

    def forward(self, x, mask=None):                           # (B, T, E) -> (B, T, E)
        out = attention(*self._queries_keys_values(x), mask)                # (B, H, T, D)
        return self.proj(out.transpose(1, 2).flatten(2))                    # merge heads: (B, T, H, D) -> (B, T, E)

    def weights(self, x, mask=None):                           # (B, T, E) -> (B, H, T, T): for the figures
        return attention_weights(*self._queries_keys_values(x)[:2], mask)      # q and k alone


class Block(nn.Module):
    """One pre-norm Transformer block, Eqs. 2-3: attention then a per-token MLP, each added to a residual stream.
    Normalising the branch input (not the sum, as the 2017 Transformer did) keeps the residual path an
    identity, which is why deep stacks train without a careful warm-up of their own."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    # torch.compile traces one block and stamps its compiled code out for the others (eager: no effect), so the
    # first compile is shorter and the six blocks share one set of kernels.
    @torch.compiler.nested_compile_region
    def forward(self, x, mask=None):                           # (B, T, E) -> (B, T, E)
        x = x + self.attn(self.norm1(x), mask)                 # tokens exchange information (Eq. 2)
        return x + self.mlp(self.norm2(x))                     # each token thinks on its own (Eq. 3)


class ViT(nn.Module):
    """Eqs. 1-4 on normalised images. With pos_embedding=False the patches form an unordered set (see equivariance)."""

    def __init__(self, image_size=32, patch_size=4, in_channels=3, dim=192, depth=6, heads=3, mlp_ratio=4,
                 num_classes=0, pos_embedding=True):
        super().__init__()
        common.check(image_size % patch_size == 0,
                     f"the image size {image_size} is not divisible by the patch size {patch_size}")
        # the constructor's arguments, saved beside checkpoints so that ViT(**arch) rebuilds this model
        self.arch = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels, dim=dim, depth=depth,
                         heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes, pos_embedding=pos_embedding)
        self.dim, self.patch_size, self.in_channels = dim, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)   # E of Eq. 1, shared by every patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))            # x_class: a token with no pixels of its own
        # E_pos: one learned vector per position; without it attention cannot tell where a patch came from
        # EXERCISE: use fixed 2-D sine-cosine position embeddings instead, and compare positions.png and accuracy
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim)) if pos_embedding else None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.pos_embedding is not None:
            nn.init.normal_(self.pos_embedding, std=0.02)

    @staticmethod
    def _init_weights(module):
        # small normal weights and zero biases (as ViT and GPT-2): every residual branch starts near zero,
        # so at initialisation the network is close to the identity plus the patch embedding
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def embed(self, images, keep=None):                        # (B, C, H, W) -> (B, T, E): Eq. 1
        patches = patchify(images, self.patch_size)            # (B, N, C*P*P)
        tokens = self.patch_embed(patches)                     # (B, N, E)
        cls = self.cls_token.expand(len(images), -1, -1)       # (B, 1, E)
        tokens = torch.cat([cls, tokens], dim=1)               # (B, T, E), T = 1 + N
        if self.pos_embedding is not None:
            tokens = tokens + self.positions(tokens.shape[1])  # (B, T, E) + (1, T, E)
        if keep is not None:                                   # MAE: only the visible patches, each with its position
            visible = tokens[:, 1:].gather(1, keep[:, :, None].expand(-1, -1, tokens.shape[2]))   # (B, n, E)
            tokens = torch.cat([tokens[:, :1], visible], dim=1)                                   # (B, 1 + n, E)
        return tokens

    def positions(self, T):
        """E_pos (1, T, E) as learned; for a smaller image (DINO's local crops) the learned grid resized to its grid."""
        if T == self.pos_embedding.shape[1]:
            return self.pos_embedding
        grid, side = math.isqrt(self.num_patches), math.isqrt(T - 1)
        patch_pos = self.pos_embedding[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)   # (1, E, g, g)
        patch_pos = F.interpolate(patch_pos, size=(side, side), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embedding[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def hidden_states(self, images, keep=None):                # L + 1 of (B, T, E): the embedding, then each block's
        states = [self.embed(images, keep)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def tokens(self, images, keep=None):                       # (B, C, H, W) -> (B, T, E), or (B, 1 + n, E) with keep
        return self.norm(self.hidden_states(images, keep)[-1])

    def features(self, images):                                # (B, C, H, W) -> (B, E): Eq. 4
        return self.tokens(images)[:, 0]                       # EXERCISE: average the patch tokens [:, 1:] instead

    def forward(self, images):                                 # (B, C, H, W) -> (B, num_classes) or (B, E)
        features = self.features(images)
        return self.head(features) if self.head is not None else features


class ConvNet(nn.Module):
    """The inductive-bias baseline: three stages of two 3x3 conv-BatchNorm-GELU layers, each ending in a 2x2 max-pool.
    Weight sharing over positions makes every conv layer translation-equivariant, and small kernels make it local: two
    priors a ViT must learn from data. width=96 gives about as many parameters as the default ViT (dim 192, depth 6)."""

    def __init__(self, in_channels=3, width=96, num_classes=0):
        super().__init__()
        self.dim = 4 * width

        def stage(c_in, c_out):
            conv_bn_gelu = lambda c: [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            return nn.Sequential(*conv_bn_gelu(c_in), *conv_bn_gelu(c_out))

        self.stages = nn.ModuleList([stage(in_channels, width), stage(width, 2 * width), stage(2 * width, 4 * width)])
        self.head = nn.Linear(self.dim, num_classes) if num_classes else None

    def features(self, images):                                # (B, C, H, W) -> (B, 4w)
        x = images
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)                      # halve the resolution after each stage
        return x.mean(dim=(2, 3))                              # (B, 4w, H/8, W/8) -> (B, 4w): position forgotten

    def forward(self, images):                                 # (B, C, H, W) -> (B, num_classes) or (B, 4w)
        features = self.features(images)
        return self.head(features) if self.head is not None else features


def build_model(kind, cfg, num_classes):
    if kind == "vit":
        return ViT(cfg.image_size, cfg.patch_size, 3, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, num_classes)
    return ConvNet(3, cfg.dim // 2, num_classes)


# ---- 2. Pre-training without labels, the two ways that suit a ViT: masked autoencoding and self-distillation ----
#
# MAE (He et al. 2022, Sec. 3). Each image's N patches are shuffled by a random permutation and the first
# n = round(N (1 - r)) kept; the encoder runs on those n alone (a quarter of the tokens at r = 0.75, which is what
# makes it cheap, and what no CNN can do); a light decoder puts a shared mask token at every hidden place, adds
# position embeddings, and predicts every patch's pixels; the loss is the mean squared error on the hidden patches
# only, against each patch's pixels normalised by their own mean and variance ("normalized pixels", Table 1d):
#   L = 1/|M| sum_{i in M} ||x̂_i - (x_i - mean(x_i)) / sqrt(var(x_i) + eps)||^2 / (C P P)

def random_masking(batch, num_patches, mask_ratio, device):
    """MAE's masking for a batch: keep (B, n) the visible patches, restore (B, N) the inverse of each image's
    permutation (the shuffled order put back), mask (B, N) 1.0 on the hidden patches, in image order."""
    visible = round(num_patches * (1 - mask_ratio))
    shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)   # (B, N): a random permutation each
    restore = shuffle.argsort(dim=1)                                         # (B, N): shuffle[restore] = 0..N-1
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :visible] = 0                                                    # in the shuffled order: n kept first
    return shuffle[:, :visible], restore, mask.gather(1, restore)            # mask back in image order


class MAEDecoder(nn.Module):
    def __init__(self, num_patches, encoder_dim, patch_pixels, dim=128, depth=2, heads=4):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)                         # the encoder's width to the decoder's
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))           # one learned vector for "hidden here"
        # the decoder's own E_pos: a mask token says nothing of where it sits, so the position must be added
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.predict = nn.Linear(dim, patch_pixels)
        self.apply(ViT._init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, latent, restore):                                  # encoded (B, 1 + n, E), restore (B, N)
        x = self.embed(latent)                                            # (B, 1 + n, E')
        B, N = restore.shape
        hidden = self.mask_token.expand(B, N + 1 - x.shape[1], -1)        # (B, N - n, E')
        shuffled = torch.cat([x[:, 1:], hidden], dim=1)                   # (B, N, E'), the shuffled order
        patches = shuffled.gather(1, restore[:, :, None].expand(-1, -1, x.shape[2]))   # (B, N, E'), image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embedding    # (B, T, E')
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x)[:, 1:])                          # (B, N, C*P*P)


class MAE(nn.Module):
    def __init__(self, encoder, decoder_dim, decoder_depth):
        super().__init__()
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder.num_patches, encoder.dim, encoder.in_channels * encoder.patch_size**2,
                                  decoder_dim, decoder_depth, heads=math.gcd(decoder_dim, 4))

    def forward(self, images, keep, restore):                            # normalised (B, C, H, W) -> (B, N, C*P*P)
        return self.decoder(self.encoder.tokens(images, keep), restore)  # the encoder never sees a hidden patch


def mae_loss(prediction, images, mask, patch_size):
    """The loss above: prediction (B, N, C*P*P), normalised images (B, C, H, W), mask (B, N) -> scalar."""
    patches = patchify(images, patch_size)                                # (B, N, C*P*P)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    target = (patches - mean) / (var + 1e-6).sqrt()                       # each patch's own contrast
    per_patch = (prediction - target).square().mean(-1)                   # (B, N)
    return (per_patch * mask).sum() / mask.sum()                          # visible patches count for nothing


# DINO (Caron et al. 2021, Algorithm 1). A student g_s and a teacher g_t, the same ViT with the same head; the
# teacher is never trained by gradients (stop-gradient): its weights follow the student's as an exponential moving
# average, g_t <- l g_t + (1 - l) g_s. Two views x1, x2 of each image; the student learns to predict the teacher's
# output on the other view (Eq. 2-3):
#   loss = H(t1, s2) / 2 + H(t2, s1) / 2,  H(t, s) = - sum_k softmax((t - C) / tau_t)_k log softmax(s / tau_s)_k
# and the centre C <- m C + (1 - m) mean over the batch of [t1; t2] (Eq. 4). Two ways to a trivial solution:
# one output dimension winning for every image, or the uniform output. Centring subtracts the mean output, so no
# dimension can dominate, but pushes towards uniform; sharpening (tau_t < tau_s) does the opposite. Together they
# balance. With local crops (Sec. 3.1) the student also sees small views, the teacher only the two global ones.

class DINOHead(nn.Module):
    """DINO's projection head (Sec. 3.1, Appendix): a 3-layer MLP to a bottleneck, l2-normalised, then a
    weight-normalised linear layer to K outputs, i.e. cosine scores against K learned prototypes. (B, E) -> (B, K)."""

    def __init__(self, dim, out_dim, hidden=512, bottleneck=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(0.02 * torch.randn(out_dim, bottleneck))   # (K, bottleneck), directions only
        self.apply(ViT._init_weights)

    def forward(self, features):
        z = F.normalize(self.mlp(features), dim=-1)                                # (B, bottleneck), unit
        return z @ F.normalize(self.prototypes, dim=-1).T                         # (B, K) cosines in [-1, 1]


def dino_cross_entropy(teacher, student, center, teacher_temp, student_temp):
    """H(t, s) of Algorithm 1: teacher and student outputs (B, K), centre (K,) -> the batch's mean cross-entropy."""
    t = F.softmax((teacher.detach() - center) / teacher_temp, dim=-1)    # stop-gradient; centre, then sharpen
    return -(t * F.log_softmax(student / student_temp, dim=-1)).sum(-1).mean()


def dino_loss(teachers, students, center, teacher_temp, student_temp):         # lists of (B, K)
    """Each teacher view [t1, t2] against each student view of another crop [s1, s2, local crops...] (Sec. 3.1)."""
    terms = [dino_cross_entropy(t, s, center, teacher_temp, student_temp)
             for i, t in enumerate(teachers) for j, s in enumerate(students) if i != j]
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center, teacher_outputs, momentum):
    """Eq. 4: C <- m C + (1 - m) mean of the teacher's outputs (B, K) over the batch; (K,) -> (K,)."""
    batch_mean = common.at_least_float32(teacher_outputs).mean(0)         # (K,)
    if common.world_size() > 1:    # torchrun: the mean over every GPU's batch, so C is the same everywhere
        dist.all_reduce(batch_mean)
        batch_mean /= common.world_size()
    return momentum * center + (1 - momentum) * batch_mean


# ---- 3. Data: images stay on the device as uint8; each batch is converted, augmented and normalised there ----

def load_data(cfg, device):
    """3-channel uint8 images of image_size pixels on device; a captioned set has no labels (y_train, y_test None)."""
    if cfg.dataset in UNLABELLED:
        pairs = UNLABELLED[cfg.dataset](cfg.data_dir, cfg.image_size, device)   # 05's split: no test image trains here
        data = common.ImageData(cfg.dataset, pairs.train.images[:cfg.n_train or None], None,
                                pairs.test.images[:cfg.n_test or None], None, [])
    else:
        data = common.load_images(cfg.dataset, cfg.data_dir, device, n_train=cfg.n_train or None,
                                  n_test=cfg.n_test or None, seed=cfg.seed, size=cfg.image_size, channels=3)
    if cfg.val_split:             # the last training images stand in for the test set, which tuning must not see
        common.check(cfg.val_split < len(data.x_train), f"--val-split {cfg.val_split} leaves no training image")
        cut = lambda y: (None, None) if y is None else (y[:-cfg.val_split], y[-cfg.val_split:])
        (data.x_train, data.x_test), (data.y_train, data.y_test) = cut(data.x_train), cut(data.y_train)
    return data


def channel_stats(images):                   # uint8 (N, C, H, W) -> per-channel mean, std (1, C, 1, 1) in [0, 1] units
    x = common.to_float(images)
    return x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True) + 1e-3


def normalise(images, stats):                # uint8 or [0, 1] floats (B, C, H, W) -> zero mean, unit variance per channel
    mean, std = stats
    return (common.to_float(images) - mean) / std


def subset(n, fraction, seed, device):
    """A fixed random share of the indices 0..n-1 (at least one image): the labelled images a run may use."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:max(1, round(fraction * n))].to(device)


def index_batches(pool, batch_size, steps, generator):
    """`steps` batches of batch_size (at most len(pool)) indices from pool, each pass over pool in a fresh random
    order. Every batch has the same size (a pass's remainder is dropped), so torch.compile compiles one graph."""
    per_pass = len(pool) // batch_size
    for step in range(steps):
        if step % per_pass == 0:
            order = pool[torch.randperm(len(pool), generator=generator).to(pool.device)]
        yield order[(step % per_pass) * batch_size:(step % per_pass + 1) * batch_size]


# ---- 4. Training, as practitioners train small ViTs: AdamW, warm-up then cosine, label smoothing, clipping ----

def decay_groups(model, weight_decay):
    """AdamW's two parameter groups: decoupled weight decay on the weight matrices of linear and conv layers,
    none on anything else. Pulling norms' gains, biases, the class token or the position embeddings towards 0
    makes no simpler model; an nn.Embedding table would lose its rare rows, decayed at every step but seldom
    given a gradient. 05 uses the same groups."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    decay = [p for p in model.parameters() if id(p) in matrices]
    rest = [p for p in model.parameters() if id(p) not in matrices]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def fit(model, loss_of_batch, pool, epochs, epoch_images, cfg, device, desc, evaluate=dict, after_step=lambda *_: None):
    """The loop shared by supervised training and every pre-training: `epochs` passes' worth of steps over epoch_images
    images, drawn from pool. loss_of_batch(indices) -> scalar loss; after_step(step, steps) runs after each optimiser step
    (DINO's teacher and centre). Each epoch adds the mean loss, the training seconds so far (evaluation excluded) and what
    evaluate() returns to the history it returns (a list of dicts)."""
    optimizer = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    scaler = common.grad_scaler(device)                         # fp16 GPUs only; with bf16 and float32 a no-op
    history, running, seconds = [], torch.zeros((), device=device), 0.0
    # Several GPUs (torchrun), here and in train_classifier: every rank holds all the data and draws the same batch
    # of W x batch_size images (one seed), trains on its own share of it (rank_share), and DDP (data_parallel)
    # averages the W share-mean gradients into the gradient of the whole batch's mean loss. The recorded losses
    # are averaged over the ranks; every rank evaluates alike, and rank 0 alone writes (is_main, in main).
    # NOTE: the CNN's BatchNorm then normalises with each GPU's own batch statistics.
    W = common.world_size()
    common.check(len(pool) >= W, f"{len(pool)} labelled images cannot be shared out to {W} processes")
    batch_size = min(cfg.batch_size, len(pool) // W) * W        # all W GPUs together, the same share on each
    steps_per_epoch = max(1, epoch_images // (cfg.batch_size * W))
    steps = epochs * steps_per_epoch
    bar = common.progress(steps * batch_size, desc)
    model.train()
    watch = common.Stopwatch(device)
    for step, indices in enumerate(index_batches(pool, batch_size, steps, torch.Generator().manual_seed(cfg.seed))):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * common.warmup_cosine(step, steps, round(cfg.warmup * steps))
        loss = loss_of_batch(indices[common.rank_share(len(indices))])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            # one bad batch cannot throw the weights far: the step is rescaled when the gradient norm is large
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        after_step(step, steps)
        running += loss.detach()                               # summed on the device: no synchronisation per step
        bar.update(len(indices))
        if (step + 1) % steps_per_epoch == 0:                  # steps is a whole number of epochs
            seconds += watch.seconds()
            record = {"epoch": round((step + 1) / steps_per_epoch, 3),
                      "loss": common.mean_over_ranks((running / steps_per_epoch).item()),
                      "seconds": seconds, "images": (step + 1) * batch_size}
            model.eval()
            record.update(evaluate())
            model.train()
            # the loss is read here anyway: a non-finite one means the weights are lost, so stop now (as 02 does)
            if not math.isfinite(record["loss"]):
                bar.close()                          # clears the bar's line, so the error stands on a line of its own
                raise common.UserError(f"training diverged ({desc}: the loss is {record['loss']} at epoch "
                                       f"{record['epoch']:g}); lower --lr")
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", **{k: f"{v:.3f}" for k, v in record.items() if k == "test_top1"})
            running = torch.zeros((), device=device)
            watch = common.Stopwatch(device)
    bar.close()
    model.eval()
    return history


def uses_compile(cfg, device, is_vit):
    """--compile auto compiles the ViT on one GPU: not the CNN, whose time goes to cuDNN's convolutions that the
    compiler cannot speed up, nor under torchrun (see compiled). Never on a CPU: there, in float32, PyTorch 2.13's
    compiled blocks (nested regions) gave wrong gradients."""
    common.check(cfg.compile != "on" or device.type == "cuda", "--compile on needs a CUDA GPU")
    return device.type == "cuda" and (cfg.compile == "on" or (cfg.compile == "auto" and is_vit and common.world_size() == 1))


def compiled(module, cfg, device):
    """module under torch.compile when uses_compile says so (the timings include the compiling). The compiler fuses
    the written-out attention and LayerNorm into about half as many kernels; on one GPU, mode "reduce-overhead" also
    records the step's kernels once as a CUDA graph and replays it. NOTE: otherwise Python launches the kernels one
    by one, and for a model this small that sets the pace, not the GPU's work. Under torchrun, DDP's gradient hooks
    run between kernels: no CUDA graph there. dynamic=False: DINO's local crops get a graph of their own size."""
    if not uses_compile(cfg, device, not isinstance(module, ConvNet)):
        return module
    return torch.compile(module, mode="reduce-overhead" if common.world_size() == 1 else None, dynamic=False)


def train_classifier(model, data, stats, pool, cfg, device, desc):
    """Supervised training on the labelled images `pool` for cfg.epochs passes' worth of steps over the full
    training set (fewer labels: more passes over them, the same compute). Returns the history."""
    forward = compiled(common.data_parallel(model, device), cfg, device)    # the same parameters, fused kernels

    def loss_of_batch(indices):
        x = common.to_float(data.x_train[indices])                              # (B, C, H, W) in [0, 1]
        # 03's GPU augmentations, mild for supervised training: a mirror, a crop with --crop, no colour changes;
        # the crop is off by default: the default run is short and still underfits; over 50-70 epochs of
        # Fashion-MNIST a crop of 0.3 lifted test accuracy by about a point
        x = contrastive.augment(x, crop=cfg.crop, flip=0.5, jitter=0, grayscale=0, blur=0)
        with common.autocast(device):
            logits = forward(normalise(x, stats))                               # (B, classes)
        # label smoothing (Szegedy et al. 2016, Sec. 7): the target is 1 - eps on the class and eps / classes
        # everywhere, so the logits need not grow without bound to fit the training set
        return F.cross_entropy(logits.float(), data.y_train[indices], label_smoothing=cfg.label_smoothing)

    evaluate = lambda: {"test_top1": test_accuracy(model, data, stats)["top1"]}
    return fit(model, loss_of_batch, pool, cfg.epochs, len(data.x_train), cfg, device, desc, evaluate)


def pretrain_loop(model, loss_of_batch, data, cfg, device, desc, evaluate=dict, after_step=lambda *_: None):
    everything = torch.arange(len(data.x_train), device=device)
    epochs, settings = cfg.pretrain_epochs or PRETRAIN_EPOCHS[cfg.pretrain], replace(cfg, lr=cfg.pretrain_lr or cfg.lr)
    return fit(model, loss_of_batch, everything, epochs, len(everything), settings, device, desc, evaluate, after_step)


def pretrain_mae(vit, data, stats, cfg, device):
    """MAE (section 2) on the training images. Returns (history, the MAE, whose decoder draws reconstruction.png)."""
    mae = MAE(vit, cfg.decoder_dim, cfg.decoder_depth).to(device)
    forward = compiled(common.data_parallel(mae, device), cfg, device)

    def loss_of_batch(indices):
        # MAE's only augmentations are a random resized crop and a mirror (Appendix A.1): masking is the task
        x = contrastive.augment(common.to_float(data.x_train[indices]), crop=0.6, flip=0.5, jitter=0, grayscale=0, blur=0)
        x = normalise(x, stats)                                                  # (B, C, H, W)
        keep, restore, mask = random_masking(len(x), vit.num_patches, cfg.mask_ratio, device)
        with common.autocast(device):
            prediction = forward(x, keep, restore)                               # (B, N, C*P*P)
        return mae_loss(prediction.float(), x, mask, vit.patch_size)

    return pretrain_loop(mae, loss_of_batch, data, cfg, device, "MAE pre-training"), mae


def local_crop_side(cfg):                                      # DINO's local crops: half the side, in whole patches
    return cfg.image_size // 2 // cfg.patch_size * cfg.patch_size


def pretrain_dino(vit, data, stats, cfg, device):
    """DINO (section 2, Algorithm 1) on the training images. Every epoch it records the two collapse checks: the
    entropy of the teacher's mean output over 1024 training images (near 0: one dimension wins for all of them) and
    the teacher's mean per-image entropy (near ln K: the output is uniform, and the loss sits at ln K).
    Afterwards vit holds the teacher's weights, the better encoder in DINO's Sec. 5.2. Returns (history, teacher)."""
    student = nn.Sequential(vit, DINOHead(vit.dim, cfg.dino_dim)).to(device)    # images -> (B, K)
    teacher = copy.deepcopy(student).requires_grad_(False)                      # the same start: g_t = g_s
    student_forward = compiled(common.data_parallel(student, device), cfg, device)
    teacher_forward = compiled(teacher, cfg, device)
    teacher_temp = cfg.student_temp if cfg.no_sharpening else cfg.teacher_temp
    state = {"center": torch.zeros(cfg.dino_dim, device=device), "teacher": None}

    def loss_of_batch(indices):
        x = common.to_float(data.x_train[indices])                               # (B, C, H, W)
        views = normalise(contrastive.augment(torch.cat([x, x])), stats)         # (2B, C, H, W): x1, then x2
        with common.autocast(device):
            with torch.no_grad():                                                # stop-gradient: EMA only
                teacher_out = teacher_forward(views).float()                     # (2B, K)
            students = [student_forward(views).float()]                          # (2B, K)
            if cfg.local_crops:
                # NOTE: 03's crop keeps 10-100% of the area (DINO's local crops keep 5-40%), then half the side
                small = contrastive.augment(x.repeat(cfg.local_crops, 1, 1, 1), crop=0.9)
                small = F.interpolate(small, size=(local_crop_side(cfg),) * 2, mode="bilinear", antialias=True)
                students.append(student_forward(normalise(small, stats)).float())   # (n_local B, K)
        state["teacher"] = teacher_out
        return dino_loss(teacher_out.chunk(2), torch.cat(students).chunk(2 + cfg.local_crops), state["center"],
                         teacher_temp, cfg.student_temp)

    def after_step(step, steps):                                                 # Algorithm 1's last two lines
        # g_t <- l g_t + (1 - l) g_s, with l rising from --ema to 1 on a cosine (Sec. 3.1), 03's BYOL schedule
        contrastive.ema_update(teacher, student, contrastive.ema_rate(step, steps, cfg.ema))
        if not cfg.no_centering:
            state["center"] = update_center(state["center"], state["teacher"], cfg.center_momentum)

    def collapse_checks():
        entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)              # (..., K) -> (...), in nats
        with torch.no_grad(), common.autocast(device):
            targets = F.softmax((teacher(normalise(data.x_train[:1024], stats)).float() - state["center"]) / teacher_temp, -1)
        return {"teacher_entropy_of_mean": entropy(targets.mean(0)).item(),
                "teacher_mean_entropy": entropy(targets).mean().item()}

    history = pretrain_loop(student, loss_of_batch, data, cfg, device, "DINO pre-training", collapse_checks, after_step)
    vit.load_state_dict(teacher[0].state_dict())
    return history, teacher


def pretrain_simclr(vit, data, stats, cfg, device):
    """SimCLR without labels: two views of every image from 03's augment, the ViT's class token h through
    a small projector g, and NT-Xent (Eq. 1 of SimCLR) on g(h). The probe later reads h, not g(h).
    Returns (history, projector). NOTE: one process; 03 shares NT-Xent's negatives over GPUs."""
    projector = nn.Sequential(nn.Linear(vit.dim, vit.dim), nn.GELU(), nn.Linear(vit.dim, 128)).to(device)
    both = nn.ModuleDict({"encoder": vit, "projector": projector})
    encode = compiled(vit, cfg, device)

    def loss_of_batch(indices):
        x = common.to_float(data.x_train[indices])                              # (B, C, H, W)
        views = torch.cat([contrastive.augment(x), contrastive.augment(x)])     # (2B, C, H, W)
        with common.autocast(device):
            z = projector(encode(normalise(views, stats)))                      # (2B, 128)
        return contrastive.nt_xent(*z.float().chunk(2), cfg.temperature)        # z1, z2 (B, 128) each

    return pretrain_loop(both, loss_of_batch, data, cfg, device, "SimCLR pre-training"), projector


PRETRAINERS = {"mae": pretrain_mae, "dino": pretrain_dino, "simclr": pretrain_simclr}


# ---- 5. Evaluation: accuracy, what each layer knows, where attention looks, which symmetries hold ----

@torch.no_grad()
def predict(model, images, stats, batch_size=1024):   # uint8 (N, C, H, W) -> logits (N, classes) or features (N, E)
    model.eval()
    with common.autocast(images.device):
        return torch.cat([model(normalise(x, stats)).float() for x in images.split(batch_size)])


def test_accuracy(model, data, stats):
    return evaluation.topk_accuracy(predict(model, data.x_test, stats), data.y_test)


@torch.no_grad()
def layer_features(vit, images, stats, batch_size=1024):
    """The class token after the embedding and after every block, then the mean patch token: (2(L + 1), n, E)."""
    features = []
    for x in images.split(batch_size):
        with common.autocast(images.device):
            states = vit.hidden_states(normalise(x, stats))                     # L + 1 of (b, T, E)
        features.append(torch.stack([s[:, 0] for s in states] + [s[:, 1:].mean(1) for s in states]).float())
    return torch.cat(features, 1)


def probe_features(encoder, data, stats, pool, cfg, knn=False, features=predict, centre=False):
    """Test top-1 of the linear probe (knn=True: the kNN classifier, on centred features with centre=True) fitted on
    the labelled pool, on the frozen features(encoder, images, stats) (n, E); encoder=None reads raw pixels, the
    baseline. With layer_features, a stack (S, n, E): S probes side by side, and a list of S scores."""
    encode = partial(features, encoder, stats=stats) if encoder else lambda images: common.to_float(images.flatten(1))
    fit = (partial(evaluation.knn_classify, centre=centre) if knn
           else partial(evaluation.linear_probe, seed=cfg.seed, min_steps=cfg.probe_steps))
    result = fit(encode(data.x_train[pool]), data.y_train[pool], encode(data.x_test), data.y_test, len(data.classes))
    return [r["top1"] for r in result] if isinstance(result, list) else result["top1"]


def depth_probes(vit, data, stats, pool, cfg):
    """Linear probes on the class token and on the mean patch token after every block, fitted on up to probe_samples
    labelled training images, against raw pixels. Before block 1 the class token is one vector for every image
    (x_class + E_pos^0), so its probe is at chance by construction: all it knows later, attention brought to it."""
    train, depths = pool[:cfg.probe_samples], len(vit.blocks) + 1
    tokens = probe_features(vit, data, stats, train, cfg, features=layer_features)   # all 2(L + 1) side by side
    return {"class_token": tokens[:depths], "mean_patch_token": tokens[depths:],
            "pixels": probe_features(None, data, stats, train, cfg), "chance": 1 / len(data.classes)}


def attention_rollout(maps):                                                    # L of (n, H, T, T) -> (n, N)
    """Abnar & Zuidema 2020: how much each input patch flows into the final class token. A layer mixes tokens by its
    head-averaged attention plus the residual (0.5 A + 0.5 I, rows renormalised); layers compose as matrix products."""
    joint = identity = torch.eye(maps[0].shape[-1], device=maps[0].device)      # (T, T)
    for weights in maps:
        mixing = 0.5 * weights.mean(1) + 0.5 * identity                          # (n, T, T)
        mixing = mixing / mixing.sum(-1, keepdim=True)
        joint = mixing @ joint                                                  # (n,T,T) @ (n,T,T) -> (n,T,T)
    return joint[:, 0, 1:]                                                      # class token's row, patches only


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def equivariance(vit, cnn, images, seed):
    """Symmetries built into each architecture, on real normalised images (n, C, H, W): ||f(g x) - g f(x)|| / ||g f(x)||
    for g = a random permutation of the patches, and g = a cyclic shift of the image by one patch (a permutation too).
      ViT without position embeddings (the same weights, E_pos removed): attention is a function of a set,
        so both errors are rounding, and the class token is invariant;
      ViT with them: a token knows where it sits, so neither holds;
      CNN's first stage (two 3x3 convs): any shift commutes with it away from the zero-padded border, but a
        patch shuffle does not (new edges appear between the shuffled patches)."""
    # NOTE: float64 copies: on a GPU, float32 matrix products use TF32 (10-bit mantissa), whose rounding (~1e-3)
    # would hide the difference between an exact symmetry and an approximate one
    vit = copy.deepcopy(vit).double().eval()
    without = ViT(**{**vit.arch, "pos_embedding": False}).to(images.device).double().eval()
    without.load_state_dict({k: v for k, v in vit.state_dict().items() if k != "pos_embedding"})
    stage = copy.deepcopy(cnn.stages[0]).double().eval()
    x, P, N = images.double(), vit.patch_size, vit.num_patches
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).to(x.device)
    permute = lambda imgs: unpatchify(patchify(imgs, P)[:, perm], P, imgs.shape[1])
    shift = lambda imgs: imgs.roll(P, dims=-1)                                  # one patch right, wrapping around
    shift_tokens = lambda t: t.unflatten(1, (math.isqrt(N), -1)).roll(1, dims=2).flatten(1, 2)   # on the patch grid

    def token_errors(model):
        tokens = model.tokens(x)                                                # (n, T, E)
        moved, shifted = model.tokens(permute(x)), model.tokens(shift(x))
        return {"permute_patches": relative_error(moved[:, 1:], tokens[:, 1:][:, perm]),
                "shift_one_patch": relative_error(shifted[:, 1:], shift_tokens(tokens[:, 1:])),
                "class_token_after_permutation": relative_error(moved[:, 0], tokens[:, 0])}

    maps = stage(x)                                                             # (n, width, H, W)
    inside = slice(P + 2, x.shape[-1] - 2)             # columns no padding reaches: two 3x3 convs see 2 pixels out
    return {"vit_without_positions": token_errors(without), "vit": token_errors(vit),
            "cnn_first_stage": {"permute_patches": relative_error(stage(permute(x)), permute(maps)),
                                "shift_one_patch": relative_error(stage(shift(x))[..., inside], shift(maps)[..., inside])}}


# ---- 6. Figures ----

def plot_curves(histories, path):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "test_top1", 100)):
        for name, history in histories.items():
            ax.plot([r["epoch"] for r in history], [scale * r[key] for r in history], label=name)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set(xlabel="epoch (passes' worth of steps over the full training set)", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    common.save_figure(fig, path)


def plot_depth(probes, path):
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    layers = range(len(probes["class_token"]))
    ax.plot(layers, [100 * a for a in probes["class_token"]], "o-", label="class token")
    ax.plot(layers, [100 * a for a in probes["mean_patch_token"]], "s-", label="mean of patch tokens")
    ax.axhline(100 * probes["pixels"], color="gray", ls="--", label="raw pixels")
    ax.axhline(100 * probes["chance"], color="gray", ls=":", label="chance")
    ax.set(xlabel="after block (0 = embeddings)", ylabel="linear probe test top-1 (%)", xticks=list(layers),
           title="linear separability grows with depth")
    ax.grid(alpha=0.3)
    ax.legend()
    common.save_figure(fig, path)


def plot_heatmaps(images, heatmaps, path, row_titles=()):
    """images (n, C, H, W) in column 0, then a column per entry of heatmaps {title: (n, side, side)} over them."""
    n, size = len(images), images.shape[-1]
    fig, axes = plt.subplots(n, len(heatmaps) + 1, figsize=(1.6 * (len(heatmaps) + 1), 1.6 * n), squeeze=False)
    for i, image in enumerate(images):
        for ax, heat in zip(axes[i], [None, *heatmaps.values()]):
            ax.imshow(image.permute(1, 2, 0).cpu().numpy())
            ax.set_axis_off()
            if heat is not None:
                ax.imshow(heat[i].float().cpu().numpy(), cmap="inferno", alpha=0.65,
                          extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    for ax, title in [*zip(axes[0, 1:], heatmaps), *zip(axes[:, 0], row_titles)]:     # the columns', the rows'
        ax.set_title(title, fontsize=8)
    common.save_figure(fig, path)


@torch.no_grad()
def class_token_attention(vit, images, stats):
    """Where the class token looks, over the patch grid: in the last block per head (n, H, side, side), and rolled
    out over all blocks (n, side, side). The blocks' own layers weigh the tokens that enter them."""
    states, grid = vit.hidden_states(normalise(images, stats)), (math.isqrt(vit.num_patches),) * 2
    maps = [block.attn.weights(block.norm1(x)) for block, x in zip(vit.blocks, states)]     # L of (n, H, T, T)
    return maps[-1][:, :, 0, 1:].unflatten(-1, grid), attention_rollout(maps).unflatten(-1, grid)


def plot_attention(vit, images, stats, class_names, labels, path):
    heads, rolled = class_token_attention(vit, images, stats)
    plot_heatmaps(images, {**{f"last block, head {h + 1}": heads[:, h] for h in range(heads.shape[1])}, "rollout": rolled},
                  path, [class_names[int(y)] for y in labels])


def plot_positions(vit, path):
    """Cosine similarity of each patch's position embedding to every other's, on the patch grid (ViT's Fig. 7).
    Nothing tells the model that the patches lie on a 2-D grid: whatever structure appears here, it learned."""
    pos = F.normalize(vit.pos_embedding[0, 1:].detach().float(), dim=1)          # (N, E)
    side = math.isqrt(vit.num_patches)
    similarity = (pos @ pos.T).reshape(side, side, side, side)                   # (row, col) -> a side x side map
    mosaic = F.pad(similarity, (0, 1, 0, 1), value=float("nan"))                 # a gap between the small maps
    mosaic = mosaic.permute(0, 2, 1, 3).reshape(side * (side + 1), side * (side + 1)).cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 4.4))
    shown = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1)
    ax.set_axis_off()
    ax.set_title("position embeddings: cosine similarity,\none small map per patch position", fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    common.save_figure(fig, path)


@torch.no_grad()
def plot_reconstruction(mae, images, stats, mask_ratio, path):
    """MAE's Fig. 2 in small: each test image with its hidden patches grey, the reconstruction (visible patches
    pasted back, the hidden ones predicted, in each true patch's mean and contrast since the loss is in normalised
    pixels), and the original."""
    mae.eval()
    mean, std = stats
    x = normalise(images, stats)                                                 # (n, C, H, W)
    P, C = mae.encoder.patch_size, images.shape[1]
    keep, restore, mask = random_masking(len(x), mae.encoder.num_patches, mask_ratio, x.device)
    with common.autocast(x.device):
        prediction = mae(x, keep, restore).float()                               # (n, N, C*P*P)
    patches = patchify(x, P)
    prediction = prediction * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
    hidden = mask[:, :, None].bool()                                             # (n, N, 1)
    to_pixels = lambda p: (unpatchify(p, P, C) * std + mean).clamp(0, 1)
    autoencoder.image_rows([("masked input", to_pixels(patches.masked_fill(hidden, 0.0))),        # 0 = the mean colour
                            ("reconstruction", to_pixels(torch.where(hidden, prediction, patches))),
                            ("original", common.to_float(images))], path)


# ---- 7. Main ----

def validate(cfg):
    """Every option checked before any work is done, so a mistake costs nothing."""
    common.check(cfg.dataset in ("shapes", *common.DATASETS, *UNLABELLED), f"unknown dataset {cfg.dataset!r}; choose "
                 f"shapes, {', '.join(common.DATASETS)}, or with --pretrain the images of {', '.join(UNLABELLED)}")
    common.check(cfg.pretrain or cfg.dataset not in UNLABELLED, f"--dataset {cfg.dataset} has images but no labels: "
                                                                "pre-train a ViT on them with --pretrain mae|dino|simclr")
    for name in ("image_size", "patch_size", "dim", "heads", "depth", "mlp_ratio", "epochs", "batch_size",
                 "probe_samples", "probe_steps", "decoder_dim", "decoder_depth", "dino_dim"):
        common.check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    common.check(cfg.pretrain_epochs >= 0 and cfg.local_crops >= 0, "--pretrain-epochs and --local-crops must be >= 0")
    with torch.device("meta"):                 # no memory, no time: the constructor checks patch and head sizes
        vit = build_model("vit", cfg, num_classes=1)
    common.check(cfg.model == "vit" or cfg.dim % 2 == 0, f"the CNN's widths are dim/2, dim, 2*dim: dim must be even, got {cfg.dim}")
    common.check(min(cfg.n_train, cfg.n_test, cfg.val_split) >= 0, "--n-train, --n-test and --val-split must be >= 0")
    rules = [*[(n, getattr(cfg, n) > 0, "be > 0,") for n in ("lr", "temperature", "student_temp", "teacher_temp")],
             *[(n, 0 <= getattr(cfg, n) < 1, "be in [0, 1),") for n in ("warmup", "label_smoothing", "crop")],
             *[(n, 0 <= getattr(cfg, n) <= 1, "be in [0, 1],") for n in ("ema", "center_momentum")],
             ("train_fraction", 0 < cfg.train_fraction <= 1, "be in (0, 1],"),
             ("mask_ratio", 0 < cfg.mask_ratio < 1, "be in (0, 1) (the share of patches hidden),"),
             ("pretrain_lr", cfg.pretrain_lr >= 0, "be > 0, or 0 for --lr;"),
             ("weight_decay", cfg.weight_decay >= 0, "not be negative,"),
             ("clip_grad", cfg.clip_grad >= 0, "be a gradient norm > 0, or 0 for no clipping;")]
    for name, holds, rule in rules:        # first finite (NaN and inf get a message of their own), then in range
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        common.check(math.isfinite(value), f"{flag} must be a finite number, got {value}")
        common.check(holds, f"{flag} must {rule} got {value}")
    common.check(round(vit.num_patches * (1 - cfg.mask_ratio)) >= 1,
                 f"--mask-ratio {cfg.mask_ratio} leaves no visible patch of the {vit.num_patches}: lower it")
    common.check(not cfg.local_crops or local_crop_side(cfg) >= 2 * cfg.patch_size,
                 f"--local-crops: {cfg.image_size}-pixel images are too small for local crops of half the side in "
                 f"{cfg.patch_size}-pixel patches (at least 2 patches a side); use larger images or smaller patches")
    if cfg.pretrain == "dino" and not cfg.no_sharpening and cfg.teacher_temp >= cfg.student_temp:
        print(f"warning: --teacher-temp {cfg.teacher_temp} >= --student-temp {cfg.student_temp} cannot sharpen the "
              "teacher's output (--no-sharpening is the way to ask for that)")
    common.check(not cfg.pretrain or cfg.model == "vit", f"--pretrain {cfg.pretrain} pre-trains the ViT; drop --model cnn")
    common.check(not cfg.init or (cfg.model == "vit" and not cfg.pretrain), "--init starts a ViT without --pretrain")
    if cfg.init:
        common.check_file(cfg.init, "checkpoint")


def pretrain_encoder(cfg, data, stats, device, out):
    """A fresh ViT pre-trained by --pretrain on the training images (labels unused), saved as vit_<method>.pt (kind
    'vit': what 04 --init and 05 --init-image load). Returns (encoder, its random start, the report for metrics)."""
    encoder = build_model("vit", cfg, num_classes=0).to(device)
    random_encoder = copy.deepcopy(encoder)
    history, helper = PRETRAINERS[cfg.pretrain](encoder, data, stats, cfg, device)
    report = {"method": cfg.pretrain, "epochs": history[-1]["epoch"], "loss": [r["loss"] for r in history],
              "seconds": history[-1]["seconds"], "checkpoint": f"vit_{cfg.pretrain}.pt"}     # in the run's folder
    if cfg.pretrain == "dino":             # the collapse checks, against ln K (the uniform output's entropy)
        report.update(ln_K=math.log(cfg.dino_dim), **{k: [r[k] for r in history] for k in history[0] if "entropy" in k})
    if common.is_main():
        common.save_checkpoint(out / f"vit_{cfg.pretrain}.pt", encoder, cfg, kind="vit", arch=encoder.arch)
        if cfg.pretrain == "mae":
            plot_reconstruction(helper, data.x_test[:8], stats, cfg.mask_ratio, out / "reconstruction.png")
    return encoder, random_encoder, report


def train_and_examine(cfg, data, stats, device, out, metrics, compared):
    """With labels: --model trained (from --init or the pre-trained ViT) and examined into metrics, checkpoint and
    figures. compared {name: ViT}, the pre-trained one and its random start, are probed; a ViT from scratch joins."""
    classes, histories = len(data.classes), {}
    pool = subset(len(data.x_train), cfg.train_fraction, cfg.seed, device)        # the labels this run may use
    model = build_model(cfg.model, cfg, classes).to(device)
    metrics.update(parameters=sum(p.numel() for p in model.parameters()), labelled_images=len(pool), epochs=cfg.epochs,
                   compile=uses_compile(cfg, device, cfg.model == "vit"))
    if common.is_main():
        print(f"{cfg.model}: {metrics['parameters'] / 1e6:.2f}M parameters; {len(pool)} labelled of {len(data.x_train)} "
              f"training images, {len(data.x_test)} test images")
    if cfg.init:
        encoder = build_model("vit", cfg, num_classes=0).to(device)
        common.load_checkpoint(cfg.init, encoder, kind="vit", device=device)
    if cfg.pretrain:                       # the frozen encoder against its random start and raw pixels, then scratch
        encoder, random_encoder = compared.values()
        metrics["pretrain"].update({name: probe_features(e, data, stats, pool, cfg, knn) for name, e, knn in [
            ("probe_top1", encoder, False), ("random_encoder_probe_top1", random_encoder, False),
            ("knn_top1", encoder, True), ("pixels_knn_top1", None, True)]})
        scratch = build_model("vit", cfg, classes).to(device)
        histories["ViT from scratch"] = train_classifier(scratch, data, stats, pool, cfg, device, "ViT from scratch")
        metrics["pretrain"]["scratch_test_top1"] = histories["ViT from scratch"][-1]["test_top1"]
        compared["supervised ViT"] = scratch
    if cfg.init or cfg.pretrain:
        model.load_state_dict({**model.state_dict(), **encoder.state_dict()})      # the head stays freshly initialised
    name = {"vit": "ViT", "cnn": "CNN"}[cfg.model] + (f" fine-tuned from {cfg.pretrain.upper()}" if cfg.pretrain else "")
    histories[name] = history = train_classifier(model, data, stats, pool, cfg, device, name)
    metrics.update(test_accuracy(model, data, stats), train_seconds=history[-1]["seconds"],
                   train_images_per_second=history[-1]["images"] / history[-1]["seconds"], history=history)
    if cfg.pretrain:
        metrics["pretrain"]["finetune_test_top1"] = metrics["top1"]

    vit, cnn = (model if kind == cfg.model else build_model(kind, cfg, classes).to(device) for kind in ("vit", "cnn"))
    metrics["equivariance"] = equivariance(vit, cnn, normalise(data.x_test[:64], stats), cfg.seed)
    if cfg.model == "vit":
        metrics["depth_probe"] = depth_probes(model, data, stats, pool, cfg)
    if common.is_main():                 # model is the plain module, never DDP's wrapper: its checkpoint loads anywhere
        common.save_checkpoint(out / f"{cfg.model}.pt", model, cfg, kind=f"{cfg.model}-classifier")
        plot_curves(histories, out / "curves.png")
        if cfg.model == "vit":
            plot_depth(metrics["depth_probe"], out / "depth.png")
            plot_attention(model, data.x_test[:6], stats, data.classes, data.y_test[:6], out / "attention.png")
            plot_positions(model, out / "positions.png")
    return model


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    validate(cfg)
    device, out = common.setup(cfg, __file__)
    common.cpu_notice(cfg, device, cfg.epochs * (cfg.n_train or 50_000) / 250)
    common.check(cfg.pretrain != "simclr" or common.world_size() == 1,
                 "--pretrain simclr runs in one process; for SimCLR on several GPUs use torchrun 03_contrastive.py")
    wall = common.Stopwatch(device)
    data = load_data(cfg, device)
    processes = common.world_size()
    # the full training set bounds the batch (as in 01, 03 and 05); the labelled share of --train-fraction may be
    # smaller, and fit then takes all of it in each step (fewer labels, the same steps)
    common.check(cfg.batch_size <= len(data.x_train) // processes,
                 f"--batch-size {cfg.batch_size} is larger than the {len(data.x_train) // processes} training images"
                 + (f" of each of the {processes} processes (the batch is per process)" if processes > 1 else "")
                 + ": use a smaller batch")
    stats, model, compared = channel_stats(data.x_train), None, {}
    metrics = {"dataset": cfg.dataset, "model": cfg.model, "processes": processes}
    if cfg.pretrain:
        model, random_encoder, metrics["pretrain"] = pretrain_encoder(cfg, data, stats, device, out)
        compared = {f"{cfg.pretrain.upper()} ViT": model, "random ViT": random_encoder}
    if data.y_train is not None:           # without labels the pre-trained ViT is the run's model
        model = train_and_examine(cfg, data, stats, device, out, metrics, compared)
    if common.is_main() and compared:      # DINO's Fig. 1 in small: the last block's class token, mean over heads
        plot_heatmaps(data.x_test[:6], {name: class_token_attention(vit, data.x_test[:6], stats)[0].mean(1)
                                        for name, vit in compared.items()}, out / "attention_compare.png")
    metrics["wall_seconds"] = wall.seconds()
    if common.is_main():
        common.save_json(out / "metrics.json", metrics)
    out = common.finish_run(out)
    if common.is_main():
        if data.y_train is None:
            print(f"{cfg.dataset} has no labels, so the labelled evaluation (probes, fine-tuning, training from "
                  f"scratch) is skipped; the pre-trained encoder is {out / metrics['pretrain']['checkpoint']}")
        print(summary(cfg, metrics))
    return model, metrics


def summary(cfg, metrics):
    if "top1" not in metrics:
        parts = [f"04_vit: a ViT pre-trained on {cfg.dataset}'s images, no labels"]
    else:
        parts = [f"04_vit: {cfg.model} ({metrics['parameters'] / 1e6:.2f}M) on {cfg.dataset}, {metrics['labelled_images']} "
                 f"labels: test top-1 {metrics['top1']:.3f} after {cfg.epochs} epochs ({metrics['train_seconds']:.1f} s "
                 f"training, {metrics['train_images_per_second'] / 1e3:.1f}k img/s{', compiled' if metrics['compile'] else ''})"]
        if "depth_probe" in metrics:
            probe = metrics["depth_probe"]
            parts.append(f"class-token probe by block {' '.join(f'{a:.2f}' for a in probe['class_token'])} "
                         f"(pixels {probe['pixels']:.2f})")
        eq = metrics["equivariance"]
        parts.append(f"patch-permutation error {eq['vit_without_positions']['permute_patches']:.0e} without positions, "
                     f"{eq['vit']['permute_patches']:.2f} with; CNN shift error {eq['cnn_first_stage']['shift_one_patch']:.0e}")
    if "pretrain" in metrics:
        p = metrics["pretrain"]
        parts.append(f"{p['method']} pre-training loss {p['loss'][0]:.3f} -> {p['loss'][-1]:.3f} in {p['seconds']:.0f} s")
        if "ln_K" in p:
            parts.append(f"teacher entropy of the mean {p['teacher_entropy_of_mean'][-1]:.2f}, per image "
                         f"{p['teacher_mean_entropy'][-1]:.2f} (ln K {p['ln_K']:.2f})")
        if "probe_top1" in p:
            parts.append(f"probe {p['probe_top1']:.3f} (random encoder {p['random_encoder_probe_top1']:.3f}), kNN "
                         f"{p['knn_top1']:.3f} (pixels {p['pixels_knn_top1']:.3f}), fine-tuned {p['finetune_test_top1']:.3f} "
                         f"vs scratch {p['scratch_test_top1']:.3f}")
    return "; ".join(parts) + f"; {metrics['wall_seconds']:.0f} s"


if __name__ == "__main__":
    common.run(main)
