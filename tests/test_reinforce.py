"""Tests for reinforce.py: exact replay of every augmentation (incl. mixing with the stored partner), top-k
sparsify/densify, storage, merge of two runs, resumable and rank-parallel generation, smoke runs (1 and 2 processes)."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import reinforce as rf
from common.config import parse_config
from common.train import Dist

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(out, **kw):
    cfg = parse_config(rf.Config, [f"--out={out}", "--size=32", "--ns=2", "--topk=3", "--shard_size=4"])
    cfg._command = None
    return replace(cfg, **kw) if kw else cfg


def images(n=10, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def teachers(C=10):
    torch.manual_seed(0)
    return rf.Ensemble([8, 6], C).eval()


# ---------------------------------------------------------------- augmentation replay
def test_replay_is_pixel_identical_for_every_augmentation_type(tmp_path):
    cfg = tiny_cfg(tmp_path, mix_p=1.0, erase_p=1.0)
    X, pipe = images(), rf.heavy_pipeline(cfg)
    g = np.random.default_rng(0)
    kinds, ops, erased = set(), set(), 0
    for t in range(60):
        i = t % len(X)
        x, rec = rf.draw_aug(pipe, X, i, g, cfg)
        rec = json.loads(json.dumps(rec))  # the stored form: JSON in the safetensors header
        assert torch.equal(rf.replay_aug(pipe, X, i, rec), x)
        kinds.add(rec["mix"]["kind"])
        ops.update(op for op, _, _ in rec["aug"][2]["ops"])
        erased += rec["aug"][3]["applied"]
        assert rec["aug"][0]["box"] and "flip" in rec["aug"][1]
    assert kinds == {"mixup", "cutmix"} and erased > 0 and len(ops) >= 10
    # no-mix records replay too
    x, rec = rf.draw_aug(pipe, X, 3, np.random.default_rng(1), replace(cfg, mix_p=0.0))
    assert rec["mix"] == {"kind": "none"} and torch.equal(rf.replay_aug(pipe, X, 3, json.loads(json.dumps(rec))), x)


def test_replay_depends_on_the_stored_partner(tmp_path):
    cfg = tiny_cfg(tmp_path, mix_p=1.0)
    X, pipe = images(), rf.heavy_pipeline(cfg)
    x, rec = rf.draw_aug(pipe, X, 0, np.random.default_rng(5), cfg)
    other = json.loads(json.dumps(rec))
    other["mix"]["partner"] = (rec["mix"]["partner"] + 1) % len(X)
    assert not torch.equal(rf.replay_aug(pipe, X, 0, other), x)


def test_mix_ops_by_hand():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    assert torch.allclose(rf.apply_mix(a, b, {"kind": "mixup", "lam": 0.75}), torch.full((3, 4, 4), 0.25))
    out = rf.apply_mix(a, b, {"kind": "cutmix", "lam": 0.75, "box": [1, 2, 2, 2]})
    assert out.sum() == 3 * 4 and out[:, 1:3, 2:4].eq(1).all() and a.sum() == 0
    assert rf.mix_weight({"kind": "cutmix", "box": [1, 2, 2, 2]}, 4) == pytest.approx(0.75)


# ---------------------------------------------------------------- top-k targets
def test_sparsify_densify_by_hand():
    p = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15]])
    v, i = rf.sparsify(p, 2)
    assert v.dtype == torch.float16 and i.dtype == torch.int16
    assert i.tolist() == [[1, 3]] and torch.allclose(v.float(), torch.tensor([[0.5, 0.2]]), atol=1e-3)
    d = rf.densify(v, i, 5)
    # stored mass at the top-k, the remaining 0.3 spread uniformly over the other three classes
    assert torch.allclose(d, torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1]]), atol=1e-3)
    assert torch.allclose(d.sum(-1), torch.ones(1), atol=1e-3)
    # k = C reproduces p (up to fp16)
    assert torch.allclose(rf.densify(*rf.sparsify(p, 5), 5), p, atol=1e-3)


# ---------------------------------------------------------------- storage, merge, resume, ranks
def test_generation_storage_and_dr_targets(tmp_path):
    cfg, X, T = tiny_cfg(tmp_path), images(), teachers()
    rf.reinforce(T, X, 10, cfg, Dist(), "fp")
    man, v, ix, recs = rf.load_reinforced(tmp_path / "reinforced")
    assert (man["n"], man["ns"], man["topk"], len(man["shards"])) == (10, 2, 3, 3)
    assert v.shape == (10, 2, 3) and v.dtype == torch.float16 and ix.dtype == torch.int16
    # the stored top-k equals the teachers' scores of the replayed image
    pipe = rf.heavy_pipeline(cfg)
    x = rf.replay_aug(pipe, X, 7, recs[7][1])
    pv, pi = rf.sparsify(T.probs(x[None]), 3)
    assert torch.equal(pi[0], ix[7, 1]) and torch.allclose(pv[0].float(), v[7, 1].float())
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".tmp")) for f in os.listdir(tmp_path / "reinforced"))


def test_merge_two_runs_adds_ns(tmp_path):
    X, T = images(), teachers()
    for r, ns in ((0, 2), (1, 3)):
        rf.reinforce(T, X, 10, tiny_cfg(tmp_path / f"r{r}", ns=ns, run_seed=r), Dist(), f"fp{r}")
    a, b = (rf.load_reinforced(tmp_path / f"r{r}" / "reinforced") for r in (0, 1))
    man = rf.merge_reinforced([str(tmp_path / "r0" / "reinforced"), str(tmp_path / "r1" / "reinforced")],
                              str(tmp_path / "m"))
    m, v, ix, recs = rf.load_reinforced(tmp_path / "m")
    assert man["ns"] == m["ns"] == 5 and len(m["runs"]) == 2
    assert torch.equal(v, torch.cat([a[1], b[1]], 1)) and torch.equal(ix, torch.cat([a[2], b[2]], 1))
    assert recs[4] == a[3][4] + b[3][4]
    assert a[3][4][0] != b[3][4][0]  # different run seeds drew different augmentations
    with pytest.raises(ValueError, match="n="):
        rf.reinforce(T, X[:8], 10, tiny_cfg(tmp_path / "r2"), Dist(), "fp2")
        rf.merge_reinforced([str(tmp_path / "r0" / "reinforced"), str(tmp_path / "r2" / "reinforced")],
                            str(tmp_path / "bad"))


def content(path):
    """A shard's tensors and header (its bytes are not canonical: safetensors orders header keys by a hash map)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).tolist() for k in f.keys()}, f.metadata()


