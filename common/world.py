"""The embedded synthetic world: deterministic procedural scenes for every clipbook experiment.

A scene is 1-3 coloured shapes standing on a textured, sloped ground plane, rendered at any size 32..256 px.
Each sample carries everything the papers need:

  image (H, W, 3) uint8       vectorised implicit shapes on a cached coordinate grid, painted back to front
  caption                     accurate: every visible object with size, colour, position and relations
  alt_text, quality q         web-like noisy caption: q ~ Kumaraswamy(1.6, 1.6) (Beta-like on [0, 1]); low q drops
                              objects, swaps attributes,
                              adds filler ("stock photo", "hd wallpaper") and file names ("IMG_2041.jpg")
  label, label_fine           shape of the largest visible object; shape * len(COLORS) + colour
  seg, instances, depth       semantic mask (0 bg, 1 + shape), instance ids in paint order, metric-ish depth
  year                        2014..2022 with concept drift (new shapes/colours appear, frequencies shift)

world[i] depends only on (seed, split, i, size, options): the year is a hash of (seed, split id, i) and the per-sample
RNG (Python's Mersenne Twister, ~10x cheaper to create than a numpy Generator) is seeded by a splitmix64 hash of
(seed, split id, i, year), so splits never share a stream, World(years=[y]) gives independent per-year streams and
no files are needed. Geometry is resolution independent: the same i at 32 and 256 px is the same scene.

  python -m common.world export --out DIR --n N --split train --size 64      # webdataset tar shards
  python -m common.world grid --out docs/world.png                           # sample grid
  python -m common.world bench                                               # images/s at 64 px
"""
import argparse
import bisect
import io
import json
import math
import os
import random
import sys
import tarfile
import time

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# vocabulary (class ids are indices into these lists and never depend on years/options)

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "heart", "moon"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink"]
SIZES = ["small", "medium", "large"]
TEXTURES = ["plain", "striped", "checkered", "dotted", "wavy"]
YEARS = list(range(2014, 2023))
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_N = {"train": 50_000, "val": 5_000, "test": 5_000}

PLURALS = {s: (s + "es" if s.endswith(("s", "x", "ch", "sh")) else s + "s") for s in SHAPES}  # cross -> crosses
RGB = {
    "red": (0.86, 0.14, 0.14), "green": (0.13, 0.66, 0.22), "blue": (0.14, 0.30, 0.88),
    "yellow": (0.96, 0.86, 0.12), "purple": (0.55, 0.20, 0.72), "orange": (0.98, 0.52, 0.08),
    "white": (0.97, 0.97, 0.97), "black": (0.06, 0.06, 0.06), "pink": (1.00, 0.50, 0.76),
}
COLOR_RGB = np.array([RGB[c] for c in COLORS], np.float32)       # (C, 3) in [0, 1]
SIZE_DIAMETER = [0.3, 0.4, 0.55]     # fraction of the image side per SIZES entry (large enough to learn at 32 px)
POS_CENTERS = [0.22, 0.5, 0.78]      # 3x3 grid cell centres (row = y, col = x), jittered by +-0.04
BG_CONTRAST = (20.0, 15.0)           # background texture contrast: min + random extra (0..255 scale)
POS_PHRASES = [["at the top left", "at the top", "at the top right"],
               ["on the left", "in the center", "on the right"],
               ["at the bottom left", "at the bottom", "at the bottom right"]]
BG_PHRASES = {"plain": "on a plain background", "striped": "over a striped background",
              "checkered": "over a checkered background", "dotted": "over a dotted background",
              "wavy": "over a wavy background"}
NUMBERS = ["", "one", "two", "three"]

# concept drift (TiC): shapes/colours that exist only from a given year on, and smooth log-frequency trends
# (log-weight change over 2014 -> 2022; weight(year) = exp(trend * (year - 2018) / 8)).
SHAPE_INTRO = {"heart": 2018, "moon": 2020}
COLOR_INTRO = {"pink": 2019}
SHAPE_TREND = {"circle": -1.6, "square": -0.8, "triangle": 0.0, "star": 1.2, "cross": -0.4, "ring": 0.6,
               "diamond": 0.0, "hexagon": 1.0, "heart": 0.8, "moon": 0.4}
COLOR_TREND = {"red": -1.2, "green": 0.4, "blue": 0.0, "yellow": -0.4, "purple": 1.0, "orange": 0.0,
               "white": -0.6, "black": 0.6, "pink": 0.8}
TEXTURE_TREND = {"plain": -1.0, "striped": 0.0, "checkered": 0.0, "dotted": 0.6, "wavy": 1.0}

# web alt-text noise (filler words drift too: "4k" appears in 2016, "aesthetic" in 2019, "nft" in 2021)
FILLERS = ["stock photo", "free download", "hd wallpaper", "best", "cheap", "vector illustration", "clipart",
           "royalty free", "high quality", "png", "icon", "logo", "image", "picture", "design", "template",
           "new", "sale", "buy now", "cute", "pattern", "sticker", "poster", "art print", "wallpaper"]
