"""MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training (Vasu et al., arXiv:2311.17049)
+ CLIP with Quality Captions (Vasu et al., arXiv:2405.08911), in one file.

  1. Encoders (sec. 4): MCi0/1/2 image and MCt text towers with the released models' exact parameter counts;
     `reparameterize()` folds every train-time branch into one conv. `mci_tiny` / `mct_tiny`: the same blocks, 32 px.
  2. Multi-modal dataset reinforcement (sec. 3, DataCompDR): per image, synthetic captions of a CoCa-style captioner,
     k replayable augmentations with the image embeddings of 2 teacher CLIPs, and the teachers' text embeddings of
     the ground-truth + synthetic captions, as tar shards in the released DataCompDR layout (common.datacompdr) built
     shard by shard over the ranks. --teacher: real open_clip checkpoints instead of the miniature teachers.
  3. Reinforced training (sec. 3.2): L = (1 - lam) L_CLIP + lam L_KD against the teachers' stored similarities, no
     teacher at train time; vs a CLIP baseline at equal seen samples. --reinforced: released DataCompDR shards
     joined by key with --data's image shards, the stored augmentations replayed exactly.
  4. Quality captions (arXiv:2405.08911): the same CLIP on noisy alt-text vs on synthetic captions, zero-shot and
     with frozen-backbone dense probes (segmentation mIoU, depth RMSE) at 100% and 10% of the dense labels.
Miniature (synthetic world, 32 px): the ground truth is the world's noisy alt-text (DataComp's), teachers and
captioner learn from its accurate captions (the big pretrained CLIPs and CoCa), the student is a tiny MCi + MCt;
zero-shot and probes score the two attributes every caption names (the largest object's shape and colour).

    python mobileclip.py [--smoke]       # teachers, captioner, reinforce, baseline/reinforced/quality (smoke: < 45 s)
    python mobileclip.py --seeds=0,1,2   # the default run per seed, paired differences and verdicts (common/seeds.py)
    python mobileclip.py --teacher=a.safetensors,b.safetensors [--bpe=bpe_simple_vocab_16e6.txt.gz] --data=...
    python mobileclip.py --data='images-{00000..00127}.tar' --reinforced='dr-{00000..00127}.tar'   # DataCompDR
    python mobileclip.py reinforce|params   # only the reinforced shards | the encoder counts and reparameterization
    torchrun --nproc_per_node=2 mobileclip.py --data='shards/{split}'   # image-text shards (--holdout: one stream)
Every stage (teachers, captioner, reinforced shards, students) is reused from --out while its fingerprint (the config
values that change it) matches; --resume continues an unfinished one, --retrain builds every stage again.
"""
import io
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from glob import glob

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.config import config_to_dict, parse_config, print_table, run_cli, save_json
from common.data import (SampleSource, Stream, class_names_of, data_report, for_each_shard, key_hash, open_source,
                         read_samples, stack)
from common.datacompdr import DRShards, draw, dr_members, replay
from common.eval import (dense_probe, extract_features, linear_probe, retrieval_recall, zero_shot_accuracy,
                         zero_shot_classifier)
from common.losses import clip_loss, fp32_logits, gather_features
from common.mci import mci0, mci_tiny, mct, mct_tiny, param_table, reparam_rel_err
from common.models import CLIP, Block, VisionTransformer, load_clip_checkpoint, text_tiny, vit_preprocess
from common.seeds import Effect, run_seeds
from common.tokenizer import Tokenizer, tokenizer_for, world_tokenizer
from common.train import TrainConfig, file_id, fit, seed_all, start_run, unwrap
from common.transforms import CenterCrop, Compose, RandomResizedCrop, Resize, ToTensor, eval_transform, to_uint8
from common.world import COLORS, TEMPLATES, World, class_names


