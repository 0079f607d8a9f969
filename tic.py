"""TiC-CLIP: continual training of CLIP on time-ordered data, in miniature.

Paper: Garg, Farajtabar, Pouransari, Vemulapalli, Mehta, Tuzel, Shankar, Faghri. "TiC-CLIP: Continual Training of
CLIP Models", ICLR 2024, arXiv:2310.16226. Official code: apple/ml-tic-clip (patches on DataComp / open_clip).

Web data keeps arriving. At every time step t a new slice D_t lands and we may spend a fixed compute budget C
(samples seen) to update the model. The paper compares (Table 1 / sec. 3):

    Restart            random init, train on D_1..D_t                          budget C (default: at t = T only)
    Sequential         warm start from theta_{t-1}, train on D_t only           budget C
    Cumulative-All     warm start, D_1 u ... u D_t sampled uniformly            budget C
    Cumulative-Exp     warm start, D_t + a buffer of |D| old samples: 1/2 from t-1, 1/4 from t-2, ...
    Cumulative-Equal   warm start, D_t + a buffer of |D| old samples split equally over 1..t-1
    Oracle             random init, all data D_1..D_T, budget T*C, once at the final step
    (LwF               Sequential + distillation to theta_{t-1}'s image-text logits; optional)

Warm starts load the previous weights only: a fresh optimizer and a fresh cosine schedule without warm-up (the
official `--new_run --warmup 0`). Every checkpoint is evaluated on every time step's held-out split, giving the
T x T time matrix E[i, j] (model after step i, data of step j) for retrieval (mean of image->text and text->image
R@1, DataComp's `mean_recall@1`) and zero-shot classification. Summaries (sec. 2.3): in-distribution = mean of the
diagonal, backward transfer = mean below it (old data), forward transfer = mean above it (future data), and the
final-step average (last row).

The embedded synthetic world drifts over its years (common/world.py): `heart` exists from 2018, `pink` from 2019,
`moon` from 2020, and shape/colour/texture frequencies shift smoothly. A model that stopped in 2016 has never seen
a heart. tic's world drifts 4x as strongly as the shared one (--drift, common.world's drift_scale: every
log-frequency trend x 4), so that concepts frequent early (circle, red, plain backgrounds) fade by 2022 and
backward transfer measures forgetting, as TiC-DataComp's years do. Fixed from the official scripts: cumulative data
lists are built in Python (their bash loop `{2017..$year}` never expands and silently trains on a literal path).

Data: every run trains from a common.data Stream over its strategy's data, a source built from the time steps'
sources that holds no samples itself: indices into the world's (or image folders') time steps, or, on tar shards, a
stream of the steps' shards that keeps a replay buffer's samples by a hash of their key. Each time step's eval set
comes from its held-out split ({split} in --data, --val_data, or --holdout by key hash). Every run (strategy, time
step) is one checkpoint in --out, reused by a later invocation while its fingerprint (the settings that change it,
including the run it warm-starts from) matches: Step 1 and Restart survive a change of the warm-start lr.

--warm_start=FILE.safetensors (an open_clip / OpenAI ViT CLIP of any size) makes that checkpoint time step 1: it is
not trained, every run starts from it (Restart and Oracle too; all at --warm_lr), and images and text reach it at its
own image size, context length and tokenizer (--bpe: CLIP's merges file), with open_clip's normalised preprocessing.

    python tic.py                    # default run: 4 time steps x 6 strategies (about 3.5 CPU-minutes at 1 thread)
    python tic.py --smoke            # the same pipeline at tiny sizes (< 30 s CPU)
    python tic.py --seeds=0,1,2      # the default per seed -> seeds.json, sweep.png, a verdict per EFFECTS entry
    python tic.py --strategies=sequential,cumulative_all --steps=200
    python tic.py --data=/data/tic   # one sub-folder of tar shards per time step (sorted), or shards whose
                                     # KEY.json has a "year" field, grouped by --time_steps
    python tic.py --data='/data/tic/{split}' --n_train=1000000   # {split}/STEP/*.tar; n_train = |D| sizes buffers
    torchrun --nproc_per_node=2 tic.py --smoke
    python tic.py --warm_start=ViT-B-16.safetensors --bpe=bpe_simple_vocab_16e6.txt.gz --data=/data/tic
                                     # time step 1 = that open_clip checkpoint (not trained); every run starts from it
"""
import copy
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from glob import glob

import numpy as np
import torch

from common.config import config_to_dict, parse_config, print_table, run_cli, save_json
from common.data import ShardSource, Stream, class_names_of, data_report, key_hash, open_source, read_samples, stack
from common.eval import extract_features, linear_probe, retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from common.losses import clip_loss, distill_kl, fp32_logits
from common.models import CLIP, TextTransformer, VisionTransformer, load_clip_checkpoint
from common.plot import heatmaps, line_plot, panel
from common.tokenizer import tokenizer_for, world_tokenizer
from common.train import TrainConfig, file_id, fit, load_weights, seed_all, start_run, unwrap
from common.transforms import eval_transform, train_transform
from common.seeds import Effect, run_seeds
from common.world import TEMPLATES, TEXTURES, World, class_names, main_object

STRATEGIES = ["restart", "sequential", "cumulative_all", "cumulative_exp", "cumulative_equal", "oracle", "lwf"]