FILLERS_FROM = {"4k": 2016, "4k wallpaper": 2016, "aesthetic": 2019, "nft": 2021}
FILE_FORMATS = ["IMG_{n4}.jpg", "dsc{n4}", "DSC_{n4}.JPG", "image-{n4}.png", "photo_{n3}", "IMG_{y}{mmdd}",
                "screenshot {y}-{mm}-{dd}", "{n6}.jpg", "untitled-{n2}", "pic{n3}.jpeg"]

TEMPLATES = ["a photo of a {}.", "a rendering of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
             "a drawing of a {}.", "a {} over a background.", "a large {}.", "a small {}.", "a {} in the center."]

# every noun (singular) that captions or alt-texts can contain; NOUN_FORMS maps each surface form to it so that
# catlip can extract labels without WordNet (plurals such as "crosses" are what naive stemming gets wrong).
NOUNS = sorted(set(SHAPES) | {"shape", "object", "one", "background", "left", "right", "top", "bottom", "center",
                              "front", "photo", "stock", "download", "wallpaper", "vector", "illustration",
                              "clipart", "png", "icon", "logo", "image", "picture", "design", "template", "sale",
                              "pattern", "sticker", "poster", "art", "print", "quality", "nft", "screenshot"}
               - {"one"})
NOUN_FORMS = {**{n: n for n in NOUNS}, **{PLURALS[s]: s for s in SHAPES}}


def _year_weights(names, intro, trend, drift):
    """Per-year probabilities (len(YEARS), len(names)) and cumulative lists for sampling; a concept with an intro
    year has weight 0 before it. Each cdf row is exactly 1.0 from its last non-zero entry on, so a uniform in
    [0, 1) can never select a zero-weight concept through rounding."""
    W = np.ones((len(YEARS), len(names)))
    if drift:
        for j, nm in enumerate(names):
            for t, y in enumerate(YEARS):
                W[t, j] = 0.0 if y < intro.get(nm, 0) else math.exp(trend.get(nm, 0.0) * (y - 2018) / 8)
    P = W / W.sum(1, keepdims=True)
    cdf = []
    for t in range(len(YEARS)):
        row = np.cumsum(P[t]).tolist()
        last = max(j for j in range(len(names)) if P[t, j] > 0)
        cdf.append([min(c, 1.0) if j < last else 1.0 for j, c in enumerate(row)])
    return P, cdf


SHAPE_P = {d: _year_weights(SHAPES, SHAPE_INTRO, SHAPE_TREND, d) for d in (True, False)}
COLOR_P = {d: _year_weights(COLORS, COLOR_INTRO, COLOR_TREND, d) for d in (True, False)}
TEXTURE_P = {d: _year_weights(TEXTURES, {}, TEXTURE_TREND, d) for d in (True, False)}
_SCALED = {}  # drift_scale -> (shape cdfs, colour cdfs, texture cdfs); scale 1 uses the tables above


def _scaled_cdfs(scale):
    """Per-year sampling cdfs with every log-frequency trend multiplied by `scale` (intro years unchanged): at
    scale 3 the concepts frequent in 2014 (circle, red, plain) become rare by 2022 and the rising ones dominate."""
    if scale not in _SCALED:
        scaled = lambda tr: {k: scale * v for k, v in tr.items()}
        _SCALED[scale] = tuple(_year_weights(names, intro, scaled(trend), True)[1] for names, intro, trend in (
            (SHAPES, SHAPE_INTRO, SHAPE_TREND), (COLORS, COLOR_INTRO, COLOR_TREND), (TEXTURES, {}, TEXTURE_TREND)))
    return _SCALED[scale]


def main_object(sample):
    """The main object of a world sample: the largest visible one (ties: lower instance), the caption's first object
    and the one `label` names. `objects` is in painting order (back to front), so objects[0] is often another one."""
    return min((o for o in sample["objects"] if o["visible"]), key=lambda o: (-o["area"], o["instance"]))


def class_names(task="shape"):
    """Class names in label order. task: "shape" (label), "shape_color" (label_fine), "color"."""
    if task == "shape":
        return list(SHAPES)
    if task == "shape_color":
        return [f"{c} {s}" for s in SHAPES for c in COLORS]   # index = shape * len(COLORS) + colour
    if task == "color":
        return list(COLORS)
    raise ValueError(f"class_names: task={task!r}; expected one of 'shape', 'shape_color', 'color'")


# ----------------------------------------------------------------------------------------------------------------
# deterministic per-sample randomness

_M64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64 finaliser: a cheap, well-mixed integer hash (used to pick years without building an RNG)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class _Rand(random.Random):
    """Per-sample RNG. Python's Mersenne Twister seeded with one int is ~10x cheaper to create than a numpy
    Generator(SeedSequence) and its int-seeded stream is stable across Python versions."""

    u = random.Random.random

    def int(self, n):
        return min(int(self.random() * n), n - 1)

    def choice(self, seq):
        return seq[min(int(self.random() * len(seq)), len(seq) - 1)]

    def cat(self, cdf):
        return min(bisect.bisect_right(cdf, self.random()), len(cdf) - 1)

    def kumaraswamy(self, a, b):
        """Beta-like draw on [0, 1] by inverse CDF (no version-dependent rejection sampler)."""
        return (1.0 - (1.0 - self.random()) ** (1.0 / b)) ** (1.0 / a)


def _seed_of(*xs):
    h = 0x243F6A8885A308D3
    for x in xs:
        h = _mix64(h ^ (x & _M64))
    return h


