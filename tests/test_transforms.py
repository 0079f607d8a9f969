"""common.transforms: every transform replays stored params bitwise (also after a JSON round trip), with numpy and
torch generators; sampling follows torchvision's algorithms; the ops compute what they claim."""
import json
import math

import numpy as np
import pytest
import torch

from common import transforms as T


def _img(H=20, W=26, seed=0):
    r = np.random.default_rng(seed)
    return T.to_tensor(r.integers(0, 256, (H, W, 3), dtype=np.uint8))


TRANSFORMS = {
    "resize": T.Resize(12),
    "resize_exact": T.Resize((9, 14), interpolation="bicubic"),
    "center_crop": T.CenterCrop(11),
    "rrc": T.RandomResizedCrop(16),
    "random_crop": T.RandomCrop(16, padding=2),
    "flip": T.RandomHorizontalFlip(),
    "jitter": T.ColorJitter(0.4, 0.4, 0.4, 0.1),
    "randaug": T.RandAugment(2, 9),
    "randaug_bilinear": T.RandAugment(3, 20, interpolation="bilinear", fill=0.5),
    "erase": T.RandomErasing(p=0.9),
    "erase_random": T.RandomErasing(p=0.9, value="random"),
    "normalize": T.Normalize(T.CLIP_MEAN, T.CLIP_STD),
}


def _gens(seed):
    return [np.random.default_rng(seed), torch.Generator().manual_seed(seed)]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_replay_bitwise_via_json(name):
    t = TRANSFORMS[name]
    x = _img()
    outs = set()
    for seed in range(12):
        for g in _gens(seed):
            p = t.sample(g, x)
            y = t.apply(x, p)
            p2 = json.loads(json.dumps(p))  # stored params are plain JSON
            assert p2 == p
            z = t.apply(x.clone(), p2)
            assert z.dtype == y.dtype and torch.equal(y, z), (name, p)
            outs.add(y.numpy().tobytes())
    assert torch.equal(t(x, np.random.default_rng(3)), t(x, np.random.default_rng(3)))
    if name not in ("resize", "resize_exact", "center_crop", "normalize"):
        assert len(outs) > 1, f"{name}: draws should differ across seeds"


@pytest.mark.parametrize("kind", ["rrc", "clip", "randaug"])
def test_compose_replay(kind):
    tf = T.train_transform(16, kind)
    x = np.random.default_rng(1).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    for seed in range(10):
        y, params = tf.sample_apply(x, seed)
        stored = json.dumps(params)
        assert torch.equal(tf.apply(x, json.loads(stored)), y)
        assert y.shape == (3, 16, 16) and y.dtype == torch.float32
    with pytest.raises(ValueError, match="params"):
        tf.apply(x, params[:-1])
    ev = T.eval_transform(16)
    assert ev(x).shape == (3, 16, 16) and torch.equal(ev(x), ev(x))
    with pytest.raises(ValueError, match="kind"):
        T.train_transform(16, "nope")


@pytest.mark.parametrize("op", T.RandAugment.OPS)
def test_randaugment_each_op_replay_and_effect(op):
    x = _img(24, 24, seed=2)
    ra = T.RandAugment(1, 9)
    mag = ra.magnitude_of(op, 24, 24)
    for sign in (1, -1) if op in T.RandAugment.SIGNED else (1,):
        p = {"ops": [[op, mag, sign]]}
        y = ra.apply(x, p)
        assert torch.equal(ra.apply(x, json.loads(json.dumps(p))), y)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        if op == "Identity":
            assert torch.equal(y, x)
        elif op != "AutoContrast":  # x already spans [0, 1]: autocontrast is a no-op on it
            assert not torch.equal(y, x), op
    # sampling eventually draws every op, with both signs for signed ones
    seen = set()
    g = np.random.default_rng(0)
    for _ in range(400):
        for o, m, s in ra.sample(g, x)["ops"]:
            seen.add((o, s))
            assert m == ra.magnitude_of(o, 24, 24)
    assert {o for o, _ in seen} == set(T.RandAugment.OPS) and ("Rotate", -1) in seen


