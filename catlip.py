"""CatLIP: CLIP-level visual recognition accuracy with 2.7x faster pre-training on web-scale image-text data.

Mehta, Horton, Faghri, Sekhavat, Najibi, Farajtabar, Tuzel, Rastegari, arXiv:2404.15653 (apple/corenet,
projects/catlip). Image-text pre-training recast as classification: the nouns of each caption are mapped to WordNet
synsets, the vocabulary keeps the frequent synsets, and the image encoder alone is trained with multi-label binary
cross-entropy over them. No text tower, no pairwise similarities, no all-gather.

What this file reproduces, in miniature on the synthetic world's noisy alt-texts (common/world.py):
  1. caption -> synset labels, standard library only: a WordNet 3.x noun reader, NLTK's noun lemmatiser and
     corenet's rule (lemma -> lemma.n.01, kept only if its head lemma is the word); without --wordnet the world's
     noun lexicon (common.world.NOUN_FORMS) stands in for WordNet;
  2. vocabulary: synset counts over the training captions only (summed over ranks), count >= min_count and/or
     top-k, saved to vocab.json and reused;
  3. pretraining: ViT (common.models) + a linear head over the vocabulary, loss kernels.linear_bce (sparse targets,
     batch_mean = sum over synsets / B, corenet's BCE), AdamW + cosine, bf16 on CUDA, optional EMA, DDP, resumable;
  4. the same ViT trained as CLIP (text tower + common.losses.clip_loss) on the same samples: linear probe and k-NN
     for both on the attributes the captions carry (the main object's shape and colour; mean over them), and the
     forward+backward step cost of both at the same batch;
  5. Transfer Init (paper §4; not in the released corenet configs), frozen encoder: a linear head on the CatLIP
     features started from the CatLIP rows of the matching synsets vs a random head, 1-10 labelled images per class,
     same steps and lr grid, lr chosen per arm on a few-shot val split. The paper fine-tunes the whole model; here
     only the head trains (cheap enough for a lr grid on 2 CPU cores), and the docs say so;
  6. loss-cost scaling: head+loss time of BCE over V vs contrastive loss with all-gather on 2 gloo processes as the
     global batch grows (`python catlip.py bench`).

Run:
  python catlip.py                          # default run (writes runs/catlip: results.json, *.png, *.safetensors)
  python catlip.py --smoke                  # tiny end-to-end run (< 60 s); explicit flags win over its sizes
  python catlip.py --seeds=0,1,2            # the default run per seed: seeds.json, sweep.png, a verdict per effect
  python catlip.py --steps=2000 --lr=1e-3   # both pretrainings; --resume continues killed ones, --retrain redoes all
  python catlip.py --wordnet=.cache/ref/wordnet-3.0   # mine real WordNet synsets instead of the world lexicon
  python catlip.py vocab                    # only build vocab.json;  python catlip.py bench   # only the scaling bench
  torchrun --nproc_per_node=2 catlip.py     # data parallel (gloo on CPU); rank 0 evaluates and writes
  python catlip.py --data='shards/{split}'  # real shards: train/, val/, test/ (e.g. `python -m common.world export`)
  python catlip.py --data='shards/shard-{000000..000009}.tar' --holdout=0.05   # one stream, eval held out by key hash
"""
import copy
import html
import json
import math
import os
import re
import socket
import statistics
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import config_to_dict, parse_config, print_table, run_cli, save_json
from common.data import Stream, class_names_of, data_report, iter_samples, open_source, read_samples, stack
from common.eval import knn_accuracy, linear_probe
from common.losses import clip_loss
from common.models import CLIP, text_tiny, vit_tiny
from common.plot import line_plot, panel
from common.seeds import Effect, lookup, run_seeds
from common.train import (TrainConfig, all_reduce, autocast, fit, load_weights, mark_stage, save_weights, seed_all,
                          setup_distributed, stage_current, unwrap)
from common.transforms import eval_transform
from common.world import COLORS, NOUN_FORMS, SHAPES, SIZES, World
from kernels.bce import linear_bce

COMMANDS = ["run", "vocab", "bench"]


@dataclass
class Config:
    out: str = "runs/catlip"  # output directory
    seed: int = 0  # all randomness (world content, init, data order, few-shot draws)
    device: str = ""  # cpu | cuda; empty = cuda if available
    data: str = ""  # tar shards or image folder instead of the synthetic world ("{split}" picks train/val/test)
    val_data: str = ""  # eval data (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    smoke: bool = False  # tiny sizes (SMOKE), end to end in < 60 s; flags given explicitly win
    seeds: str = ""  # e.g. 0,1,2: the default run per seed -> seeds.json, sweep.png, verdicts (common/seeds.py)
    retrain: bool = False  # train every stage again (vocab, tokenizer, CatLIP, CLIP) even if --out has it finished
    resume: bool = False  # continue unfinished stages in --out (same config) from their last checkpoint
    wordnet: str = ""  # WordNet 3.x dict dir (index.noun, data.noun, noun.exc); empty = the world's noun lexicon
    caption: str = "alt_text"  # caption field to mine: alt_text (noisy, web-like) | caption (accurate)
    image_size: int = 32  # image side in pixels
    n_train: int = 19200  # world pretraining images (same for CatLIP and CLIP); --data streams all training samples
    n_val: int = 1000  # few-shot pool: shots are drawn from its first half, the lr is chosen on its second half
    n_test: int = 1000  # test images for probes and few-shot accuracy
    min_count: int = 20  # keep synsets seen >= min_count times (paper: pruned by frequency on DataComp)
    top_k: int = 0  # then keep at most top_k synsets (corenet: 24320); 0 = no cap
    width: int = 128  # ViT width (common.models.vit_tiny)
    layers: int = 4  # ViT depth
    heads: int = 4  # ViT heads
    patch_size: int = 8  # ViT patch size (total stem stride): 8 -> 4x4 tokens at 32 px, cheap enough for 2 CPU cores
    stem: str = "conv"  # conv: CatLIP's conv stem (strides 2-2-2 for patch 8) | patch
    embed_dim: int = 128  # CLIP projection dim (CLIP only)
    text_width: int = 128  # CLIP text tower width (common.models.text_tiny)
    text_layers: int = 3  # CLIP text tower depth
    context_length: int = 32  # CLIP text tokens
    steps: int = 300  # optimizer steps of each pretraining (same samples for CatLIP and CLIP)
    batch_size: int = 128  # global batch (split across ranks)
    lr: float = 1e-3  # AdamW peak lr, both methods (each had its best val probe at 1e-3 of {1e-3, 2e-3}: docs)
    weight_decay: float = 0.2  # AdamW weight decay (CatLIP configs: 0.2)
    warmup: int = 30  # linear warm-up steps
    ema: float = 0.0  # EMA momentum (CatLIP: 5e-4 over 200k steps); 0 = off
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    ckpt_every: int = 25  # checkpoint every N steps (resumable)
    log_every: int = 5  # log every N steps
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    probe_n: int = 2560  # training images (first of the pretraining set) for linear probe / k-NN
    probe_tasks: str = "shape,color"  # main-object attributes probed (mean): shape (class label), color (label_fine)
    knn_k: int = 10  # neighbours for k-NN
    shots: str = "1,2,5,10"  # labelled images per class for Transfer Init
    fewshot_draws: int = 5  # random few-shot draws averaged per shot count
    fewshot_steps: int = 100  # full-batch AdamW steps on the downstream head (both inits)
    fewshot_lrs: str = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2"  # head lr grid; each init keeps its best on few-shot val
    step_repeats: int = 3  # timed forward+backward repeats per method (median)
    bench: bool = True  # run the loss-cost scaling bench at the end of the default run
    bench_batches: str = "256,512,1024,2048,4096"  # global batches for the bench
    bench_vocab: int = 1536  # V for the bench: V/B_max ~ CatLIP's 24320 / 65536
    bench_dim: int = 128  # feature dim D (BCE) and E (contrastive) in the bench
    bench_repeats: int = 2  # timed repeats per point (median)


