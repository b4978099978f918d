"""Benchmark for 02_word2vec.py: this script's SGNS on the GPU against gensim's Word2Vec on the CPU, on the same
real English corpus with the same hyper-parameters (the learning rate aside: --lr for ours, 0.1 by default, and
--gensim-lr, gensim's default 0.025), words per second and quality side by side. Not a test.

The corpus: about 6.4M words of English from three Debian packages, so that it can be rebuilt offline and
carried to a machine without internet: the GNU Collaborative International Dictionary of English (Webster's
1913 with WordNet glosses; dict-gcide), the WordNet 3.0 glosses (wordnet-base) and the fortune cookies
(fortunes), lower-cased, letters only, one paragraph per line (as text8 is letters only).

    apt-get download dict-gcide wordnet-base fortunes         # three .deb files, no install needed
    python benchmarks/bench_02_word2vec.py prepare --debs . --out bench_data/english.txt.gz
    python benchmarks/bench_02_word2vec.py run --corpus bench_data/english.txt.gz --runs 65536:0.5,4096:1e9 --seeds 0,1

Quality: Mikolov's questions-words.txt (analogies, 3CosAdd over the 30 000 most frequent words) and the
WordSim-353 and SimLex-999 pairs (Spearman), as gensim ships them in gensim/test/test_data; every model is
scored by the same functions of 02_word2vec.py. Throughput counts, for both, epochs x in-vocabulary words of
the corpus / seconds of training (vocabulary building excluded for both).

Needs gensim (pip install gensim) for its evaluation files and its model; the project's requirements leave it out.
Its tables go in RESULTS.md.
"""
import argparse
import gzip
import io
import json
import lzma
import os
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

w2v = common.import_script("02_word2vec")


# ---- building the corpus from Debian packages ----