def test_randaugment_op_semantics():
    x = _img(16, 16, seed=4)
    # Rotate by 90 degrees (counter-clockwise) on a square image with nearest sampling is an exact rot90
    assert torch.equal(T.apply_op(x, "Rotate", 90.0), torch.rot90(x, 1, dims=(1, 2)))
    # integer translation shifts content and fills with 0
    y = T.apply_op(x, "TranslateX", 3.0)
    assert torch.equal(y[:, :, 3:], x[:, :, :-3]) and torch.all(y[:, :, :3] == 0)
    y = T.apply_op(x, "TranslateY", -2.0)
    assert torch.equal(y[:, :-2], x[:, 2:]) and torch.all(y[:, -2:] == 0)
    # shear about the top-left corner: the first row is unchanged
    y = T.apply_op(x, "ShearX", 0.2)
    assert torch.equal(y[:, 0, :], x[:, 0, :])
    u8 = (x * 255).round().to(torch.uint8)
    y = T.apply_op(x, "Posterize", 3)
    assert torch.equal((y * 255).round().to(torch.uint8), u8 & 0b11100000)
    y = T.apply_op(x, "Solarize", 128.0)
    assert torch.equal((y * 255).round().to(torch.uint8), torch.where(u8 >= 128, 255 - u8, u8))
    dark = x * 0.3 + 0.2
    y = T.apply_op(dark, "AutoContrast", 0.0)
    assert torch.allclose(y.amin(dim=(1, 2)), torch.zeros(3)) and torch.allclose(y.amax(dim=(1, 2)), torch.ones(3))
    low = (torch.arange(4096).float().view(1, 64, 64).expand(3, -1, -1) % 65) / 255  # values 0..64
    eq = T.apply_op(low, "Equalize", 0.0)
    assert eq.max() > 0.95 and eq.min() == 0  # histogram stretched over the full range
    order = low[0].flatten().argsort(stable=True)
    assert torch.all(eq[0].flatten()[order].diff() >= 0)  # a monotone remap of the levels
    assert eq[0].unique().numel() >= 60  # (PIL's clamped LUT merges only the top few levels)
    assert torch.equal(T.apply_op(x, "Brightness", -1.0), torch.zeros_like(x))
    assert torch.allclose(T.apply_op(x, "Color", -1.0), T._gray(x).expand(3, -1, -1))


def test_rrc_sampling_and_fallback():
    x = _img(40, 60)
    t = T.RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    g = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = t.sample(g, x)["box"]
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.2 <= h * w / 2400 <= 0.55 and 0.4 <= w / h <= 2.5
    # an impossible request (crop bigger than the image) falls back to a centred crop clamped to the ratio range
    p = T.RandomResizedCrop(8, scale=(4.0, 5.0), ratio=(1.0, 1.0)).sample(g, x)
    assert p == {"box": [0, 10, 40, 40], "size": [8, 8]}
    y = T.RandomResizedCrop(8).apply(x, {"box": [0, 0, 40, 60], "size": [8, 8]})
    assert torch.allclose(y, T.Resize((8, 8)).apply(x, {}))


def test_resize_crop_flip_normalize_tensor():
    x = _img(20, 26)
    assert T.Resize(10)(x).shape == (3, 10, 13) and T.Resize(10)(x.transpose(1, 2)).shape == (3, 13, 10)
    c = T.CenterCrop(10)(x)
    assert torch.equal(c, x[:, 5:15, 8:18])
    big = T.CenterCrop(30)(x)  # zero pads
    assert big.shape == (3, 30, 30) and torch.equal(big[:, 5:25, 2:28], x) and big[:, 0].abs().sum() == 0
    assert torch.equal(T.RandomHorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(p=0.0)(x), x)
    n = T.Normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))(x)
    assert torch.allclose(n[0], (x[0] - 0.5) / 0.25) and torch.allclose(n[2], x[2] - 0.5)
    flat = torch.full((3, 8, 8), 0.3)
    assert torch.allclose(T.Resize(4)(flat), torch.full((3, 4, 4), 0.3))  # antialiased resize keeps a constant


def test_to_tensor_inputs():
    from PIL import Image
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = T.to_tensor(a)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1) / 255.0)
    assert torch.equal(T.to_tensor(Image.fromarray(a)), t)
    assert torch.equal(T.to_tensor(torch.from_numpy(a).permute(2, 0, 1)), t)
    assert T.to_tensor(t) is t
    assert T.to_tensor(a[..., 0]).shape == (3, 5, 7)
    assert np.array_equal(T.to_uint8(t), a)
    with pytest.raises(TypeError, match="uint8"):
        T.to_tensor(a.astype(np.float64))


