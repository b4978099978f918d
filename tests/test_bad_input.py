"""Issue 20 across the scripts: bad input, failures and interrupted runs end in one line, and --out holds either the
complete outputs of one run or exactly what it held before, with no temporary file or staging folder left. The cases
that belong to one script's options are in that script's tests; these are the shared plumbing (common.py) seen from
every script: --seed, --out, the dataset readers, SIGINT and SIGTERM, a traceback, main() called in-process."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import common

SCRIPTS = ["01_autoencoder", "02_word2vec", "03_contrastive", "04_vit", "05_clip"]
IMAGE_SCRIPTS = ["01_autoencoder", "03_contrastive", "04_vit"]          # they read MNIST and CIFAR-10 alike


def snapshot(folder):
    """Every file below folder with its bytes, hidden ones included."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_run(folder):
    """A folder as an earlier run left it; returns its snapshot."""
    folder.mkdir(parents=True)
    for name, body in (("config.json", b'{"seed": 7}\n'), ("metrics.json", b"{}\n"), ("figure.png", b"png")):
        (folder / name).write_bytes(body)
    return snapshot(folder)


def assert_left_as_before(out, before):
    """out holds what it held before, and nothing else lies beside it (no staging folder, no temporary file)."""
    assert snapshot(out) == before if before is not None else not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ([out.name] if before is not None else [])


def run_in_process(script, argv, out, message):
    """main(argv) of a script must raise a UserError matching message; then what common.run (or, for main() called
    in a notebook, the next set-up or Python's exit) does about the unfinished run."""
    with pytest.raises(common.UserError, match=message) as error:
        common.import_script(script).main(["--quick", "--device", "cpu", "--out", str(out), *argv])
    assert "\n" not in str(error.value)
    common.discard_unfinished_runs()


# ---- options that common.py parses and checks for every script ----

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_seed_too_large_for_torch_is_one_line_before_any_folder(tmp_path, script):
    run_in_process(script, ["--seed", "99999999999999999999999"], tmp_path / "run",
                   r"^--seed must be between 0 and 2\*\*63 - 1, got 99999999999999999999999$")
    assert_left_as_before(tmp_path / "run", None)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_out_that_is_a_file_or_another_folder_is_refused(tmp_path, script):
    (tmp_path / "file").write_text("mine")
    run_in_process(script, [], tmp_path / "file", r"^--out '.*file' is a file, not a folder$")
    assert snapshot(tmp_path) == {"file": b"mine"}


@pytest.mark.parametrize("script", IMAGE_SCRIPTS)
def test_a_data_dir_that_is_a_file_is_called_a_file(tmp_path, script):
    (tmp_path / "file").write_text("x")
    run_in_process(script, ["--dataset", "mnist", "--data-dir", str(tmp_path / "file")], tmp_path / "run",
                   r"^--data-dir '.*file' is a file, not a folder$")
    assert snapshot(tmp_path) == {"file": b"x"}


def test_an_out_that_holds_something_else_is_never_replaced(tmp_path):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("months of work")
    run_in_process("02_word2vec", [], tmp_path / "thesis", "holds chapter1.tex and is not the folder of an earlier run")
    assert snapshot(tmp_path) == {"thesis/chapter1.tex": b"months of work"}


# ---- datasets whose files the checksum cannot vouch for: caught after set-up, before training ----