def test_generation_resumes_per_shard_and_is_rank_independent(tmp_path):
    X, T = images(), teachers()
    d = tmp_path / "one" / "reinforced"
    rf.reinforce(T, X, 10, tiny_cfg(tmp_path / "one"), Dist(), "fp")
    names = sorted(n for n in os.listdir(d) if n.startswith("shard"))
    ref = {n: content(d / n) for n in names}
    ref_manifest = json.load(open(d / "manifest.json"))
    # kill simulation: shard 1 lost; the others must be kept (same mtime), shard 1 regenerated bit-identically
    os.remove(d / "shard-00001.safetensors")
    os.utime(d / "shard-00000.safetensors", (1, 1))
    rf.reinforce(T, X, 10, tiny_cfg(tmp_path / "one"), Dist(), "fp")
    assert os.path.getmtime(d / "shard-00000.safetensors") == 1
    assert {n: content(d / n) for n in names} == ref
    # a different fingerprint (e.g. other teachers) invalidates the shards
    rf.reinforce(T, X, 10, tiny_cfg(tmp_path / "one"), Dist(), "other")
    assert os.path.getmtime(d / "shard-00000.safetensors") != 1
    # two ranks (run one after the other: barriers are no-ops without a process group) split the shards and
    # produce the same bytes as one process
    d2 = tmp_path / "two" / "reinforced"
    for r in (1, 0):
        rf.reinforce(T, X, 10, tiny_cfg(tmp_path / "two"), Dist(rank=r, world_size=2, is_master=r == 0), "fp")
    assert {n: content(d2 / n) for n in names} == ref
    assert json.load(open(d2 / "manifest.json")) == ref_manifest


def test_retrieval_is_balanced_and_deduplicated():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    got = rf.retrieve(q, pool, 4).tolist()
    assert got == [0, 2, 1, 3]  # round robin: best of each query first, then the second best of each
    assert len(set(rf.retrieve(q, pool, 6).tolist())) == 6


# ---------------------------------------------------------------- end to end
def _losses(out):
    runs = {}
    for line in open(os.path.join(out, "log.jsonl")):
        r = json.loads(line)
        runs.setdefault(r["run"], []).append(r["loss"])
    return runs


def test_smoke_learns_and_writes_results(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "reinforce.py", "--smoke", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    for k in ("erm_acc", "kd_acc", "dr_acc", "erm_epoch_s", "kd_epoch_s", "dr_epoch_s", "dr_epoch_cpu_s",
              "storage_bytes_per_image", "ns", "topk", "scratch_acc", "agnostic_kd_acc", "task_kd_acc", "seconds",
              "device"):
        assert k in res, k
    assert set(res["task_kd_acc"]) == {"in_domain", "retrieved", "generic"}
    runs = _losses(out)
    for name in ("teachers", "student_erm", "student_dr", "vfm", "tokt_kd_in_domain"):
        assert runs[name][-1] < runs[name][0], (name, runs[name])
    # above chance (1/10 shapes, 1/5 task classes) by a margin: the smoke is too short for the paper's effects
    assert res["teacher_acc"] > 0.1 + 0.05 and res["vfm_adapted_acc"] > res["task_chance"] + 0.05
    # the teacher forward is what DR removes from training (CPU seconds: wall time depends on the machine's load)
    assert res["kd_epoch_cpu_s"] > res["dr_epoch_cpu_s"]
    assert os.path.exists(out / "reinforced" / "manifest.json") and os.path.exists(out / "reinforce_results.png")
    assert "reinforce.py results" in p.stdout


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "reinforce.py", "--smoke",
           "--mode=dr", f"--out={out}", "--n_train=200", "--n_test=100", "--n_teacher=200", "--epochs=2",
           "--teacher_epochs=1", "--shard_size=50"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["world_size"] == 2 and res["ns"] == 2
    assert len(os.listdir(out / "reinforced")) == 5  # 4 shards (2 per rank) + manifest


def test_kl_loss_is_kl_target_to_student():
    """DR's loss: KL(target || student) with batchmean (ml-dr F.kl_div); zero when the student matches the target."""
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 5)
    x, t = torch.randn(3, 4), torch.softmax(torch.randn(3, 5), -1)
    logq = torch.log_softmax(m(x), -1)
    ref = (t * (t.log() - logq)).sum(-1).mean()
    assert torch.allclose(rf.kl_loss(m, (x, t)), ref, atol=1e-6)
    assert rf.kl_loss(m, (x, logq.exp().detach())).abs() < 1e-6
    # a densified top-k target is a distribution, so the KL is >= 0 and the loss is CE up to the target's entropy
    d = rf.densify(*rf.sparsify(t, 2), 5)
    assert torch.allclose(d.sum(-1), torch.ones(3), atol=1e-3) and rf.kl_loss(m, (x, d)) > 0
