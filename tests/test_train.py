"""common.train: kill-and-resume reproducibility, NaN guard, atomic checkpoints, optimizer groups, schedule, DDP."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.train import (cosine_lr, fit, load_checkpoint, load_weights, make_optimizer, save_checkpoint,
                          save_weights, seed_all)

ROOT = Path(__file__).resolve().parents[1]

# Shared by the in-process runs and the subprocess that gets SIGKILLed: a tiny model with dropout (so the restored
# RNG state matters) and a batch that is a pure function of the step.
SETUP = textwrap.dedent("""
    import torch, torch.nn as nn
    from common.train import TrainConfig
    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 4))
    def get_batch(i):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 8, generator=g)
        return x, (x[:, :4] * 2).argmax(1)
    def loss_fn(model, b):
        x, y = b
        return nn.functional.cross_entropy(model(x), y)
    def tc(steps, **kw):
        return TrainConfig(steps, **{**dict(lr=3e-3, warmup=3, ckpt_every=5, log_every=5), **kw})
""")
ns = {}
exec(SETUP, ns)
make_model, get_batch, loss_fn, tc = ns["make_model"], ns["get_batch"], ns["loss_fn"], ns["tc"]


@pytest.fixture(autouse=True)
def one_thread():
    """Same intra-op thread count as the subprocesses (bit-identical float reductions), and no OpenMP
    oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    ref = make_model()
    h_ref = fit(ref, loss_fn, get_batch, tc(20), tmp_path / "ref", progress=False)

    # a separate process is SIGKILLed (no cleanup, no finally) right after step 12; last checkpoint = step 10
    script = SETUP + textwrap.dedent(f"""
        import os, signal
        from common.train import fit
        def hook(step, model, metrics):
            if step == 12:
                os.kill(os.getpid(), signal.SIGKILL)
        fit(make_model(), loss_fn, get_batch, tc(20), {str(tmp_path / 'run')!r}, on_step=hook, progress=False)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = tmp_path / "run" / "model.safetensors"
    assert load_checkpoint(ck, make_model())["step"] == 10
    assert not list((tmp_path / "run").glob("*.tmp"))

    torch.manual_seed(123)  # garbage RNG state: resume must restore the saved one
    m = make_model()
    torch.manual_seed(456)
    h = fit(m, loss_fn, get_batch, tc(20, resume=True), tmp_path / "run", progress=False)
    assert h["start"] == 10 and len(h["loss"]) == 20
    assert h["loss"] == h_ref["loss"]  # the history from the checkpoint + the resumed steps: every step
    for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    # log.jsonl has each logged step once (rows after the checkpoint replaced, not duplicated)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    # a complete checkpoint: resume returns at once without touching the weights
    h2 = fit(m, loss_fn, get_batch, tc(20, resume=True), tmp_path / "run", progress=False)
    assert h2["loss"] == h_ref["loss"] and h2["reused"]


STREAM_SETUP = textwrap.dedent("""
    import torch, torch.nn as nn, sys
    from common.data import ShardSource, Stream
    from common.train import TrainConfig
    from common.transforms import train_transform
    AUG = train_transform(16, kind="rrc")
    def transform(s, g):  # decode happened in the worker; augmentation there too, from the per-sample generator
        return {"x": AUG(s["image"], g), "y": s["label"]}
    def make_stream(data):
        return Stream(ShardSource(data), 8, transform, seed=0, num_workers=2, shuffle_buffer=16)
    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 10))
    def loss_fn(model, b):
        return nn.functional.cross_entropy(model(b["x"]), b["y"])
    TC = dict(lr=3e-3, warmup=3, ckpt_every=5, log_every=5)
