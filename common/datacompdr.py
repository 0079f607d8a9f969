"""DataCompDR's released per-sample layout (MobileCLIP, arXiv 2311.17049 sec. 3): write it, read it, replay its
stored augmentations exactly, and join its shards with separately downloaded image shards by key while streaming.

One reinforced sample is a group of webdataset tar members sharing a key (`<key>.<member>`):

    url.txt    the image URL (DataCompDR ships no images)
    syn.json   {"syn_text": [5 synthetic captions]}
    paug.json  {"param_aug": "<JSON string>"}: a list of k entries [[i, j, h, w], [[op_idx, magnitude], ...]]
               = the RandomResizedCrop box (top, left, height, width) in source-image pixels + the RandAugment ops
    npz        image_emb (k, D) and text_emb (n_gt + n_syn, D) float32: per teacher L2-normalised embeddings,
               concatenated (D = 2 x 768 for ViT-L-14:openai + ViT-L-14:datacomp_xl_s13b_b90k); ground truth first
    json       {"uid": ..., "sha256": ...}

Sources (stored public copies, checked for this module):
- HF dataset cards apple/DataCompDR-12M and -1B (viewer rows): the five member names above; param_aug is a JSON
  *string* inside paug.json (e.g. "[[[14, 347, 370, 427], [[0, 0.0], [6, 0.26999998092651367]]], ...]");
  embeddings print as float32 values (float16 would not round-trip them). The cards also say the uids per shard
  match mlfoundations/DataComp-12M, whose shards hold the images.
- ml-mobileclip hf_dataset_example.py: `json.loads(sample["paug.json"]["param_aug"])[aug_idx]`, then
  `compose_from_config(cfg).decompress(params)` and `.reapply(image, params)`; text_emb[0] is the GT caption's,
  text_emb[1 + scapi] the synthetic caption's.
- ml-mobileclip training/open_clip.patch (preprocess_dr): aug_idx uniform over the k entries, image_emb[aug_idx],
  text_emb[capi] / text_emb[len(texts) + scapi]; the training config's RandomResizedCrop size / interpolation and
  Normalize are replaced by the student's own before replaying (get_wds_dataset hunk).
- ml-mobileclip training/dr/transforms.py: RandAugment.op_names (the 14 names of OPS below, torchvision's order)
  and compress_params (op name -> index, signed magnitude kept as drawn); Compose.compress stores one entry per
  random transform in TRANSFORMATION_TO_NAME order: random_resized_crop, rand_augment (p=1.0: never None).
- training/configs/datacompdr12m.json: RandomResizedCrop(224, bicubic) + RandAugment(p=1.0), torchvision
  defaults (scale (0.08, 1), ratio (3/4, 4/3); num_ops 2, magnitude 9 of 31 bins). Checked: torchvision's float32
  tables at bin 9 give exactly the released magnitudes 0.26999998092651367 (blend ops), 0.09000000357627869
  (shear), 178.5 (solarize threshold) and 30.45317268371582 (translate at 224 px); TABLE below reproduces them.
- torchvision autoaugment._apply_op: translate uses int(magnitude) pixels, posterize int(magnitude) bits,
  solarize inverts values >= threshold (8-bit scale, as the PIL images of the generation were).

Replay runs on common.transforms' float ops (no torchvision): crop + resize there, the 14 ops through its
apply_op, except two that this module pins to the released semantics: TranslateX/Y truncate to whole pixels and
Posterize takes int bits (Solarize compares with the fractional threshold in common.transforms itself).
"""
import io
import json
import os
import tarfile
import warnings

import numpy as np
import torch

from common.data import ShardSource, _read_shard, expand_urls, key_split, split_name
from common.transforms import (RandAugment, RandomResizedCrop, _size2, apply_op, as_generator,
                               to_tensor)

OPS = RandAugment.OPS  # == ml-mobileclip RandAugment.op_names (same 14 names, same order)
DR_MEMBERS = ("paug.json", "syn.json", "npz")  # the members read_dr needs; url.txt and json are metadata


class DRFormatError(ValueError):
    """A reinforced sample that does not follow the released layout; names the sample key and the member."""

    def __init__(self, key, member, what):
        self.key, self.member = key, member
        super().__init__(f"DataCompDR sample {key!r}, member {member!r}: {what}")


