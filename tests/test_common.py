"""The plumbing: the embedded image set, the real-dataset loaders (against a loopback server), and error paths."""
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import pickle
import stat
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import common


# ---- the embedded image set ----

def test_shapes_are_deterministic_and_independent_of_how_many_are_made():
    x_small, y_small, f_small = common.make_shapes(40, seed=3)
    x_big, y_big, _ = common.make_shapes(300, seed=3, chunk=64)
    assert torch.equal(x_small, x_big[:40]) and torch.equal(y_small, y_big[:40])
    x_again, _, f_again = common.make_shapes(40, seed=3)
    assert torch.equal(x_small, x_again)
    assert all(torch.equal(f_small[k], f_again[k]) for k in f_small)
    x_other, _, _ = common.make_shapes(40, seed=4)
    assert not torch.equal(x_small, x_other)


def test_shapes_format_classes_and_splits():
    x_train, y_train, _ = common.make_shapes(2000, seed=0, split="train")
    x_test, y_test, _ = common.make_shapes(500, seed=0, split="test")
    assert x_train.shape == (2000, 3, 32, 32) and x_train.dtype == torch.uint8
    assert set(y_train.tolist()) == set(range(len(common.SHAPES)))
    counts = torch.bincount(y_train, minlength=10).float()
    assert counts.min() > 0.6 * counts.mean()          # roughly balanced classes
    digest = lambda images: {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images}
    train, test = digest(x_train), digest(x_test)
    assert len(train) == 2000 and len(test) == 500 and not train & test


def test_factors_match_pixels_and_captions():
    images, labels, f = common.make_shapes(600, seed=1)
    palette = torch.tensor(list(common.COLOURS.values()))
    # A solid, convex-centred shape shows its colour (times brightness) at its centre pixel, up to noise.
    centred = [common.SHAPES.index(s) for s in ("circle", "square", "hexagon", "cross", "star")]
    picked = [i for i in range(600) if f["texture"][i] == 0 and int(labels[i]) in centred and f["noise"][i] < 0.05]
    assert len(picked) > 10
    for i in picked:
        col = int(((f["x"][i] + 1) / 2 * 32).clamp(0, 31))
        row = int(((f["y"][i] + 1) / 2 * 32).clamp(0, 31))
        expected = palette[f["colour"][i]] * f["brightness"][i]
        assert torch.allclose(images[i, :, row, col].float() / 255, expected, atol=0.12), common.caption(f, i)
    # The shape's pixels sit where the factors put them.
    located = 0
    for i in range(100):
        text = common.caption(f, i)
        words = text.split()
        assert words[1] == common.SIZES[f["size"][i]] and words[2] == list(common.COLOURS)[f["colour"][i]]
        assert common.SHAPES[labels[i]] in words and common.PLACES[f["row"][i] * 3 + f["column"][i]] in text
        background = f["background"][i]
        mask = ((images[i].float() / 255 - background).abs().max(0).values > 0.3)
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs) > 20 and f["scale"][i] < 0.45:
            assert abs((xs.float().mean() + 0.5) / 16 - 1 - f["x"][i]) < 0.2
            assert abs((ys.float().mean() + 0.5) / 16 - 1 - f["y"][i]) < 0.2
            located += 1
    assert located > 20


def test_shapes_caption_combinations_are_many():
    _, _, f = common.make_shapes(3000, seed=0)
    captions = {common.caption(f, i) for i in range(3000)}
    assert len(captions) > 1500     # so some combinations can be held out for zero-shot tests


# ---- formats ----

def test_to_format_pads_and_repeats_channels():
    gray = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    out = common.to_format(gray, size=32, channels=3)
    assert out.shape == (5, 3, 32, 32)
    assert torch.equal(out[:, 1, 2:30, 2:30], gray[:, 0]) and out[:, :, :2].sum() == 0
    assert common.to_format(gray) is gray                    # already in format: returned as it is
    assert common.to_format(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), size=32).shape == (2, 3, 32, 32)
    with pytest.raises(common.UserError):
        common.to_format(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), channels=1)


# ---- real datasets, served from 127.0.0.1 ----