""")


def test_kill_and_resume_mid_stream_on_shards_with_two_workers(tmp_path):
    """kill -9 in the middle of a run that streams tar shards through 2 DataLoader workers (shuffle buffer, random
    crops, more than one epoch): the resumed run ends with the same weights, losses and data counts."""
    from common.world import World, export_shards
    export_shards(World(0, "train", 24, n=60), str(tmp_path / "shards"), 60, shard_size=15)
    data = str(tmp_path / "shards" / "shard-{000000..000003}.tar")
    steps = 17  # 136 samples: 2+ epochs of 60
    ns = {}
    exec(STREAM_SETUP, ns)
    ref, st_ref = ns["make_model"](), ns["make_stream"](data)
    TC = ns["TrainConfig"]
    h_ref = fit(ref, ns["loss_fn"], st_ref, TC(steps, **ns["TC"]), tmp_path / "ref", progress=False)
    script = STREAM_SETUP + textwrap.dedent(f"""
        import os, signal
        from common.train import fit
        def hook(step, model, metrics):
            if step == 13:
                os.kill(os.getpid(), signal.SIGKILL)
        fit(make_model(), loss_fn, make_stream({data!r}), TrainConfig({steps}, **TC), {str(tmp_path / 'run')!r},
            on_step=hook, progress=False)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    m, st = ns["make_model"](), ns["make_stream"](data)
    assert load_checkpoint(tmp_path / "run" / "model.safetensors", m)["step"] == 10
    h = fit(m, ns["loss_fn"], st, TC(steps, resume=True, **ns["TC"]), tmp_path / "run", progress=False)
    assert h["start"] == 10 and h["loss"] == h_ref["loss"]
    for (k, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert st.seen == st_ref.seen == steps * 8 and np.array_equal(st.unique_keys(), st_ref.unique_keys())
    assert len(st.unique_keys()) == 60


def test_stage_reuse_by_fingerprint(tmp_path):
    """One rule for every script's stages: a matching finished checkpoint is reused (nothing trained), a different
    fingerprint trains again, a matching unfinished one continues only with resume."""
    calls = []

    def counted(i):
        calls.append(i)
        return get_batch(i)

    a = make_model()
    h = fit(a, loss_fn, counted, tc(10), tmp_path, name="t", fingerprint={"lr": 3e-3, "width": 32}, progress=False)
    assert len(calls) == 10 and not h["reused"]
    b = make_model()
    with torch.no_grad():
        for q in b.parameters():
            q.zero_()
    h = fit(b, loss_fn, counted, tc(10), tmp_path, name="t", fingerprint={"width": 32, "lr": 3e-3}, progress=False)
    assert len(calls) == 10 and h["reused"] and h["loss"] and all(torch.equal(x, y) for x, y in
                                                                   zip(a.parameters(), b.parameters()))
    h = fit(make_model(), loss_fn, counted, tc(10), tmp_path, name="t", fingerprint={"lr": 1e-3, "width": 32},
            progress=False)
    assert len(calls) == 20 and not h["reused"]  # another configuration: trained again
    calls.clear()
    fit(make_model(), loss_fn, counted, tc(20), tmp_path, name="t", fingerprint={"lr": 1e-3, "width": 32},
        progress=False)
    assert calls == list(range(20))  # a finished 10-step stage asked for 20 steps, no resume: trained again
    calls.clear()
    fit(make_model(), loss_fn, counted, tc(30, resume=True), tmp_path, name="t",
        fingerprint={"lr": 1e-3, "width": 32}, progress=False)
    assert calls == list(range(20, 30))  # with resume: continued from its 20 steps


def test_resume_without_checkpoint_differs_from_rng_restore(tmp_path):
    """Guard that the test above can fail: without restoring the RNG the dropout masks differ."""
    ref = make_model()
    fit(ref, loss_fn, get_batch, tc(10), tmp_path / "a", progress=False)
    m = make_model()
    fit(m, loss_fn, get_batch, tc(5), tmp_path / "b", progress=False)
    torch.manual_seed(99)
    info = load_checkpoint(tmp_path / "b" / "model.safetensors", m, restore_rng=False)
    assert info["step"] == 5
    # continue 5 more steps with a fresh optimizer and the wrong RNG: weights must differ from ref
    fit(m, loss_fn, lambda i: get_batch(i + 5), tc(5), tmp_path / "c", progress=False)
    assert not torch.equal(ref[0].weight, m[0].weight)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    m = make_model()

    def bad_loss(model, b):
        loss = loss_fn(model, b)
        return loss * float("nan") if bad_loss.step >= 7 else loss

    bad_loss.step = 0

    def gb(i):
        bad_loss.step = i
        return get_batch(i)

    with pytest.raises(RuntimeError, match=r"non-finite loss nan at step 7"):
        fit(m, bad_loss, gb, tc(20), tmp_path, progress=False)
    ck = tmp_path / "model.safetensors"
    good = make_model()
    assert load_checkpoint(ck, good)["step"] == 5
    for v in good.state_dict().values():
        assert torch.isfinite(v).all()
    for v in m.state_dict().values():  # the in-memory weights were not updated with NaN gradients either
        assert torch.isfinite(v).all()
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_roundtrip_atomic_and_errors(tmp_path):
    m = make_model()
    opt = make_optimizer(m, 1e-3, 0.1)
    loss_fn(m, get_batch(0)).backward()
    opt.step()
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, m, opt, step=7, config={"lr": 1e-3, "betas": (0.9, 0.98)}, extra={"note": "x"},
                    arrays={"loss": torch.tensor([2.0, 1.5])})
    assert p.exists() and not (tmp_path / "ck.safetensors.tmp").exists()
    m2 = make_model()
    with torch.no_grad():
        for q in m2.parameters():
            q.zero_()
    opt2 = make_optimizer(m2, 1e-3, 0.1)
    info = load_checkpoint(p, m2, opt2)
    assert info.pop("arrays")["loss"].tolist() == [2.0, 1.5]
    assert info == {"step": 7, "config": {"lr": 1e-3, "betas": [0.9, 0.98]}, "extra": {"note": "x"}}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][i][k].cpu(), s2["state"][i][k].cpu())
    assert [g["weight_decay"] for g in s2["param_groups"]] == [0.1, 0.0]

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors", m2)
    wrong = nn.Sequential(nn.Linear(8, 33), nn.LayerNorm(33), nn.GELU(), nn.Dropout(0.2), nn.Linear(33, 4))
    with pytest.raises(RuntimeError, match=r"0\.weight: checkpoint \(32, 8\) vs model \(33, 8\)"):
        load_checkpoint(p, wrong)
    extra = nn.Sequential(*make_model(), nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match=r"missing keys \['5\.weight', '5\.bias'\]"):
        load_checkpoint(p, extra)
    p.write_bytes(p.read_bytes()[:100])  # a torn file is reported, not silently loaded
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        load_checkpoint(p, m2)


