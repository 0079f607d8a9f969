"""Checkpoint files: convert a torch.save pickle to safetensors, and read safetensors files with clear errors.

    python -m common.convert in.pt out.safetensors [--key=state_dict] [--debug]

Reading uses `torch.load(path, map_location="cpu", weights_only=True)`: PyTorch's restricted unpickler, which builds
only tensors and plain containers (dict, list, tuple, str, numbers, ...) and refuses every other global. A file that
needs more (a custom class, argparse.Namespace, numpy scalars, a function) cannot be read this way; it is refused
with one line naming the file and the global it asked for, and nothing from it is executed. TorchScript archives
(OpenAI's released CLIP .pt files are TorchScript) are refused too: loading one runs its TorchScript code.
open_clip's safetensors release of the same weights loads directly (`common.models.load_clip_checkpoint`).

What is kept: the tensors of the state dict. Checkpoints often wrap it: {"state_dict": ..., "optimizer": ...,
"epoch": ...} (open_clip, timm), {"model": ...} (DeiT/MAE style), {"module": ...}, {"ema": ...}; the first of
CONTAINER_KEYS found is descended into, repeatedly, while the current level holds no tensors (or --key=a.b names
the path). Nested dicts below that level are flattened with "." joins; a "module." (DDP) or "_orig_mod."
(torch.compile) prefix shared by every key is removed. Non-tensor entries are dropped and listed in the report.
Tensors that share storage (tied weights, views of one buffer) are cloned, because safetensors stores each tensor's
bytes once and refuses aliases. The output is written to a temporary file in the same folder and renamed into place
(os.replace), so a crash never leaves a half-written checkpoint under the final name.

Errors are `CheckpointError` (a ValueError) whose message starts with the file name; the CLI prints it as one line
and exits with status 2 (`--debug` shows the traceback instead).
"""
import argparse
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import torch

# Wrapper keys around a state dict, in the order they are tried (trained weights before their EMA copy).
CONTAINER_KEYS = ("state_dict", "model", "module", "ema", "model_ema", "state_dict_ema")
PREFIXES = ("module.", "_orig_mod.")
MAX_HEADER = 100_000_000          # safetensors' own limit on the JSON header size


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# safetensors reading

def read_safetensors(path, device="cpu"):
    """path -> (state dict {name: tensor}, metadata {str: str}).

    The header is checked before safetensors parses it, so that a truncated file, a torch.save file or any other
    file gives a message that says which it is (safetensors' own errors read like "MetadataIncompleteBuffer").
    Layout: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        brace = f.read(1)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        # a safetensors header is a JSON object right after the length field (the byte may be cut off)
        if not (2 <= n <= MAX_HEADER and brace in (b"{", b"")):
            kind = _sniff(head)
            if kind != "unknown":
                raise CheckpointError(f"{p}: not a safetensors file, it is {kind}; convert it with "
                                      f"`python -m common.convert {p} out.safetensors`")
            if size < 8:
                raise CheckpointError(f"{p}: not a safetensors file or truncated ({size} bytes, shorter than the "
                                      "8-byte header length)")
            raise CheckpointError(f"{p}: not a safetensors file (its first bytes {head!r} are not a header length "
                                  "followed by a JSON header)")
        if 8 + n > size:
            raise CheckpointError(f"{p}: truncated safetensors file: the header needs {n} bytes, "
                                  f"the file has {size - 8} after the length field")
        raw = brace + f.read(n - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{p}: not a safetensors file (header is not safetensors JSON: {e})") from None
    have = size - 8 - n
    if end > have:
        raise CheckpointError(f"{p}: truncated safetensors file: the header describes {end} bytes of tensor data, "
                              f"only {have} are present")
    from safetensors import SafetensorError, safe_open
    try:
        sd = {}
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{p}: unreadable safetensors file: {_first_line(e)}") from None
    return sd, dict(meta)


def _sniff(head):
    """First bytes of a file -> what it is, for error messages ("unknown" when not recognised)."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (the torch.save format)"
    if head[:1] == b"\x80":
        return "a pickle (the legacy torch.save format)"
    if head[:1] in (b"{", b"[") or head[:5] == b"<?xml" or head[:5].lower() == b"<html":
        return "a text file (JSON/XML/HTML)"
    if head[:6] == b"\x89HDF\r\n":
        return "an HDF5 file (Keras/h5)"
    return "unknown"


def _first_line(e):
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0]


# ----------------------------------------------------------------------------------------------------------------
# torch.save reading

