"""Tests for 01_autoencoder.py: each objective against torch.distributions in float64 (values and gradients),
training against the objectives it must call, PCA against its closed form, the linear autoencoder against PCA,
and the script end to end on CPU (it must learn, write everything it promises, and fail cleanly). The probes
(evaluation.py) have their own tests in test_evaluation.py."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import common

ae = common.import_script("01_autoencoder")

SIZES = [(1, 1), (3, 5), (16, 32)]       # (B, L), an uneven one among them


def generator(seed):
    return torch.Generator().manual_seed(seed)


def assert_same_values_and_gradients(ours, reference, inputs, seed=0):
    """ours(*inputs) == reference(*inputs), and so are the gradients of a random weighting of the outputs."""
    out, ref = ours(*inputs), reference(*inputs)
    torch.testing.assert_close(out, ref)
    weights = torch.randn(out.shape, generator=generator(seed), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def leaf(*shape, seed, scale=1.0):
    """A float64 tensor of N(0, scale^2) entries that records gradients."""
    return (torch.randn(*shape, generator=generator(seed), dtype=torch.float64) * scale).requires_grad_()


# ---- objectives against torch.distributions ----

@pytest.mark.parametrize("batch, latent", SIZES)
def test_kl_matches_torch_distributions(batch, latent):
    mean, log_var = leaf(batch, latent, seed=1, scale=2.0), leaf(batch, latent, seed=2)
    reference = lambda m, lv: kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(0.0, 1.0)).sum(1)
    assert_same_values_and_gradients(ae.kl_to_standard_normal, reference, (mean, log_var))


def test_kl_matches_a_monte_carlo_estimate():
    g = generator(3)
    mean = torch.randn(4, generator=g, dtype=torch.float64)
    log_var = torch.randn(4, generator=g, dtype=torch.float64)
    std = (0.5 * log_var).exp()
    z = mean + std * torch.randn(400_000, 4, generator=g, dtype=torch.float64)          # samples of q(z | x)
    log_ratio = (Normal(mean, std).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(1)   # log q(z) - log p(z)
    estimate, error = log_ratio.mean(), log_ratio.std() / math.sqrt(len(z))
    exact = ae.kl_to_standard_normal(mean[None], log_var[None])[0]
    assert abs(estimate - exact) < 4 * error


@pytest.mark.parametrize("batch, latent", SIZES)
def test_bernoulli_log_likelihood_matches_torch_on_binary_and_grey_pixels(batch, latent):
    logits = leaf(batch, 2, latent, seed=4, scale=3.0)
    binary = (torch.rand(batch, 2, latent, generator=generator(5), dtype=torch.float64) > 0.5).double()
    grey = torch.rand(batch, 2, latent, generator=generator(6), dtype=torch.float64)
    for x in (binary, grey):
        reference = lambda l: Bernoulli(logits=l, validate_args=False).log_prob(x).flatten(1).sum(1)
        assert_same_values_and_gradients(lambda l: ae.bernoulli_log_likelihood(x, l), reference, (logits,))


def test_bernoulli_log_likelihood_stays_finite_for_extreme_logits():
    logits = torch.tensor([[-200.0, 200.0]], dtype=torch.float64)
    assert torch.isfinite(ae.bernoulli_log_likelihood(torch.tensor([[1.0, 0.0]], dtype=torch.float64), logits)).all()


@pytest.mark.parametrize("batch, latent", SIZES)
def test_gaussian_log_likelihood_matches_torch(batch, latent):
    x = torch.rand(batch, 3, latent, generator=generator(7), dtype=torch.float64)
    mean, log_std = leaf(batch, 3, latent, seed=8), torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    reference = lambda m, s: Normal(m, s.exp()).log_prob(x).flatten(1).sum(1)
    assert_same_values_and_gradients(lambda m, s: ae.gaussian_log_likelihood(x, m, s), reference, (mean, log_std))
    torch.testing.assert_close(ae.gaussian_log_likelihood(x, mean, math.log(0.1)),
                               Normal(mean, 0.1).log_prob(x).flatten(1).sum(1))


def test_reparameterised_sample_has_the_posterior_mean_and_variance_and_passes_gradients():
    g = generator(9)
    mean = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    log_var = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    n = 200_000
    noise = torch.randn(n, 5, generator=g, dtype=torch.float64)
    z = ae.reparameterise(mean.expand(n, 5), log_var.expand(n, 5), noise)               # (N, L)
    variance = log_var.detach().exp()
    torch.testing.assert_close(z.detach().mean(0), mean.detach(), atol=float(5 * variance.sqrt().max() / math.sqrt(n)), rtol=0)
    torch.testing.assert_close(z.detach().var(0), variance, rtol=0.02, atol=0)
    grad_mean, grad_log_var = torch.autograd.grad(z.sum(), (mean, log_var))
    torch.testing.assert_close(grad_mean, torch.full_like(mean, n))                       # dz/dmean = 1
    torch.testing.assert_close(grad_log_var, (0.5 * variance.sqrt() * noise).sum(0))     # dz/dlog_var = sigma eps / 2
    assert torch.autograd.gradcheck(lambda m, lv: ae.reparameterise(m, lv, noise[:3, :2]),
                                    (leaf(3, 2, seed=10), leaf(3, 2, seed=11)))
    drawn = ae.reparameterise(torch.zeros(100_000, 1), torch.zeros(100_000, 1))         # its own noise: N(0, 1)
    assert abs(drawn.mean()) < 0.02 and abs(drawn.var() - 1) < 0.02


@pytest.mark.parametrize("batch, latent", SIZES)
def test_squared_error_matches_mse_loss(batch, latent):
    target = torch.rand(batch, 3, latent, generator=generator(12), dtype=torch.float64)
    reference = lambda x: F.mse_loss(x, target, reduction="none").flatten(1).sum(1)
    assert_same_values_and_gradients(lambda x: ae.squared_error(x, target), reference, (leaf(batch, 3, latent, seed=13),))


def test_corruption_masks_whole_positions_and_adds_noise_of_the_given_std():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16)
    torch.testing.assert_close(ae.corrupt(x, 0.0, 0.0), x)
    masked = ae.corrupt(x, 0.0, 0.3)
    zero = masked == 0                                                                   # (B, C, H, W)
    assert (zero == zero[:, :1]).all()                                                   # the same mask in every channel
    assert abs(zero[:, 0].float().mean() - 0.3) < 0.01
    noisy = ae.corrupt(x, 0.2, 0.0)
    assert abs((noisy - x).std() - 0.2) < 0.005


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_vae_objective_is_the_negative_elbo_written_with_torch_distributions(likelihood, beta):
    torch.manual_seed(0)
    model = ae.VariationalAutoencoder((2, 3, 3), 4, hidden=(7,), beta=beta, likelihood=likelihood, decoder_std=0.2).double()
    x = torch.rand(5, 2, 3, 3, generator=generator(14), dtype=torch.float64)
    model.set_mean_image(x)
    torch.manual_seed(1)
    loss, parts = model.objective(x)
    torch.manual_seed(1)
    mean, log_var = model.posterior(x)
    q = Normal(mean, (0.5 * log_var).exp())
    z = mean + q.stddev * torch.randn_like(mean)                                        # the same draw of eps
    out = model.decoder_output(z)
    p_x = Bernoulli(logits=out, validate_args=False) if likelihood == "bernoulli" else Normal(out, 0.2)
    log_likelihood = p_x.log_prob(x).flatten(1).sum(1)
    kl = kl_divergence(q, Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(loss, (beta * kl - log_likelihood).mean())
    torch.testing.assert_close(parts["KL per image"], kl.mean())
    torch.testing.assert_close(parts["-log p(x|z) per image"], -log_likelihood.mean())
    torch.testing.assert_close(model.decode(z), out.sigmoid() if likelihood == "bernoulli" else out)


@pytest.mark.parametrize("model, piece, part", [("ae", "squared_error", "squared error per pixel"),
                                                ("dae", "squared_error", "squared error per pixel"),
                                                ("vae", "kl_to_standard_normal", "KL per image")])
def test_training_runs_the_objective_the_lecture_shows(model, piece, part, monkeypatch):
    # train() must reach the function written out in the script: doubling it doubles its recorded part at the
    # first step (same seed, same weights, same batch) and changes the training loss
    images = common.load_images("shapes", n_train=64, n_test=1, size=16).x_train        # (64, 3, 16, 16) uint8
    cfg = ae.Config(model=model, latent_dim=4, hidden=16)

    def history():
        torch.manual_seed(0)
        trained = ae.build_model(cfg, images.shape[1:]).set_mean_image(images)
        return ae.train(trained, images, epochs=2, batch_size=16, lr=1e-2, device=torch.device("cpu"))

    reference = history()
    original = getattr(ae, piece)
    monkeypatch.setattr(ae, piece, lambda *args: 2 * original(*args))
    doubled = history()
    torch.testing.assert_close(doubled["parts"][part][0], 2 * reference["parts"][part][0], rtol=1e-6, atol=0)
    if model == "vae":          # loss = KL - log p(x | z) per image: doubling the KL adds one KL to it
        torch.testing.assert_close(doubled["loss"][0], reference["loss"][0] + reference["parts"][part][0])
    assert not torch.allclose(doubled["loss"], reference["loss"])


# ---- the sparse autoencoder's pieces against loops and formulas ----

@pytest.mark.parametrize("batch, latent, k", [(1, 1, 1), (3, 5, 2), (16, 32, 7)])
def test_top_k_keeps_exactly_k_units_per_row_and_passes_gradient_only_to_them(batch, latent, k):
    z = leaf(batch, latent, seed=30)

    def loop(z):            # keep z[i, j] when fewer than k entries of row i are larger
        mask = torch.zeros_like(z)
        for i in range(batch):
            for j in range(latent):
                mask[i, j] = float((z[i] > z[i, j]).sum() < k)
        return z * mask

    assert_same_values_and_gradients(lambda t: ae.top_k(t, k), loop, (z,))
    assert ((ae.top_k(z, k) != 0).sum(1) == k).all()
    grad, = torch.autograd.grad(ae.top_k(z, k).sum(), z)
    assert ((grad != 0).sum(1) == k).all()


def test_unit_columns_and_the_l1_objective_match_their_formulas():
    weight = leaf(6, 4, seed=31)
    loop = lambda w: torch.stack([w[:, j] / w[:, j].square().sum().sqrt() for j in range(w.shape[1])], 1)
    assert_same_values_and_gradients(ae.unit_columns, loop, (weight,))
    torch.manual_seed(0)
    model = ae.SparseAutoencoder((2, 3), 8, sparsity="l1", l1=0.7).double()
    x = torch.rand(5, 2, 3, generator=generator(32), dtype=torch.float64)
    model.set_mean_image(x)
    loss, parts = model.objective(x)
    flat = (x - model.mean_image).flatten(1)                                             # (B, P)
    z = torch.relu(flat @ model.encoder[0].weight.T + model.encoder[0].bias)             # (B, L)
    atoms = model.decoder.weight / model.decoder.weight.norm(dim=0)                      # (P, L)
    error = (x.flatten(1) - model.mean_image.flatten() - z @ atoms.T).square().sum(1)
    torch.testing.assert_close(loss, (error + 0.7 * z.abs().sum(1)).mean() / 6)
    torch.testing.assert_close(parts["L1 term per pixel"], 0.7 * z.sum(1).mean() / 6)
    with torch.no_grad():                            # longer atoms change nothing: the penalty cannot be dodged
        model.decoder.weight.mul_(10)
    torch.testing.assert_close(model.objective(x)[0], loss)


def test_unit_activity_matches_a_loop():
    codes = torch.randn(40, 9, generator=generator(33)) * (torch.rand(40, 9, generator=generator(34)) < 0.2)
    codes[:, [2, 5]] = 0                                                                 # two dead units
    active, dead, frequency = ae.unit_activity(codes)
    on = [[float(codes[i, j] != 0) for j in range(9)] for i in range(40)]
    assert active == pytest.approx(sum(map(sum, on)) / 40)
    assert dead == pytest.approx(sum(all(row[j] == 0 for row in on) for j in range(9)) / 9)
    torch.testing.assert_close(frequency, torch.tensor([sum(row[j] for row in on) / 40 for j in range(9)]))


# ---- the mutual information gap against the formula ----

def test_mutual_information_and_mig_match_a_loop_over_the_formula():
    g = generator(35)
    bins = 3
    code = torch.randint(0, bins, (60, 4), generator=g)                                  # already in bins 0..2
    code[0], code[1] = 0, bins - 1                                                       # each column spans the range
    factors = {"a": torch.randint(0, 4, (60,), generator=g), "b": code[:, 1].clone()}
    factors["b"][::7] = 2

    def information(u, v):      # sum over values of p(u, v) log(p(u, v) / (p(u) p(v)))
        total = 0.0
        for s in set(u.tolist()):
            for t in set(v.tolist()):
                p_st = ((u == s) & (v == t)).double().mean().item()
                if p_st > 0:
                    total += p_st * math.log(p_st / ((u == s).double().mean() * (v == t).double().mean()).item())
        return total

    torch.testing.assert_close(ae.discretise(code.double(), bins), code)
    gaps = {}
    for name, v in factors.items():
        mi = sorted((information(code[:, j], v) for j in range(4)), reverse=True)
        torch.testing.assert_close(ae.mutual_information(code, v),
                                   torch.tensor([information(code[:, j], v) for j in range(4)], dtype=torch.float64))
        gaps[name] = (mi[0] - mi[1]) / information(v, v)
    value, ours = ae.mig(code.double(), factors, bins=bins)
    assert ours == pytest.approx(gaps) and value == pytest.approx(sum(gaps.values()) / 2)


def test_mig_is_near_one_for_a_code_that_copies_each_factor_and_near_zero_for_noise():
    g = generator(36)
    factors = {"colour": torch.randint(0, 8, (4000,), generator=g), "size": torch.randint(0, 3, (4000,), generator=g),
               "x": torch.randint(0, 20, (4000,), generator=g)}
    copies = torch.stack([factors[name].double() for name in ("x", "size", "colour")], 1)   # one factor per coordinate
    assert ae.mig(copies, factors)[0] > 0.97
    assert ae.mig(torch.randn(4000, 6, generator=g), factors)[0] < 0.03
    mixed = torch.stack([copies[:, 0] + copies[:, 2], copies[:, 0] - copies[:, 2], copies[:, 1]], 1)   # two shared
    assert ae.mig(mixed, factors)[0] < ae.mig(copies, factors)[0] - 0.3


# ---- PCA, and the linear autoencoder that reaches it ----

def test_pca_matches_the_eigendecomposition_of_the_covariance():
    g = generator(15)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    principal = ae.pca(x, 4)
    centred = x - x.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(x))        # ascending
    top = eigenvectors[:, -4:]                                                           # (P, k)
    torch.testing.assert_close(principal.components.double() @ principal.components.double().T,
                               torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(principal.components.double().T @ principal.components.double(), top @ top.T,
                               atol=1e-5, rtol=0)                                         # the same subspace
    error = (principal.reconstruct(x).double() - x).square().mean()
    torch.testing.assert_close(error, eigenvalues[:-4].sum() / x.shape[1], rtol=1e-4, atol=0)   # the discarded variance


def linear_and_pca_errors(x, k, steps, lr):
    torch.manual_seed(0)
    linear = ae.Autoencoder(x.shape[1:], k, hidden=()).set_mean_image(x)
    ae.train(linear, x, epochs=steps, batch_size=len(x), lr=lr, device=torch.device("cpu"))
    return ae.reconstruction_error(linear, x), ae.reconstruction_error(ae.pca(common.to_float(x), k), x)


def test_linear_autoencoder_reaches_pca_on_random_low_rank_data():
    g = generator(16)
    x = torch.randn(400, 5, generator=g) @ torch.randn(5, 40, generator=g) + 0.1 * torch.randn(400, 40, generator=g) + 0.5
    linear, principal = linear_and_pca_errors(x, 5, steps=1500, lr=3e-2)
    assert principal <= linear <= 1.02 * principal


def test_linear_autoencoder_reaches_pca_on_the_embedded_set():
    images = common.load_images("shapes", n_train=500, n_test=1, size=16).x_train     # (500, 3, 16, 16) uint8
    linear, principal = linear_and_pca_errors(images, 8, steps=800, lr=3e-2)
    assert principal <= linear <= 1.02 * principal


# ---- the evaluation of the code that is this script's own ----

def test_factor_correlation_matches_corrcoef():
    g = generator(20)
    codes = torch.randn(300, 4, generator=g)
    factors = {name: torch.randn(300, generator=g) + codes[:, i % 4] for i, name in enumerate(ae.CONTINUOUS_FACTORS)}
    ours = ae.factor_correlation(codes, factors)
    values = torch.stack([factors[name] for name in ae.CONTINUOUS_FACTORS], 1)
    reference = torch.corrcoef(torch.cat([values, codes], 1).T)[:len(factors), len(factors):].abs()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


# ---- the script, end to end on CPU ----

@pytest.mark.parametrize("model", ["ae", "dae", "vae"])
def test_main_learns_and_writes_everything(model, tmp_path):
    trained, metrics = ae.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--model", model])
    assert metrics["loss_last"] < 0.95 * metrics["loss_first"]                            # the objective fell
    if model == "dae":     # it undoes most of the damage, though trained for seconds
        assert metrics["denoising"]["output_mse"] < 0.5 * metrics["denoising"]["corrupted_input_mse"]
    else:                  # its reconstructions beat the best constant guess, the average image
        assert metrics["test_mse"] < {"ae": 0.75, "vae": 0.85}[model] * metrics["mean_image_test_mse"]
    code = metrics["probe"]["code"]                 # colour and place are linearly readable from the code
    assert code["colour_linear_top1"] > 2 / len(common.COLOURS) and code["place_linear_top1"] > 2 / len(common.PLACES)
    assert 0 <= code["linear_top1"] <= 1 and 0 <= code["knn_top1"] <= 1
    assert metrics["pca_test_mse"] < metrics["mean_image_test_mse"] and metrics["linear_ae_test_mse"] >= 0.99 * metrics["pca_test_mse"]
    assert 0 <= metrics["mig"]["mig"] <= 1 and set(metrics["mig"]["per_factor"]) == set(ae.MIG_FACTORS)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["model"] == model and saved["test_mse"] == pytest.approx(metrics["test_mse"])
    for figure in metrics["figures"]:
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"reconstructions.png", "interpolation.png", "latent_map.png", "training_curve.png"} <= set(metrics["figures"])
    assert {"dae": {"denoising.png"}, "vae": {"samples.png", "traversal.png"}}.get(model, set()) <= set(metrics["figures"])
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["image_shape"] == [3, 32, 32]
    fresh = ae.build_model(ae.Config(**checkpoint["config"]), checkpoint["image_shape"])     # rebuilt from the file alone
    common.load_checkpoint(tmp_path / "model.pt", fresh, f"autoencoder-{model}")
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(fresh.encode(x), trained.encode(x))
    if model == "vae":
        assert 0 < metrics["vae"]["active_units"] <= 32 and metrics["vae"]["KL per image"] > 0


def test_the_sparse_autoencoder_learns_and_draws_its_dictionary(tmp_path):
    trained, metrics = ae.main([*TINY, "--out", str(tmp_path), "--model", "sae", "--latent-dim", "64", "--k", "4",
                                "--train-size", "200", "--test-size", "100", "--epochs", "10", "--batch-size", "20"])
    assert metrics["loss_last"] < 0.8 * metrics["loss_first"] and metrics["test_mse"] < 0.75 * metrics["mean_image_test_mse"]
    sae = metrics["sae"]
    assert sae["active_per_image"] == 4 and 0 <= sae["dead_share"] < 0.5 and metrics["baseline_width"] == 4
    assert sae["dense_ae_test_mse"] > 0 and 0 <= metrics["mig"]["mig"] <= 1
    assert {"dictionary.png", "top_activations.png", "reconstructions.png"} <= set(metrics["figures"])
    for figure in metrics["figures"]:
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text())["sparsity"] == "topk"       # the resolved default
    torch.testing.assert_close(trained.dictionary().norm(dim=0), torch.ones(64))


def test_the_l1_sparse_autoencoder_turns_units_off(tmp_path):
    _, metrics = ae.main([*TINY, "--out", str(tmp_path), "--model", "sae", "--sparsity", "l1", "--latent-dim", "64",
                          "--l1", "1", "--epochs", "3"])
    assert 0 < metrics["sae"]["active_per_image"] < 64 and metrics["baseline_width"] == round(metrics["sae"]["active_per_image"])


def features_file(path, labels=True, n=120):
    """A small --features file: features that are a linear image of class-dependent images, as 03 would save."""
    g = generator(40)
    y = torch.randint(0, 3, (n,), generator=g)
    images = (torch.rand(n, 3, 8, 8, generator=g) * 80 + 60 * y[:, None, None, None]).to(torch.uint8)
    features = images.flatten(1).float() @ torch.randn(192, 16, generator=g) / 100
    arrays = {"features": features.numpy(), "images": images.numpy(), **({"labels": y.numpy()} if labels else {})}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("labels", [True, False])
def test_features_fits_the_sae_to_frozen_features_and_shows_its_units(labels, tmp_path):
    path = features_file(tmp_path / "features.npz", labels)
    _, metrics = ae.main([*TINY, "--out", str(tmp_path / "out"), "--model", "sae", "--features", str(path),
                          "--latent-dim", "32", "--k", "4", "--epochs", "10", "--batch-size", "16"])
    assert metrics["dataset"] == "features" and metrics["loss_last"] < 0.8 * metrics["loss_first"]
    assert "top_activations.png" in metrics["figures"] and "dictionary.png" not in metrics["figures"]
    assert (tmp_path / "out" / "top_activations.png").read_bytes()[:4] == b"\x89PNG"
    assert set(metrics["probe"]) == ({"code", "pca", "features"} if labels else set())


def test_bad_features_files_fail_with_one_line_before_anything_is_written(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip file")
    np.save(tmp_path / "one.npy", np.zeros((20, 4), np.float32))
    np.savez(tmp_path / "no_images.npz", features=np.zeros((20, 4), np.float32))
    np.savez(tmp_path / "bad_labels.npz", features=np.zeros((20, 4), np.float32), images=np.zeros((20, 1, 2, 2), np.uint8),
             labels=np.zeros(19, np.int64))
    for name, message in [("missing.npz", "does not exist"), (".", "is a folder, not a file"), ("text.npz", "is not a readable .npz"),
                          ("one.npy", "is one array, not an .npz"), ("no_images.npz", "it should be an .npz of features"),
                          ("bad_labels.npz", "labels")]:
        out = tmp_path / f"out-{name}"
        with pytest.raises(common.UserError, match=message):
            ae.main([*TINY, "--out", str(out), "--model", "sae", "--latent-dim", "8", "--k", "2",
                     "--features", str(tmp_path / name)])
        assert not out.exists()


@pytest.mark.parametrize("model, width", [("ae", 32), ("vae", 32), ("sae", 1024)])
def test_latent_dim_0_means_32_or_an_overcomplete_1024_for_sae(model, width):
    cfg = ae.Config(model=model)
    ae.validate(cfg)
    assert cfg.latent_dim == width and (model != "sae" or cfg.k < cfg.latent_dim)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gan"], "invalid choice"),
    (["--latent-dim", "-4"], "--latent-dim must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--mask-prob", "1"], "--mask-prob"),
    (["--beta", "-1"], "--beta"),
    (["--warmup", "1"], "--warmup is a share of the training steps"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--batch-size", "5000"], "larger than the 1000 training images"),
    (["--latent-dim", "2000"], "larger than the data allows"),
    (["--model", "sae", "--latent-dim", "64", "--k", "0"], "--k must be between 1 and --latent-dim - 1 = 63"),
    (["--model", "sae", "--latent-dim", "64", "--k", "64"], "--k must be between 1"),
    (["--model", "sae", "--latent-dim", "32"], "an overcomplete code is e.g. --latent-dim 1024"),  # k = 32 of 32
    (["--model", "sae", "--sparsity", "l1", "--l1", "-0.5"], "--l1 must be finite and >= 0, got -0.5"),
    (["--sparsity", "topk"], "--sparsity is an option of --model sae, not ae"),
    (["--model", "vae", "--sparsity", "l1"], "--sparsity is an option of --model sae, not vae"),
    (["--features", "f.npz"], "--features fits the sparse autoencoder: add --model sae"),
    (["--model", "sae", "--latent-dim", "4000", "--k", "2000"], "--k 2000 is larger than the data allows"),
])
def test_bad_options_fail_with_one_line_and_write_no_results(argv, message, tmp_path):
    with pytest.raises(common.UserError, match=message):
        ae.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *argv])
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.pt").exists()


TINY = ["--quick", "--device", "cpu", "--epochs", "1", "--train-size", "60", "--test-size", "20", "--batch-size", "30",
        "--hidden", "16", "--probe-steps", "1"]


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    (["--lr", "nan"], "--lr must be positive and finite, got nan"),
    (["--model", "dae", "--noise-std", "inf"], "--noise-std must be finite and >= 0, got inf"),
    (["--model", "vae", "--beta", "inf"], "--beta must be finite"),
    (["--model", "vae", "--likelihood", "gaussian", "--decoder-std", "inf"], "--decoder-std must be positive and finite"),
])
def test_non_finite_options_fail_before_anything_is_written(argv, message, tmp_path):
    with pytest.raises(common.UserError, match=message):
        ae.main([*TINY, "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_with_one_line_and_no_checkpoint(tmp_path):
    with pytest.raises(common.UserError, match=r"training diverged \(ae: the loss is nan at step \d+\); lower --lr"):
        ae.main([*TINY, "--out", str(tmp_path), "--lr", "1e9"])
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_divergence_stops_training_at_the_progress_bars_reading():
    """The loss is read every 100 steps for the bar: a NaN seen there ends the run then, not after all the steps."""
    torch.manual_seed(0)
    model = ae.Autoencoder((1, 4, 4), 2, hidden=()).set_mean_image(torch.rand(8, 1, 4, 4))       # linear: fast
    with pytest.raises(common.UserError, match="the loss is nan at step 100\\)"):
        ae.train(model, torch.rand(8, 1, 4, 4), epochs=40, batch_size=1, lr=1e30, device=torch.device("cpu"))


@pytest.mark.parametrize("argv", [["--latent-dim", "1"], ["--test-size", "1"]])
def test_a_code_or_test_set_too_small_for_the_latent_map_skips_only_that_figure(argv, tmp_path, capsys):
    _, metrics = ae.main([*TINY, "--out", str(tmp_path), *argv])
    assert "latent_map.png skipped: a 2-D map of the codes needs --latent-dim and --test-size of at least 2" in capsys.readouterr().out
    assert metrics["figures"] == ["reconstructions.png", "interpolation.png", "training_curve.png"]
    assert not (tmp_path / "latent_map.png").exists()
    assert all((tmp_path / name).is_file() for name in [*metrics["figures"], "metrics.json", "model.pt"])


def test_a_corrupt_data_file_fails_cleanly(tmp_path):
    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    out = tmp_path / "out"
    with pytest.raises(common.UserError, match="corrupt"):
        ae.main(["--quick", "--device", "cpu", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out)])
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["config.json"]   # nothing half-written


def test_an_unwritable_out_fails_cleanly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(common.UserError, match="cannot write to output folder"):
        ae.main(["--quick", "--device", "cpu", "--out", str(blocker / "runs")])


def test_the_script_reports_bad_input_in_one_line_and_exits_non_zero(tmp_path):
    result = subprocess.run([sys.executable, "01_autoencoder.py", "--latent-dim", "-1", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=common.ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "latent-dim" in result.stderr
    shown = subprocess.run([sys.executable, "01_autoencoder.py", "--help"], capture_output=True, text=True, cwd=common.ROOT)
    assert shown.returncode == 0 and "--beta" in shown.stdout and "(default: 32)" in shown.stdout
