"""tic.py: replay buffers (indices on the world, key hashes on shards), fixed budgets, warm starts, time-matrix
summaries, stage reuse by fingerprint, real-data layouts (per-step sub-folders with {split}; one year-tagged stream
with --holdout under 2 gloo processes) with their provenance, and the missing-year error."""
import json
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors import safe_open

import tic
from common.data import SampleSource, ShardSource, Stream, iter_samples
from common.train import Dist
from common.world import World, export_shards

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


def _pool_steps(strategy, t, n=100, T=4, buffer=100, seed=0):
    parts = [(str(s), SampleSource([{"__key__": f"{s}-{i}"} for i in range(n)]), None) for s in range(T)]
    pool = tic.one_source(parts, tic.step_fractions(strategy, t, n, buffer), seed)
    keys = [pool.key(i) for i in range(len(pool))]
    return [Counter(k.split("-")[0] for k in keys)[str(s)] for s in range(T)], set(keys), len(keys)


def test_training_data_per_strategy():
    assert _pool_steps("sequential", 2)[0] == [0, 0, 100, 0]
    assert _pool_steps("cumulative_all", 2)[0] == [100, 100, 100, 0]
    assert _pool_steps("restart", 3)[0] == [100, 100, 100, 100]
    assert _pool_steps("cumulative_exp", 3)[0] == [25, 25, 50, 100]
    assert _pool_steps("cumulative_equal", 3)[0] == [33, 33, 34, 100]
    # bounded: Exp/Equal never train on more than |D_t| + buffer, however many steps have passed
    assert _pool_steps("cumulative_exp", 6, T=7)[2] == 200
    # the buffer is a stable subset of each old step (no duplicates; a smaller buffer of a step is inside a larger)
    _, keys, size = _pool_steps("cumulative_equal", 3, seed=3)
    assert len(keys) == size
    old = {k for k in _pool_steps("cumulative_exp", 3)[1] if k.startswith("1-")}  # 25 of step 1
    assert old <= {k for k in _pool_steps("cumulative_exp", 2)[1] if k.startswith("1-")}  # 50 of step 1
    with pytest.raises(ValueError, match="bogus"):
        tic.step_fractions("bogus", 1, 100, 100)


def test_mixture_replay_buffer_by_key(tmp_path):
    """On shards a buffer is chosen by key hash: about the asked fraction, nested as it shrinks, streamed with
    2 workers without repeats within an epoch; a year-tagged stream keeps the years of the asked steps."""
    for s, ys in enumerate(([2014, 2015], [2016, 2017])):
        export_shards(World(split="train", size=32, n=200, years=ys), tmp_path / str(s), shard_size=50)
    a, b = (ShardSource(str(tmp_path / str(s))) for s in range(2))
    keys = lambda src: [x["__key__"] for x in iter_samples(src)]
    half, quarter = (set(keys(tic.Mixture([(a, f)], seed=1))) for f in (0.5, 0.25))
    assert 70 < len(half) < 130 and quarter < half
    mix = tic.Mixture([(a, 0.5), (b, 1.0)], seed=1)
    assert set(keys(mix)) == half | set(keys(b))
    stream = lambda: Stream(mix, batch_size=10, seed=0, num_workers=2, transform=lambda x, g: {"label": x["label"]})
    st = stream()
    seen = [k for i in range(20) for k in st(i)["__key__"]]
    assert len(set(seen)) == len(seen) == 200 and set(seen) <= half | set(keys(b))
    st.close()
    st = stream()  # resume mid-stream from a state dict: the same batches as the uninterrupted stream
    for i in range(7):
        st(i)
    sd = st.state_dict()
    st.close()
    st = stream()
    st.load_state_dict(sd)
    assert [k for i in range(7, 20) for k in st(i)["__key__"]] == seen[70:]
    st.close()
    export_shards(World(split="train", size=32, n=200), tmp_path / "all", shard_size=50)
    tagged = ShardSource(str(tmp_path / "all"))
    years = {x["year"] for x in iter_samples(tic.Mixture([(tagged, {2016: 1.0, 2017: 1.0})]))}
    assert years == {2016, 2017}


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
    cfg = tic.parse_config(tic.Config, [f"--out={tmp_path}", *TINY])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_warm_start_resets_optimizer_and_schedule(tmp_path):
    """A warm start keeps the weights but gets a fresh AdamW (state counts only this step's updates) and a fresh
    cosine schedule with no warm-up (first logged lr = peak lr)."""
    cfg = _cfg(tmp_path, log_every=1)
    dist = Dist()
    images = torch.rand(2, 16, 3, 32, 32)
    tokens = torch.randint(1, 50, (2, 16, cfg.context_length))
    tokens[..., 10] = 99
    model = tic.build_model(cfg, 100)
    tic.train_time_step(cfg, dist, model, lambda i: (images[0], tokens[0]), cfg.steps, "a", cfg.lr, cfg.warmup)
    w = {k: v.clone() for k, v in model.state_dict().items()}
    tic.train_time_step(cfg, dist, model, lambda i: (images[1], tokens[1]), cfg.steps, "b", cfg.warm_lr,
                        cfg.warm_start_warmup)
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:  # AdamW's per-parameter step counts
        steps = {int(f.get_tensor(k)) for k in f.keys() if k.startswith("optim.") and k.endswith(".step")}
    assert steps == {cfg.steps}  # not 2 * steps: the optimizer was not carried over
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    b_rows = [r for r in rows if r.get("run") == "b"]
    # no warm-up, a fresh cosine: the first lr is the peak
    assert b_rows and b_rows[0]["step"] == 1 and b_rows[0]["lr"] == pytest.approx(cfg.warm_lr)
    a_rows = [r for r in rows if r.get("run") == "a"]
    assert a_rows[0]["lr"] < cfg.lr  # the from-scratch run did warm up
    assert any(not torch.equal(w[k], v) for k, v in model.state_dict().items())  # it trained from the warm weights


