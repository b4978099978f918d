"""05 -- CLIP: images and captions in one space, for zero-shot classification and retrieval.

What it teaches
  Two encoders -- 04's Vision Transformer for images, a small causal Transformer for text -- each map their
  input to a point on the unit sphere of one shared space. The only training signal is which caption in a
  batch belongs to which image (a symmetric contrastive loss). Afterwards the pair is a classifier for any
  classes you can write down (zero-shot: embed "a star", "a ring", ... and pick the nearest), and a search
  engine from text to images and back (retrieval). Captions are cut into tokens by byte-pair encoding, learned
  here from the training captions; and the image encoder can start from 04's self-supervised weights. On a few
  thousand real pairs (--dataset openclipart) the model memorises them: a validation split picks the step kept, and
  03's crop and flip show the encoder new views of the same images.

Papers
  Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision" (CLIP):
    Fig. 3 (the loss in numpy-like pseudo-code), Sec. 2.4-2.5 (text encoder pooled at [EOS]; the learned
    temperature, initialised at 0.07 and clipped so logits scale by at most 100), Sec. 3.1.4 (prompt
    engineering and ensembling).
  Sennrich, Haddow, Birch 2016, "Neural Machine Translation of Rare Words with Subword Units" (BPE, Algorithm 1),
    on bytes as in Radford et al. 2019 (GPT-2, Sec. 2.2).
  Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning" (--freeze-image).

Run
  python 05_clip.py                                  # captioned shapes (embedded, no download)
  python 05_clip.py --init-image runs/04_vit/vit_simclr.pt [--freeze-image]
  python 05_clip.py --dataset flickr8k               # downloads Flickr8k once (about 1 GB)
  python 05_clip.py --dataset captions --data-dir DIR    # DIR/captions.csv (image,caption) + the images
  python 05_clip.py --dataset openclipart            # sudo apt-get install openclipart-png; read once into data/
  torchrun --nproc_per_node=2 05_clip.py             # 2 GPUs, 1024 pairs each: every caption against 2048 images

Result (default run, one H200, torch 2.11: 59 s wall, 22.5k image-caption pairs/s of training; RESULTS.md)
  retrieval over 1000 test images, R@1: image->text 0.372, text->image 0.357 (chance 0.001; 0.49 and 0.48 at
  seeds 1 and 2); R@10 0.946 and 0.938
  zero-shot shape top-1 over 10 classes: 0.341 with 24 prompt templates, 0.358 with "a {}" alone (untrained
  0.095; a linear probe on the same image features, trained WITH labels: 0.393)
  held-out colour-shape pairs, 80-way colour+shape top-1: 0.318, against 0.372 on pairs seen in training (chance 0.013)

Shapes legend: B batch (image-caption pairs), L tokens of a caption, W text width, E image width,
K shared embedding size, N images, M captions, C classes, P prompt templates, S image side.
"""
import dataclasses
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import evaluation

vit = common.import_script("04_vit")
contrastive = common.import_script("03_contrastive")     # augment: the random views of training images


@dataclass
class Config(common.RunConfig):
    dataset: str = common.arg("shapes", "shapes (embedded, captioned, offline) | flickr8k (downloaded once) | "
                              "captions (a folder: --data-dir DIR with captions.csv) | openclipart (Debian's "
                              "openclipart-png, decoded once into DATA_DIR/openclipart)",
                              choices=["shapes", "flickr8k", "captions", "openclipart"])
    n_train: int = common.arg(50_000, "training images of the embedded set (3 captions each)")
    n_test: int = common.arg(5_000, "test images of the embedded set")
    paired: int = common.arg(0, "train on the first N training images and their captions only (0: all of them)")
    val_share: float = common.arg(0.1, "share of the training images held out, by image, for validation (0: none)")
    val_every: int = common.arg(100, "steps between validation measurements; the weights kept are the best one's")
    augment: str = common.arg("auto", "03's augmentations of the training images, comma-separated (crop,flip,jitter,"
                                      "grayscale,blur); '' for none; auto: crop,flip on real images, none on shapes")
    # on openclipart crop 0.6 + flip leave validation recall as it was (RESULTS.md), but slow the memorising
    crop: float = common.arg(0.6, "share of the area the random crop may cut away (03's default)")
    holdout: str = common.arg("red star,orange heart,yellow moon,green square,cyan triangle,blue circle,"
                              "purple cross,white arrow",
                              "colour-shape pairs kept out of training, for the compositional test (shapes only; '' for none)")
    image_size: int = common.arg(32, "side S that real images are cropped and resized to (shapes are 32)")
    patch_size: int = common.arg(4, "ViT patch side (with --init-image: the checkpoint's)")
    image_dim: int = common.arg(192, "ViT width E (with --init-image: the checkpoint's)")
    image_depth: int = common.arg(6, "ViT blocks (with --init-image: the checkpoint's)")
    image_heads: int = common.arg(3, "ViT attention heads (with --init-image: the checkpoint's)")
    text_dim: int = common.arg(192, "text Transformer width W")
    text_depth: int = common.arg(4, "text Transformer blocks")
    text_heads: int = common.arg(3, "text Transformer attention heads")
    context: int = common.arg(64, "most tokens per caption, end-of-text included; longer captions are cut")
    vocab_size: int = common.arg(512, "BPE vocabulary: 256 bytes + merges + 1 end-of-text token (>= 257)")
    embed_dim: int = common.arg(128, "size K of the shared image-text space")
    steps: int = common.arg(900, "training steps")
    batch_size: int = common.arg(1024, "image-caption pairs per step on each GPU (each pair's negatives are the other "
                                       "NB - 1 of all N GPUs under torchrun)")
    lr: float = common.arg(7e-4, "peak learning rate of AdamW, reached after the warm-up")
    weight_decay: float = common.arg(0.1, "AdamW weight decay on the weight matrices of linear layers (04's policy)")
    warmup: float = common.arg(0.111, "share of the steps over which the learning rate rises linearly from 0 "
                                      "(0.111: 100 of 900), then a cosine decay to 0")
    init_image: str = common.arg("", "start the image encoder from 04_vit.py's checkpoint (e.g. runs/04_vit/vit_simclr.pt)")
    freeze_image: bool = common.arg(False, "keep the image encoder fixed and train the text side (locked-image tuning)")
    eval_images: int = common.arg(1000, "test images (and their captions) in the retrieval pool")
    probe_steps: int = common.arg(2000, "Adam steps of the linear-probe baseline (shapes only)")


QUICK = dict(n_train=1500, n_test=400, eval_images=200, image_dim=32, image_depth=1, image_heads=2, text_dim=48,
             text_depth=2, text_heads=2, embed_dim=32, vocab_size=320, steps=120, batch_size=64, warmup=0.083, lr=3e-3,
             probe_steps=200)


# ---- 1. Model: two encoders into one space ----