def idx_bytes(array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def small_mnist(rng):
    x_train, x_test = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    y_train, y_test = rng.integers(0, 10, 12), rng.integers(0, 10, 5)
    files = {"train-images-idx3-ubyte.gz": x_train, "train-labels-idx1-ubyte.gz": y_train,
             "t10k-images-idx3-ubyte.gz": x_test, "t10k-labels-idx1-ubyte.gz": y_test}
    return {name: gzip.compress(idx_bytes(a)) for name, a in files.items()}, (x_train, y_train, x_test, y_test)


def small_cifar(rng):
    arrays, buffer = {}, io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data, labels = rng.integers(0, 256, (3, 3072)).astype(np.uint8), rng.integers(0, 10, 3).tolist()
            arrays[name] = (data, labels)
            payload = pickle.dumps({b"data": data, b"labels": labels})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue(), arrays


class Server:
    """A loopback HTTP server for a dict of files; `cut` names files it sends only half of, then hangs up."""

    def __init__(self, files, cut=()):
        self.files, self.cut, self.requests = files, set(cut), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
                if name not in outer.files:
                    self.send_error(404)
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in outer.cut else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mnist_server(monkeypatch):
    files, arrays = small_mnist(np.random.default_rng(0))
    server = Server(files)
    remote = [common.RemoteFile(name, hashlib.md5(body).hexdigest()) for name, body in files.items()]
    monkeypatch.setitem(common.DATASETS, "mnist", common.RemoteDataset([server.url], remote, list("0123456789")))
    yield server, arrays
    server.close()


def test_mnist_downloads_once_verifies_and_reads(tmp_path, mnist_server):
    server, (x_train, y_train, x_test, y_test) = mnist_server
    data = common.load_images("mnist", tmp_path)
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    assert np.array_equal(data.x_train[:, 0].numpy(), x_train) and np.array_equal(data.y_test.numpy(), y_test)
    assert sorted(server.requests) == sorted(server.files)
    again = common.load_images("mnist", tmp_path, n_train=4, size=32, channels=3)
    assert len(server.requests) == 4                     # read from disk the second time
    assert again.x_train.shape == (4, 3, 32, 32)
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.tmp"))


def test_hand_placed_extracted_files_need_no_download(tmp_path, mnist_server):
    server, (x_train, *_) = mnist_server
    for name, body in server.files.items():
        (tmp_path / name[:-3]).write_bytes(gzip.decompress(body))
    data = common.load_images("mnist", tmp_path)
    assert np.array_equal(data.x_train[:, 0].numpy(), x_train) and server.requests == []


def test_recompressed_copy_is_accepted_by_content_checksum(tmp_path, monkeypatch, mnist_server):
    server, _ = mnist_server
    remote = []
    for name, body in server.files.items():
        raw = gzip.decompress(body)
        remote.append(common.RemoteFile(name, "0" * 32, hashlib.sha256(raw).hexdigest()))
        (tmp_path / name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=1))   # other bytes, same content
    monkeypatch.setitem(common.DATASETS, "mnist", common.RemoteDataset([server.url], remote, list("0123456789")))
    assert common.load_images("mnist", tmp_path).x_train.shape == (12, 1, 28, 28)


@pytest.mark.parametrize("fault", ["wrong-checksum", "cut-mid-transfer", "missing-on-server", "offline"])
def test_failed_downloads_leave_nothing_behind(tmp_path, monkeypatch, mnist_server, fault):
    server, _ = mnist_server
    name = "train-images-idx3-ubyte.gz"
    if fault == "wrong-checksum":
        server.files[name] = server.files[name][:-1] + b"x"
    elif fault == "cut-mid-transfer":
        server.cut.add(name)
    elif fault == "missing-on-server":
        del server.files[name]
    else:
        spec = common.DATASETS["mnist"]
        monkeypatch.setitem(common.DATASETS, "mnist", common.RemoteDataset(["http://127.0.0.1:9/"], spec.files, spec.classes))
    with pytest.raises(common.UserError) as error:
        common.load_images("mnist", tmp_path)
    message = str(error.value)
    assert name in message and "\n" not in message
    assert not (tmp_path / "mnist" / name).exists()
    assert not list(tmp_path.rglob("*.part"))


def test_corrupt_or_truncated_local_files_are_refused(tmp_path, mnist_server):
    server, _ = mnist_server
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, body in server.files.items():
        (folder / name).write_bytes(body)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(server.files["t10k-labels-idx1-ubyte.gz"][:-7])
    with pytest.raises(common.UserError, match="t10k-labels-idx1-ubyte.gz is corrupt"):
        common.load_images("mnist", tmp_path)
    for name in server.files:   # hand-placed extracted files are checked against their header
        (tmp_path / name[:-3]).write_bytes(gzip.decompress(server.files[name]))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(gzip.decompress(server.files["train-images-idx3-ubyte.gz"])[:-100])
    with pytest.raises(common.UserError, match="truncated"):
        common.load_images("mnist", tmp_path)
    assert server.requests == []