def test_fixed_budget_and_learning(tmp_path):
    """Every strategy but Oracle sees steps*batch samples per time step; training lowers the contrastive loss."""
    out = tmp_path / "run"
    res = tic.main([f"--out={out}", *TINY, "--steps=40", "--n_train=96", "--lr=3e-3",
                    "--strategies=sequential,cumulative_all,oracle", "--log_every=5",
                    "--time_steps=2014-2016,2017-2019,2020-2022"])
    C = 40 * 16
    assert res["sequential"]["samples_seen"] == 3 * C
    assert res["cumulative_all"]["samples_seen"] == 3 * C
    assert res["oracle"]["samples_seen"] == 3 * C  # T*C once, at the final step
    assert len(res["cumulative_all"]["matrix_retrieval"]) == 3 and len(res["oracle"]["matrix_retrieval"]) == 1
    assert res["oracle_compute_ratio"] == pytest.approx(2.0)  # an up-to-date Oracle (1 + 2 + 3) C vs 3 C
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    warm = [r for r in log if r.get("run") == "sequential_t2"]  # a warm start: its own peak lr, no warm-up
    assert warm[0]["step"] == 1 and warm[0]["lr"] == pytest.approx(tic.Config.warm_lr)
    first = [r["loss"] for r in log if r.get("run") == "oracle_t3"]
    assert first[-1] < first[0] - 0.3, first  # learns: below its start (~ln 16)
    chance = 1 / 24
    assert res["oracle"]["final_avg"] > chance
    for f in ("results.json", "config.json", "tic_retrieval.png", "tic_zeroshot.png", "tic_compute.png"):
        assert (out / f).exists()
    d = res["data"]  # six runs: step1, 2 x sequential, 2 x cumulative_all at C each, Oracle at 3 C
    assert d["train_samples_seen"] == 8 * C and d["train_unique_keys"] == 3 * 96
    assert d["eval_samples"] == 3 * 24 and d["eval_keys_in_train"] == 0 and d["skipped_corrupt"] == 0


