"""Tests for subclone.py (weight subcloning, arXiv:2312.09299): identity at full size, sliced shapes, ranking
consistency, the LayerNorm rescaling invariant, block-removal rules, checkpoint round trip (clone command) and its
errors, old flag spellings, one smoke run that must learn (lr chosen on val), one 2-process torchrun smoke, and smoke
runs on exported world shards (1 process with bf16 autocast, then reused and retrained; 2 processes) checked through
the results' data block."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import subclone as S  # noqa: E402
from common.train import load_weights, save_weights  # noqa: E402
from common.world import World, export_shards  # noqa: E402

CFG = replace(S.Config(), width=32, layers=4, heads=4, ffn=64, child_width=16, child_layers=3, child_heads=2,
              child_ffn=24, image_size=32, patch_size=8, context_length=12)


def parent_and_input(kind, seed=0):
    torch.manual_seed(seed)
    arch = S.make_arch(CFG, kind, out=10 if kind == "vit" else 50)
    m = S.build(arch)
    with torch.no_grad():  # break the symmetric init: give norms / biases non-trivial values
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(8, 3, 32, 32) if kind == "vit" else torch.randint(0, 50, (8, 12))
    return m, arch, x


@pytest.mark.parametrize("kind", ["vit", "gpt"])
def test_full_size_subclone_is_identity(kind):
    m, arch, x = parent_and_input(kind)
    stats = S.collect_stats(m, x)
    for select in ("importance", "random"):
        child, info = S.make_child(m, arch, dict(arch), stats, drop="sim", select=select, scale="sqrt")
        assert info["kept_blocks"] == list(range(arch["layers"])) and info["scale"] == 1.0
        with torch.no_grad():
            torch.testing.assert_close(child(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "gpt"])
def test_sliced_shapes_and_values(kind):
    m, arch, x = parent_and_input(kind)
    carch = S.child_arch_of(arch, CFG)
    stats = S.collect_stats(m, x)
    sd, info = S.subclone(m.state_dict(), arch, carch, stats, drop="last", scale="none")
    want = S.build(carch).state_dict()
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert sd[k].shape == v.shape, k
    # values: one block checked index by index (kept block j <- parent block kept[j])
    e, f, hs = S.select_indices(stats, arch, carch)
    j, l = 2, info["kept_blocks"][2]
    P = m.state_dict()
    Dh, D = arch["width"] // arch["heads"], arch["width"]
    hd = torch.cat([torch.arange(h * Dh, (h + 1) * Dh) for h in hs[l].tolist()])
    rows = torch.cat([hd, D + hd, 2 * D + hd])
    torch.testing.assert_close(sd[f"blocks.{j}.attn.in_proj.weight"], P[f"blocks.{l}.attn.in_proj.weight"][rows][:, e])
    torch.testing.assert_close(sd[f"blocks.{j}.attn.out_proj.weight"], P[f"blocks.{l}.attn.out_proj.weight"][e][:, hd])
    torch.testing.assert_close(sd[f"blocks.{j}.mlp.c_fc.weight"], P[f"blocks.{l}.mlp.c_fc.weight"][f[l]][:, e])
    torch.testing.assert_close(sd[f"blocks.{j}.mlp.c_proj.weight"], P[f"blocks.{l}.mlp.c_proj.weight"][e][:, f[l]])
    emb = "conv1.weight" if kind == "vit" else "token_embedding.weight"
    torch.testing.assert_close(sd[emb], P[emb][e] if kind == "vit" else P[emb][:, e])
    # importance: kept residual neurons are the top-d of the global score
    score = S.embedding_score(stats["resid"])
    assert score[e].min() >= score[[i for i in range(D) if i not in set(e.tolist())]].max()


def test_rank_consistency():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 64, generator=g).repeat(5, 1)
    assert S.rank_consistency(same, 8) == 1.0
    disjoint = torch.zeros(4, 64)
    for l in range(4):
        disjoint[l, 8 * l:8 * l + 8] = 1.0 + torch.arange(8)
    assert S.rank_consistency(disjoint, 8) == 0.0
    rnd = torch.rand(20, 400, generator=g)
    assert abs(S.rank_consistency(rnd, 100) - 0.25) < 0.05    # chance: k / D


def test_rescaling_invariant():
    """Residual stream whose dropped dims are 0 and kept dims are zero-mean: the child's LayerNorm (gamma * sqrt(D/d))
    reproduces the parent's post-norm activations on the kept indices exactly; without rescaling it is off by
    sqrt(d/D)."""
    m, arch, x = parent_and_input("gpt")
    carch = S.child_arch_of(arch, CFG)
    stats = S.collect_stats(m, x)
    e = S.select_indices(stats, arch, carch)[0]
    z = torch.randn(6, 5, carch["width"])
    z = z - z.mean(-1, keepdim=True)
    xp = torch.zeros(6, 5, arch["width"])
    xp[..., e] = z
    for scale, factor in (("sqrt", 1.0), ("none", math.sqrt(carch["width"] / arch["width"]))):
        child, info = S.make_child(m, arch, carch, stats, drop="sim", scale=scale)
        for ln_p, ln_c in ((m.blocks[0].ln_1, child.blocks[0].ln_1), (m.ln_final, child.ln_final)):
            with torch.no_grad():
                want = ln_p(xp)[..., e] - ln_p.bias[e]             # the bias is additive, not rescaled
                got = ln_c(z) - ln_c.bias
            torch.testing.assert_close(got, want * factor, rtol=1e-4, atol=1e-5)


def test_block_removal_rules():
    assert S.keep_blocks(6, 6, "sim") == list(range(6))
    assert S.keep_blocks(6, 4, "last") == [0, 1, 2, 5]
    assert S.keep_blocks(6, 4, "middle") == [0, 1, 4, 5]
    assert S.keep_blocks(7, 4, "middle") == [0, 1, 5, 6]
    sim = torch.tensor([0.99, 0.5, 0.9, 0.3, 0.95, 0.99])       # first/last most similar, still kept
    assert S.keep_blocks(6, 4, "sim", sim) == [0, 1, 3, 5]
    assert S.keep_blocks(6, 2, "sim", sim) == [0, 5]
    with pytest.raises(ValueError):
        S.keep_blocks(6, 1, "sim", sim)
    with pytest.raises(ValueError):
        S.keep_blocks(6, 4, "first", sim)
    # the sim rule is what collect_stats measures: a block made an exact identity (zeroed residual branches) is
    # similarity 1 and is the first one dropped
    m, arch, x = parent_and_input("vit")
    with torch.no_grad():
        for p in (m.blocks[2].attn.out_proj, m.blocks[2].mlp.c_proj):
            p.weight.zero_(), p.bias.zero_()
    stats = S.collect_stats(m, x)
    assert abs(float(stats["sim"][2]) - 1.0) < 1e-5
    assert S.keep_blocks(4, 3, "sim", stats["sim"]) == [0, 1, 3]


def test_checkpoint_round_trip(tmp_path):
    """A parent written with its architecture in the header -> `clone` command -> child checkpoint that rebuilds from
    its own header and equals the in-memory subclone."""
    m, arch, _ = parent_and_input("vit")
    parent = tmp_path / "parent.safetensors"
    save_weights(parent, m, metadata={"arch": arch})
    out = tmp_path / "child.safetensors"
    argv = ["clone", f"--parent_ckpt={parent}", f"--clone_out={out}", "--n_calib=16", "--child_width=16",
            "--child_layers=3", "--child_heads=2", "--child_ffn=24", "--drop=middle", f"--out={tmp_path}"]
    assert S.main(argv) is None and out.exists()
    carch = S.read_arch(out)
    assert carch == S.child_arch_of(arch, replace(CFG, child_layers=3))
    child = S.build(carch)
    meta = load_weights(out, child)
    assert json.loads(meta["info"])["kept_blocks"] == [0, 2, 3]
    cfg = replace(CFG, n_calib=16)
    calib = S.make_data(cfg, "vit", None, n_classes=10, test=False)["calib"]
    ref, _ = S.make_child(m, arch, carch, S.collect_stats(m, calib), drop="middle")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(child(x), ref(x))


def test_clone_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        S.main(["clone", f"--parent_ckpt={bad}", f"--out={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        S.main(["clone", f"--parent_ckpt={tmp_path / 'missing.safetensors'}", f"--out={tmp_path}"])
    with pytest.raises(ValueError, match="--parent_ckpt"):
        S.main(["clone", f"--out={tmp_path}"])


@pytest.mark.parametrize("old,new", [("patch", "patch_size"), ("context", "context_length")])
def test_old_spellings_name_the_new_one(old, new):
    with pytest.raises(SystemExit, match=f"--{new}"):
        S.main([f"--{old}=8"])


KEYS = ["parent_loss", "child_init_loss", "steps_to_target", "speedup", "final_loss", "final_acc"]


def check_results(res, kinds):
    assert "seconds" in res and "device" in res
    for k in kinds:
        r = res[k]
        for key in KEYS:
            assert key in r, (k, key)
        for key in ("child_init_loss", "steps_to_target", "final_loss", "final_acc"):
            assert sorted(r[key]) == sorted(S.VARIANTS), (k, key)
        for v in ("subclone", "random"):  # the best lr is the one with the lowest final val loss
            sweep = r["lr_sweep_val_loss"][v]
            assert f"{r['best_lr'][v]:g}" == min(sweep, key=sweep.get), (k, v, sweep)
        assert r["target_loss"] == sweep[f"{r['best_lr']['random']:g}"]  # the random-init run's final val loss


def test_seeds_flag_checks(monkeypatch):
    """--seeds reaches run_seeds for the default command (none given, or run), and is refused with clone or one model."""
    calls = []
    monkeypatch.setattr(S, "run_seeds", lambda main, argv, cfg, effects: calls.append((argv, effects)) or "ok")
    assert S.main(["--seeds=0,1"]) == "ok" and S.main(["run", "--seeds=0,1"]) == "ok" and len(calls) == 2
    assert calls[0][1] is S.EFFECTS
    for argv in (["clone", "--seeds=0,1"], ["--seeds=0,1", "--models=vit"]):
        with pytest.raises(ValueError, match="--seeds"):
            S.main(argv)


def test_effects_read_the_results():
    """Every EFFECTS key exists in a results dict shaped like run_model's, and the verdict follows the sign."""
    from common.seeds import summarize
    def res(sub, rnd, ri):
        r = {"child_init_loss": {"subclone": sub, "random": rnd}, "steps_to_target_censored":
             {"subclone": 10.0, "random_indices": ri}, "mean_val_loss": {"subclone": sub - 0.5, "random_indices":
             sub - 0.5 + (ri - 20.0) / 100}, "speedup_censored": 250 / 10.0, "log10_best_lr":
             {"subclone": -3.0 + (ri - 20.0) / 100, "random": -2.5}, "parent_acc": 0.6, "chance": 0.1,
             "majority": 0.2}
        return {"vit": r, "gpt": r}
    rows = summarize({0: res(2.0, 2.5, 30.0), 1: res(2.1, 2.4, 35.0), 2: res(2.0, 2.45, 40.0)}, S.EFFECTS)
    assert [r["verdict"] for r in rows] == ["shown"] * len(S.EFFECTS)
    rows = summarize({0: res(2.6, 2.5, 5.0), 1: res(2.5, 2.4, 6.0), 2: res(2.5, 2.45, 7.0)}, S.EFFECTS)
    verdict = {r["effect"]: r["verdict"] for r in rows}
    for e in S.EFFECTS:  # subclone worse than random init / random indices: not shown; the rest unchanged
        want = "shown" if "speed-up" in e.name or "parent" in e.name or "lr below" in e.name else "not shown"
        assert verdict[e.name] == want, (e.name, verdict[e.name])


