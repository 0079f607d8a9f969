"""common.data: url expansion, tar-shard decoding and round trip, the Stream's rank x worker split, shuffling,
endless epochs, exact resume, corrupt-data skipping, folders, held-out splits without leakage, provenance."""
import glob
import io
import itertools
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from common.data import (FolderSource, SampleSource, ShardSource, Stream, WorldSource, Zip, class_names_of, collate,
                         data_report, decode_npy, expand_urls, for_each_shard, iter_samples, key_split, open_source,
                         read_samples, split_name)


# ----------------------------------------------------------------------------------------------------------------
# fixtures: tiny hand-written shards in the world's export layout


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def _npy(a):
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _sample(k):
    """The sample dict that key k stands for (what the loader must give back)."""
    r = np.random.default_rng(k)
    return {
        "__key__": f"s-{k:06d}",
        "image": r.integers(0, 256, (6, 7, 3), dtype=np.uint8),
        "caption": f"a red circle number {k}",
        "alt_text": f"IMG_{k}.jpg circle",
        "quality": 0.25 * (k % 4),
        "label": k % 5,
        "label_fine": k,
        "year": 2014 + k % 9,
        "objects": [{"shape": "circle", "color": "red", "size": "small", "pos": [1, 2], "depth": 0.5}],
        "seg": r.integers(0, 9, (6, 7), dtype=np.uint8),
        "instances": r.integers(0, 3, (6, 7), dtype=np.uint8),
        "depth": r.random((6, 7)).astype(np.float32),
    }


def _write_sample(tf, s, skip=(), broken=()):
    k = s["__key__"]
    members = {
        "png": _png(s["image"]),
        "txt": s["caption"].encode(),
        "json": json.dumps({f: s[f] for f in ("alt_text", "quality", "label", "label_fine", "year",
                                              "objects")}).encode(),
        "seg.png": _png(s["seg"]),
        "inst.png": _png(s["instances"]),
        "depth.npy": _npy(s["depth"]),
    }
    for ext, data in members.items():
        if ext in skip:
            continue
        _add(tf, f"{k}.{ext}", b"\x89PNG not really an image" if ext in broken else data)


def _write_shards(d, n_shards, per_shard, name="shard"):
    os.makedirs(d, exist_ok=True)
    paths, k = [], 0
    for i in range(n_shards):
        p = os.path.join(d, f"{name}-{i:03d}.tar")
        with tarfile.open(p, "w") as tf:
            for _ in range(per_shard):
                _write_sample(tf, _sample(k))
                k += 1
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def shards6(tmp_path_factory):
    """6 shards x 5 samples = 30 samples, keys s-000000 .. s-000029."""
    d = str(tmp_path_factory.mktemp("shards6"))
    _write_shards(d, 6, 5)
    return d


@pytest.fixture(scope="module")
def shards2(tmp_path_factory):
    """2 shards x 7 samples (fewer shards than 2 ranks x 2 workers)."""
    d = str(tmp_path_factory.mktemp("shards2"))
    _write_shards(d, 2, 7)
    return d


def _keys(src, **kw):
    """Keys of one natural-order pass."""
    return [s["__key__"] for s in iter_samples(src, **kw)]


class _D:  # the fields of common.train.Dist that a Stream reads
    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size, self.device, self.distributed, self.is_master = rank, world_size, "cpu", False, True


def _stream_keys(src, steps, B, rank=0, world=1, K=0, **kw):
    st = Stream(src, B, None, num_workers=K, dist=_D(rank, world), **kw)
    return [k for i in range(steps) for k in st(i)["__key__"]]


# ----------------------------------------------------------------------------------------------------------------
# expand_urls


