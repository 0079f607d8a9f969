"""Tests for reinforce.py: exact replay of every augmentation (incl. mixing with the stored partner), top-k
sparsify/densify, the reinforced store (targets, replay from the store alone, merge, resumable and rank-independent
builds), per-rank views, fp32 logits under bf16, stage reuse by fingerprint (--retrain), smoke runs on the world
(and again with every stage reused) and on exported shards (1 and 2 processes)."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reinforce as rf
from common.config import parse_config
from common.data import SampleSource, Stream, iter_samples
from common.seeds import summarize
from common.train import Dist

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(out, **kw):
    cfg = parse_config(rf.Config, [f"--out={out}", "--image_size=32", "--ns=2", "--topk=3", "--shard_size=4"])
    cfg._command = None
    return replace(cfg, **kw) if kw else cfg


def images(n=10, seed=0):
    return list(torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))


def samples(n=10, seed=0):
    """A labelled in-memory source: uint8 images (as decoded data), keys k0..k{n-1}."""
    x = torch.randint(0, 256, (n, 32, 32, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return SampleSource([{"__key__": f"k{i}", "image": x[i].numpy(), "label": i % 10} for i in range(n)])


def load(d):
    """A store's manifest and its samples, decoded, in store order."""
    return rf.read_manifest(d), list(iter_samples(rf.store_source(d)))


def teachers(C=10):
    torch.manual_seed(0)
    return rf.Ensemble([8, 6], C).eval()


def _world_labels(n, split="test"):
    from common.world import World
    w = World(seed=0, split=split, size=32)
    return [int(w[i]["label"]) for i in range(n)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- augmentation replay
def test_replay_is_pixel_identical_for_every_augmentation_type(tmp_path):
    cfg = tiny_cfg(tmp_path, mix_p=1.0, erase_p=1.0)
    X, pipe, g = images(), rf.heavy_pipeline(cfg), gen(0)
    kinds, ops, erased = set(), set(), 0
    for t in range(60):
        i = t % len(X)
        x, rec = rf.draw_aug(pipe, X[i], X, g, cfg)
        rec = json.loads(json.dumps(rec))  # the stored form: JSON in the store
        assert torch.equal(rf.replay_aug(pipe, X[i], X, rec), x)
        kinds.add(rec["mix"]["kind"])
        ops.update(op for op, _, _ in rec["aug"][2]["ops"])
        erased += rec["aug"][3]["applied"]
        assert rec["aug"][0]["box"] and "flip" in rec["aug"][1]
    assert kinds == {"mixup", "cutmix"} and erased > 0 and len(ops) >= 10
    x, rec = rf.draw_aug(pipe, X[3], X, gen(1), replace(cfg, mix_p=0.0))  # no-mix records replay too
    assert rec["mix"] == {"kind": "none"} and torch.equal(rf.replay_aug(pipe, X[3], X, json.loads(json.dumps(rec))), x)


def test_replay_depends_on_the_stored_partner(tmp_path):
    cfg = tiny_cfg(tmp_path, mix_p=1.0)
    X, pipe = images(), rf.heavy_pipeline(cfg)
    x, rec = rf.draw_aug(pipe, X[0], X, gen(5), cfg)
    other = json.loads(json.dumps(rec))
    other["mix"]["partner"] = (rec["mix"]["partner"] + 1) % len(X)
    assert not torch.equal(rf.replay_aug(pipe, X[0], X, other), x)


def test_mix_ops_by_hand():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    assert torch.allclose(rf.apply_mix(a, b, {"kind": "mixup", "lam": 0.75}), torch.full((3, 4, 4), 0.25))
    out = rf.apply_mix(a, b, {"kind": "cutmix", "lam": 0.75, "box": [1, 2, 2, 2]})
    assert out.sum() == 3 * 4 and out[:, 1:3, 2:4].eq(1).all() and a.sum() == 0
    assert rf.mix_weight({"kind": "cutmix", "box": [1, 2, 2, 2]}, 4) == pytest.approx(0.75)
    # online mixing inside a batch: sample 0 takes sample 1 as partner, sample 1 stays itself
    mixes = [{"kind": "mixup", "partner": 1, "lam": 0.75}, {"kind": "none"}]
    xm, t = rf.mix_batch(torch.stack([a, b]), torch.tensor([0, 2]), mixes, 3, 4)
    assert torch.allclose(xm[0], torch.full((3, 4, 4), 0.25)) and torch.equal(xm[1], b)
    assert torch.allclose(t, torch.tensor([[0.75, 0.0, 0.25], [0.0, 0.0, 1.0]]))


# ---------------------------------------------------------------- top-k targets, losses
def test_sparsify_densify_by_hand():
    p = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15]])
    v, i = rf.sparsify(p, 2)
    assert v.dtype == torch.float16 and i.dtype == torch.int16
    assert i.tolist() == [[1, 3]] and torch.allclose(v.float(), torch.tensor([[0.5, 0.2]]), atol=1e-3)
    d = rf.densify(v, i, 5)
    # stored mass at the top-k, the remaining 0.3 spread uniformly over the other three classes
    assert torch.allclose(d, torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1]]), atol=1e-3)
    assert torch.allclose(d.sum(-1), torch.ones(1), atol=1e-3)
    assert torch.allclose(rf.densify(*rf.sparsify(p, 5), 5), p, atol=1e-3)  # k = C reproduces p (up to fp16)


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


