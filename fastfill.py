"""FastFill: efficient compatible model update with policy-based partial backfilling.

Jaeckle, Faghri, Horton, Pouransari, Vemulapalli, Tuzel, "FastFill: Efficient Compatible Model Update",
ICLR 2023, arXiv:2303.04766. No official code exists; the protocol and metrics follow its predecessor FCT
(apple/ml-fct, arXiv:2112.02805), with FCT's cosine-distance bug (L1 normalisation) fixed.

A retrieval gallery holds features of an old embedding model phi_old. A better model phi_new ships: queries now
come from phi_new. Every stored gallery feature is mapped at once into the new space by a light transformation
h (an MLP), and gallery items are then re-embedded with phi_new ("backfilled") one by one in an order pi. FastFill
trains h with point-to-point alignment + point-to-cluster cross-entropy through the frozen new classifier, under a
heteroscedastic (learned log-variance) likelihood, and backfills the most uncertain items first. Quality over the
whole update is the area under the backfilling curve M(alpha).

What this file reproduces, in miniature on the synthetic world (common/world.py; classes = the 10 shapes):
  old model: small CNN trained on half of the classes; new model: bigger CNN trained on all classes (FCT protocol);
  h: MLP with a log-variance head, three losses: l2 (FCT), l2_ce (+point-to-cluster), fastfill (+uncertainty);
     every loss trains one h per lr of --h_lrs and keeps the one with the best new/h(old) mAP on a val gallery;
  policies: random, entropy, uncertainty, oracle (|h(old) - new|, not deployable);
  leave-one-out retrieval on the test split (mAP, CMC top-1/5), backfilling curves over 21 alphas, trapezoid AUC.

Run:
  python fastfill.py                      # default miniature run (a few minutes on 2 CPU cores), writes runs/fastfill
  python fastfill.py --smoke              # tiny end-to-end run (< 60 s)
  python fastfill.py --seeds=0,1,2        # the default once per seed: seeds.json, sweep.png, a verdict per effect
  python fastfill.py --help               # every config field
  torchrun --nproc_per_node=2 fastfill.py # data-parallel training (gloo on CPU); rank 0 evaluates and writes
  python fastfill.py --data='DIR/{split}' # tar shards (label + classes.txt) or class folders; else --holdout splits
  python fastfill.py --data='DIR/{split}' --old_model=ViT-B-32.safetensors --new_model=ViT-L-14.safetensors \
      --bpe=bpe_simple_vocab_16e6.txt.gz  # real old/new models (image towers, zero-shot heads); only h is trained
Stages (old model, new model, one h per loss) are common.train.fit checkpoints in --out: reused when finished and
their fingerprint (the config values that change them) matches, continued mid-stage with --resume after a kill,
trained again with --retrain. There is no --steps: each stage's length is its epochs (--old_epochs, --new_epochs,
--h_epochs), steps = epochs x training samples / batch.
--old_model / --new_model: an open_clip / OpenAI ViT CLIP (its image tower, at its own image size and open_clip's
preprocessing, with a zero-shot classifier over the class names; --bpe for its tokenizer) or a fastfill encoder
checkpoint replaces training that model; h is still trained. The gallery is then --data's test split (docs/fastfill.md).
"""
import itertools
import json
import os
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import parse_config, print_table, run_cli, save_json
from common.seeds import Effect, run_seeds
from common.data import (SampleSource, Stream, class_names_of, data_report, iter_samples, open_source, read_samples,
                         stack)
from common.convert import CheckpointError, read_safetensors
from common.eval import OPENAI_IMAGENET_TEMPLATES, zero_shot_classifier
from common.losses import fp32_logits
from common.models import clip_from_state_dict
from common.plot import line_plot, panel
from common.tokenizer import tokenizer_for
from common.train import (TrainConfig, all_gather_rows, all_reduce, extend_grid, file_id, fit, seed_all,
                          start_run)
from common.transforms import eval_transform
from common.world import TEMPLATES, World, class_names

LOSSES = ("l2", "l2_ce", "fastfill")
POLICIES = ("random", "entropy", "uncertainty", "oracle")