# --smoke: tiny sizes for every field not given on the command line
SMOKE = dict(n_train=1600, n_val=300, n_test=400, probe_n=800, steps=40, batch_size=64, warmup=4, ckpt_every=20,
             log_every=2, width=64, layers=2, heads=2, min_count=3, text_width=64, text_layers=1, context_length=24,
             fewshot_draws=2, fewshot_steps=30, step_repeats=2, bench_batches="64,256", bench_vocab=128,
             bench_repeats=1)


# ---------------------------------------------------------------------------------------------------------------
# 1. Caption -> synset labels (corenet's wordnet_tagged_classification.py, without nltk)

NOUN_RULES = [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
              ("men", "man"), ("ies", "y")]   # NLTK's noun detachment rules (WordNet morph.c + "ves" -> "f")
TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def clean_caption(s):
    """corenet caption_preprocessing: URL-unquote ('+' -> space), strip HTML tags, newlines, collapse spaces, lower.
    ftfy.fix_text is replaced by html.unescape (its most common repair on alt-texts: &amp; &quot; ...)."""
    s = html.unescape(urllib.parse.unquote_plus(s or ""))
    s = re.sub(r"<.*?>", " ", s)   # " " not "": "a<br>dog" must stay two words
    return re.sub(r"\s+", " ", s).strip().lower()


class WordNet:
    """WordNet 3.x noun database (https://wordnet.princeton.edu/documentation/wndb5wn): standard library only.

    index.noun: `lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset_1 ... offset_n` (sense order);
    data.noun: `offset lex_filenum ss_type w_cnt word_1 lex_id ...` (word_1 = the synset's head lemma);
    noun.exc: `inflected base [base ...]` (irregular plurals)."""

    def __init__(self, root):
        self.name = f"wordnet ({root})"
        path = lambda f: os.path.join(root, f)   # noqa: E731
        for f in ("index.noun", "data.noun", "noun.exc"):
            if not os.path.isfile(path(f)):
                raise FileNotFoundError(f"--wordnet={root!r}: {f} not found; expected a WordNet 3.x dict directory "
                                        "with index.noun, data.noun and noun.exc")
        self.first, self.head, self.exc = {}, {}, {}
        for line in open(path("index.noun"), encoding="utf-8"):
            if line.startswith(" "):   # license header lines start with two spaces
                continue
            f = line.split()
            self.first[f[0]] = int(f[-int(f[2])])           # the first listed offset is sense 1
        for line in open(path("data.noun"), encoding="utf-8"):
            if not line.startswith(" "):
                f = line.split(" ", 5)
                self.head[int(f[0])] = f[4].lower()
        for line in open(path("noun.exc"), encoding="utf-8"):
            f = line.split()
            if len(f) >= 2:
                self.exc[f[0]] = f[1:]

    def morphy(self, form):
        """NLTK WordNetCorpusReader._morphy(form, 'n'): exception list, else the detachment rules once (the form
        itself included), else the rules repeatedly; only forms that are noun lemmas survive."""
        known = lambda forms: list(dict.fromkeys(f for f in forms if f in self.first))   # noqa: E731
        if form in self.exc:
            return known([form] + self.exc[form])
        rules = lambda forms: [f[:-len(o)] + n for f in forms for o, n in NOUN_RULES if f.endswith(o)]   # noqa: E731
        forms = rules([form])
        out = known([form] + forms)
        while not out and forms:
            forms = rules(forms)
            out = known(forms)
        return out

    def lemmatize(self, word):
        """WordNetLemmatizer().lemmatize(word) (pos='n'): the shortest candidate, or the word itself."""
        c = self.morphy(word)
        return min(c, key=len) if c else word

    def key(self, word):
        """corenet's rule: lemma w -> synset w.n.01, kept only if its head lemma is w; key "n{offset}" unpadded."""
        w = self.lemmatize(word)
        off = self.first.get(w)
        return f"n{off}" if off is not None and self.head.get(off) == w else None

    def lemma(self, key):
        return self.head[int(key[1:])]

    def all_keys(self):
        """Every key `key` can return: the fixed index space in which the ranks sum their counts."""
        return sorted(f"n{o}" for w, o in self.first.items() if self.head.get(o) == w)


