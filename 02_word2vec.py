"""02 -- Word vectors from co-occurrence: skip-gram with negative sampling (word2vec), on the GPU.

A word is known by the company it keeps (Firth 1957; Harris 1954's distributional hypothesis). word2vec
turns that sentence into an objective: give every word two vectors, one for when it is the centre of a
window and one for when it is a context, and make the dot product of a centre with its real contexts large
and with random words small. Words with the same contexts then get the same vectors, even if they never
meet. This script writes the whole pipeline of the original tool from tensor operations: the two tables and
their scores, the loss with its gradient written out, SGD on many pairs at once, subsampling, dynamic windows,
unigram^(3/4) negatives. It evaluates the vectors by neighbours, analogies (b - a + c) and the Spearman
correlation with similarity scores; shows their anisotropy and removes it ("all-but-the-top"); and compares
them with a count-based baseline, PPMI factorised by SVD, the matrix that SGNS factorises implicitly.

Papers:
  Mikolov, Chen, Corrado, Dean 2013a, "Efficient Estimation of Word Representations in Vector Space"
    (skip-gram; the analogy questions, answered by the nearest vector to b - a + c).
  Mikolov, Sutskever, Chen, Corrado, Dean 2013b, "Distributed Representations of Words and Phrases and their
    Compositionality": Eq. 4 negative sampling, Eq. 5 subsampling, Sec. 2.2 the unigram^(3/4) noise.
  Levy, Goldberg 2014, "Neural Word Embedding as Implicit Matrix Factorization", Sec. 3.1: at its optimum
    SGNS sets w.c = PMI(w, c) - log k.
  Levy, Goldberg, Dagan 2015, "Improving Distributional Similarity with Lessons Learned from Word Embeddings":
    PPMI with context-distribution smoothing (Eq. 3) and SVD with eigenvalue weighting.
  Mu, Viswanath 2018, "All-but-the-Top: Simple and Effective Postprocessing for Word Representations", Alg. 1.

Run:  python 02_word2vec.py                      (the embedded planted corpus, generated offline in seconds)
      python 02_word2vec.py --corpus text8       (17M words of Wikipedia, downloaded once, checksum verified)
      python 02_word2vec.py --corpus my.txt --analogies questions-words.txt --similarity wordsim353.tsv
Measured on one H200 (torch 2.11; D=100, W=5, K=5, t=1e-3, 5 epochs, B=65536, lr 0.1, step cap 0.5), RESULTS.md:
  planted corpus, 3.1M words, 372 in the vocabulary: trained at 14.8M words/s, 9.2 s for the whole run;
    analogies 100.0% (PPMI-SVD 100.0%, random vectors 0.2%), similarity rho 0.92 (PPMI-SVD 0.87, random 0.04).

Shapes legend: V vocabulary, N words of running text, B (centre, context) pairs per step, K negatives,
D vector size, M the most frequent words used for evaluation and the count baseline, Q questions.
"""
import itertools
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

HERE = Path(__file__).resolve().parent
PLANTED_ANALOGIES = HERE / "data_files" / "word2vec_planted_analogies.txt"
PLANTED_SIMILARITY = HERE / "data_files" / "word2vec_planted_similarity.txt"


@dataclass
class Config(common.RunConfig):
    # NOTE: RunConfig's --dataset names image sets; this script reads text and takes --corpus instead.
    dataset: str = common.arg("", "not used here: word2vec reads text, chosen by --corpus")
    corpus: str = common.arg("planted", "planted (embedded, generated offline) | text8 (downloaded once into "
                                        "--data-dir) | PATH to a UTF-8 text file, one sentence per line")
    sentences: int = common.arg(400_000, "sentences of the planted corpus (about 9 words each)")
    max_words: int = common.arg(0, "read at most this many words of the corpus (0: all of it)")
    min_count: int = common.arg(5, "words seen fewer times are dropped from the text")
    dim: int = common.arg(100, "D: size of each word vector")
    window: int = common.arg(5, "W: largest distance between a centre and a context; each centre draws its own 1..W")
    negatives: int = common.arg(5, "K: words drawn from unigram^(3/4) per (centre, context) pair")
    sample: float = common.arg(1e-3, "subsampling threshold t: words more frequent than t are dropped at random (0: keep all)")
    epochs: int = common.arg(5, "passes over the text")
    # NOTE: 4x word2vec.c's and gensim's 0.025. Per-pair SGD there; here the summed step of a busy row is capped
    # (sgd_step), and on 6M words of English 0.1 gave better analogies and similarities than 0.025 (RESULTS.md, 02)
    lr: float = common.arg(0.1, "SGD learning rate at the start; it falls linearly to --min-lr")
    min_lr: float = common.arg(1e-4, "learning rate at the end")
    batch_size: int = common.arg(65536, "B: (centre, context) pairs per step")
    step_cap: float = common.arg(0.5, "largest step of one vector per batch, in units of its Newton step "
                                      "(keeps large batches stable; see sgd_step)")
    analogies: str = common.arg("", "analogy questions in questions-words.txt format (default: the shipped "
                                    "planted set with --corpus planted, else none)")
    similarity: str = common.arg("", "word pairs with scores, 'word1 word2 score' per line (default: the shipped "
                                     "planted set with --corpus planted, else none)")
    eval_vocab: int = common.arg(30000, "M: analogies, similarity, neighbours and the PPMI baseline use the M most "
                                        "frequent words (Mikolov et al. used 30000)")
    abtt: int = common.arg(0, "principal directions removed by all-but-the-top (0: dim/100, at least 1)")


# --quick caps a user's corpus as it shrinks the planted one (20 000 sentences are about 180 000 words)
QUICK = dict(sentences=20_000, max_words=200_000, dim=32, epochs=5, batch_size=4096, eval_vocab=2000)


# ---- 1. Model: two tables of vectors and their scores ----

