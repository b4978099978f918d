"""02_word2vec: the SGNS loss, its written-out gradient and the SGD step against plain loops and autograd (float64);
the data pipeline against its formulas (subsampling, unigram^(3/4) negatives, dynamic windows); the count
baseline and SGNS against known structure; the file readers; the text8 download through a loopback server;
and end-to-end --quick runs that must learn and fail cleanly."""
import hashlib
import http.server
import io
import json
import math
import os
import stat
import subprocess
import sys
import threading
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch

import common

w2v = common.import_script("02_word2vec")


# ---- the objective and the SGD step ----

def loop_loss(v, u, valid):
    """-log s(u_0.v) - sum_k log s(-u_k.v), pair by pair, with Python floats where possible."""
    total = 0.0
    for b in range(len(v)):
        total = total - torch.log(torch.sigmoid(u[b, 0] @ v[b]))
        for k in range(1, u.shape[1]):
            if valid[b, k]:
                total = total - torch.log(torch.sigmoid(-(u[b, k] @ v[b])))
    return total


@pytest.mark.parametrize("B,K,D", [(1, 1, 2), (4, 5, 8), (7, 3, 5)])
def test_sgns_loss_and_its_gradient_match_a_plain_loop(B, K, D):
    g = torch.Generator().manual_seed(B * 10 + K)
    v = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(B, 1 + K, D, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(B, 1 + K, generator=g) > 0.2
    valid[:, 0] = True
    scores = (u @ v[:, :, None]).squeeze(2)
    ours, reference = w2v.sgns_loss(scores, valid), loop_loss(v, u, valid)
    torch.testing.assert_close(ours, reference)
    for a, b in zip(torch.autograd.grad(ours, (v, u), retain_graph=True), torch.autograd.grad(reference, (v, u))):
        torch.testing.assert_close(a, b)
    written_out = w2v.sgns_score_gradient(scores.detach(), valid)
    torch.testing.assert_close(written_out, torch.autograd.grad(ours, scores)[0])


@pytest.mark.parametrize("duplicates", [False, True])
def test_sgd_step_is_sgd_on_the_loss(duplicates):
    """With the cap out of reach, the step (index_add of written-out gradients) equals tables - lr * autograd."""
    g = torch.Generator().manual_seed(3)
    V, D, B, K, lr = 12, 6, 9, 4, 0.1
    model = w2v.SkipGram(V, D).double()
    with torch.no_grad():
        model.out_vectors.normal_(generator=g)
        model.in_vectors.normal_(generator=g)
    high = 3 if duplicates else V
    centre, context = torch.randint(high, (B,), generator=g), torch.randint(high, (B,), generator=g)
    negatives = torch.randint(high, (B, K), generator=g)
    targets = torch.cat([context[:, None], negatives], 1)
    valid = targets != context[:, None]
    valid[:, 0] = True
    scores = model(centre, targets)
    rows_in, rows_out = model.in_vectors.detach(), model.out_vectors.detach()
    dots = [[float(rows_in[centre[b]] @ rows_out[t]) for t in targets[b]] for b in range(B)]        # v'_t . v_c, a loop
    torch.testing.assert_close(scores.detach(), torch.tensor(dots, dtype=torch.float64))
    loss = w2v.sgns_loss(scores, valid)
    grad_in, grad_out = torch.autograd.grad(loss, (model.in_vectors, model.out_vectors))
    expected_in, expected_out = model.in_vectors.detach() - lr * grad_in, model.out_vectors.detach() - lr * grad_out
    returned = w2v.sgd_step(model, centre, context, negatives, lr, step_cap=1e12)
    torch.testing.assert_close(returned, loss.detach())
    torch.testing.assert_close(model.in_vectors.detach(), expected_in)
    torch.testing.assert_close(model.out_vectors.detach(), expected_out)


def test_training_takes_its_scores_from_the_model(monkeypatch):
    """train's step scores the pairs with SkipGram.scores, not a copy of it: a bias of 1 added to every score there
    changes every recorded loss (at the first step all scores are 0, so the loss per pair moves from 3 log 2)."""
    lexicon, ids, sentence = w2v.planted_text(300, seed=0)
    corpus = w2v.build_corpus("planted", lexicon, ids, sentence, 1, "cpu")
    cfg = SimpleNamespace(epochs=1, window=2, negatives=2, sample=0, lr=0.1, min_lr=1e-4, batch_size=200, step_cap=0.5)

    def losses():
        generator = torch.Generator().manual_seed(0)
        history, _, _ = w2v.train(w2v.SkipGram(len(corpus.words), 8, generator), corpus, cfg, generator, log_points=5)
        return [loss for _, loss in history]

    plain = losses()
    scores = w2v.SkipGram.scores
    monkeypatch.setattr(w2v.SkipGram, "scores", staticmethod(lambda v, u: scores(v, u) + 1.0))
    biased = losses()
    assert len(plain) == len(biased) >= 3
    assert all(abs(a - b) > 1e-3 for a, b in zip(plain, biased)), (plain, biased)


def test_step_cap_keeps_a_busy_row_stable():
    """Word 0 is the context of half of 20 000 pairs per step and the negative of the other half, for only three
    centres: summed plain SGD overshoots and diverges; the capped step settles at the optimum s(v.v'_0) = 1/2,
    where the loss per pair is 2 log 2."""
    V, D, B = 50, 8, 20_000
    losses = {}
    for cap in (1.0, 1e12):
        g = torch.Generator().manual_seed(0)
        model = w2v.SkipGram(V, D)
        with torch.no_grad():
            model.in_vectors.normal_(0, 0.3, generator=g)
        for _ in range(20):
            centre, half = torch.randint(1, 4, (B,), generator=g), torch.rand(B, generator=g) < 0.5
            context = torch.where(half, 0, torch.randint(4, V, (B,), generator=g))
            negatives = torch.where(half, torch.randint(4, V, (B,), generator=g), 0)[:, None]
            losses[cap] = w2v.sgd_step(model, centre, context, negatives, lr=0.025, step_cap=cap).item() / B
    assert losses[1.0] == pytest.approx(2 * math.log(2), abs=0.01)
    assert not math.isfinite(losses[1e12])


# ---- the data pipeline ----

def test_keep_probability_is_word2vecs_formula():
    counts = torch.tensor([1_000_000, 50_000, 2_000, 10])
    keep = w2v.keep_probability(counts, 1e-3)
    total = counts.sum().item()
    for c, p in zip(counts.tolist(), keep.tolist()):
        f = c / total
        assert p == pytest.approx(min(1.0, (math.sqrt(f / 1e-3) + 1) * 1e-3 / f))
    assert keep[-1] == 1 and keep[0] < 0.1
    assert torch.equal(w2v.keep_probability(counts, 0), torch.ones(4, dtype=torch.float64))


def test_negatives_follow_unigram_to_the_three_quarters():
    counts = torch.tensor([5000, 1200, 300, 300, 40, 7, 1])
    cdf = w2v.negative_cdf(counts)
    draws = w2v.sample_negatives(cdf, (400_000,), torch.Generator().manual_seed(0))
    empirical = torch.bincount(draws, minlength=len(counts)).double() / len(draws)
    expected = counts.double() ** 0.75 / (counts.double() ** 0.75).sum()
    assert 0.5 * (empirical - expected).abs().sum() < 0.005          # total variation distance


def test_window_pairs_match_a_plain_loop():
    tokens = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    sentence = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    radius = torch.tensor([1, 3, 2, 1, 2, 3, 2, 1])
    centre, context = w2v.window_pairs(tokens, sentence, radius, window=3)
    expected = Counter((int(tokens[i]), int(tokens[j])) for i in range(8) for j in range(8)
                       if i != j and abs(i - j) <= radius[i] and sentence[i] == sentence[j])
    assert Counter(zip(centre.tolist(), context.tolist())) == expected


def test_dynamic_window_uses_a_context_d_away_with_probability_w_minus_d_plus_1_over_w():
    """On one long sentence, pairs d apart appear (W - d + 1) / W times as often as with a full window."""
    n, window = 20_000, 4
    corpus = w2v.Corpus("t", ["a"], torch.tensor([n]), torch.arange(n), torch.zeros(n, dtype=torch.long), n)
    centre, context = w2v.epoch_pairs(corpus, torch.ones(n, dtype=torch.float64), window, torch.Generator().manual_seed(0))
    distance = Counter((context - centre).abs().tolist())
    for d in range(1, window + 1):
        assert distance[d] / (2 * (n - d)) == pytest.approx((window - d + 1) / window, abs=0.02)


# ---- the count baseline and SGNS against known structure ----

@pytest.fixture(scope="module")
def small_planted():
    lexicon, ids, sentence = w2v.planted_text(20_000, seed=1)
    return w2v.build_corpus("planted", lexicon, ids, sentence, 5, "cpu")


def test_ppmi_svd_finds_the_planted_synonyms(small_planted):
    corpus = small_planted
    vectors = w2v.ppmi_svd(w2v.cooccurrence(corpus, len(corpus.words), 5), 32)
    ids = torch.tensor([corpus.index[a] for a, _, _ in w2v.SYNONYMS])
    nearest, _ = w2v.nearest_neighbours(vectors, ids, k=1)
    found = [corpus.words[int(n)] for n in nearest[:, 0]]
    assert sum(f == b for f, (_, b, _) in zip(found, w2v.SYNONYMS)) >= 5, found


@pytest.mark.parametrize("size,window", [(4, 3), (6, 1), (3, 5)])
def test_cooccurrence_matches_a_plain_loop(size, window):
    """Pairs within a sentence d <= W apart, both words among the `size` most frequent, weighted (W - d + 1) / W."""
    g = torch.Generator().manual_seed(size * 10 + window)
    n = 60
    tokens, sentence = torch.randint(6, (n,), generator=g), torch.randint(4, (n,), generator=g).sort().values
    corpus = w2v.Corpus("t", list("abcdef"), torch.bincount(tokens, minlength=6), tokens, sentence, n)
    expected = torch.zeros(size, size)
    for i in range(n):
        for j in range(n):
            d = abs(i - j)
            if 0 < d <= window and sentence[i] == sentence[j] and tokens[i] < size and tokens[j] < size:
                expected[tokens[i], tokens[j]] += (window - d + 1) / window
    torch.testing.assert_close(w2v.cooccurrence(corpus, size, window), expected)


@pytest.mark.parametrize("alpha", [0.75, 1.0])
def test_pmi_matches_counting_by_hand(alpha):
    """PMI(w, c) = log P(w, c) / (P(w) P_alpha(c)), P_alpha(c) = #(c)^alpha / sum_c' #(c')^alpha (Levy et al. 2015,
    Eq. 3), on a tiny corpus whose pairs are counted with plain loops (a context d <= W away weighs (W - d + 1) / W);
    float64 throughout. Words 4 and 0 never meet: -inf."""
    sentences, window, size = [[0, 1, 2, 1], [2, 3, 0], [1, 1, 3, 2, 0], [4, 3]], 2, 5
    counts = [[0.0] * size for _ in range(size)]
    for s in sentences:
        for i in range(len(s)):
            for j in range(len(s)):
                if 0 < abs(i - j) <= window:
                    counts[s[i]][s[j]] += (window - abs(i - j) + 1) / window
    total = sum(map(sum, counts))
    p_word = [sum(counts[w]) / total for w in range(size)]
    smoothed = [sum(counts[w][c] for w in range(size)) ** alpha for c in range(size)]
    p_context = [x / sum(smoothed) for x in smoothed]
    expected = [[math.log(counts[w][c] / total / (p_word[w] * p_context[c])) if counts[w][c] else -math.inf
                 for c in range(size)] for w in range(size)]
    tokens = torch.tensor([t for s in sentences for t in s])
    sentence = torch.tensor([k for k, s in enumerate(sentences) for _ in s])
    corpus = w2v.Corpus("t", list("abcde"), torch.bincount(tokens), tokens, sentence, len(tokens))
    ours = w2v.pmi(w2v.cooccurrence(corpus, size, window).double(), alpha)
    assert counts[4][0] == 0 and ours[4, 0] == -math.inf
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64))