# ----------------------------------------------------------------------------------------------------------------
# write and read one sample


def dr_members(key, param_aug, syn_text, image_emb, text_emb, uid=None, url="", sha256="", dtype=np.float32):
    """-> {member: bytes} of one sample in the released layout (see the module docstring). param_aug: k entries
    [[i, j, h, w], [[op_idx, magnitude], ...]] (draw() returns one); image_emb (k, D); text_emb (n_gt + n_syn, D),
    ground truth first. uid defaults to the key. The npz holds exactly image_emb and text_emb (np.savez, no
    objects: np.load(allow_pickle=False) reads it). Checks the same things read_dr checks."""
    image_emb, text_emb = np.asarray(image_emb, dtype), np.asarray(text_emb, dtype)
    syn_text = [str(t) for t in syn_text]
    z = io.BytesIO()
    np.savez(z, image_emb=image_emb, text_emb=text_emb)
    out = {"url.txt": str(url).encode(),
           "syn.json": json.dumps({"syn_text": syn_text}).encode(),
           "paug.json": json.dumps({"param_aug": json.dumps(_plain(param_aug))}).encode(),
           "npz": z.getvalue(),
           "json": json.dumps({"uid": str(key if uid is None else uid), "sha256": str(sha256)}).encode()}
    read_dr({**out, "__key__": key})  # refuse to write what the reader would refuse
    return out