class SkipGram(nn.Module):
    """v_w (in_vectors) for a word as the centre of a window, v'_w (out_vectors) for a word as a context.
    Initialised as word2vec.c does: centres uniform in +-0.5/D, contexts zero."""

    def __init__(self, vocab_size, dim, generator=None):
        super().__init__()
        device = generator.device if generator is not None else "cpu"
        self.in_vectors = nn.Parameter((torch.rand(vocab_size, dim, generator=generator, device=device) - 0.5) / dim)
        self.out_vectors = nn.Parameter(torch.zeros(vocab_size, dim, device=device))

    def forward(self, centre, targets):
        """The score of each centre with each of its targets: word ids (B,), (B, T) -> (B, T)."""
        return self.scores(self.in_vectors[centre], self.out_vectors[targets])

    @staticmethod
    def scores(v, u):
        """s = v'_c . v_w, the logit of "c is a real context of w", from the rows themselves: a centre's v_w (B, D)
        and its targets' v'_c (B, T, D) -> (B, T). sgd_step calls it on the rows it gathered for the gradient."""
        return (u @ v[:, :, None]).squeeze(2)                         # (B, T, D) @ (B, D, 1) -> (B, T)


# ---- 2. Objective: negative sampling ----

def sgns_loss(scores, valid):
    """Eq. 4 of Mikolov et al. 2013b, negated and summed over the pairs:
        -log s(v'_c . v_w) - sum_k log s(-v'_k . v_w),   s the logistic sigmoid.
    scores (B, 1+K): column 0 the true context, then the K negatives; valid (B, 1+K) drops the negatives that
    drew the context itself (word2vec.c skips them too). -log s(x) = softplus(-x)."""
    sign = torch.ones_like(scores)
    sign[:, 1:] = -1
    return (F.softplus(-sign * scores) * valid).sum()


def sgns_score_gradient(scores, valid):
    """d loss / d score, written out: s(x) - 1 for the true context, s(x) for a negative, 0 where not valid."""
    label = torch.zeros_like(scores)
    label[:, 0] = 1
    return (torch.sigmoid(scores) - label) * valid


# ---- 3. Training: plain SGD, gradients written out, on many pairs at once ----

@torch.no_grad()
def sgd_step(model, centre, context, negatives, lr, step_cap=0.5):
    """One SGD step on B (centre, context) pairs and their negatives; returns the summed loss (a 0-d tensor).
    centre, context (B,), negatives (B, K). The gradient is two lines, as in word2vec.c: autograd would build
    dense (V, D) gradients of both tables for the B(2+K) rows that a step touches.

    NOTE: word2vec.c and gensim update after every pair, on many CPU threads; a GPU step adds up the gradients
    of B pairs taken at one point. A frequent word ('the') then collects thousands of them at once, the sum
    overshoots and training diverges (try --step-cap 1e9). So each row's learning rate is capped by its
    curvature this step, h_r = sum of s'(x)|other vector|^2 over its pairs (the trace of its Gauss-Newton
    Hessian, which bounds the largest eigenvalue): lr_r = min(lr, step_cap / h_r). A row seen a few times per
    step keeps plain SGD; a busy row moves at most step_cap Newton steps. Both ends of a pair move at once, so
    the default 0.5 lets the two together take at most one: with 1, a tiny corpus with few steps (0.8M planted
    words, two epochs, B = 65536) diverged on a CPU, and so did 6M words of English at --lr 0.05."""
    targets = torch.cat([context[:, None], negatives], 1)            # (B, 1+K)
    valid = targets != context[:, None]
    valid[:, 0] = True
    v = model.in_vectors[centre]                                     # (B, D)
    u = model.out_vectors[targets]                                   # (B, 1+K, D)
    scores = model.scores(v, u)                                      # (B, 1+K)
    g = sgns_score_gradient(scores, valid)                           # (B, 1+K) d loss / d score
    # Curvature of each row this step: s'(x) = s(x)(1 - s(x)) = |g|(1 - |g|) for both labels.
    curvature = g.abs() * (1 - g.abs())                              # (B, 1+K)
    h_in = torch.zeros(len(model.in_vectors), device=g.device, dtype=g.dtype).index_add_(
        0, centre, (curvature * torch.linalg.vector_norm(u, dim=2) ** 2).sum(1))
    h_out = torch.zeros(len(model.out_vectors), device=g.device, dtype=g.dtype).index_add_(
        0, targets.flatten(), (curvature * (v * v).sum(1, keepdim=True)).flatten())
    lr_in = (step_cap / h_in).clamp(max=lr)                          # (V,) inf where h = 0 -> lr
    lr_out = (step_cap / h_out).clamp(max=lr)
    grad_v = (g[:, None, :] @ u).squeeze(1)                          # (B, 1, 1+K) @ (B, 1+K, D) -> (B, D)
    step_u = (g * lr_out[targets])[:, :, None] * v[:, None, :]       # (B, 1+K, D) lr * d loss / d u
    model.in_vectors.index_add_(0, centre, grad_v * lr_in[centre, None], alpha=-1)
    model.out_vectors.index_add_(0, targets.flatten(), step_u.flatten(0, 1), alpha=-1)
    return sgns_loss(scores, valid)


