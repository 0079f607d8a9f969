"""Weight subcloning: direct initialization of transformers using larger pretrained ones.

Samragh, Farajtabar, Mehta, Vemulapalli, Faghri, Naik, Tuzel, Rastegari, arXiv:2312.09299. No official code exists;
this file follows the paper's abstract.

A smaller transformer is initialised from a larger trained one of the same family:
  1. run the parent on a calibration batch and record, with forward hooks, the residual stream after every block, the
     FFN hidden activations and each attention head's contribution to the stream;
  2. residual-stream ("embedding") neurons: importance = mean |activation|; the paper observes that the ranking is
     consistent across layers, so ONE global set of kept indices is used in every layer (which keeps the residual
     connections aligned). FFN neurons and attention heads are ranked per layer (head dim is kept, whole heads go);
  3. every parameter is sliced at the kept indices (patch / token / position embeddings, qkv and out projections, FFN,
     norms, classifier or tied LM head), and LayerNorm weights are multiplied by sqrt(D/d): after dropping the low-
     magnitude dims the norm's std is computed over fewer, mostly large, dims, so sigma_d ~ sigma_D sqrt(D/d) and the
     normalised outputs would shrink by sqrt(d/D);
  4. whole blocks are removed to reach the child's depth (rule `sim`: drop the blocks whose output is most similar to
     their input; `middle`; `last`), always keeping the first and the last block.

The experiment, in miniature, for a ViT on the synthetic world's shape classification and for a GPT-style decoder on
the world's captions (common.tokenizer.world_tokenizer; each step packs its captions into one token stream cut into
windows): train a parent, subclone it to a child of half width and two-thirds depth, then train the child from (a) the
subclone and (b) random init, each with a small learning-rate sweep extended by x3 steps while its best val lr sits at
an edge (the same rule for both; the paper: subclones want a lower lr), plus two
ablations at the subclone's best lr: random indices instead of importance, and no sqrt(D/d) rescaling. The lr choice,
the loss curves, the step-0 losses and the speed-up target use the validation split; the test split gives only the
final numbers. Reported: step-0 losses, steps to reach the random-init run's final val loss, the speedup, the mean val
loss over each run (area under its curve), final test loss / accuracy (results.json, curves.png).

Run:
  python subclone.py                       # default run, both models (writes runs/subclone)
  python subclone.py --smoke               # tiny end-to-end run (< 60 s on 2 quiet cores)
  python subclone.py --seeds=0,1,2         # the default once per seed: seeds.json, sweep.png, a verdict per effect
  python subclone.py --models=gpt          # one model only
  python subclone.py clone --parent_ckpt=runs/subclone/vit_parent.safetensors --clone_out=child.safetensors \
      --child_width=32 --child_layers=4 --child_heads=2 --child_ffn=128 --drop=sim     # subclone one checkpoint
  torchrun --nproc_per_node=2 subclone.py --smoke                                     # data parallel (gloo on CPU)
  python subclone.py --data='shards/{split}'   # train/val/test shards or folders (vit: image + label, classes.txt;
                                               # gpt: caption)
Stages are common.train.fit checkpoints in --out: a finished one with the same fingerprint (the config values that
change it) is reused, --resume continues an unfinished parent, --retrain trains every stage again.
"""
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from common.config import parse_config, print_table, run_cli, save_json
from common.seeds import Effect, run_seeds
from common.data import Stream, class_names_of, data_report, iter_samples, open_source, read_samples, stack
from common.losses import fp32_logits
from common.models import TextTransformer, VisionTransformer
from common.plot import line_plot, panel
from common.tokenizer import world_tokenizer
from common.train import (TrainConfig, broadcast_json, extend_grid, fit, load_weights, save_weights, seed_all,
                          start_run)
from common.transforms import eval_transform
from common.world import SHAPES, World

COMMANDS = ["run", "clone"]
VARIANTS = ["subclone", "random", "random_indices", "no_scaling"]


@dataclass
class Config:
    out: str = "runs/subclone"  # output folder (created if missing)
    seeds: str = ""  # e.g. 0,1,2: the default experiment once per seed -> seeds.json, sweep.png and a verdict per
    #                  expected effect (common/seeds.py)
    seed: int = 0  # world, init, data order, random-index ablation all follow from it
    device: str = ""  # cpu | cuda (default: cuda if available)
    data: str = ""  # tar shards / folder instead of the world ("{split}" is replaced by train/val/test)
    val_data: str = ""  # eval data, val and test (else {split} in --data, or --holdout)
    holdout: float = 0.05  # single --data stream: fraction held out by key hash for test (and again for val)
    num_workers: int = -1  # DataLoader workers per rank (-1: 0 for the world, 4 for files)
    smoke: bool = False  # tiny sizes, end to end in < 60 s
    retrain: bool = False  # train every stage again (parents, children), even those --out holds finished
    resume: bool = False  # continue an unfinished parent (same fingerprint) from its last checkpoint in --out
    models: str = "vit,gpt"  # which experiments to run: vit, gpt or both (comma-separated)
    image_size: int = 32  # ViT input side (the world renders at this size; --data images are resized)
    patch_size: int = 8  # ViT patch size (32/8 -> 16 patches + class token)
    context_length: int = 24  # GPT context length (tokens)
    n_train: int = 6000  # world training samples (its first n_train, cached); --data streams its whole train split
    n_test: int = 1000  # test samples (images / captions) for the final loss / accuracy
    n_eval: int = 400  # val samples (images / captions) for the lr choice, the loss curves and the step-0 losses
    n_calib: int = 256  # calibration samples for activation statistics (images or token windows)
    width: int = 64  # parent width D
    layers: int = 6  # parent depth L
    heads: int = 4  # parent heads (head dim = width / heads, kept by the child)
    ffn: int = 256  # parent FFN hidden size
    child_width: int = 32  # child width d (about half)
    child_layers: int = 4  # child depth (about two thirds)
    child_heads: int = 2  # child heads; must equal child_width / head dim
    child_ffn: int = 128  # child FFN hidden size
    drop: str = "sim"  # block-removal rule: sim | middle | last (first and last blocks are always kept)
    scale: str = "sqrt"  # LayerNorm rescaling after slicing: sqrt (gamma * sqrt(D/d)) | none
    parent_steps: int = 400  # parent training steps
    parent_lr: float = 2e-3  # parent peak learning rate
    steps: int = 250  # child training steps (every run)
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # child learning-rate sweep (subclone and random init each)
    lr_extend: int = 2  # while an arm's best val lr is at an edge of its grid, add the next x3 lr there (at most
    #                     this many per side; the same rule for every arm, so equal tuning effort)
    lr: float = 0.0  # > 0: every child run at this one learning rate instead of the --lrs sweep
    batch_size: int = 64  # global batch (images, or captions packed into windows), split over torchrun ranks
    warmup: int = 20  # linear warm-up steps (parent and children)
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    eval_every: int = 20  # child loss-curve evaluation interval (steps)
    ckpt_every: int = 100  # parent checkpoint interval (--resume continues from the last one)
    log_every: int = 50  # log.jsonl rows / printed lines every N steps
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    threads: int = 1  # torch CPU threads per process (0 = torch default); tiny models gain little from more
    parent_ckpt: str = ""  # clone command: parent checkpoint (a *_parent.safetensors of a run, or a clone output)
    clone_out: str = ""  # clone command: child checkpoint path (default {out}/{kind}_child.safetensors)


