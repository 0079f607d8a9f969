"""common.data: url expansion, tar-shard decoding and round trip, rank/worker split, shuffling, epoch length,
resampling, corrupt-data skipping, folder datasets, make_dataset / make_loader / collate."""
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
from torch.utils.data import DataLoader, Dataset

from common.data import (CaptionFolder, ImageFolder, ShardDataset, collate, decode_npy, expand_urls, make_dataset,
                         make_loader, split_name)


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


def _keys(ds_or_loader):
    out = []
    for b in ds_or_loader:
        out += b["__key__"] if isinstance(b["__key__"], list) else [b["__key__"]]
    return out


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
        ShardDataset(str(tmp_path / "does-not-exist-{0..3}.tar"))


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
    got = list(ShardDataset(shards6))
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
    got = {s["__key__"]: s for s in ShardDataset(str(tmp_path))}
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
    # and through make_dataset with a brace pattern
    base = os.path.basename(paths[0])  # e.g. shard-000000.tar
    digits = "".join(c for c in base if c.isdigit())
    ds = make_dataset(str(tmp_path / base.replace(digits, "{" + digits + ".." + str(2).zfill(len(digits)) + "}")))
    assert isinstance(ds, ShardDataset) and len(list(ds)) == 12


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
    s1, s2 = list(ShardDataset(str(p), require=("image", "caption")))
    assert s1["caption"] == "from json" and s1["x"] == 1 and s1["label"] == 7
    assert isinstance(s1["emb.npy"], bytes)  # unknown members: raw bytes under their extension
    assert s2["caption"] == "from txt" and s2["label"] == 3 and s2["image"].shape == (4, 4, 3)


def _webp(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "WEBP", lossless=True)
    return b.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# rank x worker split


def _two_ranks(d, **kw):
    """Keys seen by each (rank) with a real DataLoader of 2 workers per rank."""
    out = []
    for rank in range(2):
        ds = ShardDataset(d, rank=rank, world_size=2, **kw)
        out.append(_keys(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)))
    return out


@pytest.mark.parametrize("fixture,n", [("shards6", 30), ("shards2", 14)])
def test_rank_worker_split_exactly_once(fixture, n, request):
    d = request.getfixturevalue(fixture)
    r0, r1 = _two_ranks(d)
    allk = r0 + r1
    assert len(allk) == n and Counter(allk) == Counter(f"s-{k:06d}" for k in range(n))
    assert set(r0).isdisjoint(r1) and len(r0) == len(r1) == n // 2  # balanced ranks (left-over shards by sample)


def test_rank_split_with_shuffle_and_env(shards2, monkeypatch):
    allk = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        allk += _keys(ShardDataset(shards2, shuffle_buffer=4, seed=1))  # env decides the rank
    assert sorted(allk) == [f"s-{k:06d}" for k in range(14)]


def test_shuffle_buffer_permutes(shards6):
    base = _keys(ShardDataset(shards6))
    ds = ShardDataset(shards6, shuffle_buffer=8, seed=0)
    e0 = _keys(ds)
    ds.set_epoch(1)
    e1 = _keys(ds)
    assert e0 != base and e1 != e0
    assert sorted(e0) == sorted(e1) == sorted(base)
    assert _keys(ShardDataset(shards6, shuffle_buffer=8, seed=0)) == e0  # deterministic in (seed, epoch)


