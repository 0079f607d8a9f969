"""common.datacompdr: the released DataCompDR layout round-trips through tar shards (written, read back by
read_dr and by common.data's shard reading), stored augmentations replay pixel for pixel, the op semantics are the
released ones, bad samples raise naming key and member, and the join of image and reinforcement shards counts or
raises on keys present on one side only."""
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from common import datacompdr as dr
from common import transforms as T
from common.data import ShardSource, Stream, iter_samples, read_samples
from common.world import World

S = 24  # the student's image size in these tests
K = 3   # stored augmentations per sample
D = 8   # embedding width (2 teachers x 4)


def _png(a):
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def _images(n=4):
    """World renders of several sizes (the boxes must live in each image's own pixels)."""
    w = World(0, "train", 40)
    out = []
    for i in range(n):
        a = w[i]["image"]
        out.append(np.ascontiguousarray(a[: 40 - 3 * i, : 40 - 5 * (i % 2)]))  # 40x40, 37x35, 34x40, ...
    return out


def _sample(i, img, seed=0):
    """(key, image members, dr members, the k augmented images the teacher saw)."""
    key = f"{i:06d}"
    views = [dr.draw(img, np.random.default_rng([seed, i, a]), S) for a in range(K)]
    r = np.random.default_rng([seed, i, 99])
    emb = lambda n: r.standard_normal((n, D)).astype(np.float32)  # noqa: E731
    members = dr.dr_members(key, [e for _, e in views], [f"syn {i} {c}" for c in range(5)], emb(K), emb(6),
                            uid=f"uid{i}", url=f"http://x/{i}.jpg")
    image = {"png": _png(img), "txt": f"caption {i}".encode(), "json": json.dumps({"uid": f"uid{i}"}).encode()}
    return key, image, members, [x for x, _ in views]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("dcdr")
    rows = [_sample(i, im) for i, im in enumerate(_images())]
    dr.write_shard(str(d / "images-00000.tar"), [(k, im) for k, im, _, _ in rows[:2]])
    dr.write_shard(str(d / "images-00001.tar"), [(k, im) for k, im, _, _ in rows[2:]])
    os.makedirs(d / "dr")
    dr.write_shard(str(d / "dr" / "images-00000.tar"), [(k, m) for k, _, m, _ in rows[:2]])
    dr.write_shard(str(d / "dr" / "images-00001.tar"), [(k, m) for k, _, m, _ in rows[2:]])
    dr.write_shard(str(d / "both.tar"), [(k, {**im, **m}) for k, im, m, _ in rows])
    return d, rows


def test_released_member_names_and_nesting(shards):
    _, rows = shards
    key, _, m, _ = rows[0]
    assert sorted(m) == sorted(["url.txt", "syn.json", "paug.json", "npz", "json"])
    paug = json.loads(m["paug.json"])
    assert list(paug) == ["param_aug"] and isinstance(paug["param_aug"], str)  # a JSON string, as released
    entries = json.loads(paug["param_aug"])
    assert len(entries) == K and all(len(e) == 2 and len(e[0]) == 4 and len(e[1]) == 2 for e in entries)
    assert json.loads(m["syn.json"]) == {"syn_text": [f"syn 0 {c}" for c in range(5)]}
    assert json.loads(m["json"]) == {"uid": "uid0", "sha256": ""}
    with np.load(io.BytesIO(m["npz"]), allow_pickle=False) as z:
        assert sorted(z.files) == ["image_emb", "text_emb"]
        assert z["image_emb"].shape == (K, D) and z["text_emb"].shape == (6, D)
        assert z["image_emb"].dtype == np.float32 and z["text_emb"].dtype == np.float32


