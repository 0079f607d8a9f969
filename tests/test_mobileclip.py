"""Tests for mobileclip.py: exact encoder parameter counts, reparameterization equivalence (with randomised BN
statistics / layer scales so the check is not trivial), the KD loss against a hand computation and in fp32 under
autocast, augmentation replay, the reinforced-shard round trip (written by for_each_shard, read back as a stream), one
embed_dim for student, teachers and the stored embeddings, a 2-process torchrun smoke run on the world that must learn,
and --smoke on exported world shards at another image size (1 process with bf16 autocast, 2 gloo processes) with its
provenance block checked; the 1-process run again reuses every stage by fingerprint with identical results."""
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common.mci as MCI  # noqa: E402
import mobileclip as M  # noqa: E402

COUNTS = {"mci0": (11_406_464, 11_356_992), "mci1": (21_541_120, 21_460_544), "mci2": (35_814_720, 35_702_480),
          "mct": (42_441_216, 42_435_072), "base_text": (63_428_096, 63_428_096)}


def test_param_counts_exact():
    t = MCI.param_table()
    for k, (a, b) in COUNTS.items():
        assert (t[k]["train"], t[k]["reparam"]) == (a, b), (k, t[k])


@pytest.mark.parametrize("name", ["mci0", "mct"])
def test_reparameterization_equivalence(name):
    torch.manual_seed(0)
    if name == "mci0":
        m, x = MCI.mci0(), torch.rand(2, 3, 64, 64)
    else:
        m, x = MCI.mct(), torch.randint(1, 49407, (2, 16))
    err = MCI.reparam_rel_err(m, x)
    assert err < 1e-5, err
    # the randomisation made the branches matter: shifting one BN's running mean moves the output a lot
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    with torch.no_grad():
        y0 = m(x)
        bn.running_mean += 1.0
        assert ((m(x) - y0).norm() / y0.norm()).item() > 1e-3
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) and "skip" in n for n, mod in
                   MCI.reparameterize(m).named_modules())


def test_tiny_reparam_and_shapes():
    m = MCI.mci_tiny(128)
    x = torch.rand(3, 3, 32, 32)
    assert MCI.reparam_rel_err(m, x) < 1e-5
    f, grid = m.patch_tokens(x)
    assert f.shape[:2] == (3, grid[0] * grid[1]) and m(x).shape == (3, 128)


def hand_kd(A, B, scale, TA, TB, tscale, dims):
    """Loop-level reference: teacher probs per teacher softmax then mean; CE both directions, mean over rows."""
    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    def ce(P, S):
        return -np.mean([np.sum(P[i] * np.log(softmax(S[i]))) for i in range(len(S))])

    def tprob(X, Y):
        P, o = np.zeros((len(X), len(Y))), 0
        for d in dims:
            for i in range(len(X)):
                P[i] += softmax(tscale * X[i, o:o + d] @ Y[:, o:o + d].T) / len(dims)
            o += d
        return P
    return 0.5 * (ce(tprob(TA, TB), scale * A @ B.T) + ce(tprob(TB, TA), scale * B @ A.T))


def test_kd_loss_matches_hand_and_teacher_entropy():
    g = torch.Generator().manual_seed(0)
    n = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa
    A, B = n(6, 8), n(6, 8)
    TA = torch.cat([n(6, 5), n(6, 4)], 1)
    TB = torch.cat([n(6, 5), n(6, 4)], 1)
    got = M.kd_loss(A, B, 10.0, TA, TB, 20.0, [5, 4]).item()
    want = hand_kd(A.numpy(), B.numpy(), 10.0, TA.numpy(), TB.numpy(), 20.0, [5, 4])
    assert abs(got - want) < 1e-6 * want, (got, want)  # logits in fp32
    # teacher = student (one teacher, same scale): the loss is the teacher's entropy (cross-entropy, not KL), not 0
    kd = M.kd_loss(A, B, 10.0, A, B, 10.0, [8]).item()
    P1, P2 = (10.0 * A @ B.T).softmax(-1), (10.0 * B @ A.T).softmax(-1)
    H = 0.5 * (-(P1 * P1.log()).sum(-1).mean() - (P2 * P2.log()).sum(-1).mean()).item()
    assert abs(kd - H) < 1e-6 * H and H > 0.1


def test_augmentation_replay_after_json_roundtrip():
    class C:
        image_size, rrc_scale = 32, 0.35
    aug = M.dr_aug(C)
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for s in range(5):
        x, p = aug.sample_apply(img, torch.Generator().manual_seed(s))
        p2 = json.loads(json.dumps(p))
        assert torch.equal(aug.apply(img, p2), x)
    x2, _ = aug.sample_apply(img, torch.Generator().manual_seed(99))
    assert not torch.equal(x2, x)  # different draws differ, so the equality above is not vacuous