def test_logits_and_kl_loss_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    m = rf.Net(8, 10).eval()
    x, t = torch.rand(8, 3, 32, 32), torch.softmax(torch.randn(8, 10), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.features(x).dtype == torch.bfloat16  # the body runs in bf16 ...
        assert m(x).dtype == torch.float32  # ... the head's logits in fp32 (common.losses.fp32_logits)
        loss = rf.kl_loss(m, (x, t))
    assert loss.dtype == torch.float32  # within bf16's forward error of the fp32 loss
    assert torch.allclose(loss, rf.kl_loss(m, (x, t)), rtol=0.05)


# ---------------------------------------------------------------- the store: build, read, replay, merge, resume
def test_store_targets_and_replay_from_the_store_alone(tmp_path):
    cfg, T = tiny_cfg(tmp_path, mix_p=0.5), teachers()
    rf.reinforce(T, samples(), 10, cfg, Dist(), "fp")
    d = tmp_path / "reinforced"
    man, got = load(d)
    assert (man["ns"], man["topk"], len(man["shards"]), len(got)) == (2, 3, 3, 10)
    assert [s["__key__"] for s in got] == [f"k{i}" for i in range(10)] and [s["label"] for s in got] == list(range(10))
    mixed = 0
    for s in got:  # the stored top-k equals the teachers' scores of the view replayed from the store alone
        u = rf.unpack(s)
        assert u["v"].dtype == torch.float16 and u["ix"].dtype == torch.int16 and u["v"].shape == (2, 3)
        for k, rec in enumerate(u["aug"]):
            x = rf.replay_aug(rf.heavy_pipeline(cfg), u["image"], u["partners"], rec)
            pv, pi = rf.sparsify(T.probs(x[None]), 3)
            assert torch.equal(pi[0], u["ix"][k]) and torch.allclose(pv[0].float(), u["v"][k].float(), atol=1e-3)
            mixed += rec["mix"]["kind"] != "none"
    assert mixed > 0
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".tmp")) for f in os.listdir(d))
    # DR's training view (p_reinforced=1): one of the stored views with its densified target
    s, u = got[4], rf.unpack(got[4])
    out = rf.dr_view(s, gen(0), replace(cfg, p_reinforced=1.0), 10, rf.heavy_pipeline(cfg), rf.light_pipeline(cfg))
    k = next(k for k in range(2) if torch.equal(out["target"], rf.densify(u["v"][k], u["ix"][k], 10)))
    assert torch.equal(out["image"], rf.replay_aug(rf.heavy_pipeline(cfg), u["image"], u["partners"], u["aug"][k]))