def test_joined_shards_replay_pixel_exact(shards):
    d, rows = shards
    src = dr.DRShards(str(d / "images-{00000..00001}.tar"), reinforced=str(d / "dr" / "images-{00000..00001}.tar"))
    got = {s["__key__"]: s for s in iter_samples(src)}
    assert sorted(got) == [k for k, *_ in rows]
    for key, _, m, views in rows:
        s = got[key]
        ref = dr.read_dr({**m, "__key__": key})
        assert s["caption"] == f"caption {int(key)}" and s["uid"] == f"uid{int(key)}" and s["n_gt"] == 1
        assert s["syn_text"] == ref["syn_text"] and s["param_aug"] == ref["param_aug"]
        assert s["image_emb"].dtype == np.float32 and np.array_equal(s["image_emb"], ref["image_emb"])
        assert np.array_equal(s["text_emb"], ref["text_emb"])
        assert "npz" not in s and "paug.json" not in s  # parsed, raw bytes dropped
        for a in range(K):  # the image decoded from the shard, replayed: exactly what the teacher saw
            x = dr.replay(s["image"], s["param_aug"][a], S)
            assert x.shape == (3, S, S) and torch.equal(x, views[a])


def test_plain_shard_source_and_read_dr(shards):
    d, rows = shards
    for s in read_samples(ShardSource(str(d / "both.tar"))):  # common.data's own reading: raw bytes members
        key, _, _, views = rows[int(s["__key__"])]
        r = dr.read_dr(s)
        assert r["uid"] == f"uid{int(key)}" and r["url"] == f"http://x/{int(key)}.jpg"
        assert torch.equal(dr.replay(s["image"], r["param_aug"][1], S), views[1])


def test_draw_matches_released_magnitudes_and_replay_is_stable():
    # the released rows show these float32 values (RandAugment bin 9 of 31 at 224 px)
    released = {0.26999998092651367, 0.09000000357627869, 178.5, 30.45317268371582, 9.0, 7.0, 0.0}
    img = np.random.default_rng(0).integers(0, 256, (230, 250, 3), dtype=np.uint8)
    seen = set()
    for seed in range(40):
        x, e = dr.draw(img, seed, (224, 224), num_ops=2)
        assert json.loads(json.dumps(e)) == e
        i, j, h, w = e[0]
        assert 0 <= i <= 230 - h and 0 <= j <= 250 - w
        for idx, mag in e[1]:
            assert abs(mag) in released, (dr.OPS[idx], mag)
            seen.add(dr.OPS[idx])
        if seed < 3:
            assert torch.equal(dr.replay(img, json.loads(json.dumps(e)), 224), x)
    assert len(seen) >= 12  # the draw covers (nearly) all 14 ops


def test_op_indices_map_to_common_transforms():
    """Unpinned ops: replay == common.transforms' RandAugment replay of the same op by name (independent path)."""
    x = T.to_tensor(np.random.default_rng(1).integers(0, 256, (20, 22, 3), dtype=np.uint8))
    ra = T.RandAugment(1, 9)
    for idx, name in enumerate(dr.OPS):
        if name in ("TranslateX", "TranslateY", "Posterize"):
            continue
        mag = -0.2 if name in ra.SIGNED and name != "Rotate" else 12.0
        got = dr.replay(x, [[0, 0, 20, 22], [[idx, mag]]], (20, 22))
        assert torch.equal(got, ra.apply(x, {"ops": [[name, abs(mag), 1 if mag > 0 else -1]]})), name
    # ml-mobileclip training/dr/transforms.py RandAugment.op_names, in its order (op_idx indexes this list)
    assert list(dr.OPS) == ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                            "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]


def test_pinned_op_semantics_by_hand():
    u = torch.tensor([[[177, 178, 179, 200]]], dtype=torch.uint8).expand(3, 1, 4)
    x = u.float() / 255
    sol = dr.replay(x, [[0, 0, 1, 4], [[11, 178.5]]], (1, 4))
    assert (sol * 255).round().to(torch.uint8)[0, 0].tolist() == [177, 178, 76, 55]  # >= 178.5 inverted
    assert torch.equal(T.RandAugment(1, 9).apply(x, {"ops": [["Solarize", 178.5, 1]]}), sol)  # not rounded to 178
    ramp = T.to_tensor(np.tile(np.arange(10, dtype=np.uint8)[None, :, None] * 20, (4, 1, 3)))
    t = dr.replay(ramp, [[0, 0, 4, 10], [[3, 2.9]]], (4, 10))  # int(2.9) = 2 px to the right
    assert torch.equal(t[:, :, 2:], ramp[:, :, :-2]) and t[:, :, :2].abs().sum() == 0
    t = dr.replay(ramp, [[0, 0, 4, 10], [[3, -2.9]]], (4, 10))  # int(-2.9) = -2
    assert torch.equal(t[:, :, :-2], ramp[:, :, 2:])
    p = dr.replay(ramp, [[0, 0, 4, 10], [[10, 7.0]]], (4, 10))
    assert torch.equal((p * 255).round().to(torch.uint8), (ramp * 255).round().to(torch.uint8) & 0xFE)
    crop = dr.replay(ramp, [[1, 3, 2, 5], []], (2, 5))  # no resize at the box's own size: a plain crop
    assert torch.equal(crop, ramp[:, 1:3, 3:8])
    with pytest.raises(ValueError, match="leaves the 4x10 image"):
        dr.replay(ramp, [[1, 3, 4, 5], []], 8)