def test_stage_reuse_by_fingerprint(tmp_path):
    """A finished run is reused while its fingerprint matches: the warm-start lr changes only warm runs; the
    from-scratch lr changes step 1 and with it every run warm-started from it; --retrain trains everything again."""
    args = [f"--out={tmp_path}", *TINY, "--steps=4", "--strategies=restart,sequential", "--strategy_lr=",
            "--time_steps=2014-2017,2018-2022"]  # no per-strategy lr: --lr / --warm_lr alone
    runs = ("step1", "restart_t2", "sequential_t2")

    def trained(*extra):  # the runs whose checkpoint this invocation wrote
        stamp = lambda: {n: os.stat(tmp_path / f"{n}.safetensors").st_mtime_ns for n in runs}
        before = stamp() if (tmp_path / "step1.safetensors").exists() else {}
        res = tic.main(args + list(extra))
        return res, {n for n, t in stamp().items() if before.get(n) != t}

    first, new = trained()
    assert new == set(runs)
    again, new = trained()
    assert new == set() and again["sequential"]["matrix_retrieval"] == first["sequential"]["matrix_retrieval"]
    assert trained("--warm_lr=1e-4")[1] == {"sequential_t2"}
    assert trained("--warm_lr=1e-4", "--lr=2e-3")[1] == set(runs)  # Sequential starts from a new step 1
    assert trained("--warm_lr=1e-4", "--lr=2e-3")[1] == set()
    assert trained("--warm_lr=1e-4", "--lr=2e-3", "--retrain")[1] == set(runs)
    assert trained("--warm_lr=1e-4", "--lr=2e-3", f"--drift={tic.Config.drift}")[1] == set()  # the default drift
    assert trained("--warm_lr=1e-4", "--lr=2e-3", "--drift=1")[1] == set(runs)  # the shared world: every run
    assert trained("--warm_lr=1e-4", "--lr=2e-3", "--drift=1")[1] == set()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["step_folders_bf16", "year_field_2procs"])
def test_shards_provenance(tmp_path, layout):
    """Exported world shards, 2 time steps, Sequential (each run reads only its step's keys): per-step sub-folders of
    {split} folders in 1 process under bf16 autocast, or one year-tagged stream held out by key hash under 2 gloo
    processes. The data block proves disjoint ranks, no repeats and no eval key in training."""
    groups = ([2014, 2015, 2016, 2017], [2018, 2019, 2020, 2021, 2022])
    if layout == "step_folders_bf16":
        for split, n in (("train", 64), ("test", 24)):
            for ys in groups:
                export_shards(World(split=split, size=32, n=n, years=ys), tmp_path / split / str(ys[0]), shard_size=32)
        launch, data = [], [f"--data={tmp_path / '{split}'}", "--amp=bf16", "--num_workers=2"]
    else:
        export_shards(World(seed=1, split="train", size=32, n=320), tmp_path / "all", shard_size=40)
        launch = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
        data = [f"--data={tmp_path / 'all'}", "--holdout=0.2", "--num_workers=1"]
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, *launch, "tic.py", f"--out={out}", *data, *TINY, "--steps=3", "--n_eval=16",
                        "--device=cpu", "--strategies=sequential", "--time_steps=2014-2017,2018-2022"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert len(res["sequential"]["matrix_retrieval"]) == 2 and len(res["sequential"]["matrix_zeroshot"]) == 2
    d = res["data"]
    assert d["train_samples_seen"] == d["train_unique_keys"] == 2 * 3 * 16
    assert d["train_keys_on_several_ranks"] == 0 and d["eval_keys_in_train"] == 0 and d["skipped_corrupt"] == 0
    assert d["eval_samples"] == 2 * 16


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
    with pytest.raises(ValueError, match="sample 'k.' has no 'year' in its .json"):
        tic.main([f"--out={tmp_path / 'run'}", f"--data={d}", "--holdout=0.3", *TINY])


# ---------------------------------------------------------------- --warm_start: an open_clip checkpoint as step 1
def _open_clip_name(k):
    """This project's CLIP key -> open_clip's (text tower at the top level, transformer.resblocks, in_proj_weight)."""
    k = k.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
    k = k.replace("blocks.", "transformer.resblocks.")
    return k[len("text."):] if k.startswith("text.") else k


