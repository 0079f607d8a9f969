"""Training plumbing shared by every script, nanoGPT-style plain functions.

- `setup_distributed`: torchrun env vars (RANK / WORLD_SIZE / LOCAL_RANK) -> process group (gloo on CPU, NCCL on CUDA).
- `seed_all`, `autocast` (bf16), `make_optimizer` (AdamW, no decay on norms/biases/embeddings/logit scale, as
  open_clip main.py), `cosine_lr` (linear warm-up then cosine).
- checkpoints: one safetensors file with model tensors ("model.<name>"), the optimizer state flattened
  ("optim.<i>.<key>", hyper-parameters in the JSON header), every rank's RNG state, the step and the config.
  Always written to `path + ".tmp"` and renamed, so a crash mid-write never leaves a broken checkpoint.
- `Logger`: rank-0 `log.jsonl` rows plus a readable line.
- `fit`: the loop (DDP, autocast, grad accumulation, clipping, schedule, logging, checkpoint/resume, NaN guard).

Determinism contract of `fit`: the batch for step i must be a pure function of i: a common.data.Stream (whose
position fit checkpoints) or e.g. indices drawn from `np.random.default_rng((seed, rank, i))`. The optimizer state and the global RNGs (for dropout / in-loss
randomness) are restored from the checkpoint, so a run killed after a checkpoint and resumed reaches bit-identical
weights to an uninterrupted run on the same device and world size.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# distributed setup


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    is_master: bool = True
    distributed: bool = False

    def barrier(self):
        if self.distributed:
            tdist.barrier()

    def cleanup(self):
        """Leave the process group, except inside `keep_process_group` (run_seeds), which leaves once at its end."""
        if self.distributed and tdist.is_initialized() and not _KEEP_GROUP[0]:
            leave_process_group()

    def print(self, *a, **kw):  # print on rank 0 only
        if self.is_master:
            print(*a, **kw, flush=True)


_KEEP_GROUP = [0]  # > 0 while run_seeds calls main() once per seed in one process


def leave_process_group(wait_s=1800.0):
    """All ranks check in at torchrun's agent store, then each destroys its group.

    Why wait: rank 0 evaluates alone after training, and a rank that tore its gloo pairs down and exited while rank 0
    still held them could abort at interpreter exit ("terminate called without an active exception"). The store (hosted by the torchrun agent, not by a rank) outlives every rank, so the
    check-in is safe; under torch.multiprocessing.spawn rank 0 hosts the store, so there we leave at once. The key
    carries the elastic restart count, and after wait_s a rank leaves anyway rather than hang."""
    if not tdist.is_initialized():
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store, n = tdist.distributed_c10d._get_default_store(), tdist.get_world_size()
        key = f"clipbook/exit/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        target = -(-store.add(key, 1) // n) * n  # this round's multiple of n (one process may leave several groups)
        t0 = time.time()
        while store.add(key, 0) < target and time.time() - t0 < wait_s:
            time.sleep(0.05)
    tdist.destroy_process_group()


@contextlib.contextmanager
def keep_process_group():
    """One process group for several main() calls in one process: Dist.cleanup() keeps the group inside, and the
    group is left once at the end. A second init_process_group after destroy_process_group in one torchrun
    process hangs (rank 0 never returns), so run_seeds must not re-initialize per seed."""
    _KEEP_GROUP[0] += 1
    try:
        yield
    finally:
        _KEEP_GROUP[0] -= 1
    if not _KEEP_GROUP[0] and tdist.is_initialized():  # not on an exception: as before, torchrun stops the rest
        leave_process_group()


def setup_distributed(device=None):
    """Read torchrun's env vars and init the process group; a no-op Dist for a plain `python x.py` run.

    device: "cpu" | "cuda" | None (cuda if available). On CUDA each rank takes `cuda:LOCAL_RANK` and uses NCCL;
    on CPU the backend is gloo (so `torchrun --nproc_per_node=2` works on a laptop)."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available (use --device=cpu)")
    rank = int(os.environ.get("RANK", -1))
    if rank == -1:
        return Dist(device=device)
    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        # N CPU ranks on one machine: share the cores (torch's default of all cores per rank oversubscribes them,
        # and OpenMP spin-waiting then makes every step several times slower)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank, device, rank == 0, world_size > 1)


