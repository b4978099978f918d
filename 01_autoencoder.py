"""01 -- Autoencoders: a representation is what survives a bottleneck.

An autoencoder squeezes each image x through a code z of a few numbers and asks a decoder to rebuild x from z
alone, so the code must keep what explains the image and drop the rest ("compact and explanatory"). This
script writes four of them from tensor operations, shares one interface between them (--model), and asks
what the code is worth:
  - ae:  the bottleneck autoencoder, trained on squared error;
  - dae: the denoising autoencoder, which sees a corrupted image (Gaussian noise and masked pixels) and must
         rebuild the clean one, so it has to learn what images look like rather than copy pixels;
  - vae: the variational autoencoder, whose encoder gives a Gaussian over codes; trained on the ELBO with a
         closed-form KL to N(0, I) (--beta > 1 is the beta-VAE), so codes drawn from N(0, I) decode to images;
  - sae: the sparse autoencoder, a wide code (--latent-dim 1024) with few units on per image (--sparsity topk or
         l1) and a dictionary of atoms as its decoder; --features fits it to another network's frozen features.
Every run also trains a *linear* autoencoder and computes PCA with the same width (for sae: as many numbers as
are on per image, and a dense autoencoder too): with no nonlinearity and squared error the two reach the same
error (Baldi and Hornik), and the model is measured against both. Then the frozen code is probed (evaluation.py):
linear and kNN classifiers on the code, against the same on PCA's code and on raw pixels; on the embedded set,
also how linearly the code gives colour, size and position, and the MIG of the code against the set's factors.

Papers:
  Baldi, Hornik 1989, "Neural networks and principal component analysis: learning from examples without local
      minima": a linear autoencoder's squared error has PCA's subspace as its only minimum; the rest are saddles.
  Hinton, Salakhutdinov 2006, "Reducing the Dimensionality of Data with Neural Networks": deep autoencoders beat PCA.
  Vincent et al. 2008, "Extracting and Composing Robust Features with Denoising Autoencoders" (masking noise),
      and Vincent et al. 2010, JMLR (Gaussian noise).
  Kingma, Welling 2014, "Auto-Encoding Variational Bayes": Eq. 3 the ELBO, Sec. 2.4 the reparameterisation
      trick, Eq. 10 the estimator with the Gaussian KL in closed form (Appendix B), Appendix C the decoders.
  Higgins et al. 2017, "beta-VAE": Eq. 4, the KL term weighted by beta.
  Burda, Grosse, Salakhutdinov 2016, "Importance Weighted Autoencoders": active units, Var_x(E_q[z_j]) > 0.01.
  Olshausen, Field 1996, "Emergence of simple-cell receptive field properties by learning a sparse code";
      Makhzani, Frey 2014, "k-Sparse Autoencoders"; Gao et al. 2024, "Scaling and evaluating sparse autoencoders".
  Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs": the mutual information gap (MIG);
      Locatello et al. 2019, "Challenging Common Assumptions in the Unsupervised Learning of Disentangled Representations".

Run:  python 01_autoencoder.py                   (the embedded shapes set, --model ae)
      python 01_autoencoder.py --model vae --beta 4    --dataset fashion-mnist
      python 01_autoencoder.py --model sae --latent-dim 1024 --k 32 --dataset fashion-mnist
Measured on one H200 (torch 2.11, bf16 autocast), seed 0; every measurement with its command is in RESULTS.md:
  default run (shapes, ae, L=32): 32 s for the whole process; test squared error per pixel 0.00787 against
      PCA-32's 0.00855 (-7.9%); the linear autoencoder ends 1.1% above PCA; the mean image 0.0208.
  --model sae --latent-dim 1024 --k 32 --dataset fashion-mnist: 0.00647 with 32 of 1024 units on, against the dense
      AE's 0.00887 with 32 numbers (same run) and PCA-32's 0.01514; 2.5% dead units; probe top-1 87.2%; 31 s.

Shapes legend: B batch, C channels, H x W image, P pixels (C*H*W), L latent (code) width, N images, K classes.
"""
import math
import zipfile
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluation


@dataclass
class Config(common.RunConfig):
    model: str = common.arg("ae", "ae (bottleneck) | dae (denoising) | vae (variational) | sae (sparse)",
                            choices=["ae", "dae", "vae", "sae"])
    latent_dim: int = common.arg(0, "L: width of the code, and PCA's number of components; 0 means 32, or an "
                                    "overcomplete 1024 for sae")
    hidden: int = common.arg(512, "width of the encoder's first hidden layer; the second has half; the decoder mirrors them")
    epochs: int = common.arg(20, "passes over the training images, for the model and for the linear autoencoder")
    batch_size: int = common.arg(512, "images per step")
    lr: float = common.arg(3e-3, "peak learning rate of Adam, reached after the warm-up; then a cosine decay to 0")
    warmup: float = common.arg(0.05, "share of the training steps in the linear warm-up of the learning rate, in [0, 1)")
    noise_std: float = common.arg(0.2, "dae: std of the Gaussian noise added to every pixel (pixels in [0, 1])")
    mask_prob: float = common.arg(0.25, "dae: share of pixel positions set to 0, in [0, 1)")
    beta: float = common.arg(1.0, "vae: weight of the KL term; 1 is the ELBO, > 1 the beta-VAE")
    likelihood: str = common.arg("bernoulli", "vae: the decoder's distribution over pixels: bernoulli | gaussian",
                                 choices=["bernoulli", "gaussian"])
    decoder_std: float = common.arg(0.1, "vae --likelihood gaussian: the fixed std sigma of each pixel (smaller weighs "
                                         "reconstruction more against the KL)")
    sparsity: str = common.arg("", "sae: topk (keep the --k largest units per image) | l1 (an --l1 penalty on ReLU "
                                   "units); empty means topk for sae", choices=["", "topk", "l1"])
    k: int = common.arg(32, "sae --sparsity topk: units kept per image, 1 to --latent-dim - 1 (e.g. 32 of 1024)")
    l1: float = common.arg(1.0, "sae --sparsity l1: weight of ||z||_1 against the squared error per image, >= 0")
    features: str = common.arg("", "sae: an .npz of frozen features (arrays features (N, D) float32, images (N, C, H, W) "
                                   "uint8, labels (N,) optional) to fit instead of --dataset's images")
    train_size: int = common.arg(0, "training images to load (0 = all of the dataset's)")
    test_size: int = common.arg(0, "test images to load (0 = all of the dataset's)")
    probe_steps: int = common.arg(1000, "Adam steps of each linear probe (at least)")


QUICK = dict(train_size=1000, test_size=500, hidden=128, epochs=15, batch_size=50, lr=1e-2, probe_steps=100)