def test_planted_pairs_never_cooccur_and_words_are_built_from_the_lists(small_planted):
    corpus = small_planted
    counts = w2v.cooccurrence(corpus, len(corpus.words), 5)
    for a, b, _ in w2v.SYNONYMS + w2v.GENDER[:4]:
        assert counts[corpus.index[a], corpus.index[b]] == 0
    assert corpus.words[0] == "the" and len(corpus.words) < 400


# ---- evaluation pieces and files ----

def test_spearman_matches_the_closed_form_and_handles_ties():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    rank = lambda t: t.argsort().argsort().double() + 1
    closed = 1 - 6 * ((rank(x) - rank(y)) ** 2).sum() / (50 * (50 ** 2 - 1))
    assert w2v.spearman(x, y) == pytest.approx(float(closed))
    ties = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    torch.testing.assert_close(w2v.average_ranks(ties), torch.tensor([4.0, 1.0, 4.0, 2.0, 4.0], dtype=torch.float64))


def test_all_but_the_top_removes_the_mean_and_top_directions():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(500, 16, generator=g) + 3 * torch.randn(16, generator=g)    # a strong common direction
    fixed = w2v.all_but_the_top(vectors, 2)
    torch.testing.assert_close(fixed.mean(0), torch.zeros(16), atol=1e-4, rtol=0)
    centred = vectors - vectors.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False)[2][:2]
    torch.testing.assert_close(fixed @ top.T, torch.zeros(500, 2), atol=1e-4, rtol=0)
    assert w2v.anisotropy(vectors, 0)["mean_cosine"] > 0.5 > abs(w2v.anisotropy(fixed, 0)["mean_cosine"]) + 0.4