# -----------------------------------------------------------------------------
# collectives (no-ops on one process; NCCL needs device tensors, gloo takes CPU ones)


def _comm_device(dist):
    return dist.device if str(dist.device).startswith("cuda") else "cpu"


def all_reduce(x, dist, op="sum"):
    """Sum / max / min of a tensor, numpy array or number over ranks; returns the same kind."""
    kind = type(x)
    t = torch.as_tensor(x)
    if dist is None or not dist.distributed:
        return x
    ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
    y = t.detach().clone().to(_comm_device(dist))
    tdist.all_reduce(y, op=ops[op])
    y = y.to(t.device) if torch.is_tensor(x) else y.cpu()
    if kind is np.ndarray:
        return y.numpy()
    return y if torch.is_tensor(x) else y.item()


def all_gather_rows(x, dist):
    """(n_r, ...) on each rank, n_r may differ -> (sum n_r, ...) in rank order, on every rank."""
    if dist is None or not dist.distributed:
        return x
    dev = _comm_device(dist)
    n = torch.tensor([x.shape[0]], device=dev)
    ns = [torch.zeros_like(n) for _ in range(dist.world_size)]
    tdist.all_gather(ns, n)
    L = int(max(v.item() for v in ns))
    pad = torch.zeros((L - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=dev)
    parts = [torch.empty((L, *x.shape[1:]), dtype=x.dtype, device=dev) for _ in range(dist.world_size)]
    tdist.all_gather(parts, torch.cat([x.to(dev), pad]).contiguous())
    return torch.cat([p[:int(k.item())] for p, k in zip(parts, ns)]).to(x.device)


def broadcast_json(obj, dist, src=0):
    """A JSON-able object from rank `src` to every rank (as UTF-8 bytes in a uint8 tensor: nothing is pickled)."""
    if dist is None or not dist.distributed:
        return obj
    dev = _comm_device(dist)
    blob = json.dumps(obj).encode() if dist.rank == src else b""
    n = torch.tensor([len(blob)], device=dev)
    tdist.broadcast(n, src)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8)
    if dist.rank == src:
        buf[:] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    buf = buf.to(dev)
    tdist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def start_run(cfg, batch_keys=("batch_size",)):
    """The first lines of every script's main(): torchrun setup on cfg.device, each global batch size named in
    batch_keys divisible by the number of ranks (a ValueError naming the flag), cfg.out created and the resolved
    config saved as config.json (rank 0). Returns the Dist."""
    dist = setup_distributed(cfg.device or None)
    for k in batch_keys:
        if getattr(cfg, k) % dist.world_size:
            raise ValueError(f"--{k}={getattr(cfg, k)} is not divisible by the {dist.world_size} ranks")
    os.makedirs(cfg.out, exist_ok=True)
    if dist.is_master:
        from common.config import config_to_dict, save_json
        save_json(os.path.join(cfg.out, "config.json"), config_to_dict(cfg))
    return dist


def seed_all(seed, rank=0):
    """Seed python, numpy and torch (all devices) with seed + rank (different augmentation per rank)."""
    s = int(seed) + 1000003 * int(rank)  # large odd stride: ranks never collide with seed+1 runs
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def autocast(device, amp="auto"):
    """bf16 autocast context. amp: "auto" (bf16 on CUDA, off on CPU), "bf16" (on CUDA and CPU), "none"."""
    dev = torch.device(device).type
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")
    if amp == "none" or (amp == "auto" and dev != "cuda") or dev not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev, dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# optimizer and schedule

_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)
if hasattr(nn, "RMSNorm"):
    _NO_DECAY_MODULES = _NO_DECAY_MODULES + (nn.RMSNorm,)


