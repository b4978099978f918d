"""03 -- Contrastive learning (SimCLR): learn features by telling two views of an image apart from all others.

(work in progress: sections 1 (augmentations) and 3 (objective) are final; the rest of the lecture is being written)

Papers:
  Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual Representations"
  (SimCLR): Eq. 1 is the NT-Xent loss; Appendix A lists the augmentations.
"""
import math

import torch
import torch.nn.functional as F

import common

# Shape legend: B images in a batch, V = 2B views, C channels, H x W pixels, D feature size.


# ---- 1. Data: two random views of every image, made on the GPU as batched tensor ops ----
#
# Each augmentation takes a strength whose identity setting (0) returns its input untouched, and draws
# one set of random numbers per image, so the whole batch is transformed by a few kernels, not a loop.
# Random numbers come from `generator` (on its own device) when one is given, for reproducible views.

JITTER_PROBABILITY = 0.8            # SimCLR applies colour jitter to 80% of the views (Appendix A)
LUMA = (0.299, 0.587, 0.114)        # ITU-R 601 luminance weights, as PIL's convert("L") uses
BLUR_SIGMA = (0.1, 1.0)             # pixels; SimCLR's (0.1, 2.0) was for 224-pixel images, ours are ~32
BLUR_RADIUS = 3                     # taps either side: 7 taps cover +-3 sigma at the largest sigma
# RGB -> YIQ (NTSC): Y is luminance, (I, Q) a plane of chroma in which a hue shift is a rotation
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


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
    ratio = (bound * (2 * _uniform(B, 0, 1, generator, x.device) - 1)).exp()
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()                  # (B,) sides as shares of the image
    cx = (1 - w) * (2 * _uniform(B, 0, 1, generator, x.device) - 1)      # centre in [-1, 1] image coordinates,
    cy = (1 - h) * (2 * _uniform(B, 0, 1, generator, x.device) - 1)      # placed so the crop stays inside
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
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
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype)
    return torch.einsum("bchw,c->bhw", x, weights)[:, None]


def rotate_hue(x, angle):
    """Turn every pixel's chroma by angle (B,) radians in the YIQ plane: luminance is kept, hue shifts.
    NOTE: torchvision shifts hue in HSV space; a YIQ rotation is the linear-algebra cousin of it."""
    to_yiq = torch.tensor(RGB_TO_YIQ, device=x.device, dtype=x.dtype)
    cos, sin, one, zero = angle.cos(), angle.sin(), torch.ones_like(angle), torch.zeros_like(angle)
    rotation = torch.stack([torch.stack([one, zero, zero], 1),
                            torch.stack([zero, cos, -sin], 1),
                            torch.stack([zero, sin, cos], 1)], 1)               # (B, 3, 3) about the Y axis
    colour_map = torch.linalg.inv(to_yiq) @ rotation @ to_yiq                   # (B, 3, 3) RGB -> RGB
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


def augment(x, crop=0.6, flip=0.5, jitter=0.5, grayscale=0.2, blur=0.5, generator=None):
    """One random view of each image, SimCLR's chain in SimCLR's order (Appendix A).
    x: float (B, C, H, W) in [0, 1], on any device -> a view of the same shape, in [0, 1].
      crop       share of the area a crop may cut away: it keeps [1 - crop, 1] of it   (0 = no crop, < 1)
      flip       probability of a left-right mirror                                    (0 = never)
      jitter     colour-distortion strength s, applied to 80% of images               (0 = none; SimCLR's CIFAR-10 s = 0.5)
      grayscale  probability of dropping colour                                        (0 = never)
      blur       probability of a Gaussian blur, sigma in BLUR_SIGMA pixels            (0 = never)
    Defaults: SimCLR's CIFAR-10 recipe, with a gentler crop (area >= 0.4, not 0.08) so that the small shapes
    of the embedded set survive it, and blur on half the views. Every strength at 0 returns x itself."""
    common.check(0 <= crop < 1, f"crop must be in [0, 1) (the share of the area a crop may remove), got {crop}")
    common.check(jitter >= 0, f"jitter strength must be >= 0, got {jitter}")
    for name, p in (("flip", flip), ("grayscale", grayscale), ("blur", blur)):
        common.check(0 <= p <= 1, f"{name} is a probability and must be in [0, 1], got {p}")
    if crop > 0:
        x = random_resized_crop(x, crop, generator)
    if flip > 0:
        x = random_flip(x, flip, generator)
    if jitter > 0:
        x = colour_jitter(x, jitter, generator)
    if grayscale > 0:
        x = random_grayscale(x, grayscale, generator)
    if blur > 0:
        x = random_blur(x, blur, generator)
    return x


# ---- 3. Objective: NT-Xent, the normalised temperature-scaled cross-entropy ----

def nt_xent(z1, z2, temperature):
    """SimCLR's loss (Eq. 1) over the 2B views of a batch. z1, z2 (B, D): projections of the two views
    of the same B images (normalised here). Each view is an anchor whose positive is its partner view
    and whose 2B - 2 negatives are all other views; the loss is the softmax cross-entropy of picking
    the positive, averaged over all 2B anchors. Returns a scalar."""
    B = z1.shape[0]
    common.check(B >= 2, f"NT-Xent needs at least 2 images per batch (1 has no negatives), got {B}")
    common.check(temperature > 0, f"temperature must be > 0, got {temperature}")
    # NOTE: float32 (or float64) even under autocast: bf16 keeps 8 bits of mantissa, too coarse for logits of size 1/tau
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.cat([z1, z2])
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # (V, D) unit vectors, V = 2B
        logits = z @ z.T / temperature                                          # (V, D) @ (D, V) -> (V, V): cos / tau
        self_pair = torch.eye(2 * B, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_pair, float("-inf"))                   # the sum in Eq. 1 skips k = i
        partner = (torch.arange(2 * B, device=z.device) + B) % (2 * B)          # view i's positive sits at i + B (mod 2B)
        positive = logits[torch.arange(2 * B, device=z.device), partner]        # (V,)
        # -log softmax at the positive = log sum_k exp(s_ik / tau) - s_i,partner / tau
        return (torch.logsumexp(logits, dim=1) - positive).mean()