def train(model, corpus, cfg, generator, log_points=100):
    """cfg.epochs passes of SGD with a learning rate falling linearly from lr to min_lr.
    Returns (history of (words seen, mean loss per pair), seconds, pairs trained on)."""
    device = corpus.tokens.device
    keep, cdf = keep_probability(corpus.counts, cfg.sample), negative_cdf(corpus.counts)
    words = len(corpus.tokens)
    bar = common.progress(cfg.epochs * words, "train", unit="word")
    clock = common.Stopwatch(device)
    history, pairs, running_loss, running_pairs = [], 0, torch.zeros((), device=device), 0
    for epoch in range(cfg.epochs):
        centre, context = epoch_pairs(corpus, keep, cfg.window, generator)        # (P,) each
        steps = max(1, math.ceil(len(centre) / cfg.batch_size))
        log_every = max(1, steps * cfg.epochs // log_points)
        for step in range(steps):
            progress = (epoch + step / steps) / cfg.epochs
            lr = cfg.lr - (cfg.lr - cfg.min_lr) * progress
            batch = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            c, x = centre[batch], context[batch]
            negatives = sample_negatives(cdf, (len(c), cfg.negatives), generator)     # (B, K)
            running_loss += sgd_step(model, c, x, negatives, lr, cfg.step_cap)
            running_pairs += len(c)
            if (step + 1) % log_every == 0 or step == steps - 1:
                seen = int((epoch + (step + 1) / steps) * words)
                history.append((seen, running_loss.item() / max(running_pairs, 1)))    # one sync per log point
                running_loss.zero_()
                running_pairs = 0
                bar.update(seen - bar.n)
                bar.set_postfix(loss=f"{history[-1][1]:.3f}", lr=f"{lr:.4f}")
        pairs += len(centre)
    bar.close()
    return history, clock.seconds(), pairs


# ---- 4. Data: a corpus -> (centre, context) pairs and negatives ----

def keep_probability(counts, sample):
    """Subsampling (Mikolov et al. 2013b, Eq. 5 discards a word with probability 1 - sqrt(t/f), f its share of
    the text). The released word2vec.c, and gensim, keep it with probability sqrt(t/f) + t/f, a little more; we
    follow the code, so that the benchmark compares like with like. (V,) float64, 1 for rare words."""
    if sample == 0:   # EXERCISE: --sample 0 keeps every 'the'; compare the neighbours of rare words and words/s
        return torch.ones(len(counts), dtype=torch.float64, device=counts.device)
    share = counts.double() / counts.sum()
    return ((share / sample).sqrt() + 1).mul(sample / share).clamp(max=1)


def window_pairs(tokens, sentence, radius, window):
    """All (centre, context) pairs of a text whose token i sees the tokens up to radius[i] away in its sentence.
    tokens, sentence, radius (N,) -> centre, context (P,) word ids. A loop over the W distances, not the words."""
    centres, contexts = [], []
    for d in range(1, window + 1):
        same = sentence[:-d] == sentence[d:]                   # (N-d,) tokens i and i+d share a sentence
        right = same & (radius[:-d] >= d)                      # centre i sees i+d
        left = same & (radius[d:] >= d)                        # centre i+d sees i
        centres += [tokens[:-d][right], tokens[d:][left]]
        contexts += [tokens[d:][right], tokens[:-d][left]]
    return torch.cat(centres), torch.cat(contexts)


def epoch_pairs(corpus, keep, window, generator):
    """One pass of word2vec's data pipeline, shuffled: subsample, draw each centre's window, cut the pairs.
    Subsampled words vanish before the windows are cut (as in word2vec.c), so windows reach further."""
    device = corpus.tokens.device
    kept = torch.rand(len(corpus.tokens), generator=generator, device=device, dtype=torch.float64) < keep[corpus.tokens]
    tokens, sentence = corpus.tokens[kept], corpus.sentence[kept]                  # (N',)
    # Dynamic window: each centre looks 1..W words away, uniformly, so a context d words away is used with
    # probability (W - d + 1) / W -- near words count more.
    radius = torch.randint(1, window + 1, (len(tokens),), generator=generator, device=device)  # EXERCISE: fixed radius
    centre, context = window_pairs(tokens, sentence, radius, window)
    order = torch.randperm(len(centre), generator=generator, device=device)       # iid batches for SGD
    return centre[order], context[order]


def negative_cdf(counts, power=0.75):   # EXERCISE: power 1 (plain unigram) or 0 (uniform): watch the analogies
    """Cumulative noise distribution P_n(w) ~ count(w)^(3/4) (Mikolov et al. 2013b, Sec. 2.2): rarer words are
    drawn more often than their share of the text, frequent ones less. (V,) float64."""
    weights = counts.double() ** power
    return weights.cumsum(0) / weights.sum()


def sample_negatives(cdf, shape, generator):
    """Word ids drawn from the noise distribution by inverting its CDF: u ~ U[0, 1) falls in word i's slot."""
    u = torch.rand(shape, generator=generator, device=cdf.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp(max=len(cdf) - 1)


# ---- 5. Corpora: the planted text, or text8 or a text file (read by common.py) -> word ids ----

@dataclass
class Corpus:
    """Running text as word ids; id 0 is the most frequent word. tokens, sentence (N,) and counts (V,) are int64."""
    name: str
    words: list
    counts: torch.Tensor
    tokens: torch.Tensor
    sentence: torch.Tensor     # which sentence each token is in: windows never cross sentences
    raw_words: int             # tokens before the --min-count cut

    @cached_property
    def index(self):
        return {word: i for i, word in enumerate(self.words)}


def build_corpus(name, lexicon, ids, sentence, min_count, device):
    """The vocabulary: words seen at least min_count times, most frequent first (ties: first seen first).
    lexicon: the distinct words; ids, sentence: (N,) numpy int64 of the running text."""
    counts = np.bincount(ids, minlength=len(lexicon))
    frequent = [i for i in np.argsort(-counts, kind="stable") if counts[i] >= min_count]
    common.check(len(frequent) >= 2, f"--min-count {min_count} leaves {len(frequent)} words of {name!r} (it has "
                                     f"{len(lexicon)} distinct words, the most common seen {counts.max()} times)")
    new_id = np.full(len(lexicon), -1)
    new_id[frequent] = np.arange(len(frequent))
    tokens = new_id[ids]
    kept = tokens >= 0
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
    return Corpus(name, [lexicon[i] for i in frequent], as_tensor(counts[frequent]), as_tensor(tokens[kept]),
                  as_tensor(sentence[kept]), len(ids))


WORD = re.compile(r"[^\W_]+")          # runs of letters and digits: "Don't stop!" -> don, t, stop


def corpus_from_text(text, name, min_count, device, max_words=0):
    """One sentence per line, tokenised and lower-cased; the first max_words words when max_words > 0."""
    index, ids, lengths = {}, [], []
    for line in text.splitlines():
        if max_words and len(ids) >= max_words:
            break
        # finditer, cut: text8 is one line of 17M words, and --quick needs only its start
        words = [m.group() for m in itertools.islice(WORD.finditer(line.lower()), max_words - len(ids) if max_words else None)]
        ids.extend(index.setdefault(word, len(index)) for word in words)
        lengths.append(len(words))
    common.check(ids, f"{name!r} holds no words")
    sentence = np.repeat(np.arange(len(lengths)), lengths)
    return build_corpus(name, list(index), np.array(ids, dtype=np.int64), sentence, min_count, device)


def load_corpus(cfg, device):
    if cfg.corpus == "planted":
        lexicon, ids, sentence = planted_text(cfg.sentences, cfg.seed)
        cut = slice(cfg.max_words or None)
        return build_corpus("planted", lexicon, ids[cut], sentence[cut], cfg.min_count, device)
    text = common.read_text8(cfg.data_dir) if cfg.corpus == "text8" else common.read_text(cfg.corpus, "corpus file")
    return corpus_from_text(text, cfg.corpus, cfg.min_count, device, cfg.max_words)


# The planted corpus: generated sentences in which relations are built in, so that the distributional
# hypothesis can be checked against a known answer. A word's contexts are the sum of two parts, its concept
# (king and queen both come with crown, throne, kingdom) and its marker (he/his for king, she/her for queen),
# which is exactly the structure that makes king - man + woman land on queen.
GENDER = [("king", "queen", "crown throne kingdom"), ("prince", "princess", "castle tower knight"),
          ("emperor", "empress", "empire army palace"), ("duke", "duchess", "estate manor servants"),
          ("father", "mother", "family household dinner"), ("son", "daughter", "parents school lessons"),
          ("brother", "sister", "twin games bedroom"), ("uncle", "aunt", "cousins visit farm"),
          ("husband", "wife", "wedding marriage ring"), ("grandfather", "grandmother", "stories pension memories"),
          ("man", "woman", "job office colleagues"), ("boy", "girl", "toys playground ball"),
          ("actor", "actress", "stage theatre role"), ("waiter", "waitress", "restaurant tips tables"),
          ("monk", "nun", "monastery prayer chapel"), ("nephew", "niece", "birthday cake presents")]
COUNTRIES = [("france", "paris", "french"), ("germany", "berlin", "german"), ("italy", "rome", "italian"),
             ("spain", "madrid", "spanish"), ("portugal", "lisbon", "portuguese"), ("greece", "athens", "greek"),
             ("russia", "moscow", "russian"), ("japan", "tokyo", "japanese"), ("china", "beijing", "chinese"),
             ("egypt", "cairo", "egyptian"), ("poland", "warsaw", "polish"), ("sweden", "stockholm", "swedish"),
             ("norway", "oslo", "norwegian"), ("austria", "vienna", "austrian"), ("ireland", "dublin", "irish"),
             ("hungary", "budapest", "hungarian"), ("finland", "helsinki", "finnish"), ("turkey", "ankara", "turkish")]
PLURALS = [("cat", "cats", "milk mice"), ("dog", "dogs", "bone leash"), ("horse", "horses", "hay saddle"),
           ("bird", "birds", "nest wings"), ("cow", "cows", "grass barn"), ("apple", "apples", "orchard pie"),
           ("car", "cars", "road engine"), ("book", "books", "library pages"), ("ship", "ships", "harbour sails"),
           ("key", "keys", "lock door"), ("shoe", "shoes", "laces feet"), ("flower", "flowers", "petals vase"),
           ("coin", "coins", "purse bank"), ("tree", "trees", "leaves forest"), ("bottle", "bottles", "cork wine"),
           ("candle", "candles", "wax flame")]
OPPOSITES = [("good", "bad", "news idea"), ("happy", "sad", "song ending"), ("beautiful", "ugly", "painting statue"),
             ("clean", "dirty", "room towel"), ("rich", "poor", "merchant village"), ("safe", "dangerous", "bridge path"),
             ("friendly", "rude", "neighbour clerk"), ("easy", "hard", "exam puzzle"), ("fresh", "rotten", "bread fruit"),
             ("strong", "weak", "coffee rope"), ("warm", "cold", "blanket bath"), ("quiet", "noisy", "street hotel")]
SYNONYMS = [("sofa", "couch", "cushions lounge"), ("film", "movie", "cinema popcorn"), ("shop", "store", "shelves cashier"),
            ("stone", "rock", "cliff hill"), ("gift", "present", "ribbon wrapping"), ("taxi", "cab", "driver fare")]
FILLERS = ("then today again also later still now soon yesterday indeed perhaps finally suddenly often once "
           "quietly slowly already usually sometimes").split()

# Each family: its rows (a dict of slot -> the words that may fill it, one drawn per sentence), its templates,
# and its share of the sentences.
_PEOPLE = [{"person": [word], "he": [he], "his": [his], "topic": topic.split()}
           for male, female, topic in GENDER for word, he, his in ((male, "he", "his"), (female, "she", "her"))]
_PLACES = [{"country": [country], "capital": [capital], "lang": [lang], "place": [country, capital]}
           for country, capital, lang in COUNTRIES]
_NOUNS = [{"noun": [word], "topic": topic.split(), "a": [a], "is": [is_], "this": [this], "was": [was], "one": [one],
           "lies": [lies]}
          for singular, plural, topic in PLURALS
          for word, a, is_, this, was, one, lies in ((singular, "a", "is", "this", "was", "one", "lies"),
                                                     (plural, "two", "are", "these", "were", "many", "lie"))]
_ADJECTIVES = [{"adj": [word], "noun": nouns.split(), "verb": verbs, "feel": feel}
               for positive, negative, nouns in OPPOSITES
               for word, verbs, feel in ((positive, ["loved", "enjoyed", "praised"], ["smile", "laugh"]),
                                         (negative, ["hated", "avoided", "blamed"], ["frown", "worry"]))]
_SYNONYMS = [{"word": [word], "topic": topic.split()} for a, b, topic in SYNONYMS for word in (a, b)]
FAMILIES = [
    (_PEOPLE, ["the {person} said that {he} would return to the {topic}", "{he} was a famous {person} and {his} {topic} was old",
               "everyone saw the {person} near {his} {topic}", "the {person} talked about {his} {topic} all day",
               "{his} {topic} belonged to the {person}"], 0.3),
    (_PLACES, ["{capital} is the capital of {country}", "people in {place} speak {lang}",
               "the {lang} food in {place} is famous", "many {lang} artists live in {place}",
               "the mayor of {capital} opened a museum in the city", "the streets of {capital} were busy with tourists",
               "the government of {country} signed a treaty with its neighbours",
               "{country} has a long border and a large economy"], 0.25),
    (_NOUNS, ["{a} {noun} {is} near the {topic}", "{this} {noun} {was} by the {topic}",
              "{one} {noun} {lies} beside the {topic}"], 0.2),
    (_ADJECTIVES, ["the {noun} was very {adj} so we {verb} it", "everyone {verb} the {adj} {noun}",
                   "a {adj} {noun} always makes us {feel}"], 0.15),
    (_SYNONYMS, ["we found the {word} near the {topic}", "they talked about the {word} and the {topic}",
                 "the new {word} was next to the {topic}"], 0.1),
]


def planted_text(n_sentences, seed):
    """(lexicon, ids (N,), sentence (N,)) of n generated sentences; vectorised over sentences, so 400k take ~1 s.
    A sentence starts with a filler adverb one time in six and ends with one one time in six (Zipf-distributed
    noise that belongs to no relation)."""
    rng = np.random.default_rng(seed)
    index = {}                                                                     # word -> id, in order of first use
    word_id = lambda word: index.setdefault(word, len(index))
    blocks = []
    family_of = rng.choice(len(FAMILIES), size=n_sentences, p=[share for _, _, share in FAMILIES])
    for f, (rows, templates, _) in enumerate(FAMILIES):
        template_of = rng.integers(len(templates), size=int((family_of == f).sum()))
        for t, template in enumerate(templates):
            n = int((template_of == t).sum())
            row = rng.integers(len(rows), size=n)                                  # (n,) which entity
            columns = []
            for piece in template.split():
                if piece.startswith("{"):
                    slot = [[word_id(w) for w in r[piece[1:-1]]] for r in rows]
                    width = max(map(len, slot))
                    table = np.array([s + s[:1] * (width - len(s)) for s in slot])  # (rows, width), padded
                    sizes = np.array([len(s) for s in slot])
                    columns.append(table[row, (rng.random(n) * sizes[row]).astype(np.int64)])
                else:
                    columns.append(np.full(n, word_id(piece)))
            blocks.append(np.stack(columns, 1))                                    # (n, words of the template)
    zipf = 1 / np.arange(1, len(FILLERS) + 1)
    zipf /= zipf.sum()
    filler_ids = np.array([word_id(w) for w in FILLERS])
    sentences = []
    for block in blocks:
        n = len(block)
        before = np.where(rng.random(n) < 1 / 6, filler_ids[rng.choice(len(FILLERS), n, p=zipf)], -1)
        after = np.where(rng.random(n) < 1 / 6, filler_ids[rng.choice(len(FILLERS), n, p=zipf)], -1)
        sentences.append(np.concatenate([before[:, None], block, after[:, None]], 1))
    width = max(s.shape[1] for s in sentences)
    grid = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-1) for s in sentences])
    grid = grid[rng.permutation(len(grid))]                                        # (n_sentences, width), -1 = empty
    sentence = np.broadcast_to(np.arange(len(grid))[:, None], grid.shape)
    present = grid >= 0
    return list(index), grid[present], sentence[present]