def test_analogy_reader_and_accuracy_report_coverage(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("# a comment\n: capital-common-countries\nAthens Greece Paris France\n\n"
                    ": family\nking queen man woman\nking queen man zebra\n")
    questions = w2v.read_analogies(path)
    assert questions == [("capital-common-countries", "athens", "greece", "paris", "france"),
                         ("family", "king", "queen", "man", "woman"), ("family", "king", "queen", "man", "zebra")]
    words = ["athens", "greece", "paris", "france", "king", "queen", "man", "woman"]
    vectors = torch.eye(8)
    vectors[3] = vectors[1] - vectors[0] + vectors[2]                 # france = greece - athens + paris
    result = w2v.analogy_accuracy(vectors, {w: i for i, w in enumerate(words)}, questions, limit=8)
    assert (result["covered"], result["questions"]) == (2, 3)
    assert result["sections"]["capital-common-countries"] == 1.0


@pytest.mark.parametrize("text", [": only-a-header\n", "a b c\n", ": two words here\na b c d\n"])
def test_analogy_reader_rejects_other_formats(tmp_path, text):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(common.UserError):
        w2v.read_analogies(path)


def test_similarity_reader_skips_comments_and_a_header(tmp_path):
    path = tmp_path / "ws.tsv"
    path.write_text("# WordSim\nWord 1\tWord 2\tHuman (mean)\nlove\tsex\t6.77\ntiger\tcat\t7.35\n")
    pairs = w2v.read_similarity(path)
    assert pairs == [("love", "sex", 6.77), ("tiger", "cat", 7.35)]
    index = {"love": 0, "sex": 1, "tiger": 2, "cat": 3}
    result = w2v.similarity_correlation(torch.eye(4), index, pairs + [("love", "zebra", 1.0)] * 2, limit=4)
    assert (result["covered"], result["pairs"], result["spearman"]) == (2, 4, None)    # too few pairs for a rho
    path.write_text("love sex 6.77\ntiger cat much\n")
    with pytest.raises(common.UserError, match=":2:"):
        w2v.read_similarity(path)


def read_vec(path):
    """word2vec's text format read from its description ('V D', then 'word x1 ... xD' per line), to check save_vec."""
    header, *lines = Path(path).read_text(encoding="utf-8").splitlines()
    count, dim = map(int, header.split())
    rows = [line.split(" ") for line in lines]
    assert len(rows) == count and all(len(row) == 1 + dim for row in rows)
    return [row[0] for row in rows], torch.tensor([[float(x) for x in row[1:]] for row in rows])


def test_vec_file_round_trips(tmp_path):
    words = ["the", "king", "queen"]
    vectors = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    w2v.save_vec(tmp_path / "v.vec", words, vectors)
    loaded_words, loaded = read_vec(tmp_path / "v.vec")
    assert loaded_words == words
    torch.testing.assert_close(loaded, vectors, rtol=1e-5, atol=1e-6)


# ---- text8 through a loopback HTTP server ----

@pytest.fixture
def server():
    """Serves `server.files` (name -> bytes) on 127.0.0.1; counts the requests."""
    files, hits = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path.lstrip("/"))
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield type("Server", (), {"files": files, "hits": hits, "url": f"http://127.0.0.1:{httpd.server_port}/"})
    httpd.shutdown()
    httpd.server_close()


