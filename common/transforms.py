"""Replayable image augmentations in plain torch (+ PIL for decoding); no torchvision.

Every transform works on a float tensor (3, H, W) in [0, 1] and splits randomness from computation:

    params = T.sample(g, img)    # draw: a JSON-serialisable dict of plain floats / ints / strings / bools / lists
    out    = T.apply(img, params) # compute: a pure function of (img, params)
    out    = T(img, g=None)       # both at once

so that a stored `params` re-applied later gives a bitwise-identical image. This is what Dataset Reinforcement
(arXiv 2303.08983) and MobileCLIP's DataCompDR (arXiv 2311.17049) rely on: the
augmentation parameters are drawn once, the teacher scores the augmented image, the parameters are stored
(JSON / safetensors, never pickle) and the student later replays exactly that augmentation.

`g` may be a numpy `np.random.Generator` (preferred), a `torch.Generator`, an int seed (wrapped into a numpy
generator by `Compose`), or None (torch's global RNG, which DataLoader seeds differently per worker).

`Compose([...]).sample_apply(img, g) -> (img, params_list)` and `.apply(img, params_list)` chain transforms; plain
callables without `.sample` (e.g. `to_tensor`) are allowed and get `{}` params.

Sampling algorithms follow torchvision's (RandomResizedCrop: 10 attempts then a centre-crop fallback; ColorJitter:
factors in [max(0, 1-x), 1+x] applied in random order; RandAugment: 14 ops, 31 magnitude bins, random sign;
RandomErasing: 10 attempts else no-op), reimplemented from their documented behaviour.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation constants (also open_clip's default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------------------
# random draws from either kind of generator


def as_generator(g):
    """int -> np.random.Generator; numpy / torch generators and None pass through."""
    if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
        return np.random.default_rng(int(g))
    if g is None or isinstance(g, (np.random.Generator, torch.Generator)):
        return g
    raise TypeError(f"g must be an np.random.Generator, torch.Generator, int seed or None, got {type(g).__name__}")


def _rand(g):
    """One float in [0, 1)."""
    if isinstance(g, np.random.Generator):
        return float(g.random())
    return float(torch.rand(1, generator=g, dtype=torch.float64).item())


def _uniform(g, a, b):
    return float(a) + (float(b) - float(a)) * _rand(g)


def _randint(g, lo, hi):
    """An int in [lo, hi)."""
    if isinstance(g, np.random.Generator):
        return int(g.integers(lo, hi))
    return int(torch.randint(lo, hi, (1,), generator=g).item())


def _perm(g, n):
    if isinstance(g, np.random.Generator):
        return [int(i) for i in g.permutation(n)]
    return [int(i) for i in torch.randperm(n, generator=g)]


# ----------------------------------------------------------------------------------------------------------------
# conversion


def to_tensor(x):
    """uint8 HWC numpy / PIL image / uint8 CHW tensor -> float32 (3, H, W) in [0, 1]. Float tensors pass through.

    Grayscale inputs (H, W) are repeated to 3 channels, RGBA drops alpha."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x
        if x.dtype != torch.uint8:
            raise TypeError(f"to_tensor: expected a uint8 or float tensor, got {x.dtype}")
        t = x
        if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)  # HWC tensor
    else:
        if not isinstance(x, np.ndarray):  # PIL
            x = np.asarray(x.convert("RGB"))
        if x.dtype != np.uint8:
            raise TypeError(f"to_tensor: expected a uint8 array (H, W, 3), got dtype {x.dtype}")
        x = np.ascontiguousarray(x)
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.ndim == 2:
        t = t[None]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    return t.contiguous().float().div_(255.0)