def test_merge_two_runs_adds_ns(tmp_path):
    T = teachers()
    for r, ns, mix_p in ((0, 2, 0.3), (1, 3, 1.0)):
        rf.reinforce(T, samples(), 10, tiny_cfg(tmp_path / f"r{r}", ns=ns, run_seed=r, mix_p=mix_p), Dist(), f"fp{r}")
    a, b = (load(tmp_path / f"r{r}" / "reinforced")[1] for r in (0, 1))
    assert any("partners.png" not in s for s in a)  # samples without partners in run 0: partner slots start at 0
    man = rf.merge_reinforced([str(tmp_path / "r0" / "reinforced"), str(tmp_path / "r1" / "reinforced")],
                              str(tmp_path / "m"))
    m, got = load(tmp_path / "m")
    assert man["ns"] == m["ns"] == 5 and len(m["runs"]) == 2 and len(got) == 10
    pipe = rf.heavy_pipeline(tiny_cfg(tmp_path))
    for sa, sb, sm in zip(a, b, got):
        ua, ub, um = rf.unpack(sa), rf.unpack(sb), rf.unpack(sm)
        for k in ("v", "ix"):
            assert torch.equal(um[k], torch.cat([ua[k], ub[k]]))
        # every merged record replays to its run's view (partner slots renumbered)
        for k, (u, j) in enumerate([(ua, j) for j in range(2)] + [(ub, j) for j in range(3)]):
            assert torch.equal(rf.replay_aug(pipe, um["image"], um["partners"], um["aug"][k]),
                               rf.replay_aug(pipe, u["image"], u["partners"], u["aug"][j]))
    assert rf.unpack(a[4])["aug"][0] != rf.unpack(b[4])["aug"][0]  # different run seeds drew different views
    rf.reinforce(T, SampleSource(samples().samples[:8]), 10, tiny_cfg(tmp_path / "r2"), Dist(), "fp2")
    with pytest.raises(ValueError, match="shards="):
        rf.merge_reinforced([str(tmp_path / "r0" / "reinforced"), str(tmp_path / "r2" / "reinforced")],
                            str(tmp_path / "bad"))


def test_store_resumes_per_shard_and_is_rank_independent(tmp_path):
    T, src = teachers(), samples()
    d = tmp_path / "one" / "reinforced"
    rf.reinforce(T, src, 10, tiny_cfg(tmp_path / "one"), Dist(), "fp")
    names = sorted(n for n in os.listdir(d) if n.endswith(".tar"))
    ref = {n: (d / n).read_bytes() for n in names}
    assert len(names) == 3
    # kill simulation: shard 1 lost; the others are kept (same mtime), shard 1 rebuilt with the same bytes
    os.remove(d / names[1])
    os.utime(d / names[0], (1, 1))
    rf.reinforce(T, src, 10, tiny_cfg(tmp_path / "one"), Dist(), "fp")
    assert os.path.getmtime(d / names[0]) == 1 and {n: (d / n).read_bytes() for n in names} == ref
    # a different fingerprint (e.g. other teachers) invalidates the store; --retrain rebuilds it under the same one
    rf.reinforce(T, src, 10, tiny_cfg(tmp_path / "one"), Dist(), "other")
    assert os.path.getmtime(d / names[0]) != 1
    os.utime(d / names[0], (1, 1))
    rf.reinforce(T, src, 10, tiny_cfg(tmp_path / "one", retrain=True), Dist(), "other")
    assert os.path.getmtime(d / names[0]) != 1 and {n: (d / n).read_bytes() for n in names} == ref
    # a build killed after its first shard (stage.json: complete=False) is no store yet; rerun with the same
    # fingerprint, it keeps that shard and writes the others
    d3, unit = tmp_path / "killed", partial(rf.reinforce_unit, teachers=T, cfg=tiny_cfg(tmp_path))

    def dying(samples):
        if (d3 / names[0]).exists():
            raise RuntimeError("killed")
        yield from unit(samples)
    with pytest.raises(RuntimeError, match="killed"):
        rf.build_store(str(d3), src, dying, "fp", Dist(), 4, ns=2)
    assert json.load(open(d3 / "stage.json"))["complete"] is False and rf.read_manifest(d3) == {}
    with pytest.raises(FileNotFoundError, match="no complete reinforced store"):
        rf.store_source(d3)
    os.utime(d3 / names[0], (1, 1))
    rf.build_store(str(d3), src, unit, "fp", Dist(), 4, ns=2)
    assert os.path.getmtime(d3 / names[0]) == 1 and {n: (d3 / n).read_bytes() for n in names} == ref
    assert rf.read_manifest(d3)["shards"] == names
    # two ranks (run one after the other, rank 0 first as its barrier would ensure: without a process group barriers
    # are no-ops) split the units and write the same bytes as one process
    d2 = tmp_path / "two" / "reinforced"
    for r in (0, 1):
        rf.reinforce(T, src, 10, tiny_cfg(tmp_path / "two"), Dist(rank=r, world_size=2, is_master=r == 0), "fp")
    assert {n: (d2 / n).read_bytes() for n in names} == ref


