"""Tests for common/world.py: determinism, annotation consistency, depth vs occlusion, caption quality knob,
concept drift, year restriction, shard export, labels, vocabulary and speed."""
import io
import json
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from common import world as W
from common.world import COLORS, NOUNS, SHAPES, SIZES, TEMPLATES, TEXTURES, YEARS, World, export_shards, load_arrays

KEYS = {"__key__", "image", "caption", "alt_text", "quality", "label", "label_fine", "seg", "instances", "depth",
        "year", "objects"}


@pytest.fixture(scope="module")
def samples():
    w = World(seed=0, split="train", size=64)
    return [w[i] for i in range(300)]


def test_sample_keys_and_types(samples):
    s = samples[0]
    assert KEYS <= set(s)
    assert s["image"].dtype == np.uint8 and s["image"].shape == (64, 64, 3)
    assert s["seg"].dtype == np.uint8 and s["seg"].shape == (64, 64)
    assert s["instances"].dtype == np.uint8 and s["instances"].shape == (64, 64)
    assert s["depth"].dtype == np.float32 and s["depth"].shape == (64, 64)
    assert s["__key__"] == "train-000000000"
    for s in samples[:50]:
        assert isinstance(s["caption"], str) and s["caption"].endswith(".")
        assert isinstance(s["alt_text"], str) and s["alt_text"].strip()
        assert 0.0 <= s["quality"] <= 1.0 and s["year"] in YEARS
        assert 1 <= len(s["objects"]) <= 3
        for o in s["objects"]:
            assert {"shape", "color", "size", "pos", "depth"} <= set(o)
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES
            assert 0 <= o["pos"][0] < 3 and 0 <= o["pos"][1] < 3
        json.dumps(s["objects"])   # JSON-serialisable for the shard .json


def test_determinism_and_sizes():
    a, b = World(seed=3, size=64), World(seed=3, size=64)
    for i in (0, 7, 12345):
        x, y = a[i], b[i]
        for k in ("image", "seg", "instances", "depth"):
            assert np.array_equal(x[k], y[k]), k
        assert (x["caption"], x["alt_text"], x["quality"], x["label"], x["year"]) == \
               (y["caption"], y["alt_text"], y["quality"], y["label"], y["year"])
        assert a.sample(i)["caption"] == x["caption"]   # repeated access, no hidden state
    assert not np.array_equal(World(seed=4)[0]["image"], a[0]["image"])
    # any size 32..256 renders the same scene (geometry is resolution independent)
    ref = World(seed=3, size=64)[5]
    for S in (32, 48, 100, 256):
        s = World(seed=3, size=S)[5]
        assert s["image"].shape == (S, S, 3) and s["seg"].shape == (S, S) and s["depth"].shape == (S, S)
        assert [(o["shape"], o["color"], o["size"], o["pos"]) for o in s["objects"]] == \
               [(o["shape"], o["color"], o["size"], o["pos"]) for o in ref["objects"]]
        assert s["year"] == ref["year"]


def test_splits_disjoint():
    tr, va, te = World(split="train"), World(split="val"), World(split="test")
    assert (len(tr), len(va), len(te)) == (50_000, 5_000, 5_000)
    for i in range(20):
        imgs = [tr[i]["image"], va[i]["image"], te[i]["image"]]
        assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[0], imgs[2])
        assert not np.array_equal(imgs[1], imgs[2])
    assert va[3]["__key__"] == "val-000000003"
    with pytest.raises(IndexError):
        va[5_000]
    assert np.array_equal(va[-1]["image"], va[4_999]["image"])
    with pytest.raises(ValueError, match="split"):
        World(split="dev")


