"""The one data path of every script: sources (the synthetic world, tar shards, image folders) streamed as
batches, split over ranks x DataLoader workers, shuffled, in endless epochs, resumable exactly after a kill.

    src = open_source(cfg.data, "train", world=lambda split: World(cfg.seed, split, cfg.image_size), n=cfg.n_train)
    stream = Stream(src, batch_size=B // dist.world_size, transform=fn, seed=cfg.seed,
                    num_workers=cfg.num_workers, dist=dist)
    fit(model, loss_fn, stream, ...)              # stream(i) is the batch of step i; fit checkpoints its state
    test = read_samples(open_source(cfg.data, "test", ...), cfg.n_test)   # one pass, never the training stream
    results["data"] = data_report([stream], [test], dist)                 # provenance (collective)

Memory does not grow with the dataset: a consumer holds one shard's read position, a shuffle buffer of undecoded
samples and one batch. (The world source can cache what it rendered, which is how a miniature stays fast: that is
n_train samples, not the dataset.) The only per-sample state kept is one int64 hash per distinct training key and
rank, for the provenance counts.

Tar shards follow the img2dataset / webdataset convention: members are grouped by key, where key = member path up
to the first dot of its basename and the extension is the rest ("000123.seg.png" -> key "000123", ext "seg.png").
Members of one sample must be consecutive in the tar (as every writer does). Decoding (ext lower-cased):

    png jpg jpeg webp bmp ppm -> "image"  uint8 (H, W, 3) RGB (grayscale, palette and RGBA converted)
    seg.png                   -> "seg"        uint8 (H, W)  (pixel values as stored: class ids)
    inst.png                  -> "instances"  uint8 (H, W)
    depth.npy                 -> "depth"      np.load(allow_pickle=False)
    txt / text                -> "caption"    str
    json                      -> its keys merged into the sample (a member key such as .txt wins on a clash);
                                 a non-dict JSON value goes under "json"
    cls                       -> "label"      int
    anything else             -> raw bytes under its extension (decode_npy / decode_image help)

plus "__key__". A shard exported by `common.world.export_shards` therefore yields exactly the keys of `World[i]`.
Undecodable members, missing required fields and empty captions skip the sample; truncated or corrupt shards end
early; everything skipped is counted (Stream.skipped, data_report) and warned about, never fatal.

    python -m common.data bench --data=... [--image_size=224]     # loader images/s per worker + peak RSS
"""
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import tarfile
import time
import warnings
import zlib
from collections import Counter
from glob import glob

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")
FOLDER_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# ----------------------------------------------------------------------------------------------------------------
# url patterns

_RANGE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(s):
    """'a{00..02}b{x,y}' -> ['a00bx', 'a00by', ...]. Numeric ranges keep the zero padding of their bounds."""
    m = _RANGE.search(s)
    if m is None:
        return [s]
    body, head, tail = m.group(1), s[:m.start()], s[m.end():]
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.lstrip("-").startswith("0") and len(lo) > 1 else 0
        width = max(width, len(hi) if hi.lstrip("-").startswith("0") and len(hi) > 1 else 0)
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        items = [str(i).zfill(width) for i in range(a, b + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace pattern: keep literally
        return [head + items[0] + t for t in _expand_braces(tail)]
    return [head + it + t for it in items for t in _expand_braces(tail)]


def expand_urls(pattern):
    """Shard pattern -> sorted-per-piece list of existing local shard paths.

    Accepts "dir/shard-{000..099}.tar" (several braces, {a,b} lists too), "a.tar::b-{0..3}.tar" lists, glob
    wildcards, a directory (all *.tar inside, sorted), or a list/tuple of any of these. Raises FileNotFoundError
    naming the pattern and the missing paths when any named path does not exist or a directory holds no .tar."""
    if isinstance(pattern, (list, tuple)):
        out = []
        for p in pattern:
            out += expand_urls(p)
        return out
    if not isinstance(pattern, (str, os.PathLike)) or not str(pattern).strip():
        raise FileNotFoundError(f"expand_urls: empty or invalid shard pattern {pattern!r}")
    pattern = os.fspath(pattern)
    out, missing = [], []
    for piece in pattern.split("::"):
        piece = os.path.expanduser(piece.strip())
        if not piece:
            continue
        for p in _expand_braces(piece):
            if any(c in p for c in "*?["):
                hits = sorted(glob(p))
                if hits:
                    out += hits
                else:
                    missing.append(p)
            elif os.path.isdir(p):
                hits = sorted(glob(os.path.join(p, "*.tar")))
                if not hits:
                    raise FileNotFoundError(f"no *.tar shards in directory {p!r} (from pattern {pattern!r})")
                out += hits
            elif os.path.exists(p):
                out.append(p)
            else:
                missing.append(p)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} path(s) do not exist: "
                                f"{missing[:5]}{more}")
    if not out:
        raise FileNotFoundError(f"shard pattern {pattern!r} names no shards")
    return out


# ----------------------------------------------------------------------------------------------------------------
# decoding


def decode_image(b):
    """bytes -> uint8 (H, W, 3) RGB. Raises on undecodable data (PIL loads lazily: force it)."""
    with Image.open(io.BytesIO(b)) as im:
        im.load()
        return np.asarray(im.convert("RGB")).copy()


def decode_mask(b):
    """bytes (png) -> uint8 (H, W) of stored values (L or P mode; RGB masks keep their first channel)."""
    with Image.open(io.BytesIO(b)) as im:
        im.load()
        a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., 0]
    return a.astype(np.uint8, copy=True) if a.dtype != np.uint8 else a.copy()


_NPY_HEADER = re.compile(r"\{'descr':\s*'([^']+)',\s*'fortran_order':\s*(True|False),"
                         r"\s*'shape':\s*\(([\d,\s]*)\),?\s*\}")