def test_cifar10_from_archive_and_from_extracted_folder(tmp_path, monkeypatch):
    archive, arrays = small_cifar(np.random.default_rng(1))
    server = Server({"cifar-10-python.tar.gz": archive})
    try:
        monkeypatch.setitem(common.DATASETS, "cifar10", common.RemoteDataset(
            [server.url], [common.RemoteFile("cifar-10-python.tar.gz", hashlib.md5(archive).hexdigest())], list("abcdefghij")))
        data = common.load_images("cifar10", tmp_path / "a")
        assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
        assert np.array_equal(data.x_test.numpy().reshape(3, -1), arrays["test_batch"][0])
        assert data.y_train.tolist() == sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp_path / "b", filter="data")
        assert torch.equal(common.load_images("cifar10", tmp_path / "b").x_train, data.x_train)
        assert server.requests == ["cifar-10-python.tar.gz"]
    finally:
        server.close()


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": print}))
    with pytest.raises(common.UserError, match="unexpected object"):
        common.load_images("cifar10", tmp_path)


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.mark.parametrize("fault, message", [
    ("labels-hold-images", "train-labels-idx1-ubyte holds a 3-D array .* labels file holds a 1-D one"),
    ("train-swapped", "train-images-idx3-ubyte holds a 1-D array .* swapped"),
    ("32x32", "t10k-images-idx3-ubyte holds 32x32 images; mnist's are 28x28"),
    ("counts", "train-images-idx3-ubyte holds 12 images but .*train-labels-idx1-ubyte 11 labels"),
    ("label-200", "t10k-labels-idx1-ubyte holds label 200; .* from 0 to 9")])
def test_decompressed_idx_files_are_checked_for_what_no_checksum_covers(tmp_path, fault, message):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    y_train, y_test = rng.integers(0, 10, 12), rng.integers(0, 10, 5)
    if fault == "labels-hold-images":
        y_train = x_train
    elif fault == "train-swapped":
        x_train, y_train = y_train, x_train
    elif fault == "32x32":
        x_test = rng.integers(0, 256, (5, 32, 32))
    elif fault == "counts":
        y_train = y_train[:11]
    else:
        y_test[3] = 200
    (tmp_path / "mnist").mkdir()
    for name, array in zip(MNIST_FILES, (x_train, y_train, x_test, y_test)):
        (tmp_path / "mnist" / name).write_bytes(idx_bytes(array))      # extracted files: no checksum to catch it
    with pytest.raises(common.UserError, match=message) as error:
        common.load_images("mnist", tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fault, message", [("more-images", "data_batch_2 is corrupt: 3 images but 2 labels"),
                                            ("label-10", "test_batch holds label 10; .* from 0 to 9")])
