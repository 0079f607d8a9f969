"""Baseline: a tiny CLIP (Radford et al. 2021, arXiv:2103.00020) trained contrastively on the synthetic world.

Every method script is compared against this run and imitates its layout: config dataclass -> data -> model ->
loss -> common.train.fit -> evaluation -> config.json / results.json / log.jsonl / clip.safetensors + a table.

    python -m common.clip                          # default run (~3 min on 2 CPU cores)
    python -m common.clip --smoke                  # < 60 s end to end
    python -m common.clip --data='shards/{split}-{000..009}.tar'   # exported world / real image-text shards
    torchrun --nproc_per_node=2 -m common.clip     # data parallel (gloo on CPU)

Training data is kept in memory (n_train images rendered by the world, or the first n_train samples of --data), so
that the batch of step i is a pure function of (seed, i): that is what makes --resume reproduce an uninterrupted
run (common/train.py). Augmentation is open_clip's default RandomResizedCrop(scale=(0.9, 1)) without flips (the
captions say "left"/"right"). Evaluation: zero-shot shape classification with the world's prompt templates (CLIP
sec. 3.1.4 ensembling) and image<->text retrieval on held-out test samples.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.config import config_to_dict, parse_config, print_table, save_json
from common.eval import extract_features, linear_probe, retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from common.losses import clip_loss
from common.models import clip_tiny
from common.tokenizer import world_tokenizer
from common.train import fit, seed_all, setup_distributed
from common.transforms import eval_transform, train_transform
from common.world import TEMPLATES, World, class_names, load_arrays


@dataclass
class Config:
    """Tiny CLIP baseline on the synthetic world."""
    out: str = "runs/clip"  # output folder (created if missing)
    seed: int = 0  # world, init, data order and augmentation all follow from it
    data: str = ""  # tar shards / folder instead of the world ("{split}" is replaced by train/test)
    device: str = ""  # cpu | cuda (default: cuda if available)
    steps: int = 300  # optimizer steps (zero-shot shape acc. 0.16 at 160, 0.18 at 320: shape is learnt last)
    batch_size: int = 128  # global batch (split over torchrun ranks); CLIP negatives = batch_size - 1
    lr: float = 2e-3  # peak learning rate (AdamW, cosine)
    weight_decay: float = 0.1  # decoupled weight decay (not on norms, biases, embeddings, logit scale)
    warmup: int = 25  # linear warm-up steps
    image_size: int = 32  # model input side; the world renders at this size
    patch_size: int = 8  # ViT patch side (32 px / 8 = 4x4 tokens)
    stem: str = "conv"  # conv (4-2-2 conv stem: learns shapes ~3x faster here) | patch (linear patchify, open_clip)
    n_train: int = 8000  # training pairs held in memory
    n_test: int = 1000  # held-out pairs for zero-shot and retrieval
    caption: str = "caption"  # caption | alt_text (the world's accurate or noisy web-like text)
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    compile: bool = False  # torch.compile the model
    ckpt_every: int = 100  # checkpoint every N steps (and at the end)
    resume: bool = False  # continue from {out}/clip.safetensors
    log_every: int = 25  # log.jsonl row + printed line every N steps
    smoke: bool = False  # tiny run (< 60 s) for tests


# --smoke: the same pipeline at tiny sizes (explicit --key=value flags still win)
SMOKE = dict(steps=60, batch_size=64, n_train=1500, n_test=300, warmup=10, log_every=10)


def load_pairs(cfg, split, n, start=0):
    """Samples [start, start+n) of the split -> dict(images: uint8 (n, H, W, 3) array or list, texts, labels|None)."""
    if not cfg.data:  # render the embedded world directly at the model's resolution
        a = load_arrays(World(seed=cfg.seed, split=split, size=cfg.image_size, n=start + n), n, start)
        return {"images": a["images"], "texts": a["captions" if cfg.caption == "caption" else "alt_texts"],
                "labels": a["labels"]}
    from common.data import make_dataset
    # every rank reads the same samples (rank 0 of 1): get_batch slices the global batch per rank itself
    ds = make_dataset(cfg.data, split=split, seed=cfg.seed, n=start + n, rank=0, world_size=1,
                      require=("image", cfg.caption))
    rows = [s for s, _ in zip(ds, range(start + n))][start:]
    if len(rows) < n:
        raise SystemExit(f"--data {cfg.data!r} ({split}): only {start + len(rows)} samples, need {start + n}")
    labels = np.array([s["label"] for s in rows], np.int64) if all("label" in s for s in rows) else None
    return {"images": [s["image"] for s in rows], "texts": [s[cfg.caption] for s in rows], "labels": labels}


def main(argv=None):
    cfg = parse_config(Config, argv, presets={"smoke": SMOKE})
    if cfg.caption not in ("caption", "alt_text"):
        raise SystemExit(f"config error: --caption={cfg.caption!r}; expected caption or alt_text")
    if cfg.stem not in ("conv", "patch"):
        raise SystemExit(f"config error: --stem={cfg.stem!r}; expected conv or patch")
    if cfg.image_size % cfg.patch_size or (cfg.stem == "conv" and cfg.patch_size % 4):
        raise SystemExit(f"config error: --image_size={cfg.image_size} must be a multiple of --patch_size="
                         f"{cfg.patch_size} (a multiple of 4 for the conv stem)")
    t0 = time.time()
    dist = setup_distributed(cfg.device)
    if cfg.batch_size % dist.world_size:
        raise SystemExit(f"config error: batch_size={cfg.batch_size} is not divisible by {dist.world_size} ranks")
    os.makedirs(cfg.out, exist_ok=True)
    if dist.is_master:
        save_json(os.path.join(cfg.out, "config.json"), config_to_dict(cfg))

    # ---- data: tokens once, images in memory, augmentation drawn per (seed, step, sample)
    tok = world_tokenizer(context_length=32)
    train = load_pairs(cfg, "train", cfg.n_train)
    tokens = tok(train["texts"])                                       # (n, 32)
    aug = train_transform(cfg.image_size, kind="clip")
    B, n = cfg.batch_size, cfg.n_train
    perms = {}

    def get_batch(i):
        """Global batch i = positions [i*B, (i+1)*B) of a per-epoch permutation; this rank takes every W-th."""
        pos = i * B + np.arange(B)[dist.rank::dist.world_size]
        idx = []
        for e, p in zip(pos // n, pos % n):
            if e not in perms:
                perms[e] = np.random.default_rng([cfg.seed, int(e)]).permutation(n)
            idx.append(perms[e][p])
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + i) * 1024 + dist.rank)
        x = torch.stack([aug(train["images"][j], g) for j in idx])
        return x.to(dist.device), tokens[idx].to(dist.device)

    # ---- model and loss (same init on every rank; DDP also broadcasts rank 0's weights)
    seed_all(cfg.seed)
    model = clip_tiny(tok.vocab_size, image_size=cfg.image_size, patch_size=cfg.patch_size, stem=cfg.stem)
    model = model.to(dist.device)

    def loss_fn(m, batch):
        img_f, txt_f, scale = m(*batch)
        return clip_loss(img_f, txt_f, scale), {"scale": scale.item()}

    seed_all(cfg.seed, dist.rank)
    hist = fit(model, loss_fn, get_batch, cfg.steps, cfg.out, name="clip", lr=cfg.lr, weight_decay=cfg.weight_decay,
               warmup=cfg.warmup, ckpt_every=cfg.ckpt_every, resume=cfg.resume, dist=dist, log_every=cfg.log_every,
               desc="clip", amp=cfg.amp, compile=cfg.compile, config=config_to_dict(cfg))
    if not dist.is_master:
        dist.cleanup()
        return None

    # ---- evaluation on held-out pairs (rank 0)
    # a --data path without "{split}" has one stream: test on the samples after the training ones
    test = load_pairs(cfg, "test", cfg.n_test, start=cfg.n_train if cfg.data and "{split}" not in cfg.data else 0)
    model.eval()
    prep = eval_transform(cfg.image_size)
    images = torch.stack([prep(im) for im in test["images"]])
    with torch.no_grad():
        img_f = extract_features(model.encode_image, images, device=dist.device)
        txt_f = extract_features(model.encode_text, tok(test["texts"]), device=dist.device)
    res = {"zeroshot_acc": None, "chance": 1.0 / len(class_names("shape"))}
    if test["labels"] is not None:
        clf = zero_shot_classifier(model, tok, class_names("shape"), TEMPLATES, dist.device)
        res["zeroshot_acc"] = zero_shot_accuracy(img_f, clf, test["labels"])
        res["majority"] = float(np.bincount(test["labels"]).max() / len(test["labels"]))
        if train["labels"] is not None:  # what the image tower knows about shape, independent of the text tower
            n_p = min(len(train["texts"]), 2000)
            tr_f = extract_features(model.encode_image, torch.stack([prep(im) for im in train["images"][:n_p]]),
                                    device=dist.device)
            res["linear_probe_acc"] = linear_probe(tr_f, train["labels"][:n_p], img_f, test["labels"])
    r = retrieval_recall(img_f, txt_f)
    res.update(retrieval_mean_r1=r["mean_r1"], retrieval_i2t_r1=r["i2t_r1"], retrieval_t2i_r1=r["t2i_r1"],
               retrieval_mean_r5=r["mean_r5"], retrieval_chance_r1=1.0 / cfg.n_test,
               loss_first=float(np.mean(hist["loss"][:10])) if hist["loss"] else None,
               loss_last=float(np.mean(hist["loss"][-10:])) if hist["loss"] else None,
               steps=cfg.steps, seconds=time.time() - t0, device=dist.device, world_size=dist.world_size)
    save_json(os.path.join(cfg.out, "results.json"), res)
    print_table(res, title=f"common.clip results ({cfg.out})")
    dist.cleanup()
    return res


if __name__ == "__main__":
    main()