def _bad(m, key="k7"):
    with pytest.raises(dr.DRFormatError) as e:
        dr.read_dr({**m, "__key__": key})
    return str(e.value)


def test_bad_samples_name_key_and_member(shards):
    _, rows = shards
    m = rows[0][2]
    msg = _bad({k: v for k, v in m.items() if k != "paug.json"})
    assert "'k7'" in msg and "'paug.json'" in msg and "missing" in msg
    assert "'paug.json'" in _bad({**m, "paug.json": b"{not json"}) and "not JSON" in _bad({**m, "paug.json": b"{"})
    assert "not a JSON string" in _bad({**m, "paug.json": json.dumps({"param_aug": "[[1, 2"}).encode()})
    assert "crop box" in _bad({**m, "paug.json": json.dumps({"param_aug": "[[[0, 0, 2], [[0, 0.0]]]]"}).encode()})
    assert "op_idx" in _bad({**m, "paug.json": json.dumps({"param_aug": "[[[0, 0, 2, 2], [[14, 0.0]]]]"}).encode()})
    assert "'syn.json'" in _bad({**m, "syn.json": json.dumps({"captions": []}).encode()})
    z = io.BytesIO()
    np.savez(z, image_emb=np.zeros((K + 1, D), np.float32), text_emb=np.zeros((6, D), np.float32))
    msg = _bad({**m, "npz": z.getvalue()})
    assert "'npz'" in msg and "'k7'" in msg and f"{K + 1} rows" in msg and f"{K} augmentations" in msg
    z = io.BytesIO()
    np.savez(z, image_emb=np.zeros((K, D), np.float32), text_emb=np.zeros((5, D), np.float32))
    assert "n_gt" in _bad({**m, "npz": z.getvalue()})
    z = io.BytesIO()
    np.savez(z, image_emb=np.array([{"a": 1}] * K, dtype=object), text_emb=np.zeros((6, D)))
    assert "without pickle" in _bad({**m, "npz": z.getvalue()})
    with pytest.raises(dr.DRFormatError, match="rows"):  # the writer refuses what the reader refuses
        dr.dr_members("k", [[[0, 0, 2, 2], []]], ["s"], np.zeros((2, D)), np.zeros((2, D)))


def test_source_skips_and_counts_bad_samples(tmp_path, shards):
    _, rows = shards
    items = [(k, {**im, **m}) for k, im, m, _ in rows]
    items[1] = (items[1][0], {**items[1][1], "paug.json": b"{"})
    dr.write_shard(str(tmp_path / "x.tar"), items)
    got = read_samples(dr.DRShards(str(tmp_path / "x.tar")))
    assert len(got) == len(rows) - 1 and got.skipped == Counter({"bad_dr_paug_json": 1})