def causal_mask(length, device=None):            # (L, L) bool, True where token t may attend to token s <= t
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class TextTransformer(nn.Module):
    """04's pre-norm Blocks under a causal mask, read at the end-of-text token. CLIP masks its text encoder causally
    (Sec. 2.4) so that it could start from, or be trained with, a language model. Under that mask only the last token
    has read the whole caption, so it is the one pooled; and whatever follows it (padding) cannot change it."""

    def __init__(self, vocab_size, context, dim, depth, heads, mlp_ratio=4):
        super().__init__()
        self.dim, self.eot = dim, vocab_size - 1
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(context, dim))   # learned, one per position
        self.blocks = nn.ModuleList(vit.Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = vit.LayerNorm(dim)
        self.apply(vit.ViT._init_weights)            # 04's init: small normal weights, zero biases
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def hidden(self, tokens):                                        # (B, L) -> (B, L, W)
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.position_embedding[:L]  # (B, L, W) + (L, W)
        mask = causal_mask(L, tokens.device)                          # (L, L), broadcast over B and heads
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, tokens):                                       # (B, L) -> (B, W)
        # EXERCISE: pool the mean over the caption's tokens instead; under the causal mask, which of them saw it all?
        end = (tokens == self.eot).int().argmax(dim=1)                # (B,) the first end-of-text position
        return self.hidden(tokens)[torch.arange(len(tokens), device=tokens.device), end]


class CLIP(nn.Module):
    def __init__(self, image_encoder, text_encoder, embed_dim):
        super().__init__()
        self.visual, self.text = image_encoder, text_encoder
        # linear maps into the shared space (CLIP uses no bias and no non-linearity here)
        self.image_projection = nn.Linear(image_encoder.dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.dim, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=image_encoder.dim ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=text_encoder.dim ** -0.5)
        # the temperature is learned as a log, so it stays positive and moves by ratios; 1/0.07 at the start
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # per-channel pixel statistics of the training images (04's normalisation), saved with the weights
        self.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(1, 3, 1, 1))

    def image_features(self, images):                        # (B, 3, S, S) uint8, or floats in [0, 1] -> (B, E)
        return self.visual.features(vit.normalise(images, (self.pixel_mean, self.pixel_std)))

    def embed_image_features(self, features):                # (B, E) -> (B, K) on the unit sphere
        return F.normalize(self.image_projection(features), dim=-1)

    def encode_image(self, images):                          # (B, 3, S, S) uint8 -> (B, K)
        return self.embed_image_features(self.image_features(images))

    def encode_text(self, tokens):                           # (B, L) -> (B, K)
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)

    def scale(self):        # exp(logit_scale) <= 100; the clamp stops the gradient past the cap, so the scale rests
        return self.logit_scale.clamp(max=math.log(100)).exp()     # CLIP Sec. 2.5: "to prevent training instability"

    def forward(self, images, tokens):   # (B, 3, S, S) uint8 or a locked encoder's cached (B, E), (B, L) -> 2 x (B, K)
        """logits_per_image is clip_logits(image, text, scale()) (section 2), logits_per_text its transpose. forward
        stops at the embeddings, as open_clip's: the loss needs the whole batch's, under torchrun on several GPUs."""
        features = images if images.dim() == 2 else self.image_features(images)
        return self.embed_image_features(features), self.encode_text(tokens)


IMAGE_SHAPE = {"patch_size": "patch_size", "image_dim": "dim", "image_depth": "depth", "image_heads": "heads"}


def image_encoder(cfg, device):     # 04's ViT: random, or --init-image's, whose saved shape the options must agree with
    arch = dict(image_size=cfg.image_size, num_classes=0,
                **{key: getattr(cfg, option) for option, key in IMAGE_SHAPE.items()})     # the shape the options give
    if cfg.init_image:
        try:
            stored = torch.load(cfg.init_image, map_location="cpu", weights_only=True)
            arch = {**stored["arch"], "num_classes": 0} if stored.get("kind") == "vit" else arch
        except Exception:  # a missing or foreign file: common.load_checkpoint below says what is wrong
            pass
        for option, key in IMAGE_SHAPE.items():
            given = getattr(cfg, option)
            default = (QUICK if cfg.quick else {}).get(option, Config.__dataclass_fields__[option].default)
            common.check(given in (default, arch[key]), f"--init-image {cfg.init_image} is a ViT of {key.replace('dim', 'width')} "
                                                        f"{arch[key]}, but --{option.replace('_', '-')} {given} was given: "
                                                        "leave it out (the checkpoint sets it) or give the same")
    encoder = vit.ViT(**arch)
    if cfg.init_image:
        common.load_checkpoint(cfg.init_image, encoder, kind="vit", device="cpu")
    common.check(encoder.arch["in_channels"] == 3, "the image encoder must take 3-channel images")
    return encoder.to(device)


# ---- 2. Objective: the symmetric contrastive loss (CLIP Fig. 3) ----
#
#   logits = exp(t) * I_e @ T_e^T                 (B, B): image i against caption j, both unit vectors
#   loss   = (CE(logits, rows) + CE(logits, columns)) / 2,  labels = arange(B): the pair sits on the diagonal
# Rows ask "which caption is this image's?", columns "which image is this caption's?". The temperature
# 1/exp(t) sets how peaked the softmax is; it is learned, since a fixed one must be tuned by hand.

def clip_logits(image_embeddings, text_embeddings, scale):     # unit vectors (B, K), (M, K), a scalar
    return scale * image_embeddings @ text_embeddings.T          # (B, K) @ (K, M) -> (B, M)


