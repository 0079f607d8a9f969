"""SAM-CLIP: Merging Vision Foundation Models towards Semantic and Spatial Understanding (Wang et al., arXiv:2310.15308)
and CLIP meets Model Zoo Experts: Pseudo-Supervision for Visual Enhancement (Salehi et al., arXiv:2310.14108), in
miniature on the synthetic world (no official code exists; recipe, deviations and results: docs/samclip.md).

--mode=merge: a SAM-shaped and a CLIP teacher become one ViT (SAM's encoder and head + a new CLIP head): stage 1 probes
the head on the frozen backbone, stage 2 trains all with L_CLIP + lam * L_SAM on a SAM replay memory (ablation: no
replay); zero-shot segmentation from the CLIP head, refined by SAM-head prompts. --mode=zoo: CLIP with extra dense heads
on offline expert pseudo-labels vs plain CLIP (--mode=experts trains the experts). A finished stage with the same
fingerprint is reused. --clip_teacher=FILE.safetensors (open_clip / OpenAI ViT CLIP) replaces the miniature teacher.

    python samclip.py --clip_teacher=ViT-B-16.safetensors --bpe=bpe_simple_vocab_16e6.txt.gz --mode=merge
"""
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.config import config_to_dict, parse_config, print_table, run_cli, save_json
from common.data import (Stream, Zip, class_names_of, data_report, decode_npy, for_each_shard, iter_samples, key_hash,
                         open_source, read_samples)
from common.eval import (dense_probe, depth_rmse, extract_features, linear_probe, seg_miou, zero_shot_accuracy,
                         zero_shot_classifier)
from common.losses import clip_loss, fp32_logits
from common.models import CLIP, Block, text_tiny, vit_tiny
from common.plot import image_grid
from common.seeds import Effect, run_seeds, summarize
from common.tokenizer import world_tokenizer
from common.train import TrainConfig, fit, load_weights, no_decay, seed_all, start_run
from common.transforms import CenterCrop, Resize, normalize, to_tensor, to_uint8
from common.world import COLORS, SHAPES, SIZES, TEMPLATES, TEXTURES, World, class_names


@dataclass
class Config:
    """SAM-CLIP merging + CLIP-meets-model-zoo pseudo-supervision on the synthetic world."""
    out: str = "runs/samclip"  # output folder (teachers, stages and per-sample shards are cached here and reused)
    retrain: bool = False  # build every stage again (else a finished stage with the same fingerprint is reused)
    resume: bool = False  # continue an unfinished stage (same fingerprint) from its checkpoint in --out
    steps: int = 0  # > 0: the steps of every trained stage (replaces the *_steps below, except probe_steps)
    lr: float = 0.0  # > 0: the peak lr of every trained stage (replaces clip_lr, sam_lr and head_lr)
    seed: int = 0  # world, init, data order, prompts and expert noise all follow from it
    data: str = ""  # tar shards / folder with image, caption (+ seg, inst, depth) ("{split}" -> train/val/test)
    val_data: str = ""  # eval data (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    device: str = ""  # cpu | cuda (default: cuda if available)
    mode: str = "all"  # merge (SAM-CLIP) | zoo (model-zoo experts) | all | experts (train --seg/--depth_expert models)
    image_size: int = 32  # model input side (--data images: shorter side resized to it, centre crop)
    width: int = 64  # width of the SAM encoder (= merged backbone) and of the SAM-CLIP heads
    layers: int = 4  # ViT blocks of the SAM encoder (= merged backbone)
    patch_size: int = 4  # SAM encoder patch: 4 px -> 8x8 tokens at 32 px, fine enough for 32x32 masks (decoder: 4x)
    stem: str = "conv"  # SAM encoder stem: conv (4-2-2 stem, here 1-2-2 for patch_size 4) | patch (linear patches)
    clip_width: int = 96  # CLIP towers' width (teacher and zoo CLIP)
    clip_layers: int = 4  # CLIP image tower blocks
    clip_patch_size: int = 8  # CLIP image patch: 8 px conv stem (16 tokens), as common.models.clip_tiny
    text_layers: int = 2  # text transformer blocks
    heads: int = 4  # attention heads
    n_train: int = 3000  # world training images (CLIP data = SAM data pool); --data streams its whole train split
    n_test: int = 400  # held-out images for every metric
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    threads: int = 1  # torch intra-op threads per process (0 = torch default); why 1: docs/samclip.md
    log_every: int = 25  # log.jsonl row every N steps
    clip_steps: int = 900  # steps of the CLIP teacher (= zoo mode's plain CLIP) and of the zoo CLIP (900: val, docs)
    clip_batch: int = 64  # global contrastive batch (128: 2x the CPU; docs "What was tried")
    clip_lr: float = 5e-4  # peak lr (AdamW, cosine) of the CLIP teacher / plain CLIP, chosen on val (docs)
    sam_steps: int = 250  # SAM teacher steps
    sam_batch: int = 32  # (image, prompt) pairs a step
    sam_lr: float = 3e-3  # peak lr
    dec_dim: int = 32  # mask decoder width (SAM: 256)
    focal_w: float = 1.0  # focal : dice weight (SAM: 20 : 1; in miniature 20 collapses to empty masks, see docs)
    box_prob: float = 0.5  # probability that a training prompt is a box (else one foreground point)
    n_distill: int = 6000  # D_CLIP images (no text) for CLIP distillation: the n_train teacher images + unseen ones
    head_layers: int = 2  # transformer blocks of the new CLIP head (SAM-CLIP sec. 3: "lightweight")
    stage1_steps: int = 100  # head probing on the frozen backbone
    stage2_steps: int = 300  # multi-task distillation
    batch_size: int = 32  # global CLIP-distillation batch (images only: distillation needs no text)
    replay_batch: int = 16  # global SAM replay batch per stage-2 step
    head_lr: float = 2e-3  # lr of the heads (stage 1 and 2)
    backbone_lr_scale: float = 0.5  # stage-2 backbone lr = head_lr * this (paper: smaller lr for the backbone)
    lam: float = 1.0  # weight of L_SAM in stage 2 (L = L_CLIP + lam * L_SAM)
    replay_frac: float = 0.1  # replay memory = this fraction of the SAM teacher's images, by key hash (paper: ~5.7%)
    prompts_per_image: int = 4  # stored (prompt, teacher mask) pairs per replay image
    dense_readout: str = "auto"  # zero-shot seg per-patch readout: value (MaskCLIP) | attn (head output) | auto (val)
    refine: bool = True  # refine zero-shot segmentation with SAM-head point prompts
    n_points: int = 3  # max point prompts per class and image in the refinement
    zoo_lam: float = 1.0  # model zoo: weight of every dense pseudo-label loss (lambda_k)
    seg_noise: float = 0.1  # seg.png members as expert: fraction of pixels replaced by a random class
    depth_noise: float = 0.1  # depth.npy members as expert: per-image log-scale noise (and half of it per pixel)
    seg_expert: str = ""  # seg expert checkpoint (--mode=experts) labelling the data instead of its seg.png members
    depth_expert: str = ""  # depth expert checkpoint (--mode=experts) instead of the data's depth.npy members
    expert_steps: int = 200  # --mode=experts: steps of each expert (batch sam_batch, lr sam_lr)
    n_probe: int = 600  # val images the frozen dense probes train on
    probe_steps: int = 1000  # dense probe optimizer steps (steps and lr: the val grid in docs/samclip.md)
    probe_lr: float = 1.0  # dense probe peak lr (AdamW, cosine), the same for both CLIPs
    smoke: bool = False  # tiny run (< 60 s) for tests
    seeds: str = ""  # e.g. 0,1,2: the default run once per seed -> seeds.json, sweep.png, verdicts (common/seeds.py)
    eval_split: str = "test"  # test | val: score on val images after the first n_probe (the offline lr sweep, docs)
    zoo_lr: float = 1e-3  # peak lr of the zoo CLIP (0: clip_lr); per-arm lrs chosen on val (docs/samclip.md)
    noreplay_lr: float = 1e-3  # peak lr of stage 2 without replay (0: head_lr); chosen on val like head_lr (docs)
    bg_thresholds: str = "0,0.5,0.9,0.99,0.999,0.9999,0.99999,0.999999,0.9999999"  # coarse-map bg taus (val)
    refine_thresholds: str = "0,0.9,0.99"  # bg taus of the coarse map that prompts the refinement (val)
    clip_teacher: str = ""  # open_clip / OpenAI ViT CLIP .safetensors as SAM-CLIP's CLIP teacher (not trained)
    bpe: str = ""  # --clip_teacher: CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) for its tokenizer (else world's)
    quick_gelu: str = "auto"  # --clip_teacher: auto (QuickGELU for OpenAI-format keys) | true | false
    seg_prompts: str = "main_object"  # zero-shot seg shape prompts (world): main_object | world | colour |
    #                                   size_colour (SEG_PROMPTS, chosen on val: docs/samclip.md); --data: TEMPLATES