def test_join_counts_and_raises_on_one_sided_keys(tmp_path, shards):
    _, rows = shards
    img = [(k, im) for k, im, _, _ in rows]
    rein = [(k, m) for k, _, m, _ in rows]
    p = lambda n: str(tmp_path / n)  # noqa: E731
    dr.write_shard(p("img.tar"), img[::-1][:3])      # other order, and the image of rows[0] failed to download
    dr.write_shard(p("dr.tar"), rein[1:] + [("999999", rein[0][1])])  # rows[0] has none, 999999 has no image
    rep = Counter()
    got = list(dr.join_shard(p("img.tar"), p("dr.tar"), report=rep))
    assert [k for k, _ in got] == ["000003", "000002", "000001"]
    assert rep == Counter({"join_no_image": 1})
    dr.write_shard(p("img2.tar"), img)
    rep = Counter()
    assert [k for k, _ in dr.join_shard(p("img2.tar"), p("dr.tar"), report=rep)] == ["000001", "000002", "000003"]
    assert rep == Counter({"join_no_reinforcement": 1, "join_no_image": 1})
    with pytest.raises(ValueError, match="'000000'.*no reinforcement sample"):
        list(dr.join_shard(p("img2.tar"), p("dr.tar"), strict=True))
    with pytest.raises(ValueError, match="no sample matched"):  # shards that do not correspond
        dr.write_shard(p("other.tar"), [("a", img[0][1]), ("b", img[1][1])])
        list(dr.join_shard(p("other.tar"), p("dr.tar")))
    rep = Counter()  # a held-out split is passed over: neither joined nor counted
    got = list(dr.join_shard(p("img2.tar"), p("dr.tar"), report=rep, keep=lambda k: k != "000000"))
    assert [k for k, _ in got] == ["000001", "000002", "000003"] and rep == Counter({"join_no_image": 1})
    # by uid: different keys on the two sides (img2dataset numbering), same uids; "999999" holds uid0's members
    rekeyed = [(f"s{k}", im) for k, im in img]
    dr.write_shard(p("img3.tar"), rekeyed)
    rep = Counter()
    got = dict(dr.join_shard(p("img3.tar"), p("dr.tar"), by="uid", report=rep))
    assert sorted(got) == ["s000000", "s000001", "s000002", "s000003"] and rep == Counter()
    assert json.loads(got["s000002"]["json"])["uid"] == "uid2"


def test_pair_shards(tmp_path):
    for n in ("a-0.tar", "a-1.tar", "r-0.tar", "r-1.tar", "r-2.tar"):
        dr.write_shard(str(tmp_path / n), [])
    os.makedirs(tmp_path / "d")
    for n in ("a-1.tar", "a-0.tar", "a-9.tar"):
        dr.write_shard(str(tmp_path / "d" / n), [])
    t = str(tmp_path)
    assert dr.pair_shards(f"{t}/a-{{0..1}}.tar", f"{t}/d") == [(f"{t}/a-0.tar", f"{t}/d/a-0.tar"),
                                                                 (f"{t}/a-1.tar", f"{t}/d/a-1.tar")]
    assert dr.pair_shards(f"{t}/a-{{0..1}}.tar", f"{t}/r-{{0..1}}.tar")[1] == (f"{t}/a-1.tar", f"{t}/r-1.tar")
    with pytest.raises(ValueError, match="2 shards.*has 3"):
        dr.pair_shards(f"{t}/a-{{0..1}}.tar", f"{t}/r-{{0..2}}.tar")


def test_stream_trains_from_joined_shards(shards):
    d, rows = shards
    src = dr.DRShards(str(d / "images-{00000..00001}.tar"), reinforced=str(d / "dr"))

    def tf(s, g):
        a = int(torch.randint(len(s["param_aug"]), (1,), generator=g))
        c = int(torch.randint(len(s["syn_text"]), (1,), generator=g))
        return {"image": dr.replay(s["image"], s["param_aug"][a], S), "a": a,
                "t_img": s["image_emb"][a], "t_syn": s["text_emb"][s["n_gt"] + c]}

    st = Stream(src, batch_size=2, transform=tf, seed=0, num_workers=0, shuffle_buffer=0)
    views = {k: v for k, _, _, v in rows}
    for i in range(4):  # two epochs
        b = st(i)
        assert b["image"].shape == (2, 3, S, S) and b["t_img"].shape == (2, D)
        for key, a, x in zip(b["__key__"], b["a"].tolist(), b["image"]):
            assert torch.equal(x, views[key][a])
    assert st.skipped() == {}


def test_held_out_keys_are_neither_joined_nor_counted(shards):
    from common.data import key_split
    d, rows = shards
    keys = [k for k, *_ in rows]
    for split in ("train", "test"):
        src = dr.DRShards(str(d / "images-{00000..00001}.tar"), reinforced=str(d / "dr"), split=split, holdout=0.3)
        src.report = Counter()
        got = [s["__key__"] for s in iter_samples(src)]
        assert got == [k for k in keys if key_split(k, 0.3) == split] and +src.report == Counter()