def test_cifar_batches_are_checked_for_counts_and_label_range(tmp_path, fault, message):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    bad_batch, bad_labels = {"more-images": ("data_batch_2", [1, 2]), "label-10": ("test_batch", [0, 10, 3])}[fault]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = bad_labels if name == bad_batch else [0, 1, 2]
        (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": labels}))
    with pytest.raises(common.UserError, match=message):
        common.load_images("cifar10", tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(common.UserError, match="unknown dataset"):
        common.load_images("imagenet", tmp_path)


# ---- captioned images ----

def caption_folder(folder, rows, encoding="utf-8"):
    """folder/captions.csv holding `rows` (lines of text after the header) and three small PNGs 0.png to 2.png."""
    folder.mkdir()
    for i in range(3):
        matplotlib.image.imsave(folder / f"{i}.png", np.full((6, 6, 3), 40 * i, np.uint8))
    (folder / "captions.csv").write_text("\n".join(["image,caption", *rows]) + "\n", encoding=encoding)
    return folder


def test_captions_csv_with_a_byte_order_mark_is_read(tmp_path):
    folder = caption_folder(tmp_path / "pics", ["0.png,a dark square", "1.png,\"a grey, plain square\""], "utf-8-sig")
    assert (folder / "captions.csv").read_bytes().startswith(b"\xef\xbb\xbfimage")       # as a spreadsheet saves it
    images, captions, _ = common.read_captions_csv(folder, 8)
    assert images.shape == (2, 3, 8, 8) and captions == [["a dark square"], ["a grey, plain square"]]


@pytest.mark.parametrize("rows, message", [
    (['0.png,"a dark square', "1.png,grey", '2.png,"light"', "1.png,more"], "line 2: .* quote"),   # strict csv refuses it
    (['0.png,"a dark square', "1.png,grey", '2.png,light"'], "line 2: a quoted caption runs on to line 4"),
    (['0.png,"a quote open to the end', "1.png,grey"], "line 2: unexpected end of data"),
    (["0.png,dark", "../2.png,outside"], r"line 3: image '\.\./2\.png' lies outside"),
    (["/etc/hostname,absolute"], "line 2: image '/etc/hostname' lies outside")])
def test_broken_quotes_and_paths_outside_the_folder_are_errors_with_their_line(tmp_path, rows, message):
    folder = caption_folder(tmp_path / "pics", rows)
    with pytest.raises(common.UserError, match=message) as error:
        common.read_captions_csv(folder, 8)
    assert "\n" not in str(error.value) and "captions.csv" in str(error.value)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_images_are_scaled_by_their_own_range(tmp_path, suffix):
    import PIL.Image
    levels = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)      # a 16-bit grey ramp
    PIL.Image.fromarray(levels).save(tmp_path / f"ramp.{suffix}")
    image = common.read_image(tmp_path / f"ramp.{suffix}", f"ramp.{suffix}", 8)
    expected = torch.from_numpy((levels / 65535 * 255).round().astype(np.uint8))
    assert image.shape == (3, 8, 8) and torch.equal(image[0], expected) and torch.equal(image[2], expected)


# ---- configuration, outputs, checkpoints, errors ----

@dataclass
class ToyConfig(common.RunConfig):
    epochs: int = common.arg(10, "passes over the data")
    lr: float = common.arg(1e-3, "learning rate")
    model: str = common.arg("ae", "which model", choices=["ae", "vae"])
    compile: bool = common.arg(False, "use torch.compile")


def test_parse_config_quick_overrides_and_errors():
    cfg = common.parse_config(ToyConfig, ["--quick", "--lr", "0.5"], "doc", quick=dict(epochs=1, lr=0.1))
    assert (cfg.epochs, cfg.lr, cfg.quick, cfg.compile) == (1, 0.5, True, False)
    assert common.parse_config(ToyConfig, [], "doc", quick=dict(epochs=1)).epochs == 10
    for argv in (["--bogus"], ["--epochs", "x"], ["--model", "gan"], ["--ep", "3"]):
        with pytest.raises(common.UserError):
            common.parse_config(ToyConfig, argv, "doc")
    assert common.parse_config(ToyConfig, ["--seed", str(2**63 - 1)], "doc").seed == 2**63 - 1
    for seed in ("99999999999999999999999", "-1"):                      # torch.manual_seed would overflow on the first
        with pytest.raises(common.UserError, match=r"^--seed must be between 0 and 2\*\*63 - 1, got -?\d+$"):
            common.parse_config(ToyConfig, ["--seed", seed], "doc")


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert common.pick_device("auto") == torch.device(expected)


def test_devices(monkeypatch):
    assert common.pick_device("cpu").type == "cpu"
    with pytest.raises(common.UserError):
        common.pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UserError, match="no CUDA"):
        common.pick_device("cuda")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_autocast_is_bf16_where_the_gpu_has_it_else_fp16_with_a_gradient_scaler(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)           # a GPU, faked: nothing here touches it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 and not including_emulation)
    cuda = torch.device("cuda")
    assert common.autocast_dtype(cuda) == expected                           # a T4 or a V100 emulates bf16 slowly: fp16
    assert common.grad_scaler(cuda).is_enabled() == (expected == torch.float16)
    cpu = torch.device("cpu")
    assert common.autocast_dtype(cpu) is None and not common.grad_scaler(cpu).is_enabled()


def test_a_disabled_scaler_leaves_the_step_a_plain_step():
    scaler, steps = common.grad_scaler(torch.device("cpu")), []
    loss = torch.ones(2, requires_grad=True).sum()
    assert scaler.scale(loss) is loss                                         # no factor: bf16 and float32 need none
    scaler.step(SimpleNamespace(step=lambda: steps.append("step")))
    scaler.update()
    assert steps == ["step"]


