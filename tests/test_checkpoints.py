"""Loading open_clip / OpenAI ViT CLIP checkpoints (common/models.py, open_clip section) and reading safetensors
files (common/convert.read_safetensors).

State dicts are built here from the documented key names and shapes (open_clip's and OpenAI CLIP's
`build_model`), at small sizes with random values or at real sizes on the meta device (shapes only, no memory).
The reference forward is written from the open_clip math with PyTorch's own functional ops: F.conv2d patchify,
class token, position embedding, ln_pre, residual blocks whose attention is F.multi_head_attention_forward (the
function nn.MultiheadAttention, which open_clip's blocks call, runs), ln_post, proj; text: token + position
embedding, causal blocks, ln_final, the row at argmax(token id) (EOT), text_projection."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common.convert import CheckpointError
from common.models import (CLIP, TextTransformer, VisionTransformer, clip_from_state_dict, infer_clip_config,
                           load_clip_checkpoint, load_clip_safetensors, resize_pos_embed)


# ---------------------------------------------------------------------------------------------------------------
# state dicts in open_clip / OpenAI naming

def clip_shapes(image=32, patch=8, vw=128, vl=2, vocab=60, ctx=12, tw=128, tl=2, E=32, vmlp=None, tmlp=None,
                ls=False):
    """{key: shape} of an open_clip `CLIP` / OpenAI ViT state dict (text tower at the top level)."""
    S = {"visual.conv1.weight": (vw, 3, patch, patch), "visual.class_embedding": (vw,),
         "visual.positional_embedding": ((image // patch) ** 2 + 1, vw), "visual.ln_pre.weight": (vw,),
         "visual.ln_pre.bias": (vw,), "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
         "visual.proj": (vw, E), "token_embedding.weight": (vocab, tw), "positional_embedding": (ctx, tw),
         "ln_final.weight": (tw,), "ln_final.bias": (tw,), "text_projection": (tw, E), "logit_scale": ()}
    for pre, w, L, hid in (("visual.transformer", vw, vl, vmlp or 4 * vw), ("transformer", tw, tl, tmlp or 4 * tw)):
        for i in range(L):
            b = f"{pre}.resblocks.{i}."
            S.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
                      b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w),
                      b + "attn.out_proj.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                      b + "mlp.c_fc.weight": (hid, w), b + "mlp.c_fc.bias": (hid,),
                      b + "mlp.c_proj.weight": (w, hid), b + "mlp.c_proj.bias": (w,)})
            if ls:
                S.update({b + "ls_1.gamma": (w,), b + "ls_2.gamma": (w,)})
    return S


def meta_sd(**kw):
    return {k: torch.empty(s, device="meta") for k, s in clip_shapes(**kw).items()}


def random_sd(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in clip_shapes(**kw).items():
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            sd[k] = 1 + 0.1 * torch.randn(s, generator=g)
        elif k.endswith("gamma"):
            sd[k] = 0.5 + 0.3 * torch.rand(s, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(s, generator=g)
    sd["logit_scale"] = torch.tensor(2.0)
    return sd


def to_layout(sd, layout):
    """Canonical (OpenAI-style) keys -> the layout under test."""
    if layout == "openai":        # OpenAI's state dict (from its JIT model) carries three bookkeeping tensors
        out = dict(sd)
        out.update(input_resolution=torch.tensor(32), context_length=torch.tensor(12), vocab_size=torch.tensor(60))
        return out
    if layout == "open_clip":     # open_clip's CLIP: same names, no bookkeeping keys
        return dict(sd)
    if layout == "custom_text":   # open_clip's CustomTextCLIP (text tower under text.), saved from a DDP model
        return {"module." + (k if k.startswith(("visual.", "logit_")) else "text." + k): v for k, v in sd.items()}
    raise ValueError(layout)


# ---------------------------------------------------------------------------------------------------------------
# reference forward

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_block(sd, p, x, heads, causal, act):
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)   # (N, B, C)
    mask = torch.full((N, N), float("-inf")).triu(1) if causal else None
    a, _ = F.multi_head_attention_forward(h, h, h, C, heads, sd[p + "attn.in_proj_weight"],
                                          sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
                                          sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
                                          training=False, need_weights=False, attn_mask=mask)
    a = a.transpose(0, 1)
    if p + "ls_1.gamma" in sd:
        a = a * sd[p + "ls_1.gamma"]
    x = x + a
    h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = act(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
    h = F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    if p + "ls_2.gamma" in sd:
        h = h * sd[p + "ls_2.gamma"]
    return x + h


def ref_image(sd, x, heads, act):
    w = sd["visual.conv1.weight"]
    C, P = w.shape[0], w.shape[-1]
    t = F.conv2d(x, w, stride=P).flatten(2).transpose(1, 2)                # (B, N, C)
    t = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, C), t], 1) + sd["visual.positional_embedding"]
    t = F.layer_norm(t, (C,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    L = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(L):
        t = ref_block(sd, f"visual.transformer.resblocks.{i}.", t, heads, False, act)
    return F.layer_norm(t[:, 0], (C,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]


def ref_text(sd, tok, heads, act):
    C = sd["token_embedding.weight"].shape[1]
    x = F.embedding(tok, sd["token_embedding.weight"]) + sd["positional_embedding"][:tok.shape[1]]
    L = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(L):
        x = ref_block(sd, f"transformer.resblocks.{i}.", x, heads, True, act)
    x = F.layer_norm(x, (C,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(len(x)), tok.argmax(-1)] @ sd["text_projection"]


def inputs(image=32, ctx=12, vocab=60):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, image, image, generator=g)
    tok = torch.randint(1, vocab - 1, (3, ctx), generator=g)
    for b, e in enumerate([ctx - 1, 4, 1]):            # EOT = the largest id, zero padding after it
        tok[b, e], tok[b, e + 1:] = vocab - 1, 0
    return x, tok


def features(m, x, tok):
    with torch.no_grad():
        return m.encode_image(x, normalize=False), m.encode_text(tok, normalize=False)


def close(a, b):
    return torch.allclose(a, b, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# hyper-parameter inference

def test_infer_config_small_exact():
    cfg = infer_clip_config(meta_sd(image=40, patch=8, vw=192, vl=3, vocab=70, ctx=9, tw=128, tl=2, E=24, vmlp=300))
    assert cfg == dict(image_size=40, patch_size=8, vision_width=192, vision_layers=3, vision_heads=3,
                       vision_mlp=300, vocab_size=70, context_length=9, text_width=128, text_layers=2, text_heads=2,
                       text_mlp=512, embed_dim=24, layer_scale=False, logit_bias=False, openai=False)
    assert infer_clip_config(to_layout(meta_sd(), "openai"))["openai"] is True
    assert infer_clip_config(to_layout(meta_sd(), "custom_text"))["text_layers"] == 2
    assert infer_clip_config(meta_sd(vw=128), vision_heads=8, text_heads=4)["vision_heads"] == 8


N_B16 = 149_620_737      # open_clip ViT-B-16 86,192,640 + 63,428,096 + logit_scale
# ViT-B/32 by hand: visual conv1 768*3*32*32 = 2,359,296, class 768, pos 50*768 = 38,400, ln_pre/ln_post 2*1,536,
# 12 blocks * 7,087,872 (ln 3,072 + in_proj 1,771,776 + out_proj 590,592 + c_fc 2,362,368 + c_proj 2,360,064),
# proj 768*512 = 393,216 -> 87,849,216; text 63,428,096 (as B/16); + logit_scale.
N_B32 = 87_849_216 + 63_428_096 + 1
# ViT-L/14 by hand: visual conv1 602,112 + class 1,024 + pos 257*1,024 = 263,168 + ln 4,096 + 24 blocks *
# 12,596,224 + proj 786,432 = 303,966,208; text (width 768, 12 layers): token 37,945,344 + pos 59,136 + 12 *
# 7,087,872 + ln_final 1,536 + projection 589,824 = 123,650,304; + logit_scale.
N_L14 = 303_966_208 + 123_650_304 + 1


@pytest.mark.parametrize("name, kw, heads, expect, n", [
    ("ViT-B-32", dict(image=224, patch=32, vw=768, vl=12, vocab=49408, ctx=77, tw=512, tl=12, E=512), None,
     (224, 32, 768, 12, 12, 512, 12, 8, 512), N_B32),
    ("ViT-B-16", dict(image=224, patch=16, vw=768, vl=12, vocab=49408, ctx=77, tw=512, tl=12, E=512), None,
     (224, 16, 768, 12, 12, 512, 12, 8, 512), N_B16),
    ("ViT-L-14", dict(image=224, patch=14, vw=1024, vl=24, vocab=49408, ctx=77, tw=768, tl=12, E=768), None,
     (224, 14, 1024, 24, 16, 768, 12, 12, 768), N_L14),
    ("ViT-L-14-336", dict(image=336, patch=14, vw=1024, vl=24, vocab=49408, ctx=77, tw=768, tl=12, E=768), None,
     (336, 14, 1024, 24, 16, 768, 12, 12, 768), N_L14 + (577 - 257) * 1024),
    # open_clip's ViT-H-14 config: head_width 80 -> 16 heads, which shapes cannot show: the caller says so
    ("ViT-H-14", dict(image=224, patch=14, vw=1280, vl=32, vocab=49408, ctx=77, tw=1024, tl=12, E=1024), 16,
     (224, 14, 1280, 32, 16, 1024, 12, 16, 1024), None),
])
def test_infer_real_sizes_on_meta(name, kw, heads, expect, n):
    sd = meta_sd(**kw)
    cfg = infer_clip_config(sd, vision_heads=heads)
    got = tuple(cfg[k] for k in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                                 "text_width", "text_layers", "text_heads", "embed_dim"))
    assert got == expect, name
    assert (cfg["vocab_size"], cfg["context_length"], cfg["vision_mlp"]) == (49408, 77, 4 * kw["vw"])
    if n is not None:
        m = clip_from_state_dict(sd, dtype=None)                   # built and "loaded" on meta: no memory
        assert sum(p.numel() for p in m.parameters()) == n, name
        assert m.visual.blocks[0].attn.heads == expect[4] and m.text.blocks[0].attn.heads == expect[7]


# ---------------------------------------------------------------------------------------------------------------
# forward equivalence

@pytest.mark.parametrize("layout, qg", [("openai", True), ("open_clip", False), ("custom_text", False)])
def test_clip_from_state_dict_matches_reference(layout, qg):
    sd = random_sd()
    m = clip_from_state_dict(to_layout(sd, layout))
    assert m.config["quick_gelu"] is qg and not m.training
    x, tok = inputs()
    fi, ft = features(m, x, tok)
    act, other = (quick_gelu, F.gelu) if qg else (F.gelu, quick_gelu)
    with torch.no_grad():
        assert close(fi, ref_image(sd, x, 2, act)), (fi - ref_image(sd, x, 2, act)).abs().max()
        assert close(ft, ref_text(sd, tok, 2, act))
        assert not close(fi, ref_image(sd, x, 2, other))      # the activation is really told apart
        short = tok[:, :7].clone()
        short[0, 6] = 59                                        # a shorter batch uses the first 7 positions
        assert close(m.encode_text(short, normalize=False), ref_text(sd, short, 2, act))
        i, t, s = m(x, tok)
    assert torch.allclose(i, F.normalize(fi, dim=-1)) and abs(s.item() - math.exp(2.0)) < 1e-5


def test_flags_override_inference():
    sd = random_sd(1)
    x, tok = inputs()
    with torch.no_grad():
        m = clip_from_state_dict(to_layout(sd, "openai"), quick_gelu=False)
        assert m.config["quick_gelu"] is False and close(features(m, x, tok)[0], ref_image(sd, x, 2, F.gelu))
        m = clip_from_state_dict(sd, quick_gelu=True)
        assert close(features(m, x, tok)[1], ref_text(sd, tok, 2, quick_gelu))
        # heads: the default width // 64 = 2; 4 heads is a different function of the same weights
        m4 = clip_from_state_dict(sd, vision_heads=4, text_heads=8)
        fi, ft = features(m4, x, tok)
        assert close(fi, ref_image(sd, x, 4, F.gelu)) and close(ft, ref_text(sd, tok, 8, F.gelu))
        assert not close(fi, ref_image(sd, x, 2, F.gelu))
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        clip_from_state_dict(sd, vision_heads=3)


def test_layer_scale_logit_bias_odd_mlp_and_grid():
    sd = random_sd(2, image=40, patch=8, vmlp=200, tmlp=300, ls=True)
    sd["logit_bias"] = torch.tensor([-3.0])                     # open_clip stores shape [1]
    m = clip_from_state_dict(sd)
    assert m.config["layer_scale"] and m.visual.image_size == 40 and m.visual.grid == (5, 5)
    assert m.visual.blocks[0].mlp.c_fc.out_features == 200 and m.text.blocks[1].mlp.c_fc.out_features == 300
    x, tok = inputs(image=40)
    fi, ft = features(m, x, tok)
    with torch.no_grad():
        assert close(fi, ref_image(sd, x, 2, F.gelu)) and close(ft, ref_text(sd, tok, 2, F.gelu))
    assert m(x, tok)[3].item() == -3.0


def test_load_clip_checkpoint_safetensors_fp16(tmp_path):
    sd = random_sd(3)
    half = {k: v.half() for k, v in sd.items()}
    save_file(to_layout(half, "openai"), str(tmp_path / "openai_fp16.safetensors"))
    m = load_clip_checkpoint(tmp_path / "openai_fp16.safetensors")
    assert m.visual.conv1.weight.dtype == torch.float32 and m.config["quick_gelu"]
    ref = {k: v.float() for k, v in half.items()}
    x, tok = inputs()
    fi, ft = features(m, x, tok)
    with torch.no_grad():
        assert close(fi, ref_image(ref, x, 2, quick_gelu)) and close(ft, ref_text(ref, tok, 2, quick_gelu))
    kept = load_clip_checkpoint(tmp_path / "openai_fp16.safetensors", dtype=None)
    assert kept.text.token_embedding.weight.dtype == torch.float16
    assert torch.equal(kept.text.token_embedding.weight, half["token_embedding.weight"])


# ---------------------------------------------------------------------------------------------------------------
# refusing bad files

@pytest.fixture()
def good_file(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file(random_sd(4), str(p))
    return p


def test_missing_and_non_safetensors_files(tmp_path, good_file):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_clip_checkpoint(tmp_path / "nope.safetensors")
    torch.save(random_sd(4), tmp_path / "torch.safetensors")
    with pytest.raises(CheckpointError, match=r"torch\.safetensors: not a safetensors file, it is a zip archive.*"
                                              r"python -m common\.convert"):
        load_clip_checkpoint(tmp_path / "torch.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.bin: not a safetensors file, it is a pickle"):
        load_clip_checkpoint(tmp_path / "legacy.bin")
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a safetensors file"):
        load_clip_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "cfg.json").write_text('{"embed_dim": 512}')
    with pytest.raises(CheckpointError, match=r"cfg\.json: not a safetensors file, it is a text file"):
        load_clip_checkpoint(tmp_path / "cfg.json")


@pytest.mark.parametrize("cut", ["length", "header", "data", "last_byte"])
def test_truncated_safetensors(tmp_path, good_file, cut):
    raw = good_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    keep = {"length": 5, "header": 8 + n // 2, "data": 8 + n + (len(raw) - 8 - n) // 2, "last_byte": len(raw) - 1}
    p = tmp_path / "cut.safetensors"
    p.write_bytes(raw[:keep[cut]])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: .*truncated") as e:
        load_clip_checkpoint(p)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_clip_safetensors(CLIP(VisionTransformer(32, 8, 128, 2, 2, 4.0, 32),
                                   TextTransformer(60, 12, 128, 2, 2, 32)), p)


def test_missing_keys_and_wrong_shapes_are_named(tmp_path):
    sd = random_sd(5)
    bad = {k: v for k, v in sd.items() if k not in ("visual.ln_post.bias", "transformer.resblocks.1.mlp.c_fc.bias")}
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_clip_checkpoint(tmp_path / "missing.safetensors")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "missing.safetensors"))
    assert "visual.ln_post.bias" in msg and "transformer.resblocks.1.mlp.c_fc.bias" in msg
    # a block whose shapes disagree with block 0 (which the model was inferred from): key and both shapes named
    bad = dict(sd)
    bad["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(100, 128)
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: .*visual\.transformer\.resblocks\.1\.mlp\.c_fc"
                                              r"\.weight: checkpoint \(100, 128\) vs model \(512, 128\)"):
        load_clip_checkpoint(tmp_path / "shape.safetensors")
    # into a fixed model (load_clip_safetensors): a checkpoint of another size
    save_file(random_sd(5, E=48), str(tmp_path / "e48.safetensors"))
    fixed = CLIP(VisionTransformer(32, 8, 128, 2, 2, 4.0, 32), TextTransformer(60, 12, 128, 2, 2, 32))
    with pytest.raises(CheckpointError, match=r"e48\.safetensors: .*visual\.proj: checkpoint \(128, 48\) vs model "
                                              r"\(128, 32\)"):
        load_clip_safetensors(fixed, tmp_path / "e48.safetensors")
    save_file(random_sd(5), str(tmp_path / "ok.safetensors"))
    load_clip_safetensors(fixed, tmp_path / "ok.safetensors")
    assert torch.equal(fixed.visual.proj, sd["visual.proj"])


def test_other_architectures_are_refused_by_name(tmp_path):
    timm_like = {"visual.trunk.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "logit_scale": torch.tensor(1.0),
                 "text.token_embedding.weight": torch.zeros(10, 8)}
    save_file(timm_like, str(tmp_path / "siglip.safetensors"))
    with pytest.raises(CheckpointError, match=r"siglip\.safetensors: not an open_clip / OpenAI ViT CLIP .*timm"):
        load_clip_checkpoint(tmp_path / "siglip.safetensors")
    sd = random_sd(6)
    del sd["text_projection"]
    with pytest.raises(KeyError, match="text_projection"):
        clip_from_state_dict(sd)


# ---------------------------------------------------------------------------------------------------------------
# position-embedding resizing (open_clip: bicubic, antialias=True, align_corners=False)

def test_resize_pos_embed_hand_computed():
    # 1 x 2 grid -> 1 x 4, values 0 and 1 in every channel. PIL-style cubic (a = -0.5): output j has its centre at
    # (j + 0.5) / 2 in input pixels; taps x with weights f(x + 0.5 - centre), renormalised over the taps inside.
    # j = 0: centre 0.25, taps f(0.25) = 0.8671875, f(1.25) = -0.0703125 -> out = -0.0703125 / 0.796875 = -3/34
    # j = 1: centre 0.75, taps f(-0.25) = 0.8671875, f(0.75) = 0.2265625 -> out = 0.2265625 / 1.09375 = 29/140
    # j = 2, 3 mirror j = 1, 0: 1 - 29/140 = 111/140, 1 + 3/34 = 37/34
    pos = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    out = resize_pos_embed(pos, (1, 2), (1, 4))
    want = torch.tensor([-3 / 34, 29 / 140, 111 / 140, 37 / 34])
    assert torch.allclose(out[:, 0], want, atol=1e-6) and torch.equal(out[:, 0], out[:, 1])
    # without antialias PyTorch's bicubic uses a = -0.75 with border clamping: different numbers
    plain = F.interpolate(pos.T.reshape(1, 2, 1, 2), size=(1, 4), mode="bicubic", align_corners=False)[0, 0, 0]
    assert not torch.allclose(plain, want, atol=1e-3)


def test_resize_pos_embed_is_open_clip_interpolate():
    g = torch.Generator().manual_seed(0)
    for grid, new in (((8, 8), (4, 4)), ((5, 5), (7, 3)), ((14, 14), (24, 24))):
        pos = torch.randn(grid[0] * grid[1], 6, generator=g)
        p = pos.reshape(1, *grid, 6).permute(0, 3, 1, 2)
        want = F.interpolate(p, size=new, mode="bicubic", antialias=True, align_corners=False)
        want = want.permute(0, 2, 3, 1).reshape(-1, 6)
        assert torch.equal(resize_pos_embed(pos, grid, new), want)
    # shrinking: antialias really matters (a wider low-pass support than the 4-tap kernel)
    pos = torch.randn(64, 3, generator=g)
    no_aa = F.interpolate(pos.reshape(1, 8, 8, 3).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(-1, 3)
    assert not torch.allclose(resize_pos_embed(pos, (8, 8), (4, 4)), no_aa, atol=1e-2)
    assert resize_pos_embed(pos.half(), (8, 8), (6, 6)).dtype == torch.float16


def test_class_token_position_kept_when_the_grid_is_resized():
    torch.manual_seed(0)
    v = VisionTransformer(32, 8, 64, 1, 1, 4.0, 16).eval()      # grid 4 x 4
    x = torch.randn(2, 3, 48, 48)                                 # grid 6 x 6
    with torch.no_grad():
        tokens, grid = v._embed(x)
        pos = v.positional_embedding
        patch = F.interpolate(pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic",
                              antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
        t = F.conv2d(x, v.conv1.weight, stride=8).flatten(2).transpose(1, 2) + patch
        cls = (v.class_embedding + pos[0]).expand(2, 1, 64)     # row 0 untouched
        want = F.layer_norm(torch.cat([cls, t], 1), (64,), v.ln_pre.weight, v.ln_pre.bias)
    assert grid == (6, 6) and torch.allclose(tokens, want, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# python -m common.eval zeroshot on an image folder

TINY_KW = dict(image=32, patch=8, vw=64, vl=1, vocab=1024, ctx=32, tw=64, tl=1, E=16)


@pytest.fixture()
def zs_setup(tmp_path):
    """A tiny random ViT checkpoint, a 2-class folder of non-square PNGs (+ one corrupt file), classes/templates."""
    import numpy as np
    from PIL import Image
    sd = random_sd(11, **TINY_KW)
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    rng = np.random.default_rng(0)
    for folder in ("red_thing", "blue_thing"):   # noise, so that predictions differ image by image
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(5):
            a = rng.integers(0, 256, (40, 52, 3)).astype(np.uint8)
            Image.fromarray(a).save(tmp_path / "data" / folder / f"{i}.png")
    (tmp_path / "data" / "blue_thing" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "classes.txt").write_text("blue_thing\tblue shape\nred_thing\tred shape\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n{} on a background\n")
    return tmp_path, sd


def reference_zero_shot(sd, root, names, templates, tok):
    """Zero-shot written from scratch: PIL bicubic shorter side -> 32, torchvision center-crop rounding, /255,
    CLIP mean/std; the reference towers above; mean of normalised template embeddings."""
    import numpy as np
    from PIL import Image
    from common.transforms import CLIP_MEAN, CLIP_STD
    cls = []
    for n in names:
        t = F.normalize(ref_text(sd, tok([tp.format(n) for tp in templates]), 1, F.gelu), dim=-1)
        cls.append(F.normalize(t.mean(0), dim=-1))
    cls = torch.stack(cls)
    hits = {}
    for c, folder in enumerate(sorted(p.name for p in root.iterdir())):
        for f in sorted((root / folder).glob("*.png")):
            im = Image.open(f).convert("RGB")
            w, h = im.size
            nw, nh = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
            im = im.resize((nw, nh), Image.BICUBIC)
            top, left = int(round((nh - 32) / 2.0)), int(round((nw - 32) / 2.0))
            a = np.asarray(im.crop((left, top, left + 32, top + 32)))
            x = torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255
            x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
            pred = (F.normalize(ref_image(sd, x[None], 1, F.gelu), dim=-1) @ cls.T).argmax().item()
            hits.setdefault(c, []).append(pred == c)
    every = [h for v in hits.values() for h in v]
    return sum(every) / len(every), {names[c]: sum(v) / len(v) for c, v in hits.items()}


def test_zeroshot_cli_matches_reference(zs_setup, capsys):
    import json
    from common.eval import main
    from common.tokenizer import world_tokenizer
    tmp, sd = zs_setup
    out = tmp / "res" / "zs.json"
    rc = main(["zeroshot", f"--checkpoint={tmp / 'tiny.safetensors'}", f"--data={tmp / 'data'}",
               f"--classes={tmp / 'classes.txt'}", f"--templates={tmp / 'templates.txt'}", "--tokenizer=world",
               "--batch_size=4", "--device=cpu", f"--out={out}"])
    printed = capsys.readouterr().out
    assert rc == 0 and "top-1" in printed and "1 unreadable" in printed
    r = json.loads(out.read_text())
    assert (r["n_classes"], r["n_images"], r["n_templates"], r["n_unreadable"]) == (2, 10, 2, 1)
    assert r["top5"] == 1.0                                     # top-min(5, C) with C = 2
    with torch.no_grad():
        top1, per = reference_zero_shot(sd, tmp / "data", ["blue shape", "red shape"],
                                        ["a photo of a {}.", "{} on a background"], world_tokenizer(32))
    assert r["top1"] == pytest.approx(top1) and r["per_class_top1"] == pytest.approx(per)
    assert 0 < top1 < 1 and 0 < sum(per.values()) < 2      # mixed predictions: the comparison is not trivial
    assert r["model"]["image_size"] == 32 and r["model"]["quick_gelu"] is False


def test_zeroshot_cli_bpe_and_errors(zs_setup, capsys):
    import json
    from common.eval import main
    tmp, sd = zs_setup
    args = [f"--checkpoint={tmp / 'tiny.safetensors'}", f"--data={tmp / 'data'}", "--device=cpu"]
    bpe = tmp / "merges.txt"                                    # a small CLIP-format merges file (519 ids)
    bpe.write_text("#version: 0.2\nr e\nre d</w>\nb l\nu e</w>\nbl ue</w>\n", encoding="utf-8")
    assert main(["zeroshot", *args, f"--bpe={bpe}", f"--out={tmp / 'b.json'}"]) == 0
    r = json.loads((tmp / "b.json").read_text())
    assert r["n_templates"] == 80 and set(r["per_class_top1"]) == {"blue thing", "red thing"}   # the defaults
    capsys.readouterr()

    def fails(extra, pattern):
        assert main(["zeroshot", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and __import__("re").search(pattern, err), err

    fails(args, r"--bpe=PATH is required")
    fails([f"--checkpoint={tmp / 'nope.safetensors'}", f"--data={tmp / 'data'}", "--tokenizer=world"],
          r"nope\.safetensors: no such file")
    fails([*args, "--tokenizer=world", f"--data={tmp / 'missing'}"], r"missing: no such folder")
    (tmp / "bad_t.txt").write_text("no placeholder here\n")
    fails([*args, "--tokenizer=world", f"--templates={tmp / 'bad_t.txt'}"], r"bad_t\.txt: every line needs")
    (tmp / "bad_c.txt").write_text("only one name\n")
    fails([*args, "--tokenizer=world", f"--classes={tmp / 'bad_c.txt'}"], r"1 names for 2 class folders")
    save_file(random_sd(1, **{**TINY_KW, "vocab": 300}), str(tmp / "small_vocab.safetensors"))
    fails([f"--checkpoint={tmp / 'small_vocab.safetensors'}", f"--data={tmp / 'data'}", "--tokenizer=world"],
          r"802 ids but the checkpoint's token_embedding has 300 rows")


def test_zero_shot_folder_uses_the_models_own_preprocess(zs_setup, monkeypatch):
    """A MobileCLIP-style model.preprocess (no normalisation, bilinear) reaches the folder's eval transform;
    explicit mean/std/interpolation arguments still override it."""
    import common.transforms as T
    from common.eval import zero_shot_folder
    from common.models import load_clip_checkpoint
    from common.tokenizer import world_tokenizer
    tmp, _ = zs_setup
    seen = []
    real = T.eval_transform
    monkeypatch.setattr(T, "eval_transform", lambda *a, **kw: seen.append((a, kw)) or real(*a, **kw))
    model = load_clip_checkpoint(tmp / "tiny.safetensors")
    assert model.preprocess["interpolation"] == "bicubic"
    model.preprocess = dict(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    zero_shot_folder(model, world_tokenizer(32), tmp / "data", ["a", "b"], ["{}"], batch_size=4)
    zero_shot_folder(model, world_tokenizer(32), tmp / "data", ["a", "b"], ["{}"], batch_size=4,
                     interpolation="bicubic")
    assert seen[0] == ((), dict(model.preprocess))
    assert seen[1][1]["interpolation"] == "bicubic" and seen[1][1]["std"] == (1.0, 1.0, 1.0)
