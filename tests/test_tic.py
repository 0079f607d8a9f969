"""tic.py: replay buffers, fixed budgets, warm starts, time-matrix summaries, real-data path, 2-process smoke."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tic
from common.train import Dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps=8", "--n_train=48", "--n_eval=24", "--batch_size=16", "--width=32", "--layers=1",
        "--text_width=32", "--text_layers=1", "--embed_dim=32", "--warmup=2", "--log_every=0"]


def test_parse_time_steps():
    assert tic.parse_time_steps("2014-2016,2017,2018-2019") == [[2014, 2015, 2016], [2017], [2018, 2019]]
    with pytest.raises(SystemExit, match="2019-2018"):
        tic.parse_time_steps("2019-2018")
    with pytest.raises(SystemExit, match="abc"):
        tic.parse_time_steps("abc")


def test_replay_counts_exp_and_equal():
    # Exp: half from t-1, a quarter from t-2, the oldest takes the rest; always sums to the buffer size
    assert tic.replay_counts("cumulative_exp", 1, 1000) == {0: 1000}
    assert tic.replay_counts("cumulative_exp", 3, 1000) == {2: 500, 1: 250, 0: 250}
    assert tic.replay_counts("cumulative_exp", 4, 1000) == {3: 500, 2: 250, 1: 125, 0: 125}
    # Equal: split evenly, remainder to the newest steps
    assert tic.replay_counts("cumulative_equal", 3, 1000) == {0: 333, 1: 333, 2: 334}
    assert tic.replay_counts("cumulative_equal", 4, 1000) == {0: 250, 1: 250, 2: 250, 3: 250}
    for s in ("cumulative_exp", "cumulative_equal"):
        for t in range(1, 7):
            assert sum(tic.replay_counts(s, t, 777).values()) == 777
    assert tic.replay_counts("sequential", 3, 1000) == {}
    assert tic.replay_counts("cumulative_exp", 0, 1000) == {}


def test_training_pools():
    n, T = 100, 4
    step_of = lambda idx: np.bincount(idx // n, minlength=T).tolist()
    assert step_of(tic.training_pool("sequential", 2, n, n)) == [0, 0, 100, 0]
    assert step_of(tic.training_pool("cumulative_all", 2, n, n)) == [100, 100, 100, 0]
    assert step_of(tic.training_pool("restart", 3, n, n)) == [100, 100, 100, 100]
    assert step_of(tic.training_pool("cumulative_exp", 3, n, n)) == [25, 25, 50, 100]
    assert step_of(tic.training_pool("cumulative_equal", 3, n, n)) == [33, 33, 34, 100]
    # bounded memory: Exp/Equal never hold more than |D_t| + buffer, however many steps have passed
    assert len(tic.training_pool("cumulative_exp", 6, n, n)) == 2 * n
    # the buffer is a stable subset of each old step (no duplicates)
    p = tic.training_pool("cumulative_equal", 3, n, n, seed=3)
    assert len(np.unique(p)) == len(p)
    with pytest.raises(ValueError, match="bogus"):
        tic.training_pool("bogus", 1, n, n)


def test_summarize_hand_made_matrix():
    M = [[0.5, 0.1, 0.0],
         [0.4, 0.6, 0.2],
         [0.3, 0.5, 0.7]]
    s = tic.summarize(M)
    assert s["id"] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert s["backward"] == pytest.approx((0.4 + 0.3 + 0.5) / 3)
    assert s["forward"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert s["final_avg"] == pytest.approx(0.5)
    # Oracle: one row, the final step -> no forward entries, backward over the older columns
    o = tic.summarize([[0.3, 0.5, 0.7]], rows=[2])
    assert o == {"id": pytest.approx(0.7), "backward": pytest.approx(0.4), "forward": None,
                 "final_avg": pytest.approx(0.5)}


def _cfg(tmp_path, **kw):
    cfg = tic.parse_config(tic.Config, [f"--out={tmp_path}", *TINY, "--reuse=false"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_warm_start_resets_optimizer_and_schedule(tmp_path):
    """A warm start keeps the weights but gets a fresh AdamW (state counts only this step's updates) and a fresh
    cosine schedule with no warm-up (first logged lr = peak lr)."""
    cfg = _cfg(tmp_path, log_every=1)
    dist = Dist()
    n = 32
    images = np.random.default_rng(0).integers(0, 255, (2 * n, 32, 32, 3), dtype=np.uint8)
    tokens = torch.randint(1, 50, (2 * n, cfg.context))
    tokens[:, 10] = 99
    model = tic.build_model(cfg, 100)
    tic.train_time_step(cfg, dist, model, images, tokens, np.arange(n), cfg.steps, "a", warm=False)
    w = {k: v.clone() for k, v in model.state_dict().items()}
    hist, opt = tic.train_time_step(cfg, dist, model, images, tokens, np.arange(n, 2 * n), cfg.steps, "b", warm=True)
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {cfg.steps}  # not 2 * steps: the optimizer was not carried over
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    b_rows = [r for r in rows if r.get("run") == "b"]
    assert b_rows and b_rows[0]["step"] == 1 and b_rows[0]["lr"] == pytest.approx(cfg.warm_lr)  # no warm-up, fresh cosine
    a_rows = [r for r in rows if r.get("run") == "a"]
    assert a_rows[0]["lr"] < cfg.lr  # the from-scratch run did warm up
    assert any(not torch.equal(w[k], v) for k, v in model.state_dict().items())  # it trained from the warm weights


def test_fixed_budget_and_learning(tmp_path):
    """Every strategy but Oracle sees steps*batch samples per time step; training lowers the contrastive loss."""
    out = tmp_path / "run"
    res = tic.main([f"--out={out}", *TINY, "--steps=40", "--n_train=96", "--lr=3e-3",
                    "--strategies=sequential,cumulative_all,oracle", "--log_every=5", "--time_steps=2014-2016,2017-2019,2020-2022"])
    C = 40 * 16
    assert res["sequential"]["samples_seen"] == 3 * C
    assert res["cumulative_all"]["samples_seen"] == 3 * C
    assert res["oracle"]["samples_seen"] == 3 * C  # T*C once, at the final step
    assert len(res["cumulative_all"]["matrix_retrieval"]) == 3 and len(res["oracle"]["matrix_retrieval"]) == 1
    assert res["oracle_compute_ratio"] == pytest.approx(2.0)  # (T+1)/2 at T=3
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    first = [r["loss"] for r in log if r.get("run") == "oracle_t3"]
    assert first[-1] < first[0] - 0.3, first  # learns: below its start (~ln 16)
    chance = 1 / 24
    assert res["oracle"]["final_avg"] > chance
    for f in ("results.json", "config.json", "tic_retrieval.png", "tic_zeroshot.png", "tic_compute.png"):
        assert (out / f).exists()


def test_real_data_year_field_and_torchrun(tmp_path):
    """World shards (year in KEY.json) through --data, run under torchrun with 2 gloo processes."""
    from common.world import World, export_shards
    shards = tmp_path / "shards"
    export_shards(World(seed=1, split="train", size=32, n=240), str(shards), n=240, shard_size=80)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "tic.py",
           f"--out={out}", f"--data={shards}", *TINY, "--n_train=40", "--n_eval=16", "--device=cpu",
           "--strategies=sequential,cumulative_exp", "--time_steps=2014-2017,2018-2022"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert len(res["sequential"]["matrix_retrieval"]) == 2
    assert res["cumulative_exp"]["samples_seen"] == 2 * 8 * 16


def test_missing_year_is_a_clear_error(tmp_path):
    import io
    import tarfile
    from PIL import Image
    d = tmp_path / "noyear"
    d.mkdir()
    with tarfile.open(d / "shard-000000.tar", "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", b"a red circle")):
                ti = tarfile.TarInfo(f"k{i}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    with pytest.raises(SystemExit, match="year"):
        tic.main([f"--out={tmp_path / 'run'}", f"--data={d}", *TINY])
