"""Tests for mobileclip.py: exact encoder parameter counts, reparameterization equivalence (with randomised BN
statistics / layer scales so the check is not trivial), the KD loss against a hand computation and in fp32 under
autocast, the reinforced-shard round trip in DataCompDR's released layout (the student's view = a stored entry
replayed), one embed_dim for student, teachers and the stored embeddings, --teacher with open_clip checkpoints (the
stored embeddings are each checkpoint's own embeddings of the replayed view), training from released-layout shards
joined by key with image shards, a 2-process torchrun smoke run that must learn, and --smoke on exported world
shards (1 process with bf16 autocast, 2 gloo processes) with its provenance block checked; the 1-process run again
reuses every stage by fingerprint with identical results."""
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
from common.seeds import _value, lookup  # noqa: E402

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
    """dr_sample (DataCompDR's released members + png + txt) written through for_each_shard (one output shard per
    input unit), read back by DRShards + Stream(dr_tf): member names, float32 npz without pickle, param_aug as the
    released JSON string, and the view the student gets is exactly one stored entry replayed (datacompdr.draw's)."""
    from common.data import SampleSource, Stream, for_each_shard
    from common.datacompdr import DRShards, draw, replay
    rng = np.random.default_rng(0)
    imgs = {f"train-{i:09d}": rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for i in range(5)}
    drawn = {k: [draw(im, torch.Generator().manual_seed(j * 2 + a), 32, scale=(0.8, 1.0)) for a in range(2)]
             for j, (k, im) in enumerate(imgs.items())}
    emb = {k: (rng.standard_normal((2, 16)), rng.standard_normal((3, 16))) for k in imgs}

    def build(samples):
        for sm in samples:
            k = sm["__key__"]
            yield k, M.dr_sample(k, sm["image"], f"gt {k}", [e for _, e in drawn[k]], [f"syn0 {k}", f"syn1 {k}"],
                                 *emb[k])

    src = SampleSource([{"__key__": k, "image": im} for k, im in imgs.items()])
    paths = for_each_shard(src, str(tmp_path), build, shard_size=2, prefix="shard", progress=False)
    assert len(paths) == 3 and os.path.basename(paths[0]) == "shard-000000.tar"
    with tarfile.open(paths[0]) as tf:
        names = sorted(n for n in tf.getnames() if n.startswith("train-000000000."))
        assert names == sorted(f"train-000000000.{e}" for e in ("json", "npz", "paug.json", "png", "syn.json", "txt",
                                                                        "url.txt"))
        z = np.load(io.BytesIO(tf.extractfile("train-000000000.npz").read()), allow_pickle=False)
        paug = json.loads(tf.extractfile("train-000000000.paug.json").read())["param_aug"]
    assert z["image_emb"].dtype == np.float32 and z["text_emb"].shape == (3, 16)
    assert isinstance(paug, str) and json.loads(paug) == [e for _, e in drawn["train-000000000"]]  # released form
    tok = M.world_tokenizer(context_length=32)

    class C:
        image_size = 32
    st = Stream(DRShards(str(tmp_path), require=("image", "caption")), 5, M.dr_tf(C, tok), shuffle=False,
                num_workers=0)
    b = st(0)
    assert sorted(b["__key__"]) == sorted(imgs)
    for j, k in enumerate(b["__key__"]):
        hits = [a for a in range(2) if torch.equal(b["image"][j], drawn[k][a][0])]
        assert len(hits) == 1  # exactly the drawn view the teachers embed, replayed from the JSON on the decoded png
        assert torch.equal(b["image"][j], replay(imgs[k], drawn[k][hits[0]][1], 32))
        assert torch.equal(b["t_img"][j], torch.tensor(emb[k][0][hits[0]], dtype=torch.float32))
        assert torch.equal(b["t_gt"][j], torch.tensor(emb[k][1][0], dtype=torch.float32))
        assert torch.equal(b["gt"][j], tok([f"gt {k}"])[0])
        c = [c for c in range(2) if torch.equal(b["syn"][j], tok([f"syn{c} {k}"])[0])]
        assert len(c) == 1 and torch.equal(b["t_syn"][j], torch.tensor(emb[k][1][1 + c[0]], dtype=torch.float32))