def test_curve_mean():
    """The mean val loss of a curve is its trapezoid area over the steps divided by the steps it spans."""
    curve = [[0, 3.0, 0], [10, 1.0, 0], [30, 1.0, 0]]
    assert S.curve_mean(curve) == pytest.approx((10 * 2.0 + 20 * 1.0) / 30)
    assert S.curve_mean(curve, 1) == pytest.approx(1.0) and S.curve_mean(curve[:1]) == 3.0


def test_smoke_learns(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "subclone.py", "--smoke", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    check_results(res, ["vit", "gpt"])
    assert (out / "curves.png").exists() and (out / "gpt_child_init.safetensors").exists()
    for k, chance_loss, chance_acc in (("vit", math.log(10), 0.1), ("gpt", math.log(802), 1 / 802)):
        r = res[k]
        assert r["parent_loss"] < chance_loss and r["parent_acc"] > chance_acc, k
        assert r["final_loss"]["random"] < r["child_init_loss"]["random"], k            # the children learn
        assert r["final_loss"]["subclone"] < chance_loss and r["final_acc"]["subclone"] > chance_acc, k
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("run") == "gpt_parent" for r in rows)
    for k in ("vit", "gpt"):  # the lr grid: the smoke grid (1e-3, 3e-3) plus at most one x3 step per side
        for v, grid in res[k]["lr_grid"].items():
            assert set(grid) >= {1e-3, 3e-3} and len(grid) <= 4 and sorted(grid) == grid, (k, v, grid)
            assert set(res[k]["lr_sweep_val_loss"][v]) == {f"{lr:g}" for lr in grid}
    for e in S.EFFECTS:  # every effect key resolves in a real results.json
        from common.seeds import lookup
        lookup(res, e.a)


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
           "subclone.py", "--smoke", "--models=gpt", "--parent_steps=12", "--steps=6", "--lrs=1e-3",
           "--eval_every=3", "--n_train=200", "--n_test=64", f"--out={out}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    check_results(res, ["gpt"])
    assert res["gpt"]["parent_loss"] < math.log(802)


