"""04_vit: every from-scratch piece against its PyTorch reference (float64, values and gradients), the
symmetries the architectures promise, and end-to-end --quick runs that must learn and fail cleanly."""
import json
import math
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import matplotlib.image
import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

vit = common.import_script("04_vit")


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def assert_same_values_and_grads(ours, reference, inputs):
    """ours(*inputs) == reference(*inputs), and so are the gradients of a random projection of them."""
    out_ours, out_ref = ours(*inputs), reference(*inputs)
    torch.testing.assert_close(out_ours, out_ref)
    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(7), dtype=out_ours.dtype)
    grads_ours = torch.autograd.grad((out_ours * weights).sum(), inputs)
    grads_ref = torch.autograd.grad((out_ref * weights).sum(), inputs)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b)


# ---- parity with PyTorch's built-ins ----

@pytest.mark.parametrize("B,H,T,D", [(2, 3, 5, 8), (1, 1, 7, 3), (3, 2, 17, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_scaled_dot_product_attention(B, H, T, D, masked):
    g = torch.Generator().manual_seed(B * 100 + T)
    q, k, v = (randn(g, B, H, T, D).requires_grad_() for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool).tril() if masked else None    # causal, as 05's text encoder uses
    assert_same_values_and_grads(lambda *x: vit.attention(*x, mask=mask),
                                 lambda *x: F.scaled_dot_product_attention(*x, attn_mask=mask), (q, k, v))


@pytest.mark.parametrize("dim,heads,T", [(12, 3, 5), (8, 1, 9), (16, 4, 1)])
def test_multi_head_attention_matches_nn_multihead_attention(dim, heads, T):
    torch.manual_seed(dim + T)
    ours = vit.MultiHeadAttention(dim, heads).double()
    reference = nn.MultiheadAttention(dim, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        reference.in_proj_weight.copy_(ours.qkv.weight)             # Q, K, V stacked in the same order
        reference.in_proj_bias.copy_(ours.qkv.bias)
        reference.out_proj.weight.copy_(ours.proj.weight)
        reference.out_proj.bias.copy_(ours.proj.bias)
    x = randn(torch.Generator().manual_seed(1), 3, T, dim).requires_grad_()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert_same_values_and_grads(ours, lambda x: reference(x, x, x, need_weights=False)[0], (x,))
    # nn.MultiheadAttention's boolean mask marks what may NOT be attended: the opposite convention
    assert_same_values_and_grads(lambda x: ours(x, causal),
                                 lambda x: reference(x, x, x, attn_mask=~causal, need_weights=False)[0], (x,))
    # and its parameter gradients agree too
    (ours(x).square().sum()).backward()
    (reference(x, x, x, need_weights=False)[0].square().sum()).backward()
    torch.testing.assert_close(ours.qkv.weight.grad, reference.in_proj_weight.grad)
    torch.testing.assert_close(ours.qkv.bias.grad, reference.in_proj_bias.grad)
    torch.testing.assert_close(ours.proj.weight.grad, reference.out_proj.weight.grad)
    torch.testing.assert_close(ours.proj.bias.grad, reference.out_proj.bias.grad)


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 7), (5, 1)])
def test_layer_norm_matches_f_layer_norm(shape):
    g = torch.Generator().manual_seed(len(shape))
    ours = vit.LayerNorm(shape[-1]).double()
    with torch.no_grad():
        ours.weight.copy_(randn(g, shape[-1]))
        ours.bias.copy_(randn(g, shape[-1]))
    x = (3 * randn(g, *shape) + 2).requires_grad_()
    assert_same_values_and_grads(ours, lambda x: F.layer_norm(x, shape[-1:], ours.weight, ours.bias, ours.eps), (x,))


@pytest.mark.parametrize("C,size,P,E", [(3, 8, 4, 5), (1, 12, 3, 7), (2, 6, 6, 4)])
def test_patch_embedding_by_reshape_matches_strided_conv(C, size, P, E):
    g = torch.Generator().manual_seed(size)
    linear = nn.Linear(C * P * P, E).double()
    conv = nn.Conv2d(C, E, kernel_size=P, stride=P).double()
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(E, C, P, P))        # patchify flattens channel first, as conv
        conv.bias.copy_(linear.bias)
    x = randn(g, 2, C, size, size).requires_grad_()
    assert_same_values_and_grads(lambda x: linear(vit.patchify(x, P)),
                                 lambda x: conv(x).flatten(2).transpose(1, 2), (x,))   # (B, E, h, w) -> (B, N, E)
    torch.testing.assert_close(vit.unpatchify(vit.patchify(x, P), P, C), x)