def no_decay(name, p, module=None):
    """True for parameters that should not be weight-decayed (open_clip main.py: ndim<2, norms, biases, logit scale;
    plus embeddings: token/position/class embeddings are lookup tables, decay only shrinks them)."""
    n = name.lower()
    return (p.ndim < 2 or n.endswith("bias") or "embedding" in n or "pos" in n.split(".")[-1]
            or "logit_scale" in n or "logit_bias" in n or isinstance(module, _NO_DECAY_MODULES))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.98), eps=1e-6, fused=None):
    """AdamW with two param groups: decay (matrices) and no-decay (see `no_decay`).

    fused=None uses the fused kernel when every trainable param is a float tensor on CPU/CUDA (on CPU it is several
    times faster than the per-tensor loop for ViT-sized param lists), falling back to the default if unsupported."""
    owner = {}
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owner[f"{mn}.{pn}" if mn else pn] = m
    decay, skip = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(n, p, owner.get(n)) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": skip, "weight_decay": 0.0}) if g["params"]]
    params = decay + skip
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def cosine_lr(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0):
    """Linear warm-up from base_lr/warmup to base_lr over `warmup_steps`, then cosine decay to min_lr at total_steps.

    step is 0-based (the step about to be taken); lr(0) = base_lr/warmup when warming up."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    t = min(max((step - warmup_steps) / (total_steps - warmup_steps), 0.0), 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


# -----------------------------------------------------------------------------
# checkpoints (safetensors only: no pickle anywhere)


def extend_grid(grid, best, extended, max_extend):
    """Learning rates chosen on validation data with the same effort for every arm: the next lr to try when the best
    val lr `best` sits at an edge of the sorted `grid` (x3 past it), counting the extensions per side in `extended`
    ({"low": n, "high": n}, updated); None when best is interior, the grid has one point (--lr), or that side
    already has max_extend extensions. fastfill.py and subclone.py apply it to every arm alike."""
    if len(grid) < 2 or grid[0] < best < grid[-1]:
        return None
    side = "high" if best == grid[-1] else "low"
    if extended[side] >= max_extend:
        return None
    extended[side] += 1
    return float(f"{(grid[-1] * 3 if side == 'high' else grid[0] / 3):.3g}")


def unwrap(model):
    """Strip DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _clean_key(k):
    for pre in ("module.", "_orig_mod."):
        while k.startswith(pre):
            k = k[len(pre):]
    return k.replace("._orig_mod.", ".")


def _state_tensors(model, prefix):
    """state_dict -> {prefix+name: contiguous CPU tensor}; tensors sharing storage (tied weights) are cloned because
    safetensors refuses aliased tensors."""
    out, seen = {}, set()
    for k, v in unwrap(model).state_dict().items():
        t = v.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.data_ptr())
        out[prefix + _clean_key(k)] = t
    return out


def _atomic_save(tensors, path, metadata):
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    with open(tmp, "rb+") as f:  # make the bytes durable before the rename makes them visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    """This process's RNG state: (torch CPU state uint8 tensor, optional CUDA state, JSON-able numpy+python state)."""
    npst = np.random.get_state()
    py = random.getstate()
    js = {"numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
          "python": [py[0], list(py[1]), py[2]]}
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, js


def set_rng_state(torch_state, cuda_state, js):
    torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def gather_rng_states(dist=None):
    """Every rank's rng_state(), collected on all ranks (uint8 all_gather, no pickling). Returns a list by rank."""
    mine = rng_state()
    if dist is None or not dist.distributed:
        return [mine]
    dev = dist.device if dist.device.startswith("cuda") else "cpu"  # NCCL needs device tensors
    blob = json.dumps({"js": mine[2], "cuda": None if mine[1] is None else mine[1].tolist()}).encode()
    payload = torch.cat([mine[0], torch.frombuffer(bytearray(blob), dtype=torch.uint8)]).to(dev)
    n = torch.tensor([payload.numel()], device=dev)
    ns = [torch.zeros_like(n) for _ in range(dist.world_size)]
    tdist.all_gather(ns, n)
    L = int(max(x.item() for x in ns))
    buf = torch.zeros(L, dtype=torch.uint8, device=dev)
    buf[:payload.numel()] = payload
    bufs = [torch.zeros_like(buf) for _ in range(dist.world_size)]
    tdist.all_gather(bufs, buf)
    T = mine[0].numel()
    out = []
    for b, k in zip(bufs, ns):
        b = b[:int(k.item())].cpu()
        d = json.loads(bytes(b[T:].tolist()).decode())
        out.append((b[:T].clone(), None if d["cuda"] is None else torch.tensor(d["cuda"], dtype=torch.uint8), d["js"]))
    return out