@dataclass
class Config:
    """FastFill in miniature. No --steps: a stage trains for its epochs (--old_epochs, --new_epochs, --h_epochs)."""
    out: str = "runs/fastfill"  # output directory
    seeds: str = ""  # e.g. 0,1,2: the default experiment once per seed -> seeds.json, sweep.png and a verdict per
    #                  expected effect (common/seeds.py)
    seed: int = 0  # all randomness (world content, init, data order, augmentation, random policy)
    device: str = ""  # cpu | cuda; empty = cuda if available
    data: str = ""  # real data (tar shards / class folders) instead of the synthetic world
    val_data: str = ""  # eval data (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    smoke: bool = False  # tiny sizes, end to end in < 60 s (--out default: runs/fastfill_smoke)
    retrain: bool = False  # train every stage again (old, new, h), even those --out holds finished with the same config
    resume: bool = False  # continue an unfinished stage (same fingerprint) from its last checkpoint in --out
    task: str = "label"  # world label used as class: label (10 shapes) or label_fine (90 shape x colour classes)
    image_size: int = 32  # image side in pixels
    n_train: int = 12000  # training images: the world's first n_train; on --data the samples an epoch counts
    n_test: int = 1000  # test images: gallery and queries (leave-one-out)
    n_val: int = 1000  # val images: the gallery on which each h loss picks its learning rate (never the test split)
    old_width: int = 16  # old CNN base width (smaller model)
    old_dim: int = 32  # old embedding dimension
    new_width: int = 32  # new CNN base width (bigger model)
    new_dim: int = 64  # new embedding dimension
    new_extra: int = 1  # extra conv layers at the lowest resolution in the new model (deeper than the old one)
    old_epochs: int = 8  # old model's training length: epochs of n_train stream samples (old-class rows only)
    new_epochs: int = 6  # new model's training length: epochs over all n_train training images
    batch_size: int = 128  # global batch for the encoders (split across ranks)
    lr: float = 3e-3  # AdamW peak learning rate for the encoders
    weight_decay: float = 5e-4  # AdamW weight decay for the encoders (not on norms / biases)
    label_smoothing: float = 0.1  # as in FCT's configs
    h_hidden: int = 256  # hidden width of the transformation MLP
    h_epochs: int = 30  # h's training length: epochs over the training features (12 / 20 / 30 compared on val)
    h_batch: int = 256  # global batch of training features for h
    h_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # AdamW peak lr grid for h (weight decay 3e-5 as in FCT):
    #                     every loss trains one h per lr and keeps the one with the best val new/h(old) mAP
    h_lr_extend: int = 2  # while a loss's best val lr is at an edge of its grid, add the next x3 lr there (at most
    #                       this many per side; the same rule for every loss, so equal tuning effort)
    ce_weight: float = 0.3  # lambda: weight of the point-to-cluster cross-entropy (against the per-dimension p2p;
    #                         chosen on the seed-0 val gallery, docs/fastfill.md)
    losses: str = "l2,fastfill"  # comma list of h losses to train and evaluate (l2_ce: the point-to-cluster ablation)
    policies: str = "random,entropy,uncertainty,oracle"  # comma list of backfilling orders
    distance: str = "l2"  # l2 | cosine (L2-normalised; FCT's released configs use l2)
    n_alpha: int = 21  # points of the backfilling curve in [0, 1]
    eval_batch: int = 512  # queries per distance block (shrunk automatically for huge galleries)
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    ckpt_every: int = 200  # checkpoint interval (steps) of every training stage: a killed run resumes mid-stage
    old_model: str = ""  # old model from a file, not trained: open_clip ViT CLIP or fastfill encoder .safetensors
    new_model: str = ""  # new model from a file, likewise (CLIP: image tower + zero-shot head; docs/fastfill.md)
    bpe: str = ""  # CLIP's merges file for a CLIP checkpoint's zero-shot head (else the world tokenizer, if it fits)
    old_quick_gelu: str = "auto"  # a CLIP --old_model: auto (QuickGELU for OpenAI-format keys) | true | false
    new_quick_gelu: str = "auto"  # the same for a CLIP --new_model (true for OpenAI weights that open_clip re-saved)
    old_vision_heads: int = 0  # a CLIP --old_model's image-tower heads (0: width // 64; ViT-H/g/bigG-14 need 16)
    new_vision_heads: int = 0  # the same for a CLIP --new_model


# --smoke: tiny sizes, the same pipeline end to end, in its own --out (fields given on the command line win)
SMOKE = dict(n_train=2000, n_test=400, n_val=300, h_lrs=(3e-3, 1e-2), h_lr_extend=0, old_epochs=6, new_epochs=8, h_epochs=10, old_width=8, new_width=16, new_extra=0,
             batch_size=64, n_alpha=11, out="runs/fastfill_smoke")