def clip_loss(logits, positives=None):
    """CLIP's loss on logits_per_image (B, B), the matching caption of image i at column i. positives (B, B) bool,
    optional: True where caption j is also right for image i (e.g. the same string); those are taken out of both
    softmaxes, so they are never pushed apart as negatives. positives=None (or the identity): the paper's Fig. 3."""
    B = logits.shape[0]
    common.check(B >= 2, f"the contrastive loss needs at least 2 pairs (1 has no negatives), got {B}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))           # bf16 is too coarse for logits up to 100
    diagonal = torch.eye(B, dtype=torch.bool, device=logits.device)
    if positives is not None:
        logits = logits.masked_fill(positives & ~diagonal, float("-inf"))          # exp(-inf) = 0: out of the sum
    correct = logits.diagonal()                                                    # (B,)
    loss_images = (torch.logsumexp(logits, dim=1) - correct).mean()                # CE over each row (image -> captions)
    loss_texts = (torch.logsumexp(logits, dim=0) - correct).mean()                 # CE over each column (caption -> images)
    return (loss_images + loss_texts) / 2


def same_caption(caption_ids):                       # (B,) caption ids -> (B, B) bool: the same string
    return caption_ids[:, None] == caption_ids[None, :]


# ---- 3. Tokenisation: byte-pair encoding, learned from the training captions ----
#
# A tokenizer decides what the text encoder's units are. Characters make long sequences of meaningless
# units; whole words cannot spell a word never seen. BPE (Sennrich et al., Algorithm 1) starts from the 256
# byte values, so any UTF-8 string can be written, and repeatedly merges the most frequent adjacent pair into
# a new token: frequent words become one token, rare ones stay spelled out in pieces. --vocab-size sets how
# far the merging goes, trading sequence length (compute, attention span) against vocabulary (parameters).

# Text is first cut into chunks that merges may not cross: a word with its leading space, a run of
# punctuation, or spaces (GPT-2's rule, with \w standing in for letters and digits). Each chunk is encoded
# on its own, so "red" in "a red star" and in "a red moon" always gets the same tokens.
CHUNK = re.compile(r" ?\w+| ?[^\w\s]+|\s+(?!\S)|\s+")   # EXERCISE: one chunk per caption (merges across words): what does BPE learn?


class BPETokenizer:
    """Token ids: 0-255 are bytes, 256 + r is the r-th merge, and vocab_size - 1 is the end-of-text token.
    NOTE: when no pair occurs twice any more, training stops early and ids between the last merge and the
    end-of-text token stay unused (their embedding rows are never read)."""

    def __init__(self, merges, vocab_size):
        common.check(vocab_size >= 257 + len(merges), f"a vocabulary of {vocab_size} cannot hold 256 bytes, "
                                                      f"{len(merges)} merges and the end-of-text token")
        self.merges = [tuple(pair) for pair in merges]           # in the order they were learned
        self.vocab_size, self.eot = vocab_size, vocab_size - 1
        self.rank = {pair: 256 + r for r, pair in enumerate(self.merges)}    # pair -> the id it merges into
        self.pieces = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self._cache = {}

    @classmethod
    def train(cls, texts, vocab_size):
        """At most vocab_size - 257 merges; the most frequent pair wins, ties to the smallest ids (deterministic)."""
        chunks = Counter(chunk for text in texts for chunk in CHUNK.findall(text))
        words = [list(chunk.encode("utf-8")) for chunk in chunks]     # each distinct chunk once,
        frequency = list(chunks.values())                             # weighted by how often it occurs
        counts, where = Counter(), defaultdict(set)                   # pair -> occurrences, pair -> words with it

        def tally(w, sign):                       # add (+1) or take away (-1) the pairs of word w
            for pair in zip(words[w], words[w][1:]):
                counts[pair] += sign * frequency[w]
                where[pair].add(w)

        for w in range(len(words)):
            tally(w, +1)
        merges = []
        for new_id in range(256, vocab_size - 1):
            pair, count = max(counts.items(), key=lambda item: (item[1], -item[0][0], -item[0][1]), default=(None, 0))
            if count < 2:                             # no pair left, or none that occurs twice (merged ones stay, at 0)
                break
            merges.append(pair)
            for w in where.pop(pair):                 # only the words holding the pair change their counts
                tally(w, -1)
                words[w] = cls._merge(words[w], pair, new_id)
                tally(w, +1)
        return cls(merges, vocab_size)

    @staticmethod
    def _merge(ids, pair, new_id):              # each non-overlapping occurrence of pair, left to right -> new_id
        out, i = [], 0
        while i < len(ids):
            merge = tuple(ids[i:i + 2]) == pair
            out.append(new_id if merge else ids[i])
            i += 2 if merge else 1
        return out

    def _encode_chunk(self, chunk):
        if chunk not in self._cache:
            ids = list(chunk.encode("utf-8"))
            while len(ids) >= 2:
                # apply merges in the order they were learned: the earliest learned pair present goes first
                pair = min(zip(ids, ids[1:]), key=lambda p: self.rank.get(p, math.inf))
                if pair not in self.rank:
                    break
                ids = self._merge(ids, pair, self.rank[pair])
            self._cache[chunk] = ids
        return self._cache[chunk]

    def encode(self, text):                              # str -> token ids, without the end-of-text token
        return [i for chunk in CHUNK.findall(text) for i in self._encode_chunk(chunk)]

    def decode(self, ids):                               # token ids -> str, without the end-of-text token
        return b"".join(self.pieces[i] for i in ids if i != self.eot).decode("utf-8", errors="replace")

    def encode_batch(self, texts, context):
        """-> (tokens (M, L) int64, captions cut), L = min(context, longest + 1). Each row ends in the end-of-text
        token, which also pads it; a caption longer than context - 1 tokens is cut there, keeping that token."""
        full = [self.encode(text) for text in texts]
        rows = [torch.tensor(ids[:context - 1] + [self.eot]) for ids in full]
        cut = sum(len(ids) > context - 1 for ids in full)
        return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.eot), cut


# ---- 4. Data: images paired with captions, resident on the device ----
#
# Each image holds the ids of its captions in a table of unique strings (common.CaptionData), so one string is one id;
# openclipart is captioned from its category path and file titles, the embedded set with three phrasings of each image
# from its factors. Identical strings recur across images ("a red star" fits ~1 image in 80; openclipart's "star,
# shapes" 1,378), which the loss must handle: same_caption (section 2) compares the ids.

def parse_holdout(text):                             # 'red star,blue circle' -> {(colour index, shape index), ...}
    pairs = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        words = item.split()
        common.check(len(words) == 2 and words[0] in common.COLOURS and words[1] in common.SHAPES,
                     f"--holdout item {item!r} is not 'colour shape' (colours: {', '.join(common.COLOURS)}; "
                     f"shapes: {', '.join(common.SHAPES)})")
        pairs.add((list(common.COLOURS).index(words[0]), common.SHAPES.index(words[1])))
    return pairs


def shape_captions(factors, i):
    """Image i's captions, most to least specific: 'a small red striped star in the top left',
    'a small red striped star', 'a red star'. factors: dict of Python lists (fast to index)."""
    full = common.caption(factors, i)
    place = common.PLACES[factors["row"][i] * 3 + factors["column"][i]]
    colour, shape = list(common.COLOURS)[factors["colour"][i]], common.SHAPES[factors["label"][i]]
    return [full, full[:-len(place) - 1], f"a {colour} {shape}"]


def is_heldout(factors, holdout):                    # -> (N,) bool: the image's colour-shape pair is held out
    held = torch.zeros_like(factors["label"], dtype=torch.bool)
    for colour, shape in holdout:
        held |= (factors["colour"] == colour) & (factors["label"] == shape)
    return held


def load_shapes(cfg, device):
    # --n-train counts the images left for training once --val-share of them are held out for validation
    data = common.load_images("shapes", device=device, n_train=round(cfg.n_train / (1 - cfg.val_share)),
                              n_test=cfg.n_test, seed=cfg.seed)
    keep = ~is_heldout(data.factors_train, parse_holdout(cfg.holdout))        # the held-out pairs are never seen
    train = (data.x_train[keep], data.y_train[keep], {k: v[keep] for k, v in data.factors_train.items()})
    texts, splits = [], []
    # test images keep only their full caption: retrieval then asks for one specific image description
    for (images, labels, factors), phrasings in ((train, slice(None)), ((data.x_test, data.y_test, data.factors_test), slice(1))):
        lists = {k: v.tolist() for k, v in factors.items()}
        ids, counts = common.index_captions([shape_captions(lists, i)[phrasings] for i in range(len(images))], texts, device)
        splits.append(common.Pairs(images, ids, counts, labels, factors))
    return common.CaptionData("shapes", splits[0], splits[1], texts, list(common.SHAPES), {})