def test_color_jitter_params_and_ops():
    x = _img()
    cj = T.ColorJitter(brightness=0.5, hue=0.2)
    p = cj.sample(np.random.default_rng(0), x)
    assert sorted(p["order"]) == [0, 1, 2, 3] and p["contrast"] is None and p["saturation"] is None
    assert 0.5 <= p["brightness"] <= 1.5 and -0.2 <= p["hue"] <= 0.2
    only_b = {"order": [0, 1, 2, 3], "brightness": 0.5, "contrast": None, "saturation": None, "hue": None}
    assert torch.allclose(cj.apply(x, only_b), x * 0.5)
    # hue: HSV round trip is (numerically) the identity and a full turn changes nothing
    assert torch.allclose(T._hsv_to_rgb(T._rgb_to_hsv(x)), x, atol=1e-5)
    assert torch.allclose(T.adjust_hue(x, 0.5), T.adjust_hue(T.adjust_hue(x, 0.25), 0.25), atol=1e-5)
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    assert torch.allclose(T.adjust_hue(red, 1 / 3), torch.stack([torch.zeros(2, 2), torch.ones(2, 2),
                                                                 torch.zeros(2, 2)]), atol=1e-6)  # red -> green
    assert torch.allclose(T.adjust_saturation(x, 0.0), T._gray(x).expand(3, -1, -1))
    with pytest.raises(ValueError, match="hue"):
        T.ColorJitter(hue=0.7)


def test_random_erasing():
    x = _img(30, 30)
    re_ = T.RandomErasing(p=1.0, value=0.0)
    p = re_.sample(np.random.default_rng(0), x)
    assert p["applied"] and p["noise_seed"] is None
    top, left, h, w = p["box"]
    y = re_.apply(x, p)
    assert torch.all(y[:, top:top + h, left:left + w] == 0)
    m = torch.ones(30, 30, dtype=torch.bool)
    m[top:top + h, left:left + w] = False
    assert torch.equal(y[:, m], x[:, m]) and 0.015 <= h * w / 900 <= 0.35
    assert not T.RandomErasing(p=0.0).sample(np.random.default_rng(0), x)["applied"]


def test_generators_and_determinism():
    x = _img()
    tf = T.train_transform(12, "randaug")
    a = tf.sample_apply(x, torch.Generator().manual_seed(7))
    b = tf.sample_apply(x, torch.Generator().manual_seed(7))
    assert a[1] == b[1] and torch.equal(a[0], b[0])
    torch.manual_seed(0)
    c = tf.sample_apply(x)  # None -> torch's global RNG
    torch.manual_seed(0)
    assert tf.sample_apply(x)[1] == c[1]
    with pytest.raises(TypeError, match="Generator"):
        tf.sample_apply(x, "seed")
    assert math.isclose(T.RandAugment(magnitude=30).magnitude_of("Rotate", 8, 8), 30.0)


# ----------------------------------------------------------------------------------------------- open_clip eval
# An independent re-implementation of Pillow's 8-bit resampling (Resample.c: precompute_coeffs,
# normalize_coeffs_8bpc, ResampleHorizontal/Vertical_8bpc) for the bicubic filter, to check eval_transform against.

def _cubic(x, a=-0.5):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _pil_coeffs(n_in, n_out):
    """Per output pixel: first input index and integer weights with 22 fractional bits."""
    scale = n_in / n_out
    fs = max(scale, 1.0)                          # downscaling widens the filter: PIL's antialiasing
    support = 2.0 * fs
    rows = []
    for i in range(n_out):
        c = (i + 0.5) * scale
        lo = max(int(c - support + 0.5), 0)       # int() truncates toward zero like C's (int)
        hi = min(int(c + support + 0.5), n_in)
        w = [_cubic((x - c + 0.5) / fs) for x in range(lo, hi)]
        s = sum(w)
        w = [v / s for v in w] if s else w
        rows.append((lo, [int(v * (1 << 22) + (0.5 if v >= 0 else -0.5)) for v in w]))
    return rows


def _pil_pass(a, n_out, axis):
    a = np.moveaxis(a, axis, 0).astype(np.int64)
    if a.shape[0] == n_out:                       # PIL skips a pass whose size does not change
        return np.moveaxis(a.astype(np.uint8), 0, axis)
    out = []
    for lo, w in _pil_coeffs(a.shape[0], n_out):
        acc = np.full(a.shape[1:], 1 << 21, np.int64)   # + 0.5 in fixed point: round to nearest
        for j, wj in enumerate(w):
            acc += a[lo + j] * wj
        out.append(np.clip(acc >> 22, 0, 255))
    return np.moveaxis(np.stack(out).astype(np.uint8), 0, axis)