def decode_npy(b):
    """.npy bytes -> array, never unpickling. Fast path parses the plain header itself (np.load's literal_eval
    costs more than decoding a 64x64 map); anything unusual goes through np.load(allow_pickle=False)."""
    if b[:6] == b"\x93NUMPY" and len(b) > 12:
        hl, start = (int.from_bytes(b[8:10], "little"), 10) if b[6] == 1 else (int.from_bytes(b[8:12], "little"), 12)
        m = _NPY_HEADER.match(b[start:start + hl].decode("latin1").strip())
        if m:
            dt = np.dtype(m.group(1))
            shape = tuple(int(v) for v in m.group(3).replace(" ", "").split(",") if v)
            count = math.prod(shape)
            if not dt.hasobject and len(b) >= start + hl + count * dt.itemsize:
                a = np.frombuffer(b, dt, count=count, offset=start + hl)
                return a.reshape(shape, order="F" if m.group(2) == "True" else "C").copy()
    return np.load(io.BytesIO(b), allow_pickle=False)


def split_name(name):
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'); None when the basename has no extension."""
    d, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    d = d[2:] if d.startswith("./") else ("" if d == "." else d)
    return (d + "/" + stem if d else stem), ext


def decode_sample(members, key):
    """{ext: bytes} -> sample dict (see the module docstring). Raises ValueError('bad_<what>') on bad members."""
    s, meta = {"__key__": key}, None
    for ext, b in members.items():
        e = ext.lower()
        try:
            if e in IMAGE_EXTS:
                s["image"] = decode_image(b)
            elif e == "seg.png":
                s["seg"] = decode_mask(b)
            elif e == "inst.png":
                s["instances"] = decode_mask(b)
            elif e == "depth.npy":
                s["depth"] = decode_npy(b)
            elif e in ("txt", "text"):
                s["caption"] = b.decode("utf-8").strip()
            elif e == "json":
                meta = json.loads(b.decode("utf-8"))
            elif e == "cls":
                s["label"] = int(b.decode("utf-8").strip())
            else:
                s[ext] = b
        except Exception as err:  # noqa: BLE001 - any decoder failure marks the sample corrupt
            what = "image" if e in IMAGE_EXTS else e.replace(".", "_")
            raise ValueError(f"bad_{what}") from err
    if isinstance(meta, dict):
        for k, v in meta.items():
            s.setdefault(k, v)
    elif meta is not None:
        s.setdefault("json", meta)
    return s


# ----------------------------------------------------------------------------------------------------------------
# keys: hashing, held-out fractions


def key_hash(key):
    """Stable 63-bit hash of a sample key (blake2b; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little") >> 1


def key_split(key, holdout):
    """Which split a key of a single-stream dataset belongs to: u = key_hash / 2^63 in [0, 1); "test" if
    u < holdout, "val" if holdout <= u < 2 * holdout, else "train". The same key always lands in the same split,
    on every rank, worker and run, so a held-out sample can never reach training (no slicing, no wrap-around)."""
    u = key_hash(key) / 2.0**63
    return "test" if u < holdout else ("val" if u < 2 * holdout else "train")


def _mix(*xs):
    """Deterministic 63-bit seed from ints (SeedSequence hashing; Python's hash() is salted)."""
    return int(np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> 1)


def dist_info(rank=None, world_size=None):
    """(rank, world_size): explicit args > initialised torch.distributed > RANK/WORLD_SIZE env > (0, 1)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (int(rank) if rank is not None else r), (int(world_size) if world_size is not None else w)


# ----------------------------------------------------------------------------------------------------------------
# sources: what to read. Each is a small picklable description (no open files), so DataLoader workers get a copy.
#
# A source turns (epoch, consumer c of T) into an iterator of raw items -- cheap handles (an index, or a key plus
# the undecoded tar members) -- and decodes one raw item into a sample dict. Map-style sources (the world, folders,
# a list of samples) walk a (seed, epoch)-seeded permutation of their n items and consumer c takes positions
# c, c + T, ...; tar shards are dealt out to consumers per epoch (see ShardSource). Every item is read by exactly
# one consumer per epoch. Skipping a raw item (resume, foreign samples) never decodes it.


class WorldSource:
    """The embedded synthetic world. n=None: unbounded -- consumer c renders indices c, c + T, c + 2T, ... forever
    (no epochs, no memory). n: the first n indices of the world's split, in epochs. cache=True keeps each rendered
    sample (only the `keep` fields, if given) so later epochs do not render again: the miniature's fast path."""

    def __init__(self, world, n=None, cache=False, keep=None):
        self.world, self.n, self.cache = world, (None if n is None else int(n)), bool(cache)
        self.keep = None if keep is None else tuple(set(keep) | {"__key__"})
        years = f", years={world.years}" if world.years is not None else ""
        self.name = f"world(seed={world.seed}, split={world.split}, size={world.size}{years})"
        self._memo = {}

    def __len__(self):
        if self.n is None:
            raise TypeError("an unbounded WorldSource has no length")
        return self.n

    def key(self, i):
        return f"{self.world.split}-{self.world._ykey}{int(i):09d}"

    def decode(self, i, images=True):
        if i in self._memo:
            return self._memo[i]
        s = self.world.sample(int(i))
        if self.keep is not None:
            s = {k: v for k, v in s.items() if k in self.keep}
        if self.cache:
            self._memo[i] = s
        return s


class SampleSource:
    """A list of ready sample dicts (each with "__key__"): for data a script built in memory."""

    def __init__(self, samples, name="samples"):
        self.samples, self.name = list(samples), name

    def __len__(self):
        return len(self.samples)

    def key(self, i):
        return self.samples[i]["__key__"]

    def decode(self, i, images=True):
        return self.samples[i]


class FolderSource:
    """Image folders, as a map-style source of n files.

    root/CLASS/*.jpg       -> {"image", "label", "__key__": "CLASS/stem"}; .classes = sorted folder names
    root/*.jpg + captions.jsonl lines {"file", "caption", ...} -> {"image", "caption", "__key__", ...extra}

    split: with holdout > 0, each class's files are ranked by key hash and the first round(holdout * n_class) are
    "test", the next as many "val", the rest "train" -- a per-class split, so train and eval share every class
    (a class-sorted "first n" cut would not). holdout=0 keeps every file."""

    def __init__(self, root, split="train", holdout=0.0, extensions=FOLDER_EXTS):
        self.root, self.split, self.holdout = os.fspath(root), split, float(holdout)
        self.name = f"folder({self.root}, {split})"
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} is not a directory")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        index = os.path.join(self.root, "captions.jsonl")
        groups = {}
        self.classes, self.skipped = None, Counter()
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                for ln, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        d = json.loads(line)
                        name, cap = d["file"], d["caption"]
                        if not isinstance(cap, str):
                            raise TypeError
                    except Exception:  # noqa: BLE001 - any malformed line is skipped and counted
                        self.skipped["bad_line"] += 1
                        continue
                    path = os.path.join(self.root, name)
                    if not os.path.isfile(path):
                        self.skipped["missing_file"] += 1
                        continue
                    extra = {k: v for k, v in d.items() if k not in ("file", "caption")}
                    groups.setdefault(None, []).append((path, os.path.splitext(name)[0], {"caption": cap, **extra}))
        else:
            self.classes = sorted(d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))
            for c, cname in enumerate(self.classes):
                d = os.path.join(self.root, cname)
                for f in sorted(os.listdir(d)):
                    if f.lower().endswith(exts):
                        groups.setdefault(c, []).append((os.path.join(d, f), f"{cname}/{os.path.splitext(f)[0]}",
                                                         {"label": c}))
        if not groups:
            raise FileNotFoundError(f"image folder {self.root!r}: no images; expected root/CLASS/*.jpg class folders "
                                    "or root/*.jpg + captions.jsonl lines {\"file\": ..., \"caption\": ...}")
        self.items = []
        for _, its in sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            if self.holdout > 0:
                its = sorted(its, key=lambda it: key_hash(it[1]))
                k = int(round(self.holdout * len(its)))
                its = {"test": its[:k], "val": its[k:2 * k], "train": its[2 * k:]}[split]
            self.items += its
        if not self.items:
            raise FileNotFoundError(f"image folder {self.root!r}: no {split!r} images with holdout={holdout}")

    def __len__(self):
        return len(self.items)

    def key(self, i):
        return self.items[i][1]

    def decode(self, i, images=True):
        path, key, extra = self.items[i]
        if not images:
            return {"__key__": key, **extra}
        with open(path, "rb") as f:
            b = f.read()
        try:
            img = decode_image(b)
        except Exception as err:  # noqa: BLE001
            raise ValueError("bad_image") from err
        return {"__key__": key, "image": img, **extra}