# ---- 6. The count-based baseline: PPMI, factorised by SVD ----

def cooccurrence(corpus, size, window):
    """#(w, c) for the `size` most frequent words, counted as SGNS sees them without subsampling: a context
    d words away counts (W - d + 1) / W, the chance that a dynamic window reaches it. (M, M) float32, symmetric."""
    counts = torch.zeros(size * size, device=corpus.tokens.device)
    tokens, sentence = corpus.tokens, corpus.sentence
    for d in range(1, window + 1):
        a, b = tokens[:-d], tokens[d:]
        ok = (sentence[:-d] == sentence[d:]) & (a < size) & (b < size)
        a, b = a[ok], b[ok]
        weight = torch.full((len(a),), (window - d + 1) / window, device=counts.device)
        counts.index_add_(0, a * size + b, weight)
        counts.index_add_(0, b * size + a, weight)
    return counts.view(size, size)


def pmi(counts, alpha=0.75):
    """PMI(w, c) = log #(w,c) #() / (#(w) #_a(c)), the context counts raised to alpha = 3/4 as the negatives are
    (Levy et al. 2015, Eq. 3). -inf where #(w,c) = 0. (M, M)."""
    context = counts.sum(0) ** alpha                                       # (M,)
    row = counts.sum(1, keepdim=True)                                      # (M, 1)
    return (counts * context.sum() / (row * context)).log()