# --smoke: tiny sizes (fields given on the command line win)
SMOKE = dict(n_train=600, n_test=200, n_eval=128, n_calib=64, width=32, layers=3, heads=2, ffn=128, child_width=16,
             child_layers=2, child_heads=1, child_ffn=64, parent_steps=150, parent_lr=3e-3, steps=40, lrs=(1e-3, 3e-3), lr_extend=1,
             eval_every=10, warmup=5, batch_size=32, context_length=16, log_every=20, ckpt_every=40)


# ---------------------------------------------------------------------------------------------------------------
# models: both are built from common.models Blocks, so one subcloning routine serves them (logits in fp32 under
# autocast: the loss reads them at full precision)

class ViT(VisionTransformer):
    """common ViT (patch stem, class token, ln_pre/ln_post) + a linear classifier on the class token."""

    def __init__(self, arch):
        super().__init__(arch["image_size"], arch["patch_size"], arch["width"], arch["layers"], arch["heads"],
                         (arch["ffn"] + 0.5) / arch["width"], embed_dim=None)
        self.head = nn.Linear(arch["width"], arch["classes"])

    def forward(self, x):
        """x: (B, 3, S, S) -> logits (B, classes)."""
        return fp32_logits(super().forward(x), self.head.weight, bias=self.head.bias)


class GPT(TextTransformer):
    """GPT-style decoder: token + position embedding, causal pre-norm common Blocks, ln_final, LM head tied to the
    token embedding (GPT-2). Subcloning slices the tied matrix once, so the head stays tied."""

    def __init__(self, arch):
        super().__init__(arch["vocab"], arch["context_length"], arch["width"], arch["layers"], arch["heads"],
                         embed_dim=None, causal=True, mlp_ratio=(arch["ffn"] + 0.5) / arch["width"])

    def forward(self, tokens):
        """tokens: (B, T) -> next-token logits (B, T, V)."""
        return fp32_logits(self.forward_tokens(tokens), self.token_embedding.weight)


def build(arch):
    return ViT(arch) if arch["kind"] == "vit" else GPT(arch)


def make_arch(cfg, kind, child=False, out=None):
    """Architecture dict (stored in checkpoint headers so `clone` can rebuild a parent)."""
    w, L, H, f = ((cfg.child_width, cfg.child_layers, cfg.child_heads, cfg.child_ffn) if child else
                  (cfg.width, cfg.layers, cfg.heads, cfg.ffn))
    a = {"kind": kind, "width": w, "layers": L, "heads": H, "ffn": f}
    a.update({"image_size": cfg.image_size, "patch_size": cfg.patch_size, "classes": out} if kind == "vit" else
             {"vocab": out, "context_length": cfg.context_length})
    return a


def child_arch_of(parent, cfg):
    """Child architecture from the parent's: head dim kept (the paper drops whole heads), so heads = d / head_dim."""
    hd = parent["width"] // parent["heads"]
    a = dict(parent, width=cfg.child_width, layers=cfg.child_layers, heads=cfg.child_heads, ffn=cfg.child_ffn)
    if cfg.child_heads * hd != cfg.child_width or cfg.child_heads > parent["heads"]:
        raise ValueError(f"--child_heads={cfg.child_heads} x parent head dim {hd} must equal "
                         f"child_width={cfg.child_width} (and <= parent heads {parent['heads']})")
    if not (cfg.child_width <= parent["width"] and cfg.child_ffn <= parent["ffn"] and
            1 <= cfg.child_layers <= parent["layers"]):
        raise ValueError(f"child (width {cfg.child_width}, ffn {cfg.child_ffn}, layers "
                         f"{cfg.child_layers}) must not exceed the parent's {parent}")
    return a


# ---------------------------------------------------------------------------------------------------------------
# step 1: activation statistics on a calibration batch (forward hooks)