def to_uint8(img):
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3) numpy (for saving / PIL)."""
    return img.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


class Transform:
    """Base: deterministic transforms draw nothing ({} params)."""

    def sample(self, g, img):
        return {}

    def apply(self, img, params):
        raise NotImplementedError

    def __call__(self, img, g=None):
        return self.apply(img, self.sample(as_generator(g), img))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ToTensor(Transform):
    """`to_tensor` as a Compose member."""

    def apply(self, img, params):
        return to_tensor(img)


def _size2(size):
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _resize(img, hw, interpolation="bilinear", antialias=True):
    """(C, H, W) -> (C, h, w). Antialiased bilinear/bicubic downsampling as in PIL/torchvision v2."""
    h, w = hw
    if (img.shape[-2], img.shape[-1]) == (h, w):
        return img
    x = img[None]
    if interpolation == "nearest":
        out = F.interpolate(x, size=(h, w), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=(h, w), mode=interpolation, align_corners=False, antialias=antialias)
        if interpolation == "bicubic":
            out = out.clamp(0, 1)  # bicubic overshoots
    return out[0]


class Resize(Transform):
    """size int: shorter side -> size keeping aspect ratio (longer side int(size * long / short), torchvision);
    size (h, w): exact. interpolation in {"bilinear", "bicubic", "nearest"}."""

    def __init__(self, size, interpolation="bilinear", antialias=True):
        self.size, self.interpolation, self.antialias = size, interpolation, antialias

    def out_size(self, H, W):
        if isinstance(self.size, (int, np.integer)):
            s = int(self.size)
            return (s, int(s * W / H)) if H <= W else (int(s * H / W), s)
        return _size2(self.size)

    def apply(self, img, params):
        return _resize(img, self.out_size(img.shape[-2], img.shape[-1]), self.interpolation, self.antialias)


def _crop(img, top, left, h, w):
    """Crop with zero padding where the box leaves the image (as torchvision's F.crop)."""
    H, W = img.shape[-2], img.shape[-1]
    if top >= 0 and left >= 0 and top + h <= H and left + w <= W:
        return img[..., top:top + h, left:left + w]
    out = img.new_zeros(img.shape[:-2] + (h, w))
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, H), min(left + w, W)
    if t1 > t0 and l1 > l0:
        out[..., t0 - top:t1 - top, l0 - left:l1 - left] = img[..., t0:t1, l0:l1]
    return out


class CenterCrop(Transform):
    """Central (h, w) crop; top = round((H - h) / 2) like torchvision; zero-pads images smaller than the crop."""

    def __init__(self, size):
        self.size = size

    def apply(self, img, params):
        h, w = _size2(self.size)
        H, W = img.shape[-2], img.shape[-1]
        return _crop(img, int(round((H - h) / 2.0)), int(round((W - w) / 2.0)), h, w)