def ppmi_svd(counts, dim, alpha=0.75):
    """Word vectors U_d S_d^(1/2) of the positive PMI matrix max(PMI, 0) (Levy et al. 2015, Sec. 3.3)."""
    matrix = pmi(counts, alpha).clamp(min=0).nan_to_num(0.0)               # (M, M); 0/0 rows -> 0
    if min(matrix.shape) <= dim + 10:
        u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    else:
        u, s, _ = torch.svd_lowrank(matrix, q=dim + 10, niter=6)           # randomised: the top dim+10 directions
    return u[:, :dim] * s[:dim].sqrt()


# ---- 7. Evaluation ----

def read_analogies(path):
    """Questions 'a b c d' (a is to b as c is to d) in sections ': name', as in Mikolov's questions-words.txt.
    Blank lines and lines starting with '#' are skipped. Returns [(section, a, b, c, d)], lower-cased."""
    questions, section = [], "questions"
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == ":":
            common.check(len(words) == 2, f"{path}:{number}: a section header is ': name', got {line.strip()!r}")
            section = words[1]
            continue
        common.check(len(words) == 4, f"{path}:{number}: expected 4 words 'a b c d' or ': section', got {line.strip()!r}")
        questions.append((section, *(w.lower() for w in words)))
    common.check(questions, f"{path} holds no analogy questions")
    return questions


def read_similarity(path):
    """Pairs 'word1 word2 score' (tabs or spaces), as WordSim-353 and SimLex-999; '#' lines are comments and a
    first line whose score is not a number is a header. Returns [(word1, word2, score)], lower-cased."""
    pairs, header_allowed = [], True
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            common.check(len(fields) >= 3, "")
            pairs.append((fields[0].strip().lower(), fields[1].strip().lower(), float(fields[2])))
        except (ValueError, common.UserError):
            common.check(header_allowed, f"{path}:{number}: expected 'word1 word2 score', got {line.strip()!r}")
        header_allowed = False
    common.check(pairs, f"{path} holds no word pairs")
    return pairs


def average_ranks(x):
    """Ranks 1..n of x (n,), tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = x.argsort()
    ordered = x[order]
    starts = torch.ones(len(x), dtype=torch.bool, device=x.device)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = starts.cumsum(0) - 1                                            # (n,) tie group of each sorted value
    position = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    mean_rank = torch.zeros(int(group[-1]) + 1, dtype=torch.float64, device=x.device).index_add_(0, group, position)
    mean_rank /= torch.bincount(group)
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x, y):
    """Spearman's rho: the Pearson correlation of the ranks."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def unit_rows(vectors):
    return F.normalize(vectors.float(), dim=1)