# ---------------------------------------------------------------- exported world shards through --data


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """World shards at 40 px (the script resizes to its 32 px): train/ (320 samples, 5 shards, classes.txt), val/,
    test/."""
    d = tmp_path_factory.mktemp("shards")
    export_shards(World(seed=3, split="train", size=40, n=320), d / "train", 320, shard_size=64)
    export_shards(World(seed=3, split="val", size=40, n=24), d / "val", 24, shard_size=24)
    export_shards(World(seed=3, split="test", size=40, n=48), d / "test", 48, shard_size=24)
    return d


# tiny: per model a parent of 8 steps and 4 children of 4 steps, batch 32 (every stream stays in its first epoch)
TINY = ["--smoke", "--parent_steps=8", "--steps=4", "--lrs=1e-3", "--eval_every=2", "--n_test=32", "--n_eval=16",
        "--n_calib=16", "--batch_size=32", "--log_every=4"]


def check_shard_run(out):
    res = json.loads((out / "results.json").read_text())
    check_results(res, ["vit", "gpt"])
    d = res["data"]
    assert "shards(" in d["source"] and "test" in d["eval_source"] and "val" in d["eval_source"], d
    assert d["eval_keys_in_train"] == 0 and d["train_keys_on_several_ranks"] == 0 and d["skipped_corrupt"] == 0, d
    assert d["train_samples_seen"] == 2 * (8 + 4 * 4) * 32, d       # every batch of both models' 10 runs
    # every run of a model reads the same first-epoch order, so the distinct keys are the parent's 8 x 32
    assert d["train_unique_keys"] == 8 * 32 and d["eval_samples"] == 2 * (16 + 32), d    # val n_eval + test n_test
    return res


def test_shards_one_process_bf16(tmp_path, shards):
    """Then the same command again: every stage (2 parents, 8 child runs) is reused from --out with the same numbers
    (a child's curve comes back from its checkpoint); with --retrain every stage trains again."""
    out = tmp_path / "one"
    cmd = [sys.executable, "subclone.py", *TINY, f"--data={shards}/{{split}}", "--amp=bf16", f"--out={out}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = check_shard_run(out)
    assert res["world_size"] == 1 and res["vit"]["params"]["parent"] > 0
    for extra, reused in (([], 10), (["--retrain"], 0)):
        p = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert p.stdout.count(": reusing ") == reused, p.stdout[-3000:]
        again = check_shard_run(out)
        for k in ("vit", "gpt"):
            for key in ("parent_loss", "child_init_loss", "target_loss", "steps_to_target", "final_loss", "best_lr"):
                assert again[k][key] == res[k][key], (extra, k, key)


def test_shards_two_processes(tmp_path, shards):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29733", "subclone.py",
           *TINY, f"--data={shards}/{{split}}", f"--out={out}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert check_shard_run(out)["world_size"] == 2