def pil_bicubic_reference(a, h, w):
    """uint8 (H, W[, C]) -> (h, w[, C]): horizontal pass then vertical pass, each rounded to uint8, as Pillow."""
    return _pil_pass(_pil_pass(a, w, 1), h, 0)


def test_pil_resize_hand_computed():
    # one row [0, 100, 200, 255] -> 2 pixels (scale 2: support 4, taps at f((x + 0.5 - centre) / 2)):
    # out 0, centre 1: f(-.25), f(.25), f(.75), f(1.25) = .8671875, .8671875, .2265625, -.0703125 (sum 1.890625)
    #   -> (100 * .8671875 + 200 * .2265625 - 255 * .0703125) / 1.890625 = 60.35 -> 60
    # out 1, centre 3: the mirrored weights -> (100 * .2265625 + (200 + 255) * .8671875) / 1.890625 = 220.68 -> 221
    row = np.array([[0, 100, 200, 255]], np.uint8)
    img = np.repeat(row[..., None], 3, axis=2)
    out = T.PILResize((1, 2)).apply(img, {})
    assert out.dtype == np.uint8 and out[..., 0].tolist() == [[60, 221]] and (out == out[..., :1]).all()
    assert pil_bicubic_reference(img, 1, 2)[..., 0].tolist() == [[60, 221]]


@pytest.mark.parametrize("shape, size", [((7, 11, 3), 5), ((5, 9, 3), 8), ((30, 20, 3), 13), ((9, 6), 4),
                                         ((64, 48, 3), 32)])
def test_pil_resize_matches_pillow_reference(shape, size):
    from PIL import Image
    a = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    H, W = shape[:2]
    h, w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)   # torchvision's shorter side
    want = pil_bicubic_reference(a, h, w)
    got = T.PILResize(size).apply(a, {})
    assert got.shape == want.shape and np.array_equal(got, want)
    assert np.array_equal(np.asarray(T.PILResize(size).apply(Image.fromarray(a), {})), want)   # PIL in, PIL out
    if a.ndim == 3:
        assert np.array_equal(T.PILResize(size).apply(torch.from_numpy(a).permute(2, 0, 1), {}), want)  # CHW uint8


def test_eval_transform_is_open_clip_preprocessing():
    a = np.random.default_rng(5).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    # shorter side 30 -> 16: (16, int(16 * 45 / 30) = 24); center crop left = int(round((24 - 16) / 2)) = 4
    r = pil_bicubic_reference(a, 16, 24)[:, 4:20]
    x = torch.from_numpy(r.copy()).permute(2, 0, 1).float() / 255
    m, s = torch.tensor(T.CLIP_MEAN).view(3, 1, 1), torch.tensor(T.CLIP_STD).view(3, 1, 1)
    assert torch.equal(T.eval_transform(16)(a), (x - m) / s)
    assert torch.equal(T.eval_transform(16, mean=None)(a), x)
    # bilinear (MobileCLIP v1's convention) is a different filter
    assert not torch.equal(T.eval_transform(16, mean=None, interpolation="bilinear")(a), x)


@pytest.mark.parametrize("H, W, top, left", [(16, 29, 0, 6), (16, 31, 0, 8), (19, 16, 2, 0), (21, 16, 2, 0)])
def test_eval_center_crop_offsets_round_half_even(H, W, top, left):
    # torchvision: top = int(round((H - h) / 2.0)): Python rounds halves to even, round(6.5) = 6, round(7.5) = 8
    a = np.random.default_rng(H * W).integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = T.eval_transform(16, mean=None)(a)                     # shorter side already 16: no resize
    want = torch.from_numpy(a[top:top + 16, left:left + 16].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(out, want)


def test_eval_transform_bit_identical_at_model_size():
    from PIL import Image
    a = np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)   # the world renders at model size
    before = T.Compose([T.ToTensor(), T.Resize(32), T.CenterCrop(32), T.Normalize()])   # the previous eval pipeline
    for img in (a, Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1)):
        assert torch.equal(T.eval_transform(32)(img), before(a))
    assert torch.equal(T.eval_transform(32, mean=None)(a), T.to_tensor(a))
    # float tensors take the torch antialiased bicubic, the same filter in float: close to the 8-bit PIL path on
    # average (PIL also rounds and clips to uint8 between its two passes, which matters on noise), not equal
    big = np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    f = T.eval_transform(32, mean=None)(T.to_tensor(big))
    u = T.eval_transform(32, mean=None)(big)
    assert f.shape == u.shape == (3, 32, 32) and (f - u).abs().mean() < 0.5 / 255 and not torch.equal(f, u)