def analogy_accuracy(vectors, index, questions, limit):
    """3CosAdd (Mikolov et al. 2013a): the answer to 'a : b :: c : ?' is the word nearest in cosine to b - a + c,
    among the `limit` most frequent words, a, b and c excluded. A question with a word outside them counts as
    not covered (reported, never silently dropped). vectors (V, D), rows in frequency order."""
    unit = unit_rows(vectors[:limit])                                       # (M, D)
    covered = [(s, *(index[w] for w in q)) for s, *q in questions if all(index.get(w, limit) < limit for w in q)]
    result = {"questions": len(questions), "covered": len(covered), "coverage": len(covered) / len(questions)}
    if not covered:
        return {**result, "accuracy": None, "sections": {}}
    ids = torch.tensor([q[1:] for q in covered], device=unit.device)        # (Q, 4)
    correct = []
    for chunk in ids.split(4096):
        target = unit[chunk[:, 1]] - unit[chunk[:, 0]] + unit[chunk[:, 2]]  # (Q, D)
        scores = target @ unit.T                                            # (Q, D) @ (D, M) -> (Q, M)
        scores.scatter_(1, chunk[:, :3], -math.inf)
        correct.append(scores.argmax(1) == chunk[:, 3])
    correct = torch.cat(correct).cpu()
    sections = {}
    for (section, *_), right in zip(covered, correct.tolist()):
        sections.setdefault(section, []).append(right)
    return {**result, "accuracy": correct.float().mean().item(),
            "sections": {name: sum(r) / len(r) for name, r in sections.items()}}


def similarity_correlation(vectors, index, pairs, limit):
    """Spearman's rho between cosine similarity and the human (or planted) scores, over covered pairs."""
    unit = unit_rows(vectors[:limit])
    covered = [(index[a], index[b], s) for a, b, s in pairs if index.get(a, limit) < limit and index.get(b, limit) < limit]
    result = {"pairs": len(pairs), "covered": len(covered), "coverage": len(covered) / len(pairs)}
    if len(covered) < 3:
        return {**result, "spearman": None}
    a, b = (torch.tensor([p[i] for p in covered], device=unit.device) for i in (0, 1))
    cosine = (unit[a] * unit[b]).sum(1).double().cpu()
    return {**result, "spearman": spearman(cosine, torch.tensor([p[2] for p in covered], dtype=torch.float64))}


def nearest_neighbours(vectors, ids, k=5):
    """The k words of highest cosine to each of ids (themselves excluded): (len(ids), k) ids and cosines."""
    unit = unit_rows(vectors)
    scores = unit[ids] @ unit.T                                             # (n, V)
    scores[torch.arange(len(ids), device=ids.device), ids] = -math.inf
    top = scores.topk(min(k, len(unit) - 1), dim=1)
    return top.indices, top.values


def evaluate(vectors, index, questions, pairs, limit):
    return {"analogy": analogy_accuracy(vectors, index, questions, limit) if questions else None,
            "similarity": similarity_correlation(vectors, index, pairs, limit) if pairs else None}


def random_pair_cosines(vectors, seed, n=20000):
    """Cosines of n random pairs of distinct words: (n,) on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    i = torch.randint(len(vectors), (n,), generator=generator)
    j = (i + torch.randint(1, len(vectors), (n,), generator=generator)) % len(vectors)     # never i itself
    unit = unit_rows(vectors).cpu()
    return (unit[i] * unit[j]).sum(1)


def anisotropy(vectors, seed, top=3):
    """How much all vectors share one direction: the mean cosine of random pairs of distinct words (about 0 for
    isotropic vectors), the share of the variance in the top principal directions, and |mean| / mean |v|."""
    vectors = vectors.float()
    spread = torch.linalg.svdvals(vectors - vectors.mean(0)) ** 2                         # (D,) variances
    return {"mean_cosine": random_pair_cosines(vectors, seed).mean().item(),
            "top_variance_share": (spread[:top].sum() / spread.sum()).item(),
            "mean_vector_norm_ratio": (vectors.mean(0).norm() / vectors.norm(dim=1).mean()).item()}


def all_but_the_top(vectors, components):
    """Mu & Viswanath 2018, Alg. 1: subtract the mean vector, then the projections on the top principal
    directions, which carry word frequency rather than meaning. (V, D) -> (V, D)."""
    centred = vectors.float() - vectors.float().mean(0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)       # (D, D), rows by variance
    top = directions[:components]                                           # (d, D)
    return centred - (centred @ top.T) @ top                                # (V, D) @ (D, d) @ (d, D)


def never_together(vectors, counts, words):
    """The distributional hypothesis, checked: of the pairs among the most frequent words that never occur within
    a window of each other (counts (M, M) == 0), the one with the highest cosine, and the rank of each in the
    other's neighbour list. Returns a dict, or None when every pair meets."""
    size = min(len(counts), 2000)
    unit = unit_rows(vectors[:size])
    cosine = unit @ unit.T                                                  # (M', M')
    cosine.masked_fill_((counts[:size, :size] > 0) | torch.eye(size, dtype=torch.bool, device=cosine.device), -math.inf)
    best = int(cosine.argmax())
    a, b = divmod(best, size)
    if cosine[a, b] == -math.inf:
        return None
    everyone = unit_rows(vectors)
    rank = lambda x, y: int((everyone @ everyone[x] > everyone[x] @ everyone[y]).sum()) - 1   # minus x itself
    return {"words": [words[a], words[b]], "cooccurrences": 0, "cosine": float(cosine[a, b]),
            "rank_of_second_among_first": 1 + rank(a, b), "rank_of_first_among_second": 1 + rank(b, a)}


@torch.no_grad()
def pmi_agreement(model, counts, negatives, min_count=5.0, max_pairs=20000, seed=0):
    """Levy & Goldberg 2014, Sec. 3.1: at the optimum SGNS sets v_w . v'_c = PMI(w, c) - log k. Pearson r between
    the two over word pairs seen at least min_count times, and (dot, shifted PMI) samples for the figure."""
    shifted = pmi(counts) - math.log(negatives)                             # (M, M)
    w, c = (counts >= min_count).nonzero(as_tuple=True)
    if len(w) < 3:
        return None, None
    pick = torch.randperm(len(w), generator=torch.Generator().manual_seed(seed))[:max_pairs].to(w.device)
    w, c = w[pick], c[pick]
    dot = model(w, c[:, None])[:, 0].float()                                 # the scores SGNS trained
    target = shifted[w, c]
    r = torch.corrcoef(torch.stack([dot, target]))[0, 1].item()
    return r, (dot.cpu(), target.cpu())