def test_annotation_consistency(samples):
    n_occ = n_multi = 0
    for s in samples:
        seg, inst, objs = s["seg"], s["instances"], s["objects"]
        assert np.array_equal(seg > 0, inst > 0)
        assert inst.max() <= len(objs)
        for k, o in enumerate(objs, 1):
            m = inst == k
            assert int(m.sum()) == o["area"]
            if m.any():
                assert np.all(seg[m] == 1 + SHAPES.index(o["shape"]))
            if o["visible"]:
                assert o["area"] > 0
        vis = [o for o in objs if o["visible"]]
        assert vis
        n_multi += len(vis) > 1
        cap = s["caption"]
        words = set(re.findall(r"[a-z]+", cap))
        # one "a <size>" phrase per visible object, and nothing else is described
        assert len(re.findall(r"\ba (small|medium|large)\b", cap)) == len(vis), cap
        for o in vis:
            assert o["shape"] in words or W.PLURALS[o["shape"]] in words, cap
            assert o["color"] in words and o["size"] in words, cap
        named = {W.NOUN_FORMS[w] for w in words if W.NOUN_FORMS.get(w) in SHAPES}
        assert named == {o["shape"] for o in vis}, cap          # every named shape has visible pixels
        named_c = {w for w in words if w in COLORS}
        assert named_c == {o["color"] for o in vis}, cap
        assert any(f" {t} " in cap for t in TEXTURES)
        n_occ += any(o["occludes"] for o in objs)
    assert n_occ > 20 and n_multi > 50    # the checks above are not vacuous
    # some scenes contain an object hidden (nearly) completely and therefore left out of the caption
    assert sum(not o["visible"] for s in samples for o in s["objects"]) > 0


def test_labels(samples):
    for s in samples:
        vis = [o for o in s["objects"] if o["visible"]]
        main = max(vis, key=lambda o: o["area"])
        assert s["label"] == SHAPES.index(main["shape"])
        assert s["label_fine"] == s["label"] * len(COLORS) + COLORS.index(main["color"])
        assert W.class_names("shape_color")[s["label_fine"]] == f"{main['color']} {main['shape']}"
    labels = np.array([s["label"] for s in samples])
    assert len(np.unique(labels)) >= 8     # all classes in use, none dominating
    assert np.bincount(labels).max() < 0.3 * len(samples)


def test_depth_vs_occlusion_and_ground(samples):
    checked = 0
    for s in samples:
        d, inst, objs = s["depth"], s["instances"], s["objects"]
        for b, ob in enumerate(objs, 1):
            for a in ob["occludes"]:
                assert a < b                                  # painted earlier = behind
                da, db = d[inst == a], d[inst == b]
                if da.size and db.size:
                    assert db.max() < da.min()                # the front object is nearer everywhere
                    checked += 1
        # objects are listed back to front
        z = [o["depth"] for o in objs]
        assert z == sorted(z, reverse=True)
        # sloped ground: background depth grows toward the top (horizon) of the image
        bgm = inst == 0
        ok = bgm.any(1)                               # rows with some background
        rows = (d * bgm).sum(1)[ok] / bgm.sum(1)[ok]
        assert np.all(np.diff(rows) < 0)
    assert checked > 20


def _overlap(alt, cap):
    a = re.findall(r"[a-z]+", alt.lower())
    c = set(re.findall(r"[a-z]+", cap.lower()))
    return sum(w in c for w in a) / max(1, len(a))


def test_quality_knob():
    fill = [f for f in W.FILLERS] + list(W.FILLERS_FROM)
    file_re = re.compile(r"(img_\d|dsc_?\d|image-\d|photo_\d|screenshot|\d{6}\.jpg|untitled-|pic\d)", re.I)
    res = {}
    for q in (0.05, 0.5, 0.95):
        w = World(seed=1, split="val", size=32, quality=q)
        ss = [w[i] for i in range(200)]
        assert all(s["quality"] == q for s in ss)
        ov = np.mean([_overlap(s["alt_text"], s["caption"]) for s in ss])
        junk = np.mean([any(f in s["alt_text"].lower() for f in fill) or bool(file_re.search(s["alt_text"]))
                        for s in ss])
        files = np.mean([bool(file_re.search(s["alt_text"])) for s in ss])
        main = np.mean([SHAPES[s["label"]] in s["alt_text"].lower() for s in ss])
        res[q] = (ov, junk, files, main)
    assert res[0.05][0] < res[0.5][0] < res[0.95][0]
    assert res[0.95][0] > 0.8 and res[0.05][0] < 0.5
    assert res[0.05][1] > 0.8 and res[0.05][2] > 0.4 and res[0.95][1] < 0.3
    # noisy but not useless: the main object is named far more often than chance (1 / len(SHAPES))
    assert res[0.05][3] > 0.3 and res[0.95][3] > 0.9
    # a fixed quality changes only the alt-text, and the default draws q per sample over [0, 1]
    w, wq = World(seed=1, split="val", size=32), World(seed=1, split="val", size=32, quality=0.05)
    assert np.array_equal(w[3]["image"], wq[3]["image"]) and w[3]["caption"] == wq[3]["caption"]
    qs = np.array([w[i]["quality"] for i in range(300)])
    assert 0.35 < qs.mean() < 0.65 and qs.std() > 0.15 and qs.min() < 0.1 and qs.max() > 0.9