def test_block_matches_pre_norm_transformer_encoder_layer():
    torch.manual_seed(0)
    dim, heads, ratio = 12, 3, 2
    ours = vit.Block(dim, heads, ratio).double()
    reference = nn.TransformerEncoderLayer(dim, heads, ratio * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True, dtype=torch.float64)
    with torch.no_grad():
        for p in ours.parameters():                                 # non-trivial norms and biases
            p.add_(0.1 * torch.randn_like(p))
        for name, target in [("attn.qkv.weight", "self_attn.in_proj_weight"), ("attn.qkv.bias", "self_attn.in_proj_bias"),
                             ("attn.proj.weight", "self_attn.out_proj.weight"), ("attn.proj.bias", "self_attn.out_proj.bias"),
                             ("mlp.0.weight", "linear1.weight"), ("mlp.0.bias", "linear1.bias"),
                             ("mlp.2.weight", "linear2.weight"), ("mlp.2.bias", "linear2.bias"),
                             ("norm1.weight", "norm1.weight"), ("norm1.bias", "norm1.bias"),
                             ("norm2.weight", "norm2.weight"), ("norm2.bias", "norm2.bias")]:
            reference.get_parameter(target).copy_(ours.get_parameter(name))
    x = randn(torch.Generator().manual_seed(3), 2, 6, dim).requires_grad_()
    assert_same_values_and_grads(ours, reference, (x,))


# ---- the model's promises ----

def small_vit(pos_embedding, channels=2, num_classes=0):
    torch.manual_seed(0)
    model = vit.ViT(image_size=12, patch_size=3, in_channels=channels, dim=8, depth=2, heads=2, mlp_ratio=2,
                    num_classes=num_classes, pos_embedding=pos_embedding)
    with torch.no_grad():                                           # larger weights than the init: a non-trivial map
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double()


def test_without_position_embeddings_permuting_patches_permutes_tokens():
    x = randn(torch.Generator().manual_seed(0), 3, 2, 12, 12)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    permuted = vit.unpatchify(vit.patchify(x, 3)[:, perm], 3, 2)
    free, placed = small_vit(False), small_vit(True)
    tokens, moved = free.tokens(x), free.tokens(permuted)
    torch.testing.assert_close(moved[:, 1:], tokens[:, 1:][:, perm])            # equivariant patch tokens
    torch.testing.assert_close(moved[:, 0], tokens[:, 0])                        # invariant class token
    tokens, moved = placed.tokens(x), placed.tokens(permuted)
    assert vit.relative_error(moved[:, 1:], tokens[:, 1:][:, perm]) > 1e-2       # positions break the symmetry


def test_equivariance_report_on_images():
    model, cnn = small_vit(True, channels=3, num_classes=4).float(), vit.ConvNet(3, 4, 4)
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    report = vit.equivariance(model, cnn, x, seed=0)
    assert report["vit_without_positions"]["permute_patches"] < 1e-12
    assert report["vit_without_positions"]["shift_one_patch"] < 1e-12
    assert report["vit_without_positions"]["class_token_after_permutation"] < 1e-12
    assert report["vit"]["permute_patches"] > 1e-2 and report["vit"]["shift_one_patch"] > 1e-2
    assert report["cnn_first_stage"]["shift_one_patch"] < 1e-12
    assert report["cnn_first_stage"]["permute_patches"] > 1e-2


def test_features_and_logits_shapes_and_interface():
    model = vit.ViT(image_size=8, patch_size=4, in_channels=3, dim=12, depth=1, heads=3, num_classes=5)
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 5) and model.features(x).shape == (2, 12) and model.dim == 12
    assert len(model.hidden_states(x)) == 2
    rebuilt = vit.ViT(**model.arch)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))
    assert vit.ViT(image_size=8, patch_size=4, dim=12, heads=3, depth=1)(x).shape == (2, 12)   # no head: features


def test_attention_rollout_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 5, 5, generator=g).softmax(-1) for _ in range(3)]
    expected = torch.stack([torch.eye(5)] * 2)
    for weights in maps:
        for i in range(2):
            mixing = 0.5 * weights[i].mean(0) + 0.5 * torch.eye(5)
            mixing = mixing / mixing.sum(1, keepdim=True)
            expected[i] = mixing @ expected[i]
    torch.testing.assert_close(vit.attention_rollout(maps), expected[:, 0, 1:])


# ---- MAE and DINO against loops over their formulas ----

@pytest.mark.parametrize("N,ratio", [(16, 0.75), (9, 0.5), (7, 0.9)])
def test_masking_keeps_round_n_patches_and_restore_inverts_the_permutation(N, ratio):
    torch.manual_seed(N)
    keep, restore, mask = vit.random_masking(5, N, ratio, torch.device("cpu"))
    visible = round(N * (1 - ratio))
    assert keep.shape == (5, visible) and (mask.sum(1) == N - visible).all()
    for b in range(5):
        kept = set(keep[b].tolist())
        assert len(kept) == visible and all(mask[b, i] == (i not in kept) for i in range(N))
        # the decoder's order: the kept patches, then the hidden ones; restore must put every patch back
        hidden = [i for i in range(N) if i not in kept]
        shuffled = keep[b].tolist() + [i for i in restore[b].argsort().tolist() if i in hidden]
        assert [shuffled[restore[b, i]] for i in range(N)] == list(range(N))


