"""03_contrastive: every method's loss (NT-Xent, InfoNCE over a queue, BYOL/SimSiam, Barlow Twins, VICReg, mined
triplets), the EMA and the queue, geometry measures, augmentations and t-SNE against references; stop-gradients;
pre-training that runs the losses the lecture shows and lowers them for every method; end-to-end --quick runs that must
learn, or collapse under --ablate; bad input that must fail with one line.
The evaluation protocol itself (linear probe, kNN) is tested in tests/test_evaluation.py."""
import copy
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import evaluation

contrastive = common.import_script("03_contrastive")
ROOT = Path(__file__).resolve().parents[1]
OFF = dict(crop=0.0, flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0)


def images(seed, shape=(4, 3, 12, 10), dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- The encoder and NT-Xent ----

def test_encoder_shapes_for_gray_and_colour_images():
    for channels, side in ((1, 28), (3, 32), (3, 20)):
        model = contrastive.SimCLR(channels, width=4, hidden=16, projection=8, predictor=3)
        h, z, p = model(torch.rand(2, channels, side, side))
        assert h.shape == (2, 16) and z.shape == (2, 8) and p.shape == (2, 8)
    h, z, p = contrastive.SimCLR(3, width=4, hidden=16, projection=8)(torch.rand(2, 3, 8, 8))
    assert p is z                                                       # no predictor: p is z itself


def nt_xent_loop(z1, z2, temperature):
    """SimCLR's Eq. 1 written as in the paper: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t), averaged
    over the 2N ordered positive pairs (views 2k-1, 2k become rows k and k + N here)."""
    z = torch.cat([z1, z2])
    n = len(z)
    sim = lambda i, k: torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / temperature
    total = 0
    for i in range(n):
        j = (i + n // 2) % n
        denominator = sum(torch.exp(sim(i, k)) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(sim(i, j)) / denominator)
    return total / n


@pytest.mark.parametrize("batch, dim, temperature", [(2, 3, 0.1), (3, 5, 0.5), (7, 4, 1.0), (8, 16, 0.2)])
def test_nt_xent_matches_the_papers_formula(batch, dim, temperature):
    g = torch.Generator().manual_seed(batch * 100 + dim)
    z1 = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    ours = contrastive.nt_xent(z1, z2, temperature)
    reference = nt_xent_loop(z1, z2, temperature)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, (z1, z2)), torch.autograd.grad(reference, (z1, z2)))


def test_nt_xent_is_symmetric_scale_free_and_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(contrastive.nt_xent(z1, z2, 0.3), contrastive.nt_xent(z2, z1, 0.3))
    torch.testing.assert_close(contrastive.nt_xent(3 * z1, 0.5 * z2, 0.3), contrastive.nt_xent(z1, z2, 0.3))
    assert torch.autograd.gradcheck(lambda a, b: contrastive.nt_xent(a, b, 0.3), (z1, z2))


def test_nt_xent_rewards_matching_views_and_rejects_bad_input():
    z = torch.eye(4, dtype=torch.float64)
    perfect = contrastive.nt_xent(z, z, 0.1)
    assert perfect < 0.01 < contrastive.nt_xent(z, z.roll(1, 0), 0.1)
    with pytest.raises(common.UserError, match="no negatives"):
        contrastive.nt_xent(z[:1], z[:1], 0.1)
    for temperature in (0.0, math.inf, math.nan):
        with pytest.raises(common.UserError, match="temperature"):
            contrastive.nt_xent(z, z, temperature)


def test_positives_only_is_minus_mean_cosine_over_temperature():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(contrastive.positives_only(z1, z2, 0.5), -F.cosine_similarity(z1, z2).mean() / 0.5)


# ---- The other methods' losses, each against a loop over its paper's formula (float64, values and gradients) ----

def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)


def assert_same(ours, reference, inputs):
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, inputs), torch.autograd.grad(reference, inputs))


def cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


@pytest.mark.parametrize("batch, dim, keys", [(3, 4, 5), (6, 3, 12)])
def test_info_nce_over_a_queue_matches_moco_eq_1(batch, dim, keys):
    q, k = randn(1, batch, dim), randn(2, batch, dim)
    queue = F.normalize(randn(3, keys, dim).detach(), dim=1)
    total = 0
    for i in range(batch):          # -log exp(q.k+ / t) / (exp(q.k+ / t) + sum over the queue of exp(q.k / t))
        positive = torch.exp(cos(q[i], k[i]) / 0.2)
        total = total - torch.log(positive / (positive + sum(torch.exp(cos(q[i], key) / 0.2) for key in queue)))
    assert_same(contrastive.info_nce(q, k, 0.2, queue), total / batch, (q, k))


