"""MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training (Vasu et al., arXiv:2311.17049)
+ CLIP with Quality Captions (Vasu et al., arXiv:2405.08911), in one file.

What this file reproduces
  1. The encoders (paper sec. 4): MCi0/1/2 image towers (FastViT-style hybrid: MobileOne stem, RepMixer stages,
     reparameterizable large-kernel downsampling with SE, RepCPE + BatchNorm attention stage, conv_exp + global
     pool projection) and the MCt text tower (Text-RepMixer blocks around 4 transformer layers); `reparameterize()`
     folds every train-time branch into one conv. Exact parameter counts of the released models (tests assert them):
     MCi0 11,406,464 -> 11,356,992, MCi1 21,541,120 -> 21,460,544, MCi2 35,814,720 -> 35,702,480,
     MCt 42,441,216 -> 42,435,072, base text 63,428,096. `mci_tiny` / `mct_tiny` use the same blocks at 32 px.
  2. Multi-modal dataset reinforcement (sec. 3, DataCompDR): per training image we store synthetic captions from a
     CoCa-style captioner, k replayable augmentations (RandomResizedCrop box + RandAugment ops) with the embeddings
     of an ensemble of 2 teacher CLIPs (per-teacher L2-normalised, concatenated) and the teacher text embeddings of
     the ground-truth + synthetic captions; written as tar shards {KEY.paug.json, KEY.syn.json, KEY.npz}.
  3. Reinforced training (sec. 3.2): L = (1 - lam) L_CLIP + lam L_KD, L_KD = cross-entropy between the teachers'
     similarity distribution (softmax per teacher at the teacher logit scale, then averaged) and the student's, both
     directions, over ground-truth and synthetic captions; augmentation replayed from the stored parameters, so no
     teacher runs at train time. Compared with a plain CLIP baseline at equal seen samples.
  4. Quality captions (arXiv:2405.08911): the same CLIP trained on noisy alt-text vs on synthetic (well-aligned)
     captions, evaluated zero-shot and with frozen-backbone dense probes (segmentation mIoU, depth RMSE), with all
     and with 10% of the dense labels.

Miniature design (synthetic world, 32 px): the web data's ground-truth caption is the world's noisy alt-text
(DataComp's alt-text), the teachers and the captioner are trained on the world's accurate captions (playing the
role of the big pretrained ViT-L/14 CLIPs and CoCa); the student is a tiny MCi + MCt.

    python mobileclip.py                    # default run: teachers, captioner, reinforce, baseline/reinforced/quality
    python mobileclip.py --smoke            # < 60 s end to end
    python mobileclip.py reinforce          # only build the reinforced shards (teachers/captioner trained if missing)
    python mobileclip.py params             # only the parameter-count / reparameterization table of MCi0/1/2, MCt
    python mobileclip.py --data='shards/{split}-{000..009}.tar'     # exported world / real image-text shards
    torchrun --nproc_per_node=2 mobileclip.py --smoke
"""
import io
import json
import math
import os
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import config_to_dict, parse_config, print_table, save_json
from common.eval import dense_probe, extract_features, retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from common.losses import clip_loss, gather_features
from common.models import CLIP, Block, TextTransformer, VisionTransformer, text_tiny
from common.tokenizer import world_tokenizer
from common.train import fit, load_weights, save_weights, seed_all, setup_distributed, unwrap
from common.transforms import Compose, RandAugment, RandomResizedCrop, ToTensor, eval_transform, to_tensor
from common.world import TEMPLATES, World, class_names, load_arrays
from kernels import attention