def _counts(year, n=250, drift=True):
    w = World(seed=0, split="train", size=32, years=[year], drift=drift)
    shapes, colors = np.zeros(len(SHAPES)), np.zeros(len(COLORS))
    for i in range(n):
        s = w[i]
        assert s["year"] == year
        for o in s["objects"]:
            shapes[SHAPES.index(o["shape"])] += 1
            colors[COLORS.index(o["color"])] += 1
    return shapes, colors


def test_drift_by_year():
    early, early_c = _counts(2014)
    late, late_c = _counts(2022)
    mid, _ = _counts(2017)
    for shape, y in W.SHAPE_INTRO.items():
        assert early[SHAPES.index(shape)] == 0 and late[SHAPES.index(shape)] > 0
        if y > 2017:
            assert mid[SHAPES.index(shape)] == 0
    for color, y in W.COLOR_INTRO.items():
        assert early_c[COLORS.index(color)] == 0 and late_c[COLORS.index(color)] > 0
    pe, pl = early / early.sum(), late / late.sum()
    assert pe[SHAPES.index("circle")] > 2 * pl[SHAPES.index("circle")]
    assert 0.5 * np.abs(pe - pl).sum() > 0.15                 # total-variation distance between years
    # without drift, every concept exists in every year
    nd, ndc = _counts(2014, n=150, drift=False)
    assert nd[SHAPES.index("moon")] > 0 and ndc[COLORS.index("pink")] > 0


def test_years_restriction():
    w = World(seed=0, years=[2016, 2020], n=100)
    ys = [w[i]["year"] for i in range(100)]
    assert set(ys) == {2016, 2020}
    allw = World(seed=0)
    assert set(allw[i]["year"] for i in range(200)) == set(YEARS)
    a, b = World(years=[2015])[0], World(years=[2016])[0]
    assert not np.array_equal(a["image"], b["image"]) and a["__key__"] != b["__key__"]
    assert World(years=[2015]).year_of(3) == 2015
    with pytest.raises(ValueError, match="years"):
        World(years=[2013])


def test_class_names_templates_nouns(samples):
    assert W.class_names("shape") == SHAPES and World().class_names() == SHAPES
    assert len(SHAPES) >= 8 and len(COLORS) >= 8 and len(SIZES) == 3 and len(TEXTURES) >= 4
    assert YEARS == list(range(2014, 2023))
    assert len(W.class_names("shape_color")) == len(SHAPES) * len(COLORS)
    with pytest.raises(ValueError, match="task"):
        W.class_names("animal")
    assert all("{}" in t for t in TEMPLATES) and len(TEMPLATES) >= 4
    assert set(SHAPES) <= set(NOUNS) and "background" in NOUNS
    assert W.NOUN_FORMS["crosses"] == "cross" and W.NOUN_FORMS["circles"] == "circle"
    # every caption word is either a known noun form or a known non-noun
    non_nouns = set(COLORS) | set(SIZES) | set(TEXTURES) | {"a", "at", "the", "on", "in", "of", "over", "and", "to",
                                                            "behind", "above", "below", "two", "three", "one"}
    plural_seen = False
    for s in samples:
        for wd in re.findall(r"[a-z]+", s["caption"]):
            assert wd in W.NOUN_FORMS or wd in non_nouns, (wd, s["caption"])
            plural_seen |= wd in W.PLURALS.values()
    assert plural_seen