class RandomResizedCrop(Transform):
    """Crop a random box of area fraction in `scale` and aspect ratio in `ratio` (log-uniform), resize to `size`.

    params: {"box": [top, left, h, w], "size": [out_h, out_w]}. torchvision's draw: 10 attempts, then a
    centre crop clamped to the ratio range."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear", antialias=True):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.interpolation, self.antialias = interpolation, antialias

    def sample(self, g, img):
        H, W = int(img.shape[-2]), int(img.shape[-1])
        area = H * W
        lr = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            target = area * _uniform(g, self.scale[0], self.scale[1])
            ar = math.exp(_uniform(g, lr[0], lr[1]))
            w = int(round(math.sqrt(target * ar)))
            h = int(round(math.sqrt(target / ar)))
            if 0 < w <= W and 0 < h <= H:
                box = [_randint(g, 0, H - h + 1), _randint(g, 0, W - w + 1), h, w]
                break
        if box is None:  # fallback: whole image clamped to the ratio range, centred
            in_ratio = W / H
            if in_ratio < min(self.ratio):
                w, h = W, int(round(W / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                h, w = H, int(round(H * max(self.ratio)))
            else:
                w, h = W, H
            box = [(H - h) // 2, (W - w) // 2, h, w]
        return {"box": box, "size": list(_size2(self.size))}

    def apply(self, img, params):
        t, l, h, w = (int(v) for v in params["box"])
        return _resize(_crop(img, t, l, h, w), _size2(params["size"]), self.interpolation, self.antialias)


class RandomCrop(Transform):
    """Random (h, w) crop after optional zero padding (CIFAR style). params: {"box": [top, left, h, w]} in
    padded coordinates."""

    def __init__(self, size, padding=0):
        self.size, self.padding = size, int(padding)

    def sample(self, g, img):
        h, w = _size2(self.size)
        H, W = img.shape[-2] + 2 * self.padding, img.shape[-1] + 2 * self.padding
        return {"box": [_randint(g, 0, max(H - h, 0) + 1), _randint(g, 0, max(W - w, 0) + 1), h, w]}

    def apply(self, img, params):
        t, l, h, w = (int(v) for v in params["box"])
        return _crop(img, t - self.padding, l - self.padding, h, w)


class RandomHorizontalFlip(Transform):
    """params: {"flip": bool}."""

    def __init__(self, p=0.5):
        self.p = p

    def sample(self, g, img):
        return {"flip": bool(_rand(g) < self.p)}

    def apply(self, img, params):
        return img.flip(-1) if params["flip"] else img


# ----------------------------------------------------------------------------------------------------------------
# colour ops (torchvision semantics: blend(a, b, r) = clamp(r * a + (1 - r) * b))


def _blend(a, b, r):
    return (r * a + (1.0 - r) * b).clamp(0.0, 1.0)


def _gray(img):
    """(3, H, W) -> (1, H, W) ITU-R 601 luma."""
    return (0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def adjust_brightness(img, f):
    return _blend(img, torch.zeros_like(img), f)


def adjust_contrast(img, f):
    return _blend(img, _gray(img).mean(), f)


def adjust_saturation(img, f):
    return _blend(img, _gray(img), f)


def _rgb_to_hsv(img):
    r, g, b = img[0], img[1], img[2]
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc))


def _hsv_to_rgb(img):
    h, s, v = img[0], img[1], img[2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i[None] == torch.arange(6)[:, None, None]  # (6, H, W)
    a1 = torch.stack((v, q, p, p, t, v))
    a2 = torch.stack((t, v, v, q, p, p))
    a3 = torch.stack((p, p, t, v, v, q))
    a4 = torch.stack((a1, a2, a3))  # (3, 6, H, W)
    return (mask[None] * a4).sum(1)


def adjust_hue(img, f):
    """Rotate hue by f in [-0.5, 0.5] turns."""
    if f == 0:
        return img
    hsv = _rgb_to_hsv(img)
    hsv = torch.stack((torch.remainder(hsv[0] + f, 1.0), hsv[1], hsv[2]))
    return _hsv_to_rgb(hsv)


class ColorJitter(Transform):
    """Brightness / contrast / saturation factors uniform in [max(0, 1 - x), 1 + x], hue shift uniform in
    [-hue, hue]; applied in a random order. params: {"order": [perm of 0..3], "brightness": f|None,
    "contrast": f|None, "saturation": f|None, "hue": f|None} (order indexes brightness, contrast, saturation, hue)."""

    NAMES = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter: hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue, self.p = brightness, contrast, saturation, hue, p

    def sample(self, g, img):
        if self.p < 1.0 and _rand(g) >= self.p:
            return {"order": [], "brightness": None, "contrast": None, "saturation": None, "hue": None}
        order = _perm(g, 4)
        out = {"order": order}
        for k in self.NAMES:
            x = getattr(self, k)
            if not x:
                out[k] = None
            elif k == "hue":
                out[k] = _uniform(g, -x, x)
            else:
                out[k] = _uniform(g, max(0.0, 1.0 - x), 1.0 + x)
        return out

    def apply(self, img, params):
        fns = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for i in params["order"]:
            f = params[self.NAMES[i]]
            if f is not None:
                img = fns[i](img, float(f))
        return img


def normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    """(x - mean) / std per channel for (3, H, W) or (B, 3, H, W) float images in [0, 1], on x's device. The one
    normaliser of the project: Normalize below and every script use it (CLIP's constants unless told)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


class Normalize(Transform):
    """`normalize` as a Compose member."""

    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def apply(self, img, params):
        return normalize(img, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------------------
# RandAugment (Cubuk et al. 2019, arXiv 1909.13719), torchvision's op space and magnitude bins


def _quant(img):
    """float [0, 1] -> uint8-valued int tensor (ops that are defined on 8-bit values)."""
    return img.clamp(0, 1).mul(255).round().to(torch.uint8)


def _dequant(u8):
    return u8.float().div(255.0)


@functools.lru_cache(maxsize=16)
def _pixel_centres(H, W):
    """float64 (H, W) pixel-centre grids yy, xx, cached: building them was most of a RandAugment op's cost."""
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    return torch.meshgrid(ys, xs, indexing="ij")


def _affine(img, inv, interpolation="nearest", fill=0.0):
    """Warp (C, H, W) with `inv`: a 2x3 matrix mapping output pixel-centre coords (x, y) to input coords."""
    C, H, W = img.shape
    yy, xx = _pixel_centres(H, W)
    a, b, c = inv[0]
    d, e, f = inv[1]
    xi = a * xx + b * yy + c
    yi = d * xx + e * yy + f
    # to grid_sample's normalised coords (align_corners=False: -1 / +1 are the outer pixel edges)
    grid = torch.stack((2.0 * xi / W - 1.0, 2.0 * yi / H - 1.0), -1).to(img.dtype)[None]
    x = torch.cat((img, torch.ones_like(img[:1])), 0)[None]  # extra channel marks in-bounds pixels
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)[0]
    m = out[-1:]
    if interpolation != "nearest":
        m = (m > 0.5).to(img.dtype)
    return out[:-1] * m + (1.0 - m) * float(fill)


def _autocontrast(img):
    lo = img.amin(dim=(-2, -1), keepdim=True)
    hi = img.amax(dim=(-2, -1), keepdim=True)
    eq = hi == lo
    scale = 1.0 / torch.where(eq, torch.ones_like(hi), hi - lo)
    lo = torch.where(eq, torch.zeros_like(lo), lo)
    scale = torch.where(eq, torch.ones_like(scale), scale)
    return ((img - lo) * scale).clamp(0, 1)


def _equalize_channel(u8):
    """PIL/torchvision histogram equalisation of one uint8 channel (H, W)."""
    hist = torch.bincount(u8.flatten().long(), minlength=256)
    nz = hist[hist != 0]
    step = torch.div(nz[:-1].sum(), 255, rounding_mode="floor")
    if step == 0:
        return u8
    lut = torch.div(torch.cumsum(hist, 0) + torch.div(step, 2, rounding_mode="floor"), step, rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:-1].clamp(0, 255)
    return lut[u8.long()].to(torch.uint8)


def _sharpness(img, f):
    """Blend with a 3x3 smoothed image (PIL's SMOOTH kernel); border pixels keep their value (torchvision)."""
    C, H, W = img.shape
    if H <= 2 or W <= 2:
        return img
    k = torch.ones(3, 3, dtype=img.dtype)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(C, 1, 3, 3)
    blur = F.conv2d(img[None], k, groups=C)[0]
    deg = img.clone()
    deg[:, 1:-1, 1:-1] = blur
    return _blend(img, deg, f)


def apply_op(img, op, mag, interpolation="nearest", fill=0.0):
    """One RandAugment op with signed magnitude `mag` (already in the op's units) on float (3, H, W)."""
    H, W = img.shape[-2], img.shape[-1]
    if op == "Identity":
        return img
    if op == "ShearX":  # PIL convention: shear about the top-left corner
        return _affine(img, [[1.0, mag, 0.0], [0.0, 1.0, 0.0]], interpolation, fill)
    if op == "ShearY":
        return _affine(img, [[1.0, 0.0, 0.0], [mag, 1.0, 0.0]], interpolation, fill)
    if op == "TranslateX":  # content moves right by mag pixels
        return _affine(img, [[1.0, 0.0, -mag], [0.0, 1.0, 0.0]], interpolation, fill)
    if op == "TranslateY":
        return _affine(img, [[1.0, 0.0, 0.0], [0.0, 1.0, -mag]], interpolation, fill)
    if op == "Rotate":  # counter-clockwise by mag degrees about the centre
        t = math.radians(mag)
        c, s = math.cos(t), math.sin(t)
        cx, cy = W / 2.0, H / 2.0
        # input = centre + R^-1 (output - centre), R^-1 = [[c, -s], [s, c]] in (x, y-down) coords
        return _affine(img, [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]], interpolation, fill)
    if op == "Brightness":
        return adjust_brightness(img, 1.0 + mag)
    if op == "Color":
        return adjust_saturation(img, 1.0 + mag)
    if op == "Contrast":
        return adjust_contrast(img, 1.0 + mag)
    if op == "Sharpness":
        return _sharpness(img, 1.0 + mag)
    if op == "Posterize":  # keep the top `mag` bits of each 8-bit value
        bits = int(mag)
        mask = (0xFF << (8 - bits)) & 0xFF
        return _dequant(_quant(img) & mask)
    if op == "Solarize":  # invert 8-bit values >= threshold (a float threshold, as torchvision compares it)
        u = _quant(img)
        return _dequant(torch.where(u >= mag, 255 - u, u))
    if op == "AutoContrast":
        return _autocontrast(img)
    if op == "Equalize":
        u = _quant(img)
        return _dequant(torch.stack([_equalize_channel(c) for c in u]))
    raise ValueError(f"unknown RandAugment op {op!r}; expected one of {RandAugment.OPS}")