@dataclass
class Config:
    """MobileCLIP multi-modal reinforced training + quality-captions study on the synthetic world."""
    out: str = "runs/mobileclip"  # output folder (teachers, captioner, shards and students are reused from here)
    seed: int = 0  # world, init, data order and augmentation all follow from it
    data: str = ""  # tar shards / folder instead of the world ("{split}" is replaced by train/test)
    device: str = ""  # cpu | cuda (default: cuda if available)
    image_size: int = 32  # model input side; the world renders at this size
    n_train: int = 4000  # training pairs (reinforced) held in memory
    n_cap: int = 2000  # held-out pairs (accurate captions) the captioner is trained on
    n_test: int = 1000  # held-out pairs for zero-shot, retrieval and the dense probes
    batch_size: int = 128  # global batch (split over torchrun ranks)
    steps: int = 300  # optimizer steps of each student run (baseline, reinforced, quality)
    lr: float = 2e-3  # peak learning rate of the students (AdamW, cosine)
    weight_decay: float = 0.1  # decoupled weight decay (not on norms, biases, embeddings, logit scale)
    warmup: int = 30  # linear warm-up steps
    teacher_steps: int = 300  # steps of each teacher CLIP (accurate captions)
    teacher_widths: str = "192,160"  # ViT/text width of each teacher (>= 2 teachers, all larger than the student)
    cap_steps: int = 300  # steps of the captioner
    k_aug: int = 5  # stored augmentations per image (paper: 30 for DataCompDR-12M, 10 for -1B)
    n_syn: int = 2  # synthetic captions per image (paper: 5)
    top_k: int = 3  # top-k sampling of the captioner for all but the first (greedy) synthetic caption
    rrc_scale: float = 0.35  # RandomResizedCrop min area of the stored augmentations
    lam: float = 0.75  # weight of the KD loss: L = (1 - lam) CLIP + lam KD (paper: 0.75 for B, 1.0 for S*)
    teacher_scale: float = 100.0  # teacher logit scale in the KD softmax (paper: 100)
    dense_steps: int = 300  # steps of the dense linear probes
    eval_every: int = 50  # zero-shot eval every N steps of the baseline/reinforced runs (sample-efficiency curves)
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    log_every: int = 25  # log.jsonl row + printed line every N steps
    smoke: bool = False  # tiny run (< 60 s) for tests


# ================================================================================================================
# 1. Encoders (paper sec. 4; reference: ml-mobileclip mobileclip/models/mci.py, modules/common/mobileone.py,
#    modules/image/replknet.py, modules/text/repmixer.py). All train-time branches fold into one conv at inference.

def _pair(k):
    return (k, k) if isinstance(k, int) else tuple(k)


def conv_bn(cin, cout, k, s=1, g=1):
    """k x k conv without bias followed by BatchNorm: one train-time branch. 'same' padding."""
    k = _pair(k)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, k, s, (k[0] // 2, k[1] // 2), groups=g, bias=False),
                                     bn=nn.BatchNorm2d(cout)))


