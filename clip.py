"""Baseline: a tiny CLIP (Radford et al. 2021, arXiv:2103.00020) trained contrastively on the synthetic world.

Every method script is compared against this run and imitates its layout: config dataclass -> data -> model ->
loss -> common.train.fit -> evaluation -> config.json / results.json / log.jsonl / clip.safetensors + a table.

    python clip.py                                 # default run (~9 min wall on 2 CPU cores)
    python clip.py --smoke                         # < 60 s end to end
    python clip.py --data='shards/{split}-{000..009}.tar'   # exported world / real image-text shards
    python clip.py --data=/data/cc3m --holdout=0.01         # one stream: test pairs held out by key hash
    torchrun --nproc_per_node=2 clip.py            # data parallel (gloo on CPU)

Training pairs come from one common.data Stream: the world's first n_train samples (rendered once, then cached), or
--data streamed from disk, split over ranks x DataLoader workers in endless shuffled epochs. fit checkpoints the
stream's position, so --resume continues with the batches an uninterrupted run would have seen. Augmentation is
open_clip's default RandomResizedCrop(scale=(0.9, 1)) without flips (the captions say "left"/"right"); it resizes
images of any size to image_size. Evaluation on held-out test pairs that never share a key with training:
zero-shot classification with the data's class names and a prompt ensemble (CLIP sec. 3.1.4; on the world
"a large {colour} {shape}." over its colours, chosen on val), a linear probe, and image<->text retrieval.
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.config import config_to_dict, parse_config, print_table, run_cli, save_json
from common.data import Stream, class_names_of, data_report, open_source, read_samples, stack
from common.eval import extract_features, linear_probe, retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from common.losses import clip_loss
from common.models import clip_tiny
from common.seeds import Effect, run_seeds
from common.tokenizer import world_tokenizer
from common.train import TrainConfig, fit, seed_all, start_run
from common.transforms import eval_transform, train_transform
from common.world import COLORS, TEMPLATES, TEXTURES, World, class_names, main_object


@dataclass
class Config:
    """Tiny CLIP baseline on the synthetic world."""
    out: str = "runs/clip"  # output folder (created if missing)
    seed: int = 0  # world, init, data order and augmentation all follow from it
    seeds: str = ""  # e.g. 0,1,2: the default experiment once per seed -> seeds.json, sweep.png and a verdict per
    # expected effect (common/seeds.py)
    data: str = ""  # tar shards / folder instead of the world ("{split}" is replaced by train/test)
    val_data: str = ""  # eval data (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    device: str = ""  # cpu | cuda (default: cuda if available)
    steps: int = 800  # optimizer steps: the val mean rises with steps, so the most that fit 10 min (docs/clip.md)
    batch_size: int = 256  # global batch (split over torchrun ranks); CLIP negatives = batch_size - 1 (256 beat 128
    # on every val score: docs/clip.md)
    lr: float = 1e-3  # peak learning rate (AdamW, cosine); chosen on val from {1e-3, 2e-3} (docs/clip.md)
    weight_decay: float = 0.1  # decoupled weight decay (not on norms, biases, embeddings, logit scale)
    warmup: int = 25  # linear warm-up steps
    temperature: float = 0.07  # initial softmax temperature (learnable logit scale ln(1/T), exp clamped at 100)
    image_size: int = 64  # model input side; the world renders at this size (64: shapes are drawn with 4x the pixels
    # at the same 4x4 tokens and step cost as 32 px / patch 8)
    patch_size: int = 16  # ViT patch side (64 px / 16 = 4x4 tokens; the conv stem is then 4-2-2)
    stem: str = "conv"  # conv (4-2-2 conv stem: learns shapes faster, README) | patch (linear patchify, open_clip)
    n_train: int = 16000  # world training pairs (rendered once, cached); --data streams all of its train split
    n_test: int = 1000  # held-out pairs for zero-shot and retrieval
    n_val: int = 1000  # world val pairs: zero-shot and probes again (results "val") for offline choices; 0 = off
    caption: str = "caption"  # caption | alt_text (the world's accurate or noisy web-like text)
    prompts: str = "main_object"  # world zero-shot prompts: main_object ("a large {colour} {}." for every colour: the
    # label is the largest object; chosen on val, docs/clip.md) | world (common.world.TEMPLATES); --data: TEMPLATES
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    compile: bool = False  # torch.compile the model
    ckpt_every: int = 100  # checkpoint every N steps (and at the end)
    resume: bool = False  # continue from {out}/clip.safetensors
    log_every: int = 25  # log.jsonl row + printed line every N steps
    smoke: bool = False  # tiny run (< 60 s) for tests


# --smoke: the same pipeline at tiny sizes (explicit --key=value flags still win)
SMOKE = dict(steps=60, batch_size=64, n_train=1500, n_test=300, n_val=200, warmup=10, log_every=10)


def attribute_labels(samples):
    """{attribute: labels} for the attribute probe: the world's main object's shape, colour and size (the caption's
    first object, common.world.main_object) and the background texture, the attributes its captions name (the same
    attributes as tic.py's probe); None elsewhere."""
    if not samples or not all(s.get("objects") and "texture" in s for s in samples):
        return None
    first = [main_object(s) for s in samples]
    return {"shape": [o["shape_id"] for o in first], "color": [o["color_id"] for o in first],
            "size": [o["size_id"] for o in first], "texture": [TEXTURES.index(s["texture"]) for s in samples]}


def prompt_templates(cfg):
    """Zero-shot prompt ensemble (CLIP sec. 3.1.4): on the world the default marginalises the caption's colour word
    for its largest object ("a large red {}.", ...), which the val split preferred to the generic TEMPLATES."""
    if cfg.data or cfg.prompts == "world":
        return TEMPLATES
    return [f"a large {c} {{}}." for c in COLORS]


def label_scores(samples, img_f, clf, probe=None, tr_f=None, te_f=None, tr_e=None):
    """Zero-shot accuracy (embeddings img_f) and majority share on samples' labels; with the probe samples' features
    tr_f and the scored samples' te_f also the shape probe and the attribute probe (each attribute the captions name,
    the world only). The probes read the pooled features before the projection, as CLIP's own linear probes (its
    App. A.3: I_f of Fig. 3); tr_e (the probe samples' embeddings) adds the shape probe on the embeddings too."""
    labels = stack(samples, "label")
    out = {"zeroshot_acc": zero_shot_accuracy(img_f, clf, labels),
           "majority": float(np.bincount(labels.numpy()).max() / len(labels))}
    if tr_f is None:
        return out
    out["linear_probe_acc"] = linear_probe(tr_f, stack(probe, "label"), te_f, labels)
    if tr_e is not None:
        out["linear_probe_acc_embedding"] = linear_probe(tr_e, stack(probe, "label"), img_f, labels)
    ytr, yte = attribute_labels(probe), attribute_labels(samples)
    if ytr is not None and yte is not None:
        per, chance, major = {}, [], []
        for k in ytr:
            a, b = torch.tensor(ytr[k]), torch.tensor(yte[k])
            K = int(max(a.max(), b.max())) + 1
            per[k] = linear_probe(tr_f, a, te_f, b, num_classes=K)
            chance.append(1.0 / K)
            major.append(float(np.bincount(b.numpy(), minlength=K).max() / len(b)))
        out["attribute_probe"] = {"acc": float(np.mean(list(per.values()))), "per_attribute": per,
                                  "chance": float(np.mean(chance)), "majority": float(np.mean(major))}
    return out


# the baseline claims no effect of its own: its checks say whether its representation is worth comparing (#18 item 2)
EFFECTS = [
    Effect("zero-shot shape >= max(2 chance, majority + .15)", "zeroshot_acc",
           lambda r: max(2 * r["chance"], r["majority"] + 0.15), paper="(representation check)"),
    Effect("shape probe >= max(2 chance, majority + .15)", "linear_probe_acc",
           lambda r: max(2 * r["chance"], r["majority"] + 0.15), paper="(representation check)"),
    Effect("attribute probe >= max(2 chance, majority + .15)", "attribute_probe.acc",
           lambda r: max(2 * r["attribute_probe"]["chance"], r["attribute_probe"]["majority"] + 0.15),
           paper="(representation check)", note="mean over shape, colour, size, texture of the main object"),
]


def main(argv=None):
    cfg = parse_config(Config, argv, presets={"smoke": SMOKE})
    if cfg.seeds:
        return run_seeds(main, argv, cfg, EFFECTS)
    if cfg.caption not in ("caption", "alt_text"):
        raise SystemExit(f"config error: --caption={cfg.caption!r}; expected caption or alt_text")
    if not 0.01 <= cfg.temperature <= 1:
        raise SystemExit(f"config error: --temperature={cfg.temperature}; expected 0.01..1 (logit scale <= 100)")
    if cfg.prompts not in ("main_object", "world"):
        raise SystemExit(f"config error: --prompts={cfg.prompts!r}; expected main_object or world")
    if cfg.stem not in ("conv", "patch"):
        raise SystemExit(f"config error: --stem={cfg.stem!r}; expected conv or patch")
    if cfg.image_size % cfg.patch_size or (cfg.stem == "conv" and cfg.patch_size % 4):
        raise SystemExit(f"config error: --image_size={cfg.image_size} must be a multiple of --patch_size="
                         f"{cfg.patch_size} (a multiple of 4 for the conv stem)")
    t0 = time.time()
    dist = start_run(cfg)

    # ---- data: a stream of (augmented image, tokens) pairs; test pairs from their own split
    tok = world_tokenizer(context_length=32)
    aug = train_transform(cfg.image_size, kind="clip")

    def source(split, n):
        return open_source(cfg.data, split, world=lambda s: World(seed=cfg.seed, split=s, size=cfg.image_size), n=n,
                           val_data=cfg.val_data, holdout=cfg.holdout, require=("image", cfg.caption),
                           keep=("image", cfg.caption, "label") + (() if cfg.data else ("objects", "texture")))

    def pair(s, g):  # runs in the DataLoader workers
        return {"image": aug(s["image"], g), "text": tok(s[cfg.caption])[0]}

    train = Stream(source("train", cfg.n_train), cfg.batch_size // dist.world_size, pair, seed=cfg.seed,
                   num_workers=cfg.num_workers, dist=dist, post=lambda b: (b["image"], b["text"]))
    test_source = source("test", cfg.n_test)  # opened before training: a bad split spec fails at once

    # ---- model and loss (same init on every rank; DDP also broadcasts rank 0's weights)
    seed_all(cfg.seed)
    model = clip_tiny(tok.vocab_size, image_size=cfg.image_size, patch_size=cfg.patch_size, stem=cfg.stem,
                      init_logit_scale=math.log(1 / cfg.temperature))
    model = model.to(dist.device)

    def loss_fn(m, batch):
        img_f, txt_f, scale = m(*batch)
        return clip_loss(img_f, txt_f, scale), {"scale": scale.item()}

    seed_all(cfg.seed, dist.rank)
    recipe = TrainConfig(cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                         ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, amp=cfg.amp, compile=cfg.compile,
                         resume=cfg.resume)
    hist = fit(model, loss_fn, train, recipe, cfg.out, "clip", dist, config=config_to_dict(cfg))
    train.close()

    # ---- evaluation on held-out pairs (rank 0; the provenance report is collective)
    test = [read_samples(test_source, cfg.n_test)] if dist.is_master else []
    data = data_report([train], test, dist)
    if not dist.is_master:
        dist.cleanup()
        return None
    test = test[0]
    model.eval()
    prep = eval_transform(cfg.image_size)
    images = torch.stack([prep(s["image"]) for s in test])
    with torch.no_grad():
        img_f = extract_features(model.encode_image, images, device=dist.device)
        txt_f = extract_features(model.encode_text, tok(stack(test, cfg.caption)), device=dist.device)
    res = {"zeroshot_acc": None, "chance": None}
    try:  # class names from the data (classes.txt beside the shards, class folders); the world's only for the world
        names = class_names_of(test_source, default=None if cfg.data else class_names("shape"))
    except FileNotFoundError as err:
        names, res["zeroshot"] = None, f"n/a: {err}"
    if names is not None and not all("label" in s for s in test):
        names, res["zeroshot"] = None, "n/a: the test samples carry no label (a .cls member or a json 'label')"
    if names is not None:
        clf = zero_shot_classifier(model, tok, names, prompt_templates(cfg), dist.device)
        # linear probe: what the image tower knows about the labels, independent of the text tower
        probe = read_samples(train.source, 2000 if cfg.data else min(cfg.n_train, 2000))
        feats = lambda fn, x: extract_features(fn, x, device=dist.device)  # noqa: E731  (no_grad inside)
        tr_f = tr_e = None
        if all("label" in s for s in probe):
            x = torch.stack([prep(s["image"]) for s in probe])
            tr_f, tr_e = feats(model.visual.pooled, x), feats(model.encode_image, x)
        res.update(label_scores(test, img_f, clf, probe, tr_f, feats(model.visual.pooled, images), tr_e),
                   chance=1.0 / len(names))
        if not cfg.data and cfg.n_val:  # the world's val split: every offline choice (lr, steps) is made on it
            val = read_samples(source("val", cfg.n_val), cfg.n_val)
            x = torch.stack([prep(s["image"]) for s in val])
            res["val"] = label_scores(val, feats(model.encode_image, x), clf, probe, tr_f,
                                      feats(model.visual.pooled, x), tr_e)
    r = retrieval_recall(img_f, txt_f)
    res.update(retrieval_mean_r1=r["mean_r1"], retrieval_i2t_r1=r["i2t_r1"], retrieval_t2i_r1=r["t2i_r1"],
               retrieval_mean_r5=r["mean_r5"], retrieval_chance_r1=1.0 / len(test),
               loss_first=float(np.mean(hist["loss"][:10])) if hist["loss"] else None,
               loss_last=float(np.mean(hist["loss"][-10:])) if hist["loss"] else None,
               steps=cfg.steps, seconds=time.time() - t0, device=dist.device, world_size=dist.world_size, data=data)
    save_json(os.path.join(cfg.out, "results.json"), res)
    print_table(res, title=f"clip.py results ({cfg.out})")
    dist.cleanup()
    return res


if __name__ == "__main__":
    run_cli(main)