def test_prediction_loss_is_byols_normalised_squared_distance():
    p, z = randn(4, 5, 6), randn(5, 5, 6)
    reference = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(5)) / 5
    assert_same(contrastive.prediction_loss(p, z), reference, (p, z))


@pytest.mark.parametrize("batch, dim, weight", [(7, 3, 0.005), (5, 6, 0.5), (9, 4, 0.0)])
def test_barlow_twins_matches_its_eqs_1_and_2(batch, dim, weight):
    z1, z2 = randn(6, batch, dim), randn(7, batch, dim)
    standard = lambda z, d: (z[:, d] - z[:, d].mean()) / torch.sqrt(((z[:, d] - z[:, d].mean()) ** 2).mean() + 1e-5)
    total = 0
    for i in range(dim):
        for j in range(dim):
            c = (standard(z1, i) * standard(z2, j)).sum() / batch                    # Eq. 2
            total = total + ((1 - c) ** 2 if i == j else weight * c**2)            # Eq. 1
    assert_same(contrastive.barlow_twins(z1, z2, weight), total, (z1, z2))


@pytest.mark.parametrize("batch, dim, weights", [(6, 4, (25.0, 25.0, 1.0)), (9, 3, (1.0, 0.0, 2.0))])
def test_vicreg_matches_its_eqs_1_to_6(batch, dim, weights):
    z1, z2 = randn(8, batch, dim) * 0.4, randn(9, batch, dim) * 2
    invariance, variance, covariance = weights
    total = invariance * sum(((z1[i] - z2[i]) ** 2).sum() for i in range(batch)) / (batch * dim)   # Eq. 5 (code's mean)
    for z in (z1, z2):
        mean = [z[:, j].mean() for j in range(dim)]
        cov = lambda i, j: sum((z[b, i] - mean[i]) * (z[b, j] - mean[j]) for b in range(batch)) / (batch - 1)
        total = total + variance * sum(torch.relu(1 - torch.sqrt(cov(j, j) + 1e-4)) for j in range(dim)) / dim / 2
        total = total + covariance * sum(cov(i, j) ** 2 for i in range(dim) for j in range(dim) if i != j) / dim
    assert_same(contrastive.vicreg(z1, z2, *weights), total, (z1, z2))


@pytest.mark.parametrize("mining", ["hard", "semi-hard"])
def test_triplets_mine_what_a_loop_mines_and_match_facenet_eq_1(mining):
    a, p = randn(10, 12, 3), randn(11, 12, 3)
    na, np_ = F.normalize(a, dim=1), F.normalize(p, dim=1)
    total, picked_semi_hard = 0, 0
    for i in range(12):
        d = [((na[i] - np_[j]) ** 2).sum().item() for j in range(12)]
        others = [j for j in range(12) if j != i]
        negative = min(others, key=lambda j: d[j])
        farther = [j for j in others if d[j] > d[i]]
        if mining == "semi-hard" and farther:
            negative = min(farther, key=lambda j: d[j])
            picked_semi_hard += negative != min(others, key=lambda j: d[j])
        total = total + torch.relu(((na[i] - np_[i]) ** 2).sum() - ((na[i] - np_[negative]) ** 2).sum() + 0.3)
    assert_same(contrastive.triplet_loss(a, p, 0.3, mining), total / 12, (a, p))
    assert mining == "hard" or picked_semi_hard > 0                   # the two minings differ on this batch


# ---- The EMA target and MoCo's queue ----

def test_ema_update_is_the_formula_over_every_parameter_and_copies_buffers():
    torch.manual_seed(0)
    online = contrastive.SimCLR(3, width=2, hidden=8, projection=4, predictor=2)
    online(torch.rand(4, 3, 8, 8))                                      # running statistics away from their start
    target = contrastive.SimCLR(3, width=2, hidden=8, projection=4)
    before = {name: t.clone() for name, t in target.state_dict().items()}
    contrastive.ema_update(target, online, 0.9)
    theta = online.state_dict()
    for name, xi in target.named_parameters():
        torch.testing.assert_close(xi, 0.9 * before[name] + 0.1 * theta[name])
    for name, buffer in target.named_buffers():
        assert torch.equal(buffer, theta[name]), name
    assert contrastive.ema_rate(0, 50, 0.99) == 0.99 and contrastive.ema_rate(50, 50, 0.99) == 1.0
    assert contrastive.ema_rate(25, 50, 0.9) == pytest.approx(0.95)