class ShardSource:
    """webdataset tar shards (module docstring for the layout and decoding).

    Dealing shards to T = ranks x workers consumers, per epoch: every consumer computes the same (seed, epoch)
    shard permutation; with S shards the first (S // T) * T go whole to consumers (c, c + T, ...), the S % T left
    over (all of them when S < T) are split at sample level (sample j of those shards -> consumer j % T; foreign
    samples are skipped before decoding). Every sample is read once per epoch, and ranks stay balanced to within a
    shard. split/holdout: for a single stream without its own eval data, keep only keys whose key_split is `split`.
    require: a sample lacking one of these fields (or with an empty caption) is skipped and counted."""

    def __init__(self, urls, split=None, holdout=0.0, require=("image",)):
        self.pattern, self.urls = urls, expand_urls(urls)
        self.split, self.holdout, self.require = split, float(holdout), tuple(require or ())
        self.name = f"shards({urls}{', ' + split if split and holdout else ''})"

    def raw(self, epoch, c, T, seed, shuffle):
        """(key, {ext: bytes}) groups of consumer c's share of `epoch`, in read order. Bad shards are counted in
        the generator's .report (a dict reason -> count) by _read_shard."""
        n = len(self.urls)
        order = list(range(n))
        if shuffle:  # the same shard order on every consumer
            order = [int(j) for j in np.random.default_rng(_mix(seed, epoch, 2)).permutation(n)]
        k = (n // T) * T
        for j in order[c:k:T]:
            yield from self._keep(self.groups(j), 1, 0)
        yield from self._keep((g for j in order[k:] for g in self.groups(j)), T, c)

    def groups(self, j):
        """(key, {ext: bytes}) groups of shard j in file order; the one place a subclass changes what a shard
        holds (common.datacompdr.DRShards joins an image shard with its reinforcement shard here)."""
        return _read_shard(self.urls[j], self.report)

    def _keep(self, groups, T, c):
        for j, (key, members) in enumerate(groups):
            if j % T != c:
                continue
            if self.holdout and key_split(key, self.holdout) != self.split:
                continue
            yield key, members

    def key(self, item):
        return item[0]

    def decode(self, item, images=True):
        key, members = item
        if not images:  # a text pass (counting captions): skip the expensive member
            members = {e: b for e, b in members.items() if e.lower() not in IMAGE_EXTS}
        s = decode_sample(members, key)
        for k in self.require:
            if k == "image" and not images:
                continue
            if k not in s:
                raise ValueError(f"missing_{k}")
            if k in ("caption", "alt_text") and not str(s[k]).strip():
                raise ValueError(f"empty_{k}")
        return s

    report = None  # set per consumer by the stream: Counter of shard-level problems


def _read_shard(url, report):
    """Yield (key, {ext: bytes}) groups of one shard; a corrupt/truncated shard ends early, counted in `report`."""
    key, group = None, {}
    try:
        with open(url, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic = f.read(6)
            f.seek(0)
            compressed = magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    kx = split_name(m.name)
                    if kx is None:
                        continue
                    k, ext = kx
                    data = tf.extractfile(m).read()
                    if k != key:
                        if key is not None:
                            yield key, group
                        key, group = k, {}
                    group[ext] = data
                end = tf.offset
        # tarfile treats a file cut at a header boundary as a normal end; a complete archive has zero blocks after
        # its last member, so a shorter file is truncated (and its last sample possibly incomplete)
        if not compressed and size < end + 512:
            raise tarfile.ReadError(f"truncated archive: {size} bytes, no end-of-archive block after byte {end}")
        if key is not None:
            yield key, group
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as err:
        if report is not None:
            report["bad_shard"] += 1
            if group:
                report["truncated_sample"] += 1
        warnings.warn(f"skipping the rest of shard {url!r}: {type(err).__name__}: {err}", RuntimeWarning,
                      stacklevel=2)


def open_source(data, split="train", *, world=None, n=None, val_data="", holdout=0.0, require=("image",),
                cache=True, keep=None):
    """The source for one split of `--data` (or the world when data is empty).

    data ""            -> WorldSource(world(split), n, cache, keep): world is a callable split -> World
    "{split}" in data  -> that split's own files (data.replace("{split}", split))
    val_data           -> the eval splits ("val", "test") read it (its own "{split}" files, or val and test as the
                          two halves by key hash); train reads all of data
    otherwise          -> one stream split by key hash: holdout is the fraction for "test" and again for "val"
                          (key_split); holdout=0 with a single stream is an error for eval splits, since the
                          eval set would be the training set.
    Shards: "dir/shard-{000..099}.tar", "a.tar::b.tar", globs, or a directory of *.tar. Folders: class folders or
    captions.jsonl. Raises FileNotFoundError / ValueError naming the path and the accepted layouts."""
    if not data:
        if world is None:
            raise ValueError("open_source: no --data and no world given")
        return WorldSource(world(split), n=n, cache=cache, keep=keep)
    data = os.fspath(data)
    h = 0.0
    if "{split}" in data:
        data = data.replace("{split}", split)
    elif val_data and split == "train":
        pass  # eval data lives elsewhere: train on all of --data
    elif split != "train" and val_data:  # separate eval data: its own {split} files, else val / test halves by hash
        h = 0.0 if "{split}" in val_data else 0.5
        data = val_data.replace("{split}", split)
    else:
        h = holdout
        if split != "train" and h <= 0:
            raise ValueError(f"--data {data!r} has no '{{split}}' and no --val_data is given, so the {split!r} split "
                             "must be held out by key hash: set --holdout to a fraction in (0, 0.5), e.g. 0.05")
    if h and not 0 < h <= 0.5:
        raise ValueError(f"--holdout={h}: expected a fraction in (0, 0.5]")
    layouts = ("accepted layouts: tar shards ('dir/shard-{000..099}.tar', 'a.tar::b.tar', or a directory of *.tar), "
               "root/CLASS/*.jpg class folders, or root/*.jpg + root/captions.jsonl")
    if os.path.isdir(data) and not glob(os.path.join(data, "*.tar")):
        return FolderSource(data, split=split, holdout=h)
    if os.path.isdir(data) or "::" in data or _RANGE.search(data) or any(c in data for c in "*?[") \
            or data.endswith((".tar", ".tar.gz", ".tgz")):
        return ShardSource(data, split=split, holdout=h, require=require)
    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data!r} does not exist; {layouts}")
    raise ValueError(f"--data {data!r} is not a recognised dataset; {layouts}")


def class_names_of(source, default=None):
    """Class names that label ids index: a folder's class folder names ('_' -> ' '), a `classes.txt` (one name per
    line) beside the shards, or `default` (the world's names for the world). Raises FileNotFoundError saying what
    would supply them when there are none."""
    if isinstance(source, FolderSource) and source.classes:
        return [c.replace("_", " ") for c in source.classes]
    if isinstance(source, ShardSource):
        cands = [os.path.join(os.path.dirname(u), "classes.txt") for u in source.urls[:1]]
        for p in cands:
            if os.path.isfile(p):
                with open(p, encoding="utf-8") as f:
                    names = [ln.strip() for ln in f if ln.strip()]
                if names:
                    return names
        if default is None:
            raise FileNotFoundError(f"{source.name}: no class names: put a classes.txt (one name per line, line i = "
                                    f"label i) in {os.path.dirname(source.urls[0])!r}")
    if default is None:
        raise FileNotFoundError(f"{getattr(source, 'name', source)}: no class names known")
    return list(default)


def collate(samples, keys=None):
    """List of sample dicts -> dict of batched values: numpy arrays / tensors stacked into tensors (B, ...), ints ->
    int64, floats -> float32, bools -> bool tensors; strings, bytes, dicts, lists and ragged arrays stay lists.
    keys: only these keys (KeyError naming a missing one)."""
    if not samples:
        raise ValueError("collate: empty batch")
    keys = list(samples[0].keys()) if keys is None else list(keys)
    out = {}
    for k in keys:
        try:
            vals = [s[k] for s in samples]
        except KeyError:
            bad = next(s.get("__key__", "?") for s in samples if k not in s)
            raise KeyError(f"collate: sample {bad!r} has no key {k!r} (keys: {sorted(samples[0])})") from None
        out[k] = _stack(vals)
    return out


def _stack(vals):
    v0 = vals[0]
    try:
        if isinstance(v0, torch.Tensor):
            return torch.stack(vals)
        if isinstance(v0, np.ndarray):
            return torch.from_numpy(np.stack(vals))
        if isinstance(v0, (bool, np.bool_)):
            return torch.tensor([bool(v) for v in vals])
        if isinstance(v0, (int, np.integer)):
            return torch.tensor([int(v) for v in vals], dtype=torch.int64)
        if isinstance(v0, (float, np.floating)):
            return torch.tensor([float(v) for v in vals], dtype=torch.float32)
    except (RuntimeError, ValueError, TypeError):
        pass  # ragged shapes / mixed types: keep a list
    return list(vals)


# ----------------------------------------------------------------------------------------------------------------
# the stream: batches for a training loop


def _consumer_items(src, epoch, c, T, seed, shuffle):
    """Raw items of consumer c in `epoch` for any source."""
    if isinstance(src, ShardSource):
        return src.raw(epoch, c, T, seed, shuffle)
    if isinstance(src, WorldSource) and src.n is None:  # unbounded: one endless "epoch"
        return itertools.count(c, T)
    n = len(src)
    if shuffle:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 4))).tolist()
    else:
        perm = list(range(n))
    return iter(perm[c::T])