# ----------------------------------------------------------------------------------------------------------------
# shapes as pseudo signed distances g(u, v) in units of the object radius (inside: g < 0); u right, v down

def _g_circle(u, v, rr):
    return np.sqrt(rr) - 1.0


def _g_square(u, v, rr):
    return np.maximum(np.abs(u), np.abs(v)) - 0.8


def _g_triangle(u, v, rr):
    u, v = u / 1.15, v / 1.15 - 0.25     # equilateral (circumradius 1.15), apex up, bounding box centred
    return (np.maximum(v, 0.866 * np.abs(u) - 0.5 * v) - 0.5) * 1.15


_STAR_RO, _STAR_RI = 1.0, 0.5
_STAR_N = (_STAR_RO - _STAR_RI * math.sin(math.radians(54)), _STAR_RI * math.cos(math.radians(54)))
_STAR_N = (_STAR_N[0] / math.hypot(*_STAR_N), _STAR_N[1] / math.hypot(*_STAR_N))  # outward edge normal (x, y)
_SC18 = (math.sin(math.radians(18)), math.cos(math.radians(18)))
_SC54 = (math.sin(math.radians(54)), math.cos(math.radians(54)))


def _fold(u, v, sc):
    """Mirror points below the line through the origin at angle a (sc = sin a, cos a; angles in the usual x = u,
    y = -v frame) onto the other side."""
    d = np.maximum(sc[0] * u + sc[1] * v, 0.0)
    return u - (2 * sc[0]) * d, v - (2 * sc[1]) * d


def _g_star(u, v, rr):
    """Five-pointed star, tip up. Its mirror symmetry folds every point into the 54..90 degree wedge next to the
    top tip (abs, mirror at 18 deg, abs, mirror at 54 deg; no trigonometry) where the boundary is one straight edge
    from the tip (0, RO) to the inner vertex at 54 deg."""
    u, v = _fold(np.abs(u), v, _SC18)
    u, v = _fold(np.abs(u), v, _SC54)
    return u * _STAR_N[0] + (-v - _STAR_RO) * _STAR_N[1]


def _g_cross(u, v, rr):
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - 0.3, av - 0.9), np.maximum(av - 0.3, au - 0.9))


def _g_ring(u, v, rr):
    return np.abs(np.sqrt(rr) - 0.75) - 0.25


def _g_diamond(u, v, rr):
    return (np.abs(u) * 1.15 + np.abs(v) - 1.0) * 0.656   # a bit taller than wide; 0.656 = 1 / |gradient|


def _g_hexagon(u, v, rr):
    av = np.abs(v)
    return np.maximum(av, 0.866 * np.abs(u) + 0.5 * av) - 0.866


def _g_heart(u, v, rr):
    v = v + 0.05
    au = np.abs(u)
    lobes = np.sqrt((au - 0.47) ** 2 + (v + 0.32) ** 2) - 0.5
    tip = np.maximum((au + np.abs(v - 0.02) - 1.0) * 0.7071, -0.32 - v)
    return np.minimum(lobes, tip)


def _g_moon(u, v, rr):
    return np.maximum(np.sqrt(rr) - 1.0, 0.8 - np.sqrt((u - 0.5) ** 2 + (v + 0.25) ** 2))


SHAPE_FNS = [_g_circle, _g_square, _g_triangle, _g_star, _g_cross, _g_ring, _g_diamond, _g_hexagon, _g_heart,
             _g_moon]
assert len(SHAPE_FNS) == len(SHAPES)

_GRIDS = {}
_TEXTURES = {}
N_VARIANTS = 32   # background pattern variants per texture (frequency, angle, phase), cached per image size


def _grid(S):
    """Cached pixel-centre coordinates in [0, 1], sloped-ground depth (S, S) and row shading (S, 1, 1)."""
    if S not in _GRIDS:
        c = ((np.arange(S, dtype=np.float32) + 0.5) / S)
        ground = _ground_depth(c).astype(np.float32)       # ground plane seen from above: far at the top (horizon)
        shade = (0.88 + 0.17 * c).astype(np.float32)       # light falls off toward the horizon
        _GRIDS[S] = (c[None, :], c[:, None], np.ascontiguousarray(np.broadcast_to(ground[:, None], (S, S))),
                     shade[:, None, None])
    return _GRIDS[S]


def _texture(S, tex, var):
    """Mixing weight (S, S, 1) float32 in [0, 1] between the two background colours; None for plain."""
    key = (S, tex, var)
    m = _TEXTURES.get(key)
    if m is None and tex != 0:
        X, Y = _grid(S)[:2]
        R = random.Random(1000 * tex + var)      # fixed variant table, independent of any seed
        f, ph1, ph2 = 2.5 + 3.5 * R.random(), 6.2832 * R.random(), 6.2832 * R.random()
        name = TEXTURES[tex]
        if name == "striped":
            a = R.choice([0.0, 0.785, 1.571, 2.356]) + 0.2 * (R.random() - 0.5)
            m = np.sin((6.2832 * f) * (X * math.cos(a) + Y * math.sin(a)) + ph1) > 0
        elif name == "checkered":
            m = (np.sin((6.2832 * f) * X + ph1) * np.sin((6.2832 * f) * Y + ph2)) > 0
        elif name == "dotted":
            f = f + 1.5
            m = ((((f * X + ph1) % 1.0) - 0.5) ** 2 + (((f * Y + ph2) % 1.0) - 0.5) ** 2) < 0.05
        else:  # wavy
            m = 0.5 + 0.5 * np.sin((6.2832 * f) * Y + 1.5 * np.sin((6.2832 * 1.5) * X + ph1))
        m = np.ascontiguousarray(m, dtype=np.float32)[..., None]
        _TEXTURES[key] = m
    return m