def test_queue_is_first_in_first_out_and_keeps_its_size():
    queue, expected = torch.zeros(5, 2), [[0.0, 0.0]] * 5
    for step in range(4):
        keys = torch.tensor([[step, 0.0], [step, 1.0]])
        contrastive.enqueue(queue, keys)
        expected = (keys.tolist() + expected)[:5]                       # newest first, the oldest leave
        assert queue.tolist() == expected
    contrastive.enqueue(queue, torch.arange(14.0).view(7, 2))           # more keys than it holds: the first five
    assert queue.tolist() == torch.arange(10.0).view(5, 2).tolist()


# ---- The training step: both ways round, and what carries no gradient ----

def tiny_views(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)


def step_gradients(model, loss_fn, target=None, stop_gradient=False, seed=0):
    view1, view2 = tiny_views(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, keys = contrastive.contrastive_step(model, optimizer, view1, view2, 0.5, loss_fn, torch.device("cpu"),
                                              target, stop_gradient)
    return loss, keys, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_stop_gradient_and_the_ema_target_give_the_target_branch_no_gradient():
    torch.manual_seed(1)
    model = contrastive.SimCLR(3, width=2, hidden=8, projection=4, predictor=2).double().eval()
    loss_fn = lambda p, z, _: contrastive.prediction_loss(p, z)
    loss, _, stopped = step_gradients(model, loss_fn, stop_gradient=True)
    view1, view2 = tiny_views(0)
    _, z, p = model(torch.cat([view1, view2]))
    constant = z.detach().chunk(2)                                      # the target branch as numbers, by hand
    p1, p2 = p.chunk(2)
    reference = (contrastive.prediction_loss(p1, constant[1]) + contrastive.prediction_loss(p2, constant[0])) / 2
    expected = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(list(stopped.values()), list(expected))
    _, _, through = step_gradients(model, loss_fn, stop_gradient=False)     # SimSiam's ablation differs
    assert not torch.allclose(through["head.layers.0.weight"], stopped["head.layers.0.weight"])
    # BYOL and MoCo: the EMA network is used under no_grad, so it gets no gradient, and its keys come back
    target = copy.deepcopy(model).requires_grad_(True)
    target.predictor = torch.nn.Identity()
    _, keys, _ = step_gradients(model, loss_fn, target=target)
    assert all(t.grad is None for t in target.parameters())
    torch.testing.assert_close(keys, target(torch.cat(tiny_views(0)))[1].detach())


def test_the_step_averages_both_directions_and_nt_xent_is_its_own_mirror():
    torch.manual_seed(2)
    model = contrastive.SimCLR(3, width=2, hidden=8, projection=4).double().eval()
    loss, _, grads = step_gradients(model, contrastive.nt_xent)
    view1, view2 = tiny_views(0)
    z1, z2 = model(torch.cat([view1, view2]))[1].chunk(2)
    once = contrastive.nt_xent(z1, z2, 0.5)
    torch.testing.assert_close(loss, once.detach())
    torch.testing.assert_close(list(grads.values()), list(torch.autograd.grad(once, list(model.parameters()))))


# ---- Every method trains on the one loop; every ablation runs ----

@pytest.fixture(scope="module")
def tiny_shapes():
    return common.load_images("shapes", n_train=256, n_test=32, size=12)


def tiny_pretrain(data, method, ablate=False, epochs=4):
    cfg = contrastive.Config(**{**contrastive.QUICK, "method": method, "ablate": ablate, "epochs": epochs,
                                "batch_size": 32, "width": 4, "hidden": 32, "projection": 16, "queue": 64,
                                "warmup": 0.1, "lr": 1e-2})
    torch.manual_seed(0)
    return contrastive.pretrain(cfg, data, torch.device("cpu"))


@pytest.mark.parametrize("method", contrastive.METHODS)
def test_every_method_lowers_its_loss(tiny_shapes, method):
    _, history, stats = tiny_pretrain(tiny_shapes, method)
    start = 1 if method == "moco" else 0    # MoCo's first step meets the random keys its queue starts with: easy ones
    assert history["loss"][-1] < history["loss"][start], history["loss"]
    assert stats["steps"] == 32 and stats["ms_per_step"] > 0


@pytest.mark.parametrize("method", list(contrastive.ABLATION))
def test_every_ablation_runs(tiny_shapes, method):
    model, history, _ = tiny_pretrain(tiny_shapes, method, ablate=True, epochs=1)
    assert all(math.isfinite(loss) for loss in history["loss"])
    assert isinstance(model.predictor, torch.nn.Identity) == (method != "simsiam")   # BYOL's ablation: no predictor


def test_triplet_run_reports_violations_and_saves_features(tmp_path):
    _, metrics = contrastive.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--method", "triplet",
                                   "--mining", "hard", "--epochs", "1", "--n-train", "128", "--n-test", "64",
                                   "--save-features"])
    assert 0 <= metrics["geometry"]["trained"]["violating_triplets"] <= 1
    saved = np.load(tmp_path / "features.npz")
    assert saved["features"].shape == (64, 32) and saved["features"].dtype == np.float32
    assert saved["images"].shape == (64, 3, 16, 16) and saved["images"].dtype == np.uint8
    assert saved["labels"].shape == (64,) and saved["labels"].dtype == np.int64