def _shuffled(src, size, g):
    """Shuffle buffer: fill to `size`, then emit a random buffered item per incoming one; drain at the end (so an
    epoch ends with an empty buffer, which is what makes (epoch, position) a complete resume state)."""
    buf = []
    for s in src:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(g.integers(0, size))
        buf[j], s = s, buf[j]
        yield s
    while buf:
        j = int(g.integers(0, len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class _Batches(IterableDataset):
    """One rank's batches; in a DataLoader each worker w builds whole batches from its own consumer stream
    (consumer c = w * R + rank of T = R * K). Batch j of worker w is step w + j * K of the rank (DataLoader
    returns its workers' batches round-robin, and these streams never end)."""

    def __init__(self, src, batch_size, transform, seed, rank, world, shuffle, shuffle_buffer):
        self.src, self.B, self.transform, self.seed = src, int(batch_size), transform, int(seed)
        self.rank, self.world, self.shuffle, self.shuffle_buffer = rank, world, bool(shuffle), int(shuffle_buffer)
        self.start = {}  # logical worker -> state to resume from
        self.offset = 0  # first step of this iteration, mod K

    def __iter__(self):
        wi = get_worker_info()
        p, K = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        # DataLoader asks its workers 0, 1, ... in turn from the first batch on; a rank resumed at step s needs
        # logical worker s % K first, so physical worker p plays logical worker (p + s) % K
        yield from self.worker_batches((p + self.offset) % K, K)

    def worker_batches(self, w, K):
        T, c = self.world * K, w * self.world + self.rank
        st = dict(self.start.get(w) or {"epoch": 0, "pos": 0, "count": 0, "skipped": {}})
        skipped = Counter(st["skipped"])
        src = self.src
        epoch, pos, count = st["epoch"], st["pos"], st["count"]
        batch = []
        while True:
            if isinstance(src, ShardSource):
                src.report = skipped
            items = _consumer_items(src, epoch, c, T, self.seed, self.shuffle)
            if self.shuffle_buffer > 0 and isinstance(src, ShardSource) and self.shuffle:
                items = _shuffled(items, self.shuffle_buffer, np.random.default_rng(_mix(self.seed, epoch, c, 3)))
            items = itertools.islice(items, pos, None)  # resume: skip without decoding
            first, raw, good = pos, 0, 0
            for item in items:
                pos += 1
                raw += 1
                try:
                    s = src.decode(item)
                except ValueError as err:
                    skipped[str(err).split(":")[0] or "bad_sample"] += 1
                    continue
                count += 1
                good += 1
                key = s["__key__"]
                if self.transform is not None:
                    # per-sample generator: augmentation depends only on (seed, consumer, sample count), never on
                    # how the run was split into sessions
                    s = self.transform(s, torch.Generator().manual_seed(_mix(self.seed, c, count - 1, 6)))
                s.setdefault("__key__", key)
                batch.append(s)
                if len(batch) == self.B:
                    state = {"epoch": epoch, "pos": pos, "count": count, "skipped": dict(skipped)}
                    yield collate(batch), state
                    batch = []
            if good == 0 and first == 0:
                raise RuntimeError(f"{src.name}: consumer {c} of {T} (rank {self.rank}, worker {w}) got no usable "
                                   f"sample in epoch {epoch}: fewer shards/samples than ranks x workers, or every "
                                   f"sample was skipped ({dict(skipped)})")
            epoch, pos = epoch + 1, 0


def default_workers(source, world=1):
    """0 for in-memory / rendered sources (the world renders faster in-process than it pickles to a worker);
    for files min(4, cores per rank) -- decoding and augmentation then overlap the training step."""
    if isinstance(source, (WorldSource, SampleSource)):
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, min(4, (os.cpu_count() or 1) // max(local, 1)))


def _identity(x):
    return x


class Stream:
    """Training batches from a source, split over ranks and DataLoader workers, resumable exactly.

        stream = Stream(source, batch_size=B_local, transform=fn, seed=cfg.seed, num_workers=2, dist=dist)
        batch = stream(i)        # the batch of step i: a dict of stacked tensors (+ "__key__" list), on device

    transform(sample, g) -> dict runs inside the workers (decode -> resize/augment -> tokenize), with a torch
    Generator g seeded by (seed, consumer, sample count); post(batch) -> anything runs in the training process on
    the device batch (e.g. to return the (images, tokens) tuple a loss wants). num_workers < 0: default_workers. The stream never ends: epochs follow each other, each with
    a fresh (seed, epoch) permutation (and shuffle buffer for shards). `stream(i)` must be called for i = start,
    start + 1, ... (fit does); state_dict() after step i and load_state_dict() before it make a killed run continue
    with the same batches (fit saves and restores it with its checkpoints). Resuming needs the same number of
    ranks and workers. The stream also counts what it gave (samples, unique key hashes, skipped samples) for the
    results' provenance block (data_report)."""

    def __init__(self, source, batch_size, transform=None, *, seed=0, num_workers=-1, shuffle=True,
                 shuffle_buffer=1000, dist=None, device="cpu", name="train", prefetch=2, post=None):
        self.source, self.B, self.name, self.post = source, int(batch_size), name, post
        self.rank, self.world = (dist.rank, dist.world_size) if dist is not None else dist_info()
        self.device = str(dist.device if dist is not None else device)
        self.K = default_workers(source, self.world) if num_workers is None or num_workers < 0 else int(num_workers)
        self.prefetch = int(prefetch)
        self.ds = _Batches(source, batch_size, transform, seed, self.rank, self.world, shuffle, shuffle_buffer)
        self.step = 0
        self.workers = {}     # worker -> state after its last consumed batch
        self.seen = 0
        self._keys = [np.zeros(0, np.int64)]  # [merged unique hashes, then one array per batch since]
        self._it = None

    # -- batches --

    def _iterator(self):
        self.ds.start = dict(self.workers)
        self.ds.offset = self.step % max(self.K, 1)
        if self.K == 0:
            return self.ds.worker_batches(0, 1)
        loader = DataLoader(self.ds, batch_size=None, collate_fn=_identity, num_workers=self.K,
                            pin_memory=self.device.startswith("cuda"), prefetch_factor=self.prefetch,
                            persistent_workers=False, generator=torch.Generator().manual_seed(0))
        return iter(loader)  # own generator: starting workers must not draw from the training RNG (dropout)

    def __call__(self, i):
        if self._it is None:
            if i != self.step:
                raise RuntimeError(f"Stream {self.name!r}: asked for step {i} but the stream is at step {self.step} "
                                   "(resume through fit's checkpoint, which restores the stream state)")
            self._it = self._iterator()
        elif i != self.step:
            raise RuntimeError(f"Stream {self.name!r}: steps must be consecutive: expected {self.step}, got {i}")
        batch, state = next(self._it)
        w = self.step % max(self.K, 1)
        self.workers[w] = state
        self.step += 1
        keys = batch.get("__key__", [])
        self.seen += len(keys)
        self._keys.append(np.array([key_hash(k) for k in keys], np.int64))
        batch = _to_device(batch, self.device)
        return self.post(batch) if self.post is not None else batch

    def close(self):
        self._it = None

    # -- state --

    def unique_keys(self):
        """Sorted unique key hashes this rank has trained on (int64)."""
        if len(self._keys) > 1:
            self._keys = [np.unique(np.concatenate(self._keys))]
        return self._keys[0]

    def skipped(self):
        tot = Counter()
        for st in self.workers.values():
            tot.update(st.get("skipped", {}))
        return dict(tot)

    def state_dict(self):
        """JSON-able state plus one int64 tensor of key hashes: {"meta": {...}, "keys": tensor}."""
        return {"meta": {"step": self.step, "rank": self.rank, "world": self.world, "num_workers": self.K,
                         "seen": self.seen, "workers": {str(w): s for w, s in self.workers.items()}},
                "keys": torch.from_numpy(self.unique_keys().copy())}

    def load_state_dict(self, sd):
        m = sd["meta"]
        if (m["world"], m["num_workers"]) != (self.world, self.K):
            raise ValueError(f"Stream {self.name!r}: the checkpoint's data state was saved with {m['world']} ranks x "
                             f"{m['num_workers']} workers, this run has {self.world} x {self.K}; resume with the "
                             "same number of processes and --num_workers")
        self.step, self.seen = int(m["step"]), int(m["seen"])
        self.workers = {int(w): s for w, s in m["workers"].items()}
        self._keys = [np.unique(sd["keys"].numpy().astype(np.int64))]
        self._it = None


class Zip:
    """Streams advanced together, for a stage that draws from several sources at once (e.g. new data + replay):
    zip(i) -> (a(i), b(i), ...). fit checkpoints and restores all their states through it."""

    def __init__(self, *streams):
        self.streams = streams

    def __call__(self, i):
        return tuple(s(i) for s in self.streams)

    def state_dict(self):
        sds = [s.state_dict() for s in self.streams]
        return {"meta": {"zip": [sd["meta"] for sd in sds], "lengths": [len(sd["keys"]) for sd in sds]},
                "keys": torch.cat([sd["keys"] for sd in sds])}

    def load_state_dict(self, sd):
        parts = torch.split(sd["keys"], sd["meta"]["lengths"])
        for s, m, k in zip(self.streams, sd["meta"]["zip"], parts):
            s.load_state_dict({"meta": m, "keys": k})


def _to_device(batch, device):
    if device == "cpu":
        return batch
    nb = device.startswith("cuda")
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# one pass: evaluation sets, pre-passes (counting), artifacts built shard by shard


class SampleList(list):
    """A list of samples that also says where they came from and how many were skipped."""
    name = ""
    skipped = None


def iter_samples(source, rank=0, world=1, n=None, seed=0, images=True):
    """One pass over `source` in its natural order, this rank's share only (consumer rank of world), decoded;
    yields at most n samples. Natural order: world / sample lists by index, tar shards as listed, folders in a
    seed-0 permutation (class-sorted order would make "the first n" a few classes). Never wraps around. For a count
    of skipped samples use read_samples. images=False: text and metadata only (tar image members and folder files
    are not read), for cheap pre-passes such as counting caption words."""
    yield from _one_pass(source, rank, world, n, seed, Counter(), images)


def _one_pass(source, rank, world, n, seed, skipped, images=True):
    if isinstance(source, ShardSource):
        source.report = skipped
        items = source.raw(0, rank, world, seed, shuffle=False)
    elif isinstance(source, WorldSource) and source.n is None:
        if n is None:
            raise ValueError("iter_samples: an unbounded world needs n")
        items = itertools.count(rank, world)
    else:
        items = iter(_consumer_items(source, 0, rank, world, seed, shuffle=isinstance(source, FolderSource)))
    got = 0
    for item in items:
        if n is not None and got >= n:
            return
        try:
            s = source.decode(item) if images else source.decode(item, images=False)
        except ValueError as err:
            skipped[str(err).split(":")[0] or "bad_sample"] += 1
            continue
        got += 1
        yield s


def read_samples(source, n=None, transform=None, rank=0, world=1):
    """Up to n samples of `source` (all of it when n is None; one pass, see iter_samples), optionally mapped by
    transform(sample) -> dict. Returns a SampleList with .skipped (Counter) and .name. Fewer than n samples is
    allowed (with a warning): an evaluation set is what the data holds, never padded by wrapping around."""
    skipped = Counter()
    out = SampleList()
    for s in _one_pass(source, rank, world, n, 0, skipped):
        out.append(transform(s) if transform is not None else s)
    out.skipped, out.name = skipped, getattr(source, "name", "")
    if n is not None and len(out) < n:
        warnings.warn(f"{out.name}: only {len(out)} samples (asked for {n}); using them all", RuntimeWarning,
                      stacklevel=2)
    if not out:
        raise ValueError(f"{out.name}: no usable samples (skipped: {dict(skipped)})")
    return out


def stack(samples, key, dtype=None):
    """samples[i][key] stacked into one tensor (images, labels, masks), or a list for strings."""
    vals = [s[key] for s in samples]
    if isinstance(vals[0], str):
        return vals
    out = _stack(vals)
    return out.to(dtype) if dtype is not None and torch.is_tensor(out) else out


def for_each_shard(source, out_dir, fn, dist=None, shard_size=1000, prefix="part", progress=True, fingerprint=None):
    """Build a per-sample artifact by streaming: input units (a tar shard each, or shard_size indices of a map-style
    source) are dealt to ranks round-robin; for each unit whose output `{out_dir}/{prefix}-{unit:06d}.tar` does
    not exist yet, fn(samples) -> iterable of (key, {ext: bytes}) is written to it atomically (tmp + rename). So a
    killed build resumes at the first missing shard, and no rank ever holds more than one unit. fingerprint: the
    config that determines the output; shards built under another one are deleted first, and out_dir is marked
    (common.train.stage_current) once complete. Returns all output paths, after a barrier."""
    from common.train import _stage_mark, mark_stage, stage_fingerprint
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if fingerprint is not None:
        mark = _stage_mark(out_dir) if os.path.isdir(out_dir) else None
        same = mark is not None and mark.get("fingerprint") == stage_fingerprint(fingerprint)
        if dist is not None:
            dist.barrier()  # every rank has read the mark before rank 0 changes anything
        if rank == 0:
            if not same:  # built under another configuration (or unmarked): start from nothing
                for p in glob(os.path.join(out_dir, f"{prefix}-*.tar")):
                    os.remove(p)
            os.makedirs(out_dir, exist_ok=True)
            if not (same and mark.get("complete", True)):
                mark_stage(out_dir, fingerprint, complete=False)
        if dist is not None:
            dist.barrier()
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(source, ShardSource):
        units = [(j, u) for j, u in enumerate(source.urls)]
    else:
        n = len(source)
        units = [(j, range(a, min(n, a + shard_size))) for j, a in enumerate(range(0, n, shard_size))]
    paths = [os.path.join(out_dir, f"{prefix}-{j:06d}.tar") for j, _ in units]
    mine = [(j, u) for j, u in units if j % world == rank and not os.path.exists(paths[j])]
    skipped = Counter()
    from tqdm import tqdm
    for j, u in tqdm(mine, desc=f"{prefix} shards (rank {rank})", disable=not progress or rank != 0,
                     mininterval=1.0, leave=False):
        if isinstance(source, ShardSource):
            source.report = skipped
            raw = source._keep(source.groups(j), 1, 0)
        else:
            raw = iter(u)

        def samples(raw=raw):
            for item in raw:
                try:
                    yield source.decode(item)
                except ValueError as err:
                    skipped[str(err).split(":")[0] or "bad_sample"] += 1

        tmp = paths[j] + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for key, members in fn(samples()):
                for ext, data in members.items():
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                    tf.addfile(ti, io.BytesIO(data))
        os.replace(tmp, paths[j])
    if skipped:
        warnings.warn(f"for_each_shard {out_dir!r} rank {rank}: skipped {dict(skipped)}", RuntimeWarning,
                      stacklevel=2)
    if dist is not None:
        dist.barrier()
    if fingerprint is not None and rank == 0:
        mark_stage(out_dir, fingerprint)
    if dist is not None:
        dist.barrier()
    return paths


# ----------------------------------------------------------------------------------------------------------------
# provenance


def _all_sum(x, dist):
    from common.train import all_reduce
    return [int(v) for v in all_reduce(torch.tensor([float(v) for v in x], dtype=torch.float64), dist).tolist()]


def _global_unique(keys, dist):
    """Number of distinct hashes over all ranks: bucket by hash % world, gather bucket r on rank r, count there."""
    if dist is None or not dist.distributed:
        return len(np.unique(keys))
    R, dev = dist.world_size, dist.device
    td = torch.distributed
    mine = 0
    lens = torch.tensor([int(np.sum(keys % R == r)) for r in range(R)], dtype=torch.int64, device=dev)
    L = lens.clone()
    td.all_reduce(L, op=td.ReduceOp.MAX)
    for r in range(R):
        b = keys[keys % R == r]
        buf = torch.full((int(L[r]) + 1,), -1, dtype=torch.int64)
        buf[:len(b)] = torch.from_numpy(b)
        buf = buf.to(dev)
        got = [torch.empty_like(buf) for _ in range(R)] if dist.rank == r else None
        td.gather(buf, got, dst=r)
        if dist.rank == r:
            allb = torch.cat(got).cpu().numpy()
            mine = len(np.unique(allb[allb >= 0]))
    return _all_sum([mine], dist)[0]


SKIP_REASONS = ("bad_image", "bad_shard", "truncated_sample", "missing_image", "missing_caption", "missing_alt_text",
                "empty_caption", "empty_alt_text", "bad_seg_png", "bad_inst_png", "bad_depth_npy", "bad_json",
                "bad_txt", "bad_sample")


def data_report(streams, eval_samples=(), dist=None, source=None, eval_source=None):
    """The `data` block of results.json (collective: call it on every rank).

    streams: this rank's training Streams; eval_samples: rank 0's SampleLists used for evaluation (ignored on other
    ranks). Returns {"source", "eval_source", "train_samples_seen", "train_unique_keys" (per-rank unique keys summed
    over ranks), "train_keys_on_several_ranks" (0 while ranks read disjoint samples, i.e. within the first epoch),
    "eval_samples", "eval_keys_in_train" (must be 0), "skipped_corrupt" (train + eval, by reason and total)}."""
    streams = [s for s in streams if s is not None]
    keys = np.unique(np.concatenate([s.unique_keys() for s in streams])) if streams else np.zeros(0, np.int64)
    seen = sum(s.seen for s in streams)
    skipped = Counter()
    for s in streams:
        skipped.update(s.skipped())
    master = dist is None or dist.is_master
    ev = [x for x in (eval_samples if master else ())]
    if master:
        for x in ev:
            skipped.update(x.skipped or {})
    eh = np.array([key_hash(s["__key__"]) for x in ev for s in x], np.int64)
    n_eval = len(eh)
    if dist is not None and dist.distributed:  # rank 0's eval hashes to everyone
        from common.train import all_gather_rows
        eh = all_gather_rows(torch.from_numpy(eh), dist).numpy()  # only rank 0 contributes rows
    hits = int(np.isin(np.unique(eh), keys).sum())
    other = sum(v for r, v in skipped.items() if r not in SKIP_REASONS)
    tot = _all_sum([seen, len(keys), hits, n_eval, other] + [skipped[r] for r in SKIP_REASONS], dist)
    uniq = _global_unique(keys, dist)
    eval_source = eval_source or ", ".join(sorted({x.name for x in ev}))
    if dist is not None and dist.distributed:  # rank 0 knows the eval sets
        from common.train import broadcast_json
        eval_source = broadcast_json(eval_source, dist)
    by = {r: v for r, v in zip(("other",) + SKIP_REASONS, tot[4:]) if v}
    return {"source": source or ", ".join(sorted({s.source.name for s in streams})),
            "eval_source": eval_source,
            "train_samples_seen": tot[0], "train_unique_keys": tot[1],
            "train_keys_on_several_ranks": tot[1] - uniq, "eval_samples": tot[3], "eval_keys_in_train": tot[2],
            "skipped_corrupt": sum(by.values()), "skipped_by_reason": by}


# ----------------------------------------------------------------------------------------------------------------
# loader benchmark: python -m common.data bench --data=...


def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _bench_transform(image_size):
    from common.transforms import train_transform
    aug = train_transform(image_size, kind="rrc")

    def tf(s, g):
        return {"image": aug(s["image"], g)}
    return tf


def bench(data, image_size=224, n=512, batch_size=32, workers=(1, 2), rss_factor=10):
    """Loader throughput and memory on real files.

    decode: PIL decode alone, one process (the per-core ceiling). stream K: a Stream with K workers doing decode +
    RandomResizedCrop(image_size) + flip + normalise, n images after one warm-up batch; images/s in total and per
    worker. rss: a child process trains a linear probe on the stream until the decoded float32 pixels it has
    streamed exceed rss_factor x its own peak RSS, and reports both (memory must not grow with what is streamed)."""
    src = open_source(data, "train")
    out = {"data": data, "image_size": image_size, "cores": os.cpu_count()}
    raw = []
    if isinstance(src, ShardSource):
        for u in src.urls:
            for key, members in _read_shard(u, Counter()):
                b = next((members[e] for e in members if e.lower() in IMAGE_EXTS), None)
                if b is not None:
                    raw.append(b)
                if len(raw) >= n:
                    break
            if len(raw) >= n:
                break
    else:
        for path, _, _ in src.items[:n]:
            with open(path, "rb") as f:
                raw.append(f.read())
    t = time.perf_counter()
    for b in raw:
        decode_image(b)
    out["decode_images_per_s"] = len(raw) / (time.perf_counter() - t)
    out["decoded_image_px"] = list(decode_image(raw[0]).shape[:2])
    for K in workers:
        st = Stream(src, batch_size, _bench_transform(image_size), num_workers=K, shuffle_buffer=0)
        st(0)
        steps = max(1, n // batch_size)
        t = time.perf_counter()
        for i in range(1, steps + 1):
            st(i)
        rate = steps * batch_size / (time.perf_counter() - t)
        out[f"stream_{K}w_images_per_s"] = rate
        out[f"stream_{K}w_images_per_s_per_worker"] = rate / K
        st.close()
    import subprocess
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
            "from common.data import _rss_child\n"
            f"_rss_child({data!r}, {image_size}, {batch_size}, {rss_factor})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"bench rss child failed: {p.stderr[-2000:]}")
    out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def _rss_child(data, image_size, batch_size, factor):
    """Train a linear model on the stream until the pixels streamed exceed factor x this process's peak RSS."""
    src = open_source(data, "train")
    st = Stream(src, batch_size, _bench_transform(image_size), num_workers=2)
    model = torch.nn.Linear(3 * 16 * 16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    px = 3 * image_size * image_size * 4
    streamed, i = 0, 0
    while True:
        x = torch.nn.functional.adaptive_avg_pool2d(st(i)["image"], 16).flatten(1)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        streamed += x.shape[0] * px
        i += 1
        rss = _peak_rss_mb()  # the training process; the workers hold one shard reader + a shuffle buffer each
        if streamed / 2**20 > factor * rss and i > 20:
            break
    print(json.dumps({"rss_samples_streamed": i * batch_size, "rss_pixels_streamed_mb": streamed / 2**20,
                      "rss_unique_samples": len(st.unique_keys()), "rss_peak_mb": rss,
                      "rss_streamed_over_peak": streamed / 2**20 / rss}))


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m common.data", description="loader benchmark")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="images/s per worker (decode + RandomResizedCrop + normalise) and peak RSS")
    b.add_argument("--data", required=True, help="tar shards or an image folder")
    b.add_argument("--image_size", type=int, default=224)
    b.add_argument("--n", type=int, default=512, help="images timed per configuration")
    b.add_argument("--batch_size", type=int, default=32)
    b.add_argument("--out", default="", help="also write the numbers to this JSON file")
    a = ap.parse_args(argv)
    res = bench(a.data, a.image_size, a.n, a.batch_size)
    for k, v in res.items():
        print(f"{k:40s} {v:.1f}" if isinstance(v, float) else f"{k:40s} {v}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