def text8_zip(text):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("text8", text)
    return buffer.getvalue()


def test_text8_is_downloaded_once_and_checked(server, tmp_path, monkeypatch):
    archive = text8_zip(" the king and the queen " * 50)
    server.files["text8.zip"] = archive
    monkeypatch.setattr(common, "TEXT8", common.RemoteDataset(
        [server.url], [common.RemoteFile("text8.zip", md5="", sha256=hashlib.sha256(archive).hexdigest())], []))
    assert common.read_text8(tmp_path).split()[:3] == ["the", "king", "and"]
    assert (tmp_path / "text8" / "text8.zip").is_file() and not list(tmp_path.rglob("*.part"))
    assert common.read_text8(tmp_path)                                  # from the cache: no second request
    assert len(server.hits) == 1


def test_text8_download_with_a_wrong_checksum_leaves_nothing(server, tmp_path, monkeypatch):
    server.files["text8.zip"] = text8_zip("corrupted copy")
    monkeypatch.setattr(common, "TEXT8", common.RemoteDataset(
        [server.url], [common.RemoteFile("text8.zip", md5="", sha256="0" * 64)], []))
    with pytest.raises(common.UserError, match="SHA-256"):
        common.read_text8(tmp_path)
    assert not list((tmp_path / "text8").iterdir())