# ---- Geometry ----

def test_alignment_and_uniformity_match_brute_force():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    na, nb = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    expected_alignment = sum(float((na[i] - nb[i]).norm() ** 2) for i in range(9)) / 9
    pairs = [math.exp(-2 * float((na[i] - na[j]).norm() ** 2)) for i in range(9) for j in range(9) if i != j]
    assert contrastive.alignment(a, b).item() == pytest.approx(expected_alignment, rel=1e-5)
    assert contrastive.uniformity(a).item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-4, abs=1e-5)
    assert contrastive.uniformity(torch.ones(5, 3)).item() == pytest.approx(0.0, abs=1e-6)   # collapsed


def test_effective_rank_and_spread_detect_collapse():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    singular = torch.linalg.svdvals(x - x.mean(0)) ** 2                 # eigenvalues of the covariance, up to N
    p = singular / singular.sum()
    assert contrastive.effective_rank(x).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-8)
    line = torch.randn(50, 1, generator=g) * torch.tensor([[1.0, 2.0, -1.0]])
    assert contrastive.effective_rank(line).item() == pytest.approx(1.0, abs=1e-3)
    assert contrastive.feature_std(torch.ones(10, 4) + 1e-3 * torch.randn(10, 4, generator=g)) < 1e-3
    x[3, 2] = math.nan                                                  # a diverged model's z: NaN, not LinAlgError
    assert math.isnan(contrastive.effective_rank(x).item())
    x[3, 2] = math.inf
    assert math.isnan(contrastive.effective_rank(x).item())


# ---- Evaluation: feature sets stacked for side-by-side probes, few-shot subsets ----

def test_probes_of_feature_sets_of_different_widths_stacked_equal_separate_ones():
    # the zero columns that stack_features adds must change nothing: each probe scores as it does alone
    g = torch.Generator().manual_seed(8)
    y = torch.randint(0, 5, (300,), generator=g)
    narrow = torch.randn(5, 3, generator=g)[y] + torch.randn(300, 3, generator=g)
    wide = torch.randn(5, 12, generator=g)[y] * 0.3 + torch.randn(300, 12, generator=g)
    stacked = contrastive.stack_features([narrow, wide])
    assert stacked.shape == (2, 300, 12) and (stacked[0, :, 3:] == 0).all()
    together = evaluation.linear_probe(stacked[:, :200], y[:200], stacked[:, 200:], y[200:], 5, min_steps=150)
    for features, ours in zip([narrow, wide], together):
        alone = evaluation.linear_probe(features[:200], y[:200], features[200:], y[200:], 5, min_steps=150)
        assert ours == pytest.approx(alone, abs=1 / 100)
    assert together[0] != together[1]


def test_per_class_subset_takes_that_many_of_each_class():
    labels = torch.arange(30) % 3
    idx = contrastive.per_class_subset(labels, 4, 3, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [4, 4, 4] and len(set(idx.tolist())) == 12
    assert sorted(contrastive.per_class_subset(labels, 20, 3, seed=0).tolist()) == list(range(30))   # fewer: all


# ---- Augmentations ----

@pytest.mark.parametrize("shape", [(4, 3, 12, 10), (3, 1, 9, 9)])
def test_augmentations_identity_range_shape_and_reproducibility(shape):
    x = images(7, shape)
    assert contrastive.augment(x, **OFF) is x
    for name, strength in dict(crop=0.9, flip=1.0, jitter=1.5, grayscale=1.0, blur=1.0).items():
        settings = {**OFF, name: strength}
        first = contrastive.augment(x, **settings, generator=torch.Generator().manual_seed(8))
        again = contrastive.augment(x, **settings, generator=torch.Generator().manual_seed(8))
        other = contrastive.augment(x, **settings, generator=torch.Generator().manual_seed(9))
        assert first.shape == x.shape and first.dtype == x.dtype, name
        assert 0 <= first.min() and first.max() <= 1, name
        assert torch.equal(first, again), name
        if not (name == "grayscale" and shape[1] == 1):                  # grayscale of gray is gray
            assert not torch.equal(first, x), name
        if name in ("crop", "jitter", "blur"):
            assert not torch.equal(first, other), name
    default = contrastive.augment(x)
    assert default.shape == x.shape and 0 <= default.min() and default.max() <= 1


def test_flip_and_grayscale_equal_their_definitions():
    x = images(10)
    torch.testing.assert_close(contrastive.augment(x, **{**OFF, "flip": 1.0}), x.flip(-1))
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(contrastive.augment(x, **{**OFF, "grayscale": 1.0}), gray[:, None].expand_as(x))


def test_gaussian_blur_matches_conv2d():
    x = images(11, (3, 2, 9, 11), torch.float64)
    sigma = torch.tensor([0.3, 0.8, 1.0], dtype=torch.float64)
    r = contrastive.BLUR_RADIUS
    expected = []
    for b in range(3):
        t = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * sigma[b] ** 2))
        kernel = (t[:, None] * t[None, :]) / t.sum() ** 2                # (K, K) outer product, sums to 1
        padded = F.pad(x[b:b + 1], (r, r, r, r), mode="reflect")
        expected.append(F.conv2d(padded, kernel.expand(2, 1, -1, -1), groups=2))
    torch.testing.assert_close(contrastive.gaussian_blur(x, sigma), torch.cat(expected))