class RandAugment(Transform):
    """`num_ops` ops drawn uniformly (with replacement) from 14, each at magnitude bin `magnitude` of
    `num_magnitude_bins`, signed ops negated with probability 1/2.

    params: {"ops": [[op_name, magnitude, sign], ...]} where magnitude is the unsigned value in the op's units
    (shear factor, pixels, degrees, blend delta, bits, threshold) and sign is +1 / -1. Replaying uses
    magnitude * sign, so stored params stay meaningful whatever `magnitude` the replaying object has."""

    OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
           "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
    SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
              "Sharpness"}

    def __init__(self, num_ops=2, magnitude=9, num_magnitude_bins=31, interpolation="nearest", fill=0.0):
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"RandAugment: magnitude must be in [0, {num_magnitude_bins}), got {magnitude}")
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        self.interpolation, self.fill = interpolation, fill

    def magnitude_of(self, op, H, W):
        """The unsigned magnitude of `op` at bin self.magnitude (torchvision's linspace tables)."""
        n, m = self.num_magnitude_bins, self.magnitude
        frac = m / (n - 1) if n > 1 else 0.0
        if op in ("ShearX", "ShearY"):
            return 0.3 * frac
        if op == "TranslateX":
            return 150.0 / 331.0 * W * frac
        if op == "TranslateY":
            return 150.0 / 331.0 * H * frac
        if op == "Rotate":
            return 30.0 * frac
        if op in ("Brightness", "Color", "Contrast", "Sharpness"):
            return 0.9 * frac
        if op == "Posterize":
            return int(8 - round(m / ((n - 1) / 4)))
        if op == "Solarize":
            return 255.0 * (1.0 - frac)
        return 0.0

    def sample(self, g, img):
        H, W = int(img.shape[-2]), int(img.shape[-1])
        ops = []
        for _ in range(self.num_ops):
            op = self.OPS[_randint(g, 0, len(self.OPS))]
            sign = -1 if (op in self.SIGNED and _randint(g, 0, 2)) else 1
            ops.append([op, self.magnitude_of(op, H, W), sign])
        return {"ops": ops}

    def apply(self, img, params):
        for op, mag, sign in params["ops"]:
            img = apply_op(img, op, mag * sign if op != "Posterize" else mag, self.interpolation, self.fill)
        return img


