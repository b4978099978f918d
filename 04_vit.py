"""A Vision Transformer from matrix products: patches as tokens, self-attention, and what depth buys.

(work in progress: the model section below is final, other scripts may import it; the rest is being written)

Shapes legend: B batch, C channels, P patch size, N patches, T tokens (1 + N), E embedding width,
H heads, D head size (E / H).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ---- 2. Model: a Vision Transformer, built up from its smallest parts ----
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


def unpatchify(patches, patch_size, channels):
    """The inverse of patchify: (B, N, C*P*P) -> (B, C, H, W) for a square image."""
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
        mean = x.mean(-1, keepdim=True)                         # (..., 1)
        variance = (x - mean).square().mean(-1, keepdim=True)   # (..., 1) biased, as F.layer_norm
        return (x - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias


def attention_weights(q, k, mask=None):
    """softmax(Q K^T / sqrt(D)) of Vaswani et al. 2017, Eq. 1: row t says how much token t reads from each token.
    q, k (B, H, T, D); mask bool, broadcastable to (B, H, T, T), True where a token may attend."""
    # dividing by sqrt(D) keeps the scores' variance near 1 whatever the head size, so the softmax
    # starts out soft instead of picking one token (a dot product of D unit-variance terms has variance D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B,H,T,D) @ (B,H,D,T) -> (B,H,T,T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))       # exp(-inf) = 0: no weight at all
    return scores.softmax(dim=-1)                              # (B, H, T, T), each row sums to 1


def attention(q, k, v, mask=None):
    """Scaled dot-product attention, Eq. 1 of Vaswani et al.: each token's output is a weighted mean of the values.
    q, k, v (B, H, T, D) -> (B, H, T, D). The only attention the models here run; the test checks it
    against F.scaled_dot_product_attention, and torch.compile fuses it for speed."""
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

    def _split_heads(self, x):                                 # (B, T, E) -> (B, H, T, D)
        B, T, E = x.shape
        return x.reshape(B, T, self.heads, E // self.heads).transpose(1, 2)

    def _queries_keys_values(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)                 # (B, T, 3E) -> 3 x (B, T, E)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)   # 3 x (B, H, T, D)

    def forward(self, x, mask=None):                           # (B, T, E) -> (B, T, E)
        B, T, E = x.shape
        q, k, v = self._queries_keys_values(x)
        out = attention(q, k, v, mask)                         # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, E)             # merge heads: (B, T, H, D) -> (B, T, E)
        return self.proj(out)

    def weights(self, x, mask=None):
        """The attention weights this layer would use on x, (B, H, T, T), for the figures."""
        q, k, _ = self._queries_keys_values(x)
        return attention_weights(q, k, mask)


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

    def forward(self, x, mask=None):                           # (B, T, E) -> (B, T, E)
        x = x + self.attn(self.norm1(x), mask)                 # tokens exchange information (Eq. 2)
        return x + self.mlp(self.norm2(x))                     # each token thinks on its own (Eq. 3)


class ViT(nn.Module):
    """Image (B, C, H, W), normalised floats -> logits (B, num_classes), or the features (B, E) when
    num_classes=0. With pos_embedding=False the patches form an unordered set: the model is then
    equivariant to permuting them, and the class token's output invariant."""

    def __init__(self, image_size=32, patch_size=4, in_channels=3, dim=192, depth=6, heads=3, mlp_ratio=4,
                 num_classes=0, pos_embedding=True):
        super().__init__()
        common.check(image_size % patch_size == 0,
                     f"the image size {image_size} is not divisible by the patch size {patch_size}")
        common.check(dim % heads == 0, f"the embedding width {dim} is not divisible by the number of heads {heads}")
        # the constructor's arguments, saved beside checkpoints so that ViT(**arch) rebuilds this model
        self.arch = dict(image_size=image_size, patch_size=patch_size, in_channels=in_channels, dim=dim, depth=depth,
                         heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes, pos_embedding=pos_embedding)
        self.dim, self.patch_size, self.in_channels = dim, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)   # E of Eq. 1, shared by every patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))            # x_class: a token with no pixels of its own
        # E_pos: one learned vector per position; without it attention cannot tell where a patch came from
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

    def embed(self, images):                                   # (B, C, H, W) -> (B, T, E): Eq. 1
        patches = patchify(images, self.patch_size)            # (B, N, C*P*P)
        tokens = self.patch_embed(patches)                     # (B, N, E)
        cls = self.cls_token.expand(len(images), -1, -1)       # (B, 1, E)
        tokens = torch.cat([cls, tokens], dim=1)               # (B, T, E), T = 1 + N
        if self.pos_embedding is not None:
            tokens = tokens + self.pos_embedding               # (B, T, E) + (1, T, E)
        return tokens

    def hidden_states(self, images):
        """The tokens after the embedding and after every block: depth + 1 tensors of (B, T, E)."""
        states = [self.embed(images)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def tokens(self, images):                                  # (B, C, H, W) -> (B, T, E), final-normed
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, images):                                # (B, C, H, W) -> (B, E): Eq. 4
        return self.tokens(images)[:, 0]

    def forward(self, images):                                 # (B, C, H, W) -> (B, num_classes) or (B, E)
        features = self.features(images)
        return self.head(features) if self.head is not None else features


class ConvNet(nn.Module):
    """The inductive-bias baseline: three stages of two 3x3 conv-BatchNorm-GELU layers, each stage ending in
    a 2x2 max-pool, then a global average pool. Weight sharing over positions makes every conv layer
    translation-equivariant, and small kernels make it local: two priors a ViT must learn from data.
    width=96 gives about as many parameters as the default ViT (dim 192, depth 6)."""

    def __init__(self, in_channels=3, width=96, num_classes=0):
        super().__init__()
        self.dim = 4 * width

        def stage(c_in, c_out):
            layers = []
            for c in (c_in, c_out):
                layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            return nn.Sequential(*layers)

        self.stages = nn.ModuleList([stage(in_channels, width), stage(width, 2 * width), stage(2 * width, 4 * width)])
        self.head = nn.Linear(self.dim, num_classes) if num_classes else None

    def feature_maps(self, images):                            # (B, C, H, W) -> (B, 4w, H/8, W/8)
        x = images
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)                      # halve the resolution after each stage
        return x

    def features(self, images):                                # (B, C, H, W) -> (B, 4w)
        return self.feature_maps(images).mean(dim=(2, 3))      # global average pool: position forgotten

    def forward(self, images):
        features = self.features(images)
        return self.head(features) if self.head is not None else features