def test_ranks_draw_different_views_of_the_same_image(tmp_path):
    """Views seeded by the step alone would give every rank the same crops; the Stream's per-sample generator
    (consumer, sample count) gives each rank its own."""
    cfg = tiny_cfg(tmp_path)
    img = samples(1).samples[0]["image"]
    src = SampleSource([{"__key__": f"k{i}", "image": img, "label": 0} for i in range(8)])
    fn = partial(rf.view, cfg=cfg, pipe=rf.heavy_pipeline(cfg))
    views = [Stream(src, 4, fn, seed=0, num_workers=0, dist=Dist(rank=r, world_size=2))(0)["image"] for r in (0, 1)]
    assert not torch.equal(views[0], views[1])
    assert len({v.numpy().tobytes() for v in torch.cat(views)}) == 8


def test_every_stage_is_reused_by_its_fingerprint_and_retrain_redoes_it(tmp_path):
    """run_fit (every stage): a finished checkpoint with the same fingerprint and optimisation is reused; another
    fingerprint, another lr or --retrain trains again."""
    cfg, src = tiny_cfg(tmp_path, batch_size=4, log_every=0), samples(8)

    def reused(fp, **kw):
        c = replace(cfg, **kw)
        stream = rf.make_stream(src, partial(rf.view, cfg=c, pipe=rf.light_pipeline(c)), 0, c, Dist(), "s",
                                lambda b: (b["image"], b["label"]))
        return rf.run_fit(rf.Net(4, 10), rf.on_logits(F.cross_entropy), stream, 2, c, Dist(), "s", {}, fp)["reused"]
    got = [reused({"a": 1}), reused({"a": 1}), reused({"a": 2}), reused({"a": 2}, retrain=True), reused({"a": 2}),
           reused({"a": 2}, lr=1e-2)]
    assert got == [False, True, False, False, True, False]


def test_retrieval_is_balanced_and_deduplicated():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    got = rf.retrieve(q, pool, 4).tolist()
    assert got == [0, 2, 1, 3]  # round robin: best of each query first, then the second best of each
    assert len(set(rf.retrieve(q, pool, 6).tolist())) == 6


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        rf.main([f"--out={tmp_path}", "--data=/does-not-exist/{split}-{0..3}.tar"])
    with pytest.raises(ValueError, match="task_classes"):
        rf.main([f"--out={tmp_path}", "--smoke", "--mode=transfer", "--task_classes=3,12", "--n_test=20"])


def test_config_errors_name_the_flag(tmp_path):
    for flag, match in (("--tokt_restarts=0", "tokt_restarts=0"), ("--task_domain=sepia", "task_domain='sepia'"),
                        ("--domain_frac=0", "domain_frac=0")):
        with pytest.raises(ValueError, match=match):
            rf.main([f"--out={tmp_path}", "--smoke", flag])


def test_task_domain_by_hand():
    """invert: 255 - x (uint8) and 1 - x (float); gray: the ITU-R 601 luminance in every channel; "": unchanged."""
    a = np.array([[[255, 0, 10], [0, 0, 0]]], np.uint8)  # (1, 2, 3)
    assert (rf.to_domain(a, "invert") == 255 - a).all() and rf.to_domain(a, "") is a
    g = rf.to_domain(a, "gray")
    assert g.dtype == np.uint8 and (g[0, 0] == round(0.299 * 255 + 0.114 * 10)).all() and (g[0, 1] == 0).all()
    x = torch.rand(2, 3, 4, 4, generator=gen(0))
    assert torch.equal(rf.to_domain(x, "invert"), 1.0 - x)
    y = rf.to_domain(x, "gray")
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert all(torch.allclose(y[:, c], lum, atol=1e-6) for c in range(3))


def test_domain_share_by_key_hash():
    """A domain_frac share of keys is in the task's domain (binomial 4 SD over 4000 keys), the same on every call;
    nothing is with task_domain="" or with --data."""
    cfg = replace(tiny_cfg("unused"), task_domain="invert", domain_frac=0.35)
    got = [rf.in_domain(f"val-{i:09d}", cfg) for i in range(4000)]
    assert abs(sum(got) / 4000 - 0.35) < 4 * (0.35 * 0.65 / 4000) ** 0.5
    assert got == [rf.in_domain(f"val-{i:09d}", cfg) for i in range(4000)]
    for c in (replace(cfg, task_domain=""), replace(cfg, data="x/{split}.tar")):
        assert not any(rf.in_domain(f"val-{i:09d}", c) for i in range(200)) and rf.task_domain(c) == ""