def test_weights_roundtrip_strips_wrappers(tmp_path):
    m = make_model()
    p = tmp_path / "w.safetensors"
    wrapped = nn.Module()
    wrapped.module = m  # shaped like DDP's .module prefix in state_dict keys
    save_weights(p, m, metadata={"config": {"a": 1}})
    m2 = make_model()
    with torch.no_grad():
        m2[0].weight.add_(1)
    meta = load_weights(p, m2)
    assert json.loads(meta["config"]) == {"a": 1}
    assert torch.equal(m[0].weight, m2[0].weight)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(10, 8)
        self.positional_embedding = nn.Parameter(torch.zeros(4, 8))
        self.class_embedding = nn.Parameter(torch.zeros(8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def test_optimizer_no_decay_groups():
    m = _Tiny()
    opt = make_optimizer(m, 1e-3, 0.2)
    name = {id(p): n for n, p in m.named_parameters()}
    groups = {g["weight_decay"]: sorted(name[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups[0.2] == ["proj.weight"]
    assert groups[0.0] == sorted(["token_embedding.weight", "positional_embedding", "class_embedding", "pos_embed",
                                  "proj.bias", "ln.weight", "ln.bias", "logit_scale"])
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert opt.defaults.get("fused") is True  # fused AdamW works on CPU float params


def test_cosine_schedule_values():
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)
    assert cosine_lr(25, 100, 2.0) == pytest.approx(1.0 + math.cos(math.pi / 4))
    lrs = [cosine_lr(i, 50, 1.0, 5) for i in range(50)]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone after warm-up


def test_grad_accum_matches_full_batch(tmp_path):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    fit(a, loss_fn, get_batch, tc(5, lr=1e-2, log_every=0, grad_accum=1), tmp_path / "a", progress=False)
    fit(b, loss_fn, get_batch, tc(5, lr=1e-2, log_every=0, grad_accum=4), tmp_path / "b", progress=False)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-5)


DDP_SCRIPT = SETUP + textwrap.dedent("""
    import sys, torch
    from common.train import setup_distributed, fit, unwrap
    d = setup_distributed("cpu")
    assert d.distributed and d.world_size == 2
    m = make_model()
    def gb(i):  # each rank gets its own half of the global batch
        x, y = get_batch(i)
        return x[d.rank::2], y[d.rank::2]
    fit(m, loss_fn, gb, TrainConfig(6, ckpt_every=3, lr=1e-2, log_every=2, grad_accum=2), sys.argv[1], dist=d,
        progress=False)
    torch.set_printoptions(precision=10)
    vec = torch.cat([p.detach().flatten() for p in m.parameters()])
    open(f"{sys.argv[1]}/w{d.rank}.txt", "w").write(" ".join(repr(v) for v in vec.tolist()))
    d.cleanup()
""")


def test_ddp_two_gloo_processes(tmp_path):
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "ddp.py"), str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    w0, w1 = (out / "w0.txt").read_text(), (out / "w1.txt").read_text()
    assert w0 == w1  # DDP keeps the replicas bit-identical
    assert (out / "model.safetensors").exists()
    m = make_model()
    before = torch.cat([q.detach().flatten() for q in m.parameters()])
    assert load_checkpoint(out / "model.safetensors", m)["step"] == 6
    after = torch.cat([q.detach().flatten() for q in m.parameters()])
    assert not torch.equal(before, after)
    assert [float(v) for v in w0.split()] == after.tolist()
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 4, 6]  # rank 0 only


LEAVE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from common.train import setup_distributed, keep_process_group
    out, rounds, late = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    def one(r):  # rank 0 is late (it evaluates alone in every script); rank 1 notes when its cleanup returned
        d = setup_distributed("cpu")
        assert d.distributed and d.world_size == 2
        if d.rank == 0:
            time.sleep(late)
            open(f"{out}/arrive{r}", "w").write(repr(time.time()))
        d.cleanup()
        if d.rank == 1:
            open(f"{out}/left{r}", "w").write(repr(time.time()))
    if rounds == 1:
        one(0)
    else:  # what run_seeds does: main() once per seed in one process
        with keep_process_group():
            for r in range(rounds):
                one(r)
        open(f"{out}/end{os.environ['RANK']}", "w").write(repr(time.time()))
""")


@pytest.mark.parametrize("rounds,late", [(1, 1.5), (3, 0.2)])
def test_torchrun_ranks_leave_together(tmp_path, rounds, late):
    """One round: rank 1 does not tear its group down before the late rank 0 arrives (leaving early could abort
    rank 1 at exit). Three rounds in one process (run_seeds) finish: re-initializing the group after a
    destroy in one torchrun process hung (rank 0 a little late, as here), so the group is kept and left once."""
    (tmp_path / "leave.py").write_text(LEAVE_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "leave.py"), str(out), str(rounds), str(late)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    t = {f.name: float(f.read_text()) for f in out.iterdir()}
    if rounds == 1:
        assert t["left0"] >= t["arrive0"]
    else:
        assert sorted(t) == sorted([f"{k}{r}" for k in ("arrive", "left") for r in range(3)] + ["end0", "end1"])
        assert t["end1"] >= t["arrive2"]  # the one real leave waits for rank 0 too


def test_seed_all_rank_dependent():
    seed_all(3, rank=0)
    a = torch.rand(3)
    seed_all(3, rank=1)
    b = torch.rand(3)
    seed_all(3, rank=0)
    assert torch.equal(a, torch.rand(3)) and not torch.equal(a, b)


def test_extend_grid():
    from common.train import extend_grid
    ext = {"low": 0, "high": 0}
    assert extend_grid([1e-3, 3e-3, 1e-2], 3e-3, ext, 2) is None and ext == {"low": 0, "high": 0}  # interior
    assert extend_grid([1e-3, 3e-3, 1e-2], 1e-2, ext, 2) == 0.03 and ext["high"] == 1
    assert extend_grid([1e-3, 3e-3, 1e-2, 3e-2], 3e-2, ext, 2) == 0.09 and ext["high"] == 2
    assert extend_grid([1e-3, 3e-3, 1e-2, 3e-2, 9e-2], 9e-2, ext, 2) is None  # the cap per side
    assert extend_grid([1e-3, 3e-3], 1e-3, ext, 2) == 0.000333 and ext["low"] == 1
    assert extend_grid([3e-3], 3e-3, {"low": 0, "high": 0}, 2) is None  # --lr: one point, nothing to extend