def _tiny_open_clip(path, seed=0, vocab=None, drop=()):
    """A random 24 px ViT CLIP (patch 8, width 64 = 1 head, 1 block per tower, context 20, embed 32, the world's
    vocabulary) saved as safetensors in open_clip's key names; returns the state dict saved."""
    from safetensors.torch import save_file
    from common.models import CLIP, TextTransformer, VisionTransformer
    from common.tokenizer import world_tokenizer
    torch.manual_seed(seed)
    V = vocab or world_tokenizer().vocab_size
    m = CLIP(VisionTransformer(24, 8, 64, 1, 1, 4.0, 32), TextTransformer(V, 20, 64, 1, 1, 32))
    sd = {_open_clip_name(k): v.contiguous() for k, v in m.state_dict().items() if _open_clip_name(k) not in drop}
    save_file(sd, str(path))
    return sd


WARM = [*TINY, "--steps=4", "--time_steps=2014-2017,2018-2022", "--warm_lr=1e-12", "--device=cpu",
        "--restart_rows=all"]


def test_warm_start_checkpoint_is_step1(tmp_path):
    """--warm_start: step 1 is the checkpoint (not trained, evaluated at its own 24 px with open_clip's normalised
    preprocessing and context 20), every run starts from it (at warm_lr ~ 0 the trained weights stay the file's),
    results.json and every run's fingerprint name the file, and another file at the same path retrains them."""
    from common.data import read_samples, stack
    from common.models import load_clip_checkpoint
    from common.tokenizer import world_tokenizer
    from common.train import load_weights
    from common.transforms import eval_transform
    ck, out = tmp_path / "clip24.safetensors", tmp_path / "run"
    _tiny_open_clip(ck)
    args = [f"--out={out}", *WARM, "--strategies=sequential,restart,lwf", f"--warm_start={ck}"]
    res = tic.main(args)
    runs = ("sequential_t2", "restart_t2", "lwf_t2")
    assert not (out / "step1.safetensors").exists() and all((out / f"{r}.safetensors").exists() for r in runs)
    w = res["warm_start"]
    assert w["checkpoint"] == str(ck) and w["image_size"] == 24 and w["context_length"] == 20
    assert w["tokenizer"] == "world" and w["model"]["vision_width"] == 64
    for s in ("sequential", "restart", "lwf"):
        assert res[s]["samples_seen"] == 4 * 16  # step 1 took no samples
    # step 1's row is the checkpoint's own scores, computed here independently of main
    model, cfg = load_clip_checkpoint(str(ck)), tic.parse_config(tic.Config, args)
    parts, tok, prep = tic.step_sources(cfg, [[2014, 2015, 2016, 2017], list(range(2018, 2023))], "test"), \
        world_tokenizer(20), eval_transform(24)
    sets = []
    for k in range(2):
        ev = read_samples(tic.one_source(parts, {k: 1.0}), cfg.n_eval)
        sets.append({"images": torch.stack([prep(x["image"]) for x in ev]), "tokens": tok(stack(ev, "caption"))})
    row = tic.evaluate(model, sets, None, tok, "cpu")[0]
    for s in ("sequential", "restart", "lwf"):
        assert res[s]["matrix_retrieval"][0] == pytest.approx(row, abs=1e-9)
    # runs start from the checkpoint's weights (lr 1e-12: they stay there) and their fingerprint holds its path
    for r in runs:
        trained = load_clip_checkpoint(str(ck))
        load_weights(out / f"{r}.safetensors", trained)
        ref = model.state_dict()
        assert all(torch.allclose(v, ref[k], atol=1e-6) for k, v in trained.state_dict().items()), r
        with safe_open(str(out / f"{r}.safetensors"), "pt") as f:
            assert str(ck.resolve()) in f.metadata()["fingerprint"]
    stamp = lambda: {r: os.stat(out / f"{r}.safetensors").st_mtime_ns for r in runs}  # noqa: E731
    before = stamp()
    tic.main(args)
    assert stamp() == before  # same file: every run reused
    _tiny_open_clip(ck, seed=1)  # another checkpoint of the same size at the same path: everything trains again
    res = tic.main(args)
    assert all(before[r] != t for r, t in stamp().items())
    assert res["sequential"]["matrix_retrieval"][0] != pytest.approx(row, abs=1e-9)