def test_random_resized_crop_matches_a_bilinear_loop():
    x = images(12, (2, 1, 6, 8), torch.float64)
    ours = contrastive.random_resized_crop(x, 0.7, torch.Generator().manual_seed(13))
    g = torch.Generator().manual_seed(13)                                # replay the same draws
    area = 1 - 0.7 * torch.rand(2, generator=g, dtype=torch.float32)
    bound = torch.clamp(-area.log(), max=math.log(4 / 3))
    ratio = (bound * (2 * torch.rand(2, generator=g) - 1)).exp()
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()
    cx, cy = (1 - w) * (2 * torch.rand(2, generator=g) - 1), (1 - h) * (2 * torch.rand(2, generator=g) - 1)
    H, W = 6, 8
    pixel = lambda b, r, c: x[b, 0, min(max(r, 0), H - 1), min(max(c, 0), W - 1)]
    for b in range(2):
        for i in range(H):
            for j in range(W):
                u = ((w[b].item() * ((2 * j + 1) / W - 1) + cx[b].item()) + 1) * W / 2 - 0.5   # input column
                v = ((h[b].item() * ((2 * i + 1) / H - 1) + cy[b].item()) + 1) * H / 2 - 0.5   # input row
                c0, r0 = math.floor(u), math.floor(v)
                fu, fv = u - c0, v - r0
                value = ((1 - fv) * ((1 - fu) * pixel(b, r0, c0) + fu * pixel(b, r0, c0 + 1))
                         + fv * ((1 - fu) * pixel(b, r0 + 1, c0) + fu * pixel(b, r0 + 1, c0 + 1)))
                assert ours[b, 0, i, j].item() == pytest.approx(value.item(), abs=1e-5)


def test_hue_rotation_keeps_luminance_and_a_full_turn_is_identity():
    x = images(14, dtype=torch.float64)
    angle = torch.tensor([0.5, 1.0, -2.0, 3.0], dtype=torch.float64)
    turned = contrastive.rotate_hue(x, angle)
    torch.testing.assert_close(contrastive.to_gray(turned), contrastive.to_gray(x))
    torch.testing.assert_close(contrastive.rotate_hue(x, torch.full((4,), 2 * math.pi, dtype=torch.float64)), x)


def colour_jitter_by_hand(image, brightness, contrast, saturation, turn):
    """SimCLR's colour distortion of one image (C, H, W) with its own factors: brightness, contrast about the mean
    luminance, saturation away from the luminance, then each pixel's (I, Q) chroma turned by 2 pi turn."""
    luma = lambda y: 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2] if len(y) == 3 else y[0]
    y = (image * brightness).clamp(0, 1)
    mean = luma(y).mean()
    y = ((y - mean) * contrast + mean).clamp(0, 1)
    if len(image) == 3:
        y = ((y - luma(y)) * saturation + luma(y)).clamp(0, 1)
        to_yiq = torch.tensor(contrastive.RGB_TO_YIQ, dtype=torch.float64)
        yiq = torch.einsum("ij,jhw->ihw", to_yiq, y)
        angle = float(2 * math.pi * turn)
        i, q = yiq[1] * math.cos(angle) - yiq[2] * math.sin(angle), yiq[1] * math.sin(angle) + yiq[2] * math.cos(angle)
        y = torch.einsum("ij,jhw->ihw", torch.linalg.inv(to_yiq), torch.stack([yiq[0], i, q])).clamp(0, 1)
    return y


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_jitter_equals_each_image_distorted_alone(channels):
    x, strength = images(18, (6, channels, 5, 4), torch.float64), 1.0
    ours = contrastive.colour_jitter(x, strength, torch.Generator().manual_seed(21))
    g = torch.Generator().manual_seed(21)                                # replay the same draws, in the same order
    draw = lambda low, high: low + (high - low) * torch.rand(6, generator=g)
    factor = lambda: draw(max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength)
    brightness, contrast = factor(), factor()
    saturation, turn = (factor(), draw(-0.2 * strength, 0.2 * strength)) if channels == 3 else ([None] * 6, [None] * 6)
    applied = draw(0, 1) < contrastive.JITTER_PROBABILITY
    assert applied.any() and not applied.all()                           # both kinds of image are checked
    for b in range(6):
        expected = colour_jitter_by_hand(x[b], brightness[b], contrast[b], saturation[b], turn[b]) if applied[b] else x[b]
        torch.testing.assert_close(ours[b], expected)
    assert not torch.equal(ours[applied], x[applied])