def load_data(cfg, device):                          # -> (data, the validation pairs taken out of data.train)
    if cfg.dataset == "shapes":
        data = load_shapes(cfg, device)
    else:                        # openclipart and a folder are split as 04 splits them (common.CAPTION_SPLIT_SEED)
        reader = {"flickr8k": common.read_flickr8k, "openclipart": common.read_openclipart,
                  "captions": common.read_caption_folder}[cfg.dataset]
        data = reader(cfg.data_dir, cfg.image_size, device)
    data.train, val = carve_validation(data.train, cfg.val_share, cfg.seed)
    data.train = data.train.subset(slice(0, cfg.paired or None))
    return data, val


def carve_validation(pairs, share, seed):            # -> (training, validation): a share of the images, by image
    n_val = round(share * len(pairs))
    common.check(share == 0 or 2 <= n_val < len(pairs), f"--val-share {share} leaves {n_val} of the {len(pairs)} "
                                                        "training images for validation: it needs at least 2, and "
                                                        "at least 1 must stay for training")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).to(pairs.images.device)
    return pairs.subset(order[n_val:]), pairs.subset(order[:n_val])


def distinct_captions(data, pairs):                  # the pairs' caption strings, each once, first captions first
    ids = torch.cat([pairs.captions[:, 0], pairs.captions[:, 1:].flatten()]).tolist()
    return list(dict.fromkeys(data.texts[i] for i in ids if i >= 0))


