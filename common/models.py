"""CLIP towers as plain nn.Modules: a ViT image encoder, a causal text transformer, the two-tower CLIP wrapper,
presets (ViT-B/16 in open_clip's layout and tiny models for the synthetic world) and open_clip / OpenAI
state-dict loading: ViT CLIPs of any size, and MobileCLIP / MobileCLIP2 S0/S1/S2 (common.mci towers). Every loaded
model carries `model.config` (inferred hyper-parameters) and `model.preprocess`, the keyword arguments for which
`common.transforms.eval_transform(**model.preprocess)` is its open_clip eval transform.

References: CLIP (Radford et al. 2021, arXiv:2103.00020) for the towers, EOT pooling and the learnable
temperature; ViT (Dosovitskiy et al. 2020, arXiv:2010.11929); the 4-2-2 conv stem of MobileCLIP-B / CatLIP
(arXiv:2311.17049, arXiv:2404.15653, which follow Xiao et al. 2021 "Early convolutions help transformers see
better"). Parameter names follow open_clip where possible so that loading a checkpoint is a rename:
`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `ln_1`, `attn.in_proj`, `attn.out_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`, `ln_post`, `proj`, `token_embedding`, `ln_final`, `text_projection`, `logit_scale`.

All attention goes through `kernels.attention(q, k, v, causal, scale)` with q, k, v of shape (B, H, N, D).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.transforms import CLIP_MEAN, CLIP_STD
from kernels.attention import attention


# ----------------------------------------------------------------------------------------------------------------
# building blocks

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's released CLIP weights were trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT, arXiv:2103.17239 §2.1); open_clip's `ls_1.gamma` name."""

    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, laid out like nn.MultiheadAttention's
    `in_proj_weight` (rows: all q heads, then all k heads, then all v heads)."""

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} must be divisible by heads {heads}"
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        """x: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        qkv = self.in_proj(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # (B, H, N, D)
        y = attention(q, k, v, causal=causal)                 # scale defaults to D^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, width, hidden, act="gelu"):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (GPT-2 / CLIP ordering)."""

    def __init__(self, width, heads, mlp_ratio=4.0, act="gelu", ls_init=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)
        self.ls_1 = LayerScale(width, ls_init) if ls_init else nn.Identity()
        self.ls_2 = LayerScale(width, ls_init) if ls_init else nn.Identity()

    def forward(self, x, causal=False):
        x = x + self.ls_1(self.attn(self.ln_1(x), causal=causal))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def run_blocks(blocks, x, causal=False, grad_checkpointing=False):
    """Apply blocks in order; with checkpointing, activations inside each block are recomputed in backward."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, causal, use_reentrant=False)
        else:
            x = blk(x, causal)
    return x


def init_blocks(blocks, width):
    """CLIP's transformer init (OpenAI CLIP `initialize_parameters`, also open_clip's text tower):
    attn in N(0, w^-0.5), residual-output projections N(0, w^-0.5 (2L)^-0.5), c_fc N(0, (2w)^-0.5), biases 0."""
    L = len(blocks)
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * L) ** -0.5, (2 * width) ** -0.5
    for blk in blocks:
        nn.init.normal_(blk.attn.in_proj.weight, std=attn_std)
        nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        for lin in (blk.attn.in_proj, blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj):
            nn.init.zeros_(lin.bias)


# ----------------------------------------------------------------------------------------------------------------
# image tower

class ConvStem(nn.Module):
    """MobileCLIP-B / CatLIP conv stem (MobileCLIP, arXiv:2311.17049): conv k4 s4 -> BN -> GELU -> conv k2 s2 -> BN -> GELU
    -> conv k2 s2 (bias, no norm); hidden width max(32, width // 4). Total stride 16 = patch_size; for other patch
    sizes the first conv has stride patch_size // 4 (e.g. 1-2-2 for patch 4)."""

    def __init__(self, width, patch_size=16):
        super().__init__()
        assert patch_size % 4 == 0, f"conv stem needs patch_size divisible by 4, got {patch_size}"
        c, s = max(32, width // 4), patch_size // 4
        self.conv1 = nn.Conv2d(3, c, s, s, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 2, 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, width, 2, 2)

    def forward(self, x):
        x = F.gelu(self.bn1(self.conv1(x)))
        x = F.gelu(self.bn2(self.conv2(x)))
        return self.conv3(x)


def resize_pos_embed(pos, grid, new_grid):
    """pos: (gh*gw, C) for grid (gh, gw) -> (nh*nw, C); the patch rows only (callers keep the class token's row).

    As open_clip's `resize_pos_embed`: F.interpolate(mode="bicubic", antialias=True, align_corners=False) on the
    (1, C, gh, gw) grid. With antialias PyTorch uses PIL's separable cubic (a = -0.5, support widened by the
    downscale factor, weights renormalised at the borders): shrinking a grid low-pass filters it instead of reading
    4 source rows per output row (antialias=False, a = -0.75, clamped borders), as PIL resizes images."""
    if tuple(grid) == tuple(new_grid):
        return pos
    C = pos.shape[-1]
    p = pos.reshape(1, grid[0], grid[1], C).permute(0, 3, 1, 2)
    p = F.interpolate(p.float(), size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    return p.to(pos.dtype).permute(0, 2, 3, 1).reshape(-1, C)


class VisionTransformer(nn.Module):
    """ViT image encoder.

    stem="patch": open_clip ViT layout (conv1 p x p stride p without bias, class token, pos-emb over 1+N tokens,
    ln_pre). stem="conv": MobileCLIP-B / CatLIP layout (4-2-2 ConvStem, pos-emb over the N patches only with no
    pos-emb on the class token as in DeiT-3, no ln_pre). pool="cls" reads the class token; pool="mean" has no class
    token and averages the patch tokens. ln_post is applied to every token before pooling (open_clip default).
    embed_dim=None -> no projection (forward returns width features).
    """

    def __init__(self, image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                 embed_dim=512, pool="cls", stem="patch", grad_checkpointing=False, act="gelu", ls_init=None):
        super().__init__()
        assert pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {pool!r}"
        assert stem in ("patch", "conv"), f"stem must be 'patch' or 'conv', got {stem!r}"
        self.image_size, self.patch_size, self.width, self.pool, self.stem = image_size, patch_size, width, pool, stem
        self.grad_checkpointing = grad_checkpointing
        self.grid = (image_size // patch_size, image_size // patch_size)
        N = self.grid[0] * self.grid[1]
        scale = width ** -0.5
        if stem == "patch":
            self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        else:
            self.conv_stem = ConvStem(width, patch_size)
        self.class_embedding = nn.Parameter(scale * torch.randn(width)) if pool == "cls" else None
        n_pos = N + (1 if pool == "cls" and stem == "patch" else 0)   # conv stem: no pos-emb on the class token
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_pos, width))
        self.ln_pre = nn.LayerNorm(width) if stem == "patch" else nn.Identity()
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act, ls_init) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim)) if embed_dim else None
        init_blocks(self.blocks, width)

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def _embed(self, x):
        """x: (B, 3, H, W) -> tokens (B, [1+]N, C), grid (gh, gw)."""
        x = self.conv1(x) if self.stem == "patch" else self.conv_stem(x)
        B, C, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                                  # (B, N, C)
        pos = self.positional_embedding
        has_cls = self.class_embedding is not None
        if has_cls and self.stem == "patch":                               # pos row 0 belongs to the class token
            pos = torch.cat([pos[:1], resize_pos_embed(pos[1:], self.grid, (gh, gw))])
            x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, C), x], dim=1) + pos.to(x.dtype)
        else:
            x = x + resize_pos_embed(pos, self.grid, (gh, gw)).to(x.dtype)
            if has_cls:
                x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, C), x], dim=1)
        return self.ln_pre(x), (gh, gw)

    def _tokens(self, x):
        x, grid = self._embed(x)
        x = run_blocks(self.blocks, x, causal=False, grad_checkpointing=self.grad_checkpointing)
        return self.ln_post(x), grid

    def forward_tokens(self, x):
        """x: (B, 3, H, W) -> (B, 1+N, width) with pool="cls" or (B, N, width) with pool="mean", after ln_post."""
        return self._tokens(x)[0]

    def patch_tokens(self, x):
        """x: (B, 3, H, W) -> patch tokens (B, N, width) after ln_post, and the grid (gh, gw) with N = gh*gw."""
        t, grid = self._tokens(x)
        return (t[:, 1:] if self.class_embedding is not None else t), grid

    def pooled(self, x):
        """x: (B, 3, H, W) -> (B, width): the pooled token before the projection (CLIP's I_f in its Fig. 3)."""
        t = self.forward_tokens(x)
        return t[:, 0] if self.pool == "cls" else t.mean(dim=1)

    def forward(self, x):
        """x: (B, 3, H, W) -> (B, embed_dim) unnormalised (or (B, width) when embed_dim is None)."""
        f = self.pooled(x)
        return f @ self.proj if self.proj is not None else f