@dataclass
class Config:
    """MobileCLIP multi-modal reinforced training + quality-captions study on the synthetic world."""
    out: str = "runs/mobileclip"  # output folder (teachers, captioner, shards and students are reused from here)
    seed: int = 0  # world, init, data order and augmentation all follow from it
    data: str = ""  # tar shards / folder instead of the world ("{split}" -> train / val (captioner) / test)
    val_data: str = ""  # eval data (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    device: str = ""  # cpu | cuda (default: cuda if available)
    retrain: bool = False  # build every stage again, even those --out holds finished with the same config
    resume: bool = False  # continue unfinished stages in --out (same config) from their last checkpoint
    image_size: int = 32  # model input side; the world renders at this size
    context_length: int = 32  # tokens per caption (tokenizer, text towers, captioner)
    embed_dim: int = 128  # joint embedding width of the student and of every teacher (KD compares them per teacher)
    n_train: int = 2000  # world training pairs (all reinforced); --data: the whole train split
    n_cap: int = 1500  # world val pairs (accurate captions) the captioner is trained on; --data: the val split
    n_test: int = 500  # test pairs (at most) for zero-shot, retrieval and the dense probes
    eval_split: str = "test"  # test | val: evaluate on n_test pairs of the val split (the learning-rate sweeps)
    batch_size: int = 64  # global batch of the students and the captioner (split over torchrun ranks)
    steps: int = 110  # optimizer steps of each student run (baseline, reinforced, quality)
    lr: float = 4e-3  # peak learning rate of the baseline (AdamW, cosine); chosen on val (docs/mobileclip.md)
    reinforced_lr: float = 2e-3  # peak learning rate of the reinforced student; chosen on val the same way
    quality_lr: float = 1e-3  # peak learning rate of the quality-captions student; chosen on val the same way
    weight_decay: float = 0.1  # decoupled weight decay (not on norms, biases, embeddings, logit scale)
    warmup: int = 15  # linear warm-up steps
    reinforced: str = ""  # DataCompDR-layout shards (dr-{0000..0127}.tar) joined by key with --data's image shards
    teacher: str = ""  # a.safetensors,b.safetensors: open_clip / OpenAI ViT CLIPs as the teachers (not trained)
    bpe: str = ""  # --teacher: CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) for their tokenizer (else world's)
    teacher_steps: int = 70  # steps of each teacher CLIP (accurate captions)
    teacher_batch: int = 96  # global batch of the teachers
    teacher_lr: float = 2e-3  # peak learning rate of the teachers
    teacher_widths: str = "144,136"  # ViT/text width of each teacher (>= 2 teachers, all larger than the student)
    cap_steps: int = 150  # steps of the captioner (lr 2e-3, weight decay 0.05, 20 warm-up steps)
    cap_encoder: str = "own"  # own: the captioner trains its own tiny MCi with the decoder (CoCa trains its encoder) | teacher0: teacher 0's frozen tokens
    k_aug: int = 3  # stored augmentations per image (paper: 30 for DataCompDR-12M, 10 for -1B)
    n_syn: int = 2  # synthetic captions per image (paper: 5)
    top_k: int = 3  # top-k sampling of the captioner for all but the first (greedy) synthetic caption
    rrc_scale: float = 0.8  # RandomResizedCrop min area of the stored augmentations (32 px: smaller crops lose shape)
    lam: float = 0.75  # weight of the KD loss: L = (1 - lam) CLIP + lam KD (paper: 0.75 for B, 1.0 for S*)
    teacher_scale: float = 100.0  # teacher logit scale in the KD softmax (paper: 100)
    dense_steps: int = 300  # steps of the dense linear probes
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    log_every: int = 25  # log.jsonl row + printed line every N steps
    ckpt_every: int = 0  # checkpoint every N steps of a stage, so that --resume can continue it (0: at its end only)
    seeds: str = ""  # e.g. 0,1,2: the default experiment once per seed -> seeds.json, sweep.png and a verdict per expected effect (common/seeds.py)
    smoke: bool = False  # tiny run (< 45 s) for tests; the fields in SMOKE not given on the command line


SMOKE = dict(n_train=160, n_cap=128, n_test=128, batch_size=32, steps=20, teacher_steps=20, cap_steps=12, k_aug=2,
             dense_steps=30, warmup=5, log_every=10, teacher_widths="144,136", teacher_batch=32)


# 1. Encoders: MCi / MCt and reparameterization live in common/mci.py (also used to load released checkpoints)

# 2. Miniature models: student = tiny MobileCLIP, teachers = larger ViT CLIPs, CoCa-style captioner

def student(vocab_size, cfg):  # the tiny MobileCLIP
    return CLIP(mci_tiny(cfg.embed_dim), mct_tiny(vocab_size, cfg.context_length, cfg.embed_dim))