def test_vfm_targets_name_only_what_an_image_shows():
    """The VFM's multi-hot target: the label and every object's shape and colour; an object whose colour is unnamed
    (a task-domain image in its pretraining) adds its shape only."""
    s = {"label": 2, "objects": [{"shape": "star", "color": "red"}, {"shape": "ring", "color": None}]}
    t, C = rf.concepts(s, rf.SHAPES), len(rf.SHAPES)
    assert t.nonzero().flatten().tolist() == sorted([2, rf.SHAPES.index("star"), rf.SHAPES.index("ring"),
                                                     C + rf.COLORS.index("red")])


def test_transfer_sets_without_labels_ignore_the_labels():
    """retrieved and generic are chosen from features (and a seeded draw) alone: other pool labels leave them as they
    are; the oracles are exactly the first task / non-task images."""
    torch.manual_seed(0)
    cfg = replace(tiny_cfg("unused"), n_transfer=5, seed=3)
    q, pool = torch.randn(4, 8), torch.randn(40, 8)
    inside = torch.arange(40) % 3 == 0
    a, b = rf.transfer_sets(q, pool, inside, cfg), rf.transfer_sets(q, pool, ~inside, cfg)
    for k in ("retrieved", "generic"):
        assert torch.equal(a[k], b[k])
    assert torch.equal(a["retrieved"], rf.retrieve(q, pool, 5)) and len(set(a["generic"].tolist())) == 5
    assert a["in_domain_oracle"].tolist() == [0, 3, 6, 9, 12] and a["generic_oracle"].tolist() == [1, 2, 4, 5, 7]
    assert torch.equal(b["in_domain_oracle"], a["generic_oracle"])



def test_web_pool_keeps_every_other_image_and_the_first_task_images():
    from common.data import SampleList
    pool = SampleList({"__key__": str(i), "label": c} for i, c in enumerate([0, 3, 1, 0, 4, 1, 3, 0]))
    pool.name = "pool"
    out = rf.web_pool(pool, {0: 0, 1: 1}, 2)
    assert [s["__key__"] for s in out] == ["0", "1", "2", "4", "6"] and out.name == "pool"
    assert [s["__key__"] for s in rf.web_pool(pool, {0: 0, 1: 1}, 0)] == [str(i) for i in range(8)]


def test_agnostic_target_is_standardised_with_the_pool_statistics():
    """Raw ReLU features share one mean direction (any two have a high cosine); the task-agnostic target removes it
    with the pool's per-dimension mean and std, so matching it by cosine has to match the image-specific part."""
    torch.manual_seed(0)
    pool = 5.0 + torch.rand(200, 6) * torch.tensor([1.0, 2, 3, 4, 5, 6])
    std = rf.standardiser(pool)
    z = std(pool)
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-5) and torch.allclose(z.std(0), torch.ones(6), atol=1e-5)
    assert F.cosine_similarity(pool[:100], pool[100:]).mean() > 0.9 > 0.2 > F.cosine_similarity(z[:100], z[100:]).mean()
    assert torch.allclose(std(pool[:3] * 0 + pool.mean(0)), torch.zeros(3, 6), atol=1e-5)

def test_majority_and_val_set_after_the_pool(tmp_path):
    assert rf.majority(torch.tensor([0, 2, 2, 1, 2]), 3) == pytest.approx(0.6)
    cfg = tiny_cfg(tmp_path)
    val = rf.eval_set(cfg, "val", 5, rf.SHAPES, skip=7)
    full = rf.eval_set(cfg, "val", 12, rf.SHAPES)
    assert [s["__key__"] for s in val["samples"]] == [s["__key__"] for s in full["samples"]][7:]
    assert torch.equal(val["x"], full["x"][7:])


# ---------------------------------------------------------------- real checkpoints: --teacher, --vfm
def _open_clip_name(k):
    """This project's CLIP key -> open_clip's (text tower at the top level, transformer.resblocks, in_proj_weight)."""
    k = k.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
    k = k.replace("blocks.", "transformer.resblocks.")
    return k[len("text."):] if k.startswith("text.") else k