def test_mae_loss_matches_a_loop_over_the_hidden_patches():
    g = torch.Generator().manual_seed(0)
    images = randn(g, 3, 2, 8, 8)
    patches = vit.patchify(images, 4)                                # (3, 4, 32)
    prediction = randn(g, 3, 4, 32).requires_grad_()
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)

    def loop(prediction):
        terms = []
        for b in range(3):
            for i in range(4):
                if mask[b, i]:
                    x = patches[b, i]
                    target = (x - x.mean()) / (x.var() + 1e-6).sqrt()
                    terms.append(((prediction[b, i] - target) ** 2).mean())
        return torch.stack(terms).mean()

    assert_same_values_and_grads(lambda p: vit.mae_loss(p, images, mask, 4), loop, (prediction,))


def test_the_encoder_never_sees_a_hidden_patch():
    model = small_vit(True)
    torch.manual_seed(1)
    images = torch.randn(4, 2, 12, 12, dtype=torch.float64)
    keep, restore, mask = vit.random_masking(4, 16, 0.75, torch.device("cpu"))
    hidden = vit.unpatchify(mask[:, :, None].expand(-1, -1, 18).double(), 3, 2).bool()     # (4, 2, 12, 12)
    poisoned = images.masked_fill(hidden, 1e6)
    torch.testing.assert_close(model.tokens(poisoned, keep), model.tokens(images, keep))
    assert vit.relative_error(model.tokens(poisoned), model.tokens(images)) > 0.1           # all patches: it sees them
    decoder = vit.MAEDecoder(16, 8, 18, dim=8, depth=1, heads=2).double()
    assert decoder(model.tokens(images, keep), restore).shape == (4, 16, 18)


@pytest.mark.parametrize("B,K", [(4, 6), (3, 17)])
def test_dino_cross_entropy_matches_a_loop_and_gives_the_teacher_no_gradient(B, K):
    g = torch.Generator().manual_seed(K)
    teacher, student, center = randn(g, B, K).requires_grad_(), randn(g, B, K).requires_grad_(), randn(g, K)

    def loop(teacher, student):
        total = 0
        for b in range(B):
            t = torch.exp((teacher[b].detach() - center) / 0.04)
            t = t / t.sum()
            s = torch.exp(student[b] / 0.1)
            total = total - sum(t[k] * torch.log(s[k] / s.sum()) for k in range(K))
        return total / B

    ours = vit.dino_cross_entropy(teacher, student, center, 0.04, 0.1)
    torch.testing.assert_close(ours, loop(teacher, student))
    grad_ours, = torch.autograd.grad(ours, student)
    grad_loop, = torch.autograd.grad(loop(teacher, student), student)
    torch.testing.assert_close(grad_ours, grad_loop)
    ours = vit.dino_cross_entropy(teacher, student, center, 0.04, 0.1)
    ours.backward()
    assert teacher.grad is None                                      # stop-gradient: nothing reaches the teacher
    views = [randn(g, B, K) for _ in range(4)]                       # 2 global, 2 local student views
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    expected = sum(vit.dino_cross_entropy(views[i], views[j], center, 0.04, 0.1) for i, j in pairs) / 6
    torch.testing.assert_close(vit.dino_loss(views[:2], views, center, 0.04, 0.1), expected)


def test_dino_centre_and_teacher_follow_their_moving_averages():
    g = torch.Generator().manual_seed(0)
    center, outputs = randn(g, 5), randn(g, 8, 5)
    torch.testing.assert_close(vit.update_center(center, outputs, 0.9), 0.9 * center + 0.1 * outputs.mean(0))
    student, teacher = vit.DINOHead(6, 5, hidden=7, bottleneck=3).double(), vit.DINOHead(6, 5, hidden=7, bottleneck=3).double()
    before = [p.clone() for p in teacher.parameters()]
    vit.contrastive.ema_update(teacher, student, 0.99)               # DINO's teacher update is 03's EMA
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * s)
    assert vit.DINOHead(6, 5)(torch.randn(2, 6)).abs().max() <= 1 + 1e-6     # cosines to unit prototypes