# ----------------------------------------------------------------------------------------------------------------
# text tower

class TextTransformer(nn.Module):
    """CLIP text encoder: token + learnable position embedding, (causal) pre-norm blocks, ln_final, features at
    the EOT token (= the largest id in the sequence, CLIP §2.4), then text_projection (no bias)."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, layers=12, heads=8, embed_dim=512,
                 causal=True, mlp_ratio=4.0, act="gelu", ls_init=None, grad_checkpointing=False):
        super().__init__()
        self.vocab_size, self.context_length, self.width, self.causal = vocab_size, context_length, width, causal
        self.grad_checkpointing = grad_checkpointing
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act, ls_init) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim)) if embed_dim else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width ** -0.5)
        init_blocks(self.blocks, width)

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward_tokens(self, tokens):
        """tokens: (B, L) int, L <= context_length -> (B, L, width) after ln_final."""
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"text tokens have length {L} > context_length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = run_blocks(self.blocks, x, causal=self.causal, grad_checkpointing=self.grad_checkpointing)
        return self.ln_final(x)

    def forward(self, tokens):
        """tokens: (B, L) -> (B, embed_dim) unnormalised, pooled at the argmax id (EOT)."""
        x = self.forward_tokens(tokens)
        f = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return f @ self.text_projection if self.text_projection is not None else f


# ----------------------------------------------------------------------------------------------------------------
# two towers

class CLIP(nn.Module):
    """Two-tower model with a learnable temperature: logit_scale = ln(1/0.07) (CLIP §2.5), exp clamped at 100.
    siglip=True: init_logit_scale defaults to ln(10) and a learnable logit_bias to -10 (SigLIP, arXiv:2303.15343 §3.2);
    forward then also returns logit_bias."""

    def __init__(self, visual, text, init_logit_scale=None, siglip=False, init_logit_bias=None):
        super().__init__()
        self.visual, self.text = visual, text
        if init_logit_scale is None:
            init_logit_scale = math.log(10.0) if siglip else math.log(1 / 0.07)
        if init_logit_bias is None and siglip:
            init_logit_bias = -10.0
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    def encode_image(self, x, normalize=True):
        f = self.visual(x)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, t, normalize=True):
        f = self.text(t)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images, tokens):
        """-> (img_f (B, E), txt_f (B, E), scale) normalised, scale = exp(logit_scale) <= 100; (+ logit_bias)."""
        out = (self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp().clamp(max=100))
        return out + (self.logit_bias,) if self.logit_bias is not None else out


# ----------------------------------------------------------------------------------------------------------------
# presets

def clip_vit_b16(quick_gelu=False, **kw):
    """open_clip ViT-B-16: 86,192,640 visual + 63,428,096 text params (+1 logit_scale). quick_gelu=True for the
    OpenAI weights (open_clip's ViT-B-16-quickgelu / 'openai' tag)."""
    act = "quick_gelu" if quick_gelu else "gelu"
    visual = VisionTransformer(224, 16, 768, 12, 12, 4.0, 512, act=act)
    text = TextTransformer(49408, 77, 512, 12, 8, 512, act=act)
    return CLIP(visual, text, **kw)


def vit_tiny(image_size=32, patch_size=4, width=128, layers=4, heads=4, embed_dim=128, **kw):
    """Synthetic-world ViT: 32 px, 8x8 patches of 4 px (64 tokens + class token). Sized so that a clip_tiny
    forward+backward at batch 128 stays under a second on 2 CPU cores (width 192 / 6 layers takes ~2.5x longer)."""
    return VisionTransformer(image_size, patch_size, width, layers, heads, 4.0, embed_dim, **kw)


def text_tiny(vocab_size, context_length=32, width=128, layers=3, heads=4, embed_dim=128, **kw):
    return TextTransformer(vocab_size, context_length, width, layers, heads, embed_dim, **kw)


def clip_tiny(vocab_size, image_size=32, embed_dim=128, patch_size=8, stem="conv", **kw):
    """vit_tiny with the 4-2-2 conv stem and 8 px patches (16 tokens at 32 px) + text_tiny; kw go to CLIP
    (e.g. siglip=True). Why the conv stem: on the world's shape task a supervised vit_tiny reaches 0.68 accuracy in
    36 s with it (8 px patches) vs 0.24 in 119 s with 4 px linear patches (160 steps x 128, 2 CPU cores); a
    contrastive CLIP with linear patches never encodes shape at all in a 3-minute budget (linear probe = majority)."""
    return CLIP(vit_tiny(image_size=image_size, patch_size=patch_size, stem=stem, embed_dim=embed_dim),
                text_tiny(vocab_size, embed_dim=embed_dim), **kw)


# ----------------------------------------------------------------------------------------------------------------
# open_clip / OpenAI checkpoints

_TEXT_TOP = ("token_embedding.", "positional_embedding", "ln_final.", "text_projection")
_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")  # bookkeeping tensors in OpenAI's state dicts
_IGNORED = _OPENAI_KEYS + ("attn_mask",)                            # ... and mask buffers: no weights


def openclip_key(k):
    """open_clip / OpenAI state-dict key -> this model's key (None for bookkeeping keys that carry no weights).

    Accepted layouts: OpenAI's and open_clip's `CLIP` (text tower at the top level: `transformer.resblocks.*`,
    `token_embedding.*`, ...), open_clip's `CustomTextCLIP` (text tower under `text.`), and DDP / torch.compile
    wrappers (`module.`, `_orig_mod.` prefixes)."""
    while k.startswith(("module.", "_orig_mod.")):
        k = k.split(".", 1)[1]
    if k.split(".")[-1] in _IGNORED:
        return None
    if k.startswith(_TEXT_TOP) or k.startswith("transformer."):
        k = "text." + k
    k = k.replace("transformer.resblocks.", "blocks.")
    return k.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")


def _openclip_name(k):
    """This model's key -> the open_clip / OpenAI name a checkpoint would use (for error messages)."""
    k = k.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
    k = k.replace("blocks.", "transformer.resblocks.")
    return k[len("text."):] if k.startswith("text.") else k


def _listing(keys, n=12):
    keys = sorted(keys)
    return str(keys[:n])[:-1] + (f", ... +{len(keys) - n} more]" if len(keys) > n else "]")


def convert_openclip_state_dict(model, sd):
    """Rename an open_clip / OpenAI state dict to this model's keys; raise a KeyError listing missing and
    unexpected keys and a ValueError listing shape mismatches (checkpoint key, checkpoint shape, model shape)."""
    return _convert(model, sd, openclip_key, _openclip_name)


def _convert(model, sd, rename, name_of, transposed=()):
    """sd (checkpoint names) -> {model key: tensor}. rename: checkpoint key -> model key (None: no weight);
    name_of: model key -> checkpoint name (for the error messages); transposed: model keys stored transposed."""
    own = model.state_dict()
    out, src, unexpected = {}, {}, []
    for k, v in sd.items():
        k2 = rename(k)
        if k2 is None:
            continue
        if k2 not in own:
            unexpected.append(k)
            continue
        if k2 in ("logit_scale", "logit_bias"):
            v = v.reshape(())                       # open_clip may store shape [1]
        if k2 in transposed and v.ndim == 2:
            v = v.t().contiguous()
        out[k2], src[k2] = v, k
    missing = [name_of(k) for k in own if k not in out and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"open_clip state dict does not match the model: missing (keys the model needs) "
                       f"{_listing(missing)}; unexpected (checkpoint keys the model does not have) "
                       f"{_listing(unexpected)}")
    fmt = lambda k, t: tuple(t.shape[::-1]) if k in transposed else tuple(t.shape)  # noqa: E731 (checkpoint layout)
    bad = [f"{src[k]}: checkpoint {fmt(k, v)} vs model {fmt(k, own[k])}" for k, v in out.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("open_clip state dict shape mismatch: " + "; ".join(bad[:12])
                         + (f"; ... +{len(bad) - 12} more" if len(bad) > 12 else ""))
    return out


def load_openclip_state_dict(model, sd):
    """Load an open_clip / OpenAI ViT-B/16-style state dict (keys `visual.conv1.weight`,
    `visual.transformer.resblocks.{i}.attn.in_proj_weight`, `token_embedding.weight`, `logit_scale`, ...)
    into a CLIP built here (use clip_vit_b16(quick_gelu=True) for OpenAI weights)."""
    out = convert_openclip_state_dict(model, sd)
    with torch.no_grad():
        model.load_state_dict(out, strict=False)   # strictness already checked, minus BN counters


def _n_blocks(keys, prefix):
    """Number of numbered entries `prefix{i}.` in keys (ViT blocks, MCi stages and their blocks); 0..L-1 required."""
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys
           if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    if idx != set(range(len(idx))):
        raise ValueError(f"{prefix}* are not numbered 0..{len(idx) - 1}: {sorted(idx)}")
    return len(idx)


def infer_clip_config(sd, vision_heads=None, text_heads=None):
    """Hyper-parameters of an open_clip / OpenAI ViT CLIP, read off the state dict's tensor shapes (works on meta
    tensors; no table of model sizes).

    -> dict: image_size, patch_size, vision_width, vision_layers, vision_heads, vision_mlp (hidden width),
    vocab_size, context_length, text_width, text_layers, text_heads, text_mlp, embed_dim, layer_scale (ls_1/ls_2
    present), logit_bias (present), openai (OpenAI's bookkeeping keys present).

    Shapes used: conv1 (W, 3, P, P); visual positional_embedding (1 + g*g, W) -> image_size g * P; visual.proj
    (W, E); token_embedding (V, Wt); positional_embedding (ctx, Wt); text_projection (Wt, E); c_fc (hidden, w).
    Heads cannot be seen in the shapes (in_proj is (3w, w) however it is split): the default is width // 64,
    OpenAI's rule and open_clip's default head_width. open_clip's ViT-H-14, ViT-g-14 and ViT-bigG-14 configs set
    head_width 80 / 88 / 104, i.e. 16 vision heads: pass vision_heads=16 for those."""
    keys = {}
    for k, v in sd.items():
        k2 = openclip_key(k)
        if k2 is not None:
            keys[k2] = v
    if "visual.conv1.weight" not in keys:
        vis = sorted({".".join(k.split(".")[:2]) for k in keys if k.startswith("visual.")})[:6]
        hint = ("ml-mobileclip's own layout (image_encoder.* / text_encoder.*, its mobileclip_s*.pt): not loadable; "
                "open_clip releases MobileCLIP-S1/S2 and MobileCLIP2-S0/S2 in the layout that loads here"
                if any(k.startswith(("image_encoder.", "text_encoder.")) for k in keys) else
                "a timm image tower (visual.trunk.*) other than MobileCLIP's fastvit_mci (visual.trunk.stem.*)" if any(k.startswith("visual.trunk.") for k in keys) else
                "a ModifiedResNet image tower (RN50-style)" if "visual.layer1" in vis else
                f"image-tower keys {vis}" if vis else f"keys like {sorted(keys)[:4]}")
        raise ValueError(f"not an open_clip / OpenAI ViT CLIP state dict: no visual.conv1.weight ({hint}; only "
                         "ViT towers with a linear patch embedding and MobileCLIP(2)-S0/S1/S2 load here)")
    need = ["visual.class_embedding", "visual.positional_embedding", "visual.proj", "text.token_embedding.weight",
            "text.positional_embedding", "text.text_projection", "visual.blocks.0.mlp.c_fc.weight",
            "text.blocks.0.mlp.c_fc.weight"]
    missing = [_openclip_name(k) for k in need if k not in keys]
    if missing:
        raise KeyError(f"ViT CLIP state dict lacks {missing}")
    W, c, P, P2 = keys["visual.conv1.weight"].shape
    if c != 3 or P != P2:
        raise ValueError(f"visual.conv1.weight has shape {tuple(keys['visual.conv1.weight'].shape)}, "
                         "expected (width, 3, patch, patch)")
    n_pos = keys["visual.positional_embedding"].shape[0]
    g = math.isqrt(max(n_pos - 1, 0))
    if g * g != n_pos - 1:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows: not 1 class token + a square grid")
    V, Wt = keys["text.token_embedding.weight"].shape
    E = keys["visual.proj"].shape[1]
    if tuple(keys["text.text_projection"].shape) != (Wt, E):
        raise ValueError(f"text_projection has shape {tuple(keys['text.text_projection'].shape)}, expected "
                         f"(text width {Wt}, embed dim {E} from visual.proj)")
    cfg = dict(image_size=g * P, patch_size=P, vision_width=W, vision_layers=_n_blocks(keys, "visual.blocks."),
               vision_heads=vision_heads or max(W // 64, 1),
               vision_mlp=keys["visual.blocks.0.mlp.c_fc.weight"].shape[0],
               vocab_size=V, context_length=keys["text.positional_embedding"].shape[0], text_width=Wt,
               text_layers=_n_blocks(keys, "text.blocks."), text_heads=text_heads or max(Wt // 64, 1),
               text_mlp=keys["text.blocks.0.mlp.c_fc.weight"].shape[0], embed_dim=E,
               layer_scale="visual.blocks.0.ls_1.gamma" in keys, logit_bias="logit_bias" in keys,
               openai=any(k.split(".")[-1] in _OPENAI_KEYS for k in sd))
    for tower, w, h in (("vision", W, cfg["vision_heads"]), ("text", Wt, cfg["text_heads"])):
        if w % h:
            raise ValueError(f"{tower} width {w} is not divisible by {h} heads")
    return cfg


def _mlp_ratio(hidden, width):
    """The mlp_ratio that gives `hidden` units: MLP takes int(width * ratio), and (hidden + 0.5) / width keeps
    float rounding from landing one below (e.g. bigG's 8192 / 1664)."""
    return (hidden + 0.5) / width


def clip_from_state_dict(sd, quick_gelu=None, vision_heads=None, text_heads=None, dtype=torch.float32,
                         image_size=None):
    """Build the CLIP that an open_clip / OpenAI ViT state dict describes (infer_clip_config) and load it.

    quick_gelu: None -> True when OpenAI's bookkeeping keys (input_resolution / context_length / vocab_size) are in
    sd (OpenAI's models were trained with QuickGELU), else False (open_clip's default GELU). OpenAI weights that
    open_clip re-saved carry no such marker (open_clip's `-quickgelu` model names say it instead): pass True.
    dtype: floating tensors are cast to it (OpenAI's weights are fp16); None keeps the checkpoint's dtypes.
    The parameters are sd's tensors themselves (after the cast), not copies. Returns the model in eval mode, with
    `model.config` = the inferred hyper-parameters plus the quick_gelu used, and `model.preprocess` = the keyword
    arguments of common.transforms.eval_transform that give its open_clip eval preprocessing.

    MobileCLIP / MobileCLIP2 S0/S1/S2 open_clip checkpoints (image tower = timm fastvit_mci* under `visual.trunk.`)
    are recognised by their keys (visual.trunk.stem.*) and built by mobileclip_from_state_dict (image_size: default 256; for a ViT it must
    equal the size its position embedding encodes)."""
    if any(_strip_wrappers(k).startswith("visual.trunk.stem.") for k in sd):   # timm FastVit's stem: MCi
        if quick_gelu:
            raise ValueError("quick_gelu=True: MobileCLIP's towers use GELU")
        return mobileclip_from_state_dict(sd, text_heads=text_heads, dtype=dtype, image_size=image_size)
    cfg = infer_clip_config(sd, vision_heads, text_heads)
    if image_size is not None and int(image_size) != cfg["image_size"]:
        raise ValueError(f"image_size={image_size}, but the checkpoint's position embedding is for "
                         f"{cfg['image_size']} px")
    cfg["family"] = "vit"
    cfg["quick_gelu"] = cfg["openai"] if quick_gelu is None else bool(quick_gelu)
    act = "quick_gelu" if cfg["quick_gelu"] else "gelu"
    ls = 1e-5 if cfg["layer_scale"] else None               # the value is overwritten by the checkpoint's gamma
    with torch.device("meta"):                              # no memory for weights that are replaced right away
        visual = VisionTransformer(cfg["image_size"], cfg["patch_size"], cfg["vision_width"], cfg["vision_layers"],
                                   cfg["vision_heads"], _mlp_ratio(cfg["vision_mlp"], cfg["vision_width"]),
                                   cfg["embed_dim"], act=act, ls_init=ls)
        text = TextTransformer(cfg["vocab_size"], cfg["context_length"], cfg["text_width"], cfg["text_layers"],
                               cfg["text_heads"], cfg["embed_dim"], act=act, ls_init=ls,
                               mlp_ratio=_mlp_ratio(cfg["text_mlp"], cfg["text_width"]))
        model = CLIP(visual, text, init_logit_bias=0.0 if cfg["logit_bias"] else None)
    out = convert_openclip_state_dict(model, sd)            # names and shapes, every block
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    model.load_state_dict(out, strict=True, assign=True)
    model.config = cfg
    model.preprocess = vit_preprocess(cfg["image_size"])
    return model.eval()


def vit_preprocess(image_size):
    """open_clip's eval preprocessing of a ViT CLIP (pretrained.py `_pcfg`: OpenAI mean/std, bicubic, shortest-side
    resize): `common.transforms.eval_transform(**model.preprocess)` is that transform."""
    return dict(size=int(image_size), mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD), interpolation="bicubic")


# MobileCLIP / MobileCLIP2 S0/S1/S2 in open_clip's layout: `visual.trunk.*` = timm fastvit_mci0/1/2 (common.mci maps
# the names), `text.*` = open_clip's TextTransformer (CustomTextCLIP), non-causal (model_configs/MobileCLIP-S2.json,
# MobileCLIP2-S0.json: "no_causal_mask": true), `logit_scale`.
MOBILECLIP_IMAGE_SIZE = 256     # open_clip MobileCLIP(2)-S0/S1/S2 configs: vision_cfg.image_size (not in the weights)


def mobileclip_preprocess(image_size=MOBILECLIP_IMAGE_SIZE):
    """open_clip's eval preprocessing of MobileCLIP (pretrained.py `_mccfg`): no normalisation (mean 0, std 1),
    bilinear shortest-side resize, center crop. ml-mobileclip's own transform is the same (Resize bilinear,
    CenterCrop, ToTensor)."""
    return dict(size=int(image_size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")


def _strip_wrappers(k):
    while k.startswith(("module.", "_orig_mod.")):
        k = k.split(".", 1)[1]
    return k


def _text_config(keys, text_heads=None):
    """open_clip text tower hyper-parameters from `text.*` shapes (keys already renamed by openclip_key)."""
    need = ["text.token_embedding.weight", "text.positional_embedding", "text.text_projection",
            "text.blocks.0.mlp.c_fc.weight"]
    missing = [_openclip_name(k) for k in need if k not in keys]
    if missing:
        raise KeyError(f"open_clip text tower lacks {missing}")
    V, W = keys["text.token_embedding.weight"].shape
    Wp, E = keys["text.text_projection"].shape
    if Wp != W:
        raise ValueError(f"text_projection has shape {(Wp, E)}, expected (text width {W}, embed dim)")
    heads = text_heads or max(W // 64, 1)
    if W % heads:
        raise ValueError(f"text width {W} is not divisible by {heads} heads")
    return dict(vocab_size=V, context_length=keys["text.positional_embedding"].shape[0], text_width=W,
                text_layers=_n_blocks(keys, "text.blocks."), text_heads=heads,
                text_mlp=keys["text.blocks.0.mlp.c_fc.weight"].shape[0], embed_dim=E,
                text_layer_scale="text.blocks.0.ls_1.gamma" in keys)


def mobileclip_from_state_dict(sd, text_heads=None, dtype=torch.float32, image_size=None):
    """Build and load a MobileCLIP / MobileCLIP2 S0/S1/S2 open_clip state dict: MCi (common.mci, variant and any
    size read off the shapes by infer_mci_config, timm's head bias included, train-time or folded modules as the
    checkpoint has them) + the non-causal TextTransformer. Every checkpoint key must be consumed and every model key
    present (KeyError naming them), shapes must agree (ValueError naming the key). Eval mode; `model.config`,
    `model.preprocess` (mobileclip_preprocess) as clip_from_state_dict."""
    from common import mci as MCI
    keys = {}
    for k, v in sd.items():
        k = _strip_wrappers(k)
        k2 = k if k.startswith("visual.") else openclip_key(k)
        if k2 is not None:
            keys[k2] = v
    vcfg = MCI.infer_mci_config(keys, prefix="visual.trunk.")
    if any(k.startswith("text_encoder.") for k in keys):
        raise KeyError("text_encoder.* keys: ml-mobileclip's own layout (MobileCLIP-S0's MCt text tower), not "
                       "open_clip's; open_clip has no MobileCLIP-S0 (MCt) model, so only the open_clip layout "
                       "(text.* TextTransformer) loads here")
    tcfg = _text_config(keys, text_heads)
    if tcfg["embed_dim"] != vcfg["embed_dim"]:
        raise ValueError(f"text_projection embeds to {tcfg['embed_dim']}, visual.trunk.head.fc.weight to "
                         f"{vcfg['embed_dim']}")
    trunk_keys = [k[len("visual.trunk."):] for k in keys if k.startswith("visual.trunk.")]
    ls = 1e-5 if tcfg["text_layer_scale"] else None
    with torch.device("meta"):
        visual = MCI.fold_like(MCI.MCi(**vcfg), trunk_keys)
        text = TextTransformer(tcfg["vocab_size"], tcfg["context_length"], tcfg["text_width"], tcfg["text_layers"],
                               tcfg["text_heads"], tcfg["embed_dim"], causal=False, ls_init=ls,
                               mlp_ratio=_mlp_ratio(tcfg["text_mlp"], tcfg["text_width"]))
        model = CLIP(visual, text, init_logit_bias=0.0 if "logit_bias" in keys else None)
    km = MCI.timm_key_map(visual)
    inv = {"visual.trunk." + t: "visual." + o for o, t in km.items()}
    rename = lambda k: inv.get(k, k) if k.startswith("visual.") else k  # noqa: E731 (text already renamed)
    name_of = lambda k: "visual.trunk." + km[k[7:]] if k.startswith("visual.") else _openclip_name(k)  # noqa: E731
    out = _convert(model, keys, rename, name_of, transposed=("visual.proj",))
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    model.load_state_dict(out, strict=False, assign=True)   # strictness checked by _convert, minus BN counters
    for name, b in list(model.named_buffers()):              # BN counters a checkpoint may omit: zeros, not meta
        if name not in out and b.is_meta:
            mod, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            mod._buffers[attr] = torch.zeros(b.shape, dtype=b.dtype)
    folded = any(k.endswith("reparam_conv.weight") for k in trunk_keys)
    image_size = int(image_size or MOBILECLIP_IMAGE_SIZE)
    visual.image_size = image_size                          # what callers of a ViT read (common.eval, teachers)
    model.config = dict(family="mobileclip", variant=MCI.mci_variant(vcfg), image_size=image_size, folded=folded,
                        quick_gelu=False, causal=False, vision_heads=None, openai=False, **vcfg, **{k: v for k, v in tcfg.items() if k != "embed_dim"})
    model.preprocess = mobileclip_preprocess(image_size)
    return model.eval()


def _reason(e):
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def load_clip_checkpoint(path, quick_gelu=None, vision_heads=None, text_heads=None, dtype=torch.float32,
                         device="cpu", image_size=None):
    """safetensors file of an open_clip / OpenAI ViT CLIP or an open_clip MobileCLIP / MobileCLIP2 S0/S1/S2 -> the
    model built by clip_from_state_dict (with `model.config` and `model.preprocess`), on `device`.
    Any problem (missing, truncated or non-safetensors file, missing keys, wrong shapes) raises
    common.convert.CheckpointError whose message starts with the path."""
    from common.convert import CheckpointError, read_safetensors
    sd, _ = read_safetensors(path)
    try:
        model = clip_from_state_dict(sd, quick_gelu, vision_heads, text_heads, dtype, image_size)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {_reason(e)}") from None
    return model.to(device)


def load_clip_safetensors(model, path):
    """Read an open_clip checkpoint saved as safetensors (e.g. open_clip_model.safetensors) into an existing model;
    errors are common.convert.CheckpointError naming the path."""
    from common.convert import CheckpointError, read_safetensors
    sd, _ = read_safetensors(path)
    try:
        load_openclip_state_dict(model, sd)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {_reason(e)}") from None