def idx_bytes(array):
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(folder, fault):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (120, 28, 28)), rng.integers(0, 10, 120), rng.integers(0, 256, (60, 28, 28)),
              rng.integers(0, 10, 60)]
    if fault == "swapped":
        arrays[0], arrays[1] = arrays[1], arrays[0]
    else:
        arrays[3][7] = 200
    folder.mkdir(parents=True)
    for name, array in zip(["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                            "t10k-labels-idx1-ubyte"], arrays):
        (folder / name).write_bytes(idx_bytes(array))           # decompressed: no checksum looks at them


@pytest.mark.parametrize("script", IMAGE_SCRIPTS)
@pytest.mark.parametrize("fault, message", [("swapped", "train-images-idx3-ubyte holds a 1-D array .* swapped"),
                                            ("label-200", "t10k-labels-idx1-ubyte holds label 200; .* from 0 to 9")])
def test_broken_idx_files_stop_every_script_before_training_and_leave_out_as_it_was(tmp_path, script, fault, message):
    write_mnist(tmp_path / "data" / "mnist", fault)
    before = earlier_run(tmp_path / "runs" / "run")
    run_in_process(script, ["--dataset", "mnist", "--data-dir", str(tmp_path / "data")], tmp_path / "runs" / "run", message)
    assert_left_as_before(tmp_path / "runs" / "run", before)


@pytest.mark.parametrize("script", IMAGE_SCRIPTS)
def test_cifar_batches_with_more_images_than_labels_stop_before_training(tmp_path, script):
    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [0, 1] if name == "data_batch_3" else [0, 1, 2]
        (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": labels}))
    run_in_process(script, ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data")], tmp_path / "new" / "run",
                   "data_batch_3 is corrupt: 3 images but 2 labels")
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]               # not even the parent folder of --out


@pytest.mark.parametrize("rows, message", [(['a.png,"a red', "b.png,blue"], "line 2: .*quote"),
                                           (["a.png,red", "../b.png,outside"], r"line 3: image '\.\./b\.png' lies outside")])
def test_a_malformed_captions_csv_names_its_line_and_leaves_out_as_it_was(tmp_path, rows, message):
    import matplotlib.image
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        matplotlib.image.imsave(folder / name, np.zeros((6, 6, 3), np.uint8))
    # saved by a spreadsheet as "CSV UTF-8": the byte-order mark is accepted, the broken row is not
    (folder / "captions.csv").write_text("\n".join(["image,caption", *rows]) + "\n", encoding="utf-8-sig")
    before = earlier_run(tmp_path / "runs" / "run")
    run_in_process("05_clip", ["--dataset", "captions", "--data-dir", str(folder)], tmp_path / "runs" / "run", message)
    assert_left_as_before(tmp_path / "runs" / "run", before)


def test_a_captions_csv_that_is_a_folder_is_called_a_folder(tmp_path):
    (tmp_path / "pics" / "captions.csv").mkdir(parents=True)
    run_in_process("05_clip", ["--dataset", "captions", "--data-dir", str(tmp_path / "pics")], tmp_path / "run",
                   r"^captions file '.*captions.csv' is a folder, not a file; --dataset captions needs DIR/captions.csv")
    assert not (tmp_path / "run").exists()


# ---- runs that stop part-way, as processes: Ctrl-C, SIGTERM, a traceback, main() called in-process ----

def quick_w2v(out, *extra):
    """02 is the fastest script to reach its training loop; --epochs 1000 keeps it there until the signal comes."""
    return [sys.executable, "-u", "02_word2vec.py", "--quick", "--device", "cpu", "--out", str(out), *extra]


PYTHON_FAILURES = {
    # a bug after set-up: the traceback stays, the unfinished outputs go (common.run's clean-up)
    "traceback": """
        import sys, common
        w2v = common.import_script("02_word2vec")
        w2v.train = lambda *args: 1 / 0
        sys.argv = ["02_word2vec.py", "--quick", "--device", "cpu", "--out", OUT]
        common.run(w2v.main)
        """,
    # main() in a notebook, failing after set-up: the staging folder goes when Python exits (atexit)
    "in-process": """
        import common
        w2v = common.import_script("02_word2vec")
        try:
            w2v.main(["--quick", "--device", "cpu", "--out", OUT, "--min-count", "10000000"])
        except common.UserError as error:
            print("caught:", error)
        """,
}


def test_interrupted_or_failed_runs_leave_out_as_it_was_and_no_temporary_file(tmp_path):
    """SIGINT and SIGTERM during training (no temporary file may stay behind), a traceback and a
    main() called in-process that raises: all four in parallel, each into a folder that holds an earlier run."""
    outs = {case: tmp_path / case / "run" for case in ("SIGINT", "SIGTERM", *PYTHON_FAILURES)}
    before = {case: earlier_run(out) for case, out in outs.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    signalled = {case: subprocess.Popen(quick_w2v(outs[case], "--epochs", "1000"), cwd=common.ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for case in ("SIGINT", "SIGTERM")}
    failing = {case: subprocess.Popen([sys.executable, "-c", textwrap.dedent(code).replace("OUT", repr(str(outs[case])))],
                                      cwd=common.ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for case, code in PYTHON_FAILURES.items()}
    for case, process in signalled.items():
        for line in process.stdout:                              # the corpus is built: training starts now
            if line.startswith("corpus planted"):
                break
        time.sleep(0.5)
        assert process.poll() is None, process.stderr.read()
        staging = [p.name for p in outs[case].parent.iterdir() if p.name.startswith(".run.run-")]
        assert len(staging) == 1                                 # the run is writing beside --out, not into it
        process.send_signal(getattr(signal, case))
    results = {case: (p.wait(timeout=120), *p.communicate()) for case, p in {**signalled, **failing}.items()}
    for case, (code, stdout, stderr) in results.items():
        assert_left_as_before(outs[case], before[case])
        assert not list(tmp_path.rglob("*.tmp"))
    assert results["SIGINT"][0] == 130 and results["SIGINT"][2].splitlines()[-1] == "interrupted"
    assert results["SIGTERM"][0] == 143 and results["SIGTERM"][2].splitlines()[-1] == "terminated"
    assert results["traceback"][0] == 1 and "ZeroDivisionError" in results["traceback"][2]
    assert results["in-process"][0] == 0 and "caught: --min-count 10000000 leaves 0 words" in results["in-process"][1]