def test_warm_start_bad_checkpoints_are_one_line_errors(tmp_path):
    """A missing, truncated, incomplete or foreign-vocabulary checkpoint stops before any training with a message
    that names the file; --bpe loads CLIP's tokenizer from a merges file (here the world's own)."""
    from common.convert import CheckpointError
    from common.tokenizer import world_tokenizer
    good = tmp_path / "good.safetensors"
    _tiny_open_clip(good)
    run = lambda ck, *a: tic.main([f"--out={tmp_path / 'run'}", *WARM, f"--warm_start={ck}", *a])  # noqa: E731
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        run(tmp_path / "nope.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        run(cut)
    part = tmp_path / "part.safetensors"
    _tiny_open_clip(part, drop=("visual.proj",))
    with pytest.raises(CheckpointError, match=r"part\.safetensors: .*visual\.proj"):
        run(part)
    other = tmp_path / "vocab.safetensors"
    _tiny_open_clip(other, vocab=300)
    with pytest.raises(ValueError, match=r"vocab\.safetensors: its token_embedding has 300 rows .* --bpe="):
        run(other)
    assert not (tmp_path / "run" / "results.json").exists()
    with pytest.raises(SystemExit, match="--warm_start"):
        tic.main([f"--out={tmp_path / 'run'}", *WARM, "--bpe=x.txt"])
    cfg = tic.parse_config(tic.Config, [*WARM, f"--warm_start={good}", f"--bpe={ROOT}/common/world_bpe.txt"])
    model, tok, fp = tic.load_warm_start(cfg)
    assert tok.context_length == 20 and fp["bpe"].endswith("world_bpe.txt")
    assert tok("a red circle").tolist() == world_tokenizer(20)("a red circle").tolist()


def test_restart_rows_strategy_lr_val_and_probe(tmp_path):
    """Restart trains only at the final step by default (one row, C samples) and at every step with
    --restart_rows=all; --strategy_lr gives one strategy its own peak lr (its first logged lr, no warm-up); every
    strategy reports its final model's val retrieval and a probe whose bars follow from the world's attributes."""
    out = tmp_path / "run"
    args = [f"--out={out}", *TINY, "--steps=4", "--strategies=restart,sequential", "--log_every=1",
            "--time_steps=2014-2016,2017-2019,2020-2022"]
    res = tic.main(args + ["--strategy_lr=sequential=3e-4,restart=7e-4"])
    assert res["restart"]["rows"] == [2] and res["restart"]["samples_seen"] == 4 * 16
    assert not (out / "restart_t2.safetensors").exists() and (out / "restart_t3.safetensors").exists()
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    first = {r["run"]: r["lr"] for r in reversed(log) if "run" in r and r.get("step") == 1}
    assert first["sequential_t2"] == pytest.approx(3e-4) and first["sequential_t3"] == pytest.approx(3e-4)
    assert first["step1"] < tic.Config.lr  # step 1 is shared: the from-scratch lr, warming up
    assert first["restart_t3"] < 7e-4  # a from-scratch run at its own lr still warms up
    for s in ("restart", "sequential"):
        v = res[s]["val"]
        assert len(v["retrieval"]) == 3 and v["final_avg"] == pytest.approx(sum(v["retrieval"]) / 3)
        # the val time matrix: one row per trained checkpoint, its last row the final model's
        assert len(v["matrix"]) == len(res[s]["rows"]) and v["matrix"][-1] == v["retrieval"]
        assert v["backward"] == pytest.approx(tic.summarize(v["matrix"], res[s]["rows"])["backward"])
        p = res[s]["probe"]
        assert set(p["per_attribute"]) == {"shape", "color", "size", "texture"}
        assert p["chance"] == pytest.approx((1 / 10 + 1 / 9 + 1 / 3 + 1 / 5) / 4)
        assert p["acc"] == pytest.approx(sum(p["per_attribute"].values()) / 4)
        assert p["majority"] > p["chance"] - 1e-9
    res = tic.main(args + ["--restart_rows=all", "--strategy_lr=sequential=3e-4,restart=7e-4"])
    # its step 1 is the shared run
    assert res["restart"]["rows"] == [0, 1, 2] and res["restart"]["samples_seen"] == 3 * 4 * 16
    with pytest.raises(SystemExit, match="--strategy_lr"):
        tic.main(args + ["--strategy_lr=sequentail=1e-3"])
    with pytest.raises(SystemExit, match="--restart_rows"):
        tic.main(args + ["--restart_rows=some"])


def test_world_drift_scale():
    """--drift scales the world's frequency trends: scale 1 is the shared world bit for bit, and at any scale a
    sample makes the same random draws (same object count and grid cells), only its attributes follow the stronger
    trend: circle and red frequent in 2014 become rare by 2022."""
    def share(scale, year, n=240):
        w = World(0, "train", 32, years=[year], drift_scale=scale)
        xs = [w[i] for i in range(n)]
        return (sum(o["shape"] == "circle" for x in xs for o in x["objects"]) / sum(len(x["objects"]) for x in xs),
                sum(o["color"] == "red" for x in xs for o in x["objects"]) / sum(len(x["objects"]) for x in xs), xs)
    base, same = World(0, "train", 32, years=[2014]), World(0, "train", 32, years=[2014], drift_scale=1.0)
    for i in range(30):
        a, b = base[i], same[i]
        assert (a["image"] == b["image"]).all() and a["caption"] == b["caption"] and a["objects"] == b["objects"]
    (c1, r1, x1), (c3, r3, x3) = share(1.0, 2014), share(3.0, 2014)
    assert [[o["pos"] for o in x["objects"]] for x in x1] == [[o["pos"] for o in x["objects"]] for x in x3]
    assert c3 > c1 + 0.12 and r3 > r1 + 0.08  # by the trend formula: circle .25 -> .58, red .21 -> .45
    (c1, r1, _), (c3, r3, _) = share(1.0, 2022), share(3.0, 2022)
    assert c3 < 0.02 and c3 < c1 and r3 < 0.03 and r3 < r1  # by the formula: circle .04 -> .004, red .06 -> .01
    with pytest.raises(ValueError, match="drift_scale"):
        World(0, "train", 32, drift_scale=-1.0)


def test_probe_labels_are_the_captions_attributes():
    """The probe reads the main object (the caption's first, the sample's label), not objects[0] (painting order)."""
    samples = [World(0, "test", 32, years=[2020])[i] for i in range(200)]
    y = tic.probe_labels(samples)
    assert y["shape"] == [x["label"] for x in samples]
    moved = 0
    for k, x in enumerate(samples):
        o = tic.main_object(x)
        assert o["visible"] and o["area"] == max(p["area"] for p in x["objects"] if p["visible"])
        lead = f"a {o['size']} {o['color']} {o['shape']}"  # a single main object opens the caption
        if sum(p["visible"] and p["shape_id"] == o["shape_id"] for p in x["objects"]) == 1:
            assert x["caption"].startswith(lead)
        assert (y["shape"][k], y["color"][k], y["size"][k]) == (o["shape_id"], o["color_id"], o["size_id"])
        assert x["texture"] == ["plain", "striped", "checkered", "dotted", "wavy"][y["texture"][k]]
        moved += o is not x["objects"][0]
    assert moved >= 20  # objects[0] is often not the main object: the old probe read the wrong one
    assert tic.probe_labels([{"label": 3}]) == {"label": [3]} and tic.probe_labels([{"image": 0}]) is None


def test_seeds_write_a_verdict_per_effect(tmp_path):
    """--seeds runs the default once per seed and judges every effect of EFFECTS (keys exist in results.json)."""
    out = tmp_path / "seeds"
    res = tic.main([f"--out={out}", *TINY, "--steps=3", "--seeds=0,1", "--time_steps=2014-2016,2017-2019,2020-2022"])
    rows = json.loads((out / "seeds.json").read_text())["effects"]
    assert [r["effect"] for r in rows] == [e.name for e in tic.EFFECTS] and res["seeds"] == [0, 1]
    assert all(r["verdict"] in ("shown", "not shown") and len(r["d_values"]) == 2 for r in rows)
    r0 = json.loads((out / "seed0" / "results.json").read_text())
    first = rows[0]  # Cumulative-All within 3 pts of Oracle: d = a - b + 0.03 from seed 0's own results
    assert first["d_values"][0] == pytest.approx(r0["cumulative_all"]["final_avg"] - r0["oracle"]["final_avg"] + 0.03)
    assert (out / "sweep.png").exists() and (out / "seed1" / "results.json").exists()