def save_checkpoint(path, model, optimizer=None, step=0, config=None, extra=None, rng=None, arrays=None,
                    fingerprint=None):
    """Atomic safetensors checkpoint.

    tensors: "model.<name>", "optim.<i>.<key>" (exp_avg, exp_avg_sq, step, ... per param index i), "rng.<rank>.torch"
    (+ ".cuda"). JSON header: step, config, extra, optimizer param_groups and non-tensor state, numpy/python RNG.
    rng: list of per-rank rng_state() tuples (default: this process's only). arrays: extra tensors stored as
    "arrays.<name>" (fit keeps the loss history there, so results after a resume cover every step)."""
    tensors = _state_tensors(model, "model.")
    for k, v in (arrays or {}).items():
        tensors[f"arrays.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {"format": "clipbook-checkpoint-v1", "step": str(int(step)),
            "config": json.dumps(_plain(config)), "extra": json.dumps(_plain(extra))}
    if fingerprint is not None:  # stage_fingerprint() JSON: what fit compares to decide on reuse
        meta["fingerprint"] = fingerprint
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{i}.{k}"] = v.detach().to("cpu").contiguous()
                else:
                    scalars[f"{i}.{k}"] = v
        meta["optim"] = json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    rng = rng if rng is not None else [rng_state()]
    for r, (ts, cs, _) in enumerate(rng):
        tensors[f"rng.{r}.torch"] = ts
        if cs is not None:
            tensors[f"rng.{r}.cuda"] = cs
    meta["rng"] = json.dumps([js for _, _, js in rng])
    _atomic_save(tensors, path, meta)


def _plain(obj):
    if obj is None:
        return None
    from common.config import _jsonable  # local import: config.py is dependency-free, keeps train.py importable alone
    return _jsonable(obj)


def _read(path):
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise RuntimeError(f"cannot read checkpoint {path}: {e} (truncated or not a safetensors file?)") from e