def _ground_depth(y):
    return 3.0 / (y + 0.3)


# ----------------------------------------------------------------------------------------------------------------
# text

def _relation(a, b, occ):
    """Connector between object a (already said) and b (next): occlusion first, then grid layout."""
    if b["instance"] in occ[a["instance"]]:
        return ", in front of "
    if a["instance"] in occ[b["instance"]]:
        return ", behind "
    (ra, ca), (rb, cb) = a["pos"], b["pos"]
    if ca == cb and ra < rb:
        return ", above "
    if ca == cb and ra > rb:
        return ", below "
    if ra == rb and ca < cb:
        return ", to the left of "
    if ra == rb and ca > cb:
        return ", to the right of "
    return " and "


def _make_caption(vis, occ, texture):
    """vis: visible objects, largest first. Objects of the same shape are grouped and counted ("two circles")."""
    groups = []
    for o in vis:
        for g in groups:
            if g[0]["shape_id"] == o["shape_id"]:
                g.append(o)
                break
        else:
            groups.append([o])
    out, prev, prev_plural = [], None, False
    for g in groups:
        if prev is not None:   # after a counted group the relation would be ambiguous: plain "and"
            out.append(", and " if prev_plural or len(g) > 1 else _relation(prev, g[0], occ))
        prev_plural = len(g) > 1
        if len(g) == 1:
            o = g[0]
            out.append(f"a {SIZES[o['size_id']]} {COLORS[o['color_id']]} {SHAPES[o['shape_id']]} "
                       f"{POS_PHRASES[o['pos'][0]][o['pos'][1]]}")
            prev = o
            continue
        same_color = len({o["color_id"] for o in g}) == 1
        col = COLORS[g[0]["color_id"]] + " " if same_color else ""
        out.append(f"{NUMBERS[len(g)]} {col}{PLURALS[SHAPES[g[0]['shape_id']]]}, ")
        for j, o in enumerate(g):
            if j:
                out.append(_relation(g[j - 1], o, occ))
            c = "" if same_color else COLORS[o["color_id"]] + " "
            out.append(f"a {SIZES[o['size_id']]} {c}one {POS_PHRASES[o['pos'][0]][o['pos'][1]]}")
        prev = g[-1]
    sep = " " if texture == "plain" else ", "
    return "".join(out) + sep + BG_PHRASES[texture] + "."


def _file_token(R, year):
    f = R.choice(FILE_FORMATS)
    n = R.int(1_000_000)
    mm, dd = 1 + R.int(12), 1 + R.int(28)
    return f.format(n2=n % 100, n3=f"{n % 1000:03d}", n4=f"{n % 10000:04d}", n6=f"{n:06d}", y=year,
                    mm=f"{mm:02d}", dd=f"{dd:02d}", mmdd=f"{mm:02d}{dd:02d}")


def _make_alt_text(R, vis, q, year, texture):
    """Web alt-text at quality q: at q ~ 1 a terse version of the caption; at q ~ 0 mostly filler and file names,
    wrong attributes, missing objects, but the main object is still named more often than chance."""
    nq = 1.0 - q
    phrases = []
    for j, o in enumerate(vis):
        keep = (0.6 + 0.4 * q) if j == 0 else (0.15 + 0.8 * q)
        if R.u() >= keep:
            continue
        s = o["shape_id"] if R.u() >= 0.45 * nq ** 1.3 else R.int(len(SHAPES))
        words = []
        if R.u() < 0.6 * q:
            words.append(SIZES[o["size_id"]] if R.u() >= 0.3 * nq else R.choice(SIZES))
        if R.u() < 0.35 + 0.6 * q:
            words.append(COLORS[o["color_id"]] if R.u() >= 0.5 * nq else R.choice(COLORS))
        words.append(SHAPES[s])
        if R.u() < 0.5 * q * q:
            words.append(POS_PHRASES[o["pos"][0]][o["pos"][1]])
        phrases.append(" ".join(words))
    # merge identical phrases into a plural ("red stars")
    merged = []
    for p in phrases:
        if p in merged:
            k = merged.index(p)
            w = p.split(" ")
            if w[-1] in PLURALS:
                merged[k] = "two " + " ".join(w[:-1] + [PLURALS[w[-1]]]) if R.u() < 0.5 else \
                    " ".join(w[:-1] + [PLURALS[w[-1]]])
                continue
        merged.append(p)
    phrases = merged
    if R.u() < 0.4 * nq:   # hallucinated object (web text describing something else)
        phrases.append((R.choice(COLORS) + " " if R.u() < 0.5 else "") + R.choice(SHAPES))
    if q < 0.5 and len(phrases) > 1 and R.u() < 0.5:
        phrases = phrases[1:] + phrases[:1]
    if R.u() < 0.4 * q:
        phrases.append(f"{texture} background")
    joiner = " and " if R.u() < q else (", " if R.u() < 0.5 else " ")
    body = joiner.join(phrases)
    fill = [w for w, y in FILLERS_FROM.items() if year >= y] + FILLERS
    n_fill = int(R.u() * (0.4 + 4.0 * nq) + 0.5 * nq)
    pre = [R.choice(fill) for _ in range(n_fill) if R.u() < 0.4]
    post = [R.choice(fill) for _ in range(n_fill - len(pre))]
    toks = pre + ([body] if body else []) + post
    if R.u() < 0.75 * nq ** 1.2:
        toks.insert(0 if R.u() < 0.5 else len(toks), _file_token(R, year))
    if not toks:
        toks = [R.choice(fill)]
    sep = " " if R.u() < 0.7 else (" - " if R.u() < 0.5 else " | ")
    s = sep.join(toks)
    if R.u() < 0.35 * nq:
        s = s.title()
    return s