def test_augment_rejects_impossible_strengths():
    for bad in (dict(crop=1.0), dict(flip=1.5), dict(jitter=-1.0), dict(jitter=math.inf), dict(jitter=1e39),
                dict(grayscale=-0.1), dict(blur=2.0), dict(crop=math.nan), dict(flip=math.nan)):
        with pytest.raises(common.UserError):
            contrastive.augment(images(15), **bad)


def test_view_batches_are_the_batches_of_order_with_partners_row_by_row():
    # with every augmentation off a view is its image, so each batch must be images[order] cut in runs of B,
    # the same rows in both views, over a chunk of VIEW_STEPS batches and a shorter last one
    B = 3
    stored = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(10))[: (contrastive.VIEW_STEPS + 2) * B]
    batches = list(contrastive.view_batches(stored, order, B, OFF))
    assert len(batches) == contrastive.VIEW_STEPS + 2
    for (view1, view2), idx in zip(batches, order.split(B)):
        expected = common.to_float(stored[idx])
        torch.testing.assert_close(view1, expected, rtol=0, atol=0)
        torch.testing.assert_close(view2, expected, rtol=0, atol=0)


# ---- Figures: t-SNE (common.tsne draws 03's embedding map) ----

def test_tsne_affinities_equal_a_bisection_per_row():
    x = torch.randn(25, 4, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    P = common.tsne_affinities(x, perplexity=5.0)
    squared = torch.cdist(x, x).square()
    conditional = torch.zeros(25, 25, dtype=torch.float64)
    for i in range(25):                       # each row's Gaussian width, found alone: entropy log(5) in nats
        others = [j for j in range(25) if j != i]
        low, high = -20.0, 20.0                                          # log of 1 / (2 sigma^2)
        for _ in range(100):
            p = torch.exp(-squared[i, others] * math.exp((low + high) / 2))
            p = p / p.sum()
            low, high = ((low + high) / 2, high) if -(p * p.log()).sum() > math.log(5.0) else (low, (low + high) / 2)
        conditional[i, others] = p
    torch.testing.assert_close(P, (conditional + conditional.T) / 50, rtol=1e-4, atol=1e-9)
    assert P.sum().item() == pytest.approx(1.0) and torch.equal(P, P.T) and (P.diagonal() == 0).all()


@pytest.mark.parametrize("exaggeration", [1.0, 12.0])
def test_tsne_gradient_is_autograd_of_its_kl_divergence(exaggeration):
    g = torch.Generator().manual_seed(20)
    P = common.tsne_affinities(torch.randn(15, 3, generator=g, dtype=torch.float64), perplexity=4.0)
    y = torch.randn(15, 2, generator=g, dtype=torch.float64, requires_grad=True)
    off = ~torch.eye(15, dtype=torch.bool)
    kernel = 1 / (1 + ((y[:, None] - y[None]) ** 2).sum(-1))             # (N, N) Student-t, Eq. 4
    Q = kernel[off] / kernel[off].sum()
    kl = (P[off] * (P[off] / Q).log()).sum()                             # KL(P || Q), Eq. 2
    # early exaggeration scales P in the attraction alone: the gradient of sum -a p log q_unnormalised + log Z
    objective = kl if exaggeration == 1 else -(exaggeration * P[off] * kernel[off].log()).sum() + kernel[off].sum().log()
    (expected,) = torch.autograd.grad(objective, y)
    torch.testing.assert_close(common.tsne_gradient(P, y.detach(), exaggeration), expected)


def test_tsne_keeps_two_far_clusters_apart():
    g = torch.Generator().manual_seed(22)
    x = torch.cat([torch.randn(100, 5, generator=g), torch.randn(100, 5, generator=g) + 8])
    xy = common.tsne(x)
    nearest = torch.cdist(xy, xy).fill_diagonal_(float("inf")).argmin(1)
    cluster = torch.arange(200) // 100
    assert torch.equal(cluster[nearest], cluster)              # every point's nearest neighbour on the map is its own kind


# ---- Training runs the lecture's objective ----

def pretraining_losses():
    """The recorded losses of 2 steps of pre-training on 128 embedded images at 16 x 16 pixels."""
    cfg = contrastive.Config(**{**contrastive.QUICK, "epochs": 1, "n_train": 128})
    data = common.load_images("shapes", n_train=128, n_test=64, size=16)
    torch.manual_seed(0)
    _, history, _ = contrastive.pretrain(cfg, data, torch.device("cpu"))
    return history["loss"]


def test_pretraining_minimises_the_nt_xent_the_lecture_shows(monkeypatch):
    real, nt_xent, batches = pretraining_losses(), contrastive.nt_xent, []

    def shifted(z1, z2, temperature):                       # the same gradient, so the same training, loss + 1
        batches.append(z1.shape)
        return nt_xent(z1, z2, temperature) + 1.0

    monkeypatch.setattr(contrastive, "nt_xent", shifted)
    assert pretraining_losses() == pytest.approx([loss + 1.0 for loss in real], abs=1e-5)
    assert batches == [(64, 32)] * 4                        # twice per step (both ways round), on the z of the views


# ---- End to end ----

def write_centred_shapes_as_cifar(data_dir, n_train=1024, n_test=256):
    """An easy variant of the embedded set in CIFAR-10's format, where load_images reads an extracted copy:
    large, nearly centred shapes whose colour, brightness and background vary. A few CPU seconds of
    pre-training can show learning on it; the full embedded set needs a GPU minute."""
    folder = data_dir / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def split(n, start):
        g = torch.Generator().manual_seed(start % 7)
        u = lambda: torch.rand(n, generator=g)
        factors = {"label": (u() * 10).long(), "colour": (u() * 8).long(), "scale": 0.6 + 0.2 * u(),
                   "x": 0.1 * (2 * u() - 1), "y": 0.1 * (2 * u() - 1), "rotation": 0.3 * (2 * u() - 1),
                   "texture": torch.zeros(n, dtype=torch.long), "brightness": 0.6 + 0.4 * u(), "background": 0.4 * u(),
                   "noise": 0.03 * u(), "stripe_angle": u(), "index": torch.arange(start, start + n), "seed": 0}
        return common.render_shapes(factors).reshape(n, -1).numpy(), factors["label"].tolist()

    x, y = split(n_train, 0)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": x[part], b"labels": [y[j] for j in part]}, f)
    x, y = split(n_test, common.TEST_OFFSET)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": x, b"labels": y}, f)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_centred_shapes_as_cifar(data_dir)
    runs = {}
    for ablate in ([], ["--ablate"]):
        out = tmp_path_factory.mktemp(f"quick{''.join(ablate)}")
        # 20 epochs (320 steps, about 10 CPU seconds): 6 teach the pretext task but not yet the classes; the
        # learning rate warms up over one epoch, as the default run's over one of its 40 (half as long fails)
        model, metrics = contrastive.main(["--quick", "--device", "cpu", "--out", str(out), *ablate,
                                           "--dataset", "cifar10", "--data-dir", str(data_dir), "--epochs", "20",
                                           "--warmup", "0.05"])
        runs["ablate" if ablate else "simclr"] = (out, model, metrics)
    return runs


def test_quick_run_learns_and_writes_everything(quick_runs):
    out, model, metrics = quick_runs["simclr"]
    loss = metrics["history"]["loss"]
    assert loss[-1] < loss[0] - 0.5
    retrieval = metrics["view_retrieval"]                   # the pretext task: find an image's other view
    assert retrieval["trained"] > 1.5 * retrieval["random"] and retrieval["random"] > 5 * retrieval["chance"]
    ours, random = metrics["evaluation"]["h"], metrics["evaluation"]["random_h"]
    assert ours["linear_top1"] > random["linear_top1"] + 0.1                     # chance is 0.1
    assert ours["knn_top1"] > random["knn_top1"] + 0.1
    for name in ("metrics.json", "config.json", "model.pt", "training.png", "views.png", "embedding_map.png",
                 "similarity.png", "invariance.png", "spectrum.png", "overview.png"):
        assert (out / name).is_file(), name
    reloaded = contrastive.SimCLR(3, 8, 64, 32)
    common.load_checkpoint(out / "model.pt", reloaded, kind="simclr")
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict())
    assert set(metrics["invariance"]["trained"]) == {f"augment: {name}" for name in contrastive.AUGMENTATIONS} | {"another class"}
    trained = metrics["geometry"]["trained"]
    assert len(trained["z_spectrum"]) == 32 and trained["z_spectrum"] == sorted(trained["z_spectrum"], reverse=True)
    assert trained["z_std_sqrt_dim"] == pytest.approx(trained["z_std"] * 32**0.5)