@dataclass
class Config:
    """TiC-CLIP in miniature: time-continual CLIP training strategies under a fixed per-step budget."""
    out: str = "runs/tic"  # output folder (created if missing)
    seed: int = 0  # world, init, data order and augmentation all follow from it
    seeds: str = ""  # e.g. 0,1,2: the default experiment once per seed -> seeds.json, sweep.png and a verdict per
    # expected effect (common/seeds.py)
    data: str = ""  # real data: a folder with one sub-folder of shards per time step, or shards with a json "year"
    val_data: str = ""  # eval data (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    device: str = ""  # cpu | cuda (default: cuda if available)
    time_steps: str = "2014-2016,2017-2018,2019-2020,2021-2022"  # year groups, one per time step
    strategies: str = "restart,sequential,cumulative_all,cumulative_exp,cumulative_equal,oracle"  # also: lwf
    restart_rows: str = "last"  # last: Restart trains only at the final step (what its effect reads) | all: every step
    steps: int = 150  # per-time-step budget C in optimizer steps (samples = steps * batch_size); Oracle gets T*C
    batch_size: int = 64  # global batch (split over torchrun ranks)
    lr: float = 5e-4  # peak learning rate of runs from random init: step 1 (chosen on its val split) and any
    # from-scratch strategy --strategy_lr does not name (AdamW, cosine to 0 within every time step)
    warm_lr: float = 5e-4  # peak learning rate after a warm start (0 -> lr, the paper's rule; docs/tic.md: why)
    strategy_lr: str = ("restart=1e-3,oracle=3.33e-4,sequential=5e-4,cumulative_all=5e-4,cumulative_exp=5e-4,"
                        "cumulative_equal=5e-4")  # per-strategy peak lr "name=lr,..." chosen on the val split
    # (docs/tic.md); a strategy not named takes lr / warm_lr; ignored under --warm_start (all runs at --warm_lr)
    weight_decay: float = 0.1  # decoupled weight decay
    warmup: int = 15  # warm-up steps for runs from random init (Restart, Oracle, step 1)
    warm_start_warmup: int = 0  # warm-up steps after a warm start (the official scripts pass --warmup 0)
    n_train: int = 2000  # training pairs per time step (|D_t|); --data trains on all, n_train sizes the buffers
    n_eval: int = 300  # held-out pairs per time step (test; and as many val pairs for lr selection and the probe)
    buffer: int = 0  # old-data buffer size for cumulative_exp/equal (0 -> n_train, i.e. |D|)
    lwf_weight: float = 1.0  # weight of the distillation term of the lwf strategy
    image_size: int = 32  # the world renders at this size
    drift: float = 4.0  # the world's drift strength: every shape/colour/texture log-frequency trend x this
    # (common.world drift_scale; 1: the world the other scripts share; docs/tic.md: why tic's is stronger)
    patch_size: int = 8  # 32/8 -> 4x4 patch tokens: a cheap image tower
    width: int = 96  # ViT width
    layers: int = 3  # ViT depth
    text_width: int = 64  # text transformer width
    text_layers: int = 2  # text transformer depth
    context_length: int = 32  # text context length
    embed_dim: int = 64  # joint embedding size
    caption: str = "caption"  # caption | alt_text
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    retrain: bool = False  # train every run again (else a finished checkpoint with the same fingerprint is reused)
    resume: bool = False  # continue an unfinished run from its last checkpoint (see --ckpt_every)
    ckpt_every: int = 0  # checkpoint every N steps within a run (0: at its end only)
    log_every: int = 50  # log.jsonl row + printed line every N steps
    smoke: bool = False  # tiny run for tests
    warm_start: str = ""  # open_clip / OpenAI ViT CLIP .safetensors as time step 1's model (not trained; docs/tic.md)
    bpe: str = ""  # --warm_start: CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) for its tokenizer (else world's)
    quick_gelu: str = "auto"  # --warm_start: auto (QuickGELU for OpenAI-format keys) | true | false
    vision_heads: int = 0  # --warm_start: image-tower heads (0: width // 64; ViT-H/g/bigG-14 need 16)


SMOKE = dict(steps=30, n_train=400, n_eval=100, batch_size=32, warmup=5, width=64, layers=2, text_width=64,
             text_layers=1, embed_dim=64, log_every=10, time_steps="2014-2016,2017-2019,2020-2022")

# fields that change every run's checkpoint; each run's fingerprint adds its data, lr, warm-up and init (main)
TRAIN_KEYS = ["seed", "data", "val_data", "holdout", "time_steps", "steps", "batch_size", "weight_decay", "n_train",
              "image_size", "patch_size", "width", "layers", "text_width", "text_layers", "context_length",
              "embed_dim", "caption"]
MODEL_KEYS = ["patch_size", "width", "layers", "text_width", "text_layers", "context_length", "embed_dim"]  # miniature


# -----------------------------------------------------------------------------
# model: a small CLIP (ViT on patch tokens + text transformer)