def test_text8_unreachable_is_one_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "TEXT8", common.RemoteDataset(
        [server.url + "missing/"], [common.RemoteFile("text8.zip", md5="", sha256="0" * 64)], []))
    with pytest.raises(common.UserError, match="cannot download text8.zip"):
        common.read_text8(tmp_path)


# ---- end to end ----

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The --quick run, into a folder that an earlier run left (with a figure this run does not make), under a umask
    that lets the group read and others nothing."""
    out = tmp_path_factory.mktemp("w2v") / "run"
    out.mkdir()
    (out / "config.json").write_text('{"seed": 7}')
    (out / "old_figure.png").write_bytes(b"png")
    umask = os.umask(0o027)
    try:
        model, metrics = w2v.main(["--quick", "--device", "cpu", "--out", str(out)])
    finally:
        os.umask(umask)
    return out, model, metrics


def test_quick_run_learns_the_planted_structure(quick_run):
    out, model, metrics = quick_run
    assert metrics["loss_last"] < 0.6 * metrics["loss_first"]
    sgns, random = metrics["results"]["SGNS"], metrics["results"]["random"]
    assert sgns["analogy"]["accuracy"] > 0.5 > random["analogy"]["accuracy"] + 0.4
    assert sgns["analogy"]["coverage"] == 1.0 and sgns["similarity"]["coverage"] == 1.0
    assert sgns["similarity"]["spearman"] > 0.5
    assert metrics["neighbours"]["sofa"][0][0] == "couch"
    assert metrics["never_together"]["cooccurrences"] == 0 and metrics["never_together"]["cosine"] > 0.8
    assert metrics["pmi_pearson"] > 0.5
    assert metrics["anisotropy"]["after"]["mean_cosine"] < metrics["anisotropy"]["before"]["mean_cosine"]


def test_quick_run_never_together_pair_is_never_within_a_window(quick_run):
    """Recounted from the text with window_pairs at full radius, not with the cooccurrence() the script used."""
    _, _, metrics = quick_run
    cfg = common.parse_config(w2v.Config, ["--quick"], w2v.__doc__, quick=w2v.QUICK)
    corpus = w2v.load_corpus(cfg, "cpu")
    a, b = (corpus.index[w] for w in metrics["never_together"]["words"])
    radius = torch.full((len(corpus.tokens),), cfg.window)
    centre, context = w2v.window_pairs(corpus.tokens, corpus.sentence, radius, cfg.window)
    assert (centre == a).any() and (centre == b).any()
    assert not ((centre == a) & (context == b)).any()


def test_quick_run_writes_every_output_as_one_run(quick_run):
    out, model, metrics = quick_run
    outputs = ["config.json", "metrics.json", "vectors.vec", "word2vec.png", "word2vec.pt"]
    assert sorted(p.name for p in out.iterdir()) == outputs                      # the earlier run's figure is gone
    assert [p.name for p in out.parent.iterdir()] == ["run"]                     # no staging folder, no temporary file
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640} and stat.S_IMODE(out.stat().st_mode) == 0o750
    words, vectors = read_vec(out / "vectors.vec")
    assert len(words) == metrics["vocabulary"] and vectors.shape == model.in_vectors.shape
    fresh = w2v.SkipGram(len(words), vectors.shape[1])
    state = common.load_checkpoint(out / "word2vec.pt", fresh, kind="word2vec")
    assert state["words"] == words and torch.equal(fresh.in_vectors, model.in_vectors)
    assert json.loads((out / "metrics.json").read_text())["corpus"] == "planted"


def test_a_text_file_corpus_runs(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(["The cat sat on the mat.", "A dog sat on the log!"] * 40))
    _, metrics = w2v.main(["--corpus", str(path), "--device", "cpu", "--out", str(tmp_path / "o"), "--dim", "8",
                           "--epochs", "2", "--batch-size", "256", "--min-count", "2"])
    assert metrics["vocabulary"] == 8 and metrics["results"]["SGNS"]["analogy"] is None


@pytest.mark.parametrize("lines", [1, 5000])
def test_quick_caps_a_users_corpus(tmp_path, lines):
    """A 2-million-word file took 126 s with --quick; its first 200 000 words are enough to show the pipeline
    (text8 is a single line: the cut is by words, not lines)."""
    path = tmp_path / "big.txt"
    path.write_text("\n".join([" ".join(["the cat sat on a mat"] * (50_000 // lines))] * lines))     # 300 000 words
    quick = common.parse_config(w2v.Config, ["--quick", "--corpus", str(path)], w2v.__doc__, quick=w2v.QUICK)
    assert w2v.load_corpus(quick, "cpu").raw_words == 200_000
    assert w2v.corpus_from_text(path.read_text(), "big", 1, "cpu").raw_words == 300_000
    assert len(w2v.load_corpus(common.parse_config(w2v.Config, ["--quick"], "", quick=w2v.QUICK), "cpu").tokens) < 200_000


def test_one_dimensional_vectors_leave_the_relation_planes_empty():
    fig, ax = plt.subplots()
    index = {"king": 0, "queen": 1, "man": 2, "woman": 3}
    w2v.plot_relation(ax, torch.randn(4, 1), index, [("king", "queen"), ("man", "woman")], "1-D", "tab:red")
    assert [t.get_text() for t in ax.texts] == ["no plane in 1 dimension"] and not ax.collections
    w2v.plot_relation(ax, torch.randn(4, 2), index, [("king", "queen"), ("man", "woman")], "2-D", "tab:red")
    assert len(ax.collections) == 1                                       # the scatter of the four words
    plt.close(fig)


def test_dim_1_runs_to_the_end_and_says_what_it_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "cpu_gflops", lambda: 1e-4)                 # a CPU so slow that even this run is long
    _, metrics = w2v.main(["--device", "cpu", "--out", str(tmp_path), "--sentences", "300", "--dim", "1",
                           "--epochs", "1", "--batch-size", "1024", "--eval-vocab", "200"])
    printed = capsys.readouterr().out
    assert "word2vec.png: the two PCA planes of relations are left empty (--dim 1 gives no plane)" in printed
    assert "note: this run is sized for a GPU" in printed and "Add --quick" in printed     # not a --quick run
    for name in ("metrics.json", "vectors.vec", "word2vec.pt", "word2vec.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("argv, message", [
    (["--corpus", "/no/such/file.txt"], "does not exist"),
    (["--window", "0"], "--window must be at least 1"),
    (["--dim", "-3"], "--dim must be at least 1"),
    (["--min-count", "100000000"], "leaves 0 words"),
    (["--analogies", "/no/such/questions.txt"], "does not exist"),
    (["--dataset", "mnist"], "--corpus"),
    (["--no-such-option"], "unrecognized"),
    (["--corpus", "."], r"corpus file '\.' is a folder, not a file"),
    (["--similarity", "."], r"--similarity file '\.' is a folder, not a file"),
    (["--lr", "inf", "--min-lr", "inf"], "--lr must be a finite number"),
    (["--max-words", "-1"], "--max-words must be 0"),
])
def test_bad_options_fail_cleanly(tmp_path, argv, message):
    with pytest.raises(common.UserError, match=message):
        w2v.main(["--quick", "--device", "cpu", "--out", str(tmp_path), *argv])


def test_a_diverged_run_stops_with_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(common.UserError, match=r"^training diverged \(the loss is nan\); lower --lr"):
        w2v.main(["--device", "cpu", "--out", str(tmp_path / "run"), "--sentences", "2000", "--epochs", "2",
                  "--batch-size", "1024", "--lr", "1e6", "--step-cap", "1e12", "--eval-vocab", "200"])
    common.discard_unfinished_runs()                                      # what common.run does as the script ends
    assert list(tmp_path.iterdir()) == []                                 # no model, no config.json, no staging


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "not UTF-8"),
                                              (b"ab\x00cd\n", "NUL")])
def test_bad_corpus_files_fail_cleanly(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(common.UserError, match=message):
        w2v.main(["--corpus", str(path), "--device", "cpu", "--out", str(tmp_path / "o")])


def test_bad_analogy_file_fails_before_training(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(": section\nonly three words\n")
    with pytest.raises(common.UserError, match="expected 4 words"):
        w2v.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "o"), "--analogies", str(path)])


def test_script_exits_with_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(Path(w2v.__file__)), "--corpus", str(tmp_path / "missing.txt"),
                             "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