def _tiny_open_clip(path, seed=0, image_size=24):
    """A random ViT CLIP (patch 8, width 64, 1 block per tower, context 20, embed 32, the world's vocabulary) saved
    as safetensors in open_clip's key names."""
    from safetensors.torch import save_file
    from common.models import CLIP, TextTransformer, VisionTransformer
    from common.tokenizer import world_tokenizer
    torch.manual_seed(seed)
    m = CLIP(VisionTransformer(image_size, 8, 64, 1, 1, 4.0, 32), TextTransformer(world_tokenizer().vocab_size, 20, 64,
                                                                                  1, 1, 32))
    save_file({_open_clip_name(k): v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def test_zero_shot_teacher_by_hand(tmp_path):
    """A --teacher member's logits = logit_scale * cos(its image embedding at its own preprocessing (bicubic to its
    24 px, CLIP mean/std), the mean of the 80 templates' text embeddings of each class name)."""
    from common.eval import OPENAI_IMAGENET_TEMPLATES
    from common.models import load_clip_checkpoint
    from common.tokenizer import world_tokenizer
    from common.transforms import eval_transform
    ck = _tiny_open_clip(tmp_path / "a.safetensors")
    cfg = tiny_cfg(tmp_path, teacher=f"{ck},{_tiny_open_clip(tmp_path / 'b.safetensors', seed=1, image_size=16)}")
    names = ["square", "circle", "triangle"]
    ens, fp = rf.clip_teachers(cfg, names)
    assert len(ens.members) == 2 and len(fp["teacher"]) == 2 and fp["teacher"][0]["bytes"] > 0
    model, tok = load_clip_checkpoint(ck).eval(), world_tokenizer(20)
    x = torch.rand(3, 3, 32, 32, generator=gen(0))
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([eval_transform(24)(xi) for xi in x])), dim=-1)
        txt = torch.stack([F.normalize(F.normalize(model.encode_text(tok([t.format(c) for t in
                                                                           OPENAI_IMAGENET_TEMPLATES])), dim=-1)
                                       .mean(0), dim=0) for c in names])
        ref = model.logit_scale.exp() * img @ txt.T
        assert torch.allclose(ens.members[0](x), ref, atol=1e-5)
        p = ens.probs(x)
        assert torch.allclose(p, (ref.softmax(-1) + ens.members[1](x).softmax(-1)) / 2, atol=1e-6)
    # the VFM: the image tower's (unnormalised) embedding at its own preprocessing
    vfm, _ = rf.train_vfm(None, names, replace(cfg, vfm=str(ck)), Dist(), {})
    with torch.no_grad():
        assert torch.allclose(vfm.features(x), model.encode_image(torch.stack([eval_transform(24)(xi) for xi in x]),
                                                                  normalize=False), atol=1e-5)