def test_embed_dim_is_one_config_field():
    """--embed_dim sizes the student's and every teacher's joint embedding (and so each teacher's slice of the stored
    embeddings the KD loss reads); nothing else pins it."""
    cfg = M.parse_config(M.Config, ["--embed_dim=48"])
    tok = M.world_tokenizer(context_length=cfg.context_length)
    x, t = torch.rand(2, 3, cfg.image_size, cfg.image_size), tok(["a red circle", "a blue square"])
    for m in (M.student(tok.vocab_size, cfg), M.teacher(tok.vocab_size, cfg, 144)):
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
              "reinforced_retrieval_r1", "chance", "majority", "alt_miou", "quality_miou", "alt_depth_rmse",
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
    # 20 steps are too few for the students to leave chance reliably; the teachers' features (same data) must
    assert max(res["probe_acc"]["teachers"]) > res["majority"] + 0.05, (res["probe_acc"], res["majority"])
    assert set(res["zeroshot_by_task"]["baseline"]) == {"shape", "color"}  # the world: both caption attributes
    assert abs(res["chance"] - (1 / 10 + 1 / 9) / 2) < 1e-12 and res["eval_split"] == "test"
    for e in M.EFFECTS:  # every expected effect's keys are in results.json (common.seeds reads them)
        assert math.isfinite(lookup(res, e.a)) and math.isfinite(_value(res, e.b)), e.name
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
            "--n_train=48", "--dense_steps=5", "--warmup=1", "--log_every=1"]
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
    assert res["chance"] == 0.1 and math.isfinite(res["quality_depth_rmse"])  # classes.txt (one task), 28 px seg/depth
    assert list(res["zeroshot_by_task"]["baseline"]) == ["label"]  # --data: its labels only, never the world's colours
    if procs == 1:  # the same command again: every stage reused by its fingerprint, the same results
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        for name in stages:
            assert f"{name}: reusing" in r.stdout, (name, r.stdout[-3000:])
        again = json.loads((out / "results.json").read_text())
        for k in ("seconds", "stage_end_seconds"):
            res.pop(k), again.pop(k)
        assert again == res


# ---------------------------------------------------------------- --teacher: open_clip checkpoints as the teachers
def _open_clip_name(k):
    """This project's CLIP key -> open_clip's (text tower at the top level, transformer.resblocks, in_proj_weight)."""
    k = k.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
    k = k.replace("blocks.", "transformer.resblocks.")
    return k[len("text."):] if k.startswith("text.") else k


def _tiny_open_clip(path, image_size, embed_dim, seed):
    """A random ViT CLIP (patch 8, width 64, 1 block per tower, context 20, the world's vocabulary) saved as
    safetensors in open_clip's key names."""
    from safetensors.torch import save_file
    from common.models import CLIP, TextTransformer, VisionTransformer
    torch.manual_seed(seed)
    V = M.world_tokenizer().vocab_size
    m = CLIP(VisionTransformer(image_size, 8, 64, 1, 1, 4.0, embed_dim), TextTransformer(V, 20, 64, 1, 1, embed_dim))
    save_file({_open_clip_name(k): v.contiguous() for k, v in m.state_dict().items()}, str(path))


TINY = ["--smoke", "--device=cpu", "--steps=3", "--cap_steps=3", "--batch_size=16", "--n_test=32", "--n_train=40",
        "--n_cap=32", "--dense_steps=5", "--warmup=1", "--log_every=1", "--k_aug=2"]


def test_teacher_checkpoints_replace_miniature_teachers(tmp_path):
    """--teacher=a,b: two open_clip checkpoints (24 px / embed 32 and 40 px / embed 24) are the teachers: no teacher
    is trained, and each stored embedding is that checkpoint's own L2-normalised embedding of the very view the
    student replays (through its own bicubic resize + CLIP normalisation) or of the caption (its own tokenizer,
    context 20), concatenated per teacher; the KD slices follow the teachers' widths."""
    from common.datacompdr import DRShards, replay
    from common.models import load_clip_checkpoint
    from common.transforms import eval_transform
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _tiny_open_clip(a, 24, 32, 0)
    _tiny_open_clip(b, 40, 24, 1)
    out = tmp_path / "run"
    res = M.main([f"--out={out}", *TINY, f"--teacher={a},{b}"])
    assert "teacher0" not in res["data_by_stage"] and not (out / "teacher0.safetensors").exists()
    assert len(res["teacher_zeroshot_acc"]) == 2 and res["lrs"]["reinforced"] == M.Config.reinforced_lr
    s = read_first(DRShards(str(out / "reinforced"), require=("image", "caption")))
    assert s["image_emb"].shape == (2, 32 + 24) and s["text_emb"].shape == (3, 32 + 24)
    tok20 = M.world_tokenizer(context_length=20)
    for k, (path, o, d) in enumerate(((a, 0, 32), (b, 32, 24))):
        T, prep = load_clip_checkpoint(str(path)), eval_transform(**load_clip_checkpoint(str(path)).preprocess)
        with torch.no_grad():
            for j, entry in enumerate(s["param_aug"]):
                v = replay(s["image"], entry, 32)  # what dr_tf gives the student
                e = T.encode_image(prep(v)[None])[0]
                assert torch.allclose(torch.as_tensor(s["image_emb"][j, o:o + d]), e, atol=1e-5), (k, j)
            t = T.encode_text(tok20([s["caption"], *s["syn_text"]]))
        assert torch.allclose(torch.as_tensor(s["text_emb"][:, o:o + d]), t, atol=1e-5), k
    with pytest.raises(SystemExit, match="need >= 2"):
        M.main([f"--out={tmp_path / 'one'}", *TINY, f"--teacher={a}"])