def test_dino_teacher_momentum_rises_from_ema_to_one_on_a_cosine(monkeypatch):
    """DINO Sec. 3.1: l follows a cosine from --ema to 1 over the pre-training's steps, one EMA update per step."""
    rates = []
    monkeypatch.setattr(vit.contrastive, "ema_update", lambda teacher, student, rate: rates.append(rate))
    data = SimpleNamespace(x_train=common.make_shapes(64, seed=1)[0], x_test=None)
    cfg = replace(tiny_config(), pretrain="dino", ema=0.9, pretrain_epochs=3)
    vit.pretrain_dino(vit.build_model("vit", cfg, 0), data, vit.channel_stats(data.x_train), cfg, torch.device("cpu"))
    steps = 3 * (64 // 32)
    expected = [1 - 0.1 * (math.cos(math.pi * k / steps) + 1) / 2 for k in range(steps)]
    assert rates == pytest.approx(expected)
    assert rates[0] == pytest.approx(0.9) and rates == sorted(rates)


def test_a_smaller_image_reads_the_resized_grid_of_position_embeddings():
    model = small_vit(True)                                          # 12 pixels, patch 3: a 4 x 4 grid
    assert model.features(torch.randn(2, 2, 6, 6, dtype=torch.float64)).shape == (2, 8)   # a local crop: 2 x 2 patches
    assert model.positions(17) is model.pos_embedding
    with torch.no_grad():                                            # one vector at every place resizes to itself
        model.pos_embedding[0, 1:] = model.pos_embedding[0, 1]
    torch.testing.assert_close(model.positions(5)[0, 1:], model.pos_embedding[0, 1].expand(4, 8))
    torch.testing.assert_close(model.positions(5)[0, 0], model.pos_embedding[0, 0])


def test_weight_decay_only_on_the_weight_matrices_of_linear_and_conv_layers():
    model = nn.ModuleDict({"vit": vit.ViT(image_size=8, patch_size=4, dim=12, depth=1, heads=3, num_classes=5),
                           "cnn": vit.ConvNet(3, 4, 5), "table": nn.Embedding(7, 12)})
    decay, rest = vit.decay_groups(model, 0.3)
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.3, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {name for name, p in model.named_parameters()
                if name.endswith("weight") and p.ndim in (2, 4) and not name.startswith("table")}
    assert decayed == expected and "vit.patch_embed.weight" in decayed and "cnn.stages.0.0.weight" in decayed
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_vit_overfits_one_batch():
    torch.manual_seed(0)
    model = vit.ViT(image_size=8, patch_size=4, in_channels=3, dim=32, depth=2, heads=4, num_classes=4)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (model(x).argmax(1) == y).all() and loss.item() < 0.05


# ---- training runs the lecture's functions ----

def tiny_data(n_train=64, n_test=32):
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = lambda n: torch.randint(0, 10, (n,), generator=g)
    return SimpleNamespace(x_train=images(n_train), y_train=labels(n_train), x_test=images(n_test),
                           y_test=labels(n_test), classes=[str(c) for c in range(10)])


def tiny_config():
    return common.parse_config(vit.Config, ["--quick", "--batch-size", "32", "--epochs", "2", "--pretrain-epochs", "2"],
                               "", quick=vit.QUICK)


def classifier_losses(data):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = vit.build_model("vit", cfg, len(data.classes))
    history = vit.train_classifier(model, data, vit.channel_stats(data.x_train), torch.arange(len(data.x_train)), cfg,
                                   torch.device("cpu"), "tiny")
    return [record["loss"] for record in history]


def simclr_losses(data):
    torch.manual_seed(0)
    cfg = tiny_config()
    encoder = vit.build_model("vit", cfg, num_classes=0)
    history, _ = vit.pretrain_simclr(encoder, data, vit.channel_stats(data.x_train), replace(cfg, pretrain="simclr"),
                                     torch.device("cpu"))
    return [record["loss"] for record in history]


def test_training_runs_the_attention_the_lecture_shows(monkeypatch):
    data = tiny_data()
    plain = classifier_losses(data)
    assert classifier_losses(data) == plain                         # the run repeats exactly
    calls = []

    def no_mixing(q, k, v, mask=None):                              # every token reads only itself
        calls.append(q.shape)
        return v

    monkeypatch.setattr(vit, "attention", no_mixing)
    patched = classifier_losses(data)
    assert calls and patched != plain


def test_simclr_pretraining_runs_03s_nt_xent(monkeypatch):
    contrastive = common.import_script("03_contrastive")
    assert vit.contrastive is contrastive
    data = tiny_data()
    plain = simclr_losses(data)
    nt_xent = contrastive.nt_xent
    # the same gradients, so the same steps: the recorded loss must be NT-Xent's plus exactly 1
    monkeypatch.setattr(contrastive, "nt_xent", lambda z1, z2, temperature: nt_xent(z1, z2, temperature) + 1.0)
    assert simclr_losses(data) == pytest.approx([loss + 1 for loss in plain], abs=1e-5)


# ---- end to end ----

def read_metrics(out):
    return json.loads((out / "metrics.json").read_text())


def write_idx(path, array):
    """An uncompressed IDX file of unsigned bytes: magic 0x0000080N, N big-endian sizes, then the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype("uint8").tobytes())


def easy_fashion_mnist(folder, n_train=1200, n_test=600):
    """A learnable stand-in for Fashion-MNIST, in its decompressed file format: class c is a bright bar in
    row band c % 5, 4 or 12 pixels wide (c // 5), near the centre, on noise: mirror images keep their class.
    A model that learns anything learns this in a few hundred steps; one that does not stays at 10%."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.rand(n, 28, 28, generator=g) * 80
        top = (2 + 5 * (labels % 5))[:, None, None]
        half = (2 + 4 * (labels // 5))[:, None, None]
        centre = 14 + torch.randint(-2, 3, (n, 1, 1), generator=g)
        rows, cols = torch.arange(28)[None, :, None], torch.arange(28)[None, None, :]
        inside = (rows >= top) & (rows < top + 4) & (cols >= centre - half) & (cols < centre + half)
        images[inside] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte", images.numpy())
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels.numpy())


def test_quick_vit_learns_and_writes_everything(tmp_path):
    easy_fashion_mnist(tmp_path / "data" / "fashion-mnist")
    out = tmp_path / "run"
    model, metrics = vit.main(["--quick", "--device", "cpu", "--out", str(out), "--dataset", "fashion-mnist",
                               "--data-dir", str(tmp_path / "data")])
    history = metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert metrics["top1"] > 0.6                                    # chance is 0.10
    for name in ("metrics.json", "config.json", "curves.png", "depth.png", "attention.png", "positions.png", "vit.pt"):
        assert (out / name).stat().st_size > 0, name
    probe = metrics["depth_probe"]
    assert len(probe["class_token"]) == model.arch["depth"] + 1
    assert probe["class_token"][0] < 0.2                             # before block 1 it is one vector for all images
    assert probe["class_token"][-1] > probe["class_token"][0] + 0.3  # attention brought it what it knows
    eq = metrics["equivariance"]
    assert eq["vit_without_positions"]["permute_patches"] < 1e-10 and eq["vit"]["permute_patches"] > 1e-2
    assert read_metrics(out)["top1"] == metrics["top1"]
    common.load_checkpoint(out / "vit.pt", vit.ViT(**model.arch), kind="vit-classifier")


def test_quick_cnn_learns(tmp_path):
    easy_fashion_mnist(tmp_path / "data" / "fashion-mnist")
    model, metrics = vit.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "run"), "--model", "cnn",
                               "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
                               "--image-size", "16", "--patch-size", "4", "--epochs", "3"])
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"] - 0.3   # it learns most in epoch 1
    assert metrics["top1"] > 0.6
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "cnn.pt").is_file()
    assert metrics["equivariance"]["cnn_first_stage"]["shift_one_patch"] < 1e-10