def build_model(cfg, vocab_size):
    visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width,
                               layers=cfg.layers, heads=max(1, cfg.width // 32), embed_dim=cfg.embed_dim)
    text = TextTransformer(vocab_size=vocab_size, context_length=cfg.context_length, width=cfg.text_width,
                           layers=cfg.text_layers, heads=max(1, cfg.text_width // 32), embed_dim=cfg.embed_dim)
    return CLIP(visual, text)


def load_warm_start(cfg):
    """--warm_start: (the checkpoint's CLIP on the CPU, its tokenizer, the fingerprint entry of the checkpoint).

    The architecture (sizes, image size, context length) comes from the file's shapes (common.models); the tokenizer is
    CLIP's BPE from --bpe, else the world's when the checkpoint's vocabulary is exactly the world's. A missing,
    truncated or mismatched file raises common.convert.CheckpointError naming it (one line from run_cli)."""
    qg = {"auto": None, "true": True, "false": False}[cfg.quick_gelu]
    model = load_clip_checkpoint(cfg.warm_start, quick_gelu=qg, vision_heads=cfg.vision_heads or None)
    tok = tokenizer_for(model.text.vocab_size, model.text.context_length, cfg.bpe, f"--warm_start {cfg.warm_start}")
    fp = {"warm_start": os.path.abspath(cfg.warm_start), **file_id(cfg.warm_start),
          "bpe": os.path.abspath(cfg.bpe) if cfg.bpe else "world", "quick_gelu": model.config["quick_gelu"],
          "vision_heads": model.config["vision_heads"]}
    return model, tok, fp


# -----------------------------------------------------------------------------
# time-continual data: per time step a training source and a held-out eval source

def parse_time_steps(spec):
    """'2014-2016,2017,2018-2019' -> [[2014, 2015, 2016], [2017], [2018, 2019]]."""
    groups = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise SystemExit(f"config error: --time_steps={spec!r}: {part!r} is not a year or a year range")
        if hi < lo:
            raise SystemExit(f"config error: --time_steps={spec!r}: range {part!r} is empty")
        groups.append(list(range(lo, hi + 1)))
    return groups


def step_sources(cfg, groups, split):
    """Per time step (name, source of `split`, its years in a year-tagged stream or None).

    The world: World(years=...) per year group. --data: a folder with one sub-folder per time step (sorted; each
    opened like --data, so {split}, --val_data and --holdout apply per sub-folder), else tar shards whose json "year"
    is grouped by --time_steps."""
    def opened(data, val_data="", years=None):
        return open_source(data, split, world=lambda sp: World(cfg.seed, sp, cfg.image_size, years=years,
                                                                   drift_scale=cfg.drift),
                           n=cfg.n_train if split == "train" else cfg.n_eval, val_data=val_data, holdout=cfg.holdout,
                           require=("image", cfg.caption),
                           keep=("image", cfg.caption, "label") + (() if cfg.data else ("objects", "texture")))
    if not cfg.data:
        return [(f"{ys[0]}-{ys[-1]}", opened("", years=ys), None) for ys in groups]
    root = cfg.data.replace("{split}", "train")
    subdirs = [] if not os.path.isdir(root) or glob(os.path.join(root, "*.tar")) else \
        sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if subdirs:
        return [(d, opened(os.path.join(cfg.data, d), cfg.val_data and os.path.join(cfg.val_data, d)), None)
                for d in subdirs]
    src = opened(cfg.data, cfg.val_data)
    if not isinstance(src, ShardSource):
        raise ValueError(f"--data {cfg.data!r}: tic.py needs each sample's time step: one sub-folder per time step, "
                         "or tar shards whose KEY.json has a 'year'")
    return [(f"{ys[0]}-{ys[-1]}", src, ys) for ys in groups]


class Pool:
    """Map-style data over time steps (the world, image folders): part (step s, source, fraction) contributes a fixed
    random subset of round(fraction * len) indices per (seed, s), so a replay buffer is the same samples at every
    later step. Holds (source, index) pairs only."""

    def __init__(self, parts, seed=0):
        self.name = " + ".join(f"{src.name}[{f:.2f}]" for _, src, f in parts)
        self.items = [(src, int(i)) for s, src, f in parts
                      for i in np.random.default_rng([seed, 7, s]).permutation(len(src))[:round(f * len(src))]]

    def __len__(self):
        return len(self.items)

    def key(self, i):
        return self.items[i][0].key(self.items[i][1])

    def decode(self, i):
        return self.items[i][0].decode(self.items[i][1])


class Mixture(ShardSource):
    """Tar shards over time steps: part (source, keep) contributes the samples whose replay hash (of seed and key)
    is below keep, a fraction or, on a stream whose json "year" gives the step, {year: fraction}. A buffer is thus
    chosen by key: the same samples at every later step, never held in memory. A consumer interleaves its share of
    the parts at random, weighted by shards x fraction, so every kept sample is read once per epoch."""

    def __init__(self, parts, seed=0):
        super().__init__([u for src, _ in parts for u in src.urls], require=parts[0][0].require)
        self.parts, self.seed, self.name = parts, seed, " + ".join(f"{src.name}[{k}]" for src, k in parts)

    def raw(self, epoch, c, T, seed, shuffle):
        its = [self._kept(src, src.raw(epoch, c, T, seed + j, shuffle), k) for j, (src, k) in enumerate(self.parts)]
        w = [len(src.urls) * (k if isinstance(k, float) else 1.0) for src, k in self.parts]
        rng = np.random.default_rng([seed, epoch, c, 5])
        while its:
            j = int(rng.choice(len(its), p=np.divide(w, sum(w))))
            item = next(its[j], None)
            if item is None:
                del its[j], w[j]
            else:
                yield item

    def _kept(self, src, items, keep):
        src.report = self.report  # the consumer's skip counter
        for key, members in items:
            try:
                f = keep.get(int(json.loads(members["json"])["year"]), 0.0) if isinstance(keep, dict) else keep
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{src.name}: sample {key!r} has no 'year' in its .json; tic.py needs one, or one "
                                 "sub-folder of shards per time step") from None
            if f >= 1.0 or key_hash(f"{self.seed}/{key}") < f * 2.0**63:
                yield key, members


def one_source(parts, fractions, seed=0):
    """{step: fraction} of the per-step (name, source, years) parts as one source (Pool or Mixture)."""
    steps = sorted(fractions)
    if parts[0][2] is not None:  # one year-tagged stream: each step's years at the step's fraction
        return Mixture([(parts[0][1], {y: fractions[s] for s in steps for y in parts[s][2]})], seed)
    if isinstance(parts[0][1], ShardSource):
        return Mixture([(parts[s][1], float(fractions[s])) for s in steps], seed)
    return Pool([(s, parts[s][1], fractions[s]) for s in steps], seed)


# -----------------------------------------------------------------------------
# replay buffers: which old samples each strategy trains on at step t (paper sec. 3, Table 1)

def replay_counts(strategy, t, buffer):
    """Old samples per earlier step for a strategy at 0-based step t -> {step: count}.

    cumulative_exp: half the buffer from t-1, a quarter from t-2, ..., the oldest step takes what is left, so the
    counts sum to `buffer`. cumulative_equal: the buffer split equally over steps 0..t-1 (remainder to the newest)."""
    if t == 0 or strategy not in ("cumulative_exp", "cumulative_equal"):
        return {}
    if strategy == "cumulative_equal":
        base, rem = divmod(buffer, t)
        return {s: base + (1 if t - 1 - s < rem else 0) for s in range(t)}
    counts, left = {}, buffer
    for k in range(1, t + 1):
        c = left if k == t else buffer >> k  # buffer / 2^k, the oldest takes the remainder
        counts[t - k] = c
        left -= c
    return counts


def step_fractions(strategy, t, n, buffer):
    """{step: fraction of its n training samples} a strategy trains on at 0-based step t, sampled uniformly.

    restart / cumulative_all / oracle: everything seen so far (the union, as webdataset samples `a::b::c`);
    sequential / lwf: D_t only; cumulative_exp/equal: D_t + a bounded buffer of replay_counts old samples."""
    if strategy in ("sequential", "lwf"):
        return {t: 1.0}
    if strategy in ("restart", "cumulative_all", "oracle"):
        return {s: 1.0 for s in range(t + 1)}
    if strategy in ("cumulative_exp", "cumulative_equal"):
        return {**{s: min(1.0, c / n) for s, c in replay_counts(strategy, t, buffer).items()}, t: 1.0}
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


# -----------------------------------------------------------------------------
# loss and one time step of training

def lwf_loss(img_f, txt_f, scale, t_img, t_txt, t_scale):
    """Learning without Forgetting on the batch's image-text logits (TiC-CLIP sec. 4, LwF baseline): KL from the
    previous model's softmax to the current one, both directions, logits in fp32. Features are local to the rank."""
    s, t = fp32_logits(img_f, txt_f, scale), fp32_logits(t_img, t_txt, t_scale)
    return 0.5 * (distill_kl(s, t) + distill_kl(s.t(), t.t()))


def train_time_step(cfg, dist, model, batches, steps, name, lr, warmup, teacher=None, fingerprint=None):
    """Train `model` for `steps` on `batches` (a Stream over the strategy's data, or any get_batch) as the run
    `name`: a fresh AdamW and cosine schedule (peak lr, warm-up steps) every call, so a warm start keeps the weights
    only. teacher: LwF's previous model. fingerprint: what changes this run's result; fit reuses a finished
    checkpoint of the run with the same one. Returns fit's history."""
    def loss_fn(m, batch):
        img_f, txt_f, scale = m(*batch)
        loss = clip_loss(img_f, txt_f, scale)
        if teacher is None:
            return loss
        with torch.no_grad():
            t_img, t_txt, t_scale = teacher(*batch)
        kd = lwf_loss(img_f, txt_f, scale, t_img, t_txt, t_scale)
        return loss + cfg.lwf_weight * kd, {"lwf": float(kd.detach())}

    train = TrainConfig(steps, lr=lr, weight_decay=cfg.weight_decay, warmup=warmup, ckpt_every=cfg.ckpt_every,
                        log_every=cfg.log_every, amp=cfg.amp, resume=cfg.resume)
    return fit(model, loss_fn, batches, train, cfg.out, name, dist, fingerprint=fingerprint, config=config_to_dict(cfg))


# -----------------------------------------------------------------------------
# evaluation: the time matrix and its summaries

@torch.no_grad()
def evaluate(model, evals, names, tok, device):
    """Scores of one checkpoint on every time step's eval set -> (retrieval mean R@1 list, zero-shot accuracy list, or
    None without class names)."""
    model.eval()
    clf = zero_shot_classifier(model, tok, names, TEMPLATES, device) if names else None
    retr, zs = [], []
    for ev in evals:
        img_f = extract_features(model.encode_image, ev["images"], device=device)
        txt_f = extract_features(model.encode_text, ev["tokens"], device=device)
        retr.append(retrieval_recall(img_f, txt_f)["mean_r1"])
        if clf is not None:
            zs.append(zero_shot_accuracy(img_f, clf, ev["labels"]))
    model.train()
    return retr, (zs if clf is not None else None)


def summarize(M, rows=None):
    """Time-matrix summaries. M: list of rows, row r = the checkpoint after step rows[r] (default r), evaluated on
    every step j. id = mean of E[i, i]; backward = mean of E[i, j], j < i; forward = mean of E[i, j], j > i;
    final_avg = mean of the last row. Entries that do not exist (e.g. forward at the last step) are skipped."""
    rows = list(range(len(M))) if rows is None else rows
    diag, back, fwd = [], [], []
    for r, i in enumerate(rows):
        for j, v in enumerate(M[r]):
            (diag if j == i else back if j < i else fwd).append(v)
    mean = lambda v: float(np.mean(v)) if v else None
    return {"id": mean(diag), "backward": mean(back), "forward": mean(fwd), "final_avg": mean(M[-1])}


def probe_labels(samples):
    """{attribute: labels} the linear probe reads. The world: the main object's shape, colour and size and the
    background texture, the attributes its caption names first; other data: its class label; None without labels.
    The main object is the world's: the visible one with the largest visible area (ties: the lower instance), the
    caption's first object and the sample's `label`. `objects` is in painting order (back to front), so objects[0]
    may be hidden behind the others."""
    if samples and all(x.get("objects") and "texture" in x for x in samples):
        first = [main_object(x) for x in samples]
        return {"shape": [o["shape_id"] for o in first], "color": [o["color_id"] for o in first],
                "size": [o["size_id"] for o in first], "texture": [TEXTURES.index(x["texture"]) for x in samples]}
    if samples and all("label" in x for x in samples):
        return {"label": [int(x["label"]) for x in samples]}
    return None


def probe_sets(vals, evals, prep):
    """Probe data: trained on every time step's val pairs, scored on every step's test pairs (no test label ever
    fits the probe). None when the samples carry no labels."""
    tr, te = [x for ev in vals for x in ev], [x for ev in evals for x in ev]
    ytr, yte = probe_labels(tr), probe_labels(te)
    if ytr is None or yte is None:
        return None
    return {"train": torch.stack([prep(x["image"]) for x in tr]), "test": torch.stack([prep(x["image"]) for x in te]),
            "ytr": {k: torch.tensor(v) for k, v in ytr.items()}, "yte": {k: torch.tensor(v) for k, v in yte.items()}}


@torch.no_grad()
def probe(model, data, device):
    """Linear probe of the image embedding, per attribute, and the bars of the representation check (#18 item 2):
    acc = mean over attributes; chance = mean of 1 / classes; majority = mean of the test split's most frequent
    class share (a bar, not tuning)."""
    model.eval()
    tr = extract_features(model.encode_image, data["train"], device=device)
    te = extract_features(model.encode_image, data["test"], device=device)
    model.train()
    per, chance, major = {}, [], []
    for k, ytr in data["ytr"].items():
        yte = data["yte"][k]
        K = int(max(ytr.max(), yte.max())) + 1
        per[k] = linear_probe(tr, ytr, te, yte, num_classes=K)
        chance.append(1.0 / K)
        major.append(float(np.bincount(yte.numpy(), minlength=K).max() / len(yte)))
    return {"acc": float(np.mean(list(per.values()))), "per_attribute": per, "chance": float(np.mean(chance)),
            "majority": float(np.mean(major))}


def parse_strategy_lr(spec):
    """'sequential=1e-3,oracle=4e-3' -> {strategy: lr}; a SystemExit naming the flag otherwise."""
    out = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise SystemExit(f"config error: --strategy_lr={spec!r}: {part!r} is not name=lr") from None
        if k.strip() not in STRATEGIES or out[k.strip()] <= 0:
            raise SystemExit(f"config error: --strategy_lr={spec!r}: expected name=lr with a name of {STRATEGIES} "
                             "and lr > 0")
    return out


# -----------------------------------------------------------------------------
# plots

def plot_matrices(results, key, path, title):
    """The time matrices side by side (a run's missing rows, e.g. Oracle's before step T, blank)."""
    mats = {}
    for n, r in results.items():
        if key in r:
            T = len(r[key][0])
            mats[n] = [[None] * T for _ in range(T)]
            for i, row in zip(r["rows"], r[key]):
                mats[n][i] = row
    heatmaps(path, mats, f"{title} (row: trained through step i, column: eval data of step j)")


def plot_compute(results, path):
    """Final-step average retrieval R@1 vs samples seen (the compute axis of the paper's Fig. 1)."""
    names = list(results)
    line_plot(path, [panel("final-step avg retrieval R@1 vs compute", {"strategies": (
        [results[n]["samples_seen"] for n in names], [results[n]["final_avg"] for n in names])},
        xlabel="samples seen over all time steps", ylabel="R@1", points=True, labels={"strategies": names})])


# -----------------------------------------------------------------------------
# expected effects (python tic.py --seeds=0,1,2 judges each over seeds; common/seeds.py). All read the final-step
# average retrieval R@1 or backward transfer of results.json; the paper's figures are in docs/tic.md.

def _bar(strategy):  # representation check: probe >= max(2 x chance, majority + 0.15) (#18 item 2)
    return lambda r: max(2 * r[strategy]["probe"]["chance"], r[strategy]["probe"]["majority"] + 0.15)


EFFECTS = [
    Effect("Cumulative-All within 3 pts of Oracle (final-step avg R@1)", "cumulative_all.final_avg", "oracle.final_avg",
           margin=0.03, paper="Cumulative-All 'competitive' with Oracle at 2.5x less compute (abstract, sec. 1); "
                              "'a few points' taken as 3 pts"),
    Effect("Sequential forgets most: backward transfer < Cumulative-All", "sequential.backward",
           "cumulative_all.backward", sign=-1, paper="Sequential: worst backward transfer of the warm starts (Tab. 2)"),
    Effect("Sequential backward transfer < Cumulative-Exp", "sequential.backward", "cumulative_exp.backward", sign=-1,
           paper="replay buffers (Exp/Equal) between Sequential and All (Tab. 2)"),
    Effect("Sequential backward transfer < Cumulative-Equal", "sequential.backward", "cumulative_equal.backward",
           sign=-1, paper="replay buffers (Exp/Equal) between Sequential and All (Tab. 2)"),
    Effect("warm start beats Restart at budget C: Cumulative-All > Restart", "cumulative_all.final_avg",
           "restart.final_avg", paper="Restart worst at equal per-step compute (Tab. 2)"),
    Effect("warm start beats Restart at budget C: Sequential > Restart", "sequential.final_avg", "restart.final_avg",
           paper="Restart worst at equal per-step compute (Tab. 2)"),
] + [Effect(f"{s} probe >= max(2 chance, majority + .15)", f"{s}.probe.acc", _bar(s), paper="(representation check)",
            note="mean over shape, colour, size, texture of the main object") for s in
     ("cumulative_all", "oracle", "sequential", "restart")]


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    cfg = parse_config(Config, argv, presets={"smoke": SMOKE})
    if cfg.seeds:
        return run_seeds(main, argv, cfg, EFFECTS)
    t0 = time.time()
    groups = parse_time_steps(cfg.time_steps)
    strategies = [s.strip() for s in cfg.strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise SystemExit(f"config error: --strategies has {bad}; expected a comma list of {STRATEGIES}")
    if cfg.restart_rows not in ("last", "all"):
        raise SystemExit(f"config error: --restart_rows={cfg.restart_rows!r}; expected last or all")
    strategy_lr = parse_strategy_lr(cfg.strategy_lr)
    if cfg.caption not in ("caption", "alt_text"):
        raise SystemExit(f"config error: --caption={cfg.caption!r}; expected caption or alt_text")
    if cfg.quick_gelu not in ("auto", "true", "false"):
        raise SystemExit(f"config error: --quick_gelu={cfg.quick_gelu!r}; expected auto, true or false")
    if (cfg.bpe or cfg.quick_gelu != "auto" or cfg.vision_heads) and not cfg.warm_start:
        raise SystemExit("config error: --bpe, --quick_gelu and --vision_heads describe a --warm_start checkpoint")
    dist = start_run(cfg)

    # ---- data: per time step a training source and an eval set from its held-out split; a run's training data is
    # one source over the steps it uses (step_fractions), streamed in batches that are uniform over it
    # --warm_start: the checkpoint's own tokenizer, context length, image size and open_clip's (normalised) transforms
    base, tok, ws_fp = load_warm_start(cfg) if cfg.warm_start else (None, world_tokenizer(cfg.context_length), None)
    size, norm = (base.config["image_size"], {}) if base is not None else (cfg.image_size, {"mean": None})
    train_parts, eval_parts = step_sources(cfg, groups, "train"), step_sources(cfg, groups, "test")
    T, n, buffer = len(train_parts), cfg.n_train, cfg.buffer or cfg.n_train
    evals = [read_samples(one_source(eval_parts, {k: 1.0}), cfg.n_eval) for k in range(T)] if dist.is_master else []
    names, zs_na = None, "n/a: the eval samples carry no label (a .cls member or a json 'label')"
    if evals and all("label" in x for ev in evals for x in ev):
        try:  # class names from the data (classes.txt beside the shards, class folders); the world's for the world
            names, zs_na = class_names_of(eval_parts[0][1], default=None if cfg.data else class_names("shape")), None
        except FileNotFoundError as err:
            zs_na = f"n/a: {err}"
    prep = eval_transform(size, **norm)
    sets = [{"images": torch.stack([prep(x["image"]) for x in ev]), "tokens": tok(stack(ev, cfg.caption)),
             "labels": stack(ev, "label") if names else None} for ev in evals]
    # val split per time step (world: its own index stream; --data: {split}=val, --val_data or the key-hash holdout)
    vals = []
    if dist.is_master:
        try:
            val_parts = step_sources(cfg, groups, "val")
            vals = [read_samples(one_source(val_parts, {k: 1.0}), cfg.n_eval) for k in range(T)]
        except (FileNotFoundError, ValueError) as err:
            dist.print(f"tic: no val split ({err}); lr selection and the probe are skipped")
    val_sets = [{"images": torch.stack([prep(x["image"]) for x in ev]), "tokens": tok(stack(ev, cfg.caption))}
                for ev in vals]
    probe_data = probe_sets(vals, evals, prep) if vals else None
    aug = train_transform(size, kind="clip", **norm)
    workers = cfg.num_workers if cfg.num_workers >= 0 or cfg.data else 0

    # a caption's tokens are the same every epoch: tokenised once per process (bounded, so real data cannot grow it)
    tokens = functools.lru_cache(maxsize=1 << 16)(lambda text: tok(text)[0])

    def pair(x, g):  # runs in the DataLoader workers
        return {"image": aug(x["image"], g), "text": tokens(x[cfg.caption])}

    def stream(source, name):  # one per run; its order follows from (seed, run name)
        return Stream(source, cfg.batch_size // dist.world_size, pair, dist=dist, num_workers=workers, name=name,
                      seed=int(hashlib.sha1(f"{cfg.seed}/{name}".encode()).hexdigest()[:8], 16),
                      post=lambda b: (b["image"], b["text"]))
    dist.print(f"tic: {T} time steps {[p[0] for p in train_parts]}, {cfg.n_eval} eval pairs each, |D| = {n}, budget "
               f"C = {cfg.steps} steps x {cfg.batch_size} = {cfg.steps * cfg.batch_size} samples per step")

    def fresh():  # the init of a run from scratch (--warm_start: the checkpoint)
        seed_all(cfg.seed)  # same init for every from-scratch run
        return (build_model(cfg, tok.vocab_size) if base is None else copy.deepcopy(base)).to(dist.device)

    def ckpt(name):
        return os.path.join(cfg.out, f"{name}.safetensors")

    def init_from(prev):  # a model holding run prev's weights (step 1 under --warm_start: the checkpoint itself)
        model = fresh()
        if base is None or prev != "step1":
            load_weights(ckpt(prev), model)
        return model

    # one stream and fingerprint per run met here; a run's fingerprint holds its data, budget, lr and the fingerprint
    # of the run it warm-starts from, so step 1 is trained once and shared, and Restart survives a new --warm_lr.
    # --warm_start: step 1 is the checkpoint (its fingerprint: the file); every run starts from trained weights, so
    # every run takes the warm-start lr and warm-up; Restart and Oracle restart from the checkpoint (docs/tic.md)
    results, streams, fps, shared = {}, {}, {}, {k: getattr(cfg, k) for k in TRAIN_KEYS}
    if cfg.drift != 1.0 and not cfg.data:  # the world's drift (at 1, runs made before the knob still match)
        shared["drift"] = cfg.drift
    if base is not None:
        shared = {k: v for k, v in shared.items() if k not in MODEL_KEYS}
        fps["step1"] = ws_fp
        dist.print(f"tic: time step 1 = {cfg.warm_start} ({base.config['image_size']} px, context "
                   f"{base.config['context_length']}, {'--bpe ' + cfg.bpe if cfg.bpe else 'world'} tokenizer), "
                   "not trained")
    step1_scores = None  # --warm_start: the checkpoint's row of every time matrix, evaluated once
    for strat in strategies:
        s0 = time.time()
        M_r, M_z, M_v, rows, samples, prev = [], [], [], [], 0, None
        # Oracle trains once at the final step; Restart too by default (its effect reads the final row only: every
        # Restart step is an independent run from scratch, so its earlier rows cost compute and change nothing there)
        once = strat == "oracle" or (strat == "restart" and cfg.restart_rows == "last")
        steps_here = [T - 1] if once else range(T)
        for t in steps_here:
            warm = strat not in ("restart", "oracle") and t > 0
            budget = cfg.steps * (T if strat == "oracle" else 1)
            # step 1 is the same run for every non-Oracle strategy (random init, D_1, budget C): train it once
            name = "step1" if (t == 0 and strat != "oracle") else f"{strat}_t{t + 1}"
            model = init_from(prev) if warm else fresh()
            teacher = None
            if strat == "lwf" and warm:
                teacher = init_from(prev)
                teacher.eval().requires_grad_(False)
            fractions = step_fractions(strat, t, n, buffer)
            loaded = base is not None and name == "step1"  # the checkpoint is step 1: nothing to train
            if name not in streams and not loaded:
                if cfg.retrain and dist.is_master and os.path.exists(ckpt(name)):
                    os.remove(ckpt(name))  # train it again, once in this invocation
                dist.barrier()
                streams[name] = stream(one_source(train_parts, fractions, cfg.seed), name)
            if not loaded:
                # warm starts: their own peak lr (--warm_lr; docs/tic.md says why), no warm-up (the official --warmup 0)
                lr, warmup = (cfg.warm_lr or cfg.lr, cfg.warm_start_warmup) if warm or base is not None else \
                    (cfg.lr, cfg.warmup)
                if name != "step1" and strat in strategy_lr and base is None:  # its own lr from the val sweep
                    lr = strategy_lr[strat]
                fps[name] = {**shared, "budget": budget, "fractions": fractions, "lr": lr, "warmup": warmup,
                             "lwf_weight": cfg.lwf_weight if teacher is not None else None,
                             "init": fps[prev] if warm else ws_fp}
                train_time_step(cfg, dist, model, streams[name], budget, name, lr, warmup, teacher, fps[name])
                streams[name].close()
                samples += budget * cfg.batch_size
            prev = name
            if dist.is_master:
                if loaded and step1_scores is not None:  # the checkpoint's row, evaluated once
                    retr, zs = step1_scores
                else:
                    retr, zs = evaluate(unwrap(model), sets, names, tok, dist.device)
                    step1_scores = (retr, zs) if loaded else step1_scores
                M_r.append(retr)
                M_z.append(zs)
                rows.append(t)
                if val_sets:  # the same checkpoint on every step's val split: the val time matrix
                    M_v.append(evaluate(unwrap(model), val_sets, None, tok, dist.device)[0])
            dist.barrier()
        if dist.is_master:
            r = results[strat] = {"matrix_retrieval": M_r, "rows": rows, "retrieval": summarize(M_r, rows),
                                  "zeroshot": zs_na, "samples_seen": samples}
            # the val time matrix (what learning rates and the drift are chosen on; never the test split): its last
            # row is the final model's, and the linear probe of its image features (the representation check)
            if val_sets:
                sv = summarize(M_v, rows)
                r["val"] = {"retrieval": M_v[-1], "final_avg": sv["final_avg"], "backward": sv["backward"],
                            "id": sv["id"], "matrix": M_v}
            if probe_data is not None:
                r["probe"] = probe(unwrap(model), probe_data, dist.device)
            r["seconds"] = time.time() - s0
            if names:
                r.update(matrix_zeroshot=M_z, zeroshot=summarize(M_z, rows))
            r.update(id=r["retrieval"]["id"], backward=r["retrieval"]["backward"], forward=r["retrieval"]["forward"],
                     final_avg=r["retrieval"]["final_avg"])
            zs = f"{r['zeroshot']['final_avg']:.3f}" if names else "n/a"
            dist.print(f"tic: {strat}: final-step avg retrieval R@1 {r['final_avg']:.3f}, zero-shot {zs} "
                       f"({r['seconds']:.0f}s)")
    # provenance of every run (collective; a reused run's counts come from its checkpoint)
    where = cfg.data or f"world(seed={cfg.seed}, size={cfg.image_size}, years {cfg.time_steps})"
    data = data_report(list(streams.values()), evals, dist, source=f"{where}: train split",
                       eval_source=f"{cfg.val_data or where}: test split of each time step")
    if not dist.is_master:
        dist.cleanup()
        return None

    # ---- compute accounting: an Oracle kept up to date retrains from scratch at every step t on all data so far,
    # seeing t/T of the final Oracle run's samples, vs the samples Cumulative-All trained on over all steps
    res = dict(results)
    C = cfg.steps * cfg.batch_size
    if "oracle" in results and "cumulative_all" in results:
        upkeep = sum(results["oracle"]["samples_seen"] * (t + 1) / T for t in range(T))
        res["oracle_compute_ratio"] = upkeep / results["cumulative_all"]["samples_seen"]
        res["oracle_final_run_ratio"] = results["oracle"]["samples_seen"] / C  # the last Oracle run vs one step
        res["cumulative_all_minus_oracle"] = results["cumulative_all"]["final_avg"] - results["oracle"]["final_avg"]
    if "cumulative_all" in results and T >= 3:
        M = results["cumulative_all"]["matrix_retrieval"]
        # an old model on the newest data (the paper's 2020 OpenAI CLIP on 2021-22): model after step T-2 vs T
        res["old_model_gap_newest"] = M[T - 1][T - 1] - M[T - 3][T - 1]
    if base is not None:  # which checkpoint time step 1 is, and how its inputs were made
        res["warm_start"] = {"checkpoint": cfg.warm_start, **file_id(cfg.warm_start), "tokenizer": ws_fp["bpe"],
                             "image_size": size, "context_length": base.config["context_length"],
                             "preprocessing": "open_clip: train RandomResizedCrop(0.9-1), eval bicubic resize + "
                                              "center crop, CLIP mean/std", "model": base.config,
                             "step1": "loaded from the checkpoint, not trained (0 samples)"}
    res.update(seconds=time.time() - t0, device=dist.device, time_steps=[p[0] for p in train_parts], data=data)
    save_json(os.path.join(cfg.out, "results.json"), res)
    plot_matrices(results, "matrix_retrieval", os.path.join(cfg.out, "tic_retrieval.png"), "retrieval mean R@1")
    if names:
        plot_matrices(results, "matrix_zeroshot", os.path.join(cfg.out, "tic_zeroshot.png"), "zero-shot accuracy")
    plot_compute(results, os.path.join(cfg.out, "tic_compute.png"))
    table = {s: {"id": r["id"], "backward": r["backward"], "forward": r["forward"], "final_avg": r["final_avg"],
                 "zs_final_avg": r["zeroshot"]["final_avg"] if names else "n/a",
                 "val_final_avg": r["val"]["final_avg"] if "val" in r else "n/a",
                 "probe": r["probe"]["acc"] if "probe" in r else "n/a", "samples": r["samples_seen"],
                 "seconds": round(r["seconds"], 1)} for s, r in results.items()}
    print_table(table, title="TiC-CLIP: retrieval mean R@1 time-matrix summaries (zs = zero-shot accuracy)")
    print_table({k: v for k, v in res.items() if k not in results}, title="compute and drift")
    dist.cleanup()
    return res


if __name__ == "__main__":
    run_cli(main)