class WorldLexicon:
    """The world's nouns (common.world.NOUN_FORMS: form -> singular) in WordNet's role, plus its colour and size
    words: WordNet 3.0 tags those as nouns and corenet's rule keeps them (red -> red.n.01; tests/test_catlip.py
    checks the real files), so without them the stand-in would drop the labels easiest to see in an image."""
    name = "world noun lexicon (common.world.NOUNS + COLORS + SIZES)"
    forms = {**NOUN_FORMS, **{w: w for w in COLORS + SIZES}}

    def key(self, word):
        return self.forms.get(word)

    def lemma(self, key):
        return key

    def all_keys(self):
        return sorted(set(self.forms.values()))


def load_lexicon(cfg):
    return WordNet(cfg.wordnet) if cfg.wordnet else WorldLexicon()


def caption_labels(caption, lex):
    """caption -> unique synset keys in order of appearance (non-nouns, words without a synset dropped)."""
    keys = (lex.key(w) for w in TOKEN.findall(clean_caption(caption)))
    return list(dict.fromkeys(k for k in keys if k is not None))


# ---------------------------------------------------------------------------------------------------------------
# 2. Vocabulary

def select_vocab(counts, min_count=1, top_k=0):
    """Counter {key: count} -> keys with count >= min_count, by count (desc, ties by key), at most top_k (0: all)."""
    keys = sorted((k for k, c in counts.items() if c >= min_count), key=lambda k: (-counts[k], k))
    return keys[:top_k] if top_k > 0 else keys


def count_synsets(src, lex, field, dist):
    """-> (Counter, n captions, most synsets in one caption): each rank streams its share once; counts are summed
    in the lexicon's fixed key space (an int64 all-reduce: no dict ever travels)."""
    space = lex.all_keys()
    index = {k: i for i, k in enumerate(space)}
    v, K = np.zeros(len(space) + 1, np.int64), 0   # v[-1] counts the captions
    for s in iter_samples(src, dist.rank, dist.world_size, images=False):
        ks = caption_labels(s[field], lex)         # unique keys: the fancy-indexed += counts each once
        v[[index[k] for k in ks] + [-1]] += 1
        K = max(K, len(ks))
    v, K = all_reduce(v, dist).tolist(), all_reduce(K, dist, "max")
    return Counter({space[i]: m for i, m in enumerate(v[:-1]) if m}), v[-1], int(K)


def source_fingerprint(cfg, field):
    """The config values that decide the training captions (for the stages computed from them)."""
    return {"caption": field, "data": cfg.data, "holdout": cfg.holdout, "n_train": cfg.n_train, "seed": cfg.seed}


def build_vocab(cfg, lex, src, field, dist):
    """vocab.json {lexicon, n_captions, max_labels, entries: [{key, lemma, count}]}: a stage, reused while it holds."""
    path = os.path.join(cfg.out, "vocab.json")
    fp = {**source_fingerprint(cfg, field), "lexicon": lex.name, "min_count": cfg.min_count, "top_k": cfg.top_k}
    if not cfg.retrain and stage_current(path, fp):
        v = json.load(open(path))
        dist.print(f"vocab: reusing {path} ({len(v['entries'])} synsets)")
        return v
    counts, n, K = count_synsets(src, lex, field, dist)
    keys = select_vocab(counts, cfg.min_count, cfg.top_k)
    if not keys:
        raise ValueError(f"vocab: no synset reaches min_count={cfg.min_count} in the {n} {field} captions of "
                         f"{src.name} (lexicon {lex.name}); lower --min_count")
    v = {"lexicon": lex.name, "n_captions": n, "max_labels": K, "n_synsets_seen": len(counts),
         "entries": [{"key": k, "lemma": lex.lemma(k), "count": counts[k]} for k in keys]}
    if dist.is_master:
        save_json(path, v)
        mark_stage(path, fp)
    dist.print(f"vocab: {len(keys)} of {len(counts)} synsets in {n} captions kept (count >= {cfg.min_count}"
               f"{f', top {cfg.top_k}' if cfg.top_k else ''}) -> {path}")
    return v


def constant_loss(p):
    """batch_mean BCE of the best image-blind predictor (sigmoid(b_v) = p_v): sum_v H(p_v), in nats."""
    p = p.clamp(1e-9, 1 - 1e-9)
    return float(-(p * p.log() + (1 - p) * (1 - p).log()).sum())