# ---- 8. Outputs: the word2vec text format, figures ----

def save_vec(path, words, vectors):
    """word2vec's text format: a line 'V D', then 'word x1 ... xD' per word."""
    rows = vectors.detach().float().cpu().numpy()
    lines = [f"{len(words)} {rows.shape[1]}"] + [w + " " + " ".join(f"{x:.6g}" for x in row) for w, row in zip(words, rows)]
    common.save_text(path, "\n".join(lines) + "\n")


def relation_pairs(index):
    """The pairs drawn with arrows: gender and country -> capital, where both words are in the vocabulary."""
    return {"male -> female": [(m, f) for m, f, _ in GENDER[:8] if m in index and f in index],
            "country -> capital": [(n, c) for n, c, _ in COUNTRIES[:8] if n in index and c in index]}


def plot_relation(ax, vectors, index, pairs, title, colour):
    """Mikolov et al. 2013b's Fig. 2: the words of the pairs in their own 2-D PCA plane, an arrow per pair."""
    ax.set_title(title)
    if len(pairs) < 2 or vectors.shape[1] < 2:     # a plane needs two pairs' words and two dimensions
        reason = "not in the vocabulary" if len(pairs) < 2 else f"no plane in {vectors.shape[1]} dimension"
        ax.text(0.5, 0.5, reason, ha="center", transform=ax.transAxes)
        return
    ids = torch.tensor([index[w] for pair in pairs for w in pair], device=vectors.device)
    chosen = unit_rows(vectors)[ids].cpu()
    chosen = chosen - chosen.mean(0)
    _, _, directions = torch.linalg.svd(chosen, full_matrices=False)
    xy = (chosen @ directions[:2].T).numpy()                                  # (2 * pairs, 2)
    ax.scatter(xy[:, 0], xy[:, 1], s=8, color="grey")
    for p, (a, b) in enumerate(pairs):
        (x0, y0), (x1, y1) = xy[2 * p], xy[2 * p + 1]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color=colour, alpha=0.7))
        ax.text(x0, y0, a, fontsize=8)
        ax.text(x1, y1, b, fontsize=8, color=colour)


def plot_all(vectors, index, history, random_pairs, results, agreement, out_path):
    """2 x 3: two relations as arrows in PCA planes; the loss; SGNS dot products against shifted PMI; cosines of
    random pairs before and after all-but-the-top; the scores of SGNS and its baselines."""
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    if vectors.shape[1] < 2:
        print(f"word2vec.png: the two PCA planes of relations are left empty (--dim {vectors.shape[1]} gives no plane)")
    for ax, (title, pairs), colour in zip(axes[0, :2], relation_pairs(index).items(), ("tab:red", "tab:blue")):
        plot_relation(ax, vectors, index, pairs, f"PCA of the word vectors: {title}", colour)
    ax = axes[0, 2]
    seen, loss = zip(*history)
    ax.plot(np.array(seen) / 1e6, loss)
    ax.set_xlabel("million words trained on")
    ax.set_ylabel("loss per (centre, context) pair")
    ax.set_title("Training loss (Eq. 4, negated)")
    ax = axes[1, 0]
    if agreement[1] is not None:
        dot, shifted = agreement[1]
        ax.scatter(shifted.numpy(), dot.numpy(), s=2, alpha=0.3)
        lo, hi = float(shifted.min()), float(shifted.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="v.v' = PMI - log k")
        ax.legend()
    ax.set_xlabel("PMI(w, c) - log k  (counted)")
    ax.set_ylabel("v_w . v'_c  (learned)")
    ax.set_title(f"SGNS factorises shifted PMI: Pearson r = {agreement[0] or float('nan'):.2f}")
    ax = axes[1, 1]
    for label, cos in random_pairs.items():
        ax.hist(cos.numpy(), bins=60, alpha=0.6, density=True, label=f"{label}: mean {cos.mean():.2f}")
    ax.set_xlabel("cosine of random pairs of words")
    ax.set_title("Anisotropy, and all-but-the-top")
    ax.legend()
    ax = axes[1, 2]
    names = list(results)
    for offset, (metric, key, label) in enumerate([("analogy", "accuracy", "analogy accuracy"),
                                                   ("similarity", "spearman", "similarity Spearman")]):
        values = [((results[n][metric] or {}).get(key) or 0.0) for n in names]
        bars = ax.bar(np.arange(len(names)) + 0.4 * offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(names)) + 0.2, names)
    ax.set_title("SGNS against its baselines")
    ax.legend()
    common.save_figure(fig, out_path)


# ---- 9. main ----

def validate(cfg):
    common.check(cfg.dataset == "", "--dataset is for the image scripts; word2vec reads --corpus planted|text8|PATH")
    if cfg.corpus not in ("planted", "text8"):
        common.check_file(cfg.corpus, "corpus file", " (or use --corpus planted or text8)")
    for name in ("sentences", "min_count", "dim", "window", "negatives", "epochs", "batch_size"):
        common.check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    common.check(cfg.max_words >= 0, f"--max-words must be 0 (all) or positive, got {cfg.max_words}")
    common.check(math.isfinite(cfg.lr), f"--lr must be a finite number, got {cfg.lr}")
    common.check(cfg.eval_vocab >= 2, f"--eval-vocab must be at least 2, got {cfg.eval_vocab}")
    common.check(0 <= cfg.sample < 1, f"--sample must be in [0, 1), got {cfg.sample}")
    common.check(0 < cfg.min_lr <= cfg.lr, f"need 0 < --min-lr <= --lr, got {cfg.min_lr} and {cfg.lr}")
    common.check(cfg.step_cap > 0, f"--step-cap must be positive, got {cfg.step_cap}")
    common.check(0 <= cfg.abtt < cfg.dim, f"--abtt must be in [0, dim), got {cfg.abtt}")
    for option, path in (("--analogies", cfg.analogies), ("--similarity", cfg.similarity)):
        if path:
            common.check_file(path, f"{option} file")


# on cpu_notice's reference CPU: training words per second, and seconds per million entries of the M x M counts
CPU_WORDS_PER_SECOND, CPU_SECONDS_PER_MILLION_COUNTS = 120e3, 0.1