def load_pickled(path):
    """torch.load(path, weights_only=True) with one-line errors for every way a file can be unusable."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{p}: empty file")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{p}: truncated or corrupt torch.save file (zip archive unreadable: {e})") from None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(f"{p}: is a TorchScript archive; loading it would run its TorchScript code, so it "
                                  "is refused (for OpenAI CLIP weights use open_clip's safetensors release)")
    elif head[:1] != b"\x80":
        kind = "a safetensors file (nothing to convert)" if _looks_safetensors(p, head) else "not a torch.save file"
        raise CheckpointError(f"{p}: {kind} (starts with {head[:8]!r})")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or type(e).__name__ == "UnpicklingError":
            g = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" (it references {g.group(1)})" if g else ""
            raise CheckpointError(f"{p}: needs code to unpickle{what}; refused, nothing from it was executed. "
                                  "Where its code is trusted, re-save its state_dict with safetensors.torch.save_file") from None
        if isinstance(e, (EOFError, RuntimeError, KeyError, ValueError, OSError)):
            raise CheckpointError(f"{p}: truncated or corrupt torch.save file ({type(e).__name__}: "
                                  f"{_first_line(e)})") from None
        raise CheckpointError(f"{p}: cannot be read as a torch.save file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None


def _looks_safetensors(p, head):
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 2 <= n <= min(MAX_HEADER, p.stat().st_size - 8):
        return False
    with open(p, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


# ----------------------------------------------------------------------------------------------------------------
# state dict extraction

def _descend(obj, key, name):
    """Select the state dict inside a loaded checkpoint -> (obj, path list, sibling keys left behind)."""
    path, ignored = [], []
    if key:
        for part in key.split("."):
            if not isinstance(obj, dict) or part not in obj:
                have = sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__
                raise CheckpointError(f"{name}: --key={key}: no entry {part!r} at {'.'.join(path) or 'top level'} "
                                      f"(has {have})")
            ignored += [".".join(path + [str(k)]) for k in obj if k != part]
            obj = obj[part]
            path.append(part)
        return obj, path, ignored
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        k = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if k is None:
            break
        ignored += [".".join(path + [str(j)]) for j in obj if j != k]
        obj = obj[k]
        path.append(k)
    return obj, path, ignored


def _flatten(obj, prefix, out, skipped):
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out, skipped)
        else:
            skipped.append(f"{name} ({type(v).__name__})")


def extract_state_dict(obj, key=None, name="checkpoint"):
    """A loaded checkpoint -> (flat {name: tensor}, report): report["path"] is where the state dict was found
    ("" = top level), "ignored" the entries beside it on the way down (optimizer, epoch, ...), "stripped" the removed
    prefixes and "skipped" the non-tensor entries inside it."""
    sd_obj, path, ignored = _descend(obj, key, name)
    if isinstance(sd_obj, torch.Tensor):
        raise CheckpointError(f"{name}: holds a single tensor, not a state dict")
    if not isinstance(sd_obj, dict):
        raise CheckpointError(f"{name}: holds a {type(sd_obj).__name__}, not a dict of tensors")
    sd, skipped = {}, []
    _flatten(sd_obj, "", sd, skipped)
    if not sd:
        top = sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{name}: no tensors found at {'.'.join(path) or 'top level'} (keys {top}); "
                              "name the state dict with --key=...")
    stripped = []
    changed = True
    while changed:
        changed = False
        for pre in PREFIXES:
            if all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                skipped = [k[len(pre):] if k.startswith(pre) else k for k in skipped]
                stripped.append(pre)
                changed = True
    bad = [k for k, v in sd.items() if v.layout != torch.strided or v.is_quantized]
    for k in bad:
        skipped.append(f"{k} (tensor with layout {sd.pop(k).layout}, not storable)")
    return sd, {"path": ".".join(path), "stripped": stripped, "skipped": skipped, "ignored": ignored}


def unshare(sd):
    """Make every tensor contiguous and own its storage: safetensors refuses tensors that alias one another.
    -> (new dict, number of tensors cloned)."""
    seen, out, n = set(), {}, 0
    for k, v in sd.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if (ptr is not None and ptr in seen) or not v.is_contiguous() or (
                v.numel() and v.untyped_storage().nbytes() != v.numel() * v.element_size()):
            v = v.contiguous().clone()      # a fresh storage that holds exactly this tensor
            n += 1
        if ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out, n


def convert(src, dst, key=None):
    """torch.save file `src` -> safetensors file `dst` (atomic). Returns the report of extract_state_dict plus
    "tensors", "params" (number of values) and "cloned" (tensors copied out of shared/non-contiguous storage)."""
    from safetensors.torch import save_file
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{src}: output path is the input path")
    obj = load_pickled(src)
    sd, rep = extract_state_dict(obj, key, str(src))
    sd, cloned = unshare(sd)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata={"format": "pt", "converted_from": src.name})
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    rep.update(tensors=len(sd), params=sum(v.numel() for v in sd.values()), cloned=cloned)
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.convert",
                                 description="torch.save checkpoint (read with weights_only=True) -> safetensors")
    ap.add_argument("src", help="input .pt / .pth / .bin written by torch.save")
    ap.add_argument("dst", help="output .safetensors")
    ap.add_argument("--key", default=None, help="dotted path of the state dict inside the checkpoint "
                                                "(default: descend into " + "/".join(CONTAINER_KEYS) + ")")
    ap.add_argument("--debug", action="store_true", help="show the traceback on errors")
    args = ap.parse_args(argv)
    try:
        rep = convert(args.src, args.dst, args.key)
    except CheckpointError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f" from '{rep['path']}'" if rep["path"] else ""
    strip = f", removed prefix {'+'.join(rep['stripped'])}" if rep["stripped"] else ""
    print(f"{args.src} -> {args.dst}: {rep['tensors']} tensors, {rep['params']:,} values{where}{strip}"
          + (f", {rep['cloned']} shared/non-contiguous tensors cloned" if rep["cloned"] else ""))
    if rep["ignored"]:
        print(f"ignored beside the state dict: {', '.join(rep['ignored'][:20])}")
    if rep["skipped"]:
        more = f" (+{len(rep['skipped']) - 20} more)" if len(rep["skipped"]) > 20 else ""
        print(f"skipped {len(rep['skipped'])} non-tensor entries: {', '.join(rep['skipped'][:20])}{more}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
