"""Real-data loading: webdataset-style tar shards (stdlib tarfile), image folders, dataset/loader helpers.

Tar shards follow the img2dataset / webdataset convention (conventions.md): members are grouped by key, where
key = member path up to the first dot of its basename and the extension is the rest ("000123.seg.png" ->
key "000123", ext "seg.png"). Members of one sample must be consecutive in the tar (as every writer does).
Decoding (ext lower-cased):

    png jpg jpeg webp bmp ppm -> "image"  uint8 (H, W, 3) RGB
    seg.png                   -> "seg"        uint8 (H, W)  (pixel values as stored: class ids)
    inst.png                  -> "instances"  uint8 (H, W)
    depth.npy                 -> "depth"      np.load(allow_pickle=False)
    txt / text                -> "caption"    str
    json                      -> its keys merged into the sample (a member key such as .txt wins on a clash);
                                 a non-dict JSON value goes under "json"
    cls                       -> "label"      int
    anything else             -> raw bytes under its extension (decode_npy / decode_image help)

plus "__key__". A shard exported by `common.world.export_shards` therefore yields exactly the keys of `World[i]`.

Distribution: `ShardDataset` splits work over R torchrun ranks x K DataLoader workers (T = R*K consumers, consumer
id c = worker * R + rank), in the epoch's shard order (identical on every consumer). With S shards, the first
(S // T) * T shards are split at shard level: consumer c reads shards c, c + T, ... (the cheap common case). The
S % T left-over shards -- all of them when S < T -- are split at sample level: every consumer reads them and keeps
sample i iff i % T == c (i counts samples of those shards, corrupt ones included, so the count agrees everywhere):
no overlap and no loss, ranks stay balanced to within a few samples for equal-size shards, at the cost of each
consumer reading (not decoding: foreign samples are skipped before decoding) up to T - 1 extra shards. DDP needs the
same number of batches on every rank: use equal-size shards, or set epoch_length, which makes it exact.
"""
import io
import json
import math
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from glob import glob

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

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
# distribution helpers