# ----------------------------------------------------------------------------------------------------------------
# the world

class World:
    """Deterministic random-access synthetic dataset. world[i] -> sample dict (see the module docstring).

    seed: world seed (int >= 0); split: "train" | "val" | "test" (disjoint index streams); size: image side 32..256;
    n: nominal length (default train 50k, val/test 5k); years: restrict samples to these years (e.g. [2018]);
    drift: concept drift over years (False: every shape/colour/texture uniform in every year);
    quality: fix the alt-text quality q for every sample (None: q ~ Kumaraswamy(1.6, 1.6) per sample); only the
    alt-text changes with it. drift_scale: multiplies every shape/colour/texture log-frequency trend (1: the
    default world, bit-identical; 3: a strong drift where early-frequent concepts fade); ignored without drift.
    Only the attributes drawn change: every sample makes the same random draws at any scale.
    """

    def __init__(self, seed=0, split="train", size=64, n=None, years=None, drift=True, quality=None,
                 drift_scale=1.0):
        if split not in SPLITS:
            raise ValueError(f"World: split={split!r}; expected one of {list(SPLITS)}")
        if not (isinstance(size, (int, np.integer)) and 16 <= size <= 512):
            raise ValueError(f"World: size={size!r}; expected an int in 16..512 (designed and tested for 32..256)")
        if seed < 0:
            raise ValueError(f"World: seed={seed}; expected a non-negative int")
        if years is not None:
            years = sorted({int(y) for y in years})
            bad = [y for y in years if y not in YEARS]
            if bad or not years:
                raise ValueError(f"World: years={years!r}; expected a non-empty subset of {YEARS}")
        if quality is not None and not 0.0 <= quality <= 1.0:
            raise ValueError(f"World: quality={quality!r}; expected a float in [0, 1] or None")
        self.seed, self.split, self.size, self.years, self.drift = int(seed), split, int(size), years, bool(drift)
        self.quality = quality
        if not (isinstance(drift_scale, (int, float)) and 0.0 <= drift_scale <= 10.0):
            raise ValueError(f"World: drift_scale={drift_scale!r}; expected a float in [0, 10]")
        self.drift_scale = float(drift_scale)
        self._cdfs = _scaled_cdfs(self.drift_scale) if self.drift and self.drift_scale != 1.0 else \
            (SHAPE_P[self.drift][1], COLOR_P[self.drift][1], TEXTURE_P[self.drift][1])
        self.n = DEFAULT_N[split] if n is None else int(n)
        self._sid = SPLITS[split]
        self._ykey = "" if years is None else "y" + "_".join(str(y) for y in years) + "-"

    def __len__(self):
        return self.n

    def __repr__(self):
        return (f"World(seed={self.seed}, split={self.split!r}, size={self.size}, n={self.n}, years={self.years}, "
                f"drift={self.drift}, quality={self.quality}" +
                (f", drift_scale={self.drift_scale})" if self.drift_scale != 1.0 else ")"))

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"World index must be an int, got {type(i).__name__}")
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"World index {i} out of range for length {self.n}")
        return self.sample(int(i))

    def class_names(self, task="shape"):
        return class_names(task)

    def year_of(self, i):
        """The year of sample i (cheap: a hash, no rendering)."""
        ys = YEARS if self.years is None else self.years
        return ys[_seed_of(self.seed, self._sid, i, 0x5EED) % len(ys)]

    def sample(self, i, quality=None):
        """Sample i for any i >= 0 (ignores the nominal length). quality overrides q for the alt-text only."""
        S = self.size
        year = self.year_of(i)
        R = _Rand(_seed_of(self.seed, self._sid, i, year))
        t = YEARS.index(year)
        X, Y, ground, shade = _grid(S)

        # ---- background: two muted colours mixed by a texture pattern, darker toward the horizon (0..255 floats)
        tex = R.cat(self._cdfs[2][t])
        texture = TEXTURES[tex]
        base = 90.0 + 75.0 * R.u()
        A = np.array([base + 20.0 * (R.u() - 0.5) for _ in range(3)], np.float32)
        dB = (BG_CONTRAST[0] + BG_CONTRAST[1] * R.u()) * (1.0 if R.u() < 0.5 else -1.0)
        B = np.array([min(255.0, max(0.0, x + dB)) for x in A.tolist()], np.float32)
        m = _texture(S, tex, R.int(N_VARIANTS))
        img = np.empty((S, S, 3), np.float32)
        if m is None:
            img[:] = A * shade
        else:
            np.multiply(m, (B - A) * shade, out=img)
            img += A * shade
        depth = ground.copy()
        seg = np.zeros((S, S), np.uint8)
        inst = np.zeros((S, S), np.uint8)

        # ---- objects: count, attributes (drifting by year), grid cell + jitter, depth from the ground contact
        k = 1 + R.cat([0.4, 0.75, 1.0])
        scdf, ccdf = self._cdfs[0][t], self._cdfs[1][t]
        same = R.u() < 0.3    # repeated objects ("two circles") make plurals common enough to matter
        cells = list(range(9))
        objs = []
        for j in range(k):
            s = objs[0]["shape_id"] if (same and j) else R.cat(scdf)
            c = R.cat(ccdf)
            z = R.cat([0.33, 0.67, 1.0])
            if j and R.u() < 0.12:
                cell = objs[R.int(j)]["cell"]          # same cell: strong (possibly full) occlusion
            else:
                cell = cells.pop(R.int(len(cells)))
            row, col = divmod(cell, 3)
            r = SIZE_DIAMETER[z] / 2
            cx = POS_CENTERS[col] + 0.08 * (R.u() - 0.5)
            cy = POS_CENTERS[row] + 0.08 * (R.u() - 0.5)
            d = _ground_depth(cy + 0.8 * r) + 0.6 * (R.u() - 0.5)
            rgb = [min(255.0, max(0.0, 255.0 * COLOR_RGB[c, ch] + 12.0 * (R.u() - 0.5))) for ch in range(3)]
            objs.append({"shape_id": s, "color_id": c, "size_id": z, "cell": cell, "pos": [row, col],
                         "cx": cx, "cy": cy, "r": r, "z": d, "rgb": np.array(rgb, np.float32)})
        objs.sort(key=lambda o: -o["z"])               # paint back to front
        for j in range(1, k):                           # keep a margin so bulges never interpenetrate
            objs[j]["z"] = min(objs[j]["z"], objs[j - 1]["z"] - 0.3)

        occ = {}
        for j, o in enumerate(objs):
            idx = j + 1
            r, cx, cy = o["r"], o["cx"], o["cy"]
            x0, x1 = max(0, int((cx - 1.05 * r) * S)), min(S, int((cx + 1.05 * r) * S) + 2)
            y0, y1 = max(0, int((cy - 1.05 * r) * S)), min(S, int((cy + 1.05 * r) * S) + 2)
            u = (X[:, x0:x1] - cx) * (1.0 / r)
            v = (Y[y0:y1] - cy) * (1.0 / r)
            rr = u * u + v * v
            gd = SHAPE_FNS[o["shape_id"]](u, v, rr)
            alpha = np.minimum(np.maximum(0.5 - gd * (r * S), 0.0), 1.0)   # ~1 px anti-aliased edge
            mask = gd < 0
            bump = np.sqrt(np.maximum(1.0 - rr, 0.0))    # hemispherical bulge: shading and depth
            crop = img[y0:y1, x0:x1]
            crop *= (1.0 - alpha)[..., None]
            crop += (alpha * (0.8 + 0.2 * bump))[..., None] * o["rgb"]
            ic = inst[y0:y1, x0:x1]
            occ[idx] = set()
            if j:
                under = np.bincount(ic[mask], minlength=idx)
                occ[idx] = {b for b in range(1, idx) if under[b]}
            np.copyto(ic, idx, where=mask)
            np.copyto(seg[y0:y1, x0:x1], 1 + o["shape_id"], where=mask)
            np.copyto(depth[y0:y1, x0:x1], o["z"] - 0.2 * bump, where=mask)
            o["instance"], o["area_full"] = idx, int(np.count_nonzero(mask))

        # ---- visibility: enough pixels left after occlusion (>= 25% of its own footprint, >= 2 px)
        counts = np.bincount(inst.ravel(), minlength=k + 1)
        for o in objs:
            o["area"] = int(counts[o["instance"]])
            o["visible"] = o["area"] >= max(2, 0.25 * o["area_full"])
        vis = sorted([o for o in objs if o["visible"]], key=lambda o: (-o["area"], o["instance"]))
        if not vis:  # cannot happen (the front object is fully drawn) unless the image is tiny; be safe
            vis = [max(objs, key=lambda o: o["area"])]
            vis[0]["visible"] = True
        main = vis[0]

        caption = _make_caption(vis, occ, texture)
        q = R.kumaraswamy(1.6, 1.6)     # always drawn, so that a fixed q changes only the alt-text
        if quality is not None or self.quality is not None:
            q = float(quality if quality is not None else self.quality)
        alt = _make_alt_text(R, vis, q, year, texture)

        image = img.astype(np.uint8)      # convex blends of values in [0, 255]: no clip needed
        objects = [{"shape": SHAPES[o["shape_id"]], "color": COLORS[o["color_id"]], "size": SIZES[o["size_id"]],
                    "pos": list(o["pos"]), "depth": round(float(o["z"]), 4), "shape_id": o["shape_id"],
                    "color_id": o["color_id"], "size_id": o["size_id"], "instance": o["instance"],
                    "center": [round(o["cx"], 4), round(o["cy"], 4)], "radius": round(o["r"], 4),
                    "area": o["area"], "visible": bool(o["visible"]),
                    "occludes": sorted(occ[o["instance"]])} for o in objs]
        return {
            "__key__": f"{self.split}-{self._ykey}{i:09d}",
            "image": image,
            "caption": caption,
            "alt_text": alt,
            "quality": round(float(q), 4),
            "label": int(main["shape_id"]),
            "label_fine": int(main["shape_id"] * len(COLORS) + main["color_id"]),
            "seg": seg,
            "instances": inst,
            "depth": depth,
            "year": int(year),
            "objects": objects,
            "texture": texture,
        }