# ---- 1. The bottleneck autoencoder: an encoder and a decoder around a code z (B, L) ----

def mlp(sizes):
    """Linear layers of the given widths with a GELU between each pair. Two sizes give one linear map and no
    nonlinearity at all: that is the linear autoencoder that main() compares with PCA."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(nn.GELU())     # EXERCISE: try nn.ReLU or nn.Tanh, and watch the error against PCA's
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def squared_error(x_hat, x):
    """||x_hat - x||^2 summed over pixels, (B,)."""
    return (x_hat - x).square().flatten(1).sum(1)


# EXERCISE: a convolutional autoencoder: nn.Conv2d with stride 2 down to a (B, L) code, nn.ConvTranspose2d back
# up; give it the same four methods and add it to build_model. How far below PCA does it get?
class Autoencoder(nn.Module):
    """The bottleneck autoencoder (Hinton and Salakhutdinov 2006): z = f(x) (B, L), x_hat = g(z) (B, C, H, W),
    trained to make x_hat close to x in squared error. hidden=() makes f and g linear maps.

    Every variant keeps this interface: encode(x) -> the code used as the representation, decode(z) -> an
    image, reconstruct(x), and objective(x) -> (scalar loss, dict of its parts for the training curve)."""
    codes_per_latent = 1            # the VAE's encoder gives two numbers (mean, log-variance) per code coordinate

    def __init__(self, image_shape, latent_dim, hidden=(512, 256)):
        super().__init__()
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        pixels = math.prod(image_shape)
        self.encoder = mlp([pixels, *hidden, latent_dim * self.codes_per_latent])
        self.decoder = mlp([latent_dim, *reversed(hidden), pixels])
        # NOTE: the encoder sees x minus the training set's mean image, as PCA does. The biases could learn the
        # shift, but then the mean image dominates every input and the linear autoencoder's descent onto PCA
        # slows many times over. Set it with set_mean_image before training.
        self.register_buffer("mean_image", torch.zeros(self.image_shape))

    @torch.no_grad()
    def set_mean_image(self, images):
        self.mean_image.copy_(sum(common.to_float(chunk).sum(0) for chunk in images.split(4096)) / len(images))
        return self

    def centred(self, x):
        return (x - self.mean_image).flatten(1)                          # (B, C, H, W) -> (B, P)

    def encode(self, x):
        return self.encoder(self.centred(x))                             # (B, P) -> (B, L)

    def decode(self, z):
        return self.decoder(z).view(-1, *self.image_shape)              # (B, L) -> (B, P) -> (B, C, H, W)

    def reconstruct(self, x):
        return self.decode(self.encode(x))

    def objective(self, x):
        # under bf16 autocast the decoder's output is bf16: the loss is taken in the input's precision
        per_pixel = squared_error(self.reconstruct(x).to(x.dtype), x).mean() / x[0].numel()
        return per_pixel, {"squared error per pixel": per_pixel}


# ---- 2. The denoising autoencoder: rebuild the clean image from a corrupted one ----

def corrupt(x, noise_std, mask_prob):
    """The denoising autoencoder's input: Gaussian noise on every pixel, then a random share mask_prob of the
    pixel positions set to 0 in all channels (Vincent et al. 2008's masking noise). x (B, C, H, W)."""
    noisy = x + noise_std * torch.randn_like(x)                          # (B, C, H, W)
    # EXERCISE: add salt-and-pepper noise (random pixels set to 0 or 1), the third corruption of Vincent 2010
    keep = torch.rand_like(x[:, :1]) >= mask_prob                        # (B, 1, H, W): one draw per position
    return noisy * keep


class DenoisingAutoencoder(Autoencoder):
    """Vincent et al. 2008: encode a corrupted x_tilde, decode, and score against the clean x. The identity map
    no longer scores well, so even a wide code must learn what images look like to undo the damage."""

    def __init__(self, image_shape, latent_dim, hidden=(512, 256), noise_std=0.2, mask_prob=0.25):
        super().__init__(image_shape, latent_dim, hidden)
        self.noise_std, self.mask_prob = noise_std, mask_prob

    def objective(self, x):
        x_tilde = corrupt(x, self.noise_std, self.mask_prob)                # (B, C, H, W)
        per_pixel = squared_error(self.reconstruct(x_tilde).to(x.dtype), x).mean() / x[0].numel()
        return per_pixel, {"squared error per pixel": per_pixel}


# ---- 3. The variational autoencoder: the ELBO, its terms written out (tests: against torch.distributions) ----
# For any q(z | x), log p(x) >= E_q[log p(x | z)] - KL(q(z | x) || p(z)), the evidence lower bound (Eq. 3 of
# Kingma and Welling; the gap is KL(q(z | x) || p(z | x)), Eq. 1). The first term asks the decoder to rebuild x
# from a code drawn from q; the second keeps every posterior near the prior N(0, I), so that codes drawn from the
# prior decode to images. The VAE maximises the bound over the encoder q and the decoder p together.

def bernoulli_log_likelihood(x, logits):
    """log p(x | z) = sum_p x_p log s(l_p) + (1 - x_p) log(1 - s(l_p)), (B,). With log s(l) = -softplus(-l)
    and log(1 - s(l)) = -softplus(l) it never takes the log of a rounded 0. Grey x in (0, 1) is allowed (the
    'continuous Bernoulli' without its normaliser, as Kingma and Welling used it on greyscale images)."""
    return -(x * F.softplus(-logits) + (1 - x) * F.softplus(logits)).flatten(1).sum(1)


def gaussian_log_likelihood(x, mean, log_std):
    """log N(x; mean, sigma^2) summed over pixels, (B,): -((x - mean) / sigma)^2 / 2 - log sigma - log(2 pi) / 2
    per pixel. With sigma fixed this is squared error scaled by 1 / (2 sigma^2), plus a constant."""
    log_std = torch.as_tensor(log_std, dtype=x.dtype, device=x.device)
    per_pixel = -0.5 * ((x - mean) * torch.exp(-log_std)).square() - log_std - 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(1)


def reparameterise(mean, log_var, noise=None):
    """z = mean + sigma * eps with eps ~ N(0, I) (Kingma and Welling, Sec. 2.4): the sample is a differentiable
    function of mean and log_var, so gradients reach the encoder through it. (B, L) -> (B, L)."""
    noise = torch.randn_like(mean) if noise is None else noise
    return mean + torch.exp(0.5 * log_var) * noise


def kl_to_standard_normal(mean, log_var):
    """KL(N(mean, diag(sigma^2)) || N(0, I)) = 1/2 sum_j (mean_j^2 + sigma_j^2 - log sigma_j^2 - 1), (B,):
    the closed form of Kingma and Welling's Appendix B, the first term of their Eq. 10 with its sign flipped."""
    return 0.5 * (mean.square() + log_var.exp() - log_var - 1).sum(1)


class VariationalAutoencoder(Autoencoder):
    """Kingma and Welling 2014: the encoder gives q(z | x) = N(mean, diag(exp(log_var))), the decoder gives
    p(x | z) (Bernoulli logits, or Gaussian means of fixed std), and the prior is p(z) = N(0, I).
    The representation is the posterior mean; decode(z) is the mean image of p(x | z)."""
    codes_per_latent = 2

    def __init__(self, image_shape, latent_dim, hidden=(512, 256), beta=1.0, likelihood="bernoulli", decoder_std=0.1):
        super().__init__(image_shape, latent_dim, hidden)
        self.beta, self.likelihood, self.decoder_std = beta, likelihood, decoder_std

    def posterior(self, x):
        """The mean and log-variance of q(z | x), (B, L) each."""
        return self.encoder(self.centred(x)).chunk(2, dim=1)            # (B, 2L) -> (B, L), (B, L)

    def encode(self, x):
        return self.posterior(x)[0]

    def decoder_output(self, z):
        """The parameters of p(x | z): logits for Bernoulli, means for Gaussian; (B, C, H, W)."""
        return super().decode(z)

    def decode(self, z):
        out = self.decoder_output(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def log_likelihood(self, x, out):
        """log p(x | z) summed over pixels, (B,)."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, out)
        return gaussian_log_likelihood(x, out, math.log(self.decoder_std))

    def objective(self, x):
        # Eq. 10 of Kingma and Welling with one sample of z per image, and Eq. 4 of beta-VAE:
        # loss = -(E_q[log p(x | z)] - beta * KL(q(z | x) || N(0, I))), in nats per image
        mean, log_var = (t.to(x.dtype) for t in self.posterior(x))      # (B, L), (B, L)
        z = reparameterise(mean, log_var)                                # (B, L)
        # EXERCISE: anneal beta from 0 to its value over the first epochs (KL warm-up, Bowman et al. 2016) and
        # count the active units again: fewer coordinates collapse onto the prior
        reconstruction = self.log_likelihood(x, self.decoder_output(z).to(x.dtype))   # (B,)
        kl = kl_to_standard_normal(mean, log_var)                        # (B,)
        loss = (self.beta * kl - reconstruction).mean()
        return loss, {"-log p(x|z) per image": -reconstruction.mean(), "KL per image": kl.mean()}


# ---- 4. The sparse autoencoder: a wide code of which only a few units are on for any one image ----
# Instead of a narrow code, an overcomplete one (L = 1024 units for 784 pixels) kept sparse, decoded by one linear
# map: x_hat = mean + D z, D (P, L). Each column of D is an atom of a dictionary (a stroke, a part), and an image
# is the mean plus a few atoms (Olshausen and Field 1996's sparse coding, with an encoder that finds z in one pass).

def top_k(z, k):
    """Makhzani and Frey 2014, k-sparse autoencoders: keep the k largest entries of each row of z (B, L), zero the
    rest. The gradient reaches the kept units only: scatter passes it to the places it wrote, topk to those it chose."""
    values, indices = z.topk(k, dim=1)                                   # (B, k), (B, k)
    return torch.zeros_like(z).scatter(1, indices, values)


def unit_columns(weight):
    """The dictionary D (P, L): the decoder's weight with every column divided by its norm. With unit atoms an L1
    penalty cannot be dodged by shrinking z and growing the atoms to match; the gradient only turns the atoms."""
    return weight / weight.norm(dim=0, keepdim=True)


class SparseAutoencoder(Autoencoder):
    """One linear map each way, as in Makhzani and Frey: a wide code kept sparse in one of two ways, and a decoder
    of unit-norm atoms:
      topk: z = top_k(f(x), k), exactly k units on per image, trained on squared error alone;
      l1:   z = relu(f(x)), trained on the sparse-coding energy ||x - x_hat||^2 + l1 * ||z||_1 (Olshausen and
            Field's energy with an L1 cost), which turns most units off."""

    def __init__(self, image_shape, latent_dim, sparsity="topk", k=32, l1=1.0):
        super().__init__(image_shape, latent_dim, hidden=())
        self.decoder = nn.Linear(latent_dim, math.prod(image_shape), bias=False)   # weight (P, L): the atoms
        self.sparsity, self.k, self.l1 = sparsity, k, l1
        # NOTE: the encoder starts as the decoder's transpose, each unit matched to its atom (Gao et al. 2024).
        # From independent random starts, most units never win a top-k place and stay dead for good.
        with torch.no_grad():
            self.encoder[0].weight.copy_(self.dictionary().T)
            self.encoder[0].bias.zero_()

    def encode(self, x):
        pre = self.encoder(self.centred(x))                              # (B, P) -> (B, L)
        # EXERCISE: a third --sparsity: ReLU then top-k (Gao et al. 2024), or a k that shrinks during training
        return top_k(pre, self.k) if self.sparsity == "topk" else F.relu(pre)

    def dictionary(self):
        return unit_columns(self.decoder.weight)                         # (P, L)

    def decode(self, z):
        return F.linear(z, self.dictionary()).view(-1, *self.image_shape) + self.mean_image   # (B, L) @ (L, P)

    def objective(self, x):
        z = self.encode(x).to(x.dtype)                                   # (B, L)
        error = squared_error(self.decode(z).to(x.dtype), x)             # (B,)
        parts = {"squared error per pixel": error.mean() / x[0].numel()}
        if self.sparsity == "l1":
            parts["L1 term per pixel"] = self.l1 * z.abs().sum(1).mean() / x[0].numel()   # the code is >= 0
        return sum(parts.values()), parts


def build_model(cfg, image_shape):
    hidden = (cfg.hidden, cfg.hidden // 2)
    if cfg.model == "sae":
        return SparseAutoencoder(image_shape, cfg.latent_dim, cfg.sparsity, cfg.k, cfg.l1)
    if cfg.model == "dae":
        return DenoisingAutoencoder(image_shape, cfg.latent_dim, hidden, cfg.noise_std, cfg.mask_prob)
    if cfg.model == "vae":
        return VariationalAutoencoder(image_shape, cfg.latent_dim, hidden, cfg.beta, cfg.likelihood, cfg.decoder_std)
    return Autoencoder(image_shape, cfg.latent_dim, hidden)


# ---- 5. The linear baseline: PCA, the best code any linear encoder-decoder of width L can find ----

class PCA:
    """PCA as an autoencoder with the same interface: encode projects onto the k directions of largest variance,
    decode maps back. It is the best any linear encoder-decoder pair of width k can do in squared error."""

    def __init__(self, mean, components, image_shape):
        self.mean, self.components, self.image_shape = mean, components, tuple(image_shape)   # (P,), (k, P)

    def encode(self, x):
        return (x.flatten(1).float() - self.mean) @ self.components.T   # (B, P) @ (P, k) -> (B, k)

    def decode(self, z):
        return (z @ self.components + self.mean).view(-1, *self.image_shape)   # (B, k) @ (k, P) -> (B, P)

    def reconstruct(self, x):
        return self.decode(self.encode(x))


def pca(x, k):
    """PCA of x (N, ...) with k components, from the SVD of the centred data X - mean = U S V^T: the rows of
    V^T are the directions of largest variance, in order (S_i^2 / N is the variance along the i-th)."""
    flat = x.flatten(1).float()                                          # (N, P)
    mean = flat.mean(0)                                                  # (P,)
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)        # vh (min(N, P), P)
    return PCA(mean, vh[:k], x.shape[1:])


# ---- 6. Options and data: images stay on the device as uint8, become floats in [0, 1] one batch at a time ----

def validate(cfg):
    """Every option checked before any work is done, so a mistake costs nothing."""
    common.check_dataset(cfg.dataset)
    cfg.latent_dim = cfg.latent_dim or (1024 if cfg.model == "sae" else 32)   # resolved here, so config.json says which
    for name in ("latent_dim", "epochs", "batch_size", "probe_steps"):
        common.check(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    common.check(cfg.hidden >= 2, f"--hidden must be at least 2 (the second layer has half), got {cfg.hidden}")
    common.check(cfg.train_size >= 0 and cfg.test_size >= 0, "--train-size and --test-size must be >= 0 (0 = all)")
    # NOTE: float options are tested against inf too: --lr inf or --noise-std inf trains on NaN from the first step
    common.check(0 < cfg.lr < math.inf, f"--lr must be positive and finite, got {cfg.lr}")
    common.check(0 <= cfg.warmup < 1, f"--warmup is a share of the training steps, in [0, 1), got {cfg.warmup}")
    common.check(0 <= cfg.noise_std < math.inf, f"--noise-std must be finite and >= 0, got {cfg.noise_std}")
    common.check(0 <= cfg.mask_prob < 1, f"--mask-prob must be in [0, 1), got {cfg.mask_prob}")
    common.check(0 <= cfg.beta < math.inf, f"--beta must be finite and >= 0, got {cfg.beta}")
    common.check(0 < cfg.decoder_std < math.inf, f"--decoder-std must be positive and finite, got {cfg.decoder_std}")
    common.check(0 <= cfg.l1 < math.inf, f"--l1 must be finite and >= 0, got {cfg.l1}")
    common.check(cfg.model == "sae" or not cfg.sparsity, f"--sparsity is an option of --model sae, not {cfg.model}")
    common.check(cfg.model == "sae" or not cfg.features, f"--features fits the sparse autoencoder: add --model sae")
    if cfg.model == "sae":
        cfg.sparsity = cfg.sparsity or "topk"                            # resolved here, so config.json says which
        common.check(cfg.sparsity != "topk" or 0 < cfg.k < cfg.latent_dim,
                     f"--k must be between 1 and --latent-dim - 1 = {cfg.latent_dim - 1} (top-k keeps k of the code's "
                     f"units; an overcomplete code is e.g. --latent-dim 1024), got {cfg.k}")


def read_features(path):
    """The arrays of a --features file (03_contrastive.py --save-features writes one), checked before any work."""
    need = "an .npz of features (N, D) floats, images (N, C, H, W) uint8 and, optionally, labels (N,) integers"
    common.check_file(path, "--features")
    try:
        archive = np.load(path, allow_pickle=False)
        common.check(isinstance(archive, np.lib.npyio.NpzFile), f"--features {path} is one array, not {need}")
        with archive:
            arrays = {name: archive[name] for name in ("features", "images", "labels") if name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise common.UserError(f"--features {path} is not a readable .npz ({error}); it should be {need}") from None
    shapes = {name: f"{array.dtype} {array.shape}" for name, array in arrays.items()}
    wrong = f"--features {path} has {shapes or 'no arrays'}; it should be {need}"
    features, images, labels = arrays.get("features"), arrays.get("images"), arrays.get("labels")
    common.check(features is not None and features.ndim == 2 and features.dtype.kind == "f" and len(features) >= 10
                 and np.isfinite(features).all(), wrong + ", with N >= 10 rows of finite features")
    common.check(images is not None and images.ndim == 4 and images.dtype == np.uint8 and len(images) == len(features),
                 wrong)
    common.check(labels is None or (labels.shape == (len(features),) and labels.dtype.kind in "iu" and labels.min() >= 0),
                 wrong)
    return arrays


def load_data(cfg, device, arrays=None):
    """The chosen dataset at its own size and channels (a grayscale 28 x 28 set stays 784 pixels), or the arrays of
    a --features file split at random 4:1 into training and test rows, centred on the training rows' mean and scaled
    by one number to unit standard deviation. Returns the data and the test images to
    show (for features: the image each row was computed from)."""
    if arrays is None:
        data = common.load_images(cfg.dataset, cfg.data_dir, device, n_train=cfg.train_size or None,
                                  n_test=cfg.test_size or None, seed=cfg.seed)
        return data, data.x_test
    n = len(arrays["features"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    train, test = order[n // 5:], order[:n // 5]
    features = torch.from_numpy(arrays["features"]).float()
    # learned features come at any scale and offset, Adam's steps in one (and the decoders' biases start at 0)
    features = (features - features[train].mean(0)) / (features[train] - features[train].mean(0)).std()
    labels = torch.from_numpy(arrays["labels"]).long() if "labels" in arrays else torch.zeros(n, dtype=torch.long)
    classes = [f"class {c}" for c in range(int(labels.max()) + 1)] if "labels" in arrays else ["unlabelled"]
    data = common.ImageData("features", *(t.to(device) for t in (features[train], labels[train], features[test],
                                                                 labels[test])), classes)
    return data, torch.from_numpy(arrays["images"][test.numpy()]).to(device)


def validate_sizes(cfg, data):
    """The checks that need the data's sizes, made right after loading it."""
    n_train, pixels = len(data.x_train), math.prod(data.shape)
    common.check(cfg.batch_size <= n_train, f"--batch-size {cfg.batch_size} is larger than the {n_train} training images")
    width, name = (cfg.k, "--k") if cfg.model == "sae" else (cfg.latent_dim, "--latent-dim")   # PCA's width
    common.check(cfg.sparsity == "l1" or width <= min(n_train, pixels),
                 f"{name} {width} is larger than the data allows (PCA has at most "
                 f"min({n_train} images, {pixels} pixels) components)")


# ---- 7. Training: minibatches drawn on the device, bf16 autocast, one synchronisation per 100 steps (the bar) ----

def check_finite_loss(desc, loss, step, lr):
    """A non-finite loss means Adam's steps overshot: the weights are NaN now and every number after would be too."""
    common.check(math.isfinite(loss), f"training diverged ({desc}: the loss is {loss} at step {step}); "
                                      f"lower --lr (it is {lr:g})")


def train(model, images, epochs, batch_size, lr, device, warmup=0.05, desc="train"):
    """Adam on model.objective over shuffled minibatches of images (N, ...), uint8 or float, resident on device,
    at the peak learning rate lr after a linear warm-up over the share `warmup` of the steps, then a cosine to 0.
    Returns the history: the loss and its parts at every step (float tensors on the CPU), images and seconds."""
    steps_per_epoch = len(images) // batch_size          # a pass's remainder is dropped: every batch is full
    total = epochs * steps_per_epoch
    warmup_steps = round(warmup * total)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")
    scaler = common.grad_scaler(device)                  # fp16 GPUs only; with bf16 or float32 it does nothing
    records = []                                         # per step, on the device: reading them would synchronise
    bar = common.progress(total * batch_size, desc)
    clock = common.Stopwatch(device)
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), device=device)
        for i in range(steps_per_epoch):
            x = common.to_float(images[order[i * batch_size:(i + 1) * batch_size]])   # (B, C, H, W) in [0, 1]
            with common.autocast(device):
                loss, terms = model.objective(x)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            for group in optimizer.param_groups:
                group["lr"] = lr * common.warmup_cosine(step, total, warmup_steps)
            scaler.step(optimizer)
            scaler.update()
            records.append(torch.stack([loss.detach(), *(value.detach() for value in terms.values())]))
            bar.update(batch_size)
            if step % 100 == 0:
                value = loss.item()          # the bar's synchronisation, which also stops a diverged run early
                bar.set_postfix(loss=f"{value:.4g}")
                if not math.isfinite(value):
                    bar.close()
                    check_finite_loss(desc, value, step, lr)
            step += 1
    seconds = clock.seconds()
    bar.close()
    model.eval()
    records = torch.stack(records).float().cpu()                                   # (steps, 1 + parts)
    bad = (~torch.isfinite(records[:, 0])).nonzero()                               # steps the bar did not read
    if len(bad):
        check_finite_loss(desc, records[bad[0, 0], 0].item(), bad[0, 0].item(), lr)
    return {"loss": records[:, 0], "parts": {name: records[:, 1 + i] for i, name in enumerate(terms)},
            "images": total * batch_size, "seconds": seconds}


# ---- 8. Evaluation: how good is a frozen code? (the probes are evaluation.py's, the protocol of every script) ----

@torch.no_grad()
def encode_all(model, images, batch_size=4096):
    """The codes of many images, (N, L) float32, computed in float32 a batch at a time."""
    return torch.cat([model.encode(common.to_float(chunk)).float() for chunk in images.split(batch_size)])


@torch.no_grad()
def reconstruction_error(model, images, batch_size=4096):
    """Mean squared error per pixel (pixels in [0, 1]) of model.reconstruct over images (N, C, H, W)."""
    total = sum(squared_error(model.reconstruct(x).float(), x).sum()
                for x in map(common.to_float, images.split(batch_size)))
    return (total / images[0].numel() / len(images)).item()


@torch.no_grad()
def denoising_error(model, images, batch_size=4096):
    """Squared error per pixel against the clean images of the corrupted input and of the model's output."""
    total = torch.zeros(2, device=images.device)
    for chunk in images.split(batch_size):
        x = common.to_float(chunk)
        noisy = corrupt(x, model.noise_std, model.mask_prob)
        total += torch.stack([squared_error(noisy, x).sum(), squared_error(model.reconstruct(noisy).float(), x).sum()])
    input_error, output_error = (total / images[0].numel() / len(images)).tolist()
    return {"corrupted_input_mse": input_error, "output_mse": output_error}


CONTINUOUS_FACTORS = ("scale", "x", "y", "brightness", "background", "noise")   # the embedded set's
CATEGORICAL_FACTORS = {"colour": len(common.COLOURS), "size": len(common.SIZES), "place": len(common.PLACES)}


def factor_labels(factors, name):
    """The embedded set's categorical factor as class labels (N,); 'place' is the cell of a 3 x 3 grid."""
    return factors["row"] * 3 + factors["column"] if name == "place" else factors[name]


def factor_correlation(codes, factors):
    """|Pearson correlation| between every continuous factor and every code coordinate, (F, L): a
    disentangled code has one large entry per row, each in its own column."""
    values = torch.stack([factors[name].float() for name in CONTINUOUS_FACTORS], 1)   # (N, F)
    standardise = lambda t: (t - t.mean(0)) / (t.std(0, correction=0) + 1e-8)
    return (standardise(values).T @ standardise(codes) / len(codes)).abs()           # (F, N) @ (N, L) -> (F, L)


ACTIVE_VARIANCE = 0.01     # Burda et al.'s threshold on Var_x(E_q[z_j])


@torch.no_grad()
def active_units(model, images, threshold=ACTIVE_VARIANCE):
    """Burda et al. 2016: coordinate j is active when its posterior mean varies across images, Var_x(mean_j) >
    threshold; the others the VAE leaves at the prior and ignores. Returns (count, per-coordinate variance)."""
    variance = encode_all(model, images).var(0)                                      # (L,)
    return int((variance > threshold).sum()), variance


def unit_activity(codes):
    """A sparse code's use of its units on the test codes (N, L): the mean number of non-zero units per image, the
    share of dead units (zero for every image), and how often each unit is on, (L,)."""
    on = codes != 0                                                                  # (N, L)
    frequency = on.float().mean(0)                                                   # (L,)
    return on.sum(1).float().mean().item(), (frequency == 0).float().mean().item(), frequency


# Disentanglement, measured: the mutual information gap (MIG, Chen et al. 2018, Sec. 4). For each factor v_k,
# the code coordinate j(k) that tells most about it should tell much more than the runner-up:
#     MIG = (1/K) sum_k (I(z_j(k); v_k) - max_{j != j(k)} I(z_j; v_k)) / H(v_k),   in [0, 1].
# Chen et al. estimate I from q(z | x); for codes of any kind we discretise each coordinate into 20 equal-width
# bins over its range on the test set, as Locatello et al. 2019's disentanglement_lib does, and count.
MIG_FACTORS = ("shape", "colour", "scale", "x", "y", "rotation", "texture", "background")   # as _shape_factors draws
MIG_BINS = 20


def discretise(values, bins=MIG_BINS):
    """Each column of values (N, L) cut into `bins` equal-width bins over its own range: integers in [0, bins)."""
    low, high = values.min(0).values, values.max(0).values                           # (L,), (L,)
    return ((values - low) / (high - low).clamp_min(1e-12) * bins).long().clamp(max=bins - 1)


def mutual_information(a, b):
    """I(a_j; b) = sum_{u, v} p(u, v) log(p(u, v) / (p(u) p(v))) in nats, from counts, for every column of the
    integer array a (N, L) against the integer vector b (N,); (L,). I(b; b) is the entropy H(b)."""
    n, width = a.shape
    values_a, values_b = int(a.max()) + 1, int(b.max()) + 1
    cell = (torch.arange(width, device=a.device) * values_a + a) * values_b + b[:, None]   # (N, L): (j, u, v)
    joint = torch.bincount(cell.flatten(), minlength=width * values_a * values_b).double() / n
    joint = joint.view(width, values_a, values_b)                                    # p(u, v) per column (L, U, V)
    independent = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)            # p(u) p(v), (L, U, V)
    return torch.where(joint > 0, joint * (joint / independent).log(), 0).sum((1, 2))


def mig_factors(factors):
    """The shapes set's factors as integers (N,) each: the categorical ones (the shape is the class label) as they
    are, the continuous ones (scale, position, rotation, background) binned as the code is."""
    values = {name: factors["label" if name == "shape" else name] for name in MIG_FACTORS}
    return {name: discretise(v[:, None])[:, 0] if v.is_floating_point() else v for name, v in values.items()}


def mig(codes, factors, bins=MIG_BINS):
    """The MIG of codes (N, L), L >= 2, against integer factors {name: (N,)}: (the mean, {name: its gap / H})."""
    z = discretise(codes.float(), bins)                                               # (N, L)
    gaps = {}
    for name, v in factors.items():
        best, runner_up = mutual_information(z, v).topk(2).values
        gaps[name] = ((best - runner_up) / mutual_information(v[:, None], v)[0]).item()
    return sum(gaps.values()) / len(gaps), gaps


def probe_all(features, data, cfg, factor_features=("code", "pca")):
    """Linear probe and kNN top-1 of the class from features {"name": (train (N, D), test (M, D))}; on the
    embedded set also the linear probe of colour, size and place from the codes named in factor_features.
    Each probe takes cfg.probe_steps Adam steps (rounded up to whole passes over the training set)."""
    classes = len(data.classes)
    result = {}
    for name, (train_f, test_f) in features.items():
        result[name] = {
            "linear_top1": evaluation.linear_probe(train_f, data.y_train, test_f, data.y_test, classes, epochs=1,
                                                   seed=cfg.seed, min_steps=cfg.probe_steps)["top1"],
            "knn_top1": evaluation.knn_classify(train_f, data.y_train, test_f, data.y_test, classes)["top1"]}
        if name in factor_features and data.factors_train is not None:
            for factor, count in CATEGORICAL_FACTORS.items():
                result[name][f"{factor}_linear_top1"] = evaluation.linear_probe(
                    train_f, factor_labels(data.factors_train, factor), test_f, factor_labels(data.factors_test, factor),
                    count, epochs=1, seed=cfg.seed, min_steps=cfg.probe_steps)["top1"]
    return result


# ---- 9. Figures ----

def as_picture(image):
    """(C, H, W) in [0, 1] -> (H, W, 3) on the CPU, grey repeated to three channels, for imshow."""
    return image.float().clamp(0, 1).cpu().expand(3, -1, -1).permute(1, 2, 0)


def image_rows(rows, path, title=None, scale=0.8, gap=2):
    """A figure of labelled rows of images: rows = [(label, images (n, C, H, W) in [0, 1]), ...], drawn as one
    mosaic with white gaps (one imshow is much faster than an axes per image)."""
    columns = max(len(images) for _, images in rows)
    _, height, width = rows[0][1].shape[1:]
    mosaic = torch.ones(len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3)
    for r, (_, images) in enumerate(rows):
        for c, image in enumerate(images):
            top, left = r * (height + gap), c * (width + gap)
            mosaic[top:top + height, left:left + width] = as_picture(image)
    fig, ax = plt.subplots(figsize=(scale * columns, scale * len(rows) + 0.3 * bool(title)))
    ax.imshow(mosaic.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (height + gap) + height / 2 for r in range(len(rows))], [label for label, _ in rows], fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    common.save_figure(fig, path)


@torch.no_grad()
def plot_reconstructions(models, images, path, title):
    """Test images above their reconstructions by each of models = [(label, model), ...]."""
    x = common.to_float(images)
    image_rows([("input", x), *((label, model.reconstruct(x)) for label, model in models)], path, title=title)


@torch.no_grad()
def plot_dictionary(model, frequency, path, count=64):
    """The sparse autoencoder's atoms (columns of D) of its most used units, each scaled so that 0 is mid-grey."""
    order = frequency.argsort(descending=True)[:count]
    atoms = model.dictionary().T[order].float()                                      # (count, P)
    atoms = (0.5 + 0.5 * atoms / atoms.abs().amax(1, keepdim=True)).view(-1, *model.image_shape)
    image_rows([("", atoms[i:i + 16]) for i in range(0, len(atoms), 16)], path,
               title=f"the dictionary: atoms of the {len(atoms)} most used units, most used first (grey is 0)")


def plot_top_activations(codes, frequency, pictures, path, units=8, per_unit=10):
    """For units spread from the most used to the least used alive one, the test images that turn them on most."""
    alive = frequency.argsort(descending=True)[:int((frequency > 0).sum())]
    chosen = alive[torch.linspace(0, len(alive) - 1, min(units, len(alive))).round().long()]
    rows = []
    for j in chosen.tolist():
        value, top = codes[:, j].topk(min(per_unit, len(codes)))                     # (n,), (n,)
        rows.append((f"unit {j}, on for {frequency[j]:.2%}", common.to_float(pictures[top[value != 0]])))
    image_rows(rows, path, title="the test images that activate each unit most", scale=0.9)


@torch.no_grad()
def plot_denoising(model, images, path):
    x = common.to_float(images)
    noisy = corrupt(x, model.noise_std, model.mask_prob)
    image_rows([("noisy input", noisy), ("output", model.reconstruct(noisy)), ("clean target", x)], path,
               title=f"denoising: Gaussian noise (std {model.noise_std}) and {model.mask_prob:.0%} of pixels masked")


@torch.no_grad()
def plot_interpolation(model, images, path, steps=10):
    """Decode (1 - t) z_a + t z_b for t from 0 to 1, beside the cross-fade (1 - t) x_a + t x_b in pixel space."""
    x = common.to_float(images)                                          # (2 * pairs, C, H, W)
    t = torch.linspace(0, 1, steps, device=x.device)[:, None]            # (S, 1)
    rows = []
    for a, b in zip(x[0::2], x[1::2]):
        za, zb = model.encode(torch.stack([a, b]))                       # (L,), (L,)
        rows.append(("through the code", model.decode((1 - t) * za + t * zb)))   # (S, L) -> (S, C, H, W)
        rows.append(("in pixel space", (1 - t[:, :, None, None]) * a + t[:, :, None, None] * b))
    image_rows(rows, path, title="interpolation between two test images")


def plot_latent_map(codes, labels, class_names, path, title):
    """The codes (N, L) projected on their first two principal components, coloured by class."""
    points = pca(codes, 2).encode(codes).cpu() if codes.shape[1] > 2 else codes.cpu()
    labels = labels.cpu()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(class_names):
        chosen = labels == k
        ax.scatter(points[chosen, 0], points[chosen, 1], s=3, alpha=0.5, color=colours(k % 10), label=name)
    ax.set_xlabel("code, principal component 1")
    ax.set_ylabel("code, principal component 2")
    ax.set_title(title, fontsize=10)
    ax.legend(markerscale=4, fontsize=8, loc="best", framealpha=0.8)
    common.save_figure(fig, path)


def plot_training(history, linear_history, pca_train_error, model_name, path):
    """Left: the model's objective and its parts. Right: the linear autoencoder's error falling onto PCA's."""
    smooth = lambda v: v.unfold(0, min(len(v), 25), 1).mean(1) if len(v) > 1 else v   # running mean over 25 steps
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in {"loss": history["loss"], **history["parts"]}.items():
        if name == "loss" and len(history["parts"]) == 1:
            continue                                                     # the loss is its one part
        left.plot(smooth(values), label=name)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_title(f"{model_name}: training objective (running mean over 25 steps)", fontsize=10)
    left.legend(fontsize=8)
    right.plot(smooth(linear_history["loss"]), label="linear autoencoder")
    right.axhline(pca_train_error, color="k", linestyle="--", label="PCA, same width (closed form)")
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("squared error per pixel (training batch)")
    right.set_title("a linear autoencoder descends onto PCA's error", fontsize=10)
    right.legend(fontsize=8)
    fig.subplots_adjust(wspace=0.3)
    common.save_figure(fig, path)


@torch.no_grad()
def plot_samples(model, path, count=32, seed=0):
    """Images decoded from codes drawn from the prior N(0, I): what the VAE has learned to generate."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(count, model.latent_dim, generator=generator).to(next(model.parameters()).device)
    images = model.decode(z)
    image_rows([("", images[i:i + 16]) for i in range(0, count, 16)], path, title="samples: decode(z), z ~ N(0, I)")


@torch.no_grad()
def plot_traversal(model, image, variance, correlation, path, rows=8, span=3.0, steps=11, threshold=0.3):
    """Vary one code coordinate from -span to +span around one image's posterior mean, holding the others, for
    the most active coordinates; each row names the continuous factor it correlates with most, where that
    |correlation| passes threshold (colour and shape are categorical: a row that changes them names none)."""
    base = model.encode(common.to_float(image[None]))[0]                 # (L,)
    values = torch.linspace(-span, span, steps, device=base.device)      # (S,)
    chosen = variance.argsort(descending=True)[:rows].tolist()
    lines = []
    for j in chosen:
        z = base.repeat(steps, 1)                                        # (S, L)
        z[:, j] = values
        label = f"z{j}" + (" (inactive)" if variance[j] <= ACTIVE_VARIANCE else "")
        if correlation is not None:
            best = int(correlation[:, j].argmax())
            label += (f"\n~ {CONTINUOUS_FACTORS[best]} (|r| {correlation[best, j]:.2f})" if correlation[best, j] >= threshold
                      else f"\nno factor with |r| >= {threshold}")
        lines.append((label, model.decode(z)))
    image_rows(lines, path, title=f"latent traversal: each row moves one coordinate from -{span:g} to +{span:g}")


# ---- 10. Main ----

def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    validate(cfg)
    arrays = read_features(cfg.features) if cfg.features else None
    device, out = common.setup(cfg, __file__)
    common.cpu_notice(cfg, device, cfg.epochs * (cfg.train_size or 50_000) / 800)
    wall = common.Stopwatch(device)
    data, pictures = load_data(cfg, device, arrays)
    validate_sizes(cfg, data)
    seconds = {"data": wall.seconds()}                                   # where the wall-clock time goes
    pixels, sparse = math.prod(data.shape), cfg.model == "sae"
    print(f"{data.name}: {len(data.x_train)} training and {len(data.x_test)} test inputs of {data.shape}; "
          f"code width L={cfg.latent_dim} for {pixels} numbers per input")

    model = build_model(cfg, data.shape).to(device).set_mean_image(data.x_train)
    history = train(model, data.x_train, cfg.epochs, cfg.batch_size, cfg.lr, device, cfg.warmup, desc=cfg.model)
    common.save_checkpoint(out / "model.pt", model, cfg, kind=f"autoencoder-{cfg.model}", image_shape=list(data.shape))
    codes = {"code": (encode_all(model, data.x_train), encode_all(model, data.x_test))}
    width = cfg.latent_dim          # of the baselines: as many numbers per image as the code has, or uses if sparse
    if sparse:
        active, dead, frequency = unit_activity(codes["code"][1])
        width = cfg.k if cfg.sparsity == "topk" else max(1, min(round(active), len(data.x_train), pixels))

    # Section 5's comparison: a linear autoencoder trained by the same loop, and PCA in closed form
    linear = Autoencoder(data.shape, width, hidden=()).to(device).set_mean_image(data.x_train)
    linear_history = train(linear, data.x_train, cfg.epochs, cfg.batch_size, cfg.lr, device, cfg.warmup,
                           desc="linear AE")
    principal = pca(common.to_float(data.x_train), width)
    average = PCA(principal.mean, principal.components[:0], data.shape)  # zero components: every image -> the mean
    baselines = {"pca": principal, "linear_ae": linear, "mean_image": average}
    if sparse:                      # and the dense bottleneck autoencoder with a code of that width
        baselines["dense_ae"] = Autoencoder(data.shape, width, (cfg.hidden, cfg.hidden // 2)).to(device)
        train(baselines["dense_ae"].set_mean_image(data.x_train), data.x_train, cfg.epochs, cfg.batch_size, cfg.lr,
              device, cfg.warmup, desc="dense AE")
    seconds["baselines"] = wall.seconds() - sum(seconds.values()) - history["seconds"]

    errors = {name: reconstruction_error(m, data.x_test) for name, m in (("model", model), *baselines.items())}
    codes["pca"] = (encode_all(principal, data.x_train), encode_all(principal, data.x_test))
    raw = "pixels" if arrays is None else "features"                     # the input itself, the baseline of baselines
    codes[raw] = (common.to_float(data.x_train).flatten(1), common.to_float(data.x_test).flatten(1))
    probes = probe_all(codes, data, cfg) if arrays is None or "labels" in arrays else {}
    seconds["evaluation"] = wall.seconds() - sum(seconds.values()) - history["seconds"]
    loss = history["loss"]
    tenth = max(1, len(loss) // 10)
    metrics = {
        "dataset": data.name, "model": cfg.model, "latent_dim": cfg.latent_dim, "epochs": cfg.epochs,
        "parameters": sum(p.numel() for p in model.parameters()), "baseline_width": width,
        "loss_first": loss[:tenth].mean().item(), "loss_last": loss[-tenth:].mean().item(),
        "test_mse": errors["model"], "pca_test_mse": errors["pca"], "linear_ae_test_mse": errors["linear_ae"],
        "mean_image_test_mse": errors["mean_image"],
        "mse_vs_pca": errors["model"] / errors["pca"] - 1, "linear_ae_vs_pca": errors["linear_ae"] / errors["pca"] - 1,
        "probe": probes, "train_seconds": history["seconds"],
        "train_images_per_second": history["images"] / history["seconds"],
    }
    mappable = min(cfg.latent_dim, len(data.x_test)) >= 2   # a plane, or a runner-up, needs two coordinates and points
    correlation = None
    if data.factors_test is not None:
        correlation = factor_correlation(codes["code"][1], data.factors_test)          # (F, L)
        metrics["factor_correlation"] = {name: correlation[i].max().item() for i, name in enumerate(CONTINUOUS_FACTORS)}
        if mappable:
            value, gaps = mig(codes["code"][1], mig_factors(data.factors_test))
            metrics["mig"] = {"mig": value, "per_factor": gaps, "bins": MIG_BINS}
    if cfg.model == "dae":
        metrics["denoising"] = denoising_error(model, data.x_test)
    if cfg.model == "vae":
        count, variance = active_units(model, data.x_test)
        with torch.no_grad():
            x = common.to_float(data.x_test[:4096])
            _, parts = model.objective(x)
        metrics["vae"] = {"active_units": count, "beta": cfg.beta, "likelihood": cfg.likelihood,
                          **{name: value.item() for name, value in parts.items()}}
    if sparse:
        metrics["sae"] = {"sparsity": cfg.sparsity, "k": cfg.k, "l1": cfg.l1, "active_per_image": active,
                          "dead_share": dead, "dense_ae_test_mse": errors["dense_ae"],
                          "mse_vs_dense_ae": errors["model"] / errors["dense_ae"] - 1}

    figures = []
    if arrays is None:              # the figures that draw the inputs, which --features are not
        models = [(f"{cfg.model}, L={cfg.latent_dim}" + (f", {active:.0f} on" if sparse else ""), model),
                  (f"PCA-{width}", principal), (f"linear AE, L={width}", linear)]
        models += [(f"dense AE, L={width}", baselines["dense_ae"])] if sparse else []
        plot_reconstructions(models, pictures[:12], out / "reconstructions.png",
                             f"test images and their reconstructions from a {width}-number code")
        plot_interpolation(model, data.x_test[(data.y_test[:, None] == torch.tensor([0, 1, 2, 3], device=device))
                                              .float().argmax(0)], out / "interpolation.png")
        figures += ["reconstructions.png", "interpolation.png"]
    if mappable:
        plot_latent_map(codes["code"][1][:5000], data.y_test[:5000], data.classes, out / "latent_map.png",
                        f"{cfg.model} codes of test inputs (L={cfg.latent_dim}), first two principal components")
        figures.append("latent_map.png")
    else:
        print(f"latent_map.png skipped: a 2-D map of the codes needs --latent-dim and --test-size of at least 2, "
              f"got {cfg.latent_dim} and {len(data.x_test)}")
    plot_training(history, linear_history, reconstruction_error(principal, data.x_train[:10000]), cfg.model,
                  out / "training_curve.png")
    figures.append("training_curve.png")
    if cfg.model == "dae":
        plot_denoising(model, pictures[:12], out / "denoising.png")
        figures.append("denoising.png")
    if cfg.model == "vae":
        plot_samples(model, out / "samples.png", seed=cfg.seed)
        plot_traversal(model, data.x_test[0], variance, correlation, out / "traversal.png")
        figures += ["samples.png", "traversal.png"]
    if sparse:
        if arrays is None:
            plot_dictionary(model, frequency, out / "dictionary.png")
            figures.append("dictionary.png")
        plot_top_activations(codes["code"][1], frequency, pictures, out / "top_activations.png")
        figures.append("top_activations.png")
    seconds["figures_and_rest"] = wall.seconds() - sum(seconds.values()) - history["seconds"]
    metrics.update(figures=figures, wall_seconds=wall.seconds(), seconds={"train": history["seconds"], **seconds})
    common.save_json(out / "metrics.json", metrics)
    out = common.finish_run(out)

    p = probes
    print(f"{cfg.model} on {data.name}, L={cfg.latent_dim}: test MSE/pixel {errors['model']:.5f} vs PCA-{width} "
          f"{errors['pca']:.5f} ({metrics['mse_vs_pca']:+.1%}), linear AE {errors['linear_ae']:.5f} "
          f"({metrics['linear_ae_vs_pca']:+.1%} vs PCA)"
          + (f", dense AE {errors['dense_ae']:.5f} | {active:.1f} units on, {dead:.1%} dead" if sparse else "")
          + (f" | probe top-1: code {p['code']['linear_top1']:.3f}, PCA {p['pca']['linear_top1']:.3f}, {raw} "
             f"{p[raw]['linear_top1']:.3f}; kNN code {p['code']['knn_top1']:.3f}" if p else "")
          + (f" | MIG {metrics['mig']['mig']:.3f}" if "mig" in metrics else "")
          + f" | {history['images'] / 1e6:.2f}M images in {history['seconds']:.1f} s "
            f"({metrics['train_images_per_second'] / 1e3:.0f}k img/s), wall {metrics['wall_seconds']:.1f} s")
    return model, metrics


if __name__ == "__main__":
    common.run(main)