def synset_targets(caption, lex, index, K):
    """Caption -> (K,) int64 indices of its synsets in the vocabulary ({key: row}), padded with -1. K is the most
    synsets one training caption has (vocab.json max_labels), so every batch stacks to (B, K)."""
    r = [index[k] for k in caption_labels(caption, lex) if k in index][:K]
    return torch.tensor(r + [-1] * (K - len(r)), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# 3. Model: ViT + linear synset head, trained with fused linear + BCE (kernels/bce.py)

class CatLIP(nn.Module):
    """Image encoder + linear head over V synsets -> corenet's "batch_mean" BCE; the B x V logits never exist."""

    def __init__(self, visual, V, prior=None):
        super().__init__()
        self.visual = visual                                   # (B, 3, H, W) -> (B, width), no projection
        self.head = nn.Linear(visual.width, V)
        if prior is not None:
            # deviation from corenet (PyTorch default init): zero weights and bias = log-odds of each synset's caption
            # frequency (RetinaNet's prior init, arXiv:1708.02002 §4.1). The first loss is then exactly the best
            # image-blind loss, and the short miniature runs do not spend their first steps learning frequencies.
            p = prior.clamp(1e-6, 1 - 1e-6)
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():
                self.head.bias.copy_(torch.log(p / (1 - p)))

    def forward(self, x, t):
        """x (B, 3, H, W), t (B, K) synset indices padded with -1 -> scalar loss."""
        return linear_bce(self.visual(x), self.head.weight, self.head.bias, t, reduction="batch_mean")


def make_vit(cfg, embed_dim=None):
    return vit_tiny(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                    heads=cfg.heads, embed_dim=embed_dim, stem=cfg.stem)


class EMA:
    """Weight EMA e <- (1 - m) e + m p after every step (corenet, momentum 5e-4); `step` counts its updates."""

    def __init__(self, model, m):
        self.m, self.step, self.model = m, 0, copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, p in zip(self.model.state_dict().values(), unwrap(model).state_dict().values()):
            e.lerp_(p, self.m) if e.is_floating_point() else e.copy_(p)
        self.step += 1

    def load(self, path, step):
        """The average saved with the checkpoint of `step` (save_weights, {"step": step} in its header)."""
        saved = load_weights(path, self.model).get("step")
        if saved != str(step):
            raise RuntimeError(f"{path} holds the EMA of step {saved}, its checkpoint is at step {step}: reuse and "
                               "--resume need the two files of one run (or --retrain)")
        self.step = step


# ---------------------------------------------------------------------------------------------------------------
# data: streamed sources (common.data). The world's training split is n_train samples, rendered once and cached.

KEEP = ("image", "caption", "alt_text", "label", "label_fine")   # the world fields this script reads (its cache)
TASKS = {"shape": len(SHAPES), "color": len(COLORS)}   # probe tasks: attributes of the main object that captions name


def open_split(cfg, split, n, require=("image",)):
    """train / val (few-shot pool) / test source; eval data never comes from the training stream (open_source)."""
    return open_source(cfg.data, split, world=lambda sp: World(seed=cfg.seed, split=sp, size=cfg.image_size), n=n,
                       val_data=cfg.val_data, holdout=cfg.holdout, require=require, cache=split == "train", keep=KEEP)


def caption_field(src, want):
    """The caption field mined: `want` when the data has it, else "caption" (KEY.txt), with the reason to print."""
    s = next(iter_samples(src, n=1), None)
    if s is None:
        raise ValueError(f"{src.name}: no usable training sample")
    if want in s:
        return want, ""
    if "caption" in s:
        return "caption", f" (the data has no {want!r} field)"
    raise ValueError(f"{src.name}: sample {s['__key__']!r} has no caption; CatLIP mines KEY.txt or {want!r} in "
                     "KEY.json (class folders root/CLASS/*.jpg have none: use image-text shards or captions.jsonl)")


class Prepare:
    """Per-sample transform (in a Stream's workers): image resized, centre-cropped, CLIP-normalised (no augmentation);
    optionally synset targets (CatLIP), tokens (CLIP), a class label < `classes` (evaluation) and, with color=True,
    the main object's colour (label_fine = shape * len(COLORS) + colour, common.world)."""

    def __init__(self, image_size, field, lex=None, keys=(), K=1, tokenizer=None, classes=0, color=False):
        self.image, self.field, self.lex, self.K = eval_transform(image_size), field, lex, max(1, K)
        self.index = {k: i for i, k in enumerate(keys)} if lex is not None else None
        self.tokenizer, self.classes, self.color = tokenizer, classes, color

    def __call__(self, s, g=None):
        out = {"__key__": s["__key__"], "image": self.image(s["image"])}
        if self.index is not None:
            out["targets"] = synset_targets(s[self.field], self.lex, self.index, self.K)
        if self.tokenizer is not None:
            out["tokens"] = self.tokenizer(s[self.field])[0]
        if self.classes:
            out["label"] = y = int(s.get("label", -1))
            if not 0 <= y < self.classes:
                raise ValueError(f"sample {s['__key__']!r}: class label {s.get('label')!r}; the probes and Transfer "
                                 f"Init need one in 0..{self.classes - 1} (KEY.cls or \"label\" in KEY.json)")
        if self.color:
            if "label_fine" not in s:
                raise ValueError(f"sample {s['__key__']!r} has no label_fine: --probe_tasks=color needs it (world "
                                 "samples and their exported shards have it); use --probe_tasks=shape")
            out["color"] = int(s["label_fine"]) % len(COLORS)
        return out


# ---------------------------------------------------------------------------------------------------------------
# training stages (common.train.fit: DDP, autocast, cosine, clipping, atomic safetensors, resume)

def run_stage(cfg, dist, name, model, loss_fn, stream, fp, ema=None):
    """One pretraining (common.train.fit): a finished checkpoint with the same fp is reused, an unfinished one
    continued with --resume, --retrain deletes it; the optional EMA is saved beside it at the same steps."""
    path, ema_path = (os.path.join(cfg.out, f"{name}{s}.safetensors") for s in ("", "_ema"))
    if cfg.retrain and dist.is_master and os.path.isfile(path):
        os.remove(path)
    dist.barrier()

    def ema_step(step, raw, metrics):
        if ema.step != step - 1:   # fit resumed at step - 1: continue from the average saved there
            ema.load(ema_path, step - 1)
        ema.update(raw)
        if dist.is_master and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps):
            save_weights(ema_path, ema.model, {"step": step})

    train = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                        betas=(0.9, 0.999), grad_clip=1.0, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
                        amp=cfg.amp, resume=cfg.resume)
    hist = fit(model, loss_fn, stream, train, cfg.out, name, dist, fingerprint=fp,
               on_step=ema_step if ema is not None else None)
    if ema is not None and hist["reused"]:
        ema.load(ema_path, hist["steps"])
    return hist


def text_tokenizer(cfg, dist, src, field):
    """common.tokenizer.world_tokenizer; if its merges file is missing (or --data is used), learn a small BPE on the
    first 3000 training captions (rank 0), a stage kept in --out (bpe.txt) and reused while they are the same."""
    from common.tokenizer import Tokenizer, learn_bpe, read_merges, save_merges, world_tokenizer
    try:
        if cfg.data:
            raise FileNotFoundError
        return world_tokenizer(cfg.context_length)
    except FileNotFoundError:
        path, fp = os.path.join(cfg.out, "bpe.txt"), {**source_fingerprint(cfg, field), "captions": 3000, "merges": 600}
        if dist.is_master and (cfg.retrain or not stage_current(path, fp)):
            dist.print(f"world tokenizer unavailable: learning 600 BPE merges on the training captions -> {path}")
            save_merges(path, learn_bpe([s[field] for s in iter_samples(src, n=3000, images=False)], 600))
            mark_stage(path, fp)
        dist.barrier()
        return Tokenizer(read_merges(path), context_length=cfg.context_length)


# ---------------------------------------------------------------------------------------------------------------
# 4. evaluation: probes, step time, Transfer Init

@torch.no_grad()
def features(vit, images, device, bs=512):
    """Class-token features after ln_post, before any projection (B, width): the layer probed for both methods."""
    vit.eval()
    return torch.cat([vit.pooled(images[i:i + bs].to(device)).float().cpu() for i in range(0, len(images), bs)])


TASK_FIELD = {"shape": "label", "color": "color"}   # probe task -> the Prepare field holding its label