def teacher(vocab_size, cfg, width):
    """A ViT CLIP wider than the student (the miniature of DataCompDR's ViT-L/14 ensemble). 4-2-2 conv stem and 8 px
    patches (4x4 tokens at 32 px): a ViT learns this world's shapes much faster than with linear 4-px patches."""
    vis = VisionTransformer(cfg.image_size, 8, width, 4, width // 32, 4.0, cfg.embed_dim, stem="conv")
    return CLIP(vis, text_tiny(vocab_size, cfg.context_length, width, 3, width // 32, cfg.embed_dim))


class CrossAttn(nn.Module):
    """Text queries attend to image tokens (CoCa's multimodal decoder, arXiv:2205.01917 sec. 3.2)."""

    def __init__(self, C, heads):
        super().__init__()
        self.h, self.ln = heads, nn.LayerNorm(C)
        self.q, self.kv, self.proj = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)

    def forward(self, x, m):
        B, L, C = x.shape
        q = self.q(self.ln(x)).view(B, L, self.h, -1).transpose(1, 2)
        k, v = self.kv(m).view(B, m.shape[1], 2, self.h, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))


class Captioner(nn.Module):
    """Causal text decoder with cross-attention to image tokens (CoCa's captioning head). enc=None: img are a frozen
    encoder's tokens computed outside (teacher 0's ViT tokens after ln_post); enc (an MCi trained with the decoder, as
    CoCa trains its image encoder): img are images. tokens (B, L), img (B, M, Ci) or (B, 3, H, W) -> next-token
    logits (B, L, V); memory=encode(img) given instead of img: generation encodes each image once."""

    def __init__(self, vocab_size, context_length, img_width, width=128, layers=2, heads=4, enc=None):
        super().__init__()
        self.enc = enc
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(0.01 * torch.randn(context_length, width))
        self.img = nn.Sequential(nn.LayerNorm(img_width), nn.Linear(img_width, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.cross = nn.ModuleList([CrossAttn(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def encode(self, img):  # -> the memory the decoder attends to (B, M, width); own encoder: its hypercolumn grid
        return self.img(self.enc.patch_tokens(img)[0] if self.enc is not None else img)

    def forward(self, tokens, img, last_only=False, memory=None):
        x, m = self.tok(tokens) + self.pos[:tokens.shape[1]], self.encode(img) if memory is None else memory
        for b, c in zip(self.blocks, self.cross):
            x = b(x, causal=True)
            x = x + c(x, m)
        return self.head(self.ln(x[:, -1:] if last_only else x))  # generation needs only the last position


@torch.no_grad()
def generate(cap, mem, tok, top_k=0, gen=None):
    """Greedy (top_k=0) or top-k sampled captions for the captioner's inputs (frozen tokens (B, M, C) or images)
    -> list[str]."""
    eot = tok.eot_token_id
    seq = torch.full((mem.shape[0], 1), tok.sot_token_id, dtype=torch.long, device=mem.device)
    mem = cap.encode(mem)
    done = torch.zeros(mem.shape[0], dtype=torch.bool, device=mem.device)
    for _ in range(tok.context_length - 1):
        logits = cap(seq, None, last_only=True, memory=mem)[:, -1].float()
        if top_k:
            v, i = logits.topk(top_k, -1)
            nxt = i.gather(1, torch.multinomial(v.softmax(-1).cpu(), 1, generator=gen).to(i.device))[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= nxt == eot
        if done.all():
            break
    return [tok.decode(s[:s.index(eot)] if eot in s else s).strip() for s in seq[:, 1:].tolist()]


# 3. Data: every stage trains from a common.data.Stream; its transforms bring any input size to image_size

KEEP = ("image", "caption", "alt_text", "label", "label_fine", "seg", "depth")  # the world fields the stages read


def label_tasks(cfg, names):
    """The zero-shot / linear-probe tasks {name: (class names, sample -> label)}. The world: the largest object's
    shape and its colour, both named in every accurate caption (issue #18 item 2: the mean accuracy over attributes
    the captions carry; at 32 px and this budget a CLIP learns colour long before shape, docs/mobileclip.md).
    --data: its labels with the names of classes.txt. None: no labels (zero-shot and probes n/a)."""
    if names is None:
        return None
    if cfg.data:
        return {"label": (names, lambda s: int(s["label"]))}
    return {"shape": (names, lambda s: int(s["label"])),
            "color": (list(COLORS), lambda s: int(s["label_fine"]) % len(COLORS))}


def base_aug(S):
    """Standard CLIP augmentation of the baseline (open_clip: RRC scale (0.9, 1), no flip); MobileCLIP: no mean/std.
    Also the teachers' light crop: at 32 px a stronger crop cuts the shape out."""
    return Compose([ToTensor(), RandomResizedCrop(S, scale=(0.9, 1.0))])


def eval_view(S):
    """Shorter side to S, centre crop: what the captioner, the teachers' memory and the evaluation see."""
    return Compose([ToTensor(), Resize(S), CenterCrop(S)])


def clip_tf(aug, tok, field):
    """Stream transform of a contrastive stage: augmented image, tokens of sample[field]."""
    return lambda s, g: {"image": aug(s["image"], g), "text": tok([s[field]])[0]}


def eval_set(src, n, S, tasks=None, skip=0):
    """One pass of up to n samples (after the first `skip`) -> dict(rows (for data_report), images uint8 (n, S, S, 3), accurate, labels
    {task: (n,) int} | None, seg | None, depth | None); seg and depth follow the image's resize and crop (nearest)."""
    view, dview = eval_view(S), Compose([Resize(S, "nearest"), CenterCrop(S)])
    rows = read_samples(src, n, lambda s: {
        "__key__": s["__key__"], "image": to_uint8(view(s["image"])), "accurate": s["caption"],
        **({f"label/{t}": fn(s) for t, (_, fn) in tasks.items()} if tasks else {}),
        **{k: dview(torch.from_numpy(np.asarray(s[k], np.float32))[None])[0] for k in ("seg", "depth") if k in s}})
    del rows[:skip]
    col = lambda k: stack(rows, k).numpy() if all(k in r for r in rows) else None  # noqa: E731
    return {"rows": rows, "images": col("image"), "accurate": stack(rows, "accurate"),
            "labels": {t: col(f"label/{t}") for t in tasks} if tasks else None, "seg": col("seg"), "depth": col("depth")}


# 4. Reinforced dataset (DataCompDR layout, sec. 3.1), built by streaming the training source shard by shard

def dr_sample(key, image, gt, paug, syn, image_emb, text_emb):
    """One reinforced sample in DataCompDR's released layout (common.datacompdr: paug.json {"param_aug": JSON string
    of k entries [[i, j, h, w], [[op_idx, magnitude], ...]]}, syn.json {"syn_text": [...]}, npz {image_emb (k, D),
    text_emb (1 + n_syn, D)} float32, json {"uid"}), plus the image (png, lossless, at its own size: the boxes are in
    its pixels) and its ground-truth caption (txt), which DataCompDR keeps in the separate image shards; with them a
    shard set trains on its own, and without them it joins with image shards by key (--reinforced)."""
    png = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(png, format="PNG", compress_level=1)
    return {**dr_members(key, paug, syn, image_emb, text_emb), "png": png.getvalue(), "txt": gt.encode()}


def dr_tf(cfg, tok, quality=False):
    """Stream transform of reinforced samples (DRShards): one random stored augmentation replayed pixel-exactly at
    the student's size (datacompdr.replay; the released training also swaps in its own size and interpolation), the
    ground truth and one random synthetic caption, each with its teacher embeddings. quality=True: the
    quality-captions CLIP's sample instead (the baseline's augmentation, one random synthetic caption)."""
    base = base_aug(cfg.image_size)

    def tf(s, g):
        syn = s["syn_text"]
        c = int(torch.randint(len(syn), (1,), generator=g))
        if quality:
            return {"image": base(s["image"], g), "text": tok([syn[c]])[0]}
        a = int(torch.randint(len(s["param_aug"]), (1,), generator=g))
        return {"image": replay(s["image"], s["param_aug"][a], cfg.image_size), "gt": tok([s["caption"]])[0],
                "syn": tok([syn[c]])[0], "t_img": np.asarray(s["image_emb"][a], np.float32),
                "t_gt": np.asarray(s["text_emb"][0], np.float32),
                "t_syn": np.asarray(s["text_emb"][s["n_gt"] + c], np.float32)}
    return tf


def image_tokens(model, x, prep=None):
    """The image tokens a captioner attends to: a ViT's tokens after ln_post, an MCi's last feature map (B, M, C).
    prep: float images in [0, 1] -> the model's own input (a --teacher checkpoint)."""
    x = prep(x) if prep is not None else x
    v = model.visual
    return v.forward_tokens(x) if hasattr(v, "forward_tokens") else v.patch_tokens(x)[0]


@torch.no_grad()
def reinforce(cfg, dist, tok, src, gt, teachers, cap, mem_fn, rdir, fp, t_toks, t_preps, chunk=250):
    """The reinforced shards in rdir: common.data.for_each_shard deals the input units (a tar shard, or 500 world
    samples) to the ranks; each becomes one output shard of dr_members, in chunks of `chunk` samples: synthetic
    captions (first greedy, the others top-k sampled, as DataCompDR's CoCa), k stored augmentations with the teachers'
    image embeddings, the teachers' text embeddings of [ground truth] + synthetic captions. Each teacher embeds the
    very view the student replays, through its own preprocessing (t_preps; None: the miniature teachers' input) and
    its own tokenizer (t_toks); its embeddings are L2-normalised, then concatenated (DataCompDR's 2 x 768). A killed
    build resumes at its first missing shard; shards of another fingerprint fp are removed first."""
    t0, dev, view = time.time(), dist.device, eval_view(cfg.image_size)
    for m in (*teachers, cap):
        m.eval()
    pre = lambda k, x: t_preps[k](x) if t_preps[k] is not None else x  # noqa: E731

    def build(samples):
        it = iter(samples)
        while rows := list(itertools.islice(it, chunk)):
            keys = [s["__key__"] for s in rows]
            mem = mem_fn(torch.stack([view(s["image"]) for s in rows]).to(dev))  # the captioner's memory
            g = torch.Generator().manual_seed(key_hash(f"{cfg.seed}/syn/{keys[0]}"))
            syn = [list(c) for c in zip(*[generate(cap, mem, tok, cfg.top_k if j else 0, g) for j in range(cfg.n_syn)])]
            views = [draw(s["image"], torch.Generator().manual_seed(key_hash(f"{cfg.seed}/aug/{k}/{a}")),
                          cfg.image_size, scale=(cfg.rrc_scale, 1.0)) for k, s in zip(keys, rows) for a in range(cfg.k_aug)]
            X = torch.stack([x for x, _ in views]).to(dev)
            img_emb = torch.cat([F.normalize(t.encode_image(pre(k, X)).float(), dim=-1) for k, t in
                                 enumerate(teachers)], -1).view(len(rows), cfg.k_aug, -1)
            texts = [t for s, sy in zip(rows, syn) for t in [s[gt], *sy]]
            txt_emb = torch.cat([F.normalize(t.encode_text(tt(texts).to(dev)).float(), dim=-1) for t, tt in
                                 zip(teachers, t_toks)], -1).view(len(rows), 1 + cfg.n_syn, -1)
            for j, s in enumerate(rows):
                paug = [p for _, p in views[j * cfg.k_aug:(j + 1) * cfg.k_aug]]
                yield keys[j], dr_sample(keys[j], s["image"], s[gt], paug, syn[j], img_emb[j].cpu().numpy(),
                                         txt_emb[j].cpu().numpy())

    paths = for_each_shard(src, rdir, build, dist, shard_size=500, prefix="shard", fingerprint=fp)
    dist.print(f"reinforce: {src.name} x {cfg.k_aug} augs x {len(teachers)} teachers -> {len(paths)} shards in {rdir} "
               f"({time.time() - t0:.1f}s)")


# 5. Losses (sec. 3.2; open_clip_v1.patch DistillClipLoss / DRClipLoss): each *_objective is one stage's loss_fn.
#    Logits in at least fp32, under autocast too (fp32_logits): at scale 100, bf16 errors are noise to the softmax.

def kd_loss(img_f, txt_f, scale, t_img, t_txt, t_scale, dims):
    """KD = 1/2 [CE(P_T^{i->t}, S^{i->t}) + CE(P_T^{t->i}, S^{t->i})], CE(P, S) = -mean_rows sum_j P log softmax(S).
    Cross-entropy, not KL: same gradients, but the value at teacher = student is the teacher entropy, not 0.
    P_T: mean over teachers of softmax(t_scale A_k B_k^T), A_k, B_k teacher k's L2-normalised slice (dims[k] wide) of
    the stored embeddings (--distill-average-after-softmax). Local rows vs all gathered columns: works under DDP."""
    offsets = np.cumsum([0, *dims[:-1]]).tolist()
    teacher_probs = lambda a, b: sum(fp32_logits(a[:, o:o + d], b[:, o:o + d], t_scale).softmax(-1)  # noqa: E731
                                     for o, d in zip(offsets, dims)) / len(dims)
    up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731 - fp64 stays fp64
    img_f, txt_f, t_img, t_txt = up(img_f), up(txt_f), up(t_img), up(t_txt)  # the gathers' all-reduce in fp32 too
    all_txt, all_img, all_t_txt, all_t_img = (gather_features(f)[0] for f in (txt_f, img_f, t_txt, t_img))
    with torch.autocast(img_f.device.type, enabled=False):
        ce = lambda P, S: -(P * S.log_softmax(-1)).sum(-1).mean()  # noqa: E731
        i2t = ce(teacher_probs(t_img, all_t_txt), fp32_logits(img_f, all_txt, scale))
        t2i = ce(teacher_probs(t_txt, all_t_img), fp32_logits(txt_f, all_img, scale))
        return 0.5 * (i2t + t2i)


def clip_objective():
    """CLIP loss on {"image", "text"} batches (baseline, quality student, teachers). The teachers have no label term:
    a shape-label channel only they had would reach the reinforced student through KD and not the baseline (#18)."""

    def loss_fn(m, b):
        img_f, txt_f, s = m(b["image"], b["text"])
        return clip_loss(img_f, txt_f, s), {"scale": s.item()}
    return loss_fn


def dr_objective(lam, teacher_scale, dims):
    """The student on the reinforced shards (dr_tf batches): L = sum_{texts in (gt, syn)} (1 - lam) CLIP + lam KD
    (DRClipLoss). No teacher forward."""

    def loss_fn(m, b):
        x = b["image"]
        img_f, txt_f, s = m(x, torch.cat([b["gt"], b["syn"]]))
        B, tot, kd = len(x), 0.0, 0.0
        for tf, tt in ((txt_f[:B], b["t_gt"]), (txt_f[B:], b["t_syn"])):
            k = kd_loss(img_f, tf, s, b["t_img"], tt, teacher_scale, dims)
            tot = tot + (1 - lam) * clip_loss(img_f, tf, s) + lam * k
            kd = kd + k.item() / 2
        return tot, {"kd": kd, "scale": s.item()}
    return loss_fn


def caption_objective(memory, eot):
    """Next-token cross-entropy of the captioner (padding after EOT ignored); memory(images) = the frozen image
    encoder's tokens the decoder attends to (image_tokens of teacher 0); None: the captioner's own encoder (trained)."""

    def loss_fn(m, b):
        t = b["text"]
        with torch.no_grad():
            mm = memory(b["image"]) if memory is not None else b["image"]
        keep = torch.arange(t.shape[1] - 1, device=t.device)[None] < (t == eot).float().argmax(1, keepdim=True)
        return F.cross_entropy(m(t[:, :-1], mm)[keep].float(), t[:, 1:][keep])
    return loss_fn


# 6. Evaluation: zero-shot, retrieval, dense probes (frozen backbone + linear heads), sample efficiency

@torch.no_grad()
def evaluate(model, tok, test, dev, tasks=None, probe=None, prep=None):
    """Per task of label_tasks: zero-shot accuracy over its class names (prompt ensemble) and, with probe (a train
    subset), a linear probe of the label on the frozen image embedding; "zeroshot_acc" / "probe_acc" are their means
    over the tasks. Also mean R@1 image <-> accurate caption. prep: float images in [0, 1] -> the model's input (a
    --teacher checkpoint's own size and normalisation)."""
    m = unwrap(model)
    was, res = m.training, {}
    m.eval()
    enc = (lambda x: m.encode_image(prep(x))) if prep is not None else m.encode_image  # noqa: E731
    img_f = extract_features(enc, test["images"], device=dev)
    if tasks and test["labels"] is not None:
        pf = extract_features(enc, probe["images"], device=dev) if probe is not None and probe["labels"] else None
        res["zeroshot"], res["probe"] = {}, {}
        for t, (names, _) in tasks.items():
            clf = zero_shot_classifier(m, tok, names, TEMPLATES, dev)
            res["zeroshot"][t] = zero_shot_accuracy(img_f, clf, test["labels"][t])
            if pf is not None:
                res["probe"][t] = linear_probe(pf, probe["labels"][t], img_f, test["labels"][t])
        res["zeroshot_acc"] = float(np.mean(list(res["zeroshot"].values())))
        res["probe_acc"] = float(np.mean(list(res["probe"].values()))) if res["probe"] else None
    txt_f = extract_features(m.encode_text, tok(test["accurate"]), device=dev)
    res["retrieval_r1"] = retrieval_recall(img_f, txt_f)["mean_r1"]
    m.train(was)
    return res


def chance_and_majority(test, tasks):
    """Mean over the tasks of chance (1 / classes) and of the majority-class rate of the test labels: the bars of
    the representation checks (#18 item 2; a bar from the test labels' frequency, not a tuned number)."""
    ch = [1.0 / len(names) for names, _ in tasks.values()]
    mj = [float(np.bincount(test["labels"][t]).max() / len(test["labels"][t])) for t in tasks]
    return float(np.mean(ch)), float(np.mean(mj))


# Expected effects (common/seeds.py): the papers' claims as paired differences over seeds
PROBE_BAR = lambda r: max(2 * r["chance"], r["majority"] + 0.15)  # noqa: E731 - #18 item 2
EFFECTS = [
    Effect("reinforced > baseline zero-shot (mean of shape, colour)", "reinforced_zeroshot_acc",
           "baseline_zeroshot_acc", paper="MobileCLIP (arXiv:2311.17049): reinforced training 10x-1000x more "
           "learning-efficient than non-reinforced CLIP; ViT-B/16 on DataCompDR +2.9% avg over 38 benchmarks"),
    Effect("quality captions: seg mIoU up (frozen probe)", "quality_miou", "alt_miou",
           paper="Quality Captions (arXiv:2405.08911): +12.1% mIoU (ViT-B/16, vs MAE); synthetic vs alt-text"),
    Effect("quality captions: depth RMSE down (frozen probe)", "quality_depth_rmse", "alt_depth_rmse", sign=-1,
           paper="Quality Captions (arXiv:2405.08911): -11.5% RMSE (ViT-B/16, vs MAE); synthetic vs alt-text"),
    *[Effect(f"{k} probe >= max(2 chance, majority + .15)", f"probe_acc.{k}", PROBE_BAR,
             paper="(representation check, #18 item 2)") for k in ("baseline", "reinforced", "quality")],
]


# 7. main: params -> teachers -> captioner -> reinforce -> baseline / reinforced / quality -> evaluation

def load_teachers(cfg):
    """--teacher=a.safetensors,b.safetensors: per file (the open_clip / OpenAI CLIP on the CPU, its tokenizer (CLIP's
    BPE from --bpe, else the world's when its vocabulary is exactly the world's), prep: float images in [0, 1] ->
    its input at its own image size and normalisation (open_clip's eval transform, `model.preprocess`), the
    fingerprint entry of the file). A missing, truncated or mismatched file raises CheckpointError naming it."""
    out = []
    for path in [p for p in cfg.teacher.split(",") if p]:
        model = load_clip_checkpoint(path)
        tok = tokenizer_for(model.text.vocab_size, model.text.context_length, cfg.bpe, f"--teacher {path}")
        pp = getattr(model, "preprocess", None) or vit_preprocess(model.visual.image_size)
        one = eval_transform(**pp)
        out.append((model, tok, lambda x, one=one: torch.stack([one(v) for v in x.float().cpu()]).to(x.device),
                    {"teacher": os.path.abspath(path), **file_id(path), "preprocess": dict(pp),
                     "bpe": os.path.abspath(cfg.bpe) if cfg.bpe else "world"}))
    if len(out) < 2:
        raise SystemExit(f"config error: --teacher={cfg.teacher!r}; need >= 2 comma-separated .safetensors files "
                         "(DataCompDR's ensemble of 2 CLIPs)")
    return out


def main(argv=None):
    cfg = parse_config(Config, argv, commands=["all", "reinforce", "params"], presets={"smoke": SMOKE})
    if cfg.seeds:
        return run_seeds(main, argv, cfg, EFFECTS)
    if cfg.eval_split not in ("test", "val"):
        raise SystemExit(f"config error: eval_split={cfg.eval_split!r}; expected test or val")
    if cfg.bpe and not cfg.teacher:
        raise SystemExit("config error: --bpe describes the --teacher checkpoints' tokenizer; give --teacher too")
    if cfg.reinforced and (not cfg.data or cfg.teacher):
        raise SystemExit("config error: --reinforced=DR shards join --data's image shards by key; give --data, and no "
                         "--teacher (the stored embeddings replace teachers, captioner and generation)")
    cmd, t0, dist = getattr(cfg, "_command", None) or "all", time.time(), start_run(cfg, ("batch_size", "teacher_batch"))
    widths = [int(w) for w in cfg.teacher_widths.split(",")]
    if not cfg.teacher and (len(widths) < 2 or min(widths) <= 128):
        raise SystemExit(f"config error: teacher_widths={cfg.teacher_widths!r}; need >= 2 widths > 128 (the student's)")
    res = {}

    def finish(title):  # rank 0: results.json and the table
        res.update(seconds=time.time() - t0, device=dist.device, world_size=dist.world_size)
        save_json(os.path.join(cfg.out, "results.json"), res)
        print_table({k: v for k, v in res.items() if k not in ("example", "data_by_stage")}, title=title)
        dist.cleanup()
        return res

    if dist.is_master:
        # ---- 1. encoders: exact counts and reparameterization equivalence (random BN stats / layer scales)
        res["params"] = param_table()
        seed_all(cfg.seed)
        mi, mt = ((mci_tiny(cfg.embed_dim), mct_tiny(1000, cfg.context_length, cfg.embed_dim)) if cfg.smoke
                  else (mci0(), mct()))
        x, t = torch.rand(2, 3, 64, 64), torch.randint(1, 999, (2, 20))
        res["reparam_max_rel_err"] = max(reparam_rel_err(mi, x), reparam_rel_err(mt, t))
        res["reparam_models"] = "mci_tiny+mct_tiny" if cfg.smoke else "mci0+mct"
        del mi, mt
    if cmd == "params":
        return finish("MobileCLIP encoders") if dist.is_master else dist.cleanup()
    rdir = os.path.join(cfg.out, "reinforced")  # the reinforced shards
    if cfg.retrain and dist.is_master:  # every stage again: remove what fit / for_each_shard would reuse or continue
        for p in glob(os.path.join(cfg.out, "*.safetensors")):
            os.remove(p)
        shutil.rmtree(rdir, ignore_errors=True)
    dist.barrier()

    # ---- data: web pairs (ground truth = alt-text where the samples have it), held-out pairs with accurate captions
    #      for the captioner ("val"), test pairs; all streamed (common.data), the world rendered once and cached
    dev, S = dist.device, cfg.image_size
    tok = Tokenizer.from_file(cfg.bpe, context_length=cfg.context_length) if cfg.bpe else \
        world_tokenizer(context_length=cfg.context_length)  # the students' and the captioner's
    world = lambda split: World(seed=cfg.seed, split=split, size=S)  # noqa: E731
    peek = read_samples(open_source(cfg.data, "train", world=world, n=1, holdout=cfg.holdout), 1)
    if "caption" not in peek[0]:
        raise ValueError(f"--data {cfg.data!r}: sample {peek[0]['__key__']!r} has no caption; MobileCLIP needs "
                         "image-text pairs (a .txt member in the shards, or captions.jsonl beside the images)")
    gt = "alt_text" if "alt_text" in peek[0] else "caption"
    need = ("image", "caption") + ((gt,) if gt != "caption" else ())
    src = lambda split, n: open_source(cfg.data, split, world=world, n=n, val_data=cfg.val_data,  # noqa: E731
                                       holdout=cfg.holdout, require=need, keep=KEEP)
    train_src, cap_src = src("train", cfg.n_train), src("val", cfg.n_cap)
    names = (class_names_of(train_src, None if cfg.data else class_names("shape"))  # zero-shot: labels and names
             if "label" in peek[0] else None)  # (never the world's names on real data)
    tasks = label_tasks(cfg, names)
    if cfg.eval_split == "val":  # the lr sweeps: val pairs after the captioner's (no stage trains on them)
        test = eval_set(src("val", cfg.n_cap + cfg.n_test), cfg.n_cap + cfg.n_test, S, tasks, skip=cfg.n_cap)
    else:
        test = eval_set(src("test", cfg.n_test), cfg.n_test, S, tasks)
    probe = eval_set(train_src, min(cfg.n_train, 1000), S, tasks)
    dist.print(f"data: train {train_src.name}, captioner {cap_src.name}, {cfg.eval_split} {len(test['rows'])} of "
               f"{test['rows'].name if cfg.eval_split == 'test' else 'val'}; teachers and captioner read 'caption', "
               f"the students' ground truth is '{gt}'" + (f"; zero-shot tasks {list(tasks)}" if tasks else
                                                           "; no labels: zero-shot and probes n/a"))

    # ---- every stage: one common.train.fit on its own stream, reused from --out while its fingerprint fp matches
    streams, hdr, clock = {}, config_to_dict(cfg), {"start": time.time() - t0}
    tc = TrainConfig(cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                     ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, amp=cfg.amp, resume=cfg.resume)
    pick = lambda *keys: {k: getattr(cfg, k) for k in keys}  # noqa: E731

    def fingerprint(tc, batch_size, *keys, **kw):  # the data, the optimisation, the batch, cfg[keys] and kw
        opt = {k: v for k, v in vars(tc).items() if k not in ("ckpt_every", "log_every", "resume")}
        data = pick("seed", "data", "val_data", "holdout", "image_size", "context_length", *keys)
        return {**data, **opt, "batch_size": batch_size, **kw}

    def train(name, model, loss_fn, source, B, transform, tc, fp, tag):
        for st in streams.values():  # the finished stages' loader workers are let go
            st.close()
        streams[name] = Stream(source, B // dist.world_size, transform, seed=1000 * cfg.seed + tag,
                               num_workers=cfg.num_workers, dist=dist, name=name)
        seed_all(cfg.seed + tag, dist.rank)  # the stage's in-loss randomness
        fit(model, loss_fn, streams[name], tc, cfg.out, name, dist, fingerprint=fp, config=hdr)
        clock[name] = time.time() - t0

    # ---- --reinforced: released-layout shards hold the teachers' embeddings and the synthetic captions: no teachers,
    #      no captioner, no generation; else they are built here (rdir)
    teachers, t_toks, t_preps, r_fp = [], [], [], {"reinforced": cfg.reinforced}
    if not cfg.reinforced:
        # ---- teachers: >= 2 ViT CLIPs wider than the student on the accurate captions with a light crop (no label
        #      term: the baseline has no such channel), or --teacher checkpoints at their own size and preprocessing
        if cfg.teacher:
            loaded = load_teachers(cfg)
            teachers = [m.to(dev).eval() for m, _, _, _ in loaded]
            t_toks, t_preps, t_fps = [x[1] for x in loaded], [x[2] for x in loaded], [x[3] for x in loaded]
        else:
            teacher_tc, teachers, t_fps = replace(tc, steps=cfg.teacher_steps, lr=cfg.teacher_lr), [], []
            for k, w in enumerate(widths):
                T = teacher(tok.vocab_size, cfg, w).to(dev)
                t_fps.append(fingerprint(teacher_tc, cfg.teacher_batch, "n_train", "embed_dim", width=w))
                train(f"teacher{k}", T, clip_objective(), train_src, cfg.teacher_batch,
                      clip_tf(base_aug(S), tok, "caption"), teacher_tc, t_fps[-1], 10 + k)
                teachers.append(T.eval())
            t_toks, t_preps = [tok] * len(teachers), [None] * len(teachers)

        # ---- captioner (CoCa-style, on teacher 0's frozen image tokens and held-out accurate captions), then the shards
        #      own (default): a tiny MCi trained from scratch with the decoder, as CoCa trains its encoder
        if cfg.cap_encoder not in ("own", "teacher0"):
            raise SystemExit(f"config error: cap_encoder={cfg.cap_encoder!r}; expected own or teacher0")
        own = cfg.cap_encoder == "own"
        seed_all(cfg.seed + 7)
        enc = mci_tiny(cfg.embed_dim).to(dev) if own else None
        if own:
            enc.proj = None  # the decoder reads the feature maps, not the pooled projection (unused under DDP)
        frozen = lambda x: image_tokens(teachers[0], x, t_preps[0])  # noqa: E731
        with torch.no_grad():
            mem_width = (enc.patch_tokens if own else frozen)(torch.zeros(1, 3, S, S, device=dev))
            mem_width = (mem_width[0] if own else mem_width).shape[-1]
        cap = Captioner(tok.vocab_size, cfg.context_length, mem_width, enc=enc).to(dev)
        mem_fn, view = ((lambda x: x) if own else frozen), eval_view(S)
        cap_tc = replace(tc, steps=cfg.cap_steps, lr=2e-3, weight_decay=0.05, warmup=20)
        cap_fp = fingerprint(cap_tc, cfg.batch_size, "n_cap", **({"encoder": "own mci_tiny"} if own else
                                                                  {"teacher0": t_fps[0]}))
        train("captioner", cap, caption_objective(None if own else frozen, tok.eot_token_id), cap_src,
              cfg.batch_size, lambda s, g: {"image": view(s["image"]), "text": tok([s["caption"]])[0]}, cap_tc, cap_fp, 7)
        r_fp = {"teachers": t_fps, "captioner": cap_fp, "ground_truth": gt, "layout": "datacompdr", **pick("k_aug", "n_syn", "top_k", "rrc_scale")}
        reinforce(cfg, dist, tok, train_src, gt, teachers, cap, mem_fn, rdir, r_fp, t_toks, t_preps)
        clock["reinforce"] = time.time() - t0
        if cmd == "reinforce":
            return dist.cleanup()

    # ---- students (same init): baseline on the ground truth; reinforced and quality read the shards back; each
    #      with its own learning rate, chosen on val with the same grid (docs/mobileclip.md)
    if cfg.reinforced:  # image shards of the train split joined by key with the DR shards (common.datacompdr)
        one = cfg.data.replace("{split}", "train")
        rsrc = DRShards(one, cfg.reinforced, split=None if "{split}" in cfg.data else "train",
                        holdout=0.0 if "{split}" in cfg.data else cfg.holdout, require=("image", "caption"))
    else:
        rsrc = DRShards(rdir, require=("image", "caption"))  # the shards built above, self-contained
    rsrc = rsrc if cfg.data else SampleSource(read_samples(rsrc, cfg.n_train), rsrc.name)  # world: in memory
    runs = {}
    s_fp = fingerprint(tc, cfg.batch_size, "n_train", "embed_dim", ground_truth=gt)
    if teachers:  # each teacher's slice of the stored embeddings
        dims = [int(t.encode_text(torch.zeros(1, tt.context_length, dtype=torch.long, device=dev)).shape[-1])
                for t, tt in zip(teachers, t_toks)]
    else:  # --reinforced: DataCompDR's 2 teachers of equal width (2 x 768)
        D = len(read_samples(rsrc, 1)[0]["image_emb"][0])
        dims = [D // 2, D - D // 2]
    for name, tag, source, transform, loss_fn, lr, extra in (
            ("baseline", 1, train_src, clip_tf(base_aug(S), tok, gt), clip_objective(), cfg.lr, {}),
            ("reinforced", 2, rsrc, dr_tf(cfg, tok), dr_objective(cfg.lam, cfg.teacher_scale, dims),
             cfg.reinforced_lr, {"shards": r_fp, **pick("lam", "teacher_scale")}),
            ("quality", 3, rsrc, dr_tf(cfg, tok, True), clip_objective(), cfg.quality_lr, {"shards": r_fp})):
        seed_all(cfg.seed)
        runs[name], stc = student(tok.vocab_size, cfg).to(dev), replace(tc, lr=lr)
        fp = {**s_fp, **fingerprint(stc, cfg.batch_size), **extra}
        train(name, runs[name], loss_fn, source, cfg.batch_size, transform, stc, fp, tag)
    # provenance (collective): all stages together, and each stage alone (a stage sees each key once per epoch)
    res["data"] = data_report(list(streams.values()), [test["rows"]], dist)
    res["data_by_stage"] = {k: data_report([s], [test["rows"]], dist) for k, s in streams.items()}
    if not dist.is_master:
        return dist.cleanup()

    # ---- evaluation (rank 0), on the test split (or the val pairs of --eval_split=val)
    ev = {k: evaluate(m, tok, test, dev, tasks, probe) for k, m in runs.items()}
    ev_t = [evaluate(t, tt, test, dev, tasks, probe, pp) for t, tt, pp in zip(teachers, t_toks, t_preps)]
    for key in ("zeroshot_acc", "retrieval_r1"):
        res.update({f"{k}_{key}": ev[k].get(key) for k in runs}, **{f"teacher_{key}": [e.get(key) for e in ev_t]})
    res.update(eval_split=cfg.eval_split, lrs={k: getattr(cfg, f) for k, f in
                                              (("baseline", "lr"), ("reinforced", "reinforced_lr"),
                                               ("quality", "quality_lr"))},
               probe_acc={**{k: ev[k].get("probe_acc") for k in runs}, "teachers": [e.get("probe_acc") for e in ev_t]},
               zeroshot_by_task={**{k: ev[k].get("zeroshot") for k in runs},
                                 **{f"teacher{i}": e.get("zeroshot") for i, e in enumerate(ev_t)}},
               probe_by_task={**{k: ev[k].get("probe") for k in runs},
                              **{f"teacher{i}": e.get("probe") for i, e in enumerate(ev_t)}},
               retrieval_chance_r1=1.0 / len(test["images"]),
               caption_fields={"teachers_captioner": "caption", "ground_truth": gt})
    if tasks and test["labels"] is not None:
        res["chance"], res["majority"] = chance_and_majority(test, tasks)
    if test["seg"] is not None and probe["seg"] is not None and test["depth"] is not None:
        # quality captions: linear seg / depth heads on the frozen patch features of the alt-text CLIP (the baseline)
        # and of the quality CLIP (synthetic captions only)
        C = int(max(probe["seg"].max(), test["seg"].max())) + 1  # seg values are class ids, 0 = background
        for tag, frac in (("", 1.0), ("_10pct", 0.1)):
            a, q = (dense_probe(unwrap(runs[k]).visual.eval().patch_tokens, probe["images"], probe["seg"],
                                probe["depth"], test["images"], test["seg"], test["depth"], C, steps=cfg.dense_steps,
                                label_fraction=frac, seed=cfg.seed) for k in ("baseline", "quality"))
            res.update({f"alt_miou{tag}": a["miou"], f"quality_miou{tag}": q["miou"],
                        f"alt_depth_rmse{tag}": a["depth_rmse"], f"quality_depth_rmse{tag}": q["depth_rmse"]})
    else:
        res["dense_probes"] = "n/a: the data has no seg and depth members"
    ex, clock["eval+dense"] = read_samples(rsrc, 1)[0], time.time() - t0
    res.update(example={"key": ex["__key__"], "ground_truth": ex["caption"], "synthetic": ex["syn_text"]}, loss_curves_in="log.jsonl", stage_end_seconds=clock)  # rank 0's wall clock
    return finish(f"MobileCLIP results ({cfg.out})")


if __name__ == "__main__":
    run_cli(main)