def test_epoch_length_and_resample(shards6):
    ds = ShardDataset(shards6, epoch_length=12)
    assert len(ds) == 12 and len(_keys(ds)) == 12
    ds = ShardDataset(shards6, epoch_length=45, shuffle_buffer=4)  # more than one pass: repeats to define it
    k = _keys(ds)
    assert len(k) == 45 and len(set(k)) == 30
    # with 2 workers the rank's epoch_length is split between them, still exact
    k = _keys(DataLoader(ShardDataset(shards6, epoch_length=21), batch_size=None, num_workers=2))
    assert len(k) == 21
    rs = ShardDataset(shards6, resample=True, seed=5)
    inf = [s["__key__"] for s in itertools.islice(iter(rs), 100)]  # infinite stream
    assert len(inf) == 100 and set(inf) <= {f"s-{k:06d}" for k in range(30)}
    a = _keys(ShardDataset(shards6, resample=True, seed=5, epoch_length=25))
    b = _keys(ShardDataset(shards6, resample=True, seed=5, epoch_length=25))
    assert len(a) == 25 and a == b
    c = ShardDataset(shards6, resample=True, seed=5, epoch_length=25)
    c.set_epoch(1)
    assert _keys(c) != a


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
        _write_sample(tf, _sample(5))
    ds = ShardDataset(str(p), require=("image", "caption"))
    with pytest.warns(RuntimeWarning, match="bad-000.tar"):
        got = _keys(ds)
    assert got == ["s-000000", "s-000005"]
    assert ds.skipped == Counter(bad_image=1, missing_caption=1, missing_image=1, bad_seg_png=1)
    # caption not required -> the caption-less sample is kept
    with pytest.warns(RuntimeWarning):
        assert "s-000002" in _keys(ShardDataset(str(p), require=("image",)))


def test_corrupt_and_truncated_shards(tmp_path):
    _write_shards(str(tmp_path), 3, 4)
    good = (tmp_path / "shard-001.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(good[:len(good) // 2 + 100])  # truncated mid-member
    (tmp_path / "shard-002.tar").write_bytes(b"this is not a tar file" * 40)
    ds = ShardDataset(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="bad_shard"):
        got = _keys(ds)
    assert got[:4] == [f"s-{k:06d}" for k in range(4)]  # the intact shard fully
    assert 4 <= len(got) < 8 and len(set(got)) == len(got)  # part of the truncated one, never a crash
    assert ds.skipped["bad_shard"] == 2
    # also inside DataLoader workers
    assert len(_keys(DataLoader(ShardDataset(str(tmp_path)), batch_size=None, num_workers=2))) == len(got)


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
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["ant", "bee", "cat"] and len(ds) == 6
    s = ds[0]
    assert s["label"] == 0 and s["__key__"] == "ant/0" and s["image"].shape == (5, 6, 3)
    assert s["image"].dtype == np.uint8
    with pytest.warns(RuntimeWarning, match="1.jpg"):
        s = ds[3]  # bee/1.jpg is corrupt -> next valid item (cat/0)
    assert s["__key__"] == "cat/0" and ds.skipped["bad_image"] == 1
    assert [ds[i]["label"] for i in range(6)] == [0, 0, 1, 2, 2, 2]


def test_image_folder_all_corrupt(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"nope")
    ds = ImageFolder(str(tmp_path))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="none of its 1 images"):
        ds[0]