class RandomErasing(Transform):
    """With probability p erase a random box (area fraction in `scale`, log-uniform aspect in `ratio`).
    value: a number (fill) or "random" (per-pixel N(0, 1) noise from a stored seed).
    params: {"applied": bool, "box": [top, left, h, w] | None, "noise_seed": int | None}."""

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0):
        self.p, self.scale, self.ratio, self.value = p, tuple(scale), tuple(ratio), value

    def sample(self, g, img):
        none = {"applied": False, "box": None, "noise_seed": None}
        if _rand(g) >= self.p:
            return none
        H, W = int(img.shape[-2]), int(img.shape[-1])
        area = H * W
        lr = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            ea = area * _uniform(g, self.scale[0], self.scale[1])
            ar = math.exp(_uniform(g, lr[0], lr[1]))
            h = int(round(math.sqrt(ea * ar)))
            w = int(round(math.sqrt(ea / ar)))
            if not (0 < h < H and 0 < w < W):
                continue
            box = [_randint(g, 0, H - h + 1), _randint(g, 0, W - w + 1), h, w]
            seed = _randint(g, 0, 2**31 - 1) if self.value == "random" else None
            return {"applied": True, "box": box, "noise_seed": seed}
        return none

    def apply(self, img, params):
        if not params["applied"]:
            return img
        t, l, h, w = (int(v) for v in params["box"])
        out = img.clone()
        if params.get("noise_seed") is not None:
            gen = torch.Generator().manual_seed(int(params["noise_seed"]))
            out[..., t:t + h, l:l + w] = torch.randn(img.shape[:-2] + (h, w), generator=gen, dtype=img.dtype)
        else:
            out[..., t:t + h, l:l + w] = float(self.value)
        return out