def test_progress_in_a_log_file_is_a_plain_line_every_few_seconds(monkeypatch, capsys):
    monkeypatch.setattr(common, "PROGRESS_LINE_SECONDS", 0.05)
    bar = common.progress(100, "train", unit="word")                         # stderr is not a terminal here
    for _ in range(4):
        time.sleep(0.06)
        bar.update(25)
        bar.set_postfix(loss="0.5")
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and 3 <= len(lines) <= 5 and all(line.startswith("train: ") for line in lines)
    assert lines[-1].startswith("train: 100%") and "loss=0.5" in lines[-1]
    monkeypatch.setattr(common, "PROGRESS_LINE_SECONDS", 5)
    with common.progress(100, "short") as bar:                              # a phase shorter than that: no line
        bar.update(100)
    assert capsys.readouterr().err == ""


def test_cpu_notice_says_how_long_and_what_to_run_instead(monkeypatch, capsys):
    monkeypatch.setattr(common, "cpu_gflops", lambda: common.REFERENCE_CPU_GFLOPS / 2)    # a CPU half as fast
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    common.cpu_notice(ToyConfig(), cpu, 600)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "sized for a GPU" in line and "roughly 20 minutes" in line and "--quick" in line
    common.cpu_notice(ToyConfig(), cpu, 3 * 3600)
    assert "roughly 6.0 hours" in capsys.readouterr().out
    common.cpu_notice(ToyConfig(), cpu, 35)
    assert "roughly 1 minute. " in capsys.readouterr().out
    for cfg, device, seconds in ((ToyConfig(quick=True), cpu, 600), (ToyConfig(), cuda, 600), (ToyConfig(), cpu, 29)):
        common.cpu_notice(cfg, device, seconds)
    assert capsys.readouterr().out == ""


def test_warmup_cosine_at_its_ends():
    total, warmup = 97, 5                                             # an uneven number of steps
    multiplier = [common.warmup_cosine(step, total, warmup) for step in range(total)]
    assert multiplier[0] == pytest.approx(1 / warmup)                 # the first step: 1 / warmup_steps of the peak
    assert multiplier[warmup - 1] == pytest.approx(1.0)               # the end of the warm-up reaches the peak
    assert multiplier[warmup] == pytest.approx(1.0)                   # and the cosine starts there
    assert multiplier[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))
    assert multiplier[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 92)))
    assert all(a < b for a, b in zip(multiplier[:warmup], multiplier[1:warmup]))          # rising, then falling
    assert all(a > b for a, b in zip(multiplier[warmup:], multiplier[warmup + 1:])) and 0 < multiplier[-1] < 1e-3
    assert common.warmup_cosine(0, total, 0) == 1.0                   # no warm-up: the cosine from the first step


def test_rank_share_slices_the_items_between_ranks(monkeypatch):
    assert common.rank_share(10) == slice(0, 10)                      # one process: all of them
    monkeypatch.setattr(common, "world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(common, "rank", lambda rank=rank: rank)
        shares.append(list(range(10))[common.rank_share(10)])
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]                # equal and disjoint; the remainder is dropped


def test_unwritable_or_unusable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(common.UserError, match="cannot write to output folder"):
        common.stage_out(blocker / "runs")
    with pytest.raises(common.UserError, match=r"^--out '.*file' is a file, not a folder$"):
        common.stage_out(blocker)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(common.UserError, match=r"holds notes.txt and is not the folder of an earlier run \(no config"):
        common.stage_out(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"] and (mine / "notes.txt").is_file()


def toy_run(out, files):
    """A run of a script in miniature: set-up, its outputs, finish_run. Returns the staging folder and the result."""
    _, staging = common.setup(ToyConfig(device="cpu", out=str(out)), "toy.py")
    for name, text in files.items():
        common.save_text(staging / name, text)
    return staging, common.finish_run(staging)


def test_a_finished_run_replaces_the_folder_as_a_set(tmp_path):
    out = tmp_path / "deep" / "run"                                     # its parents are made too
    staging, final = toy_run(out, {"metrics.json": "{}", "old.png": "first run"})
    assert staging.parent == out.parent and staging.name.startswith(".run.run-") and final == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "old.png"]
    _, staging = common.setup(ToyConfig(device="cpu", out=str(out), seed=5), "toy.py")
    common.save_text(staging / "metrics.json", "{}")
    assert (out / "old.png").is_file() and json.loads((out / "config.json").read_text())["seed"] == 0   # until it ends
    common.finish_run(staging)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json"]                    # nothing mixed
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert [p.name for p in out.parent.iterdir()] == ["run"]                                       # no staging, no backup