def test_quick_mae_pretraining_with_labels_reports_probes_and_saves_a_loadable_vit(tmp_path):
    _, metrics = vit.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--pretrain", "mae", "--n-train", "200",
                           "--n-test", "100", "--train-fraction", "0.5", "--epochs", "1", "--pretrain-epochs", "2",
                           "--probe-steps", "20", "--probe-samples", "50", "--batch-size", "50"])
    pre = metrics["pretrain"]
    for key in ("probe_top1", "random_encoder_probe_top1", "knn_top1", "pixels_knn_top1", "finetune_test_top1",
                "scratch_test_top1"):
        assert 0 <= pre[key] <= 1
    for name in ("reconstruction.png", "attention_compare.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    state = torch.load(tmp_path / "vit_mae.pt", weights_only=True)
    encoder = vit.ViT(**state["arch"])
    common.load_checkpoint(tmp_path / "vit_mae.pt", encoder, kind="vit")
    assert encoder.features(torch.zeros(1, 3, 32, 32)).shape == (1, encoder.dim)
    # a checkpoint of another shape is refused in one line
    with pytest.raises(common.UserError, match="does not fit"):
        vit.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "again"), "--init", str(tmp_path / "vit_mae.pt"),
                  "--dim", "64", "--heads", "2"])


@pytest.mark.parametrize("method,options", [
    ("mae", ["--pretrain-epochs", "4"]),
    ("simclr", ["--pretrain-epochs", "3"]),
    # a fast teacher and a slow centre: DINO's loss falls within a few steps
    ("dino", ["--pretrain-epochs", "3", "--ema", "0.98", "--pretrain-lr", "1e-3", "--center-momentum", "0.99"])])
def test_each_pretraining_lowers_its_loss(method, options):
    images, _, _ = common.make_shapes(64, seed=1)                    # structure to learn (noise has none for MAE)
    data = SimpleNamespace(x_train=images, x_test=images[:8])
    cfg = common.parse_config(vit.Config, ["--quick", "--batch-size", "32", "--pretrain", method, *options], "",
                              quick=vit.QUICK)
    torch.manual_seed(0)
    encoder = vit.build_model("vit", cfg, num_classes=0)
    history, _ = vit.PRETRAINERS[method](encoder, data, vit.channel_stats(data.x_train), cfg, torch.device("cpu"))
    losses = [record["loss"] for record in history]
    assert losses[-1] < losses[0] - 0.01, losses
    if method == "dino":
        for record in history:                                      # the collapse checks, every epoch
            assert 0 <= record["teacher_entropy_of_mean"] <= math.log(cfg.dino_dim) + 1e-4
            assert 0 <= record["teacher_mean_entropy"] <= record["teacher_entropy_of_mean"] + 1e-4   # concavity