class Compose:
    """Chain of transforms whose params form a list (one dict per member, {} for deterministic ones)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def sample_apply(self, img, g=None):
        """-> (img, params_list)."""
        g = as_generator(g)
        params = []
        for t in self.transforms:
            if hasattr(t, "sample"):
                p = t.sample(g, img)
                img = t.apply(img, p)
            else:
                p = {}
                img = t(img)
            params.append(p)
        return img, params

    def apply(self, img, params_list):
        """Replay stored params (e.g. after a JSON round trip); bitwise equal to the original draw."""
        if len(params_list) != len(self.transforms):
            raise ValueError(f"Compose.apply: got {len(params_list)} params for {len(self.transforms)} transforms "
                             f"({[type(t).__name__ for t in self.transforms]})")
        for t, p in zip(self.transforms, params_list):
            img = t.apply(img, p) if hasattr(t, "sample") else t(img)
        return img

    def __call__(self, img, g=None):
        return self.sample_apply(img, g)[0]

    def __repr__(self):
        return "Compose([\n" + "".join(f"  {t!r},\n" for t in self.transforms) + "])"


def train_transform(size, kind="rrc", mean=CLIP_MEAN, std=CLIP_STD, scale=None):
    """Training pipeline on a uint8 HWC array / PIL / tensor -> normalised float (3, size, size).

    kind "rrc":     RandomResizedCrop(scale=(0.08, 1)) + flip (ImageNet / DR "RRC" baseline)
    kind "clip":    RandomResizedCrop(scale=(0.9, 1)), no flip (open_clip default)
    kind "randaug": RRC + flip + RandAugment(2, 9) + RandomErasing(0.25) (DR's "+RA/RE")
    mean/std None -> no normalisation (MobileCLIP convention)."""
    if kind == "clip":
        ts = [ToTensor(), RandomResizedCrop(size, scale=scale or (0.9, 1.0))]
    elif kind in ("rrc", "randaug"):
        ts = [ToTensor(), RandomResizedCrop(size, scale=scale or (0.08, 1.0)), RandomHorizontalFlip()]
        if kind == "randaug":
            ts += [RandAugment(2, 9), RandomErasing(0.25)]
    else:
        raise ValueError(f"train_transform: kind must be 'rrc', 'clip' or 'randaug', got {kind!r}")
    if mean is not None:
        ts.append(Normalize(mean, std))
    return Compose(ts)


def pil_resize(img, hw, interpolation="bicubic"):
    """Resize to (h, w) with PIL's own resampling, as torchvision's Resize does on a PIL image.

    img: PIL image (resized in its own mode), uint8 (H, W[, C]) numpy array or uint8 tensor (CHW or HWC, as
    to_tensor reads it). PIL's bicubic (a = -0.5) and bilinear filters widen their support by the downscale factor,
    i.e. they are antialiased, and work on 8-bit values in fixed point with rounding to uint8. Returns a PIL image
    for PIL input, else a uint8 (h, w, C) numpy array. Float tensors have no 8-bit PIL path: they are resized with
    PyTorch's antialiased kernel of the same name (same filter, float arithmetic, no 8-bit rounding)."""
    from PIL import Image
    modes = getattr(Image, "Resampling", Image)
    resample = {"bicubic": modes.BICUBIC, "bilinear": modes.BILINEAR, "nearest": modes.NEAREST}[interpolation]
    h, w = hw
    if isinstance(img, Image.Image):
        return img if img.size == (w, h) else img.resize((w, h), resample)
    if isinstance(img, torch.Tensor):
        if img.is_floating_point():
            return _resize(img, (h, w), interpolation)
        if img.dtype != torch.uint8:
            raise TypeError(f"pil_resize: expected a uint8 or float tensor, got {img.dtype}")
        if img.ndim == 3 and not _is_hwc(img):
            img = img.permute(1, 2, 0)                  # CHW -> HWC
        img = img.contiguous().numpy()
    if img.dtype != np.uint8:
        raise TypeError(f"pil_resize: expected a uint8 array, got dtype {img.dtype}")
    if img.shape[:2] == (h, w):
        return img
    a = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    out = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((w, h), resample))
    return out[..., None] if a.ndim < img.ndim else out