def fit_batch(cfg, n_train):       # --quick shrinks its batch to a small folder; elsewhere too big a batch is an error
    processes = common.world_size()
    if cfg.quick and cfg.batch_size == QUICK["batch_size"]:
        cfg = dataclasses.replace(cfg, batch_size=max(2, min(cfg.batch_size, n_train // processes)))
    common.check(n_train // processes >= cfg.batch_size,
                 f"{n_train} training images" + (f" (after --val-share {cfg.val_share})" if cfg.val_share else "")
                 + f" but --batch-size {cfg.batch_size}"
                 + (f" for each of {processes} processes (the batch is per process)" if processes > 1 else "")
                 + ": use a smaller batch" + (" or a smaller --val-share" if cfg.val_share else ""))
    return cfg


def augmentation(cfg):
    """augment()'s strengths: 03's for the chosen augmentations, 0 for the others. auto is crop,flip on real images and
    none on the embedded set, whose captions name each shape's place and size (a flip makes "in the top left" wrong, a
    crop "small"). No colour changes unless asked for: a hue shift or grayscale would make "a red star" wrong."""
    names = cfg.augment
    if names == "auto":
        names = "" if cfg.dataset == "shapes" or cfg.freeze_image else "crop,flip"
    return contrastive.strengths(contrastive.Config(augmentations=names, crop=cfg.crop))


def training_views(images, strength, generator):     # uint8 (B, 3, S, S) -> views in [0, 1]; row i keeps its captions
    return contrastive.augment(common.to_float(images), **strength, generator=generator)


# ---- 5. Training ----
#
# A batch holds B different images, each with one of its captions drawn at random, so two captions of the same
# image never meet in one batch; other images' copies of a caption string are not negatives (same_caption).

def batches(n, batch_size, generator, device):       # image indices (B,): every image once an epoch, in a fresh order
    while True:
        order = torch.randperm(n, generator=generator, device=device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def pick_captions(pairs, index, generator):          # (B,) image indices -> (B,) caption ids, one at random each
    draw = torch.rand(len(index), generator=generator, device=index.device)
    return pairs.captions[index, (draw * pairs.counts[index]).long()]


def batch_loss(model, images, tokens, caption_ids, device, parallel=None, gather=True):
    """Section 2's loss on B pairs, as CLIP.forward takes them; parallel: the model or DDP around it (data_parallel)."""
    with common.autocast(device):
        image_embeddings, text_embeddings = (parallel or model)(images, tokens)               # (B, K), (B, K)
    # Several GPUs (torchrun, W processes): every caption meets the images of all GPUs as negatives, so the embeddings
    # are gathered, (B, K) -> (W*B, K) in rank order with this rank's rows keeping their graph, and the caption ids
    # too, so that one string on two GPUs is not a negative. backward_full_batch then multiplies the loss by W against
    # DDP's averaging and divides the logit scale's gradient by W again (common.py says why). With W = 1: unchanged.
    if gather:
        image_embeddings, text_embeddings, caption_ids = (common.gather_with_grad(x)
                                                          for x in (image_embeddings, text_embeddings, caption_ids))
    logits = clip_logits(image_embeddings.float(), text_embeddings.float(), model.scale())    # (W*B, W*B)
    # EXERCISE: pass positives=None (the paper's loss) and see whether "a red star" fighting "a red star" hurts
    return clip_loss(logits, same_caption(caption_ids))


def train_step(model, optimizer, images, tokens, caption_ids, device, parallel=None, scaler=None):
    """One step on B pairs; returns the loss, still on the device (reading it would make the CPU wait for the GPU).
    scaler: train()'s common.grad_scaler (fp16 only, its scale kept step to step); a one-off step gets a fresh one."""
    loss = batch_loss(model, images, tokens, caption_ids, device, parallel)
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler or common.grad_scaler(device)
    common.backward_full_batch(scaler.scale(loss), replicated=[model.logit_scale])
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def make_optimizer(model, cfg):
    """AdamW with CLIP's betas and 04's weight decay (vit.decay_groups: only the weight matrices of linear layers decay,
    not embeddings, gains, biases or the scale). A frozen encoder's weights get no gradient: AdamW leaves them alone."""
    optimizer = torch.optim.AdamW(vit.decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                                  fused=next(model.parameters()).is_cuda)
    warm_then_cosine = lambda step: common.warmup_cosine(step, cfg.steps, round(cfg.warmup * cfg.steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warm_then_cosine)


@torch.no_grad()
def embed_all(function, inputs, device, batch_size=1024):      # (N, ...) -> (N, D) float32, in chunks under autocast
    with common.autocast(device):
        return torch.cat([function(chunk).float() for chunk in inputs.split(batch_size)])


def train(model, data, val, tokens, cfg, device):
    """-> (loss and scale per step on the CPU, pairs per second, validation history); the model ends with the weights
    of the best validation step (best_step). Under torchrun each rank trains on its own contiguous share of the pairs
    but holds all of them: the tokenizer and caption ids, learned from all captions, must be the same on every rank."""
    pairs = data.train.subset(common.rank_share(len(data.train)))
    strength, inputs = augmentation(cfg), pairs.images
    if cfg.freeze_image:
        # a fixed encoder and no augmentation: every image has one feature vector, so compute it once (LiT)
        # NOTE: the image projection still trains; LiT locks it too, but 04's features were never aimed at this space
        model.visual.requires_grad_(False).eval()
        inputs = embed_all(model.image_features, pairs.images, device)             # (N, E)
    # under torchrun DDP runs CLIP.forward and averages the gradients; they live in its communication buckets (no
    # copy into them), and every step uses the same parameters in the same order, so DDP plans once
    parallel = common.data_parallel(model, device, gradient_as_bucket_view=True, static_graph=True)
    optimizer, schedule = make_optimizer(model, cfg)
    scaler = common.grad_scaler(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + common.rank())   # each rank its own draws
    losses, scales = torch.zeros(cfg.steps, device=device), torch.zeros(cfg.steps, device=device)
    history, kept = [], None
    bar = common.progress(cfg.steps * cfg.batch_size, "training CLIP", unit="pair")
    clock = common.Stopwatch(device)
    for step, index in zip(range(cfg.steps), batches(len(pairs), cfg.batch_size, generator, device)):
        caption_ids = pick_captions(pairs, index, generator)                       # (B,)
        images = inputs[index] if cfg.freeze_image else training_views(inputs[index], strength, generator)
        loss = train_step(model, optimizer, images, tokens[caption_ids], caption_ids, device, parallel, scaler)
        schedule.step()
        # kept on the device (no sync per step); the full batch's loss, the same on every rank
        losses[step], scales[step] = loss, model.scale().detach()
        bar.update(cfg.batch_size)
        if step % 50 == 0:
            value = loss.item()                      # the bar's read: it also tells whether training has diverged
            check_finite(value, step, bar)
            bar.set_postfix(loss=f"{value:.3f}", scale=f"{model.scale().item():.1f}")
        if len(val) and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
            history.append(measure_validation(model, data.train, val, tokens, cfg, device, step + 1))
            if best_step(history) == step + 1:       # the weights of the best step so far, copied on the device
                kept = {name: value.detach().clone() for name, value in model.state_dict().items()}
    seconds = common.mean_over_ranks(clock.seconds())
    bar.close()
    model.requires_grad_(True)
    check_finite(losses[-1].item(), cfg.steps - 1, bar)    # the steps since the bar's last read
    if kept is not None:
        model.load_state_dict(kept)
    return losses.cpu(), scales.cpu(), cfg.steps * cfg.batch_size * common.world_size() / seconds, history   # all GPUs


# Validation: --val-share of the training images (section 4) never reach a training step. Every --val-every steps
# the loss of section 2 is measured on them and on as many training images, the same way (each image with its first
# caption, no augmentation, batches of --batch-size): the gap between the two is how much the model memorised. And
# text->image recall@10 among the validation images picks the step whose weights are kept: on a few thousand images
# the training loss can fall to 0 while recall on new images has long stopped rising, or falls again.

@torch.no_grad()
def pairs_loss(model, pairs, tokens, batch_size, device):    # mean batch_loss over full batches, on this process alone
    batch_size, ids = min(batch_size, len(pairs)), pairs.captions[:, 0]
    parts = [slice(start, start + batch_size) for start in range(0, len(pairs) - batch_size + 1, batch_size)]
    return torch.stack([batch_loss(model, pairs.images[part], tokens[ids[part]], ids[part], device, gather=False)
                        for part in parts]).mean().item()


def measure_validation(model, train_pairs, val, tokens, cfg, device, step):
    pool = val.subset(slice(0, cfg.eval_images))
    ids = pool.captions[pool.captions >= 0].unique()
    text_embeddings = torch.zeros(len(tokens), cfg.embed_dim, device=device)   # retrieval reads the pool's rows only
    text_embeddings[ids] = embed_all(model.encode_text, tokens[ids], device)
    recall, _ = retrieval(embed_all(model.encode_image, pool.images, device), pool, text_embeddings)
    return {"step": step, "val_loss": pairs_loss(model, val, tokens, cfg.batch_size, device),
            "train_loss": pairs_loss(model, train_pairs.subset(slice(0, len(val))), tokens, cfg.batch_size, device),
            "val_t2i_r10": recall["t2i_r10"], "val_i2t_r10": recall["i2t_r10"]}


def best_step(history):   # the highest validation text->image R@10; among equals (frequent over a few hundred
    # images) the lowest validation loss, then the later step, which has seen more pairs
    return max(history, key=lambda row: (row["val_t2i_r10"], -row["val_loss"], row["step"]))["step"]


def check_finite(loss, step, bar):    # a NaN or infinite loss: the weights are lost, so stop (as 02 does), save nothing
    if not math.isfinite(loss):
        bar.close()                                  # clears the bar's line, so the error stands on a line of its own
        raise common.UserError(f"training diverged (the loss is {loss} at step {step + 1}); lower --lr")


# ---- 6. Evaluation: zero-shot classification, compositional zero-shot, retrieval ----

# Prompts for zero-shot classification. CLIP (Sec. 3.1.4) wraps a class name in a sentence like its training
# captions ("a photo of a {}"), and averages the embeddings of many such sentences (ensembling). Here the
# captions always name a colour and a size, so templates that name one are in-distribution; averaging over all
# colours, sizes, textures and places leaves the shape as the common part. "a photo of a {}" is CLIP's own:
# its words never occur in our captions, and BPE spells them from pieces the text encoder barely trained.
# EXERCISE: keep only "a photo of a {}", or only the colour templates, and compare zero-shot accuracy.
TEMPLATES = (["a {}", "a photo of a {}"] + [f"a {size} {{}}" for size in common.SIZES]
             + [f"a {texture} {{}}" for texture in common.TEXTURES[1:]] + [f"a {colour} {{}}" for colour in common.COLOURS]
             + [f"a large {{}} {place}" for place in common.PLACES])
PAIR_TEMPLATES = ["a {}"] + [f"a {size} {{}}" for size in common.SIZES]     # {} is a pair like "red star"
PAIR_NAMES = [f"{colour} {shape}" for colour in common.COLOURS for shape in common.SHAPES]   # index: colour * 10 + shape
# openclipart's captions end with the top-level category ("banana, fruit, food"), so the class name alone is a
# prompt in the captions' own form
PROMPTS = {"shapes": TEMPLATES, "openclipart": ["{}"]}


def embed_texts(model, tokenizer, texts, context, device):     # M strings -> (M, K) unit text embeddings
    return embed_all(model.encode_text, tokenizer.encode_batch(texts, context)[0].to(device), device)


def zero_shot_weights(model, tokenizer, names, templates, context, device):   # -> (C, K), the templates averaged
    texts = [template.format(name) for name in names for template in templates]
    embeddings = embed_texts(model, tokenizer, texts, context, device).reshape(len(names), len(templates), -1)  # (C, P, K)
    return F.normalize(F.normalize(embeddings, dim=-1).mean(1), dim=-1)                                # (C, K)


def retrieval(image_embeddings, pairs, text_embeddings):
    """Image->text and text->image recall@1/5/10 over the pool's images and all of their captions."""
    ids = pairs.captions[pairs.captions >= 0].unique()                             # (M,) the pool's captions
    relevant = (pairs.captions[:, :, None] == ids[None, None, :]).any(1)           # (N, M): each image with the caption
    similarity = image_embeddings @ text_embeddings[ids].T                         # (N, K) @ (K, M) -> (N, M)
    recall = {}
    for way, scores, right in (("i2t", similarity, relevant), ("t2i", similarity.T, relevant.T)):
        recall.update({f"{way}_{k}": v for k, v in evaluation.recall_at_k(scores, right).items()})
    return recall, {f"t2i_r{k}": min(1.0, k / len(relevant)) for k in (1, 5, 10)}     # chance: one right image per text


@torch.no_grad()
def evaluate(model, data, tokens, tokenizer, cfg, device):
    """Retrieval on the first --eval-images test images (tokens (M, L): every caption's); zero-shot on labelled sets."""
    pool = data.test.subset(slice(0, cfg.eval_images))
    text_embeddings = embed_all(model.encode_text, tokens, device)                # (all captions, K)
    metrics, chance = retrieval(embed_all(model.encode_image, pool.images, device), pool, text_embeddings)
    metrics = {"retrieval": metrics, "retrieval_chance": chance}
    if data.classes:
        images = embed_all(model.encode_image, data.test.images, device)          # (N, K)
        weights = zero_shot_weights(model, tokenizer, data.classes, PROMPTS[data.name], cfg.context, device)  # (C, K)
        labelled = data.test.labels >= 0                                          # openclipart's unsorted: no class
        scores, labels = (images @ weights.T)[labelled], data.test.labels[labelled]
        metrics["zero_shot"] = {**evaluation.topk_accuracy(scores, labels), **per_class_top1(scores, labels, data.classes)}
        if data.name == "shapes":
            single_weights = zero_shot_weights(model, tokenizer, data.classes, TEMPLATES[:1], cfg.context, device)
            metrics["zero_shot_single_template"] = evaluation.topk_accuracy(images @ single_weights.T, data.test.labels)
            metrics["compositional"] = compositional(model, tokenizer, images, data.test, cfg, device, weights)
    return metrics


def per_class_top1(scores, labels, classes):
    """Top-1 of each class among the test images, and their mean (balanced top-1): on an imbalanced set (computer icons and
    shapes, most of them stars, are half of openclipart) plain top-1 mostly measures the largest classes. scores (N, C), labels (N,)."""
    right = scores.argmax(1) == labels
    per_class = {name: right[labels == c].float().mean().item() for c, name in enumerate(classes) if (labels == c).any()}
    return {"balanced_top1": sum(per_class.values()) / len(per_class), "per_class_top1": per_class,
            "balanced_chance": 1 / len(per_class)}


def compositional(model, tokenizer, images, test, cfg, device, shape_weights):
    """Test images whose colour-shape pair was never seen in training against the others: shape zero-shot top-1,
    80-way colour-shape top-1, and precision@10 of text->image retrieval for a query naming the pair ("a red star")."""
    holdout = parse_holdout(cfg.holdout)
    if not holdout:
        return {}
    heldout_query = torch.tensor([divmod(q, len(common.SHAPES)) in holdout for q in range(len(PAIR_NAMES))]).to(device)
    pair_label = test.factors["colour"] * len(common.SHAPES) + test.labels                  # (N,) PAIR_NAMES' index
    held = heldout_query[pair_label]                                                       # (N,)
    pair_weights = zero_shot_weights(model, tokenizer, PAIR_NAMES, PAIR_TEMPLATES, cfg.context, device)  # (80, K)
    pair_scores = images @ pair_weights.T                                                  # (N, 80)
    top10 = pair_scores.T.topk(min(10, len(images)), dim=1).indices                        # (80, 10) images per query
    precision = (pair_label[top10] == torch.arange(len(PAIR_NAMES), device=device)[:, None]).float().mean(1)  # (80,)
    share = lambda right, mask: right[mask].float().mean().item() if mask.any() else float("nan")
    metrics = {"heldout_images": int(held.sum())}
    for name, right, mask in [("shape_top1", (images @ shape_weights.T).argmax(1) == test.labels, held),
                              ("pair_top1", pair_scores.argmax(1) == pair_label, held),
                              ("pair_p10", precision, heldout_query)]:
        metrics[f"heldout_{name}"], metrics[f"seen_{name}"] = share(right, mask), share(right, ~mask)
    return {**metrics, "pair_chance": 1 / len(pair_weights)}


# ---- 7. Figures ----

def show(ax, image):
    ax.imshow(image.permute(1, 2, 0).cpu().numpy())
    ax.set(xticks=[], yticks=[])                           # not set_axis_off: the retrieval grid labels its x axis


def plot_training(losses, scales, history, path):   # each step's loss beside the validation's, and validation recall@10
    fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses.numpy(), lw=0.8, color="tab:blue", label="training batches (augmented)")
    if history:
        at = [row["step"] for row in history]
        ax.plot(at, [row["train_loss"] for row in history], "o-", ms=3, color="navy", label="training images, as validated")
        ax.plot(at, [row["val_loss"] for row in history], "o-", ms=3, color="tab:orange", label="validation images")
        ax.axvline(best_step(history), color="gray", ls=":", label="step kept")
        right.plot(at, [row["val_t2i_r10"] for row in history], "o-", ms=3, label="text -> image")
        right.plot(at, [row["val_i2t_r10"] for row in history], "o-", ms=3, label="image -> text")
        right.axvline(best_step(history), color="gray", ls=":")
        right.legend(fontsize=8)
    right.set(xlabel="step", ylabel="recall@10", title="Validation retrieval (the kept step: best text -> image)")
    ax.set(xlabel="step", ylabel="symmetric contrastive loss", yscale="log",
           title="Loss, and the temperature CLIP learns (starts at 0.07, floor 0.01)")
    ax.legend(fontsize=8, loc="lower left")
    twin = ax.twinx()
    twin.plot(steps, 1 / scales.numpy(), color="tab:red", lw=0.8)
    twin.set_ylabel("learned temperature 1 / scale", color="tab:red")
    fig.tight_layout()
    common.save_figure(fig, path)


@torch.no_grad()
def plot_similarity(model, data, tokenizer, cfg, device, path, n=8):  # n test images, their captions: a bright diagonal
    n = min(n, len(data.test))
    pairs = data.test.subset(slice(0, n))
    texts = [data.texts[int(pairs.captions[i, 0])] for i in range(n)]
    similarity = embed_all(model.encode_image, pairs.images, device) @ embed_texts(model, tokenizer, texts, cfg.context, device).T
    fig = plt.figure(figsize=(1.1 * n + 4, 1.1 * n + 1.3))
    grid = fig.add_gridspec(n + 1, n + 1, width_ratios=[4] + [1] * n, height_ratios=[1] + [1] * n, wspace=0.05, hspace=0.05)
    for j in range(n):
        show(fig.add_subplot(grid[0, j + 1]), pairs.images[j])
    ax = fig.add_subplot(grid[1:, 1:])
    matrix = similarity.T.cpu().numpy()
    ax.imshow(matrix, cmap="viridis")
    for (row, column), value in np.ndenumerate(matrix):
        light = value > (matrix.min() + matrix.max()) / 2                      # dark text on the bright cells
        ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if light else "white")
    ax.set_xticks([])
    ax.set_yticks(range(n), [text if len(text) < 45 else text[:42] + "..." for text in texts], fontsize=8)
    ax.yaxis.tick_left()
    fig.add_subplot(grid[0, 0]).axis("off")
    fig.suptitle("Cosine similarity of test images (columns) and their captions (rows)")
    common.save_figure(fig, path)


@torch.no_grad()
def plot_predictions(model, data, tokenizer, cfg, device, path, n=6):   # n test images, each with its 3 nearest texts
    if data.name == "shapes":
        weights = zero_shot_weights(model, tokenizer, PAIR_NAMES, PAIR_TEMPLATES, cfg.context, device)
        holdout = parse_holdout(cfg.holdout)
        held = is_heldout(data.test.factors, holdout)
        order = torch.cat([held.nonzero().squeeze(1)[: n // 2], (~held).nonzero().squeeze(1)])[:n]
        candidates = [f"a {pair}" + (" (held out)" if divmod(i, len(common.SHAPES)) in holdout else "")
                      for i, pair in enumerate(PAIR_NAMES)]
    else:
        candidates = distinct_captions(data, data.test.subset(slice(0, cfg.eval_images)))       # the retrieval pool's
        weights = embed_texts(model, tokenizer, candidates, cfg.context, device)
        order = torch.arange(min(n, len(data.test)), device=device)
    images = data.test.images[order]
    probabilities = (model.scale() * embed_all(model.encode_image, images, device) @ weights.T).softmax(1)  # (n, C)
    top = probabilities.topk(min(3, len(candidates)), dim=1)
    fig, axes = plt.subplots(2, len(images), figsize=(2.6 * len(images), 4.6), gridspec_kw={"height_ratios": [2, 1]},
                             squeeze=False)
    for i in range(len(images)):
        show(axes[0, i], images[i])
        labels = [candidates[int(j)][:38] for j in top.indices[i]]
        axes[1, i].barh(range(len(labels)), top.values[i].cpu().numpy()[::-1], color="tab:green")
        axes[1, i].set_yticks(range(len(labels)), labels[::-1], fontsize=7)
        axes[1, i].set_xlim(0, 1)
    fig.suptitle("Zero-shot: each test image's three nearest texts, softmax over all candidates")
    fig.tight_layout()
    common.save_figure(fig, path)


@torch.no_grad()
def plot_retrieval(model, data, tokenizer, cfg, device, path, top=6):     # text queries and their nearest test images
    pool = data.test.subset(slice(0, cfg.eval_images))
    queries, titles = retrieval_queries(data, pool, cfg)
    query_embeddings = embed_texts(model, tokenizer, queries, cfg.context, device)
    columns = min(top, len(pool))
    nearest = (query_embeddings @ embed_all(model.encode_image, pool.images, device).T).topk(columns, dim=1)
    fig, axes = plt.subplots(len(queries), columns, figsize=(1.5 * columns + 0.5, 1.7 * len(queries)), squeeze=False)
    for q, title in enumerate(titles):
        for j in range(columns):
            show(axes[q, j], pool.images[nearest.indices[q, j]])
            axes[q, j].set_xlabel(f"{nearest.values[q, j]:.2f}", fontsize=7)
        axes[q, 0].set_title(title if len(title) < 70 else title[:67] + "...", loc="left", fontsize=9)
    fig.suptitle(f"Text -> image retrieval over {len(pool)} test images (cosine similarity under each)")
    fig.tight_layout()
    common.save_figure(fig, path)


def retrieval_queries(data, pool, cfg, n=4):   # -> (queries, row titles): held-out pairs and phrasings, or n captions
    if data.name != "shapes":
        queries = distinct_captions(data, pool)[:n]
        return queries, queries
    held = sorted(parse_holdout(cfg.holdout))[:2]
    queries = [f"a {list(common.COLOURS)[c]} {common.SHAPES[s]}" for c, s in held]
    titles = [query + "  (a pair held out of training)" for query in queries]
    queries += ["a large green checked ring on the left", "a small white triangle", "a heart at the top"][:n - len(queries)]
    return queries, titles + queries[len(titles):]


# ---- 8. Putting it together ----

MAX_CONTEXT = 256     # tokens; CLIP's is 77, and every caption here is shorter


def validate(cfg):                                   # every option that can be wrong, before any data is made or read
    for name in ("lr", "weight_decay", "warmup", "val_share", "crop"):
        value = getattr(cfg, name)
        common.check(math.isfinite(value), f"--{name.replace('_', '-')} must be a finite number, got {value}")
    common.check(cfg.batch_size >= 2, f"--batch-size must be at least 2 (a pair needs other pairs as negatives), got {cfg.batch_size}")
    common.check(cfg.vocab_size >= 257, f"--vocab-size {cfg.vocab_size} is too small to hold the 256 bytes and "
                                        "the end-of-text token; use at least 257")
    common.check(2 <= cfg.context <= MAX_CONTEXT, f"--context must be between 2 (a token and the end-of-text) and "
                                                  f"{MAX_CONTEXT} tokens, got {cfg.context}")
    common.check(cfg.steps >= 1 and 0 <= cfg.warmup < 1, "--steps must be positive and --warmup a share of them in [0, 1)")
    common.check(cfg.lr > 0 and cfg.weight_decay >= 0, "--lr must be positive and --weight-decay not negative")
    common.check(0 <= cfg.val_share < 1, f"--val-share must be in [0, 1) (1 would leave no training images), got {cfg.val_share}")
    for name in ("n_train", "n_test", "eval_images", "embed_dim", "image_size", "probe_steps", "patch_size", "image_dim", "val_every",
                 "image_depth", "image_heads", "text_dim", "text_depth", "text_heads"):
        common.check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    common.check(cfg.paired >= 0, f"--paired must be 0 (all) or a number of images, got {cfg.paired}")
    divisible = [("text_dim", "text_heads")]      # with --init-image the checkpoint sets the image encoder's shape
    divisible += [] if cfg.init_image else [("image_dim", "image_heads"), ("image_size", "patch_size")]
    for name, by in divisible:
        common.check(getattr(cfg, name) % getattr(cfg, by) == 0, f"--{name.replace('_', '-')} {getattr(cfg, name)} is not "
                                                                  f"divisible by --{by.replace('_', '-')} {getattr(cfg, by)}")
    common.check(not cfg.freeze_image or cfg.init_image,
                 "--freeze-image needs --init-image: a frozen random encoder would learn nothing")
    chosen = set(filter(None, cfg.augment.split(","))) - {"auto"}
    common.check(chosen <= set(contrastive.AUGMENTATIONS), f"--augment {cfg.augment!r}: choose from "
                                                           f"{','.join(contrastive.AUGMENTATIONS)}, or auto, or ''")
    common.check(not (cfg.freeze_image and chosen), "--freeze-image embeds each image once, so it takes no --augment")
    common.check(0 <= cfg.crop < 1, f"--crop must be in [0, 1) (the share of the area a crop may cut away), got {cfg.crop}")
    parse_holdout(cfg.holdout)


def prepare(cfg, device):
    """-> the config as built (image shape, fit_batch's batch), data, validation pairs, tokenizer, every caption's
    tokens (M, L), how many were cut, and the model; the image encoder first, so a bad --init-image fails at once."""
    encoder = image_encoder(cfg, device)
    # the shape actually built, which --init-image's checkpoint sets, is what config.json and clip.pt record
    cfg = dataclasses.replace(cfg, image_size=encoder.arch["image_size"],
                              **{option: encoder.arch[key] for option, key in IMAGE_SHAPE.items()})
    common.check(cfg.dataset != "shapes" or encoder.arch["image_size"] == 32,
                 f"the embedded set is 32x32, but the image encoder takes {encoder.arch['image_size']}x{encoder.arch['image_size']}")
    data, val = load_data(cfg, device)
    cfg = fit_batch(cfg, len(data.train))
    tokenizer = BPETokenizer.train(distinct_captions(data, data.train), cfg.vocab_size)
    tokens, cut = tokenizer.encode_batch(data.texts, cfg.context)                  # (M, L)
    if common.is_main():
        print(f"{data.name}: {len(data.train)} training images with {int(data.train.counts.sum())} captions, "
              f"{len(val)} validation and {len(data.test)} test images; BPE: {len(tokenizer.merges)} merges, {tokens_per_caption(tokens, tokenizer):.1f} "
              "tokens per caption" + (f", {cut} captions cut at --context {cfg.context}" if cut else ""))
    text_encoder = TextTransformer(cfg.vocab_size, cfg.context, cfg.text_dim, cfg.text_depth, cfg.text_heads)
    model = CLIP(encoder, text_encoder, cfg.embed_dim).to(device)
    model.pixel_mean[:], model.pixel_std[:] = vit.channel_stats(data.train.images)      # (1, 3, 1, 1) each
    return cfg, data, val, tokenizer, tokens.to(device), cut, model


def tokens_per_caption(tokens, tokenizer):          # mean length of the captions, their end-of-text token included
    return ((tokens != tokenizer.eot).sum(1).float() + 1).mean().item()


def main(argv=None):
    cfg = common.parse_config(Config, argv, __doc__, quick=QUICK)
    validate(cfg)
    device, out = common.setup(cfg, __file__)
    common.cpu_notice(cfg, device, cfg.steps * cfg.batch_size / 60)
    clock = common.Stopwatch(device)
    cfg, data, val, tokenizer, tokens, cut, model = prepare(cfg, device)
    if common.is_main():
        common.save_json(out / "config.json", dataclasses.asdict(cfg))          # as prepare resolved it
    before = evaluate(model, data, tokens, tokenizer, cfg, device)
    losses, scales, pairs_per_second, history = train(model, data, val, tokens, cfg, device)
    metrics = evaluate(model, data, tokens, tokenizer, cfg, device)
    metrics.update(dataset=data.name, train_images=len(data.train), train_captions=int(data.train.counts.sum()),
                   val_images=len(val), test_images=len(data.test), merges=len(tokenizer.merges),
                   tokens_per_caption=tokens_per_caption(tokens, tokenizer), captions_cut=cut,
                   loss_first=losses[:10].mean().item(), loss_last=losses[-10:].mean().item(),
                   temperature_last=1 / scales[-1].item(), pairs_per_second=pairs_per_second, before_training=before,
                   augment=[name for name, strength in augmentation(cfg).items() if strength > 0], batch_size=cfg.batch_size,
                   skipped=data.skipped or {}, processes=common.world_size())
    if history:
        kept = next(row for row in history if row["step"] == best_step(history))
        metrics["validation"] = {"kept_step": kept["step"], "kept": kept, "history": history,
                                 "loss_gap_at_kept": kept["val_loss"] - kept["train_loss"]}
    if data.classes:                  # the baseline: what a classifier trained WITH labels gets from the same features
        seen, unseen = (pairs.subset(pairs.labels >= 0) for pairs in (data.train.subset(slice(0, 10_000)), data.test))
        features = lambda images: embed_all(model.image_features, images, device)
        metrics["linear_probe"] = evaluation.linear_probe(features(seen.images), seen.labels, features(unseen.images),
                                                          unseen.labels, len(data.classes), min_steps=cfg.probe_steps)
    # every rank holds all the data and the same weights, so it computed the same numbers; rank 0 writes them
    if not common.is_main():
        return model, metrics
    plot_training(losses, scales, history, out / "training.png")
    plot_similarity(model, data, tokenizer, cfg, device, out / "similarity.png")
    plot_predictions(model, data, tokenizer, cfg, device, out / "predictions.png")
    plot_retrieval(model, data, tokenizer, cfg, device, out / "retrieval.png")
    common.save_checkpoint(out / "clip.pt", model, cfg, kind="clip", merges=[list(p) for p in tokenizer.merges],
                           image_arch=model.visual.arch)
    metrics["seconds"] = clock.seconds()
    common.save_json(out / "metrics.json", metrics)
    out = common.finish_run(out)
    print(summary(metrics))
    return model, metrics


def summary(m):
    r, c = m["retrieval"], m["retrieval_chance"]
    line = (f"05_clip {m['dataset']}: loss {m['loss_first']:.2f} -> {m['loss_last']:.2f}, T {m['temperature_last']:.3f} | "
            f"retrieval R@1/5/10 i2t {r['i2t_r1']:.3f}/{r['i2t_r5']:.3f}/{r['i2t_r10']:.3f} "
            f"t2i {r['t2i_r1']:.3f}/{r['t2i_r5']:.3f}/{r['t2i_r10']:.3f} (chance t2i@1 {c['t2i_r1']:.3f})")
    if "zero_shot" in m:
        z, b, k = m["zero_shot"], m["before_training"]["zero_shot"], m.get("compositional", {})
        single = f"1 template {m['zero_shot_single_template']['top1']:.3f}, " if "zero_shot_single_template" in m else ""
        line += (f" | zero-shot top1 {z['top1']:.3f}, balanced {z['balanced_top1']:.3f} ({single}"
                 f"untrained {b['top1']:.3f}, probe with labels {m['linear_probe']['top1']:.3f})")
        if k:
            line += (f" | held-out pairs: shape {k['heldout_shape_top1']:.3f} (seen {k['seen_shape_top1']:.3f}), "
                     f"colour+shape {k['heldout_pair_top1']:.3f} (seen {k['seen_pair_top1']:.3f}, chance {k['pair_chance']:.3f})")
    if "validation" in m:
        v = m["validation"]
        line += (f" | kept step {v['kept_step']} (val t2i R@10 {v['kept']['val_t2i_r10']:.3f}, "
                 f"loss val {v['kept']['val_loss']:.2f} vs train {v['kept']['train_loss']:.2f})")
    return line + f" | {m['pairs_per_second'] / 1e3:.1f}k pairs/s, {m['seconds']:.0f} s"


if __name__ == "__main__":
    common.run(main)