@pytest.mark.parametrize("method,objective", [("mae", "mae_loss"), ("dino", "dino_loss")])
def test_pretraining_runs_the_objective_the_lecture_shows(monkeypatch, method, objective):
    images, _, _ = common.make_shapes(32, seed=1)
    data = SimpleNamespace(x_train=images, x_test=images[:8])
    cfg = common.parse_config(vit.Config, ["--quick", "--batch-size", "16", "--pretrain", method, "--pretrain-epochs", "2"],
                              "", quick=vit.QUICK)

    def losses():
        torch.manual_seed(0)
        encoder = vit.build_model("vit", cfg, num_classes=0)
        history, _ = vit.PRETRAINERS[method](encoder, data, vit.channel_stats(data.x_train), cfg, torch.device("cpu"))
        return [record["loss"] for record in history]

    plain, original = losses(), getattr(vit, objective)
    # the same gradients, so the same steps: the recorded loss must be the objective's plus exactly 1
    monkeypatch.setattr(vit, objective, lambda *args: original(*args) + 1.0)
    assert losses() == pytest.approx([loss + 1 for loss in plain], abs=1e-5)


def test_dino_ablations_collapse_and_the_checks_say_how():
    """The lecture's sentence, by the numbers: without centring one dimension wins (the teacher's mean output has
    little entropy); without sharpening the output is uniform (per-image entropy and loss at ln K)."""
    images, _, _ = common.make_shapes(64, seed=1)
    data = SimpleNamespace(x_train=images, x_test=images[:8])
    last = {}
    for ablation in ("--no-centering", "--no-sharpening"):
        cfg = common.parse_config(vit.Config, ["--quick", "--batch-size", "32", "--pretrain", "dino", "--pretrain-epochs",
                                               "10", "--ema", "0.9", "--pretrain-lr", "1e-3", ablation], "", quick=vit.QUICK)
        torch.manual_seed(0)
        encoder = vit.build_model("vit", cfg, num_classes=0)
        last[ablation] = vit.pretrain_dino(encoder, data, vit.channel_stats(data.x_train), cfg, torch.device("cpu"))[0][-1]
    ln_k = math.log(vit.QUICK["dino_dim"])
    assert last["--no-centering"]["teacher_entropy_of_mean"] < 0.3 * ln_k
    assert last["--no-sharpening"]["teacher_mean_entropy"] > 0.98 * ln_k
    assert last["--no-sharpening"]["loss"] == pytest.approx(ln_k, abs=0.05)


def make_caption_folder(folder, n=24):
    """n small PNG images of the embedded set, one caption each: a captions folder as a user would have it."""
    folder.mkdir()
    images, labels, _ = common.make_shapes(n, seed=3)
    rows = [("image", "caption")]
    for i in range(n):
        matplotlib.image.imsave(folder / f"{i}.png", images[i].permute(1, 2, 0).numpy())
        rows.append((f"{i}.png", f"a {common.SHAPES[int(labels[i])]}"))
    (folder / "captions.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")


def test_pretraining_on_a_captions_folder_saves_an_encoder_that_05_loads(tmp_path, capsys):
    make_caption_folder(tmp_path / "pics")
    out = tmp_path / "run"
    encoder, metrics = vit.main(["--quick", "--device", "cpu", "--out", str(out), "--pretrain", "dino", "--dataset",
                                 "captions", "--data-dir", str(tmp_path / "pics"), "--batch-size", "8",
                                 "--pretrain-epochs", "1", "--local-crops", "2", "--image-size", "32"])
    assert "has no labels, so the labelled evaluation" in capsys.readouterr().out
    pre = metrics["pretrain"]
    assert "top1" not in metrics and pre["ln_K"] == pytest.approx(math.log(128))
    assert len(pre["teacher_entropy_of_mean"]) == len(pre["loss"]) >= 1
    assert (out / "attention_compare.png").is_file() and read_metrics(out)["pretrain"]["loss"] == pre["loss"]
    clip = common.import_script("05_clip")
    _, clip_metrics = clip.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "clip"), "--dataset", "captions",
                                 "--data-dir", str(tmp_path / "pics"), "--batch-size", "8", "--steps", "3",
                                 "--init-image", str(out / "vit_dino.pt"),
                                 # 05's --quick shrinks its own encoder; the checkpoint's shape is given to agree with it
                                 *[f"--{o}={encoder.arch[k]}" for o, k in [("patch-size", "patch_size"), ("image-dim", "dim"),
                                                                          ("image-depth", "depth"), ("image-heads", "heads")]]])
    loaded = vit.ViT(**torch.load(out / "vit_dino.pt", weights_only=True)["arch"])
    common.load_checkpoint(out / "vit_dino.pt", loaded, kind="vit")
    assert loaded.arch == encoder.arch and (tmp_path / "clip" / "metrics.json").is_file()