def cpu_seconds(cfg, corpus):
    """Rough seconds of this run on the reference CPU of common.cpu_notice (two cores, measured): training, then the
    evaluation, whose count baseline factorises an M x M matrix."""
    limit = min(cfg.eval_vocab, len(corpus.words))
    return cfg.epochs * len(corpus.tokens) / CPU_WORDS_PER_SECOND + (limit / 1000) ** 2 * CPU_SECONDS_PER_MILLION_COUNTS


def describe(name, result):
    parts = []
    if result["analogy"] and result["analogy"]["accuracy"] is not None:
        parts.append(f"analogy {100 * result['analogy']['accuracy']:.1f}%")
    if result["similarity"] and result["similarity"]["spearman"] is not None:
        parts.append(f"rho {result['similarity']['spearman']:.2f}")
    return f"{name} " + (", ".join(parts) if parts else "(no evaluation file)")


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    validate(cfg)
    analogies_path = cfg.analogies or (str(PLANTED_ANALOGIES) if cfg.corpus == "planted" else "")
    similarity_path = cfg.similarity or (str(PLANTED_SIMILARITY) if cfg.corpus == "planted" else "")
    questions = read_analogies(analogies_path) if analogies_path else []         # a bad file fails before training
    pairs = read_similarity(similarity_path) if similarity_path else []
    device, out = common.setup(cfg, __file__)
    generator = torch.Generator(device).manual_seed(cfg.seed)

    clock = common.Stopwatch(device)
    corpus = load_corpus(cfg, device)
    print(f"corpus {corpus.name}: {corpus.raw_words:,} words, {len(corpus.words):,} kept by --min-count "
          f"{cfg.min_count} ({len(corpus.tokens):,} tokens), built in {clock.seconds():.1f}s")
    common.cpu_notice(cfg, device, cpu_seconds(cfg, corpus))
    model = SkipGram(len(corpus.words), cfg.dim, generator)
    history, seconds, trained_pairs = train(model, corpus, cfg, generator)
    common.check(math.isfinite(history[-1][1]), f"training diverged (the loss is {history[-1][1]}); "
                                                "lower --lr, --batch-size or --step-cap")
    words_per_second = cfg.epochs * len(corpus.tokens) / seconds
    print(f"trained {cfg.epochs} epochs, {trained_pairs:,} pairs in {seconds:.1f}s: {words_per_second / 1e6:.2f}M words/s, "
          f"loss {history[0][1]:.3f} -> {history[-1][1]:.3f} per pair")

    vectors = model.in_vectors.detach()   # EXERCISE: evaluate in + out vectors (Levy et al. 2015, Sec. 3.3)
    index, limit = corpus.index, min(cfg.eval_vocab, len(corpus.words))
    components = cfg.abtt or max(1, cfg.dim // 100)
    abtt_vectors = all_but_the_top(vectors, components)
    counts = cooccurrence(corpus, limit, cfg.window)                               # (M, M)
    random_vectors = torch.randn(vectors.shape, generator=generator, device=device)
    results = {"random": evaluate(random_vectors, index, questions, pairs, limit),
               "PPMI-SVD": evaluate(ppmi_svd(counts, cfg.dim), index, questions, pairs, limit),
               "SGNS": evaluate(vectors, index, questions, pairs, limit),
               "SGNS+ABTT": evaluate(abtt_vectors, index, questions, pairs, limit)}
    before, after = anisotropy(vectors, cfg.seed), anisotropy(abtt_vectors, cfg.seed)
    agreement = pmi_agreement(model, counts, cfg.negatives, seed=cfg.seed)
    unseen = never_together(vectors, counts, corpus.words)

    probes = [w for w in ("king", "paris", "cats", "good", "sofa", "france", "woman", "computer", "music") if w in index][:5]
    top, cos = nearest_neighbours(vectors, torch.tensor([index[w] for w in probes], dtype=torch.long, device=device), k=5)
    neighbours = {w: [(corpus.words[int(j)], round(float(c), 3)) for j, c in zip(row, crow)]
                  for w, row, crow in zip(probes, top, cos)}
    for w, near in neighbours.items():
        print(f"  {w:>10}: " + ", ".join(f"{n} {c:.2f}" for n, c in near))
    if unseen:
        print(f"  never within {cfg.window} words of each other, yet cosine {unseen['cosine']:.2f}: "
              f"{unseen['words'][0]!r} and {unseen['words'][1]!r} (neighbour #{unseen['rank_of_second_among_first']})")

    random_pairs = {"SGNS": random_pair_cosines(vectors, cfg.seed),
                    f"SGNS+ABTT (top {components} removed)": random_pair_cosines(abtt_vectors, cfg.seed)}
    plot_all(vectors, index, history, random_pairs, results, agreement, out / "word2vec.png")
    save_vec(out / "vectors.vec", corpus.words, vectors)
    common.save_checkpoint(out / "word2vec.pt", model, cfg, kind="word2vec", words=corpus.words)
    metrics = {"corpus": corpus.name, "raw_words": corpus.raw_words, "train_words": len(corpus.tokens),
               "vocabulary": len(corpus.words), "epochs": cfg.epochs, "pairs": trained_pairs,
               "train_seconds": seconds, "words_per_second": words_per_second, "device": str(device),
               "loss_first": history[0][1], "loss_last": history[-1][1], "loss_history": history,
               "eval_vocabulary": limit, "results": results, "anisotropy": {"before": before, "after": after,
               "components_removed": components}, "pmi_pearson": agreement[0], "never_together": unseen,
               "neighbours": neighbours}
    common.save_json(out / "metrics.json", metrics)
    out = common.finish_run(out)
    summary = "; ".join(describe(name, results[name]) for name in ("SGNS", "SGNS+ABTT", "PPMI-SVD", "random"))
    print(f"02_word2vec: {corpus.name} {len(corpus.tokens) / 1e6:.2f}M words x{cfg.epochs} at "
          f"{words_per_second / 1e6:.1f}M words/s on {device}; {summary}; mean cosine {before['mean_cosine']:.2f} -> "
          f"{after['mean_cosine']:.2f} after all-but-the-top; SGNS vs PMI - log k r={agreement[0] or float('nan'):.2f}")
    return model, metrics


if __name__ == "__main__":
    common.run(main)