def dist_info(rank=None, world_size=None):
    """(rank, world_size): explicit args > initialised torch.distributed > RANK/WORLD_SIZE env > (0, 1)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return (int(rank) if rank is not None else r), (int(world_size) if world_size is not None else w)


def _mix(*xs):
    """Deterministic 63-bit seed from ints (SeedSequence hashing; Python's hash() is salted)."""
    return int(np.random.SeedSequence([int(x) & 0xFFFFFFFF for x in xs]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> 1)


# ----------------------------------------------------------------------------------------------------------------
# tar shards


class ShardDataset(IterableDataset):
    """Iterable over webdataset-style tar shards; yields sample dicts (module docstring for decoding/splitting).

    urls: pattern / list accepted by expand_urls. shuffle_buffer: sample shuffle buffer size (0 = file order; >0
    also shuffles the shard order each epoch). seed: all randomness (shard order, buffer, resampling) derives from
    (seed, epoch, rank, worker). epoch_length: exactly this many samples per epoch per rank (split over the rank's
    workers); without resampling a pass that runs out starts another pass. resample: shards drawn with replacement
    per consumer, an infinite stream unless epoch_length is set. require: keys a sample must have, else skipped
    (e.g. ("image", "caption") for image-text training). rank/world_size: override torch.distributed / env.

    Corrupt samples (undecodable member, missing required key), truncated/corrupt shards are skipped, counted in
    `self.skipped` (Counter by reason; in DataLoader worker processes the counts live in the worker's copy) and
    reported in one warning per epoch per consumer naming the shards. Call set_epoch(e) before iterating each
    epoch (with persistent_workers=True the workers keep the epoch they were started with)."""

    def __init__(self, urls, shuffle_buffer=0, seed=0, epoch_length=None, resample=False, require=("image",),
                 rank=None, world_size=None):
        super().__init__()
        self.pattern = urls
        self.urls = expand_urls(urls)
        self.shuffle_buffer, self.seed, self.resample = int(shuffle_buffer), int(seed), bool(resample)
        self.epoch_length = None if epoch_length is None else int(epoch_length)
        self.require = tuple(require or ())
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skipped = Counter()
        self.yielded = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        """Samples per epoch on this rank; only defined when epoch_length is set."""
        if self.epoch_length is None:
            raise TypeError("ShardDataset has no length unless epoch_length is set")
        return self.epoch_length

    # -- reading --

    def _read_shard(self, url, report):
        """Yield (key, {ext: bytes}) groups of one shard; a corrupt/truncated shard ends with a counted warning."""
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
            # tarfile treats a file cut at a header boundary as a normal end; a complete archive has zero blocks
            # after its last member, so a shorter file is truncated (and its last sample possibly incomplete)
            if not compressed and size < end + 512:
                raise tarfile.ReadError(f"truncated archive: {size} bytes, no end-of-archive block after byte {end}")
            if key is not None:
                yield key, group
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as err:
            self._skip("bad_shard", url, report)
            report.setdefault("errors", {})[url] = f"{type(err).__name__}: {err}"
            if group:  # the sample being read when the shard broke may be incomplete
                self._skip("truncated_sample", url, report)

    def _skip(self, reason, url, report):
        self.skipped[reason] += 1
        report.setdefault(reason, Counter())[url] += 1

    def _samples(self, urls, total, me, report):
        """Decoded samples of `urls`, keeping every `total`-th group starting at `me` (sample-level split)."""
        i = 0
        for url in urls:
            for key, group in self._read_shard(url, report):
                mine = i % total == me
                i += 1
                if not mine:
                    continue
                try:
                    s = decode_sample(group, key)
                except ValueError as err:
                    self._skip(str(err), url, report)
                    continue
                miss = [k for k in self.require if k not in s]
                if miss:
                    self._skip(f"missing_{miss[0]}", url, report)
                    continue
                yield s

    def _stream(self, rank, world, worker, nw, report):
        """One consumer's (unshuffled-by-buffer) sample stream for this epoch; infinite when resampling."""
        # consumer id worker-major (shard j -> rank j % world) so ranks differ by at most one shard
        total, me = world * nw, worker * world + rank
        n = len(self.urls)
        if self.resample:
            g = np.random.default_rng(_mix(self.seed, self.epoch, rank, worker, 1))
            while True:  # each consumer draws its own shards with replacement, n at a time
                got = 0
                for s in self._samples([self.urls[int(j)] for j in g.integers(0, n, size=n)], 1, 0, report):
                    got += 1
                    yield s
                if not got:
                    return
                self._report(report, rank, worker, got)  # an infinite stream still reports every n shards
                report.clear()
        rep = 0
        while True:
            order = list(range(n))
            if self.shuffle_buffer > 0:  # same shard order on every consumer: seeded by (seed, epoch, pass) only
                order = [int(j) for j in np.random.default_rng(_mix(self.seed, self.epoch, rep, 2)).permutation(n)]
            urls = [self.urls[j] for j in order]
            k = (n // total) * total
            got = False
            for s in self._samples(urls[me:k:total], 1, 0, report):  # whole shards
                got = True
                yield s
            for s in self._samples(urls[k:], total, me, report):  # the n % total left over: sample level
                got = True
                yield s
            # another pass only when epoch_length asks for more samples than one pass holds
            if self.epoch_length is None or not got:
                return
            rep += 1

    def __iter__(self):
        rank, world = dist_info(self.rank, self.world_size)
        wi = get_worker_info()
        worker, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        report = {}
        quota = None
        if self.epoch_length is not None:
            quota = self.epoch_length // nw + (1 if worker < self.epoch_length % nw else 0)
        if quota == 0:
            return
        src = self._stream(rank, world, worker, nw, report)
        if self.shuffle_buffer > 0:
            src = _shuffle(src, self.shuffle_buffer, np.random.default_rng(_mix(self.seed, self.epoch, rank, worker,
                                                                               3)))
        count = 0
        try:
            for s in src:
                yield s
                count += 1
                self.yielded += 1
                if quota is not None and count >= quota:
                    break
        finally:
            src.close()
            self._report(report, rank, worker, count)

    def _report(self, report, rank, worker, count):
        reasons = {k: v for k, v in report.items() if k != "errors"}
        if not reasons:
            return
        parts = []
        for reason, per in sorted(reasons.items()):
            shards = ", ".join(f"{os.path.basename(u)} x{c}" for u, c in list(per.items())[:5])
            more = f", +{len(per) - 5} shards" if len(per) > 5 else ""
            parts.append(f"{reason}: {sum(per.values())} ({shards}{more})")
        errs = "; ".join(f"{u}: {e}" for u, e in list(report.get("errors", {}).items())[:3])
        warnings.warn(f"ShardDataset epoch {self.epoch} rank {rank} worker {worker}: yielded {count}, skipped "
                      + "; ".join(parts) + (f"; shard errors: {errs}" if errs else ""), RuntimeWarning,
                      stacklevel=2)


def _shuffle(src, size, g):
    """Reservoir-style shuffle buffer: fill to `size`, then emit a random buffered sample per incoming one."""
    buf = []
    try:
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
    finally:
        src.close()


# ----------------------------------------------------------------------------------------------------------------
# folders


class _FolderBase(Dataset):
    """Map-style dataset over image files that skips (counts, warns once per file) unreadable images."""

    def __init__(self):
        self.skipped = Counter()
        self._bad = set()

    def _load(self, i):
        raise NotImplementedError

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of {n} items at {self.root!r}")
        i %= n
        for j in range(n):  # return the next valid item rather than crash the run
            k = (i + j) % n
            path = self.items[k][0]
            if path in self._bad:
                continue
            try:
                with open(path, "rb") as f:
                    img = decode_image(f.read())
            except Exception as err:  # noqa: BLE001
                self._bad.add(path)
                self.skipped["bad_image"] += 1
                warnings.warn(f"{type(self).__name__}: skipping unreadable image {path!r} ({type(err).__name__}: "
                              f"{err})", RuntimeWarning, stacklevel=2)
                continue
            return self._make(k, img)
        raise RuntimeError(f"{type(self).__name__} at {self.root!r}: none of its {n} images can be decoded")


class ImageFolder(_FolderBase):
    """root/CLASS/*.{jpg,png,...} -> {"image": uint8 (H, W, 3), "label": int, "__key__": "CLASS/stem"}.
    .classes: sorted class folder names (label = index). n: keep only the first n files (sorted order)."""

    def __init__(self, root, extensions=FOLDER_EXTS, n=None):
        super().__init__()
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolder: {self.root!r} is not a directory")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.classes = sorted(d for d in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, d)))
        self.items = []
        for c, name in enumerate(self.classes):
            d = os.path.join(self.root, name)
            for f in sorted(os.listdir(d)):
                if f.lower().endswith(exts):
                    self.items.append((os.path.join(d, f), c, f"{name}/{os.path.splitext(f)[0]}"))
        if n is not None:
            self.items = self.items[:n]
        if not self.items:
            raise FileNotFoundError(f"ImageFolder: no images with extensions {exts} in class folders under "
                                    f"{self.root!r} (expected root/CLASS/*.jpg)")

    def _make(self, k, img):
        _, c, key = self.items[k]
        return {"__key__": key, "image": img, "label": c}


class CaptionFolder(_FolderBase):
    """root/*.jpg + root/captions.jsonl lines {"file": name, "caption": str, ...extra keys} ->
    {"image", "caption", "__key__", ...extra}. Lines naming missing files or unparsable lines are skipped and
    counted (self.skipped["missing_file"], ["bad_line"]) with one warning."""

    def __init__(self, root, n=None):
        super().__init__()
        self.root = os.fspath(root)
        index = os.path.join(self.root, "captions.jsonl")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"CaptionFolder: {index!r} does not exist (expected root/*.jpg + captions.jsonl "
                                    "with lines {\"file\": ..., \"caption\": ...})")
        self.items, bad = [], []
        with open(index, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    name, cap = d["file"], d["caption"]
                    if not isinstance(cap, str):
                        raise TypeError("caption is not a string")
                except Exception:  # noqa: BLE001
                    self.skipped["bad_line"] += 1
                    bad.append(f"line {ln}")
                    continue
                path = os.path.join(self.root, name)
                if not os.path.isfile(path):
                    self.skipped["missing_file"] += 1
                    bad.append(name)
                    continue
                extra = {k: v for k, v in d.items() if k not in ("file", "caption")}
                self.items.append((path, cap, os.path.splitext(name)[0], extra))
        if bad:
            warnings.warn(f"CaptionFolder {index!r}: skipped {len(bad)} entries ({dict(self.skipped)}), e.g. "
                          f"{bad[:5]}", RuntimeWarning, stacklevel=2)
        if n is not None:
            self.items = self.items[:n]
        if not self.items:
            raise FileNotFoundError(f"CaptionFolder: no usable entries in {index!r}")

    def _make(self, k, img):
        _, cap, key, extra = self.items[k]
        return {"__key__": key, "image": img, "caption": cap, **extra}


# ----------------------------------------------------------------------------------------------------------------
# entry points


def make_dataset(data=None, split="train", seed=0, size=64, n=None, **kw):
    """Pick the dataset for `--data`.

    None / ""                          -> common.world.World(seed, split, size, n)  (the embedded default)
    shard pattern, .tar, '::' list,
    or a directory holding *.tar       -> ShardDataset(urls, seed=seed, **kw); n (if given and no epoch_length in
                                          kw) -> epoch_length = ceil(n / world_size) samples per rank
    directory with captions.jsonl      -> CaptionFolder(dir, n)
    directory with class subfolders    -> ImageFolder(dir, n=n)
    "{split}" in data is replaced by the split name (e.g. "data/{split}/shard-{000..009}.tar").
    kw: ShardDataset options (shuffle_buffer, epoch_length, resample, require, rank, world_size) and ImageFolder's
    extensions; options that do not apply to the chosen kind are ignored, so scripts can pass them blindly.
    size is only used by the world (real images keep their size; resize with common.transforms)."""
    if data is None or (isinstance(data, str) and not data.strip()):
        from common.world import World  # lazy: keeps data.py importable on its own

        return World(seed=seed, split=split, size=size, n=n)
    data = os.fspath(data).replace("{split}", split)
    layouts = ("accepted layouts: tar shards ('dir/shard-{000..099}.tar', 'a.tar::b.tar', or a directory of *.tar), "
               "root/CLASS/*.jpg class folders, or root/*.jpg + root/captions.jsonl")
    if os.path.isdir(data):
        if glob(os.path.join(data, "*.tar")):
            return _shards(data, seed, n, kw)
        if os.path.isfile(os.path.join(data, "captions.jsonl")):
            return CaptionFolder(data, n=n)
        subs = [d for d in sorted(os.listdir(data)) if os.path.isdir(os.path.join(data, d))]
        exts = tuple(kw.get("extensions", FOLDER_EXTS))
        if any(f.lower().endswith(exts) for d in subs for f in os.listdir(os.path.join(data, d))):
            return ImageFolder(data, extensions=exts, n=n)
        raise ValueError(f"--data {data!r}: directory has no *.tar, no captions.jsonl and no class folders of "
                         f"images; {layouts}")
    if "::" in data or _RANGE.search(data) or any(c in data for c in "*?[") or data.endswith((".tar", ".tar.gz",
                                                                                               ".tgz")):
        return _shards(data, seed, n, kw)
    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data!r} does not exist; {layouts}")
    raise ValueError(f"--data {data!r} is not a recognised dataset; {layouts}")


def _shards(data, seed, n, kw):
    kw = {k: v for k, v in kw.items() if k != "extensions"}
    if n is not None and "epoch_length" not in kw:
        _, w = dist_info(kw.get("rank"), kw.get("world_size"))
        kw = dict(kw, epoch_length=math.ceil(n / w))
    return ShardDataset(data, seed=seed, **kw)


def collate(samples, keys=None):
    """List of sample dicts -> dict of batched values: numpy arrays / tensors stacked into tensors (B, ...), ints ->
    int64, floats -> float32, bools -> bool tensors; strings, bytes, dicts, lists and ragged arrays stay lists.
    keys: only these keys (KeyError naming a missing one). Tuples/lists of samples are collated per position."""
    if not samples:
        raise ValueError("collate: empty batch")
    s0 = samples[0]
    if isinstance(s0, (tuple, list)) and not isinstance(s0, str):
        return type(s0)(collate([s[i] for s in samples]) for i in range(len(s0)))
    if not isinstance(s0, dict):
        return _stack([s for s in samples])
    keys = list(s0.keys()) if keys is None else list(keys)
    out = {}
    for k in keys:
        try:
            vals = [s[k] for s in samples]
        except KeyError:
            bad = next(s.get("__key__", "?") for s in samples if k not in s)
            raise KeyError(f"collate: sample {bad!r} has no key {k!r} (keys: {sorted(s0)})") from None
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


class DistributedOrder(Sampler):
    """Deterministic DistributedSampler: a permutation seeded by (seed, epoch) (or 0..N-1 when shuffle=False),
    truncated (drop_last) or wrap-padded to a multiple of world_size, then indices[rank::world_size]."""

    def __init__(self, n, rank=0, world_size=1, shuffle=True, seed=0, epoch=0, drop_last=True):
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, int(seed), int(epoch), drop_last

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def indices(self):
        if self.shuffle:
            idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, 4)))
            idx = idx.tolist()
        else:
            idx = list(range(self.n))
        W = self.world_size
        if self.drop_last:
            idx = idx[:len(idx) - len(idx) % W]
        elif len(idx) % W:
            pad = W - len(idx) % W
            idx += (idx * (pad // max(len(idx), 1) + 1))[:pad]
        return idx[self.rank::W]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)


def make_loader(dataset, batch_size, collate_fn=None, num_workers=0, shuffle=True, seed=0, drop_last=True, epoch=0,
                rank=None, world_size=None, **kw):
    """DataLoader for a map-style (World, folders) or iterable (ShardDataset) dataset.

    Map-style: DistributedOrder sampler (rank split of a (seed, epoch)-seeded permutation); change epochs with
    loader.sampler.set_epoch(e) or a new make_loader(..., epoch=e). Iterable: dataset.set_epoch(epoch) and a plain
    DataLoader (the dataset splits itself over ranks and workers; shuffle is its shuffle_buffer). Worker RNGs (for
    augmentation drawn with g=None) are seeded from (seed, epoch, rank). collate_fn defaults to `collate`.
    Extra kw go to DataLoader (e.g. pin_memory, persistent_workers)."""
    r, w = dist_info(rank, world_size)
    gen = torch.Generator().manual_seed(_mix(seed, epoch, r, 5))
    common = dict(batch_size=batch_size, collate_fn=collate_fn or collate, num_workers=num_workers,
                  drop_last=drop_last, generator=gen, **kw)
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return DataLoader(dataset, **common)
    sampler = DistributedOrder(len(dataset), r, w, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
    return DataLoader(dataset, sampler=sampler, **common)