def test_pretraining_images_are_05s_training_images_whatever_the_seed(tmp_path):
    """04 --seed 3 pre-trains on a captions folder's training images; 05 at --seed 0 and 5 tests on the rest: the split
    is the set's, not the run's, so no image 05 tests on was ever seen by the encoder it starts from."""
    make_caption_folder(tmp_path / "pics", n=40)
    clip = common.import_script("05_clip")
    cfg = vit.Config(dataset="captions", data_dir=str(tmp_path / "pics"), image_size=32, seed=3, pretrain="dino")
    seen = {bytes(image.numpy()) for image in vit.load_data(cfg, torch.device("cpu")).x_train}
    for seed in (0, 5):
        data, val = clip.load_data(clip.Config(dataset="captions", data_dir=str(tmp_path / "pics"), seed=seed),
                                   torch.device("cpu"))
        held = {bytes(image.numpy()) for image in data.test.images}
        trained = {bytes(image.numpy()) for image in torch.cat([data.train.images, val.images])}
        assert trained == seen and held and not held & seen


@pytest.mark.parametrize("setting,device,kind,processes,expected", [
    ("auto", "cuda", "vit", 1, "reduce-overhead"), ("auto", "cuda", "cnn", 1, None), ("auto", "cpu", "vit", 1, None),
    ("off", "cuda", "vit", 1, None), ("on", "cuda", "cnn", 1, "reduce-overhead"), ("off", "cpu", "vit", 1, None),
    ("auto", "cuda", "vit", 2, None), ("on", "cuda", "vit", 2, "default")])
def test_compile_setting_picks_the_models_and_the_mode(monkeypatch, setting, device, kind, processes, expected):
    """compiled() hands back torch.compile's module, in the mode the decision table says, or the module itself."""
    cfg = common.parse_config(vit.Config, ["--quick", "--compile", setting], "", quick=vit.QUICK)
    monkeypatch.setattr(common, "world_size", lambda: processes)
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: ("compiled", module, mode or "default"))
    model = vit.build_model(kind, cfg, 10)
    result = vit.compiled(model, cfg, torch.device(device))
    if expected:
        assert result == ("compiled", model, expected)
    else:
        assert result is model
    assert vit.uses_compile(cfg, torch.device(device), kind == "vit") == bool(expected)


@pytest.mark.parametrize("argv,message", [
    (["--image-size", "30", "--patch-size", "4"], "not divisible by the patch size"),
    (["--compile", "yes"], "invalid choice"),
    (["--compile", "on"], "needs a CUDA GPU"),
    (["--dim", "50", "--heads", "3"], "not divisible by the number of heads"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--train-fraction", "0"], "train-fraction"),
    (["--sweep", "0.1,lots"], "--sweep"),
    (["--init", "missing.pt"], "does not exist"),
    (["--model", "mlp"], "invalid choice"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--clip-grad", "nan"], "--clip-grad must be a finite number, got nan"),
    (["--clip-grad", "-1"], "--clip-grad must be a gradient norm > 0, or 0 for no clipping"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative"),
    (["--depth", "0"], "--depth must be positive"),
    # as 01, 03 and 05; the labelled shares of --train-fraction and --sweep may still be smaller than a batch
    (["--n-train", "200", "--n-test", "10", "--batch-size", "1000"], "--batch-size 1000 is larger than the 200 training images"),
    (["--pretrain", "byol"], "invalid choice"),
    (["--pretrain", "mae", "--mask-ratio", "1"], "--mask-ratio must be in \\(0, 1\\)"),
    (["--pretrain", "mae", "--mask-ratio", "0"], "--mask-ratio must be in \\(0, 1\\)"),
    (["--pretrain", "mae", "--mask-ratio", "0.99"], "leaves no visible patch of the 16"),
    (["--pretrain", "dino", "--local-crops", "2", "--image-size", "16"], "too small for local crops"),
    (["--pretrain", "dino", "--teacher-temp", "0"], "--teacher-temp must be > 0"),
    (["--pretrain", "dino", "--student-temp", "-1"], "--student-temp must be > 0"),
    (["--pretrain", "dino", "--ema", "1.5"], "--ema must be in \\[0, 1\\]"),
    (["--pretrain", "dino", "--center-momentum", "nan"], "--center-momentum must be a finite number"),
    (["--dataset", "captions"], "has images but no labels: pre-train"),
    (["--pretrain", "dino", "--dataset", "captions", "--data-dir", "nowhere"], "is not a folder"),
])
def test_bad_input_is_a_user_error(tmp_path, argv, message):
    out = tmp_path / "run"
    with pytest.raises(common.UserError, match=message):
        vit.main(["--quick", "--device", "cpu", "--out", str(out), *argv])
    # options are checked before the folder is made; what needs the device (--compile on) or the data (--batch-size)
    # is checked after set-up, which has written config.json alone
    assert not out.exists() or {p.name for p in out.iterdir()} == {"config.json"}


def test_a_teacher_that_cannot_sharpen_is_a_warning(capsys):
    vit.validate(common.parse_config(vit.Config, ["--pretrain", "dino", "--teacher-temp", "0.2"], ""))
    assert capsys.readouterr().out.count("warning: --teacher-temp 0.2 >= --student-temp 0.1 cannot sharpen") == 1


def test_script_exits_with_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "04_vit.py", "--quick", "--device", "cpu", "--out", str(tmp_path),
                             "--dim", "50", "--heads", "3"], capture_output=True, text=True, cwd=common.ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_a_non_finite_loss_stops_training():
    """fit reads the loss once an epoch; a NaN there ends the run with 02's message instead of a NaN model."""
    data, cfg = tiny_data(), tiny_config()
    model = vit.build_model("vit", cfg, len(data.classes))
    stats = vit.channel_stats(data.x_train)
    nan_loss = lambda indices: model(vit.normalise(data.x_train[indices], stats)).sum() * float("nan")
    with pytest.raises(common.UserError, match=r"training diverged \(tiny: the loss is nan at epoch 1\); lower --lr"):
        vit.fit(model, nan_loss, torch.arange(len(data.x_train)), 2, len(data.x_train), cfg, torch.device("cpu"), "tiny")


def test_init_from_a_diverged_checkpoint_is_refused(tmp_path):
    cfg = tiny_config()
    encoder = vit.build_model("vit", cfg, num_classes=0)
    state = {name: torch.full_like(value, float("nan")) for name, value in encoder.state_dict().items()}
    # save_checkpoint refuses NaN weights, so the file a diverged run of older code could leave is made by hand
    torch.save({"kind": "vit", "model": state, "config": {}, "arch": encoder.arch}, tmp_path / "nan.pt")
    with pytest.raises(common.UserError, match="holds NaN or infinite weights"):
        vit.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "run"), "--init", str(tmp_path / "nan.pt")])
    assert not (tmp_path / "run").exists() or {p.name for p in (tmp_path / "run").iterdir()} <= {"config.json"}