def fuse_bn(w, bn):
    """Fold an eval-mode BN into the preceding conv: W' = W gamma/sigma, b' = beta - mu gamma/sigma (MobileOne 3.1)."""
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return w * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def id_kernel(C, cin_g, k, like):
    """Identity as a (C, cin_g, kh, kw) kernel: 1 at the centre tap of input channel i % cin_g."""
    kh, kw = _pair(k)
    w = torch.zeros(C, cin_g, kh, kw, dtype=like.dtype, device=like.device)
    w[torch.arange(C), torch.arange(C) % cin_g, kh // 2, kw // 2] = 1.0
    return w


def pad_to(w, k):
    """Zero-pad a small kernel (C, c, h, w) to the centre of a k kernel."""
    kh, kw = _pair(k)
    ph, pw = (kh - w.shape[2]) // 2, (kw - w.shape[3]) // 2
    return F.pad(w, (pw, pw, ph, ph))


def folded_conv(cin, cout, k, s, g, w, b):
    """The single inference conv that replaces a multi-branch block."""
    k = _pair(k)
    c = nn.Conv2d(cin, cout, k, s, (k[0] // 2, k[1] // 2), groups=g, bias=True).to(w.device)
    c.weight.data.copy_(w)
    c.bias.data.copy_(b)
    return c


class SE(nn.Module):
    """Squeeze-excite: x * sigmoid(W2 relu(W1 mean_hw(x))). r = 1/16 (MobileOne SEBlock) or 1/4 (timm, downsample)."""

    def __init__(self, C, r=0.0625):
        super().__init__()
        self.reduce = nn.Conv2d(C, int(C * r), 1)
        self.expand = nn.Conv2d(int(C * r), C, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MobileOne(nn.Module):
    """MobileOne block (arXiv:2206.04040): act(se(BN(x) + BN(conv1x1 x) + sum_n BN(conv_kxk x))).

    skip BN only when cin == cout and stride 1; the 1x1 'scale' branch only when k > 1; n_conv k x k branches."""

    def __init__(self, cin, cout, k, s=1, g=1, act=True, se=False, scale=True, n_conv=1):
        super().__init__()
        self.cin, self.cout, self.k, self.s, self.g = cin, cout, _pair(k), s, g
        self.skip = nn.BatchNorm2d(cin) if cin == cout and s == 1 else None
        self.convs = nn.ModuleList([conv_bn(cin, cout, k, s, g) for _ in range(n_conv)])
        self.scale = conv_bn(cin, cout, 1, s, g) if scale and max(self.k) > 1 else None
        self.se = SE(cout) if se else nn.Identity()
        self.act = nn.GELU() if act else nn.Identity()
        self.rep = None

    def forward(self, x):
        if self.rep is not None:
            return self.act(self.se(self.rep(x)))
        y = self.skip(x) if self.skip is not None else 0.0
        if self.scale is not None:
            y = y + self.scale(x)
        for c in self.convs:
            y = y + c(x)
        return self.act(self.se(y))

    def kernel_bias(self):
        """Sum of all branches as one (cout, cin/g, kh, kw) kernel + bias (BN folded, 1x1 padded, skip = identity)."""
        ref = next(self.parameters())
        W = torch.zeros(self.cout, self.cin // self.g, *self.k, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(self.cout, dtype=ref.dtype, device=ref.device)
        for c in list(self.convs) + ([self.scale] if self.scale is not None else []):
            w, bb = fuse_bn(c.conv.weight, c.bn)
            W, b = W + pad_to(w, self.k), b + bb
        if self.skip is not None:
            w, bb = fuse_bn(id_kernel(self.cout, self.cin // self.g, self.k, ref), self.skip)
            W, b = W + w, b + bb
        return W, b

    @torch.no_grad()
    def reparameterize(self):
        if self.rep is None:
            self.rep = folded_conv(self.cin, self.cout, self.k, self.s, self.g, *self.kernel_bias())
            self.skip, self.scale, self.convs = None, None, nn.ModuleList()


class RepLK(nn.Module):
    """ReparamLargeKernelConv (RepLKNet, arXiv:2203.06717): BN(conv7x7 x) + BN(conv3x3 x) -> SE -> GELU.
    MCi's downsampling conv: depthwise-grouped, stride 2, SE(1/4) in the last two downsamples."""

    def __init__(self, cin, cout, k=7, s=2, small=3, se=False):
        super().__init__()
        self.cin, self.cout, self.k, self.s = cin, cout, k, s
        self.lk, self.sk = conv_bn(cin, cout, k, s, cin), conv_bn(cin, cout, small, s, cin)
        self.se = SE(cout, 0.25) if se else nn.Identity()
        self.act = nn.GELU()  # lkc_use_act=True for MCi (timm fastvit_mci*)
        self.rep = None

    def forward(self, x):
        y = self.rep(x) if self.rep is not None else self.lk(x) + self.sk(x)
        return self.act(self.se(y))

    @torch.no_grad()
    def reparameterize(self):
        if self.rep is None:
            (w1, b1), (w2, b2) = fuse_bn(self.lk.conv.weight, self.lk.bn), fuse_bn(self.sk.conv.weight, self.sk.bn)
            self.rep = folded_conv(self.cin, self.cout, self.k, self.s, self.cin, w1 + pad_to(w2, self.k), b1 + b2)
            self.lk = self.sk = None


def patch_embed(cin, cout, se):
    """Downsampling between stages: large-kernel stride-2 conv, then a 1x1 MobileOne block."""
    return nn.Sequential(RepLK(cin, cout, 7, 2, 3, se), MobileOne(cout, cout, 1))


class RepMixer(nn.Module):
    """x + ls * (mixer(x) - norm(x)) (FastViT sec. 3.2.1): depthwise conv token mixing that folds into one
    depthwise conv: W = I + ls (W_mixer - W_norm), b = ls (b_mixer - b_norm). k = 3x3 (image) or 1x11 (text)."""

    def __init__(self, C, k=3, scale=True):
        super().__init__()
        self.C, self.k = C, _pair(k)
        self.norm = MobileOne(C, C, k, 1, C, act=False, scale=False, n_conv=0)
        self.mixer = MobileOne(C, C, k, 1, C, act=False, scale=scale)
        self.ls = nn.Parameter(1e-5 * torch.ones(C, 1, 1))
        self.rep = None

    def forward(self, x):
        if self.rep is not None:
            return self.rep(x)
        return x + self.ls * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self):
        if self.rep is None:
            (wm, bm), (wn, bn) = self.mixer.kernel_bias(), self.norm.kernel_bias()
            w = id_kernel(self.C, 1, self.k, wm) + self.ls[..., None] * (wm - wn)
            self.rep = folded_conv(self.C, self.C, self.k, 1, self.C, w, self.ls.flatten() * (bm - bn))
            self.norm = self.mixer = self.ls = None


class ConvFFN(nn.Module):
    """BN(depthwise conv k) -> 1x1 up -> GELU -> 1x1 down (FastViT's ConvFFN; k = 7x7 image, 1x11 text)."""

    def __init__(self, C, hidden, k=7):
        super().__init__()
        self.conv = conv_bn(C, C, k, 1, C)
        self.fc1, self.fc2 = nn.Conv2d(C, hidden, 1), nn.Conv2d(hidden, C, 1)
        for m in (self.conv.conv, self.fc1, self.fc2):
            nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """x = RepMixer(x); x = x + ls * ConvFFN(x). No residual around the mixer: RepMixer holds its own."""

    def __init__(self, C, mlp_ratio=3.0, k=3, ffn_k=7, mixer_scale=True):
        super().__init__()
        self.mixer = RepMixer(C, k, mixer_scale)
        self.ffn = ConvFFN(C, int(C * mlp_ratio), ffn_k)
        self.ls = nn.Parameter(1e-5 * torch.ones(C, 1, 1))

    def forward(self, x):
        x = self.mixer(x)
        return x + self.ls * self.ffn(x)


class MHSA(nn.Module):
    """Multi-head self-attention on a (B, C, H, W) map, head_dim 32, qkv without bias (mci.py Attention)."""

    def __init__(self, C, head_dim=32):
        super().__init__()
        self.h = C // head_dim
        self.qkv, self.proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C)

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)                                           # (B, N, C)
        q, k, v = self.qkv(t).view(B, H * W, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)              # (B, N, C)
        return self.proj(y).transpose(1, 2).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    """x + ls1 * MHSA(BatchNorm(x)); x + ls2 * ConvFFN(x). BatchNorm (not LayerNorm) so it also folds at deploy."""

    def __init__(self, C, mlp_ratio=3.0):
        super().__init__()
        self.norm, self.attn = nn.BatchNorm2d(C), MHSA(C)
        self.ffn = ConvFFN(C, int(C * mlp_ratio))
        self.ls1, self.ls2 = nn.Parameter(1e-5 * torch.ones(C, 1, 1)), nn.Parameter(1e-5 * torch.ones(C, 1, 1))

    def forward(self, x):
        x = x + self.ls1 * self.attn(self.norm(x))
        return x + self.ls2 * self.ffn(x)


class RepCPE(nn.Module):
    """Conditional positional encoding x + dwconv7x7(x) (CPVT, arXiv:2102.10882); folds into W + I."""

    def __init__(self, C, k=7):
        super().__init__()
        self.C, self.k = C, k
        self.pe = nn.Conv2d(C, C, k, 1, k // 2, groups=C)
        self.rep = None

    def forward(self, x):
        return self.rep(x) if self.rep is not None else x + self.pe(x)

    @torch.no_grad()
    def reparameterize(self):
        if self.rep is None:
            w = self.pe.weight + id_kernel(self.C, 1, self.k, self.pe.weight)
            self.rep, self.pe = folded_conv(self.C, self.C, self.k, 1, self.C, w, self.pe.bias), None


class MCi(nn.Module):
    """MCi image encoder: stem (stride `stem_stride`) -> stages of RepMixer blocks (attention blocks with RepCPE in
    the last) joined by stride-2 large-kernel patch embeddings -> conv_exp (C -> 2C, SE) -> mean pool -> @ proj.

    x (B, 3, H, W) in [0, 1] (MobileCLIP uses no mean/std normalisation) -> (B, embed_dim)."""

    def __init__(self, layers=(2, 6, 10, 2), dims=(64, 128, 256, 512), mlp_ratio=3.0, embed_dim=512,
                 mixers=("rep", "rep", "rep", "attn"), se_down=(False, False, True, True), stem_stride=4):
        super().__init__()
        d0 = dims[0]
        self.stem = nn.Sequential(MobileOne(3, d0, 3, 2), MobileOne(d0, d0, 3, 2 if stem_stride == 4 else 1, d0),
                                  MobileOne(d0, d0, 1))
        stages = []
        for i, (L, C, mix) in enumerate(zip(layers, dims, mixers)):
            m = [] if i == 0 else [patch_embed(dims[i - 1], C, se_down[i])]
            if mix == "attn":
                m += [RepCPE(C)] + [AttentionBlock(C, mlp_ratio) for _ in range(L)]
            else:
                m += [RepMixerBlock(C, mlp_ratio) for _ in range(L)]
            stages.append(nn.Sequential(*m))
        self.stages = nn.ModuleList(stages)
        self.conv_exp = MobileOne(dims[-1], 2 * dims[-1], 3, 1, dims[-1], se=True)
        self.proj = nn.Parameter((2 * dims[-1]) ** -0.5 * torch.randn(2 * dims[-1], embed_dim))

    def forward_maps(self, x):
        """-> list of stage outputs (B, C_i, H_i, W_i) and the conv_exp map (B, 2C, h, w)."""
        x, maps = self.stem(x), []
        for s in self.stages:
            x = s(x)
            maps.append(x)
        return maps, self.conv_exp(x)

    def patch_tokens(self, x):
        """Dense features for the probes: last-stage map (conv_exp) upsampled to the previous stage's grid and
        concatenated with it (a two-level hypercolumn) -> (B, N, C) and the grid (h, w)."""
        maps, y = self.forward_maps(x)
        h, w = maps[-2].shape[-2:]
        f = torch.cat([maps[-2], F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)], 1)
        return f.flatten(2).transpose(1, 2), (h, w)

    def forward(self, x):
        return self.forward_maps(x)[1].mean((2, 3)) @ self.proj


class MCt(nn.Module):
    """MCt text encoder: token + learnable position embedding -> Text-RepMixer block -> transformer layers ->
    Text-RepMixer block -> LayerNorm -> EOT (argmax id) pooling -> @ projection. Non-causal (mobileclip_s0.json).
    The RepMixer blocks run on (B, D, 1, L) with 1x11 depthwise kernels; the 1x11 mixer has no 1x1 scale branch.

    tokens (B, L) -> (B, embed_dim)."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, layers=4, heads=8, embed_dim=512, k=11):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * width ** -0.5)
        self.rep_in = RepMixerBlock(width, 4.0, (1, k), (1, k), mixer_scale=False)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.rep_out = RepMixerBlock(width, 4.0, (1, k), (1, k), mixer_scale=False)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens):
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]            # (B, L, D)
        x = self.rep_in(x.transpose(1, 2)[:, :, None]).squeeze(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        x = self.rep_out(x.transpose(1, 2)[:, :, None]).squeeze(2).transpose(1, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(-1)] @ self.text_projection


def mci0(embed_dim=512):
    return MCi((2, 6, 10, 2), (64, 128, 256, 512), 3.0, embed_dim)


def mci1(embed_dim=512):
    return MCi((4, 12, 20, 4), (64, 128, 256, 512), 3.0, embed_dim)


def mci2(embed_dim=512):
    return MCi((4, 12, 24, 4), (80, 160, 320, 640), 3.0, embed_dim)


def mct(embed_dim=512):
    return MCt(49408, 77, 512, 4, 8, embed_dim)


def base_text(embed_dim=512):
    """MobileCLIP-S1/S2/B 'base' text tower: 12 pre-norm layers, width 512, non-causal (common.models' tower)."""
    return TextTransformer(49408, 77, 512, 12, 8, embed_dim, causal=False)


def mci_tiny(embed_dim=128):
    """32-px MCi with the same blocks: stem stride 2 (16x16), RepMixer stages at 16x16 and 8x8, attention at 4x4."""
    return MCi((1, 2, 2), (32, 64, 128), 3.0, embed_dim, ("rep", "rep", "attn"), (False, False, True), stem_stride=2)


def mct_tiny(vocab_size, context_length=32, embed_dim=128):
    return MCt(vocab_size, context_length, 128, 2, 4, embed_dim, k=5)


def reparameterize(model):
    """Fold every train-time branch (MobileOne, RepLK, RepMixer, RepCPE) in place; call in eval mode."""
    for m in list(model.modules()):
        if hasattr(m, "reparameterize") and m is not model:
            m.reparameterize()
    return model


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def randomize_stats(model, seed=0):
    """Random BN running stats / affine params and layer scales ~ O(1), so that every branch matters in the
    equivalence check (with the default init - BN identity, layer scale 1e-5 - folding is trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda t, a, b: t.copy_(a + (b - a) * torch.rand(t.shape, generator=g))  # noqa: E731
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            u(m.running_mean, -0.5, 0.5), u(m.running_var, 0.5, 1.5), u(m.weight, 0.5, 1.5), u(m.bias, -0.5, 0.5)
    for n, p in model.named_parameters():
        if n.split(".")[-1] in ("ls", "ls1", "ls2"):
            u(p, 0.1, 0.5)
    return model


@torch.no_grad()
def reparam_rel_err(model, x, seed=0):
    """Relative L2 error between the train-time multi-branch model and its folded copy (eval mode, fp32)."""
    import copy
    m = randomize_stats(model, seed).float().eval()
    y0 = m(x)
    y1 = reparameterize(copy.deepcopy(m))(x)
    return ((y1 - y0).norm() / y0.norm()).item()