def _load_model_tensors(model, sd, path, strict=True):
    m = unwrap(model)
    own = {_clean_key(k): v for k, v in m.state_dict().items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if shape:
        raise RuntimeError(f"{path}: shape mismatch for {len(shape)} tensor(s): " + "; ".join(shape[:10]))
    if strict and (missing or unexpected):
        raise RuntimeError(f"{path}: state dict does not match {type(m).__name__}: missing keys {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                           f"{' ...' if len(unexpected) > 10 else ''}")
    m.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return missing, unexpected


def load_checkpoint(path, model, optimizer=None, restore_rng=False, rank=0, strict=True):
    """Load a save_checkpoint file into model (and optimizer). Returns {"step", "config", "extra"}.

    restore_rng: also set this process's RNG state to the saved state of `rank` (fit does this on resume).
    Raises FileNotFoundError for a missing file and RuntimeError naming the keys on missing/unexpected/shape errors."""
    tensors, meta = _read(path)
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if not sd:
        raise RuntimeError(f"{path}: no 'model.*' tensors (a weights file? use load_weights)")
    _load_model_tensors(model, sd, path, strict=strict)
    if optimizer is not None:
        if "optim" not in meta:
            raise RuntimeError(f"{path}: checkpoint has no optimizer state (saved without optimizer)")
        om = json.loads(meta["optim"])
        state = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, key = k.split(".", 2)
                state.setdefault(int(i), {})[key] = v
        for k, v in om["scalars"].items():
            i, key = k.split(".", 1)
            state.setdefault(int(i), {})[key] = v
        groups = om["param_groups"]
        if len(groups) != len(optimizer.param_groups) or any(
                len(g["params"]) != len(h["params"]) for g, h in zip(groups, optimizer.param_groups)):
            raise RuntimeError(f"{path}: optimizer param groups {[len(g['params']) for g in groups]} do not match "
                               f"the optimizer's {[len(g['params']) for g in optimizer.param_groups]}")
        for g in groups:  # JSON turned tuples into lists
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    if restore_rng and "rng" in meta:
        js = json.loads(meta["rng"])
        r = rank if f"rng.{rank}.torch" in tensors and rank < len(js) else 0
        if r != rank:
            print(f"warning: {path} has no RNG state for rank {rank} (saved with fewer ranks); using rank 0's",
                  file=sys.stderr)
        set_rng_state(tensors[f"rng.{r}.torch"], tensors.get(f"rng.{r}.cuda"), js[r])
    return {"step": int(meta.get("step", 0)), "config": json.loads(meta.get("config", "null")),
            "arrays": {k[len("arrays."):]: v for k, v in tensors.items() if k.startswith("arrays.")},
            "extra": json.loads(meta.get("extra", "null"))}


def save_weights(path, model, metadata=None):
    """Weights only (plain state-dict names, no prefix), atomic; metadata: dict stored JSON-encoded in the header."""
    _atomic_save(_state_tensors(model, ""), path, {k: _plain(v) if not isinstance(v, str) else v
                                                    for k, v in (metadata or {}).items()})


def load_weights(path, model, strict=True):
    """Load save_weights files (or the "model.*" part of a checkpoint). Returns the header metadata dict."""
    tensors, meta = _read(path)
    if any(k.startswith("model.") for k in tensors) and meta.get("format", "").startswith("clipbook-checkpoint"):
        tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_model_tensors(model, {_clean_key(k): v for k, v in tensors.items()}, path, strict=strict)
    return meta


def _data_state_path(ckpt, rank):
    return f"{os.path.splitext(str(ckpt))[0]}.data{rank}.safetensors"


def save_data_state(ckpt, rank, step, sd):
    """One rank's Stream.state_dict() beside checkpoint `ckpt`, atomic. The previous file is kept as `.prev`, so a
    kill between this write and the checkpoint's own still leaves the state that matches the checkpoint on disk."""
    path = _data_state_path(ckpt, rank)
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    _atomic_save({"keys": sd["keys"]}, path, {"step": str(int(step)), "meta": sd["meta"]})


def load_data_state(ckpt, rank, step):
    """The data state of `rank` saved with the checkpoint of `step` (the current file or the .prev one)."""
    path = _data_state_path(ckpt, rank)
    for p in (path, path + ".prev"):
        if os.path.isfile(p):
            tensors, meta = _read(p)
            if int(meta.get("step", -1)) == int(step):
                return {"meta": json.loads(meta["meta"]), "keys": tensors["keys"]}
    raise FileNotFoundError(f"{ckpt} is at step {step} but no data state of rank {rank} at that step exists "
                            f"({path}); resume needs the files written with the checkpoint")



# -----------------------------------------------------------------------------
# logging


class Logger:
    """Rank-0 logger: appends JSON rows to `{out_dir}/log.jsonl` and prints a readable line.

    run: tag stored in each row ("run": name) so several fits (teacher, student) can share one log.jsonl.
    keep_until: on (re)start, rows of this run with step > keep_until are dropped (None: drop all rows of this run),
    so a resumed run does not duplicate the steps it replays."""

    def __init__(self, out_dir, is_master=True, run=None, keep_until=None, filename="log.jsonl"):
        self.is_master, self.run = is_master, run
        self.path = os.path.join(str(out_dir), filename)
        if not is_master:
            return
        os.makedirs(str(out_dir), exist_ok=True)
        if os.path.exists(self.path):
            keep = []
            for line in open(self.path):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
                mine = row.get("run") == run
                if not mine or (keep_until is not None and row.get("step", 0) <= keep_until):
                    keep.append(line.rstrip("\n"))
            with open(self.path + ".tmp", "w") as f:
                f.write("".join(k + "\n" for k in keep))
            os.replace(self.path + ".tmp", self.path)

    def log(self, step, echo=True, **metrics):
        if not self.is_master:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if self.run is not None:
            row["run"] = self.run
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if echo:
            self.print(" | ".join([f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]))

    def print(self, msg):
        if self.is_master:
            from tqdm import tqdm
            tqdm.write(str(msg), file=sys.stdout)
            sys.stdout.flush()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


# -----------------------------------------------------------------------------
# the training loop


def _split(batch, n):
    """Split a batch (tensor / list / tuple / dict, batch dim 0) into n micro-batches."""
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        B = batch.shape[0]
        if B % n:
            raise ValueError(f"batch size {B} is not divisible by grad_accum={n}")
        return [batch[i * B // n:(i + 1) * B // n] for i in range(n)]
    if isinstance(batch, dict):
        parts = {k: _split(v, n) for k, v in batch.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(n)]
    if isinstance(batch, tuple):
        parts = [_split(v, n) for v in batch]
        return [tuple(p[i] for p in parts) for i in range(n)]
    if isinstance(batch, list):
        if batch and all(torch.is_tensor(x) for x in batch) and len({x.shape[0] for x in batch}) == 1 \
                and len(batch) != batch[0].shape[0]:
            parts = [_split(v, n) for v in batch]  # a list of batch tensors, like a tuple
            return [[p[i] for p in parts] for i in range(n)]
        B = len(batch)
        if B % n:
            raise ValueError(f"batch of {B} items is not divisible by grad_accum={n}")
        return [batch[i * B // n:(i + 1) * B // n] for i in range(n)]
    return [batch] * n  # scalars / config objects are shared by the micro-batches


def _batch_size(batch):
    if torch.is_tensor(batch) or isinstance(batch, np.ndarray):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        for v in batch.values():
            b = _batch_size(v)
            if b:
                return b
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], str):
            return len(batch)
        return _batch_size(batch[0]) if isinstance(batch, tuple) else len(batch)
    return 0


@dataclass
class TrainConfig:
    """The optimisation of one stage: what `fit` needs besides the model, the loss and the data."""
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 0
    min_lr: float = 0.0
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    grad_accum: int = 1
    ckpt_every: int = 0        # also at the end
    log_every: int = 10
    amp: str = "auto"          # auto (bf16 on CUDA) | bf16 | none
    compile: bool = False
    resume: bool = False       # continue an unfinished checkpoint of this stage


def stage_fingerprint(fp):
    """Canonical JSON of a stage's fingerprint (the config values that change its result)."""
    return json.dumps(_plain(fp), sort_keys=True)


def _header(path):
    """A checkpoint's JSON header (None when there is no readable checkpoint at path)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable file is simply not a reusable stage
        return None


def file_id(path, n=1 << 20):
    """A checkpoint file's identity for fingerprints: its size and the sha1 of its first and last MiB (another file
    saved at the same path, even of the same architecture, differs there; reading 2 MiB keeps it cheap)."""
    size, h = os.path.getsize(path), hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(n))
        f.seek(max(size - n, 0))
        h.update(f.read(n))
    return {"bytes": size, "sha1_head_tail": h.hexdigest()}


def stage_current(path, fingerprint):
    """True when `path` holds the finished output of a stage run with this fingerprint: a fit checkpoint (header),
    a directory (its stage.json) or any other file (its `<path>.stage.json` sidecar). The one reuse test of every
    non-fit stage (vocabularies, reinforced datasets, stored masks); fit applies the same rule to checkpoints."""
    path = str(path)
    fp = stage_fingerprint(fingerprint)
    if not os.path.exists(path):
        return False
    if path.endswith(".safetensors"):
        head = _header(path)
        return head is not None and head.get("fingerprint") == fp
    mark = _stage_mark(path)
    return mark is not None and mark.get("fingerprint") == fp and mark.get("complete", True)


def _stage_mark(path):
    path = str(path)
    p = os.path.join(path, "stage.json") if os.path.isdir(path) else path + ".stage.json"
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mark_stage(path, fingerprint, complete=True):
    """Record that `path` (a directory or a file) holds the output of the stage with this fingerprint; complete=False
    while it is being built (a restarted build with the same fingerprint then keeps what is there)."""
    path = str(path)
    mark = os.path.join(path, "stage.json") if os.path.isdir(path) else path + ".stage.json"
    with open(mark + ".tmp", "w") as f:
        json.dump({"fingerprint": stage_fingerprint(fingerprint), "complete": bool(complete)}, f)
    os.replace(mark + ".tmp", mark)


def fit(model, loss_fn, data, train, out_dir, name="model", dist=None, *, fingerprint=None, on_step=None,
        optimizer=None, config=None, progress=True, find_unused_parameters=False):
    """Train `model` for `train.steps` optimizer steps; returns {"loss": [...] (every step), "steps", "seconds",
    "start", "resumed", "reused"}.

    loss_fn(model, batch) -> loss or (loss, {metric: float}); `model` is the DDP/compiled wrapper, call it normally
      (loss_fn may reach the raw module through common.train.unwrap(model)). The logged/returned loss is the mean
      over micro-batches and ranks; metrics are rank 0's.
    data(i) -> batch for 0-based step i, on the right device: a common.data.Stream (its position is checkpointed
      with the weights, so a killed run resumes with the same batches) or any deterministic function of i.
      With grad_accum > 1 the batch is split along dim 0 into grad_accum micro-batches; gradients are synced only on
      the last one (DDP no_sync), so the update equals one step on the whole batch for per-sample-mean losses.
    train: TrainConfig. Checkpoints `{out_dir}/{name}.safetensors` every ckpt_every steps and at the end (rank 0,
      atomic; "step" = optimizer steps completed).
    Stage reuse, one rule for every script: with a fingerprint (the config values that change this stage's result),
      a checkpoint whose stored fingerprint differs is set aside and the stage trains again; a matching finished one
      is reused as it is (weights loaded, nothing trained); a matching unfinished one is continued when
      train.resume, else trained again. Without a fingerprint only train.resume continues or reuses a checkpoint.
    Mode: fit() calls model.train() once. A frozen sub-module that holds BatchNorm (e.g. the conv stem of a probed
      backbone) still updates its running statistics in train mode: put it back in eval() inside loss_fn.
    on_step(step, model, metrics): called after each optimizer step (step = steps completed), e.g. to clamp
      logit_scale or evaluate. A non-finite loss raises RuntimeError before the update, so the checkpoint on disk
      (and the in-memory weights) stay the last good ones.
    """
    if not isinstance(train, TrainConfig):
        raise TypeError(f"fit: train must be a TrainConfig, got {type(train).__name__}")
    tc, steps, desc = train, train.steps, name
    dist = dist or Dist(device=str(next(model.parameters()).device))
    out_dir = str(out_dir)
    ckpt = os.path.join(out_dir, f"{name}.safetensors")
    raw = unwrap(model)
    opt = optimizer or make_optimizer(raw, tc.lr, tc.weight_decay, tc.betas, tc.eps)
    stream = data if hasattr(data, "state_dict") else None  # a common.data.Stream: checkpoint it too
    start, past = 0, []
    fp = None if fingerprint is None else stage_fingerprint(fingerprint)
    head = _header(ckpt) if os.path.exists(ckpt) else None
    same = head is not None and (tc.resume if fp is None else head.get("fingerprint") == fp)
    if fp is not None and head is not None and not same:
        dist.print(f"{desc}: {ckpt} was trained with another configuration; training this stage again")
    done = int(head.get("step", 0)) if same else 0
    if same and (done >= steps or tc.resume):
        info = load_checkpoint(ckpt, raw, opt, restore_rng=True, rank=dist.rank)
        start = info["step"]
        past = info["arrays"]["loss"].tolist()[:start] if "loss" in info["arrays"] else []
        if stream is not None:
            try:
                stream.load_state_dict(load_data_state(ckpt, dist.rank, start))
            except (FileNotFoundError, ValueError) as e:
                if start < steps:
                    raise
                dist.print(f"{desc}: the data counts of {ckpt} are not known here ({e})")
        if start >= steps:  # finished: reuse as it is; the stream state keeps its counts for the data block
            dist.print(f"{desc}: reusing {ckpt} ({start} steps)")
            return {"loss": past, "steps": start, "seconds": 0.0, "start": start, "resumed": True, "reused": True}
        dist.print(f"{desc}: resumed from {ckpt} at step {start}/{steps}")
    logger = Logger(out_dir, dist.is_master, run=name, keep_until=start if start else None)
    if dist.is_master:
        os.makedirs(out_dir, exist_ok=True)
    fwd = torch.compile(raw) if tc.compile else raw
    if dist.distributed:
        dev_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=dev_ids,
                                                  find_unused_parameters=find_unused_parameters)
    fwd.train()

    def save(step):
        if stream is not None:  # each rank's data state first: a checkpoint never points at a missing one
            save_data_state(ckpt, dist.rank, step, stream.state_dict())
        states = gather_rng_states(dist)  # collective: every rank calls save()
        if dist.is_master:
            save_checkpoint(ckpt, raw, opt, step, config, {"name": name, "total_steps": steps}, rng=states,
                            arrays={"loss": torch.tensor(past + losses, dtype=torch.float64)}, fingerprint=fp)
        dist.barrier()

    from tqdm import tqdm
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (dist.is_master and progress),
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    losses, t0, t_log, n_log = [], time.time(), time.time(), 0
    for i in range(start, steps):
        cur = cosine_lr(i, steps, tc.lr, tc.warmup, tc.min_lr)
        for g in opt.param_groups:
            g["lr"] = cur * g.get("lr_scale", 1.0)
        batch = data(i)
        micro = _split(batch, tc.grad_accum) if tc.grad_accum > 1 else [batch]
        tot, mets = 0.0, {}
        for j, mb in enumerate(micro):
            last = j == len(micro) - 1
            sync = fwd.no_sync() if dist.distributed and not last else contextlib.nullcontext()
            with sync:
                with autocast(dist.device, tc.amp):
                    out = loss_fn(fwd, mb)
                loss, m = out if isinstance(out, tuple) else (out, {})
                (loss / len(micro)).backward()
            tot += float(loss.detach()) / len(micro)
            for k, v in m.items():
                mets[k] = mets.get(k, 0.0) + float(v) / len(micro)
        if dist.distributed:  # mean loss over ranks for the log; a NaN on any rank reaches all of them, so every
            t = torch.tensor([tot], dtype=torch.float64, device=dist.device)  # rank stops together (no hang)
            tdist.all_reduce(t)
            tot = t.item() / dist.world_size
        if not math.isfinite(tot):
            opt.zero_grad(set_to_none=True)
            bar.close()
            kept = f"last good checkpoint kept: {ckpt}" if os.path.exists(ckpt) else "no checkpoint was written yet"
            raise RuntimeError(f"{desc}: non-finite loss {tot} at step {i} (0-based) of {steps}; stopping before the "
                               f"update. {kept}. Lower lr / check the data or amp.")
        gnorm = None
        if tc.grad_clip and tc.grad_clip > 0:
            gnorm = float(nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip))
            if not math.isfinite(gnorm):  # finite loss, overflowing gradients (e.g. fp16-like blow-up): same rule
                opt.zero_grad(set_to_none=True)
                bar.close()
                raise RuntimeError(f"{desc}: non-finite gradient norm {gnorm} at step {i} (loss {tot:.4f}); stopping "
                                   f"before the update, last good checkpoint kept: {ckpt}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = i + 1
        losses.append(tot)
        n_log += _batch_size(batch) * dist.world_size
        bar.update(1)
        bar.set_postfix(loss=f"{tot:.4f}", refresh=False)
        metrics = {"loss": tot, "lr": cur, **mets}
        if gnorm is not None:
            metrics["grad_norm"] = gnorm
        if on_step is not None:
            on_step(done, raw, metrics)
        if (tc.log_every > 0 and (done % tc.log_every == 0 or i == start)) or done == steps:
            now = time.time()
            metrics["samples_per_s"] = n_log / max(now - t_log, 1e-9)
            logger.log(done, echo=tc.log_every > 0, **metrics)
            t_log, n_log = now, 0
        if (tc.ckpt_every and done % tc.ckpt_every == 0) or done == steps:
            save(done)
    bar.close()
    if dist.distributed:  # BatchNorm statistics: each rank's last forward updated them on its own batch
        for b in raw.buffers():
            if b.is_floating_point():
                tdist.broadcast(b.data, 0)
    return {"loss": past + losses, "steps": steps, "start": start, "seconds": time.time() - t0, "resumed": start > 0,
            "reused": False}