def test_caption_folder(tmp_path):
    for j in range(3):
        (tmp_path / f"{j}.png").write_bytes(_png(np.full((4, 4, 3), j, np.uint8)))
    (tmp_path / "2.png").write_bytes(b"broken")
    lines = [{"file": "0.png", "caption": "zero", "year": 2015}, {"file": "1.png", "caption": "one"},
             {"file": "2.png", "caption": "two"}, {"file": "missing.png", "caption": "gone"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    with pytest.warns(RuntimeWarning, match="skipped 2"):
        ds = CaptionFolder(str(tmp_path))
    assert len(ds) == 3 and ds.skipped == Counter(missing_file=1, bad_line=1)
    s = ds[0]
    assert set(s) == {"image", "caption", "__key__", "year"} and s["image"].shape == (4, 4, 3)
    assert (s["caption"], s["__key__"], s["year"]) == ("zero", "0", 2015)
    with pytest.warns(RuntimeWarning):
        assert ds[2]["caption"] == "zero"  # broken 2.png -> wraps to the next valid item
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        CaptionFolder(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------------
# make_dataset / make_loader / collate


def test_make_dataset_dispatch(tmp_path, shards6):
    assert isinstance(make_dataset(shards6), ShardDataset)
    assert isinstance(make_dataset(os.path.join(shards6, "shard-{000..005}.tar")), ShardDataset)
    ds = make_dataset(os.path.join(shards6, "shard-{000..001}.tar") + "::" + os.path.join(shards6, "shard-005.tar"),
                      n=7, shuffle_buffer=2)
    assert isinstance(ds, ShardDataset) and len(ds.urls) == 3 and len(_keys(ds)) == 7
    for split in ("train", "val"):
        _write_shards(str(tmp_path / "sp" / split), 1, 2, name=split)
    ds = make_dataset(str(tmp_path / "sp" / "{split}"), split="val")
    assert ds.urls == [str(tmp_path / "sp" / "val" / "val-000.tar")]
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "a" / "x.png").write_bytes(_png(np.zeros((3, 3, 3), np.uint8)))
    assert isinstance(make_dataset(str(tmp_path / "cls"), shuffle_buffer=8, epoch_length=3), ImageFolder)
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "x.png").write_bytes(_png(np.zeros((3, 3, 3), np.uint8)))
    (tmp_path / "cap" / "captions.jsonl").write_text(json.dumps({"file": "x.png", "caption": "c"}) + "\n")
    assert isinstance(make_dataset(str(tmp_path / "cap")), CaptionFolder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="accepted layouts"):
        make_dataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        make_dataset(str(tmp_path / "no-such-dir"))


def test_make_dataset_world():
    world = pytest.importorskip("common.world")
    ds = make_dataset(None, split="val", seed=1, size=32, n=10)
    assert isinstance(ds, world.World) and len(ds) == 10
    assert ds[0]["image"].shape == (32, 32, 3)


class _Range(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"i": i, "x": np.full((2,), i, np.float32), "s": f"n{i}"}


def test_make_loader_map_style_rank_split():
    ds = _Range(23)
    seen = []
    for r in range(2):
        ld = make_loader(ds, 4, seed=3, rank=r, world_size=2, drop_last=False)
        seen.append([int(i) for b in ld for i in b["i"]])
    assert set(seen[0]).isdisjoint(seen[1]) or len(seen[0] + seen[1]) == 24  # 23 padded to 24 with one repeat
    assert set(seen[0]) | set(seen[1]) == set(range(23))
    e0 = [int(i) for b in make_loader(ds, 4, seed=3, rank=0, world_size=2) for i in b["i"]]
    e0b = [int(i) for b in make_loader(ds, 4, seed=3, rank=0, world_size=2) for i in b["i"]]
    e1 = [int(i) for b in make_loader(ds, 4, seed=3, rank=0, world_size=2, epoch=1) for i in b["i"]]
    assert e0 == e0b and e0 != e1 and len(e0) == 8  # 11 per rank, drop_last -> 2 batches of 4
    plain = [int(i) for b in make_loader(ds, 5, shuffle=False, rank=0, world_size=1) for i in b["i"]]
    assert plain == list(range(20))
    # two ranks with drop_last cover 22 distinct samples
    a = [int(i) for b in make_loader(ds, 1, seed=0, rank=0, world_size=2) for i in b["i"]]
    b = [int(i) for b in make_loader(ds, 1, seed=0, rank=1, world_size=2) for i in b["i"]]
    assert len(set(a + b)) == 22


def test_make_loader_iterable(shards6):
    ld = make_loader(ShardDataset(shards6, shuffle_buffer=4), 4, num_workers=2, epoch=2)
    batches = list(ld)
    assert len(batches) == 6  # 15 samples per worker, drop_last drops each worker's partial batch
    b = batches[0]
    assert b["image"].shape == (4, 6, 7, 3) and b["image"].dtype == torch.uint8
    assert b["depth"].dtype == torch.float32 and b["label"].dtype == torch.int64


def test_collate():
    ss = [_sample(0), _sample(1)]
    b = collate(ss)
    assert b["image"].shape == (2, 6, 7, 3) and b["seg"].dtype == torch.uint8
    assert b["quality"].dtype == torch.float32 and b["year"].tolist() == [2014, 2015]
    assert b["caption"] == [ss[0]["caption"], ss[1]["caption"]] and isinstance(b["objects"], list)
    assert set(collate(ss, keys=("image", "label"))) == {"image", "label"}
    with pytest.raises(KeyError, match="nope"):
        collate(ss, keys=("nope",))
    ragged = collate([{"a": np.zeros(2)}, {"a": np.zeros(3)}])
    assert isinstance(ragged["a"], list)
    t = collate([(torch.zeros(2), 1), (torch.ones(2), 2)])
    assert t[0].shape == (2, 2) and t[1].tolist() == [1, 2]