def test_real_teachers_and_vfm_replace_their_training(tmp_path):
    """--teacher=a,b and --vfm=c end to end: no teacher or VFM fit, the store's targets come from the CLIPs; a bad
    file is one error naming the flag."""
    a, b = _tiny_open_clip(tmp_path / "a.safetensors"), _tiny_open_clip(tmp_path / "b.safetensors", seed=1)
    out = tmp_path / "run"
    args = [f"--out={out}", "--smoke", "--n_train=40", "--n_test=40", "--n_val=20", "--n_pool=100", "--n_transfer=20",
            "--epochs=1", "--kd_epochs=1", "--ft_steps=1", "--n_labels=2", "--batch_size=20", "--shard_size=20",
            f"--teacher={a},{b}", f"--vfm={a}", "--device=cpu"]
    res = rf.main(args)
    assert not os.path.exists(out / "teachers.safetensors") and not os.path.exists(out / "vfm.safetensors")
    assert "teachers" not in res["data"]["stages"] and "vfm" not in res["data"]["stages"]
    # 17 fits less the teachers and the VFM, + 2 for each of the smoke preset's 3 restart students
    assert len(res["data"]["stages"]) == 15 + 6 and {"teacher_acc", "vfm_adapted_acc", "dr_acc"} <= set(res)
    # the stored top-k are the zero-shot ensemble's probabilities of the view replayed from the store alone
    man, ss = load(out / "reinforced")
    ens, _ = rf.clip_teachers(parse_config(rf.Config, [f"--teacher={a},{b}"]), rf.SHAPES)
    u = rf.unpack(ss[0])
    x = rf.replay_aug(rf.heavy_pipeline(parse_config(rf.Config, args)), u["image"], u["partners"], u["aug"][0])
    v, ix = rf.sparsify(ens.probs(x[None]), man["topk"])
    assert torch.equal(ix[0], u["ix"][0]) and torch.allclose(v[0].float(), u["v"][0].float(), atol=1e-3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    from common.convert import CheckpointError
    with pytest.raises(CheckpointError, match="--teacher"):
        rf.main([*args[:-3], f"--teacher={a},{bad}", "--out=" + str(tmp_path / "r2")])
    with pytest.raises(CheckpointError, match="--vfm"):
        rf.main([*args[:-3], f"--vfm={bad}", "--mode=transfer", "--out=" + str(tmp_path / "r3")])
    with pytest.raises(ValueError, match="--bpe"):
        rf.main([f"--out={tmp_path / 'r4'}", "--bpe=x.txt"])


# ---------------------------------------------------------------- end to end
def _losses(out, key="loss"):
    runs = {}
    for line in open(os.path.join(out, "log.jsonl")):
        r = json.loads(line)
        runs.setdefault(r["run"], []).append(r[key])
    return runs


def test_smoke_learns_and_writes_results(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "reinforce.py", "--smoke", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    for k in ("erm_acc", "erm_ra_acc", "kd_acc", "dr_acc", "chance", "majority", "task_majority", "erm_epoch_s",
              "kd_epoch_s", "dr_epoch_s", "dr_epoch_cpu_s",
              "storage_bytes_per_image", "ns", "topk", "scratch_acc", "agnostic_kd_acc", "agnostic_lp_acc",
              "task_kd_acc", "seconds",
              "device", "data"):
        assert k in res, k
    assert set(res["task_kd_acc"]) == {"in_domain_oracle", "retrieved", "generic", "generic_oracle"}
    assert set(res["val_acc"]) == {"erm", "erm_ra", "kd", "dr", "tokt_ft_in_domain_oracle", "tokt_ft_retrieved",
                                   "tokt_ft_generic", "tokt_ft_generic_oracle", "tokt_ft_agnostic", "tokt_scratch",
                                   "tokt_ft_in_domain_oracle_r1", "tokt_ft_retrieved_r1", "tokt_ft_generic_r1"}
    # a compared set scores the mean of its tokt_restarts (2) students, which differ; the oracle row has one
    kd = res["task_kd_restarts"]
    assert {k: len(v) for k, v in kd.items()} == {"in_domain_oracle": 2, "retrieved": 2, "generic": 2,
                                                  "generic_oracle": 1}
    for k, v in kd.items():
        assert res["task_kd_acc"][k] == pytest.approx(sum(v) / len(v))
    # the oracle sets read the pool's labels (all / no task images); the label-free ones cannot be pure
    frac = res["transfer_set_task_fraction"]
    assert frac["in_domain_oracle"] == 1.0 and frac["generic_oracle"] == 0.0 and 0 < frac["generic"] < 1
    # the task's images are in their own domain (task_domain), a domain_frac share of the pool too
    dom = res["transfer_set_domain_fraction"]
    assert dom["in_domain_oracle"] == 1.0 and 0 < dom["generic"] < 1 and 0 < dom["generic_oracle"] < 1
    # every effect and check of EFFECTS reads keys this run wrote (so --seeds can judge them)
    rows = summarize({0: res, 1: res}, rf.EFFECTS)
    assert len(rows) == len(rf.EFFECTS) and all(np.isfinite(r["d_mean"]) for r in rows)
    assert res["majority"] == pytest.approx(max(np.bincount(_world_labels(300))) / 300)
    runs = _losses(out)
    for name in ("teachers", "student_erm", "student_erm_ra", "student_dr", "vfm", "tokt_kd_in_domain_oracle"):
        assert runs[name][-1] < runs[name][0], (name, runs[name])
    assert runs["tokt_kd_retrieved_r1"] != runs["tokt_kd_retrieved"]  # a restart is another student
    # the four students warm up over student_warmup steps (smoke: 4), every other fit over 1/20 of its steps
    lr0, cfg = _losses(out, "lr"), parse_config(rf.Config, ["--smoke"], commands=rf.COMMANDS, presets={"smoke": rf.SMOKE})
    for kind in rf.ARMS:
        assert lr0[f"student_{kind}"][0] == pytest.approx(getattr(cfg, f"{kind}_lr") / cfg.student_warmup)
    assert lr0["teachers"][0] == pytest.approx(cfg.lr / (cfg.teacher_epochs * cfg.n_teacher // cfg.batch_size // 20))
    # above chance (1/10 shapes, 1/5 task classes) by a margin: the smoke is too short for the paper's effects
    assert res["teacher_acc"] > 0.1 + 0.05 and res["vfm_adapted_acc"] > res["task_chance"] + 0.05
    # the teachers are also scored on the val images their budget is chosen on (never on test)
    assert res["teacher_val_acc"] > 0.1 + 0.05 and res["teacher_val_acc"] != res["teacher_acc"]
    # KD's extra cost over DR (the teachers' forward) is judged at the default size by EFFECTS over seeds: at smoke
    # size the two CPU times differ by a few ms and their order flipped in about 1 of 6 runs, so only presence here
    assert res["kd_epoch_cpu_s"] > 0 and res["dr_epoch_cpu_s"] > 0
    d = res["data"]
    assert d["eval_keys_in_train"] == 0 and d["skipped_corrupt"] == 0 and d["eval_samples"] == 300
    assert d["stages"]["student_dr"]["train_unique_keys"] == 200  # the store holds the n_train training images
    assert os.path.exists(out / "reinforced" / "manifest.json") and os.path.exists(out / "reinforce_samples.png")
    assert "reinforce.py results" in p.stdout
    # the same command again: every stage (23 fits: 17 + the 3 restarts' distillation and fine-tune; the store) is
    # reused as it is, with the same results (the students' epoch times too: kept with their fingerprints)
    p = subprocess.run([sys.executable, "reinforce.py", "--smoke", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count(": reusing ") == 23 and "training this stage again" not in p.stdout
    again = json.load(open(out / "results.json"))
    assert {k: v for k, v in again.items() if k not in ("seconds", "reinforce_s")} == \
        {k: v for k, v in res.items() if k not in ("seconds", "reinforce_s")}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from common.world import World, export_shards
    d = tmp_path_factory.mktemp("shards")
    for split, n in (("train", 200), ("test", 60), ("val", 200)):
        export_shards(World(seed=0, split=split, size=32, n=n), str(d / split), n, shard_size=50)
    return d


# tiny and within one epoch of every source (200 train samples, 4 shards), except the fine-tunes on the 10 labels
SHARD_ARGS = ["--smoke", "--n_train=100", "--n_teacher=100", "--n_vfm=100", "--n_test=60", "--n_pool=150", "--n_val=50",
              "--n_transfer=40", "--batch_size=20", "--epochs=1", "--teacher_epochs=1", "--vfm_epochs=1",
              "--kd_epochs=1", "--ft_steps=1", "--n_labels=2"]
SEEN = {"teachers": 100, "student_erm": 100, "student_erm_ra": 100, "student_kd": 100, "student_dr": 100, "vfm": 100, "tokt_scratch": 30}


@pytest.mark.parametrize("procs", [1, 2])
def test_shards_keys_disjoint_and_counted(shards, tmp_path, procs):
    out = tmp_path / "run"
    args = ["reinforce.py", f"--data={shards}/{{split}}", f"--out={out}", *SHARD_ARGS]
    if procs == 1:
        cmd = [sys.executable, *args, "--amp=bf16"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    d = res["data"]
    assert res["world_size"] == procs and d["eval_samples"] == 60 and "shards(" in d["source"]
    # 17 fits + 2 for each of the smoke preset's 3 restart students (their streams are checked like the others)
    assert d["eval_keys_in_train"] == 0 and d["skipped_corrupt"] == 0 and len(d["stages"]) == 17 + 6
    for name, st in d["stages"].items():
        seen = SEEN.get(name, 40 if name.startswith("tokt_kd") else 10)  # distillation: 2 steps; fine-tune: 1
        assert st["train_samples_seen"] == seen and st["eval_keys_in_train"] == 0 and st["skipped_corrupt"] == 0
        if name != "tokt_scratch":  # 3 epochs of the 10 labels (its ranks' shares change every epoch)
            assert st["train_unique_keys"] == seen and st["train_keys_on_several_ranks"] == 0, (name, st)
    sc = d["stages"]["tokt_scratch"]
    assert sc["train_unique_keys"] - sc["train_keys_on_several_ranks"] == 10  # the distinct keys over all ranks
    top = d["train_keys_on_several_ranks"]  # over all stages: also keys that two stages dealt to different ranks
    assert top >= max(st["train_keys_on_several_ranks"] for st in d["stages"].values()) and (top > 0) == (procs > 1)
    assert d["stages"]["student_dr"]["source"].startswith(f"shards({out}/reinforced/reinforced-000000.tar::")
    assert len([f for f in os.listdir(out / "reinforced") if f.endswith(".tar")]) == 4  # one per input shard
