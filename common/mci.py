"""MobileCLIP's encoders (Vasu et al., arXiv:2311.17049, sec. 4): the MCi0/1/2 image and MCt text towers with the
released models' exact parameter counts, the 32-px `mci_tiny` / `mct_tiny` of the miniature, and `reparameterize()`,
which folds every train-time branch (MobileOne, RepLK, RepMixer, RepCPE) into one conv.

Reference: ml-mobileclip mobileclip/models/mci.py, modules/common/mobileone.py, modules/image/replknet.py,
modules/text/repmixer.py. Used by mobileclip.py, and by common.models to load released MobileCLIP checkpoints
(section 2: timm `fastvit_mci*` names as open_clip stores them, variant inference, folded checkpoints).
"""
import copy
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.models import Block, TextTransformer, _n_blocks
from kernels.attention import attention

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
    c.weight.data.copy_(w), c.bias.data.copy_(b)
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
    """MobileOne block (arXiv:2206.04040): act(se(BN(x) + BN(conv1x1 x) + sum_n BN(conv_kxk x))):
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
        branches = [self.rep] if self.rep is not None else [self.skip, self.scale, *self.convs]
        return self.act(self.se(sum(c(x) for c in branches if c is not None)))

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

    def reparameterize(self):
        if self.rep is None:
            (w1, b1), (w2, b2) = fuse_bn(self.lk.conv.weight, self.lk.bn), fuse_bn(self.sk.conv.weight, self.sk.bn)
            self.rep = folded_conv(self.cin, self.cout, self.k, self.s, self.cin, w1 + pad_to(w2, self.k), b1 + b2)
            self.lk = self.sk = None


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
        return self.rep(x) if self.rep is not None else x + self.ls * (self.mixer(x) - self.norm(x))

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
        nn.init.zeros_(self.fc1.bias), nn.init.zeros_(self.fc2.bias)

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
        t = self.qkv(x.flatten(2).transpose(1, 2))                               # (B, N, 3C)
        q, k, v = t.view(B, H * W, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
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

    def reparameterize(self):
        if self.rep is None:
            w = self.pe.weight + id_kernel(self.C, 1, self.k, self.pe.weight)
            self.rep, self.pe = folded_conv(self.C, self.C, self.k, 1, self.C, w, self.pe.bias), None


class MCi(nn.Module):
    """MCi image encoder: stem (stride `stem_stride`) -> stages of RepMixer blocks (attention blocks with RepCPE in
    the last) joined by stride-2 large-kernel patch embeddings -> conv_exp (C -> 2C, SE) -> mean pool -> @ proj:
    x (B, 3, H, W) in [0, 1] (MobileCLIP uses no mean/std normalisation) -> (B, embed_dim)."""

    def __init__(self, layers=(2, 6, 10, 2), dims=(64, 128, 256, 512), mlp_ratio=3.0, embed_dim=512,
                 mixers=("rep", "rep", "rep", "attn"), se_down=(False, False, True, True), stem_stride=4,
                 proj_bias=False):
        super().__init__()
        d0 = dims[0]
        self.stem = nn.Sequential(MobileOne(3, d0, 3, 2), MobileOne(d0, d0, 3, 2 if stem_stride == 4 else 1, d0),
                                  MobileOne(d0, d0, 1))
        stages = []
        for i, (L, C, mix) in enumerate(zip(layers, dims, mixers)):  # patch embedding: RepLK stride 2, 1x1 MobileOne
            m = [] if i == 0 else [nn.Sequential(RepLK(dims[i - 1], C, 7, 2, 3, se_down[i]), MobileOne(C, C, 1))]
            m += ([RepCPE(C)] + [AttentionBlock(C, mlp_ratio) for _ in range(L)] if mix == "attn"
                  else [RepMixerBlock(C, mlp_ratio) for _ in range(L)])
            stages.append(nn.Sequential(*m))
        self.stages = nn.ModuleList(stages)
        self.conv_exp = MobileOne(dims[-1], 2 * dims[-1], 3, 1, dims[-1], se=True)
        self.proj = nn.Parameter((2 * dims[-1]) ** -0.5 * torch.randn(2 * dims[-1], embed_dim))
        # ml-mobileclip's GlobalPool2D projection has no bias; timm / open_clip use the classifier head.fc (a Linear
        # with bias) as the projection, so a loaded open_clip checkpoint needs it to reproduce timm's output.
        self.proj_bias = nn.Parameter(torch.zeros(embed_dim)) if proj_bias else None

    def forward_maps(self, x):
        """-> list of stage outputs (B, C_i, H_i, W_i) and the conv_exp map (B, 2C, h, w)."""
        x, maps = self.stem(x), []
        for s in self.stages:
            x = s(x)
            maps.append(x)
        return maps, self.conv_exp(x)

    def patch_tokens(self, x):
        """Dense features for the probes: every stage map and the conv_exp map upsampled to the first stage's grid
        and concatenated (a hypercolumn, cf. DINOv2's multi-layer linear probe) -> (B, N, C), grid (h, w)."""
        maps, y = self.forward_maps(x)
        h, w = maps[0].shape[-2:]
        up = [F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps[1:] + [y]]
        return torch.cat([maps[0]] + up, 1).flatten(2).transpose(1, 2), (h, w)

    def forward(self, x):
        y = self.forward_maps(x)[1].mean((2, 3)) @ self.proj
        return y + self.proj_bias if self.proj_bias is not None else y


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
        conv = lambda blk, x: blk(x.transpose(1, 2)[:, :, None]).squeeze(2).transpose(1, 2)  # noqa: E731 (B, L, D)
        x = conv(self.rep_in, self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_final(conv(self.rep_out, x))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(-1)] @ self.text_projection


# the released towers (ml-mobileclip configs; any embed_dim=): image MCi0/1/2, text MCt, and the 12-layer non-causal
# 'base' text tower of MobileCLIP-S1/S2/B (common.models' tower)
mci0 = partial(MCi, (2, 6, 10, 2), (64, 128, 256, 512))
mci1 = partial(MCi, (4, 12, 20, 4), (64, 128, 256, 512))
mci2 = partial(MCi, (4, 12, 24, 4), (80, 160, 320, 640))
mct = partial(MCt, 49408, 77, 512, 4, 8)
base_text = partial(TextTransformer, 49408, 77, 512, 12, 8, causal=False)


def mci_tiny(embed_dim):
    """32-px MCi with the same blocks: stem stride 4 (8x8), RepMixer stages at 8x8 and 4x4, attention at 2x2."""
    return MCi((1, 2, 2), (32, 64, 128), 3.0, embed_dim, ("rep", "rep", "attn"), (False, False, True))


def mct_tiny(vocab_size, context_length, embed_dim):
    return MCt(vocab_size, context_length, 128, 2, 4, embed_dim, k=5)


@torch.no_grad()
def reparameterize(model):
    """Fold every train-time branch (MobileOne, RepLK, RepMixer, RepCPE) in place; call in eval mode."""
    for m in list(model.modules()):
        if hasattr(m, "reparameterize") and m is not model:
            m.reparameterize()
    return model


@torch.no_grad()
def reparam_rel_err(model, x, seed=0):
    """Relative L2 error between the train-time multi-branch model and its folded copy (eval mode, fp32), after
    setting BN running stats / affine params and layer scales to random O(1) values in place, so that every branch
    matters (with the default init - BN identity, layer scale 1e-5 - folding is trivially exact)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda t, a, b: t.copy_(a + (b - a) * torch.rand(t.shape, generator=g))  # noqa: E731
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            u(m.running_mean, -0.5, 0.5), u(m.running_var, 0.5, 1.5), u(m.weight, 0.5, 1.5), u(m.bias, -0.5, 0.5)
    for n, p in model.named_parameters():
        if n.split(".")[-1] in ("ls", "ls1", "ls2"):
            u(p, 0.1, 0.5)
    m = model.float().eval()
    y0, y1 = m(x), reparameterize(copy.deepcopy(m))(x)
    return ((y1 - y0).norm() / y0.norm()).item()


def param_table():
    """Train-time and reparameterized counts of the released towers (built on the meta device: no memory/time)."""
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        ms = {"mci0": mci0(), "mci1": mci1(), "mci2": mci2(), "mct": mct(), "base_text": base_text()}
        return {k: {"train": n_params(m), "reparam": n_params(reparameterize(m))} for k, m in ms.items()}


# 2. Released checkpoints. open_clip builds MobileCLIP(2)-S0/S1/S2 image towers with timm's `fastvit_mci0/1/2`
#    (open_clip model_configs/MobileCLIP-S2.json: timm_pool "avg", timm_proj null, so timm's classifier head.fc, a
#    Linear with bias, is the 512-d projection) and stores them under `visual.trunk.`. The names below are timm's
#    (timm/models/fastvit.py: MobileOneBlock, ReparamLargeKernelConv, RepMixer, ConvMlp, RepConditionalPosEnc,
#    FastVitStage, FastVit); the released weights are train-time (multi-branch) ones, and a checkpoint saved after
#    timm's reparameterize() has `reparam_conv` in place of the branches: both load (fold_like).

# our attribute -> timm's, per module type (unlisted names are the same: conv, bn, fc1, fc2, qkv, proj, norm, mixer)
_TIMM_NAMES = {
    MCi: {"conv_exp": "final_conv", "proj": "head.fc.weight", "proj_bias": "head.fc.bias"},
    MobileOne: {"skip": "identity", "convs": "conv_kxk", "scale": "conv_scale", "rep": "reparam_conv"},
    SE: {"reduce": "fc1", "expand": "fc2"},
    RepLK: {"lk": "large_conv", "sk": "small_conv", "rep": "reparam_conv"},
    RepMixer: {"ls": "layer_scale.gamma", "rep": "reparam_conv"},
    RepMixerBlock: {"mixer": "token_mixer", "ffn": "mlp", "ls": "layer_scale.gamma"},
    AttentionBlock: {"attn": "token_mixer", "ffn": "mlp", "ls1": "layer_scale_1.gamma", "ls2": "layer_scale_2.gamma"},
    RepCPE: {"pe": "pos_enc", "rep": "reparam_conv"},
}
TIMM_TRANSPOSED = ("head.fc.weight",)   # timm's Linear weight (E, C) is our proj (C, E) transposed


def _stage_names(stage):
    """Our stage [downsample, RepCPE, blocks...] -> timm FastVitStage's `downsample.proj`, `pos_emb`, `blocks.j`."""
    names, j = [], 0
    for c in stage:
        if isinstance(c, nn.Sequential):
            names.append("downsample.proj")
        elif isinstance(c, RepCPE):
            names.append("pos_emb")
        else:
            names.append(f"blocks.{j}")
            j += 1
    return names


def timm_modules(model):
    """(module, our name prefix, timm name prefix) for every module of an MCi, parents before children."""
    out = []

    def walk(m, ours, theirs):
        out.append((m, ours, theirs))
        table = _TIMM_NAMES.get(type(m), {})
        for name, c in m.named_children():
            if isinstance(m, MCi) and name == "stages":
                for i, st in enumerate(c):
                    for (n2, c2), t2 in zip(st.named_children(), _stage_names(st)):
                        walk(c2, f"{ours}stages.{i}.{n2}.", f"{theirs}stages.{i}.{t2}.")
            else:
                walk(c, f"{ours}{name}.", f"{theirs}{table.get(name, name)}.")

    walk(model, "", "")
    return out


def timm_key_map(model):
    """Our MCi state-dict key -> timm fastvit_mci* key (e.g. `stages.1.0.0.lk.conv.weight` ->
    `stages.1.downsample.proj.0.large_conv.conv.weight`; `proj` -> `head.fc.weight`, stored transposed)."""
    km = {}
    for m, ours, theirs in timm_modules(model):
        table = _TIMM_NAMES.get(type(m), {})
        for n, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            km[ours + n] = theirs + table.get(n, n)
    return km


@torch.no_grad()
def fold_like(model, keys):
    """Reparameterize, in place, each module of an MCi whose timm name has `reparam_conv.weight` in `keys` (a
    checkpoint saved after timm's reparameterize), so that the model's keys are the checkpoint's. Works on meta."""
    keys = set(keys)
    for m, _, theirs in timm_modules(model):
        if m is not model and hasattr(m, "reparameterize") and theirs + "reparam_conv.weight" in keys and m.rep is None:
            m.reparameterize()
    return model


def infer_mci_config(sd, prefix=""):
    """MCi(**cfg) for a timm fastvit_mci* state dict (keys `prefix + stem.0...`), from the shapes only: stages and
    blocks per stage (counted), widths and mlp ratio (blocks.0.mlp.fc1: (hidden, C, 1, 1)), attention stages
    (token_mixer.qkv present), SE in the downsampling (downsample.proj.0.se present), embed_dim and bias (head.fc).
    Raises KeyError / ValueError naming the key for a trunk MCi cannot represent."""
    t = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    keys = set(t)
    shape = lambda k: tuple(t[k].shape)  # noqa: E731
    stem = next((k for k in ("stem.0.conv_kxk.0.conv.weight", "stem.0.reparam_conv.weight") if k in keys), None)
    if stem is None:
        raise KeyError(f"not a timm fastvit_mci trunk: no {prefix}stem.0.conv_kxk.0.conv.weight "
                       f"(or {prefix}stem.0.reparam_conv.weight)")
    n = _n_blocks(keys, "stages.")
    layers, dims, ratios, mixers, se_down = [], [], [], [], []
    for i in range(n):
        p = f"stages.{i}."
        layers.append(_n_blocks(keys, p + "blocks."))
        fc1 = p + "blocks.0.mlp.fc1.weight"
        if layers[-1] == 0 or fc1 not in keys:
            raise KeyError(f"{prefix}{fc1} missing: stage {i} has no blocks")
        hidden, C = shape(fc1)[:2]
        dims.append(C), ratios.append(hidden / C)
        attn = p + "blocks.0.token_mixer.qkv.weight" in keys
        mixers.append("attn" if attn else "rep")
        has_pe = any(k.startswith(p + "pos_emb.") for k in keys)
        if has_pe != attn:
            raise ValueError(f"{prefix}{p}pos_emb is {'present' if has_pe else 'absent'} in a "
                             f"{'attention' if attn else 'RepMixer'} stage; MCi has RepCPE exactly before attention")
        has_down = any(k.startswith(p + "downsample.") for k in keys)
        if has_down != (i > 0):
            raise ValueError(f"{prefix}{p}downsample is {'present' if has_down else 'absent'}; MCi downsamples "
                             "before every stage but the first")
        se_down.append(p + "downsample.proj.0.se.fc1.weight" in keys)
    if len(set(ratios)) != 1:
        raise ValueError(f"{prefix}stages.*.blocks.0.mlp.fc1: mlp ratios differ per stage {ratios}")
    if "head.fc.weight" not in keys:
        raise KeyError(f"{prefix}head.fc.weight missing (open_clip's timm_proj null head: the 512-d projection)")
    E, C2 = shape("head.fc.weight")
    if C2 != 2 * dims[-1]:
        raise ValueError(f"{prefix}head.fc.weight has shape {(E, C2)}, expected (embed_dim, {2 * dims[-1]}) = "
                         f"final_conv's 2 x {dims[-1]} channels")
    if shape(stem)[0] != dims[0]:
        raise ValueError(f"{prefix}{stem} has {shape(stem)[0]} output channels, stage 0 has {dims[0]}")
    return dict(layers=tuple(layers), dims=tuple(dims), mlp_ratio=ratios[0], embed_dim=E, mixers=tuple(mixers),
                se_down=tuple(se_down), proj_bias="head.fc.bias" in keys)


def mci_variant(cfg):
    """'mci0' / 'mci1' / 'mci2' when the inferred layers and widths are one of the released ones, else None."""
    for name, f in (("mci0", mci0), ("mci1", mci1), ("mci2", mci2)):
        if (tuple(cfg["layers"]), tuple(cfg["dims"])) == f.args:
            return name
    return None