SMOKE = dict(width=32, layers=2, clip_width=32, clip_layers=2, n_train=400, n_distill=600, n_test=100, clip_steps=40,
             clip_batch=32, sam_steps=40, sam_batch=16, stage1_steps=10, stage2_steps=10, batch_size=16, replay_batch=8,
             n_probe=100, probe_steps=40, log_every=5, clip_lr=3e-3, sam_lr=3e-3, head_lr=3e-3, dec_dim=16,
             expert_steps=20, noreplay_lr=3e-3, zoo_lr=3e-3)


def inputs(x):
    """Images uint8 (B, H, W, 3) (streams) or float (B, 3, H, W) in [0, 1] (evaluation) -> CLIP-normalised float."""
    return normalize(x.permute(0, 3, 1, 2).float() / 255 if x.dtype == torch.uint8 else x)


def backbone(cfg):
    """The SAM encoder (= merged backbone): common ViT without projection (width features), 8x8 tokens at 32 px."""
    return vit_tiny(cfg.image_size, cfg.patch_size, width=cfg.width, layers=cfg.layers, heads=cfg.heads,
                    embed_dim=None, stem=cfg.stem)


# ---- the SAM-shaped teacher: image encoder (common ViT) + prompt encoder + two-way mask decoder (SAM sec. 3, App. A)

class FourierPE(nn.Module):
    """SAM's PositionEmbeddingRandom: p in [0,1]^2 -> [sin(2 pi (2p-1) G), cos(..)], fixed Gaussian G (2, D/2)."""

    def __init__(self, D, seed=0):
        super().__init__()
        self.register_buffer("G", torch.randn(2, D // 2, generator=torch.Generator().manual_seed(seed)))

    def forward(self, p):  # p (..., 2) as (x, y) -> (..., D)
        z = 2 * math.pi * ((2 * p - 1) @ self.G)
        return torch.cat([z.sin(), z.cos()], -1)

    def dense(self, h, w):  # (h*w, D) for the centres of an h x w grid (image-side PE of the decoder)
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        return self(torch.stack([xs, ys], -1).view(-1, 2).to(self.G.device))


class PromptEncoder(nn.Module):
    """Sparse prompts coords (B, P, 2) in [0, 1] as (x, y), labels (B, P) (0 pad, 1 point, 2 / 3 box top-left /
    bottom-right corner, SAM sec. 3) -> tokens (B, P, D) = PE(coord) + embed[label]; padding rows embed[0] only."""

    def __init__(self, D):
        super().__init__()
        self.pe, self.embed = FourierPE(D), nn.Embedding(4, D)

    def forward(self, coords, labels):
        return self.pe(coords) * (labels > 0).unsqueeze(-1) + self.embed(labels)


class XAttn(nn.Module):
    """Multi-head attention with separate q/k/v inputs (decoder cross-attention); q (B, Nq, D), k/v (B, Nk, D)."""

    def __init__(self, D, heads=2):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, q, k, v):
        B, split = q.shape[0], (lambda x: x.view(B, x.shape[1], self.h, -1).transpose(1, 2))
        y = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)))
        return self.o(y.transpose(1, 2).reshape(B, -1, q.shape[-1]))