def test_expand_braces_and_lists(tmp_path):
    for a in ("x", "y"):
        for i in range(12):
            (tmp_path / f"{a}-{i:03d}.tar").write_bytes(b"")
    got = expand_urls(str(tmp_path / "x-{000..011}.tar"))
    assert got == [str(tmp_path / f"x-{i:03d}.tar") for i in range(12)]
    got = expand_urls(str(tmp_path / "{x,y}-{008..010}.tar"))  # two braces: list x zero-padded range
    assert [os.path.basename(p) for p in got] == ["x-008.tar", "x-009.tar", "x-010.tar",
                                                  "y-008.tar", "y-009.tar", "y-010.tar"]
    got = expand_urls(str(tmp_path / "x-{000..001}.tar") + "::" + str(tmp_path / "y-011.tar"))
    assert [os.path.basename(p) for p in got] == ["x-000.tar", "x-001.tar", "y-011.tar"]
    assert expand_urls(str(tmp_path)) == sorted(str(p) for p in tmp_path.glob("*.tar"))  # directory
    assert len(expand_urls([str(tmp_path / "x-000.tar"), str(tmp_path / "y-*.tar")])) == 13


def test_expand_errors_name_the_path(tmp_path):
    (tmp_path / "s-000.tar").write_bytes(b"")
    pat = str(tmp_path / "s-{000..002}.tar")
    with pytest.raises(FileNotFoundError, match="s-001.tar"):
        expand_urls(pat)  # one missing shard of three is an error naming it
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_urls(str(tmp_path / "nope" / "a.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        expand_urls(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        open_source(str(tmp_path / "does-not-exist-{0..3}.tar"))


def test_decode_npy_fast_path_and_no_pickle():
    arrs = [np.random.default_rng(0).random((5, 7)).astype(np.float32), np.arange(6, dtype=">i8").reshape(2, 3),
            np.asfortranarray(np.random.default_rng(1).random((3, 4))), np.zeros((0, 3)), np.array(3.5),
            np.zeros(2, dtype=[("a", "<f4"), ("b", "<i2")])]
    for a in arrs:
        d = decode_npy(_npy(a))
        assert d.dtype == a.dtype and d.shape == a.shape and np.array_equal(d, a) and d.flags.writeable
    b = io.BytesIO()
    np.save(b, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_npy(b.getvalue())


def test_split_name():
    assert split_name("a/b/000123.seg.png") == ("a/b/000123", "seg.png")
    assert split_name("k.depth.npy") == ("k", "depth.npy")
    assert split_name("README") is None
    assert split_name("./x/k.txt") == ("x/k", "txt") and split_name("./k.txt") == ("k", "txt")


# ----------------------------------------------------------------------------------------------------------------
# decoding / round trip


def _assert_same(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def test_shard_decode_exact(shards6):
    got = list(iter_samples(ShardSource(shards6)))
    assert [s["__key__"] for s in got] == [f"s-{k:06d}" for k in range(30)]  # file order without shuffling
    for k, s in enumerate(got):
        _assert_same(s, _sample(k))


def test_world_export_round_trip(tmp_path):
    world = pytest.importorskip("common.world")
    if not hasattr(world, "export_shards"):
        pytest.skip("common.world.export_shards not available yet")
    w = world.World(seed=3, split="val", size=32)
    paths = world.export_shards(w, str(tmp_path), 12, shard_size=5)
    assert len(paths) == 3
    got = {s["__key__"]: s for s in iter_samples(ShardSource(str(tmp_path)))}
    assert len(got) == 12
    for i in range(12):
        ref = w[i]
        s = got[ref["__key__"]]
        assert set(s) == set(ref)
        for k in ref:
            if isinstance(ref[k], np.ndarray):
                assert s[k].dtype == ref[k].dtype and s[k].shape == ref[k].shape, k
                np.testing.assert_array_equal(s[k], ref[k], err_msg=k)
            elif isinstance(ref[k], float):
                assert s[k] == pytest.approx(ref[k], abs=0), k
            else:
                assert json.loads(json.dumps(ref[k])) == s[k], k
    # and through open_source with a brace pattern; the export names its classes
    src = open_source(str(tmp_path / "shard-{000000..000002}.tar"))
    assert isinstance(src, ShardSource) and len(_keys(src)) == 12
    assert class_names_of(src) == world.SHAPES


def test_caption_from_json_and_cls_and_extras(tmp_path):
    p = tmp_path / "a.tar"
    img = np.zeros((4, 4, 3), np.uint8)
    with tarfile.open(p, "w") as tf:
        _add(tf, "k1.jpg", _png(img))  # PNG bytes under .jpg: PIL sniffs the format
        _add(tf, "k1.json", json.dumps({"caption": "from json", "x": 1}).encode())
        _add(tf, "k1.cls", b"7\n")
        _add(tf, "k1.emb.npy", _npy(np.arange(3, dtype=np.float32)))
        _add(tf, "k2.webp", _webp(img))
        _add(tf, "k2.txt", b"from txt")
        _add(tf, "k2.json", json.dumps({"caption": "ignored", "label": 3}).encode())
    s1, s2 = list(iter_samples(ShardSource(str(p), require=("image", "caption"))))
    assert s1["caption"] == "from json" and s1["x"] == 1 and s1["label"] == 7
    assert isinstance(s1["emb.npy"], bytes)  # unknown members: raw bytes under their extension
    assert s2["caption"] == "from txt" and s2["label"] == 3 and s2["image"].shape == (4, 4, 3)


def _webp(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "WEBP", lossless=True)
    return b.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# the stream: rank x worker split, shuffling, endless epochs


@pytest.mark.parametrize("fixture,n", [("shards6", 30), ("shards2", 14)])
def test_rank_worker_split_exactly_once(fixture, n, request):
    """2 ranks x 2 workers read every sample exactly once per epoch (whole shards, then left-overs by sample)."""
    src = ShardSource(request.getfixturevalue(fixture))
    per = [_stream_keys(src, steps=n // 2 // 1, B=1, rank=r, world=2, K=2, shuffle_buffer=0) for r in range(2)]
    assert set(per[0]).isdisjoint(per[1])
    assert Counter(per[0] + per[1]) == Counter(f"s-{k:06d}" for k in range(n))


def test_world_stream_epochs_cover_and_reshuffle():
    src = WorldSource(__import__("common.world", fromlist=["World"]).World(0, "train", 32), n=12, cache=True)
    k = _stream_keys(src, steps=6, B=4)  # two epochs of 12
    assert sorted(k[:12]) == sorted(k[12:]) == [f"train-{i:09d}" for i in range(12)]
    assert k[:12] != k[12:]  # a fresh permutation each epoch
    assert _stream_keys(src, steps=6, B=4) == k  # deterministic in the seed
    assert _stream_keys(src, steps=6, B=4, seed=1) != k
    inf = WorldSource(src.world)  # unbounded: consumer c renders c, c + T, ...
    assert _stream_keys(inf, 2, 3, rank=1, world=2) == [f"train-{i:09d}" for i in (1, 3, 5, 7, 9, 11)]


def test_shuffle_buffer_and_shard_order(shards6):
    src = ShardSource(shards6)
    base = [f"s-{k:06d}" for k in range(30)]
    e = _stream_keys(src, 10, 6, shuffle_buffer=8)
    assert sorted(e[:30]) == base and e[:30] != base and e[30:] != e[:30]
    assert _stream_keys(src, 5, 6, shuffle=False) == base  # no shuffling: file order


def test_stream_transform_gets_per_sample_generator(shards6):
    """Augmentation randomness depends on (seed, consumer, sample count): two ranks draw different values."""
    def tf(s, g):
        return {"u": torch.rand(1, generator=g)}
    a = Stream(ShardSource(shards6), 4, tf, dist=_D(0, 2))(0)["u"]
    b = Stream(ShardSource(shards6), 4, tf, dist=_D(1, 2))(0)["u"]
    c = Stream(ShardSource(shards6), 4, tf, dist=_D(0, 2))(0)["u"]
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.parametrize("K", [0, 2])
def test_stream_state_resumes_exactly(shards6, K):
    """state_dict after step s + load_state_dict in a new Stream = the same batches, with 0 or 2 workers, at
    checkpoint steps that are and are not multiples of the worker count, across an epoch boundary."""
    def tf(s, g):
        return {"x": torch.from_numpy(s["image"]).float().mean() + torch.rand((), generator=g)}
    src = ShardSource(shards6)
    ref = Stream(src, 4, tf, num_workers=K, shuffle_buffer=5)
    full = [ref(i) for i in range(12)]  # 48 samples: crosses the 30-sample epoch
    for s in (3, 8):
        a = Stream(src, 4, tf, num_workers=K, shuffle_buffer=5)
        for i in range(s):
            a(i)
        b = Stream(src, 4, tf, num_workers=K, shuffle_buffer=5)
        b.load_state_dict(a.state_dict())
        rest = [b(i) for i in range(s, 12)]
        assert [r["__key__"] for r in rest] == [f["__key__"] for f in full[s:]]
        assert all(torch.equal(r["x"], f["x"]) for r, f in zip(rest, full[s:]))
        assert b.seen == ref.seen and np.array_equal(b.unique_keys(), ref.unique_keys())
    with pytest.raises(ValueError, match="workers"):
        Stream(src, 4, tf, num_workers=K + 1).load_state_dict(ref.state_dict())
    with pytest.raises(RuntimeError, match="step"):
        Stream(src, 4, tf, num_workers=K)(3)


# ----------------------------------------------------------------------------------------------------------------
# corrupt data


def test_corrupt_samples_skipped_and_counted(tmp_path):
    p = tmp_path / "bad-000.tar"
    with tarfile.open(p, "w") as tf:
        _write_sample(tf, _sample(0))
        _write_sample(tf, _sample(1), broken=("png",))  # undecodable image
        _write_sample(tf, _sample(2), skip=("txt",))  # missing caption
        _write_sample(tf, _sample(3), skip=("png",))  # missing image
        _write_sample(tf, _sample(4), broken=("seg.png",))  # corrupt annotation
        e = _sample(6)
        e["caption"] = "  "
        _write_sample(tf, e)  # empty caption
        _write_sample(tf, _sample(5))
    src = ShardSource(str(p), require=("image", "caption"))
    got = read_samples(src)
    assert [s["__key__"] for s in got] == ["s-000000", "s-000005"]
    assert got.skipped == Counter(bad_image=1, missing_caption=1, missing_image=1, bad_seg_png=1, empty_caption=1)
    st = Stream(src, 2, None, shuffle=False, num_workers=0)
    assert st(0)["__key__"] == ["s-000000", "s-000005"]
    assert st.skipped() == dict(got.skipped)
    rep = data_report([st], [got])
    assert rep["skipped_corrupt"] == 10 and rep["skipped_by_reason"]["empty_caption"] == 2
    # caption not required -> the caption-less sample is kept
    assert "s-000002" in _keys(ShardSource(str(p), require=("image",)))


def test_corrupt_and_truncated_shards(tmp_path):
    _write_shards(str(tmp_path), 3, 4)
    good = (tmp_path / "shard-001.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(good[:len(good) // 2 + 100])  # truncated mid-member
    (tmp_path / "shard-002.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.warns(RuntimeWarning, match="shard-00"):
        got = read_samples(ShardSource(str(tmp_path)))
    keys = [s["__key__"] for s in got]
    assert keys[:4] == [f"s-{k:06d}" for k in range(4)]  # the intact shard fully
    assert 4 <= len(keys) < 8 and len(set(keys)) == len(keys)  # part of the truncated one, never a crash
    assert got.skipped["bad_shard"] == 2
    st = Stream(ShardSource(str(tmp_path)), 2, None, num_workers=2, shuffle=False)  # inside workers too
    ks = [k for i in range(8) for k in st(i)["__key__"]]
    assert set(ks) <= set(keys) and st.skipped()["bad_shard"] >= 1


def test_stream_with_no_usable_sample_raises(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"junk" * 200)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no usable sample"):
        Stream(ShardSource(str(tmp_path / "x.tar")), 2, None, num_workers=0)(0)


# ----------------------------------------------------------------------------------------------------------------
# folders


def _jpg(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG")
    return b.getvalue()


def test_image_folder(tmp_path):
    for c, name in enumerate(["cat", "ant", "bee"]):
        (tmp_path / name).mkdir()
        for j in range(2):
            (tmp_path / name / f"{j}.jpg").write_bytes(_jpg(np.full((5, 6, 3), 40 * c, np.uint8)))
    (tmp_path / "bee" / "1.jpg").write_bytes(b"garbage")  # corrupt
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ant" / "gray.png")        # grayscale
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(tmp_path / "ant" / "rgba.png")  # alpha
    src = FolderSource(str(tmp_path))
    assert src.classes == ["ant", "bee", "cat"] and len(src) == 8 and class_names_of(src) == ["ant", "bee", "cat"]
    got = read_samples(src)
    assert got.skipped == Counter(bad_image=1) and len(got) == 7
    by = {s["__key__"]: s for s in got}
    assert by["ant/0"]["label"] == 0 and by["cat/1"]["label"] == 2 and by["ant/0"]["image"].shape == (5, 6, 3)
    assert by["ant/gray"]["image"].shape == (4, 4, 3) and by["ant/rgba"]["image"].shape == (4, 4, 3)
    assert [s["__key__"] for s in got] != sorted(by)  # natural order is not class-sorted


def test_caption_folder(tmp_path):
    for j in range(3):
        (tmp_path / f"{j}.png").write_bytes(_png(np.full((4, 4, 3), j, np.uint8)))
    (tmp_path / "2.png").write_bytes(b"broken")
    lines = [{"file": "0.png", "caption": "zero", "year": 2015}, {"file": "1.png", "caption": "one"},
             {"file": "2.png", "caption": "two"}, {"file": "missing.png", "caption": "gone"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    src = FolderSource(str(tmp_path))
    assert len(src) == 3 and src.skipped == Counter(missing_file=1, bad_line=1)
    got = {s["__key__"]: s for s in read_samples(src)}
    assert set(got) == {"0", "1"} and set(got["0"]) == {"image", "caption", "__key__", "year"}
    assert (got["0"]["caption"], got["0"]["year"]) == ("zero", 2015)


# ----------------------------------------------------------------------------------------------------------------
# splits without leakage


def test_holdout_splits_are_disjoint_and_stable(shards6, tmp_path):
    """A single --data stream: train, val and test come from disjoint key-hash ranges, whatever the rank, worker
    or number of epochs; train never wraps into eval."""
    pat = os.path.join(shards6, "shard-{000..005}.tar")
    tr, va, te = (open_source(pat, sp, holdout=0.2) for sp in ("train", "val", "test"))
    k_tr = set(_stream_keys(tr, 20, 3, rank=0, world=2, K=2)) | set(_stream_keys(tr, 20, 3, rank=1, world=2))
    k_va, k_te = set(_keys(va)), set(_keys(te))
    assert k_tr | k_va | k_te == {f"s-{k:06d}" for k in range(30)}
    assert not (k_tr & k_va) and not (k_tr & k_te) and not (k_va & k_te) and k_te and k_va
    assert all(key_split(k, 0.2) == "test" for k in k_te)
    ev = read_samples(te)
    st = Stream(tr, 3, None)
    for i in range(20):  # several epochs of the training keys
        st(i)
    rep = data_report([st], [ev])
    assert rep["eval_keys_in_train"] == 0 and rep["eval_samples"] == len(k_te)
    assert rep["train_unique_keys"] == len(k_tr) and rep["train_samples_seen"] == 60
    # the bad way this replaced: with the eval set drawn from the training stream the count is not 0
    leak = SampleSource([{"__key__": k} for k in sorted(k_tr)[:3]])
    assert data_report([st], [read_samples(leak, 3)])["eval_keys_in_train"] == 3
    with pytest.raises(ValueError, match="holdout"):
        open_source(pat, "test")  # no {split}, no --val_data, no holdout: refused, never a slice


def test_folder_holdout_is_per_class(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        for j in range(10):
            (tmp_path / name / f"{j}.png").write_bytes(_png(np.zeros((2, 2, 3), np.uint8)))
    tr, te = open_source(str(tmp_path), "train", holdout=0.2), open_source(str(tmp_path), "test", holdout=0.2)
    ytr, yte = Counter(s["label"] for s in read_samples(tr)), Counter(s["label"] for s in read_samples(te))
    assert ytr == {0: 6, 1: 6, 2: 6} and yte == {0: 2, 1: 2, 2: 2}
    assert not set(_keys(tr)) & set(_keys(te))


def test_open_source_dispatch(tmp_path, shards6):
    assert isinstance(open_source(shards6), ShardSource)
    src = open_source(os.path.join(shards6, "shard-{000..001}.tar") + "::" + os.path.join(shards6, "shard-005.tar"))
    assert len(src.urls) == 3
    for split in ("train", "val"):
        _write_shards(str(tmp_path / "sp" / split), 1, 2, name=split)
    assert open_source(str(tmp_path / "sp" / "{split}"), "val").urls == [str(tmp_path / "sp" / "val" / "val-000.tar")]
    v = open_source(shards6, "test", val_data=str(tmp_path / "sp" / "val"))
    assert v.urls == [str(tmp_path / "sp" / "val" / "val-000.tar")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        open_source(str(tmp_path / "no-such-dir"))
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        class_names_of(ShardSource(shards6))


def test_for_each_shard_resumes_per_shard(shards6, tmp_path):
    calls = []

    def fn(samples):
        for s in samples:
            calls.append(s["__key__"])
            yield s["__key__"], {"cls": str(s["label"]).encode()}

    out = str(tmp_path / "out")
    paths = for_each_shard(ShardSource(shards6), out, fn)
    assert len(paths) == 6 and len(calls) == 30
    os.remove(paths[2])
    calls.clear()
    for_each_shard(ShardSource(shards6), out, fn)
    assert calls == [f"s-{k:06d}" for k in range(10, 15)]  # only the missing shard is rebuilt
    back = read_samples(ShardSource(out + "/*.tar", require=()))
    assert [s["label"] for s in back] == [k % 5 for k in range(30)]


def test_collate():
    ss = [_sample(0), _sample(1)]
    b = collate(ss)
    assert b["image"].shape == (2, 6, 7, 3) and b["seg"].dtype == torch.uint8
    assert b["quality"].dtype == torch.float32 and b["year"].tolist() == [2014, 2015]
    assert b["caption"] == [ss[0]["caption"], ss[1]["caption"]] and isinstance(b["objects"], list)
    assert set(collate(ss, keys=("image", "label"))) == {"image", "label"}
    with pytest.raises(KeyError, match="nope"):
        collate(ss, keys=("nope",))
    assert isinstance(collate([{"a": np.zeros(2)}, {"a": np.zeros(3)}])["a"], list)


DDP_REPORT = """
import json, sys, torch
from common.train import setup_distributed
from common.data import ShardSource, Stream, data_report, open_source, read_samples
dist = setup_distributed("cpu")
pat, out = sys.argv[1], sys.argv[2]
st = Stream(open_source(pat, "train", holdout=0.2), 2, None, num_workers=2, dist=dist)
for i in range(2):
    st(i)
ev = [read_samples(open_source(pat, "test", holdout=0.2))] if dist.is_master else []
rep = data_report([st], ev, dist)
class Same:  # the bug this guards against: every rank reading as rank 0
    rank, world_size, device = 0, 2, "cpu"
same = Stream(open_source(pat, "train", holdout=0.2), 2, None, num_workers=0, dist=Same())
for i in range(2):
    same(i)
rep["same_on_both"] = data_report([same], [], dist)["train_keys_on_several_ranks"]
json.dump(rep, open(out + f"/rep{dist.rank}.json", "w"))
dist.cleanup()
"""


def test_data_report_two_gloo_ranks(tmp_path):
    """2 ranks x 2 workers: the collective report sums per-rank counts, finds no key on both ranks within an
    epoch, and checks rank 0's eval keys against every rank's training keys."""
    import subprocess
    import sys
    (tmp_path / "r.py").write_text(DDP_REPORT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    _write_shards(str(tmp_path / "d"), 4, 10)  # a whole shard per consumer (2 ranks x 2 workers)
    pat = str(tmp_path / "d" / "shard-{000..003}.tar")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "r.py"), pat, str(tmp_path)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rep{r}.json")) for r in range(2))
    assert r0 == r1  # every rank gets the same block
    assert r0["train_samples_seen"] == 8 and r0["train_unique_keys"] == 8
    assert r0["train_keys_on_several_ranks"] == 0 and r0["eval_keys_in_train"] == 0
    assert r0["same_on_both"] == 4  # and the count does see ranks that read the same samples
    assert r0["eval_samples"] == sum(key_split(f"s-{k:06d}", 0.2) == "test" for k in range(40)) > 0


def test_zip_of_streams_resumes_both(shards6, tmp_path):
    _write_shards(str(tmp_path / "b"), 2, 5, name="b")
    mk = lambda: Zip(Stream(ShardSource(shards6), 3, None, num_workers=0),  # noqa: E731
                     Stream(ShardSource(str(tmp_path / "b")), 2, None, num_workers=0))
    ref = mk()
    full = [ref(i) for i in range(8)]
    a = mk()
    for i in range(5):
        a(i)
    b = mk()
    b.load_state_dict(a.state_dict())
    for i in range(5, 8):
        x, y = b(i)
        assert x["__key__"] == full[i][0]["__key__"] and y["__key__"] == full[i][1]["__key__"]


def test_val_data_halves(shards6, tmp_path):
    _write_shards(str(tmp_path / "v"), 2, 10, name="v")
    te = set(_keys(open_source(shards6, "test", val_data=str(tmp_path / "v"), holdout=0.05)))
    va = set(_keys(open_source(shards6, "val", val_data=str(tmp_path / "v"), holdout=0.05)))
    assert te | va == {f"s-{k:06d}" for k in range(20)} and not te & va  # the two halves, whatever --holdout
    assert len(_keys(open_source(shards6, "train", val_data=str(tmp_path / "v"), holdout=0.05))) == 30


def test_for_each_shard_fingerprint_rebuilds_on_change(shards6, tmp_path):
    from common.train import stage_current
    n = []

    def fn(samples):
        for s in samples:
            n.append(1)
            yield s["__key__"], {"txt": b"x"}

    out = str(tmp_path / "o")
    for_each_shard(ShardSource(shards6), out, fn, fingerprint={"k": 1})
    assert stage_current(out, {"k": 1}) and len(n) == 30
    for_each_shard(ShardSource(shards6), out, fn, fingerprint={"k": 1})
    assert len(n) == 30  # current: nothing rebuilt
    for_each_shard(ShardSource(shards6), out, fn, fingerprint={"k": 2})
    assert len(n) == 60 and stage_current(out, {"k": 2}) and not stage_current(out, {"k": 1})


def test_for_each_shard_fingerprint_resumes_a_killed_build(shards6, tmp_path):
    from common.train import stage_current
    out, n = str(tmp_path / "o"), []

    def boom(samples):
        for s in samples:
            if len(n) == 12:
                raise KeyboardInterrupt  # killed after two full shards of five and part of the third
            n.append(1)
            yield s["__key__"], {"txt": b"x"}

    with pytest.raises(KeyboardInterrupt):
        for_each_shard(ShardSource(shards6), out, boom, fingerprint={"k": 1})
    assert not stage_current(out, {"k": 1}) and len(glob.glob(out + "/part-*.tar")) == 2
    n.clear()
    for_each_shard(ShardSource(shards6), out, lambda ss: ((s["__key__"], {"txt": b"x"}) for s in ss if not n.append(1)),
                   fingerprint={"k": 1})
    assert len(n) == 20 and stage_current(out, {"k": 1})  # the two finished shards were kept