def _plain(x):
    """Tuples / numpy scalars -> JSON-able lists, ints and floats."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    return float(x)


def _json(sample, member, key):
    v = sample.get(member)
    if v is None:
        raise DRFormatError(key, member, f"missing (the sample has {sorted(k for k in sample if k != '__key__')})")
    if isinstance(v, (bytes, bytearray, str)):
        try:
            v = json.loads(v)
        except (ValueError, UnicodeDecodeError) as err:
            raise DRFormatError(key, member, f"not JSON ({err})") from None
    return v


def _check_entry(e, key="?", where="paug.json"):
    """One param_aug entry -> (box [i, j, h, w] ints, ops [(op_idx, magnitude)]); DRFormatError when malformed."""
    bad = lambda what: DRFormatError(key, where, f"entry {e!r}: {what}")  # noqa: E731
    if not isinstance(e, (list, tuple)) or len(e) != 2:
        raise bad("expected [[i, j, h, w], [[op_idx, magnitude], ...]]")
    box, ops = e
    if not isinstance(box, (list, tuple)) or len(box) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in box):
        raise bad("the crop box must be 4 integers [top, left, height, width]")
    box = [int(v) for v in box]
    if box[0] < 0 or box[1] < 0 or box[2] <= 0 or box[3] <= 0:
        raise bad("the crop box needs top, left >= 0 and height, width > 0")
    out = []
    for op in ops or []:  # None: RandAugment was skipped at generation (p < 1)
        if not isinstance(op, (list, tuple)) or len(op) != 2 or not isinstance(op[0], int) or \
                not 0 <= op[0] < len(OPS) or not isinstance(op[1], (int, float)) or isinstance(op[1], bool):
            raise bad(f"each RandAugment op must be [op_idx in 0..{len(OPS) - 1}, magnitude]")
        out.append((int(op[0]), float(op[1])))
    return box, out


def read_dr(sample):
    """A sample with the released members (raw bytes as common.data leaves them, or already-parsed JSON / arrays)
    -> {"param_aug": [k entries], "syn_text": [str], "image_emb": float32 (k, D), "text_emb": float32 (n_gt + n_syn,
    D), "n_gt": int, "uid": str | None, "url": str | None}. Raises DRFormatError (a ValueError naming the key and the
    member) for a missing member, bad JSON, bad entries, or shapes that disagree: k of param_aug vs image_emb rows,
    D of image_emb vs text_emb, text_emb rows < n_syn + 1."""
    key = sample.get("__key__", "?")
    paug = _json(sample, "paug.json", key)
    if not isinstance(paug, dict) or "param_aug" not in paug:
        raise DRFormatError(key, "paug.json", "expected an object {\"param_aug\": ...}")
    pa = paug["param_aug"]
    if isinstance(pa, str):  # the released form: a JSON string inside the JSON object
        try:
            pa = json.loads(pa)
        except ValueError as err:
            raise DRFormatError(key, "paug.json", f"param_aug is not a JSON string ({err})") from None
    if not isinstance(pa, list) or not pa:
        raise DRFormatError(key, "paug.json", "param_aug must be a non-empty list of entries")
    for e in pa:
        _check_entry(e, key)
    syn = _json(sample, "syn.json", key)
    if not isinstance(syn, dict) or not isinstance(syn.get("syn_text"), list) or \
            not all(isinstance(t, str) for t in syn["syn_text"]):
        raise DRFormatError(key, "syn.json", "expected {\"syn_text\": [str, ...]}")
    z = sample.get("npz")
    if z is None:
        raise DRFormatError(key, "npz", "missing")
    if isinstance(z, (bytes, bytearray)):
        try:
            with np.load(io.BytesIO(z), allow_pickle=False) as f:
                z = {k: f[k] for k in f.files}
        except Exception as err:  # noqa: BLE001 - any unreadable npz (incl. one that needs pickle) is malformed
            raise DRFormatError(key, "npz", f"not a readable .npz without pickle ({type(err).__name__}: {err})") \
                from None
    if "image_emb" not in z or "text_emb" not in z:
        raise DRFormatError(key, "npz", f"needs arrays image_emb and text_emb, has {sorted(z)}")
    img, txt = np.asarray(z["image_emb"]), np.asarray(z["text_emb"])
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise DRFormatError(key, "npz", f"image_emb {img.shape} and text_emb {txt.shape} must be (rows, D), same D")
    if img.shape[0] != len(pa):
        raise DRFormatError(key, "npz", f"image_emb has {img.shape[0]} rows but paug.json has {len(pa)} "
                                        "augmentations (one embedding per stored augmentation)")
    n_syn = len(syn["syn_text"])
    if txt.shape[0] < n_syn + 1:
        raise DRFormatError(key, "npz", f"text_emb has {txt.shape[0]} rows; expected n_gt + {n_syn} synthetic "
                                        "with n_gt >= 1 (ground truth first)")
    meta = sample.get("json")
    if isinstance(meta, (bytes, bytearray, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    uid = meta.get("uid") if isinstance(meta, dict) else sample.get("uid")
    url = sample.get("url.txt")
    return {"param_aug": pa, "syn_text": list(syn["syn_text"]), "image_emb": img.astype(np.float32, copy=False),
            "text_emb": txt.astype(np.float32, copy=False), "n_gt": int(txt.shape[0] - n_syn),
            "uid": None if uid is None else str(uid),
            "url": url.decode("utf-8", "replace").strip() if isinstance(url, (bytes, bytearray)) else url}


def write_shard(path, items):
    """Write (key, {member: bytes}) items to an uncompressed tar at `path` (atomically: tmp + rename), members of a
    key consecutive, as common.data and webdataset read them. Returns the number of samples."""
    n, tmp = 0, path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in items:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                tf.addfile(ti, io.BytesIO(data))
            n += 1
    os.replace(tmp, path)
    return n


# ----------------------------------------------------------------------------------------------------------------
# augmentations: draw one (the generation side) and replay a stored one (the training side)

# torchvision RandAugment._augmentation_space(31 bins): float32 tables, so drawn magnitudes equal the released ones
def _table(op, H, W, bins=31):
    if op in ("ShearX", "ShearY"):
        return torch.linspace(0.0, 0.3, bins)
    if op == "TranslateX":
        return torch.linspace(0.0, 150.0 / 331.0 * W, bins)
    if op == "TranslateY":
        return torch.linspace(0.0, 150.0 / 331.0 * H, bins)
    if op == "Rotate":
        return torch.linspace(0.0, 30.0, bins)
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return torch.linspace(0.0, 0.9, bins)
    if op == "Posterize":
        return 8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int()
    if op == "Solarize":
        return torch.linspace(255.0, 0.0, bins)
    return None  # Identity, AutoContrast, Equalize: magnitude 0.0


def apply_dr_op(img, op_idx, magnitude, interpolation="nearest", fill=0.0):
    """One stored RandAugment op [op_idx, signed magnitude] on float (3, H, W) in [0, 1], with torchvision's
    _apply_op semantics (module docstring); everything but the pinned ops is common.transforms.apply_op."""
    name = OPS[int(op_idx)]
    if name in ("TranslateX", "TranslateY"):
        magnitude = float(int(magnitude))  # torchvision: translate=[int(magnitude), 0], truncation toward zero
    elif name == "Posterize":
        magnitude = int(magnitude)
    return apply_op(img, name, float(magnitude), interpolation, fill)


def replay(image, entry, size, interpolation="bilinear", antialias=True, ra_interpolation="nearest", fill=0.0):
    """The stored augmentation `entry` = [[i, j, h, w], [[op_idx, magnitude], ...]] on `image` (PIL, uint8 HWC array
    or float (3, H, W) tensor, as common.transforms.to_tensor reads it) -> float (3, size, size) in [0, 1], not
    normalised. The box is cut in source-image pixels and resized to the student's own size / interpolation (the
    training replaces the generation's 224 px bicubic), then the ops run at that size. Deterministic: the same
    inputs give the same pixels. A box outside the image raises (the image is not the one the box was drawn on,
    e.g. a download resized by img2dataset)."""
    x = to_tensor(image)
    (i, j, h, w), ops = _check_entry(entry, where="param_aug")
    H, W = int(x.shape[-2]), int(x.shape[-1])
    if i + h > H or j + w > W:
        raise ValueError(f"replay: crop box [i, j, h, w] = {[i, j, h, w]} leaves the {H}x{W} image; the stored boxes "
                         "are in the pixels of the image the augmentation was drawn on (download it unresized)")
    out = list(_size2(size))
    x = RandomResizedCrop(out, interpolation=interpolation, antialias=antialias).apply(x, {"box": [i, j, h, w],
                                                                                             "size": out})
    for op_idx, mag in ops:
        x = apply_dr_op(x, op_idx, mag, ra_interpolation, fill)
    return x


def draw(image, g, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), num_ops=2, magnitude=9, **replay_kw):
    """A fresh augmentation in the released form -> (augmented float (3, size, size) image, entry). The box follows
    torchvision's RandomResizedCrop draw, the ops RandAugment(num_ops, magnitude, 31 bins) drawn at the output size
    (op uniform of 14, then a random sign for signed ops), with torchvision's float32 magnitudes. The image is
    replay(image, entry, size, **replay_kw), so replaying the stored entry reproduces it pixel for pixel (JSON keeps
    Python floats exactly). g: np.random.Generator, torch.Generator or int seed."""
    g = as_generator(g)
    x = to_tensor(image)
    S = _size2(size)
    box = RandomResizedCrop(S, scale=scale, ratio=ratio).sample(g, x)["box"]
    drawn = RandAugment(num_ops, magnitude).sample(g, torch.empty(3, *S))["ops"]  # [[name, mag, sign]]: op + sign
    ops = []
    for name, _, sign in drawn:
        t = _table(name, *S)
        mag = 0.0 if t is None else float(t[magnitude].item())
        ops.append([OPS.index(name), mag * sign if name != "Posterize" else mag])
    entry = [[int(v) for v in box], ops]
    return replay(x, entry, size, **replay_kw), entry


# ----------------------------------------------------------------------------------------------------------------
# joining image shards with reinforcement shards, streaming
#
#   --data=images-{00000..00127}.tar --reinforced=dr-{00000..00127}.tar
#
# Shard i of each holds the same samples: the released DataCompDR shards are named like the DataComp image shards
# (same basenames: paired by name), and mobileclip's own reinforcement shards are written one per input shard in
# order (paired by index). Within a pair the image shard is streamed in its own order, and each sample's
# reinforcement members are read by seeking into the reinforcement shard, through an index of its tar headers
# built when the pair is opened (a few MB per shard, never the embeddings): so the two shards need not list their
# samples in the same order (img2dataset writes in download-completion order). Samples are matched by key, or by
# the "uid" of the json members (by="uid"; DataCompDR's cards promise the same uids per shard).
# Unmatched samples are counted, not fatal: DataCompDR lists URLs, and a download always misses some images
# ("join_no_image"); an image without reinforcement is "join_no_reinforcement". strict=True raises on either. A
# shard pair that matches nothing at all always raises: the shards do not correspond.


def pair_shards(images, reinforced):
    """Two shard patterns -> [(image_shard, reinforcement_shard)]: by basename when every image shard's name is
    among the reinforcement shards' (a subset of the image shards may be downloaded), else by index when both have
    the same count, else ValueError naming both patterns."""
    a, b = expand_urls(images), expand_urls(reinforced)
    by_name = {os.path.basename(u): u for u in b}
    if len(by_name) == len(b) and all(os.path.basename(u) in by_name for u in a):
        return [(u, by_name[os.path.basename(u)]) for u in a]
    if len(a) == len(b):
        return list(zip(a, b))
    raise ValueError(f"--data {images!r} has {len(a)} shards and --reinforced {reinforced!r} has {len(b)}, and their "
                     "names differ: shard i of each must hold the same samples (same basenames, or the same count "
                     "in the same order)")


def _index_dr(url, by, report):
    """{join id: (key, {ext: (offset, size)})} of an uncompressed tar, from its headers (data skipped, except the
    json members when by="uid")."""
    groups, order = {}, []
    try:
        with tarfile.open(url, mode="r:") as tf:  # seekable: headers only
            for m in tf:
                kx = split_name(m.name) if m.isfile() else None
                if kx is None:
                    continue
                k, ext = kx
                if k not in groups:
                    groups[k] = {}
                    order.append(k)
                groups[k][ext] = (m.offset_data, m.size)
                if by == "uid" and ext == "json":
                    try:
                        groups[k]["__uid__"] = str(json.loads(tf.extractfile(m).read())["uid"])
                    except (ValueError, KeyError, TypeError):
                        pass
    except tarfile.ReadError as err:
        if "empty" not in str(err) and os.path.getsize(url) > 0 and not order:
            raise ValueError(f"reinforcement shard {url!r} is not an uncompressed tar ({err}); the released "
                             "DataCompDR shards are plain .tar") from None
        report["bad_shard"] += 1
        warnings.warn(f"reinforcement shard {url!r} ends early: {err}", RuntimeWarning, stacklevel=2)
    except (EOFError, OSError) as err:
        report["bad_shard"] += 1
        warnings.warn(f"reinforcement shard {url!r} ends early: {type(err).__name__}: {err}", RuntimeWarning,
                      stacklevel=2)
    out = {}
    for k in order:
        members = groups[k]
        jid = k if by == "key" else members.pop("__uid__", None)
        if jid is None:
            report["join_no_uid"] += 1
            continue
        out[jid] = (k, members)
    return out


def _merge(key, img, dr, strict, where, report):
    """Image members + reinforcement members; the two json members are merged (image keys win) after checking that
    their uids agree. None (counted) on a uid clash unless strict."""
    out = {**dr, **img}
    if "json" in img and "json" in dr:
        try:
            a, b = json.loads(img["json"]), json.loads(dr["json"])
        except ValueError:
            return out  # a bad json member is the decoder's business (it skips and counts the sample)
        if isinstance(a, dict) and isinstance(b, dict):
            if "uid" in a and "uid" in b and str(a["uid"]) != str(b["uid"]):
                if strict:
                    raise ValueError(f"{where}: sample {key!r} has uid {a['uid']!r} in the image shard but "
                                     f"{b['uid']!r} in the reinforcement shard")
                report["join_uid_mismatch"] += 1
                return None
            out["json"] = json.dumps({**b, **a}).encode()
    return out


def join_shard(image_url, dr_url, by="key", strict=False, report=None, keep=None):
    """Yield (key, members) of one shard pair: the image shard's samples, in its order, each with the members of
    its reinforcement sample (key = the image sample's key). Counts unmatched samples in `report` (a Counter:
    join_no_image, join_no_reinforcement, join_uid_mismatch, join_no_uid); strict=True raises on them instead.
    Raises ValueError when the pair has samples on both sides but no match. keep(key) -> bool: image samples it
    rejects (a held-out split) are passed over without a look-up or a count, and so are, by key, their
    reinforcement samples."""
    if by not in ("key", "uid"):
        raise ValueError(f"join: by must be 'key' or 'uid', got {by!r}")
    from collections import Counter
    report = Counter() if report is None else report
    where = f"join of {image_url!r} with {dr_url!r}"
    index = _index_dr(dr_url, by, report)
    used, unmatched = set(), []
    with open(dr_url, "rb") as f:
        for key, members in _read_shard(image_url, report):
            if keep is not None and not keep(key):
                continue
            if by == "uid":
                try:
                    jid = str(json.loads(members["json"])["uid"])
                except (KeyError, ValueError, TypeError):
                    jid = None
            else:
                jid = key
            hit = index.get(jid) if jid is not None else None
            if hit is None or jid in used:
                if strict:
                    raise ValueError(f"{where}: image sample {key!r} ({by} {jid!r}) has no reinforcement sample")
                report["join_no_reinforcement"] += 1
                unmatched.append(key)
                continue
            used.add(jid)
            dr = {}
            for ext, (off, size) in hit[1].items():
                f.seek(off)
                dr[ext] = f.read(size)
            m = _merge(key, members, dr, strict, where, report)
            if m is not None:
                yield key, m
    missing = [jid for jid in index if jid not in used and (keep is None or by == "uid" or keep(jid))]
    if missing and strict:
        raise ValueError(f"{where}: {len(missing)} reinforcement samples have no image, e.g. {missing[:3]}")
    if missing:
        report["join_no_image"] += len(missing)
    if index and unmatched and not used:
        raise ValueError(f"{where}: no sample matched by {by} (image keys e.g. {unmatched[:3]}, reinforcement "
                         f"{list(index)[:3]}); the shards do not correspond (wrong pairing, or join by='uid')")


def join_shards(images, reinforced, by="key", strict=False, report=None):
    """One pass over all shard pairs (pair_shards) -> (key, members), for scripts and tests; training uses
    DRShards, which deals the pairs to ranks and workers like any shard source."""
    for a, b in pair_shards(images, reinforced):
        yield from join_shard(a, b, by, strict, report)


class DRShards(ShardSource):
    """A common.data source of reinforced samples for Stream / read_samples / iter_samples.

        DRShards("dr/shard-{000000..000009}.tar")                              # members all in one shard set
        DRShards("images-{00000..00127}.tar", reinforced="dr-{00000..00127}.tar")  # joined by key (or by="uid")

    A ShardSource (so common.data deals its shard pairs to consumers, shuffles, resumes and counts exactly as for
    plain shards) whose decoded samples also carry read_dr's fields: param_aug, syn_text, image_emb, text_emb,
    n_gt, uid (the raw paug.json / syn.json / npz bytes are dropped). A sample that breaks the layout is skipped
    and counted as bad_dr_<member> (like any undecodable sample); join counters as in join_shard."""

    def __init__(self, data, reinforced=None, split=None, holdout=0.0, require=("image",), by="key", strict=False):
        super().__init__(data, split=split, holdout=holdout, require=require)
        self.reinforced, self.by, self.strict = reinforced, by, bool(strict)
        self.pairs = pair_shards(data, reinforced) if reinforced else None
        if reinforced:
            self.name = f"dr({data} + {reinforced}{', ' + split if split and holdout else ''})"

    def groups(self, j):
        """Shard j (ShardSource deals, shuffles and resumes by shard index): its groups, joined with the paired
        reinforcement shard when there is one."""
        if self.pairs is None:
            return super().groups(j)
        keep = (lambda k: key_split(k, self.holdout) == self.split) if self.holdout else None
        return join_shard(*self.pairs[j], self.by, self.strict, self.report, keep)

    def decode(self, item, images=True):
        s = super().decode(item, images)
        try:
            dr = read_dr(s)
        except DRFormatError as err:
            raise ValueError(f"bad_dr_{err.member.replace('.', '_')}: {err}") from None
        for m in DR_MEMBERS:
            s.pop(m, None)
        s.update({k: v for k, v in dr.items() if k not in ("url",)})
        return s