def test_without_negatives_the_representation_collapses(quick_runs):
    normal, collapsed = quick_runs["simclr"][2], quick_runs["ablate"][2]
    assert collapsed["geometry"]["trained"]["z_effective_rank"] < 0.5 * normal["geometry"]["trained"]["z_effective_rank"]
    assert collapsed["history"]["uniformity"][-1] > normal["history"]["uniformity"][-1]


def test_embedded_set_run_measures_the_invariance_to_each_factor(tmp_path):
    _, metrics = contrastive.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--epochs", "1",
                                   "--n-train", "256", "--method", "vicreg"])
    assert set(metrics["invariance"]["trained"]) >= {"augment: crop", "factor: colour", "factor: class"}
    assert metrics["method"] == "vicreg" and (tmp_path / "spectrum.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "1"], "no negatives"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "-0.5"], "temperature"),
    (["--augmentations", "crop,rotate"], "unknown augmentation"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--crop", "1"], "crop"),
    (["--warmup", "1"], "warmup"),
    (["--batch-size", "5000"], "larger than"),
    (["--no-such-option"], "unrecognized"),
])
def test_bad_input_is_a_user_error(tmp_path, argv, message):
    with pytest.raises(common.UserError, match=message):
        contrastive.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--lr", "nan"], "--lr must be positive and finite"),
    (["--temperature", "inf"], "--temperature must be positive and finite"),
    (["--method", "dino"], "invalid choice"),
    (["--method", "triplet", "--ablate"], "--ablate does not apply to --method triplet"),
    (["--method", "moco", "--queue", "100"], "smaller than the 128 keys of one step"),
    (["--ema", "1.5"], r"--ema is a rate and must be in \[0, 1\]"),
    (["--ema", "nan"], r"--ema is a rate"),
    (["--barlow-lambda", "0"], "--barlow-lambda must be positive"),
    (["--margin", "-1"], "--margin must be positive"),
    (["--validation", "1"], "--validation must be 0"),
    (["--jitter", "inf"], r"jitter strength must be in \[0, 100\]"),
    (["--jitter", "1e39"], r"jitter strength must be in \[0, 100\]"),       # finite, but overflows float32
    (["--crop", "nan"], "crop must be in"),
    (["--weight-decay", "inf"], "--weight-decay must be finite"),
    (["--warmup", "nan"], "--warmup must be in"),
    (["--n-test", "1"], "--n-test must be 0 .* or at least 2"),
])
def test_non_finite_or_too_few_is_refused_before_anything_is_written(tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(common.UserError, match=message):
        contrastive.main(["--quick", "--device", "cpu", "--out", str(out), *argv])
    assert not out.exists()


def test_divergence_stops_pretraining_with_one_message(tmp_path):
    # at --lr 1e9 the first update already makes z NaN: the geometry read after step 1 sees it (no LinAlgError)
    write_centred_shapes_as_cifar(tmp_path, n_train=128, n_test=16)      # rendering the embedded set takes seconds
    out = tmp_path / "out"
    with pytest.raises(common.UserError, match=r"training diverged \(pre-train: .* at step 1 .*lower --lr"):
        contrastive.main(["--quick", "--device", "cpu", "--out", str(out), "--dataset", "cifar10",
                          "--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "16", "--image-size", "8",
                          "--lr", "1e9"])
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    with pytest.raises(common.UserError, match=r"the loss is nan at step 7\); lower --lr \(it is 0.1\)"):
        contrastive.check_finite("tau=0.5", math.nan, 0.3, 7, 0.1)
    contrastive.check_finite("pre-train", 4.2, 0.3, 7, 0.1)                # finite: nothing to say


def test_corrupt_data_is_a_user_error(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"\0\0\x08\x03garbage")
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        contrastive.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "out"), "--dataset", "fashion-mnist",
                          "--data-dir", str(tmp_path)])


def test_command_line_error_is_one_line_and_nonzero(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "03_contrastive.py"), "--batch-size", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_validation_is_held_out_from_the_training_images():
    data = common.ImageData("toy", torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10),
                            torch.zeros(3, 1, 1, 1, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), ["a"])
    held = contrastive.hold_out(data, 4)
    assert held.x_train.flatten().tolist() == list(range(6)) and held.x_test.flatten().tolist() == [6, 7, 8, 9]
    assert held.y_test.tolist() == [6, 7, 8, 9] and held.y_train.tolist() == list(range(6))
    with pytest.raises(common.UserError, match="leaves no training images"):
        contrastive.hold_out(data, 10)
