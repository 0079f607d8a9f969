"""Tests for common/models.py: exact parameter counts (the MobileCLIP paper's MCi/MCt sizes, open_clip ViT-B/16),
open_clip key layout,
loading an open_clip state dict against an independent reference forward written from the raw tensors,
position-embedding interpolation, causal masking, EOT pooling, gradient checkpointing and the CLIP wrapper."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.models import (CLIP, TextTransformer, VisionTransformer, clip_tiny, clip_vit_b16, convert_openclip_state_dict,
                           load_clip_safetensors, load_openclip_state_dict, text_tiny, vit_tiny)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------------------------
# sizes

def test_clip_vit_b16_exact_counts():
    with torch.device("meta"):
        m = clip_vit_b16()
    assert n_params(m.visual) == 86_192_640
    assert n_params(m.text) == 63_428_096
    assert n_params(m) == 149_620_737                     # + logit_scale


def test_conv_stem_counts_match_mobileclip_b_and_catlip():
    with torch.device("meta"):
        v = VisionTransformer(stem="conv")                 # MobileCLIP-B image tower with its 768x512 projection
        bb = VisionTransformer(stem="conv", embed_dim=None)  # CatLIP ViT-B/16 backbone (before the 24,320-way head)
    assert n_params(v.conv_stem) == 748_032
    assert n_params(v) == 86_348_544
    assert n_params(bb) == 85_955_328


def openclip_shapes(image=224, patch=16, vw=768, vl=12, vocab=49408, ctx=77, tw=512, tl=12, E=512):
    """open_clip / OpenAI CLIP state-dict names and shapes, written from the documented layout (§3.2)."""
    S = {"visual.conv1.weight": (vw, 3, patch, patch), "visual.class_embedding": (vw,),
         "visual.positional_embedding": ((image // patch) ** 2 + 1, vw), "visual.ln_pre.weight": (vw,),
         "visual.ln_pre.bias": (vw,), "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
         "visual.proj": (vw, E), "token_embedding.weight": (vocab, tw), "positional_embedding": (ctx, tw),
         "ln_final.weight": (tw,), "ln_final.bias": (tw,), "text_projection": (tw, E), "logit_scale": ()}
    for pre, w, L in (("visual.transformer", vw, vl), ("transformer", tw, tl)):
        for i in range(L):
            b = f"{pre}.resblocks.{i}."
            S.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
                      b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w),
                      b + "attn.out_proj.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                      b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
                      b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
    return S


def test_clip_vit_b16_matches_openclip_key_layout():
    shapes = openclip_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 149_620_737
    with torch.device("meta"):
        m = clip_vit_b16()
        sd = {k: torch.empty(s) for k, s in shapes.items()}
    out = convert_openclip_state_dict(m, sd)
    own = m.state_dict()
    assert set(out) == set(own)                             # a bijection between the two layouts
    for k, v in out.items():
        assert v.shape == own[k].shape, k


# ---------------------------------------------------------------------------------------------------------------
# loading + reference forward

SMALL = dict(image=32, patch=8, vw=32, vl=2, vocab=50, ctx=12, tw=24, tl=2, E=16)


def small_clip(quick_gelu=False):
    act = "quick_gelu" if quick_gelu else "gelu"
    v = VisionTransformer(32, 8, 32, 2, 4, 4.0, 16, act=act)
    t = TextTransformer(50, 12, 24, 2, 3, 16, act=act)
    return CLIP(v, t)


def random_openclip_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.3 * torch.randn(s, generator=g) for k, s in openclip_shapes(**SMALL).items()}
    for k in sd:
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            sd[k] = 1 + 0.2 * torch.randn(sd[k].shape, generator=g)
    sd["logit_scale"] = torch.tensor(2.5)
    return sd


def ref_block(sd, p, x, heads, mask, act):
    """nn.MultiheadAttention-style residual block written from the raw tensors (CLIP's ResidualAttentionBlock)."""
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = qkv.split(C, dim=-1)
    q, k, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    a = (q @ k.transpose(-1, -2)) / math.sqrt(C // heads) + mask
    o = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h) if act == "quick_gelu" else F.gelu(h)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def ref_encode_image(sd, x, heads, layers, act):
    w = sd["visual.conv1.weight"]
    P, C = w.shape[-1], w.shape[0]
    B = x.shape[0]
    # patchify by unfolding instead of a conv: (B, 3, H, W) -> (B, N, 3*P*P) in (c, ky, kx) order
    patches = x.unfold(2, P, P).unfold(3, P, P)                         # B, 3, gh, gw, P, P
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * P * P)
    t = patches @ w.reshape(C, -1).T
    t = torch.cat([sd["visual.class_embedding"].expand(B, 1, C), t], 1) + sd["visual.positional_embedding"]
    t = F.layer_norm(t, (C,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(layers):
        t = ref_block(sd, f"visual.transformer.resblocks.{i}.", t, heads, 0.0, act)
    c = F.layer_norm(t[:, 0], (C,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return c @ sd["visual.proj"]


def ref_encode_text(sd, tok, heads, layers, act):
    L = tok.shape[1]
    C = sd["token_embedding.weight"].shape[1]
    x = sd["token_embedding.weight"][tok] + sd["positional_embedding"][:L]
    mask = torch.full((L, L), float("-inf")).triu(1)                    # open_clip build_causal_mask
    for i in range(layers):
        x = ref_block(sd, f"transformer.resblocks.{i}.", x, heads, mask, act)
    x = F.layer_norm(x, (C,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), tok.argmax(-1)] @ sd["text_projection"]


def _text_batch(g, L, vocab=50):
    tok = torch.randint(1, vocab - 1, (4, L), generator=g)
    ends = [L - 1, 3, 5, 1]
    for b, e in enumerate(ends):                                        # EOT = largest id, then zero padding
        tok[b, e] = vocab - 1
        tok[b, e + 1:] = 0
    return tok


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_load_openclip_state_dict_matches_reference_forward(quick_gelu):
    sd = random_openclip_sd()
    m = small_clip(quick_gelu).eval()
    load_openclip_state_dict(m, sd)
    act = "quick_gelu" if quick_gelu else "gelu"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    tok = _text_batch(g, 12)
    with torch.no_grad():
        fi, ft = m.encode_image(x, normalize=False), m.encode_text(tok, normalize=False)
        ri, rt = ref_encode_image(sd, x, 4, 2, act), ref_encode_text(sd, tok, 3, 2, act)
        assert torch.allclose(fi, ri, atol=1e-5, rtol=1e-4), (fi - ri).abs().max()
        assert torch.allclose(ft, rt, atol=1e-5, rtol=1e-4), (ft - rt).abs().max()
        # shorter than context_length: same as reference on the sliced position embedding
        short = _text_batch(g, 7)
        assert torch.allclose(m.encode_text(short, normalize=False), ref_encode_text(sd, short, 3, 2, act), atol=1e-5)
        i, t, s = m(x, tok)
        assert torch.allclose(i, F.normalize(ri, dim=-1), atol=1e-5)
        assert abs(s.item() - math.exp(2.5)) < 1e-4
    # the other activation gives different features: the reference really distinguishes them
    other = "gelu" if quick_gelu else "quick_gelu"
    assert not torch.allclose(fi, ref_encode_image(sd, x, 4, 2, other), atol=1e-3)


def test_load_openclip_handles_prefix_bookkeeping_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    sd = random_openclip_sd(3)
    wrapped = {"module." + k: v for k, v in sd.items()}
    wrapped.update({"input_resolution": torch.tensor(32), "context_length": torch.tensor(12),
                    "vocab_size": torch.tensor(50), "logit_scale": torch.tensor([1.5])})
    m = small_clip()
    load_openclip_state_dict(m, wrapped)
    assert m.logit_scale.shape == () and abs(m.logit_scale.item() - 1.5) < 1e-7
    assert torch.equal(m.visual.blocks[1].attn.in_proj.weight, sd["visual.transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(m.text.blocks[0].mlp.c_fc.bias, sd["transformer.resblocks.0.mlp.c_fc.bias"])
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    m2 = small_clip()
    load_clip_safetensors(m2, tmp_path / "open_clip_model.safetensors")
    assert torch.equal(m2.text.token_embedding.weight, sd["token_embedding.weight"])


def test_load_openclip_errors_name_missing_unexpected_and_shapes():
    sd = random_openclip_sd()
    bad = dict(sd)
    del bad["visual.ln_post.bias"]
    bad["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(KeyError) as e:
        load_openclip_state_dict(small_clip(), bad)
    assert "visual.ln_post.bias" in str(e.value) and "visual.extra_head.weight" in str(e.value)
    bad = dict(sd)
    bad["visual.proj"] = torch.zeros(32, 17)
    with pytest.raises(ValueError, match=r"visual\.proj.*\(32, 17\).*\(32, 16\)"):
        load_openclip_state_dict(small_clip(), bad)


# ---------------------------------------------------------------------------------------------------------------
# behaviour

def test_vit_shapes_pooling_and_pos_interpolation():
    torch.manual_seed(0)
    v = vit_tiny(width=32, layers=1, heads=2, embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    assert v.forward_tokens(x).shape == (2, 1 + 64, 32)
    pt, grid = v.patch_tokens(x)
    assert pt.shape == (2, 64, 32) and grid == (8, 8)
    assert v(x).shape == (2, 16)
    # pooled: the class token after ln_post, before the projection (CLIP's I_f, what clip.py's probes read)
    assert torch.allclose(v.pooled(x), v.forward_tokens(x)[:, 0]) and torch.allclose(v(x), v.pooled(x) @ v.proj)
    # 48 px input: pos-emb interpolated to 12x12
    pt, grid = v.patch_tokens(torch.randn(2, 3, 48, 48))
    assert pt.shape == (2, 144, 32) and grid == (12, 12)
    # bicubic resize: a pos-emb that is linear in the row index stays increasing and close to linear
    # (PyTorch's a=-0.75 cubic kernel reproduces constants exactly, linear ramps only approximately)
    from common.models import resize_pos_embed
    pos = torch.arange(8.0).repeat_interleave(8)[:, None].expand(64, 4)
    r = resize_pos_embed(pos, (8, 8), (16, 16)).reshape(16, 16, 4)[:, :, 0]
    assert torch.allclose(r[4:12, 3], torch.arange(4, 12) / 2 - 0.25, atol=0.06)
    assert (r[1:, 5] > r[:-1, 5]).all() and torch.allclose(r[:, 0], r[:, 9])
    assert torch.allclose(resize_pos_embed(torch.ones(64, 3), (8, 8), (5, 7)), torch.ones(35, 3))
    assert torch.equal(resize_pos_embed(pos, (8, 8), (8, 8)), pos)
    # mean pooling: no class token, features = projection of the token mean
    m = vit_tiny(width=32, layers=1, heads=2, embed_dim=16, pool="mean").eval()
    t = m.forward_tokens(x)
    assert t.shape == (2, 64, 32) and m.class_embedding is None
    assert torch.allclose(m(x), t.mean(1) @ m.proj, atol=1e-6)
    # no projection
    assert vit_tiny(width=32, layers=1, heads=2, embed_dim=None)(x).shape == (2, 32)


def test_conv_stem_forward():
    torch.manual_seed(0)
    v = vit_tiny(image_size=32, patch_size=8, width=64, layers=1, heads=2, embed_dim=16, stem="conv")
    assert v.conv_stem.conv1.stride == (2, 2) and v.conv_stem.conv2.stride == (2, 2)   # 2-2-2 for patch 8
    x = torch.randn(2, 3, 32, 32)
    assert v.forward_tokens(x).shape == (2, 1 + 16, 64)
    assert v.positional_embedding.shape == (16, 64)       # patches only (DeiT-3 / MobileCLIP-B)
    assert v.patch_tokens(torch.randn(2, 3, 64, 64))[1] == (8, 8)
    v.eval()
    assert v(x).shape == (2, 16)


def test_text_causal_and_eot_pooling():
    torch.manual_seed(0)
    tok = torch.tensor([[5, 7, 99, 0, 0, 0], [5, 8, 9, 3, 99, 0]])
    tok2 = tok.clone()
    tok2[0, 3:] = torch.tensor([4, 4, 4])                 # change tokens after EOT in row 0
    for causal in (True, False):
        t = text_tiny(100, context_length=8, width=32, layers=2, heads=4, embed_dim=16, causal=causal).eval()
        a, b = t(tok), t(tok2)
        assert torch.allclose(a[1], b[1], atol=1e-6)
        # causal: EOT at position 2 cannot see positions 3..5; bidirectional: it can
        assert torch.allclose(a[0], b[0], atol=1e-6) == causal
        # pooled at the EOT (argmax) position
        x = t.forward_tokens(tok)
        assert torch.allclose(a, torch.stack([x[0, 2], x[1, 4]]) @ t.text_projection, atol=1e-6)
    with pytest.raises(ValueError, match="context_length"):
        t(torch.zeros(1, 9, dtype=torch.long))


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    m = CLIP(vit_tiny(width=64, layers=2, heads=2, embed_dim=32), text_tiny(60, width=32, layers=2, embed_dim=32))
    calls, attn = [], m.visual.blocks[0].attn
    fwd = attn.forward
    attn.forward = lambda *a, **k: calls.append(1) or fwd(*a, **k)   # (module hooks do not fire on recompute)
    x, tok = torch.randn(4, 3, 32, 32), torch.randint(0, 60, (4, 10))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.visual.set_grad_checkpointing(ckpt)
        m.text.set_grad_checkpointing(ckpt)
        i, t, s = m(x, tok)
        (s * i @ t.T).logsumexp(1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        assert len(calls) == (2 if ckpt else 1)          # checkpointing recomputes the block in backward
        calls.clear()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_clip_wrapper_scale_and_siglip():
    m = clip_tiny(60)
    assert abs(m.logit_scale.item() - math.log(1 / 0.07)) < 1e-6 and m.logit_bias is None
    x, tok = torch.randn(3, 3, 32, 32), torch.randint(0, 60, (3, 10))
    i, t, s = m(x, tok)
    assert i.shape == t.shape == (3, 128)
    assert torch.allclose(i.norm(dim=-1), torch.ones(3)) and torch.allclose(t.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m(x, tok)[2].item() == 100.0                   # exp clamped at 100
    sg = clip_tiny(60, siglip=True)
    assert abs(sg.logit_scale.item() - math.log(10)) < 1e-6 and sg.logit_bias.item() == -10.0
    assert len(sg(x, tok)) == 4


# ---------------------------------------------------------------------------------------------------------------
# preprocess contract: eval_transform(**model.preprocess) is the model's open_clip eval transform

def pil_reference(img, size, mean, std, resample):
    """open_clip's eval transform written with PIL + numpy only: shorter side -> size (PIL filter), center crop
    (top = round((H - size) / 2)), / 255, (x - mean) / std."""
    from PIL import Image
    import numpy as np
    w, h = img.size
    s = size / min(w, h)
    nw, nh = (size, round(h * s)) if w <= h else (round(w * s), size)
    r = np.asarray(img.resize((nw, nh), resample), dtype=np.float32) / 255.0
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    r = r[top:top + size, left:left + size]
    r = (r - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1)))


def test_vit_preprocess_contract():
    from PIL import Image
    import numpy as np
    from common.models import clip_from_state_dict
    from common.transforms import eval_transform
    m = clip_from_state_dict(random_openclip_sd(1))
    assert m.preprocess == dict(size=32, mean=(0.48145466, 0.4578275, 0.40821073),
                                std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    out = eval_transform(**m.preprocess)(img)
    ref = pil_reference(img, 32, m.preprocess["mean"], m.preprocess["std"], Image.Resampling.BICUBIC)
    assert out.shape == (3, 32, 32) and torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(out, pil_reference(img, 32, m.preprocess["mean"], m.preprocess["std"],
                                                 Image.Resampling.BILINEAR), atol=1e-3)