def test_an_unfinished_run_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "new" / "run"
    _, staging = common.setup(ToyConfig(device="cpu", out=str(out)), "toy.py")
    common.save_text(staging / "half.png", "x")
    assert not out.exists()
    common.discard_unfinished_runs()                 # common.run calls it when a script ends, atexit for main() calls
    assert list(tmp_path.iterdir()) == []            # the staging folder and the parent set-up made are gone
    toy_run(out, {"a.txt": "1"})
    _, staging = common.setup(ToyConfig(device="cpu", out=str(out)), "toy.py")
    common.save_text(staging / "b.txt", "2")
    _, staging = common.setup(ToyConfig(device="cpu", out=str(out)), "toy.py")   # a new run discards the unfinished one
    assert sorted(p.name for p in out.parent.iterdir()) == [staging.name, "run"] and list(staging.iterdir()) == [staging / "config.json"]
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "config.json"]
    common.discard_unfinished_runs()


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        toy_run(tmp_path / "run", {"a.txt": "1"})
        common.save_figure(plt.figure(), tmp_path / "run" / "figure.png")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "run", *(tmp_path / "run").iterdir()]}
    assert modes == {"run": 0o750, "config.json": 0o640, "a.txt": 0o640, "figure.png": 0o640}


def test_checkpoints_round_trip_and_refuse_other_models(tmp_path):
    cfg = ToyConfig()
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "model.pt"
    common.save_checkpoint(path, model, cfg, kind="toy", note="x")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    fresh = torch.nn.Linear(3, 2)
    state = common.load_checkpoint(path, fresh, kind="toy")
    assert torch.equal(fresh.weight, model.weight) and state["config"]["epochs"] == 10 and state["note"] == "x"
    with pytest.raises(common.UserError, match="holds a 'toy' model"):
        common.load_checkpoint(path, fresh, kind="vit")
    with pytest.raises(common.UserError, match="shapes"):
        common.load_checkpoint(path, torch.nn.Linear(4, 2), kind="toy")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UserError, match="cannot be read"):
        common.load_checkpoint(tmp_path / "junk.pt", fresh, kind="toy")
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(tmp_path / "none.pt", fresh, kind="toy")
    with pytest.raises(common.UserError, match=r"^checkpoint '.*' is a folder, not a file$"):
        common.load_checkpoint(tmp_path, fresh, kind="toy")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_no_checkpoint_with_non_finite_weights_is_written_or_loaded(tmp_path, value):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[1] = value                                          # what a diverged run leaves
    with pytest.raises(common.UserError, match=r"^the run diverged \(bias holds NaN or infinite weights\), "
                                               r"so .*model.pt was not written; lower --lr$"):
        common.save_checkpoint(tmp_path / "model.pt", model, ToyConfig(), kind="toy")
    assert list(tmp_path.iterdir()) == []                              # not even a temporary file
    torch.save({"kind": "toy", "model": model.state_dict(), "config": {}}, tmp_path / "old.pt")   # saved before the check
    fresh = torch.nn.Linear(3, 2)
    before = fresh.weight.clone()
    with pytest.raises(common.UserError, match=r"old.pt' holds NaN or infinite weights \(bias\): .* diverged$"):
        common.load_checkpoint(tmp_path / "old.pt", fresh, kind="toy")
    assert torch.equal(fresh.weight, before) and torch.isfinite(fresh.bias).all()   # the model is left as it was


def test_save_json_and_import_script(tmp_path):
    common.save_json(tmp_path / "m.json", {"a": torch.tensor(0.5).item(), "b": np.float32(2)})
    assert (tmp_path / "m.json").read_text().startswith("{")
    autoencoder = common.import_script("01_autoencoder")
    assert autoencoder.__file__ == str(common.ROOT / "01_autoencoder.py") and hasattr(autoencoder, "Autoencoder")
    assert common.import_script("01_autoencoder") is autoencoder                # imported once, then reused


def test_run_turns_user_errors_into_one_line_and_exit_2():
    code = ("import common\n"
            "def main(): raise common.UserError('no such thing')\n"
            "common.run(main)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=common.ROOT)
    assert result.returncode == 2 and result.stderr == "error: no such thing\n"
    bug = subprocess.run([sys.executable, "-c", code.replace("common.UserError", "ZeroDivisionError")],
                         capture_output=True, text=True, cwd=common.ROOT)
    assert bug.returncode == 1 and "Traceback" in bug.stderr