class TwoWayLayer(nn.Module):
    """SAM's two-way block: tokens self-attn, tokens -> image, MLP, image -> tokens; PEs re-added at every attention."""

    def __init__(self, D):
        super().__init__()
        self.sa, self.t2i, self.i2t = XAttn(D), XAttn(D), XAttn(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.n = nn.ModuleList([nn.LayerNorm(D) for _ in range(4)])

    def forward(self, t, t_pe, x, x_pe):  # t (B, T, D) tokens, x (B, N, D) image
        t = self.n[0](t + self.sa(t + t_pe, t + t_pe, t))
        t = self.n[1](t + self.t2i(t + t_pe, x + x_pe, x))
        t = self.n[2](t + self.mlp(t))
        x = self.n[3](x + self.i2t(x + x_pe, t + t_pe, t))
        return t, x


class MaskDecoder(nn.Module):
    """Image tokens (B, N, W) on grid (h, w) + prompts (B, P, D) -> mask logits (B, 4h, 4w), IoU (B,) (SAM App. A):
    [iou, mask] tokens + prompts through two-way layers, mask token's hypernetwork MLP . 4x upscaled image."""

    def __init__(self, W, D, layers=2):
        super().__init__()
        self.neck = nn.Sequential(nn.Linear(W, D), nn.LayerNorm(D))  # SAM's neck: encoder width -> decoder width
        self.out_tokens = nn.Parameter(0.02 * torch.randn(2, D))
        self.layers, self.final = nn.ModuleList([TwoWayLayer(D) for _ in range(layers)]), XAttn(D)
        self.up = nn.Sequential(nn.ConvTranspose2d(D, D // 4, 2, 2), nn.GroupNorm(1, D // 4), nn.GELU(),
                                nn.ConvTranspose2d(D // 4, D // 8, 2, 2), nn.GELU())
        self.hyper = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D // 8))
        self.iou_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, 1))

    def forward(self, img, grid, prompt, pe):
        B, (h, w) = img.shape[0], grid
        x, x_pe = self.neck(img), pe.dense(h, w).unsqueeze(0)
        t = t_pe = torch.cat([self.out_tokens.expand(B, -1, -1), prompt], 1)
        for layer in self.layers:
            t, x = layer(t, t_pe, x, x_pe)
        t = t + self.final(t + t_pe, x + x_pe, x)
        up = self.up(x.transpose(1, 2).reshape(B, -1, h, w))                   # (B, D/8, 4h, 4w)
        with torch.autocast(up.device.type, enabled=False):  # mask logits in fp32 under autocast too
            masks = torch.einsum("bc,bchw->bhw", self.hyper(t[:, 1]).float(), up.float())
        return masks, self.iou_head(t[:, 0])[:, 0]


class SAMHead(nn.Module):
    """Prompt encoder + mask decoder: the part of SAM that SAM-CLIP keeps as its "SAM head"."""

    def __init__(self, W, D):
        super().__init__()
        self.prompt, self.decoder = PromptEncoder(D), MaskDecoder(W, D)

    def forward(self, tokens, grid, coords, labels):
        return self.decoder(tokens, grid, self.prompt(coords, labels), self.prompt.pe)


class SAM(nn.Module):
    """Teacher: ViT encoder (common.models, no projection) + SAMHead. forward(images, coords, labels) -> masks, iou."""

    def __init__(self, cfg):
        super().__init__()
        self.enc, self.sam = backbone(cfg), SAMHead(cfg.width, cfg.dec_dim)

    def forward(self, x, coords, labels):
        return self.sam(*self.enc.patch_tokens(inputs(x)), coords, labels)


# ---- the merged student (SAM-CLIP sec. 3): SAM encoder + SAM head + a new CLIP head --------------------------------

class CLIPHead(nn.Module):
    """Transformer blocks over patch tokens (B, N, W) -> their mean embedding (B, E) and dense ones (B, N, E): mean
    pooling keeps every patch in the CLIP space, which is what zero-shot segmentation reads out."""

    def __init__(self, W, E, layers, heads=4):
        super().__init__()
        self.blocks, self.ln = nn.ModuleList([Block(W, heads) for _ in range(layers)]), nn.LayerNorm(W)
        self.proj = nn.Parameter(W ** -0.5 * torch.randn(W, E))

    def forward(self, tok, value_readout=False):
        """value_readout (MaskCLIP, Zhou et al. 2022): the last block attends each patch to itself (its value path)."""
        for i, b in enumerate(self.blocks):
            if value_readout and i == len(self.blocks) - 1:
                C, a = tok.shape[-1], b.attn
                tok = tok + b.ls_1(a.out_proj(F.linear(b.ln_1(tok), a.in_proj.weight[2 * C:], a.in_proj.bias[2 * C:])))
                tok = tok + b.ls_2(b.mlp(b.ln_2(tok)))
            else:
                tok = b(tok)
        dense = self.ln(tok) @ self.proj
        return dense.mean(1), dense


class SAMCLIP(nn.Module):
    """(x, xs, coords, labels) -> (CLIP embedding, SAM (masks, iou) on replay images xs or None): one DDP forward."""

    def __init__(self, cfg, E):
        super().__init__()
        self.enc, self.sam, self.clip = backbone(cfg), SAMHead(cfg.width, cfg.dec_dim), CLIPHead(
            cfg.width, E, cfg.head_layers, cfg.heads)

    def forward(self, x, xs=None, coords=None, labels=None):
        f = F.normalize(self.clip(self.enc.patch_tokens(inputs(x))[0])[0], dim=-1)
        return f, None if xs is None else self.sam(*self.enc.patch_tokens(inputs(xs)), coords, labels)


# ---- CLIP (teacher and zoo student): common clip_tiny + optional light dense heads on the patch tokens -------------

class ZooCLIP(nn.Module):
    """clip_tiny + (dense=True) a linear head on patch tokens: K seg logits, log-depth, 3 normals (training only)."""

    def __init__(self, cfg, vocab, dense, K):
        super().__init__()
        W, H = cfg.clip_width, cfg.heads
        self.clip = CLIP(vit_tiny(cfg.image_size, cfg.clip_patch_size, width=W, layers=cfg.clip_layers, heads=H,
                                  embed_dim=W, stem="conv"),
                         text_tiny(vocab, width=W, layers=cfg.text_layers, heads=H, embed_dim=W))
        self.head = nn.Linear(self.clip.visual.width, K + 4) if dense else None

    def forward(self, x, tokens):
        v, x = self.clip.visual, inputs(x)
        t = v.forward_tokens(x)                  # (B, 1+N, W)
        img_f = F.normalize(t[:, 0] @ v.proj, dim=-1)
        out = (img_f, self.clip.encode_text(tokens), self.clip.logit_scale.exp().clamp(max=100))
        return out + (None if self.head is None else dense_head(self.head, t[:, 1:], x.shape[-2:]),)


class Teacher:
    """SAM-CLIP's CLIP teacher: the miniature (a trained ZooCLIP) or an open_clip checkpoint (--clip_teacher) with its
    own preprocessing and tokenizer. images(x): uint8 (B, H, W, 3) or float (B, 3, H, W) -> (B, embed_dim)."""

    def __init__(self, clip, tok, prep=None):
        self.clip, self.tok, self.prep = clip, tok, prep
        self.embed_dim = clip.text.text_projection.shape[1]

    def images(self, x):
        if self.prep is not None:  # per image, like open_clip's transform (uint8: the exact PIL path)
            x = torch.stack([self.prep(a.cpu().numpy() if a.dtype == torch.uint8 else a.cpu()) for a in x]).to(x.device)
        else:
            x = inputs(x)
        return self.clip.encode_image(x)


def load_clip_teacher(cfg):
    """--clip_teacher -> (Teacher on the CPU, fingerprint, preprocess); sizes from the file's shapes, the tokenizer
    from --bpe (else the world's if the vocabularies match); bad files raise common.convert.CheckpointError."""
    from common.models import load_clip_checkpoint
    from common.tokenizer import tokenizer_for
    from common.train import file_id
    from common.transforms import CLIP_MEAN, CLIP_STD, eval_transform
    qg = {"auto": None, "true": True, "false": False}[cfg.quick_gelu]
    model = load_clip_checkpoint(cfg.clip_teacher, quick_gelu=qg)
    tok = tokenizer_for(model.text.vocab_size, model.text.context_length, cfg.bpe, f"--clip_teacher {cfg.clip_teacher}")
    pp = getattr(model, "preprocess", None) or dict(size=model.visual.image_size, mean=tuple(CLIP_MEAN),
                                                   std=tuple(CLIP_STD), interpolation="bicubic")
    fp = {"clip_teacher": os.path.abspath(cfg.clip_teacher), **file_id(cfg.clip_teacher),
          "bpe": os.path.abspath(cfg.bpe) if cfg.bpe else "world", "quick_gelu": model.config["quick_gelu"]}
    return Teacher(model.eval(), tok, eval_transform(**pp)), fp, pp


def dense_head(head, tok, size):
    """Linear head on patch tokens (B, N, W) -> fp32 maps (B, C, *size), upsampled bilinearly from the token grid."""
    h = w = math.isqrt(tok.shape[1])
    d = fp32_logits(tok, head.weight, bias=head.bias).transpose(1, 2).reshape(len(tok), -1, h, w)
    return F.interpolate(d, size=tuple(size), mode="bilinear", align_corners=False)


class Expert(nn.Module):
    """A model-zoo expert (--mode=experts): SAM-encoder ViT + linear head per token -> K seg logits or log depth."""

    def __init__(self, cfg, out):
        super().__init__()
        self.enc = backbone(cfg)
        self.head = nn.Linear(self.enc.width, out)

    def forward(self, x):
        x = inputs(x)
        return dense_head(self.head, self.enc.patch_tokens(x)[0], x.shape[-2:])


# ---- data: samples at image_size, prompts from instance masks, per-sample artifacts as shards ----------------------

def resized(s, S, maps=("image", "seg", "instances", "depth")):
    """A sample with its image (uint8) and the dense `maps` named (seg / instances nearest, depth bilinear) at S x S:
    shorter side to S, centre crop, the same for every map so they stay aligned. Other maps dropped, fields kept."""
    out = {k: v for k, v in s.items() if k not in ("image", "seg", "instances", "depth")}
    for k in (k for k in maps if k in s):
        a = np.asarray(s[k])
        if a.shape[:2] != (S, S):
            t = to_tensor(a) if k == "image" else torch.from_numpy(a.astype(np.float32))[None]
            t = CenterCrop(S)(Resize(S, "bilinear" if k in ("image", "depth") else "nearest")(t))
            a = to_uint8(t) if k == "image" else t[0].numpy().astype(np.float32 if k == "depth" else a.dtype)
        out[k] = a
    return out


def chunks(it, n):
    """An iterable in lists of n (the batches of a for_each_shard builder)."""
    return iter(lambda it=iter(it): list(itertools.islice(it, n)), [])


def to_bytes(a):
    """A shard member: png for uint8 images and label maps, .npy for everything else."""
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG", compress_level=1) if a.dtype == np.uint8 else np.save(b, a)
    return b.getvalue()


def random_instance(inst, rng, min_area=4):
    """The mask (H, W) bool of a uniformly drawn instance with >= min_area visible pixels (else the largest one)."""
    area = np.bincount(inst.ravel())
    area[0] = 0
    ids = np.flatnonzero(area >= min_area)
    return inst == (ids[rng.integers(len(ids))] if len(ids) else area.argmax()) if area.any() else inst > 0


def instance_list(inst, min_area=4):
    """inst (n, H, W) -> int array (M, 2) of (image index, instance id) with at least min_area visible pixels."""
    out = [(i, k) for i in range(len(inst)) for k, a in enumerate(np.bincount(inst[i].ravel())) if k and a >= min_area]
    return np.array(out, np.int64).reshape(-1, 2)


def make_prompt(mask, box, rng, jitter=0.1):
    """mask (H, W) bool -> coords (2, 2) in [0, 1] as (x, y), labels (2,): a uniform mask pixel (padded), or the box
    with each side moved by N(0, jitter * side) (SAM sec. 3). An empty mask gets the centre point."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return np.array([[.5, .5], [0, 0]], np.float32), np.array([1, 0])
    if not box:
        j = rng.integers(len(xs)) if rng is not None else len(xs) // 2
        return np.array([[(xs[j] + .5) / W, (ys[j] + .5) / H], [0, 0]], np.float32), np.array([1, 0])
    b = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    if rng is not None and jitter:
        b = b + rng.normal(0, jitter, 4) * np.array([b[2] - b[0], b[3] - b[1]] * 2)
    b = np.clip(b, 0, [W, H, W, H])
    return np.array([[b[0] / W, b[1] / H], [b[2] / W, b[3] / H]], np.float32), np.array([2, 3])


# ---- losses --------------------------------------------------------------------------------------------------------

def focal_loss(logits, t, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss (Lin et al. 2017) with (soft) targets t, mean over pixels; SAM's mask loss term."""
    p, ce = logits.sigmoid(), F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    return ((alpha * t + (1 - alpha) * (1 - t)) * (1 - pt) ** gamma * ce).mean()


def dice_loss(logits, t, eps=1.0):
    """1 - (2 sum(p t) + eps) / (sum p + sum t + eps) per mask (B, H, W), averaged over masks."""
    p, t = logits.sigmoid().flatten(1), t.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def mask_iou(pred, target):
    """Binary masks (B, H, W) -> IoU per mask (B,); an empty union counts as IoU 1."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter, union = (pred & target).sum(1).float(), (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def sam_loss(masks, iou, t, focal_w, iou_target=None):
    """SAM's loss: focal_w * focal + dice, + MSE of the IoU head to the real IoU (or iou_target: the teacher's)."""
    if iou_target is None:  # from bool masks: no gradient
        iou_target = mask_iou(masks > 0, t > 0.5)
    return focal_w * focal_loss(masks, t) + dice_loss(masks, t) + F.mse_loss(iou, iou_target)


def si_log_loss(pred_log, target, valid, lam=1.0):
    """Scale-invariant log depth loss (Eigen et al. 2014, eq. 4): mean(d^2) - lam * mean(d)^2, d = pred - log(target),
    per image over valid pixels. lam = 1 ignores a global scale (the depth expert's error); 0.5 charges 0.5 c^2."""
    d = (pred_log - target.clamp_min(1e-6).log()) * valid
    n = valid.flatten(1).sum(1).clamp_min(1)
    return ((d ** 2).flatten(1).sum(1) / n - lam * (d.flatten(1).sum(1) / n) ** 2).mean()


# ---- stages: each one a fit checkpoint {out}/{stage}.safetensors or a shard folder {out}/{stage}/ with its fingerprint

ARCH = ("seed", "data", "holdout", "image_size", "n_train", "width", "layers", "heads", "patch_size", "stem",
        "clip_width", "clip_layers", "clip_patch_size")  # what every stage depends on
CLIP_T = ("clip_steps", "clip_batch", "clip_lr", "text_layers")
SAM_T = ("sam_steps", "sam_batch", "sam_lr", "dec_dim", "focal_w", "box_prob")
STAGE1 = CLIP_T + SAM_T + ("n_distill", "head_layers", "stage1_steps", "batch_size", "head_lr")
LABELS, EXPERT = ("seg_noise", "depth_noise", "seg_expert", "depth_expert"), ("expert_steps", "sam_batch", "sam_lr")
DEPENDS = {  # stage -> the fields besides ARCH its result depends on, those of the stages it builds on included
    "clip_teacher": CLIP_T, "clip_plain": CLIP_T, "sam_teacher": SAM_T, "dclip": CLIP_T + ("n_distill",),
    "replay": SAM_T + ("replay_frac", "prompts_per_image"), "stage1": STAGE1,
    "stage2": STAGE1 + ("stage2_steps", "replay_batch", "backbone_lr_scale", "lam", "replay_frac", "prompts_per_image"),
    "stage2_noreplay": STAGE1 + ("stage2_steps", "backbone_lr_scale", "noreplay_lr"), "zoo_labels": LABELS,
    "zoo": CLIP_T + LABELS + ("zoo_lam", "zoo_lr"), "expert_seg": EXPERT, "expert_depth": EXPERT}


def prepare(cfg, dist, name, ext=""):
    """Stage `name`'s output path and fingerprint (the config values its result depends on); --retrain removes it."""
    path = os.path.join(cfg.out, name + ext)
    if cfg.retrain and dist.is_master and os.path.exists(path):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    dist.barrier()
    fp = {"stage": name, **{k: getattr(cfg, k) for k in ARCH + DEPENDS[name]}}
    if cfg.clip_teacher and name in ("dclip", "stage1", "stage2", "stage2_noreplay"):  # built on the checkpoint
        fp["clip_teacher"] = cfg.__dict__["teacher_fp"]
    return path, fp


def artifact(cfg, dist, name, src, fn, need):
    """Stage `name`'s per-sample shards {out}/{name}/ built by for_each_shard(src, fn), as a source of `need`."""
    path, fp = prepare(cfg, dist, name)
    for_each_shard(src, path, fn, dist, prefix=name, fingerprint=fp)
    return open_source(os.path.join(path, "*.tar"), "train", require=need)


def train(cfg, dist, name, model, loss_fn, streams, steps, lr, weight_decay, **kw):
    """Stage `name`: fit (AdamW, 10% warm-up, cosine) on the streams (zipped if two) -> model (eval), streams."""
    seed_all(cfg.seed, dist.rank)
    fp = prepare(cfg, dist, name, ".safetensors")[1]
    fit(model, loss_fn, Zip(*streams) if len(streams) > 1 else streams[0], TrainConfig(
        steps=steps, lr=lr, weight_decay=weight_decay, warmup=max(1, steps // 10), log_every=cfg.log_every,
        amp=cfg.amp, resume=cfg.resume), cfg.out, name, dist, fingerprint=fp, config=config_to_dict(cfg), **kw)
    for s in streams:
        s.close()
    return model.eval(), streams


def stream(cfg, dist, src, batch_size, fn, seed, name):
    """A Stream of `batch_size` samples a step over all ranks (the world and its shards in-process: faster)."""
    workers = cfg.num_workers if cfg.num_workers >= 0 or cfg.data else 0
    return Stream(src, batch_size // dist.world_size, fn, seed=seed, num_workers=workers, dist=dist, name=name)


def train_clip(cfg, dist, src, tok, K, zoo=False, name="clip_teacher"):
    """CLIP on accurate captions (common clip_tiny + clip_loss + fit); zoo=True: src is the zoo shards (zoo_shard) and
    the zoo heads train too: L = L_CLIP + zoo_lam * (CE + SI-log + (1 - cos)) (zoo paper sec. 3), at zoo_lr."""
    seed_all(cfg.seed)
    model, name = ZooCLIP(cfg, tok.vocab_size, zoo, K).to(dist.device), "zoo" if zoo else name

    def sample(s, g):  # runs in the DataLoader workers
        b = {"x": resized(s, cfg.image_size, ("image",))["image"], "t": tok(s["caption"])[0]}
        if zoo:
            b.update(seg=s["seg"], depth=s["depth"], normals=decode_npy(s["normals.npy"]))
        return b

    def loss_fn(m, b):
        img_f, txt_f, scale, d = m(b["x"], b["t"])
        loss = clip_loss(img_f, txt_f, scale)
        if d is None:
            return loss, {"scale": scale.item()}
        l_seg = F.cross_entropy(d[:, :K], b["seg"].long())
        l_dep = si_log_loss(d[:, K], b["depth"].float(), (b["depth"] > 0).float())
        l_nrm = (1 - F.cosine_similarity(d[:, K + 1:], b["normals"].float(), dim=1)).mean()
        return loss + cfg.zoo_lam * (l_seg + l_dep + l_nrm), {"clip": loss.item(), "seg": l_seg.item(),
                                                              "depth": l_dep.item(), "normals": l_nrm.item()}

    data = stream(cfg, dist, src, cfg.clip_batch, sample, cfg.seed, name)
    return train(cfg, dist, name, model, loss_fn, [data], cfg.clip_steps, (zoo and cfg.zoo_lr) or cfg.clip_lr, 0.1)


def train_sam(cfg, dist, src):
    """SAM-shaped teacher on instance masks: per image one visible instance, prompted by a point or a jittered box."""
    seed_all(cfg.seed)
    model = SAM(cfg).to(dist.device)

    def sample(s, g):
        s = resized(s, cfg.image_size, ("image", "instances"))
        rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=g)))
        m = random_instance(s["instances"], rng)
        c, lab = make_prompt(m, rng.random() < cfg.box_prob, rng)
        return {"x": s["image"], "c": c, "l": lab, "m": m.astype(np.float32)}

    def loss_fn(m, b):
        masks, iou = m(b["x"], b["c"], b["l"])
        return sam_loss(masks.float(), iou.float(), b["m"], cfg.focal_w)

    data = stream(cfg, dist, src, cfg.sam_batch, sample, cfg.seed + 1, "sam")
    return train(cfg, dist, "sam_teacher", model, loss_fn, [data], cfg.sam_steps, cfg.sam_lr, 0.05)


def dclip_shard(teacher, S, dev):
    """for_each_shard builder of D_CLIP: every image (png at S px) with its CLIP-teacher embedding (emb.npy)."""
    @torch.no_grad()
    def build(samples):
        for c in chunks((resized(s, S, ("image",)) for s in samples), 256):
            x = torch.from_numpy(np.stack([s["image"] for s in c])).to(dev)
            emb = teacher.images(x).float().cpu().numpy()
            for s, e in zip(c, emb):
                yield s["__key__"], {"png": to_bytes(s["image"]), "emb.npy": to_bytes(e)}
    return build


def replay_shard(cfg, sam, dev):
    """for_each_shard builder of the SAM replay memory: replay_frac of the images (salted key hash), prompts_per_image
    samples KEY-pJ each: png + mask.npy (teacher logits, fp16) + json {prompt, prompt_labels, iou}."""
    def rows(samples):
        for s in samples:
            if key_hash(f"{cfg.seed}:replay:{s['__key__']}") >= cfg.replay_frac * 2 ** 63:  # salted: not key_split's
                continue
            s = resized(s, cfg.image_size, ("image", "instances"))
            rng = np.random.default_rng([cfg.seed, 6, key_hash(s["__key__"])])
            for j in range(cfg.prompts_per_image):
                m = random_instance(s["instances"], rng)
                yield (f"{s['__key__']}-p{j}", s["image"]) + make_prompt(m, rng.random() < cfg.box_prob, rng)

    @torch.no_grad()
    def build(samples):
        for c in chunks(rows(samples), 256):
            x, co, la = (torch.from_numpy(np.stack([r[i] for r in c])).to(dev) for i in (1, 2, 3))
            masks, iou = sam(x, co, la)
            for (key, im, cc, ll), mk, q in zip(c, masks.float().cpu().numpy(), iou.float().cpu().tolist()):
                js = json.dumps({"prompt": cc.tolist(), "prompt_labels": ll.tolist(), "iou": q}).encode()
                yield key, {"png": to_bytes(im), "mask.npy": to_bytes(mk.astype(np.float16)), "json": js}
    return build


def merge(cfg, dist, sam, dclip, replay_src, stage, replay, init=None, E=None):
    """Stage 1: frozen backbone and SAM head, the CLIP head learns 1 - cos to the teacher on D_CLIP. Stage 2: all
    trainable (backbone lr x backbone_lr_scale), L_CLIP + lam * L_SAM on replay (replay=False: L_CLIP, noreplay_lr)."""
    seed_all(cfg.seed)
    st = SAMCLIP(cfg, E or cfg.clip_width).to(dist.device)
    if init is None:  # SAM-CLIP sec. 3: backbone and SAM head from SAM, CLIP head from scratch
        st.enc.load_state_dict(sam.enc.state_dict())
        st.sam.load_state_dict(sam.sam.state_dict())
    else:
        st.load_state_dict(init.state_dict())
    s1 = stage == "stage1"
    for p in list(st.enc.parameters()) + list(st.sam.parameters()):
        p.requires_grad_(not s1)
    groups = []  # the backbone at a scaled lr; common.train.no_decay: no weight decay on norms and biases
    for mod, scale in ((st.enc, cfg.backbone_lr_scale), (st.sam, 1.0), (st.clip, 1.0)):
        ps = [(n, p) for n, p in mod.named_parameters() if p.requires_grad]
        for wd, sel in ((0.05, [p for n, p in ps if not no_decay(n, p)]), (0.0, [p for n, p in ps if no_decay(n, p)])):
            groups += [{"params": sel, "weight_decay": wd, "lr_scale": scale}] if sel else []
    lr = cfg.head_lr if s1 or replay else (cfg.noreplay_lr or cfg.head_lr)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    streams = [stream(cfg, dist, dclip, cfg.batch_size, lambda s, g: {"x": s["image"], "t": decode_npy(s["emb.npy"])},
                      cfg.seed + 2, stage)]
    if replay and not s1:  # every step also draws a replay batch (the two streams are zipped, fit checkpoints both)
        streams.append(stream(cfg, dist, replay_src, cfg.replay_batch, lambda s, g: {
            "x": s["image"], "c": np.asarray(s["prompt"], np.float32), "l": np.asarray(s["prompt_labels"]),
            "m": decode_npy(s["mask.npy"]).astype(np.float32), "iou": np.float32(s["iou"])}, cfg.seed + 3, "replay"))

    def loss_fn(m, batch):
        b, r = batch if isinstance(batch, tuple) else (batch, None)
        # stage 1: nothing below the CLIP head requires grad, so autograd builds no graph through the backbone; the
        # conv stem's BatchNorm must not update its running statistics either (fit() puts the model in train mode)
        if s1:
            st.enc.eval()
        f, sm = m(b["x"], *(() if r is None else (r["x"], r["c"], r["l"])))
        l_clip = (1 - (f.float() * b["t"]).sum(-1)).mean()  # SAM-CLIP eq. 1: cosine distillation
        if sm is None:
            return l_clip, {"l_clip": l_clip.item()}
        # L_SAM: the teacher's masks (sigmoid of its logits) as soft targets, SAM's focal + dice, and its IoU
        l_sam = sam_loss(sm[0].float(), sm[1].float(), r["m"].sigmoid(), cfg.focal_w, r["iou"])
        return l_clip + cfg.lam * l_sam, {"l_clip": l_clip.item(), "l_sam": l_sam.item()}

    return train(cfg, dist, stage if s1 or replay else "stage2_noreplay", st, loss_fn, streams,
                 cfg.stage1_steps if s1 else cfg.stage2_steps, lr, 0.05, optimizer=opt,
                 find_unused_parameters=not s1)


# ---- model-zoo experts: pseudo-labels stored offline, expert models ------------------------------------------------

def zoo_shard(cfg, experts, K, dev):
    """for_each_shard builder of the zoo paper's offline pseudo-labels (sec. 3): png, txt, seg.png, depth / normals.npy
    (fp16); seg / depth from experts[kind], else the sample's maps with noise; normals from the depth."""
    @torch.no_grad()
    def build(samples):
        for c in chunks((resized(s, cfg.image_size, ("image", "seg", "depth")) for s in samples), 256):
            x = torch.from_numpy(np.stack([s["image"] for s in c])).to(dev)
            pred = {k: e(x).float().cpu() for k, e in experts.items()}
            for j, s in enumerate(c):
                rng = np.random.default_rng([cfg.seed, 99, key_hash(s["__key__"])])
                if "seg" in pred:
                    seg = pred["seg"][j].argmax(0).numpy().astype(np.uint8)
                else:
                    seg, flip = s["seg"].copy(), rng.random(s["seg"].shape) < cfg.seg_noise
                    seg[flip] = rng.integers(0, K, size=int(flip.sum()))
                if "depth" in pred:
                    dep = pred["depth"][j, 0].exp().numpy()
                else:
                    dep = s["depth"] * np.exp(cfg.depth_noise * rng.standard_normal())
                    dep = dep * np.exp(cfg.depth_noise / 2 * rng.standard_normal(dep.shape))
                gy, gx = np.gradient(dep)
                nrm = np.stack([-gx, -gy, np.ones_like(gx)])
                nrm /= np.linalg.norm(nrm, axis=0, keepdims=True)
                yield s["__key__"], {"png": to_bytes(s["image"]), "txt": s["caption"].encode(),
                                     "seg.png": to_bytes(seg), "depth.npy": to_bytes(dep.astype(np.float16)),
                                     "normals.npy": to_bytes(nrm.astype(np.float16))}
    return build


def train_expert(cfg, dist, src, kind, K):
    """--mode=experts: a seg (pixel CE) or depth expert (si-log, lam = 0.5 keeps the scale) on the data's maps."""
    seed_all(cfg.seed)
    model, name = Expert(cfg, K if kind == "seg" else 1).to(dist.device), f"expert_{kind}"

    def sample(s, g):
        s = resized(s, cfg.image_size, ("image", kind))
        return {"x": s["image"], "y": s[kind]}

    def loss_fn(m, b):
        z = m(b["x"]).float()
        if kind == "seg":
            return F.cross_entropy(z, b["y"].long())
        return si_log_loss(z[:, 0], b["y"].float(), (b["y"] > 0).float(), lam=0.5)

    data = stream(cfg, dist, src, cfg.sam_batch, sample, cfg.seed + 4, name)
    return train(cfg, dist, name, model, loss_fn, [data], cfg.expert_steps, cfg.sam_lr, 0.05)


def load_expert(cfg, kind, K):
    """--seg_expert / --depth_expert: a --mode=experts checkpoint (of this run's architecture flags and classes)."""
    model, path = Expert(cfg, K if kind == "seg" else 1), getattr(cfg, f"{kind}_expert")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{kind}_expert={path!r} does not exist; python samclip.py --mode=experts writes one")
    load_weights(path, model)
    return model.eval()


# ---- evaluation ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def eval_prompted(sam_fn, te, pairs, dev):
    """Promptable-segmentation mIoU over every test instance from a seeded point / its exact box -> point, box, mean."""
    rng = np.random.default_rng(1234)
    res = {}
    for kind in ("point", "box"):
        ious = []
        for j in range(0, len(pairs), 256):
            sel = pairs[j:j + 256]
            m = np.stack([te["instances"][i] == k for i, k in sel])
            # the exact box, or a seeded mask pixel (drawn after a training prompt's box coin flip, here never a box)
            c, lab = (torch.from_numpy(np.stack(v)).to(dev) for v in zip(*[
                make_prompt(a, True, None) if kind == "box" else make_prompt(a, rng.random() < 0, rng) for a in m]))
            x = torch.from_numpy(te["images"][sel[:, 0]]).to(dev)
            ious.append(mask_iou(sam_fn(x, c, lab)[0].float().cpu() > 0, torch.from_numpy(m)))
        res[kind] = torch.cat(ious).mean().item()
    return res["point"], res["box"], (res["point"] + res["box"]) / 2


@torch.no_grad()
def zero_shot_seg(st, clf, te, refine, n_points, dev, value_readout=True, tau=0.0, bs=128):
    """SAM-CLIP sec. 4 zero-shot segmentation -> coarse, refined (n, H, W) uint8. Coarse: argmax of per-patch CLIP-head
    embeddings . text classifier (K, E) (row 0 background), top probability < tau -> background (tau chosen on val).
    Refined: per class, up to n_points SAM point prompts at its most confident uncovered pixel paint their masks."""
    S = te["images"].shape[1]
    coarse, fine = [], []
    for j in range(0, len(te["images"]), bs):
        x = torch.from_numpy(te["images"][j:j + bs]).to(dev)
        tok, grid = st.enc.patch_tokens(inputs(x))
        dense = F.normalize(st.clip(tok, value_readout)[1].float(), dim=-1)      # (B, N, E)
        logit = (dense @ clf.to(dev).T).transpose(1, 2).reshape(len(x), len(clf), *grid)
        prob = F.interpolate(logit.double() * 100, size=(S, S), mode="bilinear", align_corners=False).softmax(1)
        conf, cls = prob.max(1)
        cls = torch.where(conf < tau, torch.zeros_like(cls), cls)
        coarse.append(cls.cpu())
        if not refine:
            continue
        out = torch.zeros_like(cls)
        for b in range(len(x)):
            for c in cls[b].unique().tolist():
                if c == 0:
                    continue
                score = torch.where(cls[b] == c, conf[b], torch.zeros_like(conf[b])).clone()
                for _ in range(n_points):
                    if score.max() < 0.5:  # no confident uncovered pixel of this class is left
                        break
                    yx = divmod(int(score.argmax()), S)
                    pt = torch.tensor([[[(yx[1] + .5) / S, (yx[0] + .5) / S], [0, 0]]], device=dev)
                    m = st.sam(tok[b:b + 1], grid, pt, torch.tensor([[1, 0]], device=dev))[0][0] > 0
                    out[b][m & (out[b] == 0)] = c  # the first (most confident) mask keeps contested pixels
                    score[m | (cls[b] != c)] = 0
                    score[max(0, yx[0] - 2):yx[0] + 3, max(0, yx[1] - 2):yx[1] + 3] = 0
        fine.append(out.cpu())
    coarse = torch.cat(coarse).numpy().astype(np.uint8)
    return coarse, (torch.cat(fine).numpy().astype(np.uint8) if refine else None)


PALETTE = np.array([[40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)

TRIVIAL = lambda r: max(r["chance_seg_miou"], r["allbg_seg_miou"])  # noqa: E731  the better trivial map's mIoU
REPR = lambda r: max(2 * r["chance"], r["majority"] + .15)  # noqa: E731  representation bar (issue #18 item 2)
DENSE_REPR = lambda r: max(2 * r["chance_seg_miou"], r["allbg_seg_miou"] + .15)  # noqa: E731  the same for seg maps
EFFECTS = [  # the papers' claims (directions; the figures are the papers'), then the representation checks
    Effect("replay keeps SAM ability: merged SAM mIoU > no replay", "merged_sam_miou", "merged_noreplay_sam_miou",
           paper="SAM-CLIP sec. 3: stage 2 without the SA-1B replay memory (5.7%) forgets SAM; with it SAM is kept"),
    Effect("merged SAM mIoU within 3 pts of the SAM teacher", "merged_sam_miou", "sam_teacher_miou", margin=.03,
           paper="SAM-CLIP retains SAM's promptable segmentation (instance seg close to SAM's)"),
    Effect("merged zero-shot within 5 pts of the CLIP teacher", "merged_zeroshot_acc", "clip_teacher_zeroshot_acc",
           margin=.05, paper="SAM-CLIP retains CLIP's zero-shot classification (ImageNet top-1 near its teacher's)"),
    Effect("coarse zero-shot seg > best trivial map (random, all bg)", "zeroshot_seg_miou_coarse", TRIVIAL,
           paper="SAM-CLIP sec. 4: zero-shot semantic seg from the CLIP head (SOTA on 5 benchmarks, +6.8 mIoU VOC)"),
    Effect("SAM-head refinement raises zero-shot seg", "zeroshot_seg_miou_refined", "zeroshot_seg_miou_coarse",
           paper="SAM-CLIP sec. 4: point prompts from the coarse map, decoded by the SAM head, raise mIoU"),
    Effect("refined zero-shot seg > best trivial map", "zeroshot_seg_miou_refined", TRIVIAL,
           paper="SAM-CLIP sec. 4 (refined zero-shot semantic segmentation)"),
    Effect("zoo: dense seg probe mIoU up", "zoo_dense_miou", "clip_dense_miou",
           paper="CLIP meets Model Zoo Experts: up to +16.3% on seg / detection / depth / normals probes"),
    Effect("zoo: depth probe RMSE down", "zoo_depth_rmse", "clip_depth_rmse", sign=-1,
           paper="CLIP meets Model Zoo Experts: NYUv2 depth RMSE improves with depth pseudo-labels"),
    Effect("zoo: zero-shot within 1 pt of plain CLIP (own text towers)", "zoo_zeroshot_acc", "clip_zeroshot_acc",
           margin=.01, paper="CLIP meets Model Zoo Experts: gains 'without compromising' zero-shot classification"),
    *[Effect(f"{n} probe >= max(2 chance, majority + .15)", f"{k}_probe_acc", REPR, paper="(representation check)")
      for n, k in (("CLIP teacher", "clip_teacher"), ("merged", "merged"), ("plain CLIP", "clip"), ("zoo", "zoo"))],
    *[Effect(f"{n} dense probe >= max(2 chance, all-bg + .15)", f"{k}_dense_miou", DENSE_REPR,
             paper="(representation check, seg maps)") for n, k in (("plain CLIP", "clip"), ("zoo", "zoo"))]]


def single_run_effects(res):
    """Per effect of this one run: d = sign * (a - b) + margin > 0, or "n/a" when a number it needs is missing."""
    out = {}
    for e in EFFECTS:
        try:
            out[e.name] = bool(summarize({0: res}, [e])[0]["d_mean"] > 0)
        except (KeyError, TypeError):
            out[e.name] = "n/a"
    return out


SEG_PROMPTS = {"world": TEMPLATES, "colour": [f"a {c} {{}}." for c in COLORS],  # the coarse map's shape prompts
               "main_object": [f"a large {c} {{}}." for c in COLORS],  # clip.py's --prompts=main_object
               "size_colour": [f"a {z} {c} {{}}." for z in SIZES for c in COLORS]}
COLOUR_TEMPLATES = [f"a {{}} {s}." for s in SHAPES]  # colour prompts: an ensemble over the shapes they may name


def attributes(samples, names, world):
    """The zero-shot / probe tasks {name: (labels, class names, templates)}: the largest object's shape; on the world
    also its colour (label_fine % len(COLORS)), the two attributes every caption names (issue #18 item 2)."""
    tasks = {"shape": (np.array([s["label"] for s in samples]), names, TEMPLATES)}
    if world:
        tasks["colour"] = (np.array([s["label_fine"] % len(COLORS) for s in samples]), COLORS, COLOUR_TEMPLATES)
    return tasks


def arrays(samples):
    """Evaluation samples -> numpy arrays: images, labels, and seg / instances / depth where every sample has them."""
    out = {"images": np.stack([s["image"] for s in samples]), "labels": np.array([s["label"] for s in samples])}
    return out | {k: np.stack([s[k] for s in samples]) for k in ("seg", "instances", "depth")
                  if all(k in s for s in samples)}


# ---- main --------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(Config, argv, presets={"smoke": SMOKE})
    if cfg.seeds:  # the default experiment once per seed, a verdict per expected effect (common/seeds.py)
        return run_seeds(main, argv, cfg, EFFECTS)
    for k, ok in (("mode", ("merge", "zoo", "all", "experts")), ("dense_readout", ("value", "attn", "auto")),
                  ("eval_split", ("test", "val")), ("quick_gelu", ("auto", "true", "false")),
                  ("seg_prompts", tuple(SEG_PROMPTS))):
        if getattr(cfg, k) not in ok:
            raise ValueError(f"--{k}={getattr(cfg, k)!r}; expected one of {', '.join(ok)}")
    if (cfg.bpe or cfg.quick_gelu != "auto") and not cfg.clip_teacher:
        raise ValueError("--bpe and --quick_gelu describe a --clip_teacher checkpoint; none was given")
    try:
        bg_grid, ref_grid = ([float(t) for t in g.split(",")] for g in (cfg.bg_thresholds, cfg.refine_thresholds))
    except ValueError:
        raise ValueError(f"--bg_thresholds / --refine_thresholds: expected comma-separated numbers in [0, 1)") from None
    for keys, v in ((("clip_steps", "sam_steps", "stage1_steps", "stage2_steps", "expert_steps"), cfg.steps),
                    (("clip_lr", "sam_lr", "head_lr", "zoo_lr", "noreplay_lr"), cfg.lr)):  # --steps / --lr: all
        cfg.__dict__.update(dict.fromkeys(keys, v) if v else {})
    t0 = time.time()
    if cfg.threads > 0:  # tiny models: spinning OpenMP threads cost far more than they give on a shared CPU (docs)
        torch.set_num_threads(cfg.threads)
    dist = start_run(cfg, ("clip_batch", "sam_batch", "batch_size", "replay_batch"))
    dev, S, tok = dist.device, cfg.image_size, world_tokenizer(context_length=32)

    def source(split, n, need=("image",), cache=False):
        return open_source(cfg.data, split, world=lambda sp: World(seed=cfg.seed, split=sp, size=S), n=n,
                           val_data=cfg.val_data, holdout=cfg.holdout, require=need, cache=cache)

    # ---- what the data holds decides what runs: a half that cannot is n/a (an error when it was asked for alone)
    test_src = source("test", cfg.n_test, ("image", "label"))
    if (first := next(iter_samples(test_src), None)) is None:
        raise ValueError(f"{test_src.name}: no sample with a label (KEY.cls or a json 'label'); the zero-shot "
                         "metrics need labelled test data")
    have = set(next(iter_samples(source("train", 1, ())), {}))
    tested = set(first)  # what the test samples hold
    names = class_names_of(test_src, default=None if cfg.data else class_names("shape"))
    K = 1 + len(names)  # semantic classes: 0 = background, 1 + label id (as the world's seg.png and its exports)
    member = {"seg": "KEY.seg.png", "instances": "KEY.inst.png", "depth": "KEY.depth.npy"}
    if cfg.mode != "experts" and "caption" not in have:
        raise ValueError(f"--data={cfg.data!r}: the training samples have no caption (KEY.txt); the CLIP teacher "
                         "and the zoo student train on image-caption pairs")
    if cfg.mode == "experts" and (lack := [member[k] for k in ("seg", "depth") if k not in have & tested]):
        raise ValueError(f"--mode=experts trains and tests on the data's own dense maps, and the train or test data "
                         f"(--data={cfg.data!r}) lack {' and '.join(lack)}")
    na, label_src = {}, {}
    need = (("train", have, ("instances",)), ("test", tested, ("seg", "instances")))
    if lack := [f"{member[k]} in {split}" for split, got, ks in need for k in ks if k not in got]:
        na["merge"] = f"n/a: needs KEY.seg.png / KEY.inst.png members (missing: {', '.join(lack)})"
    for k in ("seg", "depth"):  # where the zoo pseudo-labels come from: an expert model, else the data's own maps
        e, noisy = getattr(cfg, f"{k}_expert"), f"{member[k]} members + {k}_noise {getattr(cfg, k + '_noise')}"
        label_src[k] = f"--{k}_expert={e}" if e else noisy if k in have else None
    if lack := [f"no {member[k]} members (or --{k}_expert=PATH)" for k, v in label_src.items() if v is None]:
        na["zoo"] = (f"n/a: the zoo pseudo-labels need dense members or expert checkpoints, and the train data has "
                     f"{' and '.join(lack)}; python samclip.py --mode=experts trains both experts on data with them")
    ask = {"merge": ["merge"], "zoo": ["zoo"], "all": ["merge", "zoo"], "experts": []}[cfg.mode]
    if ask and all(h in na for h in ask):
        raise ValueError(f"--mode={cfg.mode} cannot run on --data={cfg.data!r}: "
                         + "; ".join(na[h][len("n/a: "):] for h in ask))
    merge_on, zoo_on = "merge" in ask and "merge" not in na, "zoo" in ask and "zoo" not in na
    probes = zoo_on and {"seg", "depth"} <= tested  # the dense probes train on val and test on test images
    # val images: the linear / dense probes train on them, the background threshold is chosen on them; under
    # --eval_split=val the n_test images after them are scored instead of the test split (the offline lr sweep)
    val_need = ("image", "label") + tuple(k for k in ("seg", "depth") if k in tested and (probes or merge_on))
    val_src = source("val", cfg.n_probe + (cfg.n_test if cfg.eval_split == "val" else 0), val_need)
    teacher = None
    if cfg.clip_teacher and cfg.mode != "experts":  # a real CLIP replaces the miniature teacher (issue #19 item 3)
        teacher, cfg.__dict__["teacher_fp"], prep = load_clip_teacher(cfg)
        teacher.clip.to(dev)
        dist.print(f"samclip: CLIP teacher = {cfg.clip_teacher} ({prep['size']} px {prep['interpolation']}, "
                   f"context {teacher.clip.text.context_length}, {'--bpe ' + cfg.bpe if cfg.bpe else 'world'} "
                   "tokenizer); no miniature CLIP teacher is trained")
    experts = {k: load_expert(cfg, k, K).to(dev) for k in ("seg", "depth") if zoo_on and getattr(cfg, f"{k}_expert")}

    # ---- training (all ranks): CLIP teacher (= zoo baseline), SAM teacher, stages 1-2, zoo CLIP; or the experts
    streams, res = {}, {}  # stage -> its training streams (for the data block)
    if cfg.mode == "experts":
        for k in ("seg", "depth"):
            experts[k], streams[f"expert_{k}"] = train_expert(cfg, dist, source("train", cfg.n_train, ("image", k),
                                                                                cache=True), k, K)
            res[f"{k}_expert"] = os.path.join(cfg.out, f"expert_{k}.safetensors")
    elif teacher is None or zoo_on:  # the miniature teacher = zoo's plain CLIP; with a checkpoint only zoo's
        plain = "clip_teacher" if teacher is None else "clip_plain"
        clip_t, streams[plain] = train_clip(cfg, dist, source("train", cfg.n_train, ("image", "caption"), cache=True),
                                            tok, K, name=plain)
        teacher = teacher or Teacher(clip_t.clip, tok)
    if merge_on:
        sam_src = source("train", cfg.n_train, ("image", "instances"), cache=True)
        sam_t, streams["sam_teacher"] = train_sam(cfg, dist, sam_src)
        dc = artifact(cfg, dist, "dclip", source("train", cfg.n_distill), dclip_shard(teacher, S, dev),
                      ("image", "emb.npy"))
        rp = artifact(cfg, dist, "replay", sam_src, replay_shard(cfg, sam_t, dev), ("image", "mask.npy"))
        E = teacher.embed_dim
        s1, streams["stage1"] = merge(cfg, dist, sam_t, dc, rp, "stage1", False, E=E)
        s2, streams["stage2"] = merge(cfg, dist, sam_t, dc, rp, "stage2", True, init=s1, E=E)
        s2n, streams["stage2_noreplay"] = merge(cfg, dist, sam_t, dc, rp, "stage2", False, init=s1, E=E)
    if zoo_on:
        need = ("image", "caption") + tuple(k for k in ("seg", "depth") if k not in experts)
        labels = artifact(cfg, dist, "zoo_labels", source("train", cfg.n_train, need), zoo_shard(cfg, experts, K, dev),
                          ("image", "caption", "seg", "depth", "normals.npy"))
        zoo, streams["zoo"] = train_clip(cfg, dist, labels, tok, K, zoo=True)

    # ---- evaluation (rank 0) on held-out images; the data block is collective
    read = []  # the SampleLists read (rank 0), and evals = [scored samples, val samples (probes, threshold)]
    if dist.is_master:
        read = [read_samples(val_src, cfg.n_probe + (cfg.n_test if cfg.eval_split == "val" else 0),
                             lambda s: resized(s, S))]
        read += [] if cfg.eval_split == "val" else [read_samples(test_src, cfg.n_test, lambda s: resized(s, S))]
    evals = [read[0][cfg.n_probe:], read[0][:cfg.n_probe]] if cfg.eval_split == "val" and read else read[::-1]
    data = data_report([s for v in streams.values() for s in v], read, dist)  # eval keys vs every stage's keys
    stages = {k: {f: v for f, v in data_report(ss, [], dist).items() if f.startswith("train_")}
              for k, ss in streams.items()}  # the stages read the same images: their train_* counts add up per stage
    data.update({f: sum(st[f] for st in stages.values()) for f in next(iter(stages.values()))}, stages=stages)
    if not dist.is_master:
        dist.cleanup()
        return None
    te, va = arrays(evals[0]), arrays(evals[1])
    run = torch.no_grad()(lambda fn, im=te["images"]: extract_features(fn, im, device=dev))  # fn over the images
    if "seg" in te:
        res["chance_seg_miou"] = seg_miou(np.random.default_rng(0).integers(0, K, size=te["seg"].shape), te["seg"], K)
        res["allbg_seg_miou"] = seg_miou(np.zeros_like(te["seg"]), te["seg"], K)
    if cfg.mode == "experts":
        res.update(seg_expert_miou=seg_miou(run(experts["seg"]).argmax(1), te["seg"], K),
                   depth_expert_rmse=depth_rmse(run(experts["depth"])[:, 0].exp(), te["depth"]))
    else:
        tasks, va_tasks = (attributes(e, names, not cfg.data) for e in evals)
        res.update(chance=float(np.mean([1 / len(n) for _, n, _ in tasks.values()])),
                   majority=float(np.mean([np.bincount(y).max() / len(y) for y, _, _ in tasks.values()])),
                   zeroshot_attributes=list(tasks))
        res["chance_zeroshot_acc"] = res["chance"]

        def score(key, img_fn, clip=None, tk=None):
            """{key}_zeroshot_acc[_{attribute}] with `clip`'s text tower, and {key}_probe_acc[_{attribute}]: a
            linear probe on the same image embeddings, trained on val, tested on the scored images."""
            f, fv = run(img_fn), run(img_fn, va["images"])
            for a, (y, nm, T) in tasks.items():
                if clip is not None:
                    clf = zero_shot_classifier(clip, tk, nm, T, dev)
                    res[f"{key}_zeroshot_acc_{a}"] = zero_shot_accuracy(f, clf, y)
                res[f"{key}_probe_acc_{a}"] = linear_probe(fv, va_tasks[a][0], f, y, num_classes=len(nm))
            for m in ("zeroshot_acc", "probe_acc") if clip is not None else ("probe_acc",):
                res[f"{key}_{m}"] = float(np.mean([res[f"{key}_{m}_{a}"] for a in tasks]))

        score("clip_teacher", teacher.images, teacher.clip, teacher.tok)
    if merge_on:
        tp = instance_list(te["instances"])
        sp = lambda m: (lambda x, c, l: m.sam(*m.enc.patch_tokens(inputs(x)), c, l))  # noqa: E731
        pt, bx, res["sam_teacher_miou"] = eval_prompted(sp(sam_t), te, tp, dev)
        res.update(sam_teacher_miou_point=pt, sam_teacher_miou_box=bx)
        for key, m in (("merged_stage1", s1), ("merged", s2), ("merged_noreplay", s2n)):
            score(key, lambda x: m(x)[0], teacher.clip, teacher.tok)  # the merged model answers in the teacher's space
            res[f"{key}_sam_miou"] = eval_prompted(sp(m), te, tp, dev)[2]
        bg = ["a photo of the {}.", "the {}.", "a {}."] if cfg.data else [  # the world's texture phrases
            f"a {{}}, {t}." for t in TEXTURES] + [f"a {t} {{}}." for t in TEXTURES]
        shape_clf = zero_shot_classifier(teacher.clip, teacher.tok, names,
                                         TEMPLATES if cfg.data else SEG_PROMPTS[cfg.seg_prompts], dev)
        seg_clf = torch.cat([zero_shot_classifier(teacher.clip, teacher.tok, ["background"], bg, dev), shape_clf])
        ro = ("value", "attn") if cfg.dense_readout == "auto" else (cfg.dense_readout,)
        zs = lambda d, r, t, ref=False: zero_shot_seg(s2, seg_clf, d, ref, cfg.n_points, dev, r == "value", t)  # noqa
        vr, tau, rtau = ro[0], 0.0, 0.0
        if "seg" in va:  # readout and bg threshold: the best val mIoU of the coarse map; the refinement's tau: its own
            val_miou = {(r, t): seg_miou(zs(va, r, t)[0], va["seg"], K) for r in ro for t in bg_grid}
            vr, tau = max(val_miou, key=val_miou.get)
            ref_miou = {t: seg_miou(zs(va, vr, t, True)[1], va["seg"], K) for t in ref_grid} if cfg.refine else {0: 0}
            rtau = max(ref_miou, key=ref_miou.get)
            res.update(bg_threshold_val_miou={f"{r}:{t}": v for (r, t), v in val_miou.items()},
                       refine_threshold_val_miou={str(t): v for t, v in ref_miou.items()})
        coarse, fine = zs(te, vr, tau)[0], zs(te, vr, rtau, True)[1] if cfg.refine else None
        res.update({f"zeroshot_seg_miou_coarse_{r}": seg_miou(zs(te, r, tau)[0], te["seg"], K) for r in ro},
                   dense_readout=vr, bg_threshold=tau, refine_threshold=rtau,
                   zeroshot_seg_miou_coarse=seg_miou(coarse, te["seg"], K),
                   zeroshot_seg_miou_coarse_argmax=seg_miou(zs(te, vr, 0.0)[0], te["seg"], K),  # tau = 0: plain argmax
                   zeroshot_seg_miou_refined=seg_miou(fine, te["seg"], K) if fine is not None else None)
        res["zeroshot_seg_miou"] = res["zeroshot_seg_miou_refined"] or res["zeroshot_seg_miou_coarse"]
        res["replay_pairs"] = sum(1 for _ in iter_samples(rp, images=False))
        res["replay_images"] = res["replay_pairs"] // cfg.prompts_per_image
        maps = [te["seg"], coarse] + ([fine] if fine is not None else [])  # 8 test images, 4x enlarged
        image_grid(os.path.join(cfg.out, "zeroshot_seg.png"), [list(te["images"][:8])] + [
            list(PALETTE[m[:8] % len(PALETTE)]) for m in maps], ["image", "truth", "coarse", "refined"], scale=4)
    if zoo_on:
        # both CLIPs scored in their own embedding space: each one's image tower against its own text tower
        res["zoo_pseudo_labels"] = label_src
        if cfg.clip_teacher:
            score("clip", lambda x: clip_t.clip.encode_image(inputs(x)), clip_t.clip, tok)
        else:
            res.update({k.replace("clip_teacher", "clip", 1): v for k, v in list(res.items())
                        if k.startswith("clip_teacher_") and ("zeroshot_acc" in k or "probe_acc" in k)})
        score("zoo", lambda x: zoo.clip.encode_image(inputs(x)), zoo.clip, tok)
        if not probes:
            res["dense_probes"] = "n/a: needs KEY.seg.png / KEY.depth.npy members in the test and val data"
        for key, m in (("clip", clip_t), ("zoo", zoo)) if probes else ():
            d = dense_probe(lambda x: m.clip.visual.patch_tokens(inputs(x)), va["images"], va["seg"], va["depth"],
                            te["images"], te["seg"], te["depth"], K, steps=cfg.probe_steps, lr=cfg.probe_lr, device=dev)
            res[f"{key}_dense_miou"], res[f"{key}_depth_rmse"] = d["miou"], d["depth_rmse"]
    res.update({h: na[h] for h in ask if h in na})
    # ---- the papers' expected effects on this run (d > 0 or n/a); --seeds gives the verdicts (never tuned to pass)
    res.update(expected_effects=single_run_effects(res), mode=cfg.mode, seconds=time.time() - t0, device=str(dev),
               world_size=dist.world_size, data=data)
    save_json(os.path.join(cfg.out, "results.json"), res)
    print_table(res, title=f"samclip results ({cfg.out})")
    dist.cleanup()
    return res


if __name__ == "__main__":
    run_cli(main)