def test_kd_logits_fp32_under_autocast():
    """bf16 features under bf16 autocast: the KD loss equals the fp32 computation on the same (upcast) values."""
    g = torch.Generator().manual_seed(1)
    n = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1).bfloat16()  # noqa: E731
    A, B, TA, TB = n(8, 16), n(8, 16), n(8, 12), n(8, 12)
    s = torch.tensor(50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (s * A.float() @ B.float().T).dtype == torch.bfloat16  # what autocast does to a plain matmul
        got = M.kd_loss(A, B, s, TA, TB, 100.0, [6, 6])
    want = M.kd_loss(A.float(), B.float(), s, TA.float(), TB.float(), 100.0, [6, 6])
    assert got.dtype == torch.float32 and torch.equal(got, want), (got, want)


def test_reinforced_shard_roundtrip(tmp_path):
    """dr_members written through for_each_shard (one output shard per input unit), read back with open_source +
    Stream(dr_tf): member names, fp16 npz without pickle, the stored augmentation replays pixel-exactly."""
    from common.data import SampleSource, Stream, for_each_shard, open_source

    class C:
        image_size, rrc_scale = 32, 0.8
    aug, rng = M.dr_aug(C), np.random.default_rng(0)
    imgs = {f"train-{i:09d}": rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for i in range(5)}
    paug = {k: [aug.sample_apply(im, torch.Generator().manual_seed(j * 2 + a))[1] for a in range(2)]
            for j, (k, im) in enumerate(imgs.items())}
    emb = {k: (rng.standard_normal((2, 16)), rng.standard_normal((3, 16))) for k in imgs}

    def build(samples):
        for sm in samples:
            k = sm["__key__"]
            yield k, M.dr_members(sm["image"], f"gt {k}", paug[k], [f"syn0 {k}", f"syn1 {k}"], *emb[k])

    src = SampleSource([{"__key__": k, "image": im} for k, im in imgs.items()])
    paths = for_each_shard(src, str(tmp_path), build, shard_size=2, prefix="shard", progress=False)
    assert len(paths) == 3 and os.path.basename(paths[0]) == "shard-000000.tar"
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
        assert names[:5] == [f"train-000000000.{e}" for e in ("png", "txt", "paug.json", "syn.json", "npz")]
        z = np.load(io.BytesIO(tf.extractfile(names[4]).read()), allow_pickle=False)
    assert z["image_emb"].dtype == np.float16 and z["text_emb"].shape == (3, 16)
    tok = M.world_tokenizer(context_length=32)
    C.k_aug, C.n_syn = 2, 2
    st = Stream(open_source(str(tmp_path), "train"), 5, M.dr_tf(C, tok), shuffle=False, num_workers=0)
    b = st(0)
    assert sorted(b["__key__"]) == sorted(imgs)
    for j, k in enumerate(b["__key__"]):
        hits = [a for a in range(2) if torch.equal(b["image"][j], aug.apply(imgs[k], paug[k][a]))]
        assert len(hits) == 1  # exactly the stored view, replayed from the JSON params on the decoded png
        assert torch.allclose(b["t_img"][j], torch.tensor(emb[k][0][hits[0]], dtype=torch.float32), atol=2e-3)
        assert torch.allclose(b["t_gt"][j], torch.tensor(emb[k][1][0], dtype=torch.float32), atol=2e-3)
        assert torch.equal(b["gt"][j], tok([f"gt {k}"])[0])
        c = [c for c in range(2) if torch.equal(b["syn"][j], tok([f"syn{c} {k}"])[0])]
        assert len(c) == 1 and torch.allclose(b["t_syn"][j], torch.tensor(emb[k][1][1 + c[0]], dtype=torch.float32),
                                              atol=2e-3)


def test_embed_dim_is_one_config_field():
    """--embed_dim sizes the student's and every teacher's joint embedding (and so each teacher's slice of the stored
    embeddings the KD loss reads); nothing else pins it."""
    cfg = M.parse_config(M.Config, ["--embed_dim=48"])
    tok = M.world_tokenizer(context_length=cfg.context_length)
    x, t = torch.rand(2, 3, cfg.image_size, cfg.image_size), tok(["a red circle", "a blue square"])
    for m in (M.student(tok.vocab_size, cfg), M.teacher(tok.vocab_size, cfg, 160)):
        img_f, txt_f, _ = m.eval()(x, t)
        assert img_f.shape == txt_f.shape == (2, 48)
    A = torch.nn.functional.normalize(torch.randn(4, 48), dim=-1)
    T = torch.cat([torch.nn.functional.normalize(torch.randn(4, 48), dim=-1) for _ in range(2)], 1)  # 2 teachers
    assert torch.isfinite(M.kd_loss(A, A, 10.0, T, T, 100.0, [cfg.embed_dim] * 2))


def test_torchrun_smoke_learns(tmp_path):
    """The whole pipeline on 2 gloo processes; it must learn (losses fall, metrics above chance)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "mobileclip.py", "--smoke",
           f"--out={out}", "--device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for k in ("params", "baseline_zeroshot_acc", "reinforced_zeroshot_acc", "baseline_retrieval_r1",
              "reinforced_retrieval_r1", "samples_to_match_baseline", "alt_miou", "quality_miou", "alt_depth_rmse",
              "quality_depth_rmse", "alt_miou_10pct", "quality_miou_10pct", "alt_depth_rmse_10pct",
              "quality_depth_rmse_10pct", "reparam_max_rel_err", "seconds", "device"):
        assert k in res, k
    assert res["world_size"] == 2 and res["reparam_max_rel_err"] < 1e-5
    assert res["params"]["mci0"]["reparam"] == COUNTS["mci0"][1]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for run in ("teacher0", "captioner", "reinforced", "baseline"):
        ls = [r["loss"] for r in rows if r.get("run") == run]
        assert len(ls) >= 2 and ls[-1] < ls[0], (run, ls)
    cap = [r["loss"] for r in rows if r.get("run") == "captioner"]
    assert cap[-1] < 0.6 * cap[0], cap  # the captioner clearly learns the caption language
    # 20 steps are too few for the students to leave chance reliably; the teachers (same data) must
    assert max(res["teacher_zeroshot_acc"]) > res["zeroshot_chance"], res["teacher_zeroshot_acc"]
    assert 0 < res["alt_miou"] <= 1 and math.isfinite(res["quality_depth_rmse"])
    assert len(list((out / "reinforced").glob("shard-*.tar"))) >= 1
    d = res["data"]
    assert d["eval_keys_in_train"] == 0 and d["skipped_corrupt"] == 0 and d["eval_samples"] == 128


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("procs", [1, 2])
def test_smoke_on_exported_shards(tmp_path, procs):
    """World shards exported at 28 px ({split} folders, classes.txt beside them) and resized to the 32-px model in
    the stream transforms: 1 process under bf16 autocast (1 loader worker), and 2 gloo processes. Every stage stays
    within one epoch, so its data block must show disjoint ranks and every sample seen once; no eval key trained."""
    from common.world import World, export_shards
    for split, n in (("train", 64), ("val", 64), ("test", 32)):
        export_shards(World(split=split, size=28, n=n), tmp_path / "shards" / split, shard_size=16)
    out = tmp_path / "out"
    args = ["mobileclip.py", "--smoke", f"--data={tmp_path / 'shards' / '{split}'}", f"--out={out}", "--device=cpu",
            "--steps=3", "--teacher_steps=3", "--cap_steps=3", "--batch_size=16", "--teacher_batch=16", "--n_test=32",
            "--n_train=48", "--dense_steps=5", "--eval_every=3", "--warmup=1", "--log_every=1"]
    if procs == 1:
        cmd = [sys.executable, *args, "--amp=bf16", "--num_workers=1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               *args, "--num_workers=0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == procs and res["caption_fields"]["ground_truth"] == "alt_text"
    stages = res["data_by_stage"]
    assert sorted(stages) == ["baseline", "captioner", "quality", "reinforced", "teacher0", "teacher1"]
    for name, d in stages.items():
        assert d["train_samples_seen"] == d["train_unique_keys"] == 3 * 16, (name, d)
        assert d["train_keys_on_several_ranks"] == 0 and d["eval_keys_in_train"] == 0, (name, d)
        assert d["skipped_corrupt"] == 0 and d["eval_samples"] == 32, (name, d)
    assert "reinforced" in stages["reinforced"]["source"] and "val" in stages["captioner"]["source"]
    d = res["data"]
    assert d["train_samples_seen"] == 6 * 3 * 16 and d["eval_keys_in_train"] == 0 and d["skipped_corrupt"] == 0
    assert len(list((out / "reinforced").glob("shard-*.tar"))) == 4  # one per input shard, built over the ranks
    assert res["zeroshot_chance"] == 0.1 and math.isfinite(res["quality_depth_rmse"])  # classes.txt, 28 px seg/depth
    if procs == 1:  # the same command again: every stage reused by its fingerprint, the same results (curves too)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        for name in stages:
            assert f"{name}: reusing" in r.stdout, (name, r.stdout[-3000:])
        again = json.loads((out / "results.json").read_text())
        for k in ("seconds", "stage_end_seconds"):
            res.pop(k), again.pop(k)
        assert again == res and res["curves"]["reinforced"]