def deb_members(path):
    """{name: bytes} of the data.tar.* inside a .deb (an 'ar' archive)."""
    blob = Path(path).read_bytes()
    assert blob[:8] == b"!<arch>\n", f"{path} is not a .deb"
    offset = 8
    while offset < len(blob):
        name, size = blob[offset:offset + 16].decode().strip().rstrip("/"), int(blob[offset + 48:offset + 58])
        data = blob[offset + 60: offset + 60 + size]
        offset += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            raw = lzma.decompress(data) if name.endswith(".xz") else gzip.decompress(data) if name.endswith(".gz") else data
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                return {m.name.lstrip("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    raise ValueError(f"{path} holds no data.tar")


def english_paragraphs(debs):
    """Paragraphs of the three packages' English text, markup removed."""
    files = {}
    for deb in Path(debs).glob("*.deb"):
        files.update(deb_members(deb))
    gcide = gzip.decompress(files["usr/share/dictd/gcide.dict.dz"]).decode("utf-8", "replace")
    gcide = gcide[gcide.find("Begin file 1 of 26"):]
    gcide = re.sub(r"\\[^\\\n]*\\", "", gcide)                 # \Ab*bre"vi*ate\ pronunciations
    gcide = re.sub(r"\[[^\]\n]*\]", "", gcide)                 # [1913 Webster], etymologies
    gcide = re.sub(r"--[A-Z][^\n]*", "", gcide)                # --Author. citations
    yield from re.split(r"\n\s*\n", gcide)
    for name, data in sorted(files.items()):
        if name.startswith("usr/share/wordnet/data."):
            for line in data.decode("utf-8", "replace").splitlines():
                if " | " in line and not line.startswith("  "):
                    yield line.split(" | ", 1)[1]
        elif name.startswith("usr/share/games/fortunes/") and "." not in Path(name).name:
            yield from data.decode("utf-8", "replace").split("\n%\n")


def prepare(args):
    lines = []
    for paragraph in english_paragraphs(args.debs):
        words = re.sub(r"[^a-z]+", " ", paragraph.lower()).split()
        if len(words) >= 3:
            lines.append(" ".join(words))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{args.out}: {len(lines):,} lines, {sum(len(l.split()) for l in lines):,} words")


# ---- training both, scoring both ----

def gensim_test_file(name):
    import gensim
    return Path(gensim.__file__).parent / "test" / "test_data" / name


def score(vectors, index, evals, limit):
    """The same numbers for any vectors (V, D) in frequency order: raw, and after all-but-the-top."""
    result = {}
    for prefix, v in (("", vectors), ("abtt_", w2v.all_but_the_top(vectors, max(1, vectors.shape[1] // 100)))):
        analogy = w2v.analogy_accuracy(v, index, evals["analogies"], limit)
        result.update({prefix + "analogy": analogy["accuracy"], prefix + "analogy_sections": analogy["sections"]},
                      **{prefix + name: w2v.similarity_correlation(v, index, pairs, limit)["spearman"]
                         for name, pairs in evals["similarity"].items()})
        result[prefix + "mean_cosine"] = w2v.anisotropy(v, 0)["mean_cosine"]
    result["analogy_coverage"] = analogy["coverage"]            # which words are in the vocabulary, not the vectors
    return result


def run_ours(corpus, args, batch, step_cap, device, evals):
    cfg = SimpleNamespace(epochs=args.epochs, window=args.window, negatives=args.negatives, sample=args.sample,
                          lr=args.lr, min_lr=1e-4, batch_size=batch, step_cap=step_cap)
    generator = torch.Generator(device).manual_seed(args.seed)
    model = w2v.SkipGram(len(corpus.words), args.dim, generator)
    history, seconds, _ = w2v.train(model, corpus, cfg, generator)
    vectors = model.in_vectors.detach()
    finite = bool(torch.isfinite(vectors).all())
    result = {"method": f"ours B={batch} cap={step_cap:g} lr={args.lr:g} seed={args.seed}", "device": str(device), "seconds": seconds,
              "words_per_second": args.epochs * len(corpus.tokens) / seconds, "final_loss": history[-1][1]}
    return {**result, **(score(vectors, corpus.index, evals, args.eval_vocab) if finite else {"diverged": True})}


def run_gensim(path, args, evals):
    from gensim.models import Word2Vec
    model = Word2Vec(vector_size=args.dim, window=args.window, min_count=args.min_count, sg=1, hs=0,
                     negative=args.negatives, sample=args.sample, alpha=args.gensim_lr, min_alpha=1e-4,
                     workers=args.workers, seed=args.seed)
    model.build_vocab(corpus_file=str(path))
    start = time.perf_counter()
    model.train(corpus_file=str(path), total_words=model.corpus_total_words, total_examples=model.corpus_count,
                epochs=args.epochs)
    seconds = time.perf_counter() - start
    in_vocab = sum(model.wv.get_vecattr(w, "count") for w in model.wv.index_to_key)
    index = {w: i for i, w in enumerate(model.wv.index_to_key)}
    result = {"method": f"gensim {args.workers} workers lr={args.gensim_lr:g} seed={args.seed}", "device": f"cpu x{args.workers}", "seconds": seconds,
              "words_per_second": args.epochs * in_vocab / seconds}
    return {**result, **score(torch.tensor(model.wv.vectors), index, evals, args.eval_vocab)}


def run(args):
    device = common.pick_device(args.device)
    evals = {"analogies": w2v.read_analogies(args.analogies or gensim_test_file("questions-words.txt")),
             "similarity": {"wordsim353": w2v.read_similarity(gensim_test_file("wordsim353.tsv")),
                            "simlex999": w2v.read_similarity(gensim_test_file("simlex999.txt"))}}
    opener = gzip.open if str(args.corpus).endswith(".gz") else open
    with opener(args.corpus, "rt", encoding="utf-8") as f:
        text = f.read()
    start = time.perf_counter()
    corpus = w2v.corpus_from_text(text, Path(args.corpus).name, args.min_count, device)
    print(f"corpus: {corpus.raw_words:,} words, {len(corpus.words):,} in the vocabulary, "
          f"built in {time.perf_counter() - start:.1f}s")
    warm = w2v.Corpus("warm-up", corpus.words, corpus.counts, corpus.tokens[:200_000], corpus.sentence[:200_000], 0)
    run_ours(warm, SimpleNamespace(**{**vars(args), "epochs": 1, "seed": 0}), w2v.Config.batch_size, w2v.Config.step_cap,
             device, evals)                                                                      # CUDA start-up
    results = []
    for seed in map(int, args.seeds.split(",")):
        for setting in filter(None, args.runs.split(",")):
            batch, cap = setting.split(":")
            results.append(run_ours(corpus, SimpleNamespace(**{**vars(args), "seed": seed}), int(batch), float(cap),
                                    device, evals))
            print(json.dumps(results[-1]), flush=True)
    if args.workers:
        with tempfile.TemporaryDirectory() as folder:                  # gensim's corpus_file wants plain text
            plain = Path(folder) / "corpus.txt"
            plain.write_text(text, encoding="utf-8")
            for seed in map(int, args.seeds.split(",")):
                results.append(run_gensim(plain, SimpleNamespace(**{**vars(args), "seed": seed}), evals))
                print(json.dumps(results[-1]), flush=True)
    print(f"\n{corpus.raw_words / 1e6:.1f}M words x{args.epochs} epochs, D={args.dim} W={args.window} "
          f"K={args.negatives} t={args.sample:g} min-count={args.min_count}")
    print(f"{'method':<44} {'device':<8} {'M words/s':>9} {'analogy':>8} {'WS353':>6} {'SimLex':>6}   after all-but-the-top")
    for r in results:
        line = f"{r['method']:<44} {r['device']:<8} {r['words_per_second'] / 1e6:>9.2f} "
        if r.get("diverged"):
            print(line + " diverged")
            continue
        print(line + f"{100 * r['analogy']:>7.1f}% {r['wordsim353']:>6.3f} {r['simlex999']:>6.3f}   "
              f"{100 * r['abtt_analogy']:.1f}% {r['abtt_wordsim353']:.3f} {r['abtt_simlex999']:.3f}")
    if args.out:
        common.save_json(args.out, results)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the corpus from the three .deb files")
    p.add_argument("--debs", default=".", help="folder holding the .deb files")
    p.add_argument("--out", default="bench_data/english.txt.gz")
    r = sub.add_parser("run", help="train and score both")
    r.add_argument("--corpus", default="bench_data/english.txt.gz")
    r.add_argument("--device", default="auto")
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--dim", type=int, default=100)
    r.add_argument("--window", type=int, default=5)
    r.add_argument("--negatives", type=int, default=5)
    r.add_argument("--sample", type=float, default=1e-3)
    r.add_argument("--min-count", type=int, default=5)
    r.add_argument("--runs", default=f"{w2v.Config.batch_size}:{w2v.Config.step_cap:g}",
                   help="comma-separated BATCH:STEP_CAP settings of ours to try ('' for none); default: 02's defaults")
    r.add_argument("--lr", type=float, default=w2v.Config.lr, help="our starting learning rate (02_word2vec.py's default)")
    r.add_argument("--gensim-lr", type=float, default=0.025, help="gensim's starting learning rate (alpha; its default)")
    r.add_argument("--workers", type=int, default=os.cpu_count(), help="gensim threads (0: skip gensim)")
    r.add_argument("--eval-vocab", type=int, default=30000)
    r.add_argument("--analogies", default="", help="default: gensim's copy of questions-words.txt")
    r.add_argument("--seeds", default="0", help="comma-separated seeds; every setting runs once per seed")
    r.add_argument("--out", default="", help="write the results as JSON here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    prepare(arguments) if arguments.command == "prepare" else run(arguments)