# ----------------------------------------------------------------------------------------------------------------
# bulk access and export

def load_arrays(world, n=None, start=0, progress=None):
    """Render world[start:start+n] into stacked arrays (for miniature in-memory datasets).

    Returns dict: images (n,H,W,3) uint8, labels (n,) int64, label_fine (n,) int64, seg (n,H,W) uint8,
    instances (n,H,W) uint8, depth (n,H,W) float32, year (n,) int64, quality (n,) float32,
    captions list[str], alt_texts list[str], keys list[str], objects list[list[dict]].
    """
    n = len(world) - start if n is None else int(n)
    S = world.size
    out = {"images": np.empty((n, S, S, 3), np.uint8), "labels": np.empty(n, np.int64),
           "label_fine": np.empty(n, np.int64), "seg": np.empty((n, S, S), np.uint8),
           "instances": np.empty((n, S, S), np.uint8), "depth": np.empty((n, S, S), np.float32),
           "year": np.empty(n, np.int64), "quality": np.empty(n, np.float32),
           "captions": [], "alt_texts": [], "keys": [], "objects": []}
    it = range(n)
    if progress is None:
        progress = n >= 20_000
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"world {world.split} {S}px", leave=False, mininterval=1.0)
    for j in it:
        s = world.sample(start + j)
        out["images"][j], out["labels"][j], out["label_fine"][j] = s["image"], s["label"], s["label_fine"]
        out["seg"][j], out["instances"][j], out["depth"][j] = s["seg"], s["instances"], s["depth"]
        out["year"][j], out["quality"][j] = s["year"], s["quality"]
        out["captions"].append(s["caption"])
        out["alt_texts"].append(s["alt_text"])
        out["keys"].append(s["__key__"])
        out["objects"].append(s["objects"])
    return out