def read_first(src):
    from common.data import read_samples
    return read_samples(src, 1)[0]


def test_train_from_released_layout_joined_with_image_shards(tmp_path):
    """--data=image shards --reinforced=DR shards holding only DataCompDR's released members (the png/txt stripped,
    as released): the students train from the join by key (no teacher, captioner or generation stage), every
    reinforced sample joined, and each view is the stored entry replayed on the image shard's image."""
    from common.data import Stream
    from common.datacompdr import DRShards, replay, write_shard
    from common.world import World, export_shards
    for split, n in (("train", 40), ("val", 32), ("test", 32)):
        export_shards(World(split=split, size=32, n=n), tmp_path / "shards" / split, shard_size=20)
    data = str(tmp_path / "shards" / "{split}")
    gen = tmp_path / "gen"
    M.main([f"--out={gen}", *TINY, f"--data={data}", "--teacher_steps=2", "--teacher_batch=16"])
    shards = sorted((gen / "reinforced").glob("shard-*.tar"))
    assert len(shards) == 2
    dr = tmp_path / "dr"
    dr.mkdir()
    for i, p in enumerate(shards):  # the released layout only: drop the image and caption members
        with tarfile.open(p) as tf:
            groups = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if ext not in ("png", "txt"):
                    groups.setdefault(key, {})[ext] = tf.extractfile(m).read()
        write_shard(str(dr / f"dr-{i:05d}.tar"), list(groups.items()))
    out = tmp_path / "train"
    res = M.main([f"--out={out}", *TINY, f"--data={data}", f"--reinforced={dr}/dr-{{00000..00001}}.tar"])
    stages = res["data_by_stage"]
    assert sorted(stages) == ["baseline", "quality", "reinforced"]
    assert stages["reinforced"]["train_samples_seen"] == 3 * 16 and stages["reinforced"]["skipped_corrupt"] == 0
    assert res["teacher_zeroshot_acc"] == [] and math.isfinite(res["reinforced_zeroshot_acc"])
    src = DRShards(str(tmp_path / "shards" / "train"), str(dr / "dr-{00000..00001}.tar"), require=("image", "caption"))
    tok = M.world_tokenizer(context_length=32)
    b = Stream(src, 8, M.dr_tf(M.Config, tok), shuffle=False, num_workers=0)(0)
    imgs = {s["__key__"]: s for s in M.read_samples(src, 40)}
    for j, k in enumerate(b["__key__"]):
        s = imgs[k]
        assert sum(torch.equal(b["image"][j], replay(s["image"], e, 32)) for e in s["param_aug"]) >= 1


def test_captioner_own_encoder_memory():
    """The captioner with its own MCi: memory=encode(images) gives the same logits as the images; the encoder is a
    trained part (its parameters get gradients from the caption loss); teacher-token memories are projected."""
    torch.manual_seed(0)
    enc = MCI.mci_tiny(128)
    enc.proj = None  # as main builds it: the pooled projection is not read (DDP would find it unused)
    cap = M.Captioner(50, 12, 480, enc=enc).eval()
    x, t = torch.rand(2, 3, 32, 32), torch.randint(1, 49, (2, 12))
    with torch.no_grad():
        a, b = cap(t, x), cap(t, None, memory=cap.encode(x))
    assert torch.allclose(a, b, atol=1e-5) and a.shape == (2, 12, 50)
    assert not torch.allclose(cap(t, x.flip(-1))[:, -1], a[:, -1])  # the logits depend on the image
    cap.train()
    torch.nn.functional.cross_entropy(cap(t, x).flatten(0, 1), t.flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cap.enc.parameters())  # none unused (DDP)
    frozen = M.Captioner(50, 12, 144)
    assert frozen(t, torch.rand(2, 17, 144)).shape == (2, 12, 50)