# --------------------------------------------------------------------------------------------------------------
# Models: old / new embedders (small CNNs with a classifier head) and the transformation h with uncertainty.
# --------------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """CNN embedder phi: image (B, 3, H, W) -> feature (B, dim), plus a linear classifier head fc on the feature.

    conv3x3/2 (w) -> conv (2w) -> pool -> conv (4w) -> pool -> `extra` convs (4w) -> global avg pool -> linear dim.
    Every conv is conv-BN-ReLU. FCT uses ResNets with a 128-d embedding; here the old model is narrower and
    shallower than the new one (stride-2 stem: 32 px inputs, kept cheap for 2 CPU cores).
    """

    def __init__(self, width, dim, num_classes, extra=0):
        super().__init__()
        def cbr(a, b, stride=1):
            return [nn.Conv2d(a, b, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        w = width
        layers = cbr(3, w, 2) + cbr(w, 2 * w) + [nn.MaxPool2d(2)] + cbr(2 * w, 4 * w) + [nn.MaxPool2d(2)]
        for _ in range(extra):
            layers += cbr(4 * w, 4 * w)
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(4 * w, dim)
        self.fc = nn.Linear(dim, num_classes)

    dim = property(lambda self: self.embed.out_features)

    def forward(self, x):
        """x (B, 3, H, W) -> (feature (B, dim), logits (B, C))."""
        f = self.embed(self.features(x).mean((2, 3)))
        return f, fp32_logits(f, self.fc.weight, bias=self.fc.bias)  # logits in fp32 also under bf16 autocast


class ClipTower(nn.Module):
    """An open_clip CLIP's image tower as a frozen embedder: image -> (L2-normalised embedding (B, E), logits of a
    zero-shot classifier fc: weight = logit_scale x the class names' text embeddings, bias 0), CLIP's own use of
    its embedding space. fc plays the trained encoder's classifier (point-to-cluster loss, entropy policy)."""

    def __init__(self, clip, classifier):
        super().__init__()
        self.visual, self.dim = clip.visual, classifier.shape[1]
        self.fc = nn.Linear(self.dim, classifier.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(classifier * clip.logit_scale.exp().clamp(max=100))
            self.fc.bias.zero_()

    def forward(self, x):
        f = F.normalize(self.visual(x).float(), dim=-1)
        return f, fp32_logits(f, self.fc.weight, bias=self.fc.bias)


def load_model(cfg, role, n_classes, names, templates, device="cpu"):
    """--old_model / --new_model -> (frozen model in eval mode, its image size, its results.json / fingerprint entry).

    An open_clip / OpenAI ViT CLIP (common.models; shapes inferred) gives a ClipTower whose zero-shot head covers
    `names` (the old model's: the old classes), tokenised by --bpe (else the world's tokenizer, when the checkpoint's
    vocabulary is the world's). A fastfill encoder checkpoint (this script's old.safetensors / new.safetensors) is
    rebuilt from its shapes; its image size is the one in its fingerprint, and its classifier must have n_classes.
    Every problem is a CheckpointError that names the file."""
    path = getattr(cfg, f"{role}_model")
    sd, meta = read_safetensors(path)
    if meta.get("format", "").startswith("clipbook-checkpoint"):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    info = {"checkpoint": path, "path": os.path.abspath(path), **file_id(path)}
    if "features.0.weight" in sd:  # a fastfill Encoder: widths, dims and depth from its shapes
        try:
            convs = sum(1 for k, v in sd.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
            model = Encoder(sd["features.0.weight"].shape[0], sd["embed.weight"].shape[0], sd["fc.weight"].shape[0],
                            extra=convs - 3)
            model.load_state_dict(sd, strict=True)
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a fastfill encoder checkpoint ({str(e).splitlines()[0]})") from None
        if model.fc.out_features != n_classes:
            raise CheckpointError(f"{path}: its classifier has {model.fc.out_features} classes, the {role} model of "
                                  f"this data needs {n_classes}")
        size = json.loads(meta.get("fingerprint", "{}")).get("image_size", cfg.image_size)
        info.update(kind="fastfill encoder", image_size=size, dim=model.dim, classifier="its trained fc")
        return model.to(device).eval(), size, info
    qg = {"auto": None, "true": True, "false": False}[getattr(cfg, f"{role}_quick_gelu")]
    try:
        clip = clip_from_state_dict(sd, quick_gelu=qg, vision_heads=getattr(cfg, f"{role}_vision_heads") or None)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e.args[0] if isinstance(e, KeyError) else e} (--{role}_model takes an "
                              "open_clip / OpenAI ViT CLIP or a fastfill encoder checkpoint)") from None
    tok = tokenizer_for(clip.text.vocab_size, clip.text.context_length, cfg.bpe, path)
    clip = clip.to(device)
    with torch.no_grad():  # a few classes at a time: every template of every class is one text batch
        head = torch.cat([zero_shot_classifier(clip, tok, names[i:i + 8], templates, device)
                          for i in range(0, len(names), 8)])
        model = ClipTower(clip, head.to(device))
    size = clip.config["image_size"]
    info.update(kind="open_clip CLIP image tower", image_size=size, dim=model.dim, model=clip.config,
                tokenizer=os.path.abspath(cfg.bpe) if cfg.bpe else "world",
                classifier=f"zero-shot: {len(names)} class names x {len(templates)} templates")
    return model.eval(), size, info


class Transformation(nn.Module):
    """h: old feature (B, d_old) -> (new-space feature (B, d_new), log-variance s = log sigma^2 (B,)).

    FCT's h is an MLP with BN+ReLU (1x1 convs, inner dim 2048); FastFill adds an uncertainty output that
    predicts how badly an item is aligned, used to order backfilling. detach_s=True trains the s head without
    letting it shape the body (used by the l2 / l2_ce variants, so their h is exactly FCT's / +CE's h).
    """

    def __init__(self, d_old, d_new, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_old, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
        self.mu = nn.Linear(hidden, d_new)
        self.logvar = nn.Linear(hidden, 1)

    def forward(self, f_old, detach_s=False):
        z = self.body(f_old)
        return self.mu(z), self.logvar(z.detach() if detach_s else z).squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# Data (common.data): labelled images. The encoders train from Streams over the train split, h from a Stream over
# the frozen features of the train images; the test split (gallery = queries) is read once.
# --------------------------------------------------------------------------------------------------------------
def prepare(to_input, field, n_classes, s, g=None, pad=3, inputs=None):
    """sample -> {"x": float (3, image_size, image_size), CLIP-normalised, "y": class id}. With g (training):
    random translation (reflect pad + crop) and horizontal flip. inputs {key: transform}: more inputs of the image
    (a loaded model's own size; never augmented)."""
    y = int(s[field])
    if not 0 <= y < n_classes:
        raise ValueError(f"sample {s['__key__']!r}: {field} {y} outside the {n_classes} class names of the data")
    x = to_input(s["image"])
    if g is not None:
        (i, j), H, W = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist(), x.shape[1], x.shape[2]
        x = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0, :, i:i + H, j:j + W]
        x = x.flip(-1) if torch.rand((), generator=g) < 0.5 else x
    return {"__key__": s["__key__"], "x": x, "y": y, **{k: f(s["image"]) for k, f in (inputs or {}).items()}}


def old_rows(n_old, batch):
    """The old model's batch: the rows of the old classes (ids < n_old)."""
    keep = batch["y"] < n_old
    return batch["x"][keep], batch["y"][keep]


# --------------------------------------------------------------------------------------------------------------
# Losses for h (FastFill §3; exact weighting is our reading, see docs/fastfill.md).
# --------------------------------------------------------------------------------------------------------------
def alignment_loss(mu, s, f_new, y, W, b, kind, ce_weight):
    """Per-batch loss of h. mu (B, d_new), s (B,) log-variance, f_new (B, d_new), y (B,), W (C, d_new), b (C,).

    l2:       L_p2p = |h(old) - new|^2 / d_new      (FCT's nn.MSELoss; per dimension, so exp(-s) * L_p2p + s is the
                                                     Gaussian NLL of an isotropic sigma^2 over the d_new dimensions)
    l2_ce:    L_p2p + lambda * CE(W h(old) + b, y)                      (point-to-cluster, frozen new classifier)
    fastfill: exp(-s) * (L_p2p + lambda * L_p2c) + s                    (heteroscedastic: s = log sigma^2)
    For l2 / l2_ce the s head (fed a detached body, see Transformation) learns the same likelihood on the detached
    per-item loss, so the uncertainty policy exists for every variant while h itself is untouched by it.
    """
    p2p = (mu - f_new).pow(2).mean(-1)
    per = p2p
    if kind in ("l2_ce", "fastfill"):
        per = per + ce_weight * F.cross_entropy(F.linear(mu, W, b), y, reduction="none")
    if kind == "fastfill":
        loss = (torch.exp(-s) * per + s).mean()
    elif kind in ("l2", "l2_ce"):
        loss = per.mean() + (torch.exp(-s) * per.detach() + s).mean()
    else:
        raise ValueError(f"loss kind {kind!r}, expected one of {LOSSES}")
    return loss, {"p2p": p2p.mean().item(), "s": s.mean().item()}


# --------------------------------------------------------------------------------------------------------------
# Training: every stage is one common.train.fit (AdamW + cosine, DDP, autocast, resumable mid-stage).
# --------------------------------------------------------------------------------------------------------------
def fingerprint(cfg, *keys, **extra):
    """What a stage's result depends on: fit reuses a finished checkpoint only when this matches."""
    return {**{k: getattr(cfg, k) for k in keys}, **extra}


def train_stage(model, loss_fn, stream, steps, name, fp, lr, wd, cfg, dist):
    """Train `model` as stage `name` with common.train.fit, checkpointed in {out}/{name}.safetensors every ckpt_every
    steps: a finished checkpoint with the same fingerprint is reused, an unfinished one continued with --resume (a
    killed run resumes mid-stage), any other trained again; --retrain removes it first."""
    path = os.path.join(cfg.out, f"{name}.safetensors")
    if cfg.retrain and dist.is_master and os.path.exists(path):
        os.remove(path)
    dist.barrier()
    fit(model, loss_fn, stream, TrainConfig(steps, lr=lr, weight_decay=wd, warmup=min(50, steps // 10), grad_clip=0.0,
                                            ckpt_every=cfg.ckpt_every, log_every=25, amp=cfg.amp, resume=cfg.resume),
        cfg.out, name, dist, fingerprint=fp)
    stream.close()  # (fit leaves every rank with rank 0's BatchNorm statistics)
    return model.eval()


def encoder_loss(label_smoothing, model, batch):
    """Cross-entropy (label smoothing as in FCT's configs) on a batch of augmented images."""
    x, y = batch
    _, logits = model(x)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing), {"acc": (logits.argmax(-1) == y).float().mean()}


def h_loss(kind, ce_weight, W, b, model, batch):
    """alignment_loss of h on a batch of frozen (old, new) training features, in fp32 also under autocast."""
    f_old, f_new, y = batch
    mu, s = model(f_old, detach_s=(kind != "fastfill"))
    with torch.autocast(f_old.device.type, enabled=False):
        return alignment_loss(mu.float(), s.float(), f_new, y, W, b, kind, ce_weight)


@torch.no_grad()
def extract(models, samples, dist, batch=512, keys=None):
    """Features and logits of each model, and the labels, on this rank's prepared samples; every rank gets all ranks'
    rows in rank order. keys: each model's input key in the samples (default "x"). Returns [(features, logits) per
    model], labels."""
    dev, it, out, ys = torch.device(dist.device), iter(samples), [([], []) for _ in models], []
    keys = keys or ["x"] * len(models)
    while chunk := list(itertools.islice(it, batch)):
        xs = {k: stack(chunk, k).to(dev) for k in dict.fromkeys(keys)}
        for m, k, (fs, ls) in zip(models, keys, out):
            f, logit = m.eval()(xs[k])
            fs.append(f.float().cpu()), ls.append(logit.float().cpu())
        ys.append(stack(chunk, "y"))
    cat = lambda v, d: all_gather_rows(torch.cat(v) if v else torch.zeros(0, d), dist)  # noqa: E731
    return ([(cat(fs, m.dim), cat(ls, m.fc.out_features)) for m, (fs, ls) in zip(models, out)],
            cat(ys, 0).view(-1).long())


# --------------------------------------------------------------------------------------------------------------
# Evaluation: distances, leave-one-out mAP / CMC, backfilling policies, curve and its area.
# --------------------------------------------------------------------------------------------------------------
def distance_matrix(q, g, kind="l2"):
    """q (Q, D), g (G, D) -> (Q, G). cosine = 1 - <q/|q|_2, g/|g|_2> (FCT's code normalises with p=1: a bug)."""
    if kind == "l2":
        return torch.cdist(q, g)
    if kind == "cosine":
        return 1.0 - F.normalize(q, p=2, dim=-1) @ F.normalize(g, p=2, dim=-1).T
    raise ValueError(f"distance {kind!r}, expected 'l2' or 'cosine'")


@torch.no_grad()
def retrieval_metrics(q, g, q_y, g_y, distance="l2", exclude_self=True, topk=(1, 5), batch=512, max_elems=1 << 24):
    """Leave-one-out retrieval: mAP and CMC top-k of queries q (Q, D) against gallery g (G, D).

    exclude_self: q[i] and g[i] are the same item (Q == G) and g[i] is removed from query i's ranking.
    AP of a query = mean over its relevant items of precision at their rank (sklearn's average_precision_score
    without ties); queries with no relevant gallery item are skipped for all metrics (their count is returned).
    Blocks of queries keep memory at ~max_elems distances, so a 100k gallery fits.
    """
    Q, G = q.shape[0], g.shape[0]
    if exclude_self and Q != G:
        raise ValueError(f"exclude_self needs queries == gallery items, got Q={Q}, G={G}")
    batch = max(1, min(batch, max_elems // max(G, 1)))
    aps, hits = [], {k: 0 for k in topk}
    for s in range(0, Q, batch):
        e = min(Q, s + batch)
        d = distance_matrix(q[s:e], g, distance)
        rows = torch.arange(e - s)
        if exclude_self:
            d[rows, s + rows] = float("inf")
        order = d.argsort(dim=1, stable=True)
        match = g_y[order] == q_y[s:e, None]
        if exclude_self:  # the self item sorts last (inf); make sure it never counts as relevant
            match &= order != (s + rows)[:, None]
        npos = match.sum(1)
        ok = npos > 0
        ranks = torch.arange(1, G + 1, dtype=torch.float64)
        prec = match.cumsum(1).double() / ranks
        ap = (prec * match).sum(1) / npos.clamp(min=1)
        aps.append(ap[ok])
        for k in topk:
            hits[k] += match[ok, :k].any(1).sum().item()
    aps = torch.cat(aps) if aps else torch.zeros(0, dtype=torch.float64)
    valid = len(aps)  # one sum at the end: the result does not depend on the block size
    out = {"map": aps.sum().item() / max(valid, 1)}
    out.update({f"top{k}": hits[k] / max(valid, 1) for k in topk})
    out["n_queries"], out["n_skipped"] = valid, Q - valid
    return out


def backfill_order(policy, s=None, logits=None, h_feat=None, new_feat=None, seed=0, n=None):
    """Order pi (indices, first = backfilled first) of the gallery under a policy.

    random: uniform permutation; entropy: descending entropy of softmax(W_new h(old)) (new classifier);
    uncertainty: descending predicted log sigma^2 (FastFill); oracle: descending |h(old) - new| (needs phi_new
    on every item, so not deployable: an upper-bound reference).
    """
    if policy == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if policy == "entropy":
        p = logits.float().log_softmax(-1)
        key = -(p.exp() * p).sum(-1)
    elif policy == "uncertainty":
        key = s.float()
    elif policy == "oracle":
        key = (h_feat - new_feat).norm(dim=-1)
    else:
        raise ValueError(f"policy {policy!r}, expected one of {POLICIES}")
    return key.argsort(descending=True, stable=True)


def backfilled_gallery(g_h, g_new, order, k):
    """Gallery after backfilling the first k items of order: phi_new there, h(phi_old) elsewhere."""
    g = g_h.clone()
    idx = order[:k]
    g[idx] = g_new[idx]
    return g


def backfill_curve(q, g_new, g_h, y, order, alphas, distance="l2", batch=512):
    """M(alpha) for each alpha: queries phi_new, gallery with round(alpha*N) items backfilled in `order`."""
    N = g_new.shape[0]
    return [retrieval_metrics(q, backfilled_gallery(g_h, g_new, order, int(round(a * N))), y, y, distance,
                              batch=batch) for a in alphas]


def trapezoid_auc(alphas, values):
    """Area under M(alpha) by the trapezoid rule; alphas span [0, 1], so the area is a mean metric."""
    a, v = np.asarray(alphas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2 * np.diff(a)).sum())


def spearman(a, b):
    """Spearman rank correlation of two 1-D tensors (ties broken by position; features are continuous)."""
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


# --------------------------------------------------------------------------------------------------------------
# Plot (common.plot): backfilling curves, one panel per (metric, loss variant): mAP panels first, then top-1.
# --------------------------------------------------------------------------------------------------------------
COLORS = {"random": (120, 120, 120), "entropy": (230, 140, 20), "uncertainty": (30, 110, 220), "oracle": (200, 40, 40),
          "old/old": (170, 170, 170), "new/new": (60, 60, 60)}


def curve_panels(alphas, curves, refs, losses, policies):
    """curves[loss][policy][metric] = list over alphas; refs[metric] = (old/old, new/new) reference levels."""
    out = []
    for metric in ("map", "top1"):
        for L in losses:
            series = {p: (alphas, curves[L][p][metric], COLORS.get(p, (0, 0, 0))) for p in policies}
            series.update({nm: ([0.0, 1.0], [v, v], COLORS[nm]) for nm, v in zip(("old/old", "new/new"), refs[metric])})
            out.append(panel(f"h loss: {L}", series, "backfilled fraction", metric))
    return out


# --------------------------------------------------------------------------------------------------------------
# The paper's expected effects (common/seeds.py: per seed d = sign * (a - b); shown when mean d > 2 SE over seeds).
# Judged on the test gallery with every h at the lr its loss chose on val; the FastFill h carries the uncertainty.
# --------------------------------------------------------------------------------------------------------------
EFFECTS = [
    Effect("FastFill loss raises new/h(old) mAP over L2 (FCT)", "new_hold_map.fastfill", "new_hold_map.l2",
           paper="higher cross-model M(0) than L2-only FCT without side-info [PAPER?]"),
    Effect("uncertainty order beats entropy order (AUC mAP)", "auc_map.fastfill.uncertainty",
           "auc_map.fastfill.entropy", paper="uncertainty-based backfilling beats entropy-based [PAPER?]"),
    Effect("uncertainty order beats random order (AUC mAP)", "auc_map.fastfill.uncertainty",
           "auc_map.fastfill.random", paper="policy-based partial backfilling beats random order [ABS]"),
    Effect("FastFill (loss + uncertainty) > FCT (L2 + random), AUC", "auc_map.fastfill.uncertainty",
           "auc_map.l2.random", paper="backfilling mAP +4.4% ImageNet, +2.7% Places-365, +1.3% VGGFace2 [ABS]"),
    Effect("compatibility: new/h(old) mAP > old/old", "new_hold_map.fastfill", "old_old_map",
           paper="the transformed gallery beats the old model at once (FCT/FastFill)"),
    Effect("old model: old/old mAP >= 2x chance", "old_old_map", lambda r: 2 * r["chance_map"],
           paper="(representation check)"),
    Effect("new model: new/new mAP >= 2x chance", "new_new_map", lambda r: 2 * r["chance_map"],
           paper="(representation check)"),
    Effect("old model acc (old classes) >= max(2 chance, maj + .15)", "old_acc_on_old_classes",
           lambda r: max(2 * r["chance_acc_old"], r["majority_acc_old"] + 0.15), paper="(representation check)"),
    Effect("new model acc >= max(2 chance, majority + .15)", "new_acc",
           lambda r: max(2 * r["chance_acc"], r["majority_acc"] + 0.15), paper="(representation check)"),
]


# --------------------------------------------------------------------------------------------------------------
# main: data -> old model -> new model -> h per loss -> curves per (loss, policy) -> results.json + plot.
# --------------------------------------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(Config, argv, presets={"smoke": SMOKE})
    if cfg.seeds:
        return run_seeds(main, argv, cfg, EFFECTS)
    t_start, cpu_start = time.time(), time.process_time()
    dist = start_run(cfg, ("batch_size", "h_batch"))
    seed_all(cfg.seed, dist.rank)
    losses = [s for s in cfg.losses.split(",") if s]
    policies = [s for s in cfg.policies.split(",") if s]
    for v, ok, key in [(losses, LOSSES, "losses"), (policies, POLICIES, "policies")]:
        bad = [s for s in v if s not in ok]
        if bad:
            raise ValueError(f"--{key}: unknown {bad}, expected a comma list of {list(ok)}")
    if not cfg.h_lrs or min(cfg.h_lrs) <= 0:
        raise ValueError(f"--h_lrs={cfg.h_lrs}: expected a comma list of positive learning rates")
    if cfg.task not in ("label", "label_fine") or cfg.distance not in ("l2", "cosine") or cfg.n_alpha < 2:
        raise ValueError(f"--task={cfg.task!r} (expected label | label_fine), --distance={cfg.distance!r} (expected "
                         f"l2 | cosine), --n_alpha={cfg.n_alpha} (expected >= 2): one of them is invalid")
    for r in ("old", "new"):
        qg = getattr(cfg, f"{r}_quick_gelu")
        if qg not in ("auto", "true", "false"):
            raise ValueError(f"--{r}_quick_gelu={qg!r}: expected auto, true or false")
        if (qg != "auto" or getattr(cfg, f"{r}_vision_heads")) and not getattr(cfg, f"{r}_model"):
            raise ValueError(f"--{r}_quick_gelu and --{r}_vision_heads describe an --{r}_model checkpoint")
    if cfg.bpe and not (cfg.old_model or cfg.new_model):
        raise ValueError("--bpe is the tokenizer of an --old_model / --new_model CLIP checkpoint")
    if cfg.data and cfg.task != "label":
        raise ValueError(f"--task={cfg.task!r} is a world label; on --data the class is the 'label' field (class "
                         "folders, .cls or json 'label' members, names in classes.txt)")
    dev, timing, R = torch.device(dist.device), {}, dist.world_size

    # 1. data: labelled images (train: fit the models and h; test: gallery = queries, leave-one-out)
    t = time.time()
    source = lambda split, n: open_source(  # noqa: E731
        cfg.data, split, world=lambda s: World(seed=cfg.seed, split=s, size=cfg.image_size), n=n, val_data=cfg.val_data,
        holdout=cfg.holdout, require=("image", cfg.task), keep=("image", cfg.task))
    train = source("train", cfg.n_train)
    names = class_names_of(train, default=None if cfg.data else class_names(
        "shape_color" if cfg.task == "label_fine" else "shape"))
    C = len(names)
    C_old = C // 2  # FCT: the old model sees the first half of the classes (here: the first half of the shapes)
    to_input = eval_transform(cfg.image_size)  # resize + centre crop + CLIP normalisation (common.transforms)
    prep = partial(prepare, to_input, cfg.task, C)
    # --old_model / --new_model: loaded instead of trained, each fed at its own image size (open_clip's eval
    # preprocessing there); the trained miniature models read "x" (cfg.image_size)
    loaded, key = {}, {"old": "x", "new": "x"}
    templates = OPENAI_IMAGENET_TEMPLATES if cfg.data else TEMPLATES
    for role, k in (("old", C_old), ("new", C)):
        if getattr(cfg, f"{role}_model"):
            loaded[role] = load_model(cfg, role, k, names[:k], templates, dev)
            size = loaded[role][1]
            key[role] = "x" if size == cfg.image_size else f"x{size}"
            dist.print(f"{role} model: {getattr(cfg, f'{role}_model')} ({loaded[role][2]['kind']}, {size} px, "
                       f"dim {loaded[role][0].dim}), not trained")
    sizes = {loaded[r][1] for r in loaded if key[r] != "x"}
    prep_all = partial(prep, inputs={f"x{z}": eval_transform(z) for z in sorted(sizes)}) if sizes else prep
    test = read_samples(source("test", cfg.n_test), cfg.n_test, prep_all)
    val = read_samples(source("val", cfg.n_val), cfg.n_val, prep_all)  # h's lr choice (FastFill: a val gallery)
    y_te, y_va = stack(test, "y"), stack(val, "y")
    dist.print(f"data: train {train.name}, class field {cfg.task!r}, {C} classes (the old model's: ids < {C_old}); "
               f"test {test.name}, {len(test)} samples")
    # one seed for both streams: each rank reads the same samples in both (data block: keys on several ranks = 0)
    streams = {name: Stream(train, k * cfg.batch_size // R, prep, seed=cfg.seed, num_workers=cfg.num_workers,
                            dist=dist, post=post, name=name)
               for name, k, post in (("old", 2, partial(old_rows, C_old)), ("new", 1, lambda b: (b["x"], b["y"])))
               if name not in loaded}
    timing["data"] = time.time() - t

    # 2. old model (smaller, half of the classes) and new model (bigger, all classes), reused when valid. The old
    #    model's batch is the old-class rows of twice batch_size stream samples (about batch_size rows when half the
    #    samples are of old classes); an epoch is n_train stream samples for both.
    data_keys = ("data", "val_data", "holdout", "task", "image_size", "n_train", "seed", "batch_size", "lr",
                 "weight_decay", "label_smoothing")
    # (init seeded per stage, on rank 0's seed: DDP broadcasts rank 0's weights; reused stages leave RNG untouched)
    seed_all(cfg.seed)
    old = Encoder(cfg.old_width, cfg.old_dim, C_old, extra=0).to(dev) if "old" not in loaded else loaded["old"][0]
    seed_all(cfg.seed + 1)
    new = Encoder(cfg.new_width, cfg.new_dim, C, extra=cfg.new_extra).to(dev) if "new" not in loaded else \
        loaded["new"][0]
    model_keys = {"old": ("old_width", "old_dim", "old_epochs"),
                  "new": ("new_width", "new_dim", "new_extra", "new_epochs")}
    for name, model, epochs in [("old", old, cfg.old_epochs), ("new", new, cfg.new_epochs)]:
        if name in loaded:
            continue
        keys = model_keys[name]
        t, fp, B = time.time(), fingerprint(cfg, *data_keys, *keys), streams[name].B * R
        train_stage(model, partial(encoder_loss, cfg.label_smoothing), streams[name],
                    epochs * max(1, cfg.n_train // B), name, fp, cfg.lr, cfg.weight_decay, cfg, dist)
        timing[name] = time.time() - t

    # 3. frozen features of both models on train (to fit h; each rank a share) and test (gallery/queries)
    t = time.time()
    share = iter_samples(train, dist.rank, R, n=-(-cfg.n_train // R))
    keys = [key["old"], key["new"]]
    [(fo_tr, _), (fn_tr, _)], y_tr = extract([old, new], map(prep_all, share), dist, keys=keys)
    per = -(-len(test) // R)
    [(fo_te, lo_te), (fn_te, ln_te)], _ = extract([old, new], test[dist.rank * per:(dist.rank + 1) * per], dist,
                                                  keys=keys)
    pv = -(-len(val) // R)
    [(fo_va, _), (fn_va, _)], _ = extract([old, new], val[dist.rank * pv:(dist.rank + 1) * pv], dist, keys=keys)
    feats = SampleSource([{"__key__": f"feature-{i}", "f_old": fo_tr[i], "f_new": fn_tr[i], "y": y_tr[i]}
                          for i in range(len(y_tr))], name="train features")
    timing["features"] = time.time() - t

    # 4. one transformation h per (loss variant, lr of --h_lrs), on the frozen training features (FCT-style); each
    #    loss keeps the h whose val new/h(old) mAP is best: the same grid and rule for every loss (equal effort)
    hs, val_map, best_lr, grids = {}, {}, {}, {}
    for kind in losses:
        val_map[kind], grid, ext, todo = {}, [], {"low": 0, "high": 0}, sorted(cfg.h_lrs)
        while todo:
            lr = todo.pop(0)
            t = time.time()
            mk = [k for r in ("old", "new") if r not in loaded for k in model_keys[r]]  # loaded model: its file
            fp = fingerprint(cfg, *data_keys, *mk, "h_hidden", "h_epochs", "h_batch", "ce_weight", loss=kind, h_lr=lr,
                             **{f"{r}_model": fingerprint(cfg, f"{r}_quick_gelu", f"{r}_vision_heads", "bpe",
                                                          **loaded[r][2]) for r in loaded})
            seed_all(cfg.seed + 2)  # the same init for every loss variant and lr: a paired comparison
            h = Transformation(old.dim, new.dim, cfg.h_hidden).to(dev)
            stream = Stream(feats, cfg.h_batch // R, seed=cfg.seed + 1, dist=dist, name=f"h_{kind}",
                            post=lambda b: (b["f_old"], b["f_new"], b["y"]))
            loss = partial(h_loss, kind, cfg.ce_weight, new.fc.weight.detach(), new.fc.bias.detach())
            h = train_stage(h, loss, stream, cfg.h_epochs * max(1, len(y_tr) // cfg.h_batch), f"h_{kind}_lr{lr:g}",
                            fp, lr, 3e-5, cfg, dist)
            with torch.no_grad():  # every rank holds all val features: the same choice everywhere
                val_map[kind][f"{lr:g}"] = retrieval_metrics(fn_va, h(fo_va.to(dev))[0].float().cpu(), y_va, y_va,
                                                             cfg.distance, batch=cfg.eval_batch)["map"]
            if kind not in hs or val_map[kind][f"{lr:g}"] > val_map[kind][f"{best_lr[kind]:g}"]:
                hs[kind], best_lr[kind] = h, lr
            grid = sorted(grid + [lr])
            timing[f"h_{kind}_lr{lr:g}"] = time.time() - t
            if not todo:  # the best val lr must be interior: one more x3 step past an edge best (extend_grid)
                nxt = extend_grid(grid, best_lr[kind], ext, cfg.h_lr_extend)
                todo = [nxt] if nxt is not None else []
        grids[kind] = grid

    # 5. evaluation: per loss, h(old) features, uncertainty and new-classifier logits of the test gallery; then the
    #    backfilling curves of every (loss, policy) pair, split across ranks and summed back (rank 0 writes)
    t = time.time()
    ev = dict(distance=cfg.distance, batch=cfg.eval_batch)
    alphas = [i / (cfg.n_alpha - 1) for i in range(cfg.n_alpha)]
    feats = {}
    with torch.no_grad():
        for kind in losses:
            mu, s = hs[kind](fo_te.to(dev))
            feats[kind] = (mu.float().cpu(), s.float().cpu(), new.fc(mu).float().cpu())
    tasks = [(kind, p) for kind in losses for p in policies]
    buf = torch.zeros(len(tasks), cfg.n_alpha, 3, dtype=torch.float64)  # (map, top1, top5) per alpha
    for i, (kind, p) in enumerate(tasks):
        if i % dist.world_size != dist.rank:
            continue
        mu, s, logits = feats[kind]
        order = backfill_order(p, s=s, logits=logits, h_feat=mu, new_feat=fn_te, seed=cfg.seed, n=len(y_te))
        c = backfill_curve(fn_te, fn_te, mu, y_te, order, alphas, cfg.distance, cfg.eval_batch)
        buf[i] = torch.tensor([[r["map"], r["top1"], r["top5"]] for r in c], dtype=torch.float64)
    buf = all_reduce(buf, dist)  # each task was filled by exactly one rank, zeros elsewhere
    data = data_report(list(streams.values()), [test], dist)  # collective: every rank (h reads features, not samples)
    if not dist.is_master:
        dist.barrier()
        dist.cleanup()
        return None
    oo = retrieval_metrics(fo_te, fo_te, y_te, y_te, **ev)
    nn_ = retrieval_metrics(fn_te, fn_te, y_te, y_te, **ev)
    freq = torch.bincount(y_te, minlength=C).double()
    chance = float(((freq[y_te] - 1) / (len(y_te) - 1)).mean())  # expected AP of a random ranking ~ positive rate
    seen = y_te < C_old
    res = {"old_old_map": oo["map"], "new_new_map": nn_["map"], "new_hold_map": {}, "auc_map": {}, "auc_top1": {},
           "uncertainty_error_spearman": {}, "old_old_top1": oo["top1"], "old_old_top5": oo["top5"],
           "new_new_top1": nn_["top1"], "new_new_top5": nn_["top5"], "new_hold_top1": {}, "new_hold_top5": {},
           "chance_map": chance, "num_classes": C, "num_old_classes": C_old, "n_gallery": len(y_te),
           "old_acc_on_old_classes": float((lo_te[seen].argmax(-1) == y_te[seen]).float().mean()),
           "new_acc": float((ln_te.argmax(-1) == y_te).float().mean()), "class_field": cfg.task, "data": data,
           # the classifiers' bars (representation checks): chance and the majority class of the test labels
           "chance_acc": 1.0 / C, "majority_acc": float(freq.max() / len(y_te)), "chance_acc_old": 1.0 / C_old,
           "majority_acc_old": float(torch.bincount(y_te[seen], minlength=C_old).max() / max(1, int(seen.sum()))),
           "h_lr_val_map": val_map, "h_best_lr": best_lr, "n_val": len(y_va),
           "h_lr_grid": grids, "h_best_lr_interior": {k: grids[k][0] < v < grids[k][-1] for k, v in best_lr.items()}}
    for r in loaded:  # which checkpoint each loaded model is (absent: trained here); its accuracies are zero-shot's
        res[f"{r}_model"] = {k: v for k, v in loaded[r][2].items() if k != "path"}
    curves, ends_exact = {kind: {} for kind in losses}, True
    for i, (kind, p) in enumerate(tasks):
        curves[kind][p] = {m: buf[i, :, j].tolist() for j, m in enumerate(("map", "top1", "top5"))}
        res["auc_map"].setdefault(kind, {})[p] = trapezoid_auc(alphas, curves[kind][p]["map"])
        res["auc_top1"].setdefault(kind, {})[p] = trapezoid_auc(alphas, curves[kind][p]["top1"])
        # M(1) is the new/new retrieval through the same code path: equal to the last bit
        ends_exact &= curves[kind][p]["map"][-1] == nn_["map"] and curves[kind][p]["top1"][-1] == nn_["top1"]
    for kind in losses:
        mu, s, _ = feats[kind]
        nh = retrieval_metrics(fn_te, mu, y_te, y_te, **ev)  # = M(0) of every policy
        res["new_hold_map"][kind], res["new_hold_top1"][kind], res["new_hold_top5"][kind] = nh["map"], nh["top1"], nh["top5"]
        res["uncertainty_error_spearman"][kind] = spearman(s, (mu - fn_te).pow(2).sum(-1))
    res["curve_end_equals_new_new"] = bool(ends_exact)
    timing["eval"] = time.time() - t
    line_plot(os.path.join(cfg.out, "curves.png"), curve_panels(
        alphas, curves, {"map": (oo["map"], nn_["map"]), "top1": (oo["top1"], nn_["top1"])}, losses, policies),
        size=(400, 300), cols=3)
    res["curves"] = {"alphas": alphas, **curves}
    res["stage_seconds"] = {k: round(v, 2) for k, v in timing.items()}
    res["seconds"] = round(time.time() - t_start, 2)
    res["cpu_seconds_rank0"] = round(time.process_time() - cpu_start, 2)  # ~ wall time on a quiet core
    res["device"] = str(dev)
    save_json(os.path.join(cfg.out, "results.json"), res)
    print_table({k: v for k, v in res.items() if k != "curves"}, title="FastFill (miniature)")
    dist.barrier()
    dist.cleanup()
    return res


if __name__ == "__main__":
    run_cli(main)
