"""Loading open_clip MobileCLIP / MobileCLIP2 S0/S1/S2 checkpoints (common.mci + common.models).

The checkpoint layout is written here from the architecture, independently of common.mci's name mapping:
open_clip stores timm's `fastvit_mci0/1/2` (timm/models/fastvit.py) under `visual.trunk.` with timm's classifier
`head.fc` (weight and bias) as the 512-d projection (open_clip model_configs/MobileCLIP-S2.json: timm_proj null), and
open_clip's non-causal TextTransformer under `text.` (CustomTextCLIP). The reference forward below runs timm's
structure with functional ops on the raw tensors: stem of 3 MobileOne blocks (3x3 s2, 3x3 s2 depthwise, 1x1),
stages [downsample (RepLK 7x7 s2 + 3x3, SE, GELU; 1x1 MobileOne)] [RepCPE 7x7] blocks (RepMixer + ConvMlp, or
BatchNorm + MHSA head_dim 32 + ConvMlp), final_conv (3x3 depthwise C -> 2C with SE), mean pool, head.fc.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import mci as MCI
from common.convert import CheckpointError
from common.models import clip_from_state_dict, load_clip_checkpoint
from common.transforms import eval_transform


# ---------------------------------------------------------------------------------------------------------------
# the documented layout: timm / open_clip names and shapes

def _bn(p, C):
    return {p + "weight": (C,), p + "bias": (C,), p + "running_mean": (C,), p + "running_var": (C,),
            p + "num_batches_tracked": ()}


def _convbn(p, cout, cin_g, k):
    return {p + "conv.weight": (cout, cin_g, k, k), **_bn(p + "bn.", cout)}


def _se(p, C, rd):
    return {p + "se.fc1.weight": (rd, C, 1, 1), p + "se.fc1.bias": (rd,), p + "se.fc2.weight": (C, rd, 1, 1),
            p + "se.fc2.bias": (C,)}


def _mobileone(p, cin, cout, k, stride, groups, folded, scale=True, n_conv=1, se=False):
    """timm MobileOneBlock: identity BN (cin == cout, stride 1), conv_kxk.{n} (conv + bn), conv_scale (1x1, k > 1);
    folded: one reparam_conv with bias. SE (rd_ratio 1/16) stays."""
    if folded:
        S = {p + "reparam_conv.weight": (cout, cin // groups, k, k), p + "reparam_conv.bias": (cout,)}
    else:
        S = _bn(p + "identity.", cin) if cin == cout and stride == 1 else {}
        for n in range(n_conv):
            S.update(_convbn(f"{p}conv_kxk.{n}.", cout, cin // groups, k))
        if scale and k > 1:
            S.update(_convbn(p + "conv_scale.", cout, cin // groups, 1))
    if se:
        S.update(_se(p, cout, cout // 16))
    return S


def _convmlp(p, C, hidden):
    return {**_convbn(p + "conv.", C, 1, 7), p + "fc1.weight": (hidden, C, 1, 1), p + "fc1.bias": (hidden,),
            p + "fc2.weight": (C, hidden, 1, 1), p + "fc2.bias": (C,)}


def timm_mci_shapes(layers, dims, mixers, se_down, E, mlp_ratio=3, folded=False, prefix="visual.trunk."):
    """{key: shape} of a timm fastvit_mci* trunk (FastVit with lkc_use_act, RepCPE before attention stages)."""
    S, d0 = {}, dims[0]
    S.update(_mobileone("stem.0.", 3, d0, 3, 2, 1, folded))
    S.update(_mobileone("stem.1.", d0, d0, 3, 2, d0, folded))
    S.update(_mobileone("stem.2.", d0, d0, 1, 1, 1, folded))
    for i, (L, C, mix, se) in enumerate(zip(layers, dims, mixers, se_down)):
        p = f"stages.{i}."
        if i > 0:
            cin, q = dims[i - 1], p + "downsample.proj.0."
            if folded:
                S.update({q + "reparam_conv.weight": (C, 1, 7, 7), q + "reparam_conv.bias": (C,)})
            else:
                S.update(_convbn(q + "large_conv.", C, 1, 7))
                S.update(_convbn(q + "small_conv.", C, 1, 3))
            if se:
                S.update(_se(q, C, C // 4))
            S.update(_mobileone(p + "downsample.proj.1.", C, C, 1, 1, 1, folded))
        if mix == "attn":
            q = p + "pos_emb." + ("reparam_conv." if folded else "pos_enc.")
            S.update({q + "weight": (C, 1, 7, 7), q + "bias": (C,)})
        for j in range(L):
            b = f"{p}blocks.{j}."
            if mix == "attn":
                S.update(_bn(b + "norm.", C))
                S.update({b + "token_mixer.qkv.weight": (3 * C, C), b + "token_mixer.proj.weight": (C, C),
                          b + "token_mixer.proj.bias": (C,), b + "layer_scale_1.gamma": (C, 1, 1),
                          b + "layer_scale_2.gamma": (C, 1, 1)})
            elif folded:
                S.update({b + "token_mixer.reparam_conv.weight": (C, 1, 3, 3), b + "token_mixer.reparam_conv.bias": (C,)})
            else:
                S.update(_mobileone(b + "token_mixer.norm.", C, C, 3, 1, C, False, scale=False, n_conv=0))
                S.update(_mobileone(b + "token_mixer.mixer.", C, C, 3, 1, C, False))
                S[b + "token_mixer.layer_scale.gamma"] = (C, 1, 1)
            S.update(_convmlp(b + "mlp.", C, int(C * mlp_ratio)))
            if mix != "attn":
                S[b + "layer_scale.gamma"] = (C, 1, 1)
    C = dims[-1]
    S.update(_mobileone("final_conv.", C, 2 * C, 3, 1, C, folded, se=True))
    S.update({"head.fc.weight": (E, 2 * C), "head.fc.bias": (E,)})
    return {prefix + k: s for k, s in S.items()}


def openclip_text_shapes(vocab=49408, ctx=77, W=512, layers=12, E=512):
    """open_clip TextTransformer inside CustomTextCLIP (`text.` prefix) + logit_scale."""
    S = {"text.token_embedding.weight": (vocab, W), "text.positional_embedding": (ctx, W), "text.ln_final.weight": (W,),
         "text.ln_final.bias": (W,), "text.text_projection": (W, E), "logit_scale": ()}
    for i in range(layers):
        b = f"text.transformer.resblocks.{i}."
        S.update({b + "ln_1.weight": (W,), b + "ln_1.bias": (W,), b + "attn.in_proj_weight": (3 * W, W),
                  b + "attn.in_proj_bias": (3 * W,), b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,),
                  b + "ln_2.weight": (W,), b + "ln_2.bias": (W,), b + "mlp.c_fc.weight": (4 * W, W),
                  b + "mlp.c_fc.bias": (4 * W,), b + "mlp.c_proj.weight": (W, 4 * W), b + "mlp.c_proj.bias": (W,)})
    return S


# architecture facts (ml-mobileclip mci.py / timm fastvit_mci*): layers, widths
MCI_ARCH = {"mci0": ((2, 6, 10, 2), (64, 128, 256, 512)), "mci1": ((4, 12, 20, 4), (64, 128, 256, 512)),
            "mci2": ((4, 12, 24, 4), (80, 160, 320, 640))}
MIX4, SE4 = ("rep", "rep", "rep", "attn"), (False, False, True, True)
# reduced configs: mci_tiny's (3 stages, 32 px) and a 4-stage one with the released stage pattern
TINY = dict(layers=(1, 2, 2), dims=(32, 64, 128), mixers=("rep", "rep", "attn"), se_down=(False, False, True), E=16)
RED4 = dict(layers=(1, 1, 2, 1), dims=(16, 32, 32, 64), mixers=MIX4, se_down=SE4, E=24)
TEXT = dict(vocab=50, ctx=12, W=64, layers=2)


def is_param(k):
    return not k.endswith(("running_mean", "running_var", "num_batches_tracked"))


def random_sd(arch, folded=False, seed=0):
    """Random tensors in the documented layout; BN statistics and layer scales O(1) so that every branch matters."""
    g = torch.Generator().manual_seed(seed)
    S = {**timm_mci_shapes(**arch, folded=folded), **openclip_text_shapes(E=arch["E"], **TEXT)}
    sd = {}
    for k, s in S.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(s, generator=g)
        elif k.endswith(("gamma",)):
            sd[k] = 0.1 + 0.4 * torch.rand(s, generator=g)
        elif k.endswith(("bn.weight", "identity.weight", "norm.weight", "ln_1.weight", "ln_2.weight",
                         "ln_final.weight")):
            sd[k] = 0.5 + torch.rand(s, generator=g)
        else:
            sd[k] = 0.2 * torch.randn(s, generator=g)
    sd["logit_scale"] = torch.tensor(3.0)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# reference forward from the raw tensors (timm's structure, functional ops)

def _conv(x, w, b=None, stride=1):
    return F.conv2d(x, w, b, stride, (w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1] // w.shape[1])


def _rbn(sd, p, x):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        False, 0.0, 1e-5)


def _rconvbn(sd, p, x, stride=1):
    return _rbn(sd, p + "bn.", _conv(x, sd[p + "conv.weight"], None, stride))


def _rse(sd, p, x):
    s = F.relu(_conv(x.mean((2, 3), keepdim=True), sd[p + "se.fc1.weight"], sd[p + "se.fc1.bias"]))
    return x * torch.sigmoid(_conv(s, sd[p + "se.fc2.weight"], sd[p + "se.fc2.bias"]))


def _rmobileone(sd, p, x, stride=1, act=True):
    if p + "reparam_conv.weight" in sd:
        y = _conv(x, sd[p + "reparam_conv.weight"], sd[p + "reparam_conv.bias"], stride)
    else:
        y = _rbn(sd, p + "identity.", x) if p + "identity.weight" in sd else 0
        if p + "conv_scale.conv.weight" in sd:
            y = y + _rconvbn(sd, p + "conv_scale.", x, stride)
        n = 0
        while f"{p}conv_kxk.{n}.conv.weight" in sd:
            y = y + _rconvbn(sd, f"{p}conv_kxk.{n}.", x, stride)
            n += 1
    if p + "se.fc1.weight" in sd:
        y = _rse(sd, p, y)
    return F.gelu(y) if act else y


def _rmlp(sd, p, x):
    h = F.gelu(_conv(_rconvbn(sd, p + "conv.", x), sd[p + "fc1.weight"], sd[p + "fc1.bias"]))
    return _conv(h, sd[p + "fc2.weight"], sd[p + "fc2.bias"])


def _rattn(sd, p, x, head_dim=32):
    B, C, H, W = x.shape
    t = x.flatten(2).transpose(1, 2)
    qkv = (t @ sd[p + "qkv.weight"].T).reshape(B, H * W, 3, C // head_dim, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = ((q @ k.transpose(-1, -2)) / math.sqrt(head_dim)).softmax(-1) @ v
    o = a.transpose(1, 2).reshape(B, H * W, C) @ sd[p + "proj.weight"].T + sd[p + "proj.bias"]
    return o.transpose(1, 2).reshape(B, C, H, W)


def ref_mci(sd, x, p="visual.trunk."):
    for i in range(3):
        x = _rmobileone(sd, f"{p}stem.{i}.", x, stride=2 if i < 2 else 1)
    i = 0
    while f"{p}stages.{i}.blocks.0.mlp.fc1.weight" in sd:
        q = f"{p}stages.{i}."
        if i > 0:
            d = q + "downsample.proj.0."
            if d + "reparam_conv.weight" in sd:
                y = _conv(x, sd[d + "reparam_conv.weight"], sd[d + "reparam_conv.bias"], 2)
            else:
                y = _rconvbn(sd, d + "large_conv.", x, 2) + _rconvbn(sd, d + "small_conv.", x, 2)
            if d + "se.fc1.weight" in sd:
                y = _rse(sd, d, y)
            x = _rmobileone(sd, q + "downsample.proj.1.", F.gelu(y))
        if q + "pos_emb.pos_enc.weight" in sd:
            x = x + _conv(x, sd[q + "pos_emb.pos_enc.weight"], sd[q + "pos_emb.pos_enc.bias"])
        elif q + "pos_emb.reparam_conv.weight" in sd:
            x = _conv(x, sd[q + "pos_emb.reparam_conv.weight"], sd[q + "pos_emb.reparam_conv.bias"])
        j = 0
        while f"{q}blocks.{j}.mlp.fc1.weight" in sd:
            b = f"{q}blocks.{j}."
            if b + "token_mixer.qkv.weight" in sd:
                x = x + sd[b + "layer_scale_1.gamma"] * _rattn(sd, b + "token_mixer.", _rbn(sd, b + "norm.", x))
                x = x + sd[b + "layer_scale_2.gamma"] * _rmlp(sd, b + "mlp.", x)
            else:
                m = b + "token_mixer."
                if m + "reparam_conv.weight" in sd:
                    x = _conv(x, sd[m + "reparam_conv.weight"], sd[m + "reparam_conv.bias"])
                else:
                    x = x + sd[m + "layer_scale.gamma"] * (_rmobileone(sd, m + "mixer.", x, act=False)
                                                           - _rmobileone(sd, m + "norm.", x, act=False))
                x = x + sd[b + "layer_scale.gamma"] * _rmlp(sd, b + "mlp.", x)
            j += 1
        i += 1
    x = _rmobileone(sd, p + "final_conv.", x)
    return x.mean((2, 3)) @ sd[p + "head.fc.weight"].T + sd[p + "head.fc.bias"]


def ref_text(sd, tok, heads=1):
    """open_clip TextTransformer without a causal mask: pre-norm blocks, ln_final, argmax (EOT) pooling."""
    L = tok.shape[1]
    x = sd["text.token_embedding.weight"][tok] + sd["text.positional_embedding"][:L]
    B, N, C = x.shape
    i = 0
    while f"text.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"text.transformer.resblocks.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(C, -1)
        q, k, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        o = ((q @ k.transpose(-1, -2)) / math.sqrt(C // heads)).softmax(-1) @ v
        x = x + o.transpose(1, 2).reshape(B, N, C) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        i += 1
    x = F.layer_norm(x, (C,), sd["text.ln_final.weight"], sd["text.ln_final.bias"])
    return x[torch.arange(B), tok.argmax(-1)] @ sd["text.text_projection"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tokens(g, B=3, L=12, vocab=50):
    tok = torch.randint(1, vocab - 1, (B, L), generator=g)
    tok[torch.arange(B), torch.tensor([L - 1, 4, 7])[:B]] = vocab - 1      # EOT = the largest id
    return tok


# ---------------------------------------------------------------------------------------------------------------
# (a) + (b): every documented key consumed; output = the reference forward

@pytest.mark.parametrize("arch,px", [(TINY, 32), (RED4, 64)], ids=["tiny", "reduced4"])
def test_timm_layout_loads_and_matches_reference_forward(arch, px):
    sd = random_sd(arch, seed=1)
    m = clip_from_state_dict(sd)
    # every key of the documented layout became a model tensor and nothing else did
    own = {k for k in m.state_dict()}
    assert len(own) == len(sd)
    assert sum(p.numel() for p in m.parameters()) == sum(v.numel() for k, v in sd.items() if is_param(k))
    cfg = m.config
    assert (cfg["family"], cfg["layers"], cfg["dims"], cfg["mixers"], cfg["se_down"], cfg["embed_dim"],
            cfg["proj_bias"], cfg["folded"], cfg["variant"]) == (
        "mobileclip", arch["layers"], arch["dims"], arch["mixers"], arch["se_down"], arch["E"], True, False, None)
    assert m.text.causal is False
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, px, px, generator=g)
    tok = tokens(g)
    with torch.no_grad():
        fi, ft = m.visual(x), m.text(tok)
        ri, rt = ref_mci(sd, x), ref_text(sd, tok)
        assert rel(fi, ri) < 1e-5 and rel(ft, rt) < 1e-5
        assert rel(fi - sd["visual.trunk.head.fc.bias"], ri) > 1e-3      # the head bias is applied
        # non-causal: the EOT feature sees the tokens after it (row 1 has EOT at 4)
        tok2 = tok.clone()
        tok2[1, 9] = 3 if tok[1, 9] != 3 else 4
        assert not torch.allclose(m.text(tok2)[1], ft[1])
        img, txt, scale = m(x, tok)
        assert torch.allclose(img, F.normalize(ri, dim=-1), atol=1e-5) and abs(scale.item() - math.exp(3.0)) < 1e-4


def test_folded_checkpoint_loads_and_matches():
    """A checkpoint saved after timm's reparameterize (reparam_conv in place of the branches) loads; ours folded and
    exported gives exactly the documented folded key set, and the same output as the train-time model."""
    sd = random_sd(RED4, seed=3)
    m = clip_from_state_dict(sd)
    MCI.reparameterize(m.visual)
    km = MCI.timm_key_map(m.visual)
    exported = {"visual.trunk." + km[k]: (v.t() if k == "proj" else v) for k, v in m.visual.state_dict().items()}
    doc = timm_mci_shapes(**RED4, folded=True)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(s) for k, s in doc.items()}
    folded_sd = {**{k: v for k, v in sd.items() if not k.startswith("visual.")}, **exported}
    mf = clip_from_state_dict(folded_sd)
    assert mf.config["folded"] and any(k.endswith(".rep.weight") for k in mf.visual.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        r = ref_mci(sd, x)
        assert rel(ref_mci(folded_sd, x), r) < 1e-5 and rel(mf.visual(x), r) < 1e-5


@pytest.mark.parametrize("name,image_train,image_folded", [
    ("mci0", 11_406_464, 11_356_992), ("mci1", 21_541_120, 21_460_544), ("mci2", 35_814_720, 35_702_480)])
def test_released_sizes_exact_counts_on_meta(name, image_train, image_folded):
    """ml-mobileclip's image counts (projection included) + timm's 512 head bias; the 12-layer
    base text tower of S1/S2 and MobileCLIP2-S0 is 63,428,096."""
    layers, dims = MCI_ARCH[name]
    for folded, count in ((False, image_train), (True, image_folded)):
        S = {**timm_mci_shapes(layers, dims, MIX4, SE4, 512, folded=folded), **openclip_text_shapes()}
        assert sum(math.prod(s) for k, s in S.items() if k.startswith("visual.") and is_param(k)) == count + 512
        with torch.device("meta"):
            sd = {k: torch.empty(s) for k, s in S.items()}
        m = clip_from_state_dict(sd, dtype=None)
        assert m.config["variant"] == name and m.config["folded"] == folded
        assert sum(p.numel() for p in m.visual.parameters()) == count + 512
        assert sum(p.numel() for p in m.text.parameters()) == 63_428_096
        assert m.preprocess["size"] == 256


def test_layout_errors_name_the_key():
    sd = random_sd(TINY)
    bad = dict(sd)
    del bad["visual.trunk.stages.1.blocks.1.mlp.fc2.bias"]
    bad["visual.trunk.stages.1.blocks.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"missing .*visual\.trunk\.stages\.1\.blocks\.1\.mlp\.fc2\.bias.*unexpected .*"
                                       r"visual\.trunk\.stages\.1\.blocks\.1\.extra\.weight"):
        clip_from_state_dict(bad)
    bad = dict(sd)
    bad["visual.trunk.stages.2.blocks.0.token_mixer.qkv.weight"] = torch.zeros(384, 64)
    with pytest.raises(ValueError, match=r"visual\.trunk\.stages\.2\.blocks\.0\.token_mixer\.qkv\.weight: checkpoint "
                                         r"\(384, 64\) vs model \(384, 128\)"):
        clip_from_state_dict(bad)
    bad = dict(sd)
    bad["visual.trunk.head.fc.weight"] = torch.zeros(16, 200)
    with pytest.raises(ValueError, match=r"head\.fc\.weight has shape \(16, 200\)"):
        clip_from_state_dict(bad)
    bad = {k: v for k, v in sd.items() if not k.startswith("visual.trunk.stages.2.pos_emb.")}
    with pytest.raises(ValueError, match=r"stages\.2\.pos_emb is absent"):
        clip_from_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k != "text.text_projection"}
    with pytest.raises(KeyError, match="text_projection"):
        clip_from_state_dict(bad)
    with pytest.raises(ValueError, match="quick_gelu"):
        clip_from_state_dict(sd, quick_gelu=True)


# ---------------------------------------------------------------------------------------------------------------
# (c) the preprocess contract

def test_mobileclip_preprocess_contract():
    from PIL import Image
    m = clip_from_state_dict(random_sd(TINY))
    assert m.preprocess == dict(size=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    assert clip_from_state_dict(random_sd(TINY), image_size=64).preprocess["size"] == 64
    # the open_clip transform by hand: PIL bilinear shorter side -> 256, center crop, / 255, no normalisation
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    out = eval_transform(**m.preprocess)(img)
    r = np.asarray(img.resize((358, 256), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0   # 420*256/300
    top, left = 0, int(round((358 - 256) / 2.0))
    ref = torch.from_numpy(np.ascontiguousarray(r[top:top + 256, left:left + 256].transpose(2, 0, 1)))
    assert out.shape == (3, 256, 256) and torch.allclose(out, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (d) bad files

def test_bad_files_name_file_and_key(tmp_path):
    sd = random_sd(TINY)
    good = tmp_path / "mobileclip_s.safetensors"
    save_file(sd, str(good))
    m = load_clip_checkpoint(good)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel(m.visual(x), ref_mci(sd, x)) < 1e-5
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_clip_checkpoint(trunc)
    shape = dict(sd)
    shape["visual.trunk.final_conv.se.fc1.weight"] = torch.zeros(8, 256, 1, 1)
    save_file(shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape\.safetensors: .*visual\.trunk\.final_conv\.se\.fc1\.weight: "
                                              r"checkpoint \(8, 256, 1, 1\) vs model \(16, 256, 1, 1\)"):
        load_clip_checkpoint(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in sd.items() if k != "visual.trunk.stem.1.conv_scale.bn.running_var"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: .*missing .*"
                                              r"visual\.trunk\.stem\.1\.conv_scale\.bn\.running_var"):
        load_clip_checkpoint(tmp_path / "missing.safetensors")
    nostem = {k: v for k, v in sd.items() if not k.startswith("visual.trunk.stem.0.")}
    save_file(nostem, str(tmp_path / "nostem.safetensors"))
    with pytest.raises(CheckpointError, match=r"nostem\.safetensors: .*visual\.trunk\.stem\.0\.conv_kxk\.0\.conv\.weight"):
        load_clip_checkpoint(tmp_path / "nostem.safetensors")


def test_loaded_model_answers_what_callers_read():
    """Scripts that take a checkpoint read visual.image_size, text.vocab_size / context_length and these config keys."""
    m = clip_from_state_dict(random_sd(TINY))
    assert m.visual.image_size == 256 and (m.text.vocab_size, m.text.context_length) == (50, 12)
    assert {k: m.config[k] for k in ("image_size", "context_length", "quick_gelu", "vision_heads")} == dict(
        image_size=256, context_length=12, quick_gelu=False, vision_heads=None)
    native = {"image_encoder.model.patch_embed.0.rbr_conv.0.conv.weight": torch.zeros(8, 3, 3, 3),
              "text_encoder.embedding_layer.weight": torch.zeros(10, 8)}
    with pytest.raises(ValueError, match="ml-mobileclip's own layout"):
        clip_from_state_dict(native)