def probe_tasks(cfg, src):
    """The attributes probed (--probe_tasks); "color" is dropped, with a note, when the data has no label_fine."""
    tasks = [t.strip() for t in cfg.probe_tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"--probe_tasks={cfg.probe_tasks!r}: expected distinct names from {list(TASKS)}")
    if "color" in tasks and "label_fine" not in next(iter_samples(src, n=1, images=False), {}):
        print(f"probe: {src.name} has no label_fine, so the colour is not probed (--probe_tasks={cfg.probe_tasks})")
        tasks.remove("color")
    if not tasks:
        raise ValueError(f"--probe_tasks={cfg.probe_tasks!r}: nothing left to probe on {src.name}; add shape")
    return tasks


def probe_all(cfg, feats, y_train, y_test, y_val, n_classes):
    """Linear probe and k-NN of every model on every task (test, and val for offline choices such as the lr), per
    task chance (1 / C) and test majority-class accuracy, and the means over tasks (what EFFECTS compare)."""
    per = {}
    for t, C in n_classes.items():
        row = {"n_classes": C, "chance": 1.0 / C,
               "majority": float(torch.bincount(y_test[t], minlength=C).max()) / len(y_test[t])}
        for m, (ftr, fte, fval) in feats.items():
            row[f"{m}_linear_probe_acc"] = linear_probe(ftr, y_train[t], fte, y_test[t], num_classes=C)
            row[f"{m}_linear_probe_val_acc"] = linear_probe(ftr, y_train[t], fval, y_val[t], num_classes=C)
            row[f"{m}_knn_acc"] = knn_accuracy(ftr, y_train[t], fte, y_test[t], k=cfg.knn_k)
            row[f"{m}_knn_val_acc"] = knn_accuracy(ftr, y_train[t], fval, y_val[t], k=cfg.knn_k)
        per[t] = row
    mean = lambda key: float(np.mean([r[key] for r in per.values()]))   # noqa: E731
    out = {k: mean(k) for k in next(iter(per.values())) if k != "n_classes"}
    return {**out, "probe_tasks": list(per), "probe": per}


def step_times(cfg, dev, catlip, clip, x, t, tok, repeats):
    """Forward+backward ms of one batch per method (same images and encoder), interleaved repeats, median; no
    optimizer step (it depends only on the parameter count). CPU: this process's CPU time, which other jobs do not
    inflate (wall time under load once put CatLIP 4x above CLIP); CUDA: wall time after a synchronize."""
    clock = time.perf_counter if dev.startswith("cuda") else time.process_time
    ms = {"catlip": [], "clip": []}
    for r in range(repeats + 1):   # repeat 0 warms up (allocator, kernels)
        for name, m in (("catlip", catlip), ("clip", clip)):
            m.zero_grad(set_to_none=True)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            with autocast(dev, cfg.amp):
                loss = m(x, t) if name == "catlip" else clip_loss(*m(x, tok))
            loss.backward()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                ms[name].append(1e3 * (clock() - t0))
    return {k: statistics.median(v) for k, v in ms.items()}, ms


def transfer_rows(classnames, vocab_keys, lex):
    """Class -> CatLIP head row (-1: not in the vocabulary), by the caption words' rule ("hot dog" -> "hot_dog")."""
    index = {k: i for i, k in enumerate(vocab_keys)}
    keys = [lex.key(clean_caption(c).replace(" ", "_")) for c in classnames]
    return [index.get(k, -1) if k is not None else -1 for k in keys]


def init_head(W_rand, b_rand, W_cat, b_cat, rows):
    """Transfer Init: the CatLIP rows of the classes in the vocabulary; a missing class keeps its random row."""
    W, b = W_rand.clone(), b_rand.clone()
    for c, r in enumerate(rows):
        if r >= 0:
            W[c], b[c] = W_cat[r], b_cat[r]
    return W, b


def train_head(W, b, f, y, steps, lr):
    """Full-batch AdamW cross-entropy on frozen features from the given init (the same budget for both inits)."""
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(f @ W.T + b, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


def parse_floats(text, flag):
    try:
        out = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) <= 0:
        raise ValueError(f"--{flag}={text!r}: expected comma-separated positive numbers such as 1e-3,1e-2")
    return out


def few_shot(cfg, f_pool, y_pool, f_test, y_test, head, rows):
    """Transfer Init vs a random head on frozen features, k shots per class, fewshot_draws draws each. Shots come
    from the pool's first half, its second half is the val split; both inits train fewshot_steps on the same shots at
    every lr of the grid, each keeps per k the lr of best mean val accuracy and reports its test accuracy there (the
    test set chooses nothing) -> {"random"/"transfer": {k: acc}, "lr"/"val": {init: {k: ..}}, "transfer_zero_shot"}."""
    C, lrs, half = len(rows), parse_floats(cfg.fewshot_lrs, "fewshot_lrs"), len(f_pool) // 2
    f_val, y_val = f_pool[half:], y_pool[half:]
    acc = lambda W, b, f, y: ((f @ W.T + b).argmax(1) == y).float().mean().item()   # noqa: E731
    Wc, bc = head.weight.detach().float(), head.bias.detach().float()
    out = {"random": {}, "transfer": {}, "lr": {"random": {}, "transfer": {}}, "val": {"random": {}, "transfer": {}}}
    pools = [np.flatnonzero(y_pool[:half].numpy() == c) for c in range(C)]   # a rare class may have < k images
    for k in [int(s) for s in cfg.shots.split(",")]:
        val, test = ({a: np.zeros((len(lrs), cfg.fewshot_draws)) for a in ("random", "transfer")} for _ in "vt")
        for d in range(cfg.fewshot_draws):
            g = np.random.default_rng((cfg.seed, k, d))
            idx = torch.from_numpy(np.concatenate([g.choice(q, min(k, len(q)), replace=False) for q in pools]))
            torch.manual_seed(cfg.seed * 1000 + d)
            lin = nn.Linear(f_pool.shape[1], C)                    # the random head (PyTorch default init)
            W0, b0 = lin.weight.detach(), lin.bias.detach()
            inits = {"random": (W0, b0), "transfer": init_head(W0, b0, Wc, bc, rows)}
            for arm, (Wi, bi) in inits.items():
                for j, lr in enumerate(lrs):
                    W, b = train_head(Wi, bi, f_pool[idx], y_pool[idx], cfg.fewshot_steps, lr)
                    val[arm][j, d], test[arm][j, d] = acc(W, b, f_val, y_val), acc(W, b, f_test, y_test)
        for arm in ("random", "transfer"):
            j = int(val[arm].mean(1).argmax())
            out[arm][str(k)], out["lr"][arm][str(k)] = float(test[arm][j].mean()), lrs[j]
            out["val"][arm][str(k)] = val[arm].mean(1).tolist()
    Wt, bt = init_head(torch.zeros(C, f_pool.shape[1]), torch.zeros(C), Wc, bc, rows)
    out["transfer_zero_shot"] = acc(Wt, bt, f_test, y_test) if min(rows) >= 0 else None   # the head as is
    return out