def test_labels_benchmark_gives_a_method_its_own_settings():
    """bench_04_labels --set: plain options reach every run, METHOD.option only that pre-training's, over its defaults."""
    bench = common.import_script("benchmarks.bench_04_labels")
    cfg, methods = bench.configs(bench.parse_args(["--set", "lr=3e-3", "dino.local_crops=2", "mae.mask_ratio=0.5",
                                                   "pretrain_lr=2.5e-4"]))
    assert (cfg.lr, cfg.local_crops, cfg.mask_ratio, cfg.pretrain_lr, cfg.pretrain) == (3e-3, 0, 0.75, 2.5e-4, "")
    dino, mae, simclr = methods["dino"], methods["mae"], methods["simclr"]
    assert (dino.pretrain, dino.lr, dino.local_crops, dino.ema, dino.pretrain_lr, dino.pretrain_epochs) == \
        ("dino", 3e-3, 2, 0.99, 1e-3, 20)
    assert (mae.mask_ratio, mae.local_crops, mae.pretrain_lr, mae.pretrain_epochs) == (0.5, 0, 2.5e-4, 40)
    assert (simclr.lr, simclr.mask_ratio, simclr.pretrain_epochs) == (3e-3, 0.75, 20)
    with pytest.raises(common.UserError, match="'byol' is not a pre-training"):
        bench.configs(bench.parse_args(["--set", "byol.lr=1"]))


def test_labels_benchmark_reuses_a_saved_encoder_of_the_same_settings_only(tmp_path, monkeypatch):
    """bench_04_labels --encoders: the first run saves the pre-trained encoder, a second with the same settings loads
    it (no pre-training) and reads the same features; other settings are refused in one line."""
    bench = common.import_script("benchmarks.bench_04_labels")
    argv = ["--dataset", "shapes", "--n-train", "400", "--fractions", "1", "--finetune-fractions=", "--baselines=",
            "--methods", "mae", "--timing-steps", "0", "--device", "cpu", "--encoders", str(tmp_path / "encoders"),
            "--set", "n_test=200", "image_size=32", "patch_size=8", "dim=32", "depth=1", "heads=2", "mlp_ratio=2",
            "batch_size=100", "probe_steps=20", "decoder_dim=16", "decoder_depth=1", "mae.pretrain_epochs=2"]
    first = bench.main([*argv, "--out", str(tmp_path / "first")])
    assert (tmp_path / "encoders" / "vit_mae.pt").is_file()
    monkeypatch.setitem(bench.vit_script.PRETRAINERS, "mae", lambda *args: pytest.fail("pre-trained again"))
    second = bench.main([*argv, "--out", str(tmp_path / "second")])
    assert second["rows"] == first["rows"] and second["mae_pretrain"] == first["mae_pretrain"]
    assert json.loads((tmp_path / "second" / "metrics.json").read_text())["rows"] == first["rows"]
    with pytest.raises(common.UserError, match="pre-trained with other settings"):
        bench.main([*argv, "mae.mask_ratio=0.5", "--out", str(tmp_path / "third")])