def _is_hwc(t):
    """to_tensor's reading of a 3-D tensor: HWC only when it cannot be CHW."""
    return t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4)


def _image_hw(img):
    """(H, W) of a PIL image, an (H, W[, C]) array, or a tensor read as to_tensor reads it."""
    if isinstance(img, torch.Tensor):
        return (int(img.shape[0]), int(img.shape[1])) if _is_hwc(img) else (int(img.shape[-2]), int(img.shape[-1]))
    if isinstance(img, np.ndarray):
        return int(img.shape[0]), int(img.shape[1])
    return img.size[1], img.size[0]                     # PIL: (width, height)


class PILResize(Resize):
    """Resize (shorter side -> size, or exact (h, w)) with PIL's resampling on the 8-bit image: torchvision's
    Resize on a PIL image, which is what open_clip's preprocessing runs. Put it before ToTensor. An image already at
    the output size is not resampled (torchvision returns it as is too)."""

    def __init__(self, size, interpolation="bicubic"):
        super().__init__(size, interpolation, antialias=True)

    def apply(self, img, params):
        return pil_resize(img, self.out_size(*_image_hw(img)), self.interpolation)


def eval_transform(size, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic"):
    """open_clip's eval preprocessing: PIL resize of the shorter side to `size` (bicubic; "bilinear" is MobileCLIP
    v1's), center crop size x size (top = round((H - size) / 2), zero padding if smaller), to float / 255,
    Normalize (mean None -> none). Input: PIL / uint8 array / uint8 tensor (the 8-bit PIL path, exact) or float
    tensor (torch antialiased resize). Images already at the model size skip the resize, so their output is the
    same as to_tensor + crop + normalize bit for bit."""
    ts = [PILResize(size, interpolation), ToTensor(), CenterCrop(size)]
    if mean is not None:
        ts.append(Normalize(mean, std))
    return Compose(ts)