# ---------------------------------------------------------------------------------------------------------------
# 6. loss-cost scaling: BCE over V vs contrastive with all-gather, on the process group

def _bench_points(cfg, dist):
    """Per global batch G: median ms of head+loss forward+backward on each rank (B = G / W rows per rank).
    BCE: linear_bce over (V, D) + the all-reduce of the head gradient that DDP adds (O(V D), independent of B).
    Contrastive: clip_loss on (B, E) features: all-gather of both towers' features, (B, G) logits both ways."""
    V, D, W, dev = cfg.bench_vocab, cfg.bench_dim, dist.world_size, dist.device
    g = torch.Generator().manual_seed(cfg.seed + dist.rank)
    Wh = (0.02 * torch.randn(V, D, generator=g)).to(dev).requires_grad_(True)
    bh = torch.zeros(V, device=dev, requires_grad=True)
    rows = []
    for G in [int(s) for s in cfg.bench_batches.split(",")]:
        B = max(1, G // W)
        x = torch.randn(B, D, generator=g).to(dev).requires_grad_(True)
        t = torch.randint(0, V, (B, 6), generator=g).to(dev)      # a handful of synsets per caption
        fi, ft = (torch.randn(B, D, generator=g).to(dev).requires_grad_(True) for _ in range(2))   # fi, then ft
        res = {}
        for name in ("bce", "contrastive"):
            ts = []
            for r in range(cfg.bench_repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if name == "bce":
                    linear_bce(x, Wh, bh, t).backward()
                    Wh.grad, bh.grad = all_reduce(Wh.grad, dist), all_reduce(bh.grad, dist)   # what DDP adds
                else:
                    clip_loss(F.normalize(fi, dim=-1), F.normalize(ft, dim=-1), 100.0).backward()
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                dist.barrier()
                if r:
                    ts.append(1e3 * (time.perf_counter() - t0))
                for p in (x, Wh, bh, fi, ft):
                    p.grad = None
            res[name] = statistics.median(ts)
        rows.append({"global_batch": G, "bce_ms": res["bce"], "contrastive_ms": res["contrastive"],
                     "ratio": res["contrastive"] / res["bce"]})
        dist.print(f"bench G={G:5d}: bce {res['bce']:8.1f} ms  contrastive {res['contrastive']:8.1f} ms  "
                   f"contrastive/bce {rows[-1]['ratio']:.2f}")
    return {"world_size": W, "V": V, "D": D, "points": rows}


def _bench_worker(rank, world, port, cfg_dict, q_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)   # 2 processes share 2 cores
    cfg = Config(**cfg_dict)
    dist = setup_distributed(cfg.device)
    res = _bench_points(cfg, dist)
    if dist.is_master:
        save_json(q_path, res)
    dist.cleanup()


def run_bench(cfg, dist):
    """Inside torchrun: on the existing group. Alone: spawn 2 gloo processes on this machine."""
    if dist.distributed:
        return _bench_points(cfg, dist)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(cfg.out, "bench.tmp.json")
    d = {k: v for k, v in config_to_dict(cfg).items() if k != "_command"}
    torch.multiprocessing.spawn(_bench_worker, args=(2, port, d, path), nprocs=2, join=True)
    res = json.load(open(path))
    os.remove(path)
    return res


# ---------------------------------------------------------------------------------------------------------------
# outputs: losses from log.jsonl, plots (common.plot), the results table with its verdicts

def final_loss(out, run, n=5):
    """Mean of the last n logged training losses of a run (log.jsonl)."""
    return float(np.mean(read_losses(out, run)[1][-n:]))


def read_losses(out, run):
    rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if x.strip()]
    rows = [r for r in rows if r.get("run") == run]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def plot_bench(cfg, res):
    P = res["points"]
    G = [p["global_batch"] for p in P]
    line_plot(os.path.join(cfg.out, "bench.png"), [panel(
        f"head + loss, forward + backward, {res['world_size']} processes",
        {f"BCE over V={res['V']} (+ head grad all-reduce)": (G, [p["bce_ms"] for p in P], (200, 60, 40)),
         "contrastive (all-gather, B x G logits)": (G, [p["contrastive_ms"] for p in P], (40, 80, 200))},
        "global batch", "ms", logx=True, logy=True)])


def plot_runs(cfg, r):
    series = {}
    for run, col in (("catlip", (200, 60, 40)), ("clip", (40, 80, 200))):
        s, l = read_losses(cfg.out, run)
        if s:
            series[f"{run} loss / first logged"] = (s, [v / l[0] for v in l], col)
    if series:
        line_plot(os.path.join(cfg.out, "loss.png"), [panel("training loss (relative)", series, "step",
                                                            "loss / loss0")])
    shots = [int(k) for k in r["transfer_init_acc"]]
    line_plot(os.path.join(cfg.out, "transfer_init.png"), [panel(
        "few-shot classification (frozen CatLIP encoder)",
        {"Transfer Init (CatLIP rows)": (shots, list(r["transfer_init_acc"].values()), (200, 60, 40)),
         "random head": (shots, list(r["random_init_acc"].values()), (90, 90, 90))},
        "labelled images per class", "test acc", logx=True)])


PAPER_PROBE = ("IN-1k top-1 after fine-tuning: CatLIP 84.3 vs CLIP 84.4 (ViT-B/16), 86.7 vs 86.9 (ViT-H/16), "
               "2.7x faster pretraining (CatLIP intro table)")
PAPER_TI = "Transfer Init helps most with little labelled data (CatLIP §4; not re-verified)"
REPR_BAR = lambda r: max(2 * r["chance"], r["majority"] + 0.15)   # noqa: E731  (issue #18 item 2)

# The expected effects (common.seeds: d = sign * (a - b) + margin per seed, shown when mean d > 2 SE over seeds).
# The probes are the mean over the probed attributes (shape and colour of the main object); results.json has each.
EFFECTS = [
    *[e for m, key in (("linear probe", "linear_probe_acc"), ("k-NN", "knn_acc")) for e in (
        Effect(f"CatLIP {m} within 3 pts of CLIP", f"catlip_{key}", f"clip_{key}", paper=PAPER_PROBE, margin=0.03),
        Effect(f"CatLIP {m} > CLIP", f"catlip_{key}", f"clip_{key}", paper="not claimed (on par)"))],
    *[Effect(f"Transfer Init > random head, {k} shot{'s' if k > 1 else ''}", f"transfer_init_acc.{k}",
             f"random_init_acc.{k}", paper=PAPER_TI, note="frozen encoder, lr per init chosen on few-shot val")
      for k in (1, 2, 5, 10)],
    Effect("CatLIP fwd+bwd step cheaper than CLIP (same batch)", "catlip_step_ms", "clip_step_ms", sign=-1,
           paper="2.7x faster pretraining (abstract)", note="CPU ms on CPU"),
    Effect("contrastive/BCE head+loss cost > 1 at the largest batch", "bench_ratio_max_batch", 1.0,
           paper="no pairwise similarities, no all-gather (abstract)"),
    *[Effect(f"{m} probe >= max(2 chance, majority + .15)", f"{m.lower()}_linear_probe_acc", REPR_BAR,
             paper="(representation check, #18 item 2)") for m in ("CatLIP", "CLIP")],
    # stricter than the bar: the colour is linearly readable even from random conv features, so each pretraining
    # must also beat its own untrained encoder (the common init) on the same probe
    *[Effect(f"{m} probe > untrained encoder", f"{m.lower()}_linear_probe_acc", "untrained_linear_probe_acc",
             paper="(representation check, added)") for m in ("CatLIP", "CLIP")],
]


def report(r):
    """The results table, then each expected effect on this run: yes / NO (d > 0), or n/a (Transfer Init with no
    class in the vocabulary; the bench ratio without the bench). `--seeds` gives the verdicts (mean d > 2 SE)."""
    print_table({k: v for k, v in r.items() if k not in ("bench", "probe", "fewshot_val_acc")},
                title="CatLIP vs CLIP (results.json)")
    print("expected effects (this seed; d = sign * (a - b) + margin):")
    for e in EFFECTS:
        try:
            a, b = float(lookup(r, e.a)), (e.b(r) if callable(e.b) else e.b if not isinstance(e.b, str)
                                           else float(lookup(r, e.b)))
        except KeyError:
            a = b = float("nan")
        d = e.sign * (a - b) + e.margin
        na = (e.a.startswith("transfer_init") and not r.get("transfer_classes_in_vocab")) or not math.isfinite(d)
        print(f"  [{'n/a' if na else 'yes' if d > 0 else 'NO '}] {e.name}: {a:.4g} vs {b:.4g} (d {d:+.4f})")


# ---------------------------------------------------------------------------------------------------------------
# main

def main(argv=None):
    cfg = parse_config(Config, argv, commands=COMMANDS, presets={"smoke": SMOKE})
    if cfg.seeds:
        return run_seeds(main, argv, cfg, EFFECTS)
    command = getattr(cfg, "_command", None) or "run"
    t_start = time.time()
    dist = setup_distributed(cfg.device)
    dev = dist.device
    seed_all(cfg.seed, dist.rank)
    if dist.is_master:
        os.makedirs(cfg.out, exist_ok=True)
        save_json(os.path.join(cfg.out, "config.json"), cfg)
    if command == "bench":
        res = run_bench(cfg, dist)
        if dist.is_master:
            save_json(os.path.join(cfg.out, "bench.json"), res)
            plot_bench(cfg, res)
        dist.cleanup()
        return res

    # ---- 1-2. labels and vocabulary, over the training source only
    lex = load_lexicon(cfg)
    field, why = caption_field(open_split(cfg, "train", cfg.n_train), cfg.caption)
    train_src = open_split(cfg, "train", cfg.n_train, require=("image", field))
    dist.print(f"lexicon: {lex.name}; captions: {field}{why}; training data: {train_src.name}")
    vocab = build_vocab(cfg, lex, train_src, field, dist)
    keys = [e["key"] for e in vocab["entries"]]
    V, K = len(keys), vocab["max_labels"]
    if command == "vocab":
        if dist.is_master:
            print_table({f"{e['lemma']} ({e['key']})": e["count"] for e in vocab["entries"][:30]},
                        title=f"vocab: {V} synsets (top 30 by count)")
        dist.cleanup()
        return vocab
    B = cfg.batch_size
    if B % dist.world_size:
        raise ValueError(f"--batch_size={B} must be divisible by the world size {dist.world_size}")

    # evaluation sets (rank 0, one pass each): the few-shot pool and the test set from their own sources; the probes'
    # training images are the first probe_n of the training source
    val_src, test_src = open_split(cfg, "val", cfg.n_val), open_split(cfg, "test", cfg.n_test)
    names = class_names_of(test_src, default=None if cfg.data else SHAPES)
    tasks = probe_tasks(cfg, test_src)
    if dist.is_master:
        ev = Prepare(cfg.image_size, field, classes=len(names), color="color" in tasks)
        probe = read_samples(train_src, cfg.probe_n, Prepare(cfg.image_size, field, lex, keys, K, classes=len(names),
                                                             color="color" in tasks))
        pool, test = read_samples(val_src, cfg.n_val, ev), read_samples(test_src, cfg.n_test, ev)
        covered = float((stack(probe, "targets")[:, 0] >= 0).float().mean())
        dist.print(f"targets: {V} synsets, <= {K} per caption, {covered:.1%} of the first {len(probe)} training "
                   f"captions have >= 1; eval: {len(pool)} few-shot pool ({pool.name}), {len(test)} test "
                   f"({test.name}), {len(names)} classes; probed attributes: {', '.join(tasks)}")

    # ---- 3. CatLIP pretraining
    # the config values that change a pretraining's result (common.train.fit reuses a finished stage while they hold)
    arch = {**source_fingerprint(cfg, field), **{k: getattr(cfg, k) for k in (
        "image_size", "width", "layers", "heads", "patch_size", "stem", "steps", "batch_size", "lr", "weight_decay",
        "warmup")}}
    torch.manual_seed(cfg.seed)
    prior = torch.tensor([e["count"] for e in vocab["entries"]], dtype=torch.float32) / vocab["n_captions"]
    catlip = CatLIP(make_vit(cfg), V, prior).to(dev)

    def stream(name, prep, field_out):
        """CatLIP's and CLIP's streams share source, seed and batch size: the same samples in the same order."""
        return Stream(train_src, B // dist.world_size, prep, seed=cfg.seed, num_workers=cfg.num_workers, dist=dist,
                      name=name, post=lambda b: (b["image"], b[field_out]))

    s_cat = stream("catlip", Prepare(cfg.image_size, field, lex, keys, K), "targets")
    ema = EMA(catlip, cfg.ema) if cfg.ema > 0 else None
    h_cat = run_stage(cfg, dist, "catlip", catlip, lambda m, b: m(*b), s_cat,
                      {**arch, "stage": "catlip", "vocab": keys, "ema": cfg.ema}, ema)
    s_cat.close()

    # ---- 4. CLIP on the same images, captions and steps
    tokenizer = text_tokenizer(cfg, dist, train_src, field)
    torch.manual_seed(cfg.seed)
    clip = CLIP(make_vit(cfg, cfg.embed_dim), text_tiny(tokenizer.vocab_size, cfg.context_length, cfg.text_width,
                                                        cfg.text_layers, embed_dim=cfg.embed_dim)).to(dev)

    def clip_step(m, b):
        img_f, txt_f, s = m(*b)
        return clip_loss(img_f, txt_f, s), {"scale": float(s.detach())}

    s_clip = stream("clip", Prepare(cfg.image_size, field, tokenizer=tokenizer), "tokens")
    h_clip = run_stage(cfg, dist, "clip", clip, clip_step, s_clip,
                       {**arch, "stage": "clip", "embed_dim": cfg.embed_dim, "vocab_size": tokenizer.vocab_size,
                        **{k: getattr(cfg, k) for k in ("text_width", "text_layers", "context_length")}})
    s_clip.close()

    # step time: same batch (this rank's first training samples), same image encoder, forward + backward, on every
    # rank at once (under torchrun CLIP's time then includes its feature all-gathers; CatLIP's loss has no collective)
    tb = read_samples(train_src, B // dist.world_size, Prepare(cfg.image_size, field, lex, keys, K, tokenizer),
                      dist.rank, dist.world_size)
    x, t, tk = (stack(tb, k).to(dev) for k in ("image", "targets", "tokens"))
    med, _ = step_times(cfg, dev, copy.deepcopy(catlip).train(), copy.deepcopy(clip).train(), x, t, tk,
                        cfg.step_repeats)
    data = data_report([s_cat, s_clip], [pool, test] if dist.is_master else [], dist)   # collective
    results = {}
    if dist.is_master:
        vis_cat = (ema.model if ema is not None else catlip).visual

        # linear probe + k-NN per probed attribute (pooled features of the same layer), and the mean over them; the
        # untrained encoder (CatLIP's and CLIP's common init) is the floor a pretraining has to beat
        torch.manual_seed(cfg.seed)
        vis0 = make_vit(cfg).to(dev)
        xtr, xte, xpool = stack(probe, "image"), stack(test, "image"), stack(pool, "image")
        feats = {m: (features(v, xtr, dev), features(v, xte, dev), features(v, xpool, dev))
                 for m, v in (("catlip", vis_cat), ("clip", clip.visual), ("untrained", vis0))}
        yte, ypool = stack(test, "label"), stack(pool, "label")
        ys = [{t: stack(x, TASK_FIELD[t]) for t in tasks} for x in (probe, test, pool)]
        probes = probe_all(cfg, feats, *ys, {t: len(names) if t == "shape" else TASKS[t] for t in tasks})
        C = len(names)

        # ---- 5. Transfer Init on the class task (classes = synsets of the class names)
        rows = transfer_rows(names, keys, lex)
        head = (ema.model if ema is not None else catlip).head
        fs = few_shot(cfg, feats["catlip"][2], ypool, feats["catlip"][1], yte, head, rows)
        results = {**probes, "catlip_step_ms": med["catlip"], "clip_step_ms": med["clip"],
                   "transfer_init_acc": fs["transfer"], "random_init_acc": fs["random"],
                   "transfer_init_zero_shot_acc": fs["transfer_zero_shot"], "fewshot_lr": fs["lr"],
                   "fewshot_val_acc": fs["val"], "fewshot_chance": 1.0 / C, "vocab_size": V,
                   "majority_class_acc": float(torch.bincount(yte, minlength=C).max()) / len(yte),
                   "lexicon": lex.name, "captions": field, "label_coverage": covered,
                   "transfer_classes_in_vocab": sum(r >= 0 for r in rows), "n_classes": C,
                   "samples_seen": cfg.steps * B, "catlip_train_s": h_cat["seconds"], "clip_train_s": h_clip["seconds"],
                   # chance levels of the two training losses: image-blind synset frequencies, uniform over the batch
                   "catlip_final_loss": final_loss(cfg.out, "catlip"), "catlip_constant_loss": constant_loss(prior),
                   "clip_final_loss": final_loss(cfg.out, "clip"), "clip_chance_loss": math.log(B), "data": data}

    # ---- 6. loss-cost scaling
    results["bench_ratio_max_batch"] = float("nan")   # n/a without the bench
    if cfg.bench:
        res = run_bench(cfg, dist)
        if dist.is_master:
            results["bench"] = res
            results["bench_ratio_max_batch"] = res["points"][-1]["ratio"]
            plot_bench(cfg, res)
    if dist.is_master:
        results.update(seconds=time.time() - t_start, device=dev, world_size=dist.world_size)
        save_json(os.path.join(cfg.out, "results.json"), results)
        plot_runs(cfg, results)
        report(results)
    dist.cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