@torch.no_grad()
def collect_stats(model, x, bs=128):
    """x: calibration inputs (n, ...). Returns mean statistics over all calibration tokens:
    resid (L+1, D) mean |x_l| of the residual stream (block 0's input, then each block's output);
    ffn  (L, F)   mean |GELU output| per FFN neuron;   head (L, H) mean L2 norm of each head's contribution
    W_o[:, h] y_h to the stream;   sim (L,) mean cosine(block input, block output) per token."""
    blocks = model.blocks
    L, D, H = len(blocks), blocks[0].ln_1.weight.numel(), blocks[0].attn.heads
    acc = {"resid": torch.zeros(L + 1, D), "ffn": torch.zeros(L, blocks[0].mlp.c_fc.out_features),
           "head": torch.zeros(L, H), "sim": torch.zeros(L)}
    hooks = []

    def on_block(l):
        def f(m, args, out):
            xin, out = args[0].float(), out.float()
            if l == 0:
                acc["resid"][0] += xin.abs().sum((0, 1)).cpu()
            acc["resid"][l + 1] += out.abs().sum((0, 1)).cpu()
            acc["sim"][l] += F.cosine_similarity(xin, out, dim=-1).sum().cpu()
        return f

    def on_act(l):
        def f(m, args, out):
            acc["ffn"][l] += out.float().abs().sum((0, 1)).cpu()
        return f

    def on_out_proj(l):
        def f(m, args):
            y = args[0].float()                                   # (B, N, D): heads concatenated
            B, N, _ = y.shape
            Wo = m.weight.float().view(D, H, D // H)              # columns of W_o grouped by head
            c = torch.einsum("bnhk,dhk->bnhd", y.view(B, N, H, D // H), Wo)
            acc["head"][l] += c.norm(dim=-1).sum((0, 1)).cpu()
        return f

    for l, blk in enumerate(blocks):
        hooks += [blk.register_forward_hook(on_block(l)), blk.mlp.act.register_forward_hook(on_act(l)),
                  blk.attn.out_proj.register_forward_pre_hook(on_out_proj(l))]
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    n_tok = 0
    try:
        for i in range(0, len(x), bs):
            xb = x[i:i + bs].to(dev)
            model(xb)
            n_tok += xb.shape[0] * (xb.shape[1] if xb.ndim == 2 else model.positional_embedding.shape[0])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {k: v / n_tok for k, v in acc.items()}


# ---------------------------------------------------------------------------------------------------------------
# step 2: rankings

def embedding_score(resid):
    """resid (L+1, D) -> one global importance per residual neuron: the mean over layers of each layer's mean |act|,
    each layer normalised to sum 1 first (the stream grows with depth; every layer gets an equal vote)."""
    return (resid / resid.sum(1, keepdim=True)).mean(0)


def top(score, k):
    """Indices of the k largest scores, in their original order (so a full-size clone is the identity)."""
    return torch.sort(torch.topk(score, k).indices).values


def rank_consistency(resid, k):
    """Mean overlap |top_k(l) & top_k(l')| / k over all pairs of layers (1 = every layer ranks the same k neurons
    highest, the paper's observation; random rankings give about k / D)."""
    sets = [set(top(r, k).tolist()) for r in resid]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    return float(np.mean([len(sets[i] & sets[j]) / k for i, j in pairs])) if pairs else 1.0


# ---------------------------------------------------------------------------------------------------------------
# step 3: block removal (first and last blocks always kept, order preserved)

def keep_blocks(L, n, rule, sim=None):
    """Indices of the n blocks (of L) to keep. rule: sim (drop the interior blocks with the highest cosine similarity
    between input and output: they change the stream least), middle (drop around the centre), last (drop the interior
    blocks just before the final one)."""
    if n == L:
        return list(range(L))
    if not 2 <= n < L:
        raise ValueError(f"keep_blocks: cannot keep {n} of {L} blocks (need 2 <= n <= L: first and last are kept)")
    inner, r = list(range(1, L - 1)), L - n
    if rule == "last":
        drop = inner[-r:]
    elif rule == "middle":
        c = (L - 1) / 2
        drop = sorted(inner, key=lambda i: (abs(i - c), i))[:r]
    elif rule == "sim":
        if sim is None:
            raise ValueError("keep_blocks: rule 'sim' needs the per-block similarities")
        drop = sorted(inner, key=lambda i: -float(sim[i]))[:r]
    else:
        raise ValueError(f"keep_blocks: rule must be sim, middle or last, got {rule!r}")
    return [i for i in range(L) if i not in drop]


# ---------------------------------------------------------------------------------------------------------------
# step 4: slicing + rescaling. Each parameter's axes have a role: E residual neuron, F FFN neuron, HD the dims of the
# kept heads, QKV the kept heads' rows of q, k and v, None untouched. Names are common.models' (open_clip) names.

ROLES = {
    "ln_1.weight": ("E",), "ln_1.bias": ("E",), "ln_2.weight": ("E",), "ln_2.bias": ("E",),
    "ls_1.gamma": ("E",), "ls_2.gamma": ("E",),
    "attn.in_proj.weight": ("QKV", "E"), "attn.in_proj.bias": ("QKV",),
    "attn.out_proj.weight": ("E", "HD"), "attn.out_proj.bias": ("E",),
    "mlp.c_fc.weight": ("F", "E"), "mlp.c_fc.bias": ("F",),
    "mlp.c_proj.weight": ("E", "F"), "mlp.c_proj.bias": ("E",),
    "conv1.weight": ("E", None, None, None), "class_embedding": ("E",), "positional_embedding": (None, "E"),
    "ln_pre.weight": ("E",), "ln_pre.bias": ("E",), "ln_post.weight": ("E",), "ln_post.bias": ("E",),
    "ln_final.weight": ("E",), "ln_final.bias": ("E",), "token_embedding.weight": (None, "E"),
    "head.weight": (None, "E"), "head.bias": (None,), "proj": ("E", None), "text_projection": ("E", None),
}
NORM_WEIGHTS = {"ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight"}


def select_indices(stats, arch, carch, select="importance", seed=0):
    """-> (e (d,), f [per parent layer (F',)], heads [per parent layer (h,)]) kept indices, sorted ascending.
    select="random": the same counts drawn uniformly (ablation)."""
    L, D, H = arch["layers"], arch["width"], arch["heads"]
    d, f2, h = carch["width"], carch["ffn"], carch["heads"]
    if select == "importance":
        return (top(embedding_score(stats["resid"]), d), [top(s, f2) for s in stats["ffn"]],
                [top(s, h) for s in stats["head"]])
    if select != "random":
        raise ValueError(f"select must be importance or random, got {select!r}")
    g = torch.Generator().manual_seed(seed)
    pick = lambda n, k: torch.sort(torch.randperm(n, generator=g)[:k]).values  # noqa: E731
    return pick(D, d), [pick(arch["ffn"], f2) for _ in range(L)], [pick(H, h) for _ in range(L)]


def subclone(parent_sd, arch, carch, stats, drop="sim", scale="sqrt", select="importance", seed=0):
    """Parent state dict -> child state dict (and what was kept). parent_sd: common.models names, blocks.{l}.*"""
    D, H = arch["width"], arch["heads"]
    Dh, d = D // H, carch["width"]
    kept = keep_blocks(arch["layers"], carch["layers"], drop, stats["sim"])
    e, f, hs = select_indices(stats, arch, carch, select, seed)
    hd = [(h[:, None] * Dh + torch.arange(Dh)).flatten() for h in hs]     # columns of the kept heads
    qkv = [torch.cat([t * D + c for t in range(3)]) for c in hd]          # in_proj rows: q heads, k heads, v heads
    s = math.sqrt(D / d) if scale == "sqrt" else 1.0                      # sigma_d ~ sigma_D sqrt(D/d)
    if scale not in ("sqrt", "none"):
        raise ValueError(f"scale must be sqrt or none, got {scale!r}")
    out = {}
    for name, p in parent_sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)", name)
        l, rest = (int(m[1]), m[2]) if m else (None, name)
        if l is not None and l not in kept:
            continue
        if rest not in ROLES:
            raise KeyError(f"subclone: no slicing rule for parameter {name!r} (shape {tuple(p.shape)}); known: "
                           f"{sorted(ROLES)}")
        idx = {"E": e, "F": f[l] if l is not None else None, "HD": hd[l] if l is not None else None,
               "QKV": qkv[l] if l is not None else None}
        t = p.detach()
        for dim, role in enumerate(ROLES[rest]):
            if role:
                t = t.index_select(dim, idx[role].to(t.device))
        if rest in NORM_WEIGHTS:
            t = t * s
        out[f"blocks.{kept.index(l)}.{rest}" if l is not None else name] = t.clone()
    info = {"kept_blocks": kept, "embedding_idx": e.tolist(), "heads": [hs[l].tolist() for l in kept],
            "scale": s, "select": select, "drop": drop}
    return out, info


def make_child(parent, arch, carch, stats, **kw):
    """The child nn.Module initialised by subcloning (strict load: every child parameter must be produced)."""
    sd, info = subclone(parent.state_dict(), arch, carch, stats, **kw)
    child = build(carch).to(next(parent.parameters()).device)
    child.load_state_dict(sd, strict=True)
    return child, info


# ---------------------------------------------------------------------------------------------------------------
# data (common.data): the ViT reads (image, label) samples, the GPT captions. Training batches come from a Stream over
# the train split; the val set (lr choice, loss curves, step-0 losses), the test set (final numbers) and the
# calibration inputs are read once.

def vit_item(prep, n_classes, s, g=None):
    """(image, label) -> {"x": CLIP-normalised (3, S, S), "y"}; with g (training) a random flip (keeps the class)."""
    y = int(s["label"])
    if not 0 <= y < n_classes:
        raise ValueError(f"sample {s['__key__']!r}: label {y} outside the {n_classes} class names of the data")
    x = prep(s["image"])
    x = x.flip(-1) if g is not None and torch.rand((), generator=g) < 0.5 else x
    return {"__key__": s["__key__"], "x": x, "y": y}


def gpt_item(tok, s, g=None):
    """caption sample -> {"ids": SOT caption EOT} (variable length)."""
    return {"__key__": s["__key__"], "ids": torch.tensor([tok.sot_token_id] + tok.encode(s["caption"]) +
                                                         [tok.eot_token_id], dtype=torch.long)}


def inputs_targets(cfg, kind, items, n=None):
    """The first n (None: all) items as (inputs, targets): vit (images, labels); gpt the items' ids packed into one
    stream (GPT-style, no padding), cut into non-overlapping windows of context_length+1 tokens (stops reading once
    full)."""
    if kind == "vit":
        items = list(itertools.islice(items, n))
        return stack(items, "x"), stack(items, "y")
    T, parts, got = cfg.context_length + 1, [], 0
    for it in items:
        parts.append(it["ids"].flatten())
        got += len(parts[-1])
        if n is not None and got >= n * T:
            break
    ids = torch.cat(parts)
    w = ids[:min(n or len(ids), len(ids) // T) * T].view(-1, T)
    if not len(w):
        raise ValueError(f"{len(parts)} captions have fewer than context_length+1 = {T} tokens: raise --batch_size")
    return w[:, :-1], w[:, 1:]


def make_data(cfg, kind, tok, n_classes=None, test=True):
    """One model's data: the train source (streamed), the per-sample transform, the calibration inputs (the first
    n_calib training images / windows) and, with test, the val set (n_eval samples) and the test set (n_test)."""
    need = ("image", "label") if kind == "vit" else ("caption",)
    source = lambda split, n: open_source(  # noqa: E731
        cfg.data, split, world=lambda s: World(seed=cfg.seed, split=s, size=cfg.image_size), n=n,
        val_data=cfg.val_data, holdout=cfg.holdout, require=need, keep=need)
    train = source("train", cfg.n_train)
    if kind == "vit":
        n_out = n_classes or len(class_names_of(train, default=None if cfg.data else SHAPES))
        item = partial(vit_item, eval_transform(cfg.image_size), n_out)
    else:
        n_out, item = tok.vocab_size, partial(gpt_item, tok)
    data = {"train": train, "item": item, "out": n_out, "streams": [],
            "calib": inputs_targets(cfg, kind, map(item, iter_samples(train)), cfg.n_calib)[0]}
    if test:
        for split, n in (("val", cfg.n_eval), ("test", cfg.n_test)):
            data[f"{split}_samples"] = read_samples(source(split, n), n, item)
            data[split] = dict(zip("xy", inputs_targets(cfg, kind, data[f"{split}_samples"], n)))
    return data


def make_stream(cfg, kind, data, dist, name):
    """This rank's training batches (inputs, targets). Every run of a model (parent and children) uses the same seed,
    so the children see the same batches (a fair comparison) and every rank reads its own samples in all of them."""
    post = (lambda b: (b["x"], b["y"])) if kind == "vit" else (lambda b: tuple(  # a step's captions -> windows
        t.to(dist.device) for t in inputs_targets(cfg, kind, ({"ids": t} for t in b["ids"]))))
    stream = Stream(data["train"], batch_size=cfg.batch_size // dist.world_size, transform=data["item"],
                    seed=cfg.seed, num_workers=cfg.num_workers, dist=dist, post=post, name=name)
    data["streams"].append(stream)
    return stream


# ---------------------------------------------------------------------------------------------------------------
# loss and evaluation (cross-entropy: shape classes for the ViT, next token for the GPT)

def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
    return loss, {"acc": (logits.argmax(-1) == y).float().mean().item()}


@torch.no_grad()
def evaluate(model, ev, device, bs=256):
    """-> (mean cross-entropy, accuracy) over ev["x"], ev["y"] (per image / per predicted token)."""
    was = model.training
    model.eval()
    tot, hit, n = 0.0, 0.0, 0
    for i in range(0, len(ev["x"]), bs):
        x, y = ev["x"][i:i + bs].to(device), ev["y"][i:i + bs].to(device)
        logits = model(x).float()
        tot += F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum").item()
        hit += (logits.argmax(-1) == y).sum().item()
        n += y.numel()
    model.train(was)
    return tot / n, hit / n


# ---------------------------------------------------------------------------------------------------------------
# training: every parent and child run is one common.train.fit checkpoint {out}/{name}.safetensors, reused when it
# is finished and its fingerprint (the config values that change it) matches

def read_header(path):
    """The JSON header of a safetensors checkpoint (a fit checkpoint or a clone output); errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any safetensors failure: truncated, or not a safetensors file
        raise ValueError(f"{path}: not a readable safetensors file ({e}); expected a subclone.py checkpoint") from None


def read_arch(path):
    """Architecture stored in a parent checkpoint (fit's config) or a clone output."""
    meta = read_header(path)
    cfg = json.loads(meta.get("config", "null") or "null")
    arch = cfg.get("arch") if isinstance(cfg, dict) else None
    arch = arch or (json.loads(meta["arch"]) if "arch" in meta else None)
    if not arch:
        raise ValueError(f"{path}: no architecture in the safetensors header (expected a subclone.py checkpoint)")
    old = {"patch": "patch_size", "context": "context_length"}  # checkpoints written before the renaming
    return {old.get(k, k): v for k, v in arch.items()}


def stage_path(cfg, name, dist):
    """{out}/{name}.safetensors; --retrain removes it first, so the stage trains again."""
    path = os.path.join(cfg.out, f"{name}.safetensors")
    if cfg.retrain and dist.is_master and os.path.exists(path):
        os.remove(path)
    dist.barrier()
    return path


def train_parent(cfg, kind, arch, data, dist):
    """The parent, resumable (--resume) every ckpt_every steps. Returns (model, its fingerprint)."""
    fp = {"arch": arch, "steps": cfg.parent_steps, "lr": cfg.parent_lr, "batch_size": cfg.batch_size,
          "warmup": cfg.warmup, "wd": cfg.weight_decay, "seed": cfg.seed, "data": cfg.data, "val_data": cfg.val_data,
          "n_train": cfg.n_train, "holdout": cfg.holdout}
    stage_path(cfg, f"{kind}_parent", dist)
    seed_all(cfg.seed)
    model = build(arch).to(dist.device)
    seed_all(cfg.seed, dist.rank)
    stream = make_stream(cfg, kind, data, dist, f"{kind}_parent")
    fit(model, loss_fn, stream, TrainConfig(cfg.parent_steps, lr=cfg.parent_lr, weight_decay=cfg.weight_decay,
                                            warmup=cfg.warmup, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
                                            amp=cfg.amp, resume=cfg.resume),
        cfg.out, f"{kind}_parent", dist, fingerprint=fp, config=fp)
    stream.close()
    return model, fp


def train_child(cfg, kind, name, arch, init_sd, lr, data, dist, fp):
    """One child run from init_sd (None = random init) -> {"lr", "curve": [[step, val loss, val acc]...],
    "final_loss", "final_acc" (test), "seconds"}. The curve is evaluated while training and stored as fit's config in
    the final checkpoint, so a reused run reads it back from there. A child run writes no mid-run checkpoint (a
    killed one trains again from its start)."""
    path = stage_path(cfg, name, dist)
    seed_all(cfg.seed + 17)                                   # the same random init for every random-init run
    model = build(arch).to(dist.device)
    if init_sd is not None:
        model.load_state_dict(init_sd, strict=True)
    rec = {"lr": lr, "curve": [[0, *evaluate(model, data["val"], dist.device)]]}

    def on_step(step, raw, metrics):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec["curve"].append([step, *evaluate(raw, data["val"], dist.device)])

    t0 = time.time()
    seed_all(cfg.seed, dist.rank)
    stream = make_stream(cfg, kind, data, dist, name)
    out = fit(model, loss_fn, stream, TrainConfig(cfg.steps, lr=lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                                                  log_every=cfg.log_every, amp=cfg.amp),
              cfg.out, name, dist, fingerprint=fp, on_step=on_step, config=rec, progress=False)
    stream.close()
    if out["reused"]:
        rec = json.loads(read_header(path)["config"])
    fl, fa = evaluate(model, data["test"], dist.device)
    r = {**rec, "final_loss": fl, "final_acc": fa, "seconds": time.time() - t0}
    dist.print(f"  {name}: init {r['curve'][0][1]:.4f} -> final {fl:.4f} (acc {fa:.4f}) in {r['seconds']:.0f}s")
    return r


def curve_mean(curve, start=0):
    """Mean val loss over a run from curve point `start` on: the area under the val-loss curve (trapezoids between eval
    points) divided by the steps it spans; the whole curve's convergence in one number (lower = faster)."""
    c = curve[start:]
    span = c[-1][0] - c[0][0]
    if span <= 0:
        return float(c[0][1])
    return float(sum((s1 - s0) * (l0 + l1) / 2 for (s0, l0, _), (s1, l1, _) in zip(c, c[1:])) / span)


def steps_to(curve, target):
    """First step at which the eval loss reaches target (linear interpolation between eval points); None if never."""
    for (s0, l0, _), (s1, l1, _) in zip([curve[0]] + curve[:-1], curve):
        if l1 <= target:
            return float(s1) if l0 <= target or s1 == s0 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


# ---------------------------------------------------------------------------------------------------------------
# the experiment for one model

def run_model(cfg, kind, data, dist):
    t0 = time.time()
    arch = make_arch(cfg, kind, out=data["out"])
    carch = child_arch_of(arch, cfg)
    parent, pfp = train_parent(cfg, kind, arch, data, dist)
    p_loss, p_acc = evaluate(parent, data["test"], dist.device)
    p_val = evaluate(parent, data["val"], dist.device)[0]
    stats = collect_stats(parent, data["calib"])
    d, D = carch["width"], arch["width"]
    res = {"parent_loss": p_loss, "parent_acc": p_acc, "parent_val_loss": p_val,
           "params": {"parent": sum(p.numel() for p in parent.parameters()),
                      "child": sum(p.numel() for p in build(carch).parameters())},
           "rank_consistency": rank_consistency(stats["resid"], d), "rank_consistency_chance": d / D,
           "block_similarity": [round(float(s), 4) for s in stats["sim"]]}

    # ---- initialisations (the three subclone variants + random init) and their step-0 losses
    opts = {"subclone": {}, "random_indices": {"select": "random", "seed": cfg.seed},
            "no_scaling": {"scale": "none"}}
    inits, info = {"random": None}, None
    for v, o in opts.items():
        o = {"drop": cfg.drop, "scale": cfg.scale, **o}
        child, inf = make_child(parent, arch, carch, stats, **o)
        inits[v] = {k: t.cpu() for k, t in child.state_dict().items()}
        info = info or inf
        if v == "subclone" and dist.is_master:
            save_weights(os.path.join(cfg.out, f"{kind}_child_init.safetensors"), child,
                         metadata={"arch": carch, "info": inf})
    res["kept_blocks"] = info["kept_blocks"]
    # diagnostics without training (val loss): depth reduction alone, width reduction alone, the other drop rules
    diag = {}
    for nm, ca in (("depth_only", dict(arch, layers=carch["layers"])),
                   ("width_only", dict(carch, layers=arch["layers"]))):
        diag[nm] = evaluate(make_child(parent, arch, ca, stats, drop=cfg.drop, scale=cfg.scale)[0], data["val"],
                            dist.device)[0]
    for rule in ("sim", "middle", "last"):
        diag[f"drop_{rule}"] = evaluate(make_child(parent, arch, carch, stats, drop=rule, scale=cfg.scale)[0],
                                        data["val"], dist.device)[0]
    res["init_loss_diagnostics"] = diag

    # ---- child runs: lr sweep for subclone and random init (best lr: the lowest final val loss), ablations at the
    #      subclone's best lr
    lrs = (cfg.lr,) if cfg.lr > 0 else tuple(sorted(cfg.lrs))
    base = {k: getattr(cfg, k) for k in ("steps", "batch_size", "warmup", "weight_decay", "eval_every", "n_eval",
                                         "drop", "scale", "n_calib")}
    base.update(parent=pfp, child=carch)
    runs, sweep, best, grids = {}, {}, {}, {}
    for v in ("subclone", "random"):
        grid = list(lrs)
        run = lambda lr: train_child(cfg, kind, f"{kind}_{v}_lr{lr:g}", carch, inits[v], lr, data, dist,  # noqa: E731
                                     {**base, "variant": v, "lr": lr})
        for lr in grid:
            runs[v, lr] = run(lr)
        # the best val lr must be interior: extend the grid by x3 past an edge best (the same rule for both arms);
        # rank 0's choice on every rank (the grid and the ablations' lr must not diverge across ranks)
        ext = {"low": 0, "high": 0}
        while True:
            b = broadcast_json(min(grid, key=lambda lr: runs[v, lr]["curve"][-1][1]), dist)
            lr = extend_grid(grid, b, ext, cfg.lr_extend)
            if lr is None:
                break
            runs[v, lr] = run(lr)
            grid = sorted(grid + [lr])
        best[v], grids[v] = b, grid
        sweep[v] = {f"{lr:g}": runs[v, lr]["curve"][-1][1] for lr in grid}
    runs = {v: runs[v, best[v]] for v in ("subclone", "random")}
    for v in ("random_indices", "no_scaling"):
        runs[v] = train_child(cfg, kind, f"{kind}_{v}_lr{best['subclone']:g}", carch, inits[v], best["subclone"],
                              data, dist, {**base, "variant": v, "lr": best["subclone"]})

    # ---- the paper's measure: steps to reach the random-init run's final (val) loss
    target = runs["random"]["curve"][-1][1]
    stt = {v: steps_to(runs[v]["curve"], target) for v in VARIANTS}
    sp = stt["random"] / stt["subclone"] if stt["subclone"] else None
    res.update({
        "child_init_loss": {v: runs[v]["curve"][0][1] for v in VARIANTS},
        "target_loss": target, "steps_to_target": stt, "speedup": sp,
        "speedup_note": ("subclone starts below the target" if stt["subclone"] == 0 else
                         "subclone never reaches the target" if stt["subclone"] is None else ""),
        "final_loss": {v: runs[v]["final_loss"] for v in VARIANTS},
        "final_acc": {v: runs[v]["final_acc"] for v in VARIANTS},
        # steps to target with "never reached" censored at the run's length (an upper bound's lower end), so every
        # seed has a number for the importance-vs-random-indices effect
        "steps_to_target_censored": {v: float(cfg.steps) if t is None else t for v, t in stt.items()},
        # speed-up with a 1-step floor (a subclone already below the target counts as reaching it at step 1) and
        # "never reached" censored at --steps: a number for every seed
        "speedup_censored": stt["random"] / max(1.0, float(cfg.steps) if stt["subclone"] is None else stt["subclone"]),
        "best_lr": best, "lr_sweep_val_loss": sweep, "lr_grid": grids,
        "lr_best_interior": {v: len(grids[v]) > 2 and grids[v][0] < best[v] < grids[v][-1] for v in grids},
        "log10_best_lr": {v: math.log10(best[v]) for v in best},
        # convergence over the whole run (the paper's curves): the mean val loss over steps 0..steps, and from the
        # first eval after step 0 on (without the init's own loss)
        "mean_val_loss": {v: curve_mean(runs[v]["curve"]) for v in VARIANTS},
        "mean_val_loss_after_init": {v: curve_mean(runs[v]["curve"], 1) for v in VARIANTS},
    })
    if kind == "vit":  # the probed task's bars for the parent's representation check (majority from test labels)
        y = data["test"]["y"].long().flatten()
        res.update(chance=1.0 / data["out"], majority=float(torch.bincount(y).max()) / len(y))
    ci = res["child_init_loss"]
    res["checks"] = {
        "init_far_below_random": ci["subclone"] < p_val + 0.5 * (ci["random"] - p_val),
        "speedup_ge_2": sp is not None and sp >= 2 or stt["subclone"] == 0,
        "importance_beats_random_indices": ci["subclone"] < ci["random_indices"],
        "importance_lowers_mean_val_loss": res["mean_val_loss"]["subclone"] < res["mean_val_loss"]["random_indices"],
        "scaling_lowers_init_loss": ci["subclone"] < ci["no_scaling"],
        "subclone_best_lr_lower": best["subclone"] < best["random"],
    }
    res["seconds"] = time.time() - t0
    curves = {v: runs[v]["curve"] for v in VARIANTS}
    return res, curves


COLORS = {"subclone": (214, 39, 40), "random": (31, 119, 180), "random_indices": (255, 127, 14),
          "no_scaling": (44, 160, 44), "parent": (150, 150, 150), "target": (90, 90, 90)}


def curve_panel(kind, r, curves, steps):
    """One common.plot panel: the four variants' val-loss curves (step-0 loss in the legend), parent and target."""
    series = {f"{v} (step 0: {c[0][1]:.2f})": ([p[0] for p in c], [p[1] for p in c], COLORS[v])
              for v, c in curves.items()}
    series.update({nm: ([0, steps], [y, y], COLORS[nm]) for nm, y in (("parent", r["parent_val_loss"]),
                                                                       ("target", r["target_loss"]))})
    return panel(f"{kind}: child val loss (best lr each; parent {r['parent_val_loss']:.3f})", series, "child step",
                 "val loss")


# recalled from the paper, not re-read: its body was not available here, and the one summary of it found says only
# that lower learning rates improve convergence with subcloning (docs/subclone.md)
LR_CLAIM = "subclones want a lower lr than random init [PAPER?, unverified]"
# the paper's expected effects (common/seeds.py): per seed, d = sign * (a - b); shown when mean d > 2 SE
EFFECTS = [
    Effect("ViT: subclone step-0 val loss below random init", "vit.child_init_loss.subclone",
           "vit.child_init_loss.random", sign=-1, paper="step-0 loss of the subclone far below random init"),
    Effect("GPT: subclone step-0 val loss below random init", "gpt.child_init_loss.subclone",
           "gpt.child_init_loss.random", sign=-1, paper="step-0 loss of the subclone far below random init"),
    Effect("ViT: importance < random indices, steps to target", "vit.steps_to_target_censored.subclone",
           "vit.steps_to_target_censored.random_indices", sign=-1,
           paper="neuron importance ranking (vs random neuron indices)", note="never reached = --steps"),
    Effect("GPT: importance < random indices, steps to target", "gpt.steps_to_target_censored.subclone",
           "gpt.steps_to_target_censored.random_indices", sign=-1,
           paper="neuron importance ranking (vs random neuron indices)", note="never reached = --steps"),
    Effect("ViT: importance < random indices, mean val loss", "vit.mean_val_loss.subclone",
           "vit.mean_val_loss.random_indices", sign=-1,
           paper="reordering neurons by importance speeds up convergence (vs random indices) [summary]",
           note="area under the val-loss curve, steps 0..steps"),
    Effect("GPT: importance < random indices, mean val loss", "gpt.mean_val_loss.subclone",
           "gpt.mean_val_loss.random_indices", sign=-1,
           paper="reordering neurons by importance speeds up convergence (vs random indices) [summary]",
           note="area under the val-loss curve, steps 0..steps"),
    Effect("ViT: speed-up to random init's final val loss > 1", "vit.speedup_censored", 1.0,
           paper="about 4x faster training (ViT, image classification)"),
    Effect("GPT: speed-up to random init's final val loss > 1", "gpt.speedup_censored", 1.0,
           paper="about 4x faster training (next-token prediction)"),
    Effect("ViT: subclone's best val lr below random init's (log10)", "vit.log10_best_lr.random",
           "vit.log10_best_lr.subclone", paper=LR_CLAIM),
    Effect("GPT: subclone's best val lr below random init's (log10)", "gpt.log10_best_lr.random",
           "gpt.log10_best_lr.subclone", paper=LR_CLAIM),
    Effect("ViT parent test acc >= max(2 chance, majority + .15)", "vit.parent_acc",
           lambda r: max(2 * r["vit"]["chance"], r["vit"]["majority"] + 0.15), paper="(representation check)"),
]


# ---------------------------------------------------------------------------------------------------------------
# main: `run` (the experiment) and `clone` (subclone one parent checkpoint)

def clone_cmd(cfg, dist):
    if not cfg.parent_ckpt:
        raise ValueError("clone needs --parent_ckpt=PATH (e.g. runs/subclone/vit_parent.safetensors)")
    arch = read_arch(cfg.parent_ckpt)
    parent = build(arch).to(dist.device)
    load_weights(cfg.parent_ckpt, parent)  # a fit checkpoint or a clone output
    kind = arch["kind"]
    cfg.image_size, cfg.patch_size = arch.get("image_size", 32), arch.get("patch_size", 8)
    cfg.context_length = arch.get("context_length", 32)
    calib = make_data(cfg, kind, world_tokenizer(), n_classes=arch.get("classes"), test=False)["calib"]
    carch = child_arch_of(arch, cfg)
    child, info = make_child(parent, arch, carch, collect_stats(parent, calib), drop=cfg.drop, scale=cfg.scale)
    out = cfg.clone_out or os.path.join(cfg.out, f"{kind}_child.safetensors")
    if dist.is_master:
        save_weights(out, child, metadata={"arch": carch, "info": info})
        print(f"subclone: {cfg.parent_ckpt} ({arch}) -> {out} ({carch}); kept blocks {info['kept_blocks']}")
    return out


def main(argv=None):
    cfg = parse_config(Config, argv, commands=COMMANDS, presets={"smoke": SMOKE})
    if cfg.seeds:
        if cfg._command not in (None, "run") or cfg.models != "vit,gpt":  # (no command given: run)
            raise ValueError("--seeds runs the default experiment: the run command with --models=vit,gpt")
        return run_seeds(main, argv, cfg, EFFECTS)
    kinds = [k.strip() for k in cfg.models.split(",") if k.strip()]
    if not kinds or any(k not in ("vit", "gpt") for k in kinds):
        raise ValueError(f"--models={cfg.models!r}; expected vit, gpt or vit,gpt")
    if cfg.drop not in ("sim", "middle", "last") or cfg.scale not in ("sqrt", "none"):
        raise ValueError(f"--drop={cfg.drop!r} (expected sim|middle|last), --scale={cfg.scale!r} (expected sqrt|none)")
    t0 = time.time()
    if cfg.threads > 0:  # small matmuls: a second intra-op thread mostly spin-waits, badly so on shared cores
        torch.set_num_threads(cfg.threads)
    dist = start_run(cfg)
    if cfg._command == "clone":
        clone_cmd(cfg, dist)
        dist.cleanup()
        return None

    tok = world_tokenizer(context_length=cfg.context_length + 1) if "gpt" in kinds else None
    res, panels, streams, evals = {}, [], [], []
    for kind in kinds:
        data = make_data(cfg, kind, tok)
        what = (f"{data['out']} classes ({'class names of the data' if cfg.data else 'world shapes'})" if kind == "vit"
                else "text: the 'caption' field, world tokenizer")
        dist.print(f"==== {kind}: parent -> subclone -> children; train {data['train'].name}, {what}")
        r, curves = run_model(cfg, kind, data, dist)
        res[kind] = r
        streams, evals = streams + data["streams"], evals + [data["val_samples"], data["test_samples"]]
        panels.append(curve_panel(kind, r, curves, cfg.steps))
    res["data"] = data_report(streams, evals, dist)  # collective: every rank
    res.update(seconds=time.time() - t0, cpu_seconds=time.process_time(), device=dist.device,
               world_size=dist.world_size)
    if dist.is_master:
        line_plot(os.path.join(cfg.out, "curves.png"), panels)
        save_json(os.path.join(cfg.out, "results.json"), res)
        print_table(res, title=f"subclone results ({cfg.out})")
        for kind in kinds:
            bad = [k for k, ok in res[kind]["checks"].items() if not ok]
            print(f"{kind}: expected effects " + ("all reproduced" if not bad else "NOT reproduced: " + ", ".join(bad)))
    dist.cleanup()
    return res


if __name__ == "__main__":
    run_cli(main)