def test_load_arrays():
    w = World(seed=2, split="test", size=32)
    d = load_arrays(w, 10, start=5)
    assert d["images"].shape == (10, 32, 32, 3) and d["images"].dtype == np.uint8
    assert d["seg"].shape == (10, 32, 32) and d["depth"].dtype == np.float32
    for k in ("labels", "label_fine", "year", "quality"):
        assert d[k].shape == (10,)
    assert len(d["captions"]) == len(d["alt_texts"]) == 10
    s = w[7]
    assert np.array_equal(d["images"][2], s["image"]) and d["captions"][2] == s["caption"]
    assert d["labels"][2] == s["label"] and np.array_equal(d["depth"][2], s["depth"])


def test_export_round_trip(tmp_path):
    w = World(seed=0, split="val", size=32)
    paths = export_shards(w, str(tmp_path), n=5, shard_size=2)
    assert [p.split("/")[-1] for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
        k = w[0]["__key__"]
        assert names[:6] == [f"{k}.png", f"{k}.txt", f"{k}.json", f"{k}.seg.png", f"{k}.inst.png", f"{k}.depth.npy"]
        assert len(names) == 12
        s = w[0]
        img = np.array(Image.open(io.BytesIO(tf.extractfile(f"{k}.png").read())))
        assert np.array_equal(img, s["image"])
        assert np.array_equal(np.array(Image.open(io.BytesIO(tf.extractfile(f"{k}.seg.png").read()))), s["seg"])
        assert np.array_equal(np.array(Image.open(io.BytesIO(tf.extractfile(f"{k}.inst.png").read()))),
                              s["instances"])
        assert np.array_equal(np.load(io.BytesIO(tf.extractfile(f"{k}.depth.npy").read())), s["depth"])
        assert tf.extractfile(f"{k}.txt").read().decode() == s["caption"]
        meta = json.loads(tf.extractfile(f"{k}.json").read())
        assert meta["alt_text"] == s["alt_text"] and meta["label"] == s["label"] and meta["year"] == s["year"]
        assert meta["label_fine"] == s["label_fine"] and meta["quality"] == s["quality"]
        assert meta["objects"] == s["objects"]
    with tarfile.open(paths[2]) as tf:
        assert len(tf.getnames()) == 6
    assert not list(tmp_path.glob("*.tmp"))


def test_cli(tmp_path, repo_root):
    r = subprocess.run([sys.executable, "-m", "common.world", "--help"], cwd=repo_root, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "export" in r.stdout and "grid" in r.stdout and "bench" in r.stdout
    r = subprocess.run([sys.executable, "-m", "common.world", "export", "--out", str(tmp_path / "sh"), "--n", "3",
                        "--split", "test", "--size", "32", "--shard-size", "2"], cwd=repo_root, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "sh").iterdir()) == ["classes.txt", "shard-000000.tar",
                                                                   "shard-000001.tar"]
    assert (tmp_path / "sh" / "classes.txt").read_text().split("\n")[:2] == ["circle", "square"]  # label i = line i
    r = subprocess.run([sys.executable, "-m", "common.world", "grid", "--out", str(tmp_path / "g.png"), "--n", "2",
                        "--size", "64"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "g.png").size[0] > 400


def test_speed():
    """>= 300 images/s at 64 px (lenient: the CI CPU is shared). CPU time is used so that other processes on the
    machine do not make the test flaky; the best of three runs counts."""
    w = World(seed=0, size=64)
    w.sample(0)
    best = 0.0
    for r in range(3):
        t0 = time.process_time()
        for i in range(300):
            w.sample(1 + r * 300 + i)
        best = max(best, 300 / max(1e-9, time.process_time() - t0))
    assert best >= 300, f"world renders {best:.0f} images/s at 64 px, expected >= 300"


def test_shapes_fit_box_and_differ():
    """Each implicit shape lies inside its radius box (so painting inside the bounding box never clips it) and the
    shapes are pairwise distinct (IoU of the unit masks < 0.85)."""
    c = np.linspace(-1.3, 1.3, 131, dtype=np.float32)
    u, v = c[None], c[:, None]
    rr = u * u + v * v
    out = np.maximum(np.abs(u), np.abs(v)) > 1.03
    masks = []
    for name, f in zip(SHAPES, W.SHAPE_FNS):
        m = f(u, v, rr) < 0
        assert not (m & out).any(), name
        assert m.mean() > 0.12, name
        masks.append(m)
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (SHAPES[i], SHAPES[j], iou)