def _png(arr):
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG", compress_level=1)
    return b.getvalue()


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def sample_members(s, image_format="png"):
    """The webdataset members of one sample: list of (name, bytes) in the conventions.md layout. image_format
    "jpg" stores the image as JPEG (quality 90), as web-scale shards do; masks stay lossless PNG."""
    k = s["__key__"]
    meta = {"alt_text": s["alt_text"], "quality": s["quality"], "label": s["label"], "label_fine": s["label_fine"],
            "year": s["year"], "objects": s["objects"], "texture": s["texture"]}
    d = io.BytesIO()
    np.save(d, s["depth"])
    if image_format == "jpg":
        from PIL import Image
        b = io.BytesIO()
        Image.fromarray(s["image"]).save(b, format="JPEG", quality=90)
        img = (f"{k}.jpg", b.getvalue())
    else:
        img = (f"{k}.png", _png(s["image"]))
    return [img, (f"{k}.txt", s["caption"].encode()),
            (f"{k}.json", json.dumps(meta).encode()), (f"{k}.seg.png", _png(s["seg"])),
            (f"{k}.inst.png", _png(s["instances"])), (f"{k}.depth.npy", d.getvalue())]


def export_shards(world, out_dir, n=None, shard_size=1000, start=0, progress=None, image_format="png"):
    """Write world[start:start+n] to out_dir/shard-000000.tar ... (webdataset layout) and the label names to
    out_dir/classes.txt; returns the shard paths.
    Each shard is written to a temporary name and renamed, so an interrupted export never leaves a broken shard."""
    n = len(world) - start if n is None else int(n)
    if n <= 0 or shard_size <= 0:
        raise ValueError(f"export_shards: n={n}, shard_size={shard_size}; expected positive ints")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:  # label i = line i, as real datasets ship it
        f.write("".join(c + "\n" for c in SHAPES))
    paths = []
    if progress is None:
        progress = n >= 5000
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"export {world.split}", leave=False, mininterval=1.0)
    for si, a in enumerate(range(0, n, shard_size)):
        path = os.path.join(out_dir, f"shard-{si:06d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for j in range(a, min(n, a + shard_size)):
                for name, data in sample_members(world.sample(start + j), image_format):
                    _add(tf, name, data)
                if bar is not None:
                    bar.update(1)
        os.replace(tmp, path)
        paths.append(path)
    if bar is not None:
        bar.close()
    return paths


# ----------------------------------------------------------------------------------------------------------------
# sample grid and benchmark

def _palette(n):
    rng = np.random.default_rng(7)
    p = (rng.random((n, 3)) * 200 + 55).astype(np.uint8)
    p[0] = 0
    return p


def _wrap(text, width):
    lines, cur = [], ""
    for w in text.split(" "):
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return lines + ([cur] if cur else [])


def make_grid(world, n=8, start=0, cell=128):
    """A PIL image: one row per sample with image | seg | instances | depth | caption + alt-text."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:   # very old Pillow
        font = ImageFont.load_default()
    text_w, pad = 560, 6
    W = 4 * (cell + pad) + text_w + pad
    H = 24 + n * (cell + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    dr = ImageDraw.Draw(canvas)
    for c, title in enumerate(["image", "semantic seg", "instances", "depth (near = dark)"]):
        dr.text((pad + c * (cell + pad), 4), title, fill=(0, 0, 0), font=font)
    dr.text((pad + 4 * (cell + pad), 4), "caption / alt-text (q) / label, year", fill=(0, 0, 0), font=font)
    pal = _palette(256)
    for r in range(n):
        s = world.sample(start + r)
        y = 24 + r * (cell + pad)
        d = s["depth"]
        dn = ((d - d.min()) / max(1e-6, float(d.max() - d.min())) * 255).astype(np.uint8)
        tiles = [s["image"], pal[s["seg"]], pal[(s["instances"].astype(np.int64) * 37) % 256], np.stack([dn] * 3, -1)]
        for c, t in enumerate(tiles):
            im = Image.fromarray(t).resize((cell, cell), Image.NEAREST)
            canvas.paste(im, (pad + c * (cell + pad), y))
        tx, ty = pad + 4 * (cell + pad), y
        lines = _wrap("caption: " + s["caption"], 78) + _wrap(f"alt-text (q={s['quality']:.2f}): " + s["alt_text"], 78)
        lines.append(f"label: {SHAPES[s['label']]}  fine: {class_names('shape_color')[s['label_fine']]}  "
                     f"year: {s['year']}")
        for li, line in enumerate(lines[:8]):
            dr.text((tx, ty + li * 15), line, fill=(0, 0, 80) if li < len(lines) - 1 else (90, 0, 0), font=font)
    return canvas


def bench(size=64, n=2000, repeats=3, seed=0):
    """Time World.sample (full sample: image, masks, depth, both captions) in this process.
    Returns {"wall": [images/s per repeat], "cpu": [images/s of process CPU time per repeat]}; on a shared machine
    the CPU-time rate is what one free core would give."""
    w = World(seed=seed, split="train", size=size)
    w.sample(0)
    wall, cpu = [], []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(1 + r * n, 1 + (r + 1) * n):
            w.sample(i)
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / max(1e-9, time.process_time() - c0))
    return {"wall": wall, "cpu": cpu}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.world", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write webdataset tar shards (KEY.png .txt .json .seg.png .inst.png .depth.npy)")
    e.add_argument("--out", required=True, help="output directory (created)")
    e.add_argument("--n", type=int, default=1000, help="number of samples")
    e.add_argument("--split", default="train", choices=list(SPLITS), help="split (disjoint index streams)")
    e.add_argument("--size", type=int, default=64, help="image side in px (32..256)")
    e.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    e.add_argument("--start", type=int, default=0, help="first sample index")
    e.add_argument("--seed", type=int, default=0, help="world seed")
    e.add_argument("--years", default="", help="comma-separated years to restrict to (default: all)")
    e.add_argument("--no-drift", action="store_true", help="disable concept drift over years")
    e.add_argument("--format", default="png", choices=["png", "jpg"], help="image member format")
    gp = sub.add_parser("grid", help="write a PNG grid of samples: image, seg, instances, depth, both captions")
    gp.add_argument("--out", default="docs/world.png", help="output PNG path")
    gp.add_argument("--n", type=int, default=8, help="number of samples (rows)")
    gp.add_argument("--size", type=int, default=128, help="render size in px")
    gp.add_argument("--seed", type=int, default=0, help="world seed")
    gp.add_argument("--start", type=int, default=0, help="first sample index")
    b = sub.add_parser("bench", help="print images/s of sample generation")
    b.add_argument("--size", type=int, default=64, help="image side in px")
    b.add_argument("--n", type=int, default=2000, help="samples per repeat")
    b.add_argument("--repeats", type=int, default=3, help="number of timed repeats")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        years = [int(y) for y in a.years.split(",") if y.strip()] or None
        w = World(seed=a.seed, split=a.split, size=a.size, years=years, drift=not a.no_drift,
                  n=max(a.start + a.n, 1))
        t0 = time.time()
        paths = export_shards(w, a.out, a.n, a.shard_size, start=a.start, image_format=a.format)
        print(f"wrote {a.n} samples in {len(paths)} shards to {a.out} ({time.time() - t0:.1f}s)")
    elif a.cmd == "grid":
        w = World(seed=a.seed, split="train", size=a.size)
        d = os.path.dirname(a.out)
        if d:
            os.makedirs(d, exist_ok=True)
        make_grid(w, n=a.n, start=a.start, cell=max(a.size, 96)).save(a.out)
        print(f"wrote {a.out}")
    else:
        res = bench(a.size, a.n, a.repeats)
        for k, rates in res.items():
            print(f"world bench {a.size}px ({k} time): " + ", ".join(f"{r:.0f}" for r in rates) +
                  f" images/s (best {max(rates):.0f}, median {sorted(rates)[len(rates) // 2]:.0f})")


if __name__ == "__main__":
    sys.exit(main())
