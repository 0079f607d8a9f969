"""Tests for samclip.py: SAM-shaped teacher shapes, losses on hand-computed cases, IoU metrics, the replay memory,
frozen-backbone head probing, stage fingerprints, and end-to-end smokes (single process and torchrun x2)."""
import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import samclip as S
from common.data import Stream, WorldSource, Zip, for_each_shard, key_hash, open_source, read_samples
from common.eval import seg_miou
from common.train import Dist
from common.world import World, export_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=32, layers=1, heads=2, dec_dim=16, head_layers=1, image_size=32)


def test_prompt_encoder_and_mask_decoder_shapes():
    torch.manual_seed(0)
    cfg = S.Config(**TINY)
    sam = S.SAM(cfg)
    B = 3
    x = torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8)
    coords = torch.rand(B, 2, 2)
    labels = torch.tensor([[1, 0], [2, 3], [1, 0]])
    p = sam.sam.prompt(coords, labels)
    assert p.shape == (B, 2, cfg.dec_dim)
    # a padding slot carries no positional information: only the learned "not a point" embedding
    assert torch.allclose(p[0, 1], sam.sam.prompt.embed.weight[0])
    masks, iou = sam(x, coords, labels)
    assert masks.shape == (B, 32, 32) and iou.shape == (B,)
    # the prompt changes the mask: same image, different point -> different logits
    m2, _ = sam(x, torch.rand(B, 2, 2), labels)
    assert not torch.allclose(masks, m2)


def test_make_prompt_point_in_mask_and_box_bounds():
    m = np.zeros((32, 32), bool)
    m[4:10, 20:30] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        c, lab = S.make_prompt(m, False, rng)
        x, y = int(c[0, 0] * 32), int(c[0, 1] * 32)
        assert m[y, x] and list(lab) == [1, 0]
    c, lab = S.make_prompt(m, True, None)  # exact box, (x, y) corners
    assert np.allclose(c * 32, [[20, 4], [30, 10]]) and list(lab) == [2, 3]


def test_focal_and_dice_hand_computed():
    # logit 0 -> p = 0.5; target 1: alpha * (1 - 0.5)^2 * ln 2; target 0: (1 - alpha) * 0.25 * ln 2
    z = torch.zeros(1, 1, 2)
    t = torch.tensor([[[1.0, 0.0]]])
    want = (0.25 * 0.25 * math.log(2) + 0.75 * 0.25 * math.log(2)) / 2
    assert abs(S.focal_loss(z, t).item() - want) < 1e-6
    # dice: p = 0.5 everywhere on 2 pixels, one positive: 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3
    assert abs(S.dice_loss(z, t).item() - 1 / 3) < 1e-6
    big = torch.tensor([[[30.0, -30.0]]])  # a confident correct mask: both losses ~ 0
    assert S.focal_loss(big, t).item() < 1e-6 and S.dice_loss(big, t).item() < 1e-6


def test_scale_invariant_depth_loss():
    d = torch.rand(2, 4, 4) + 0.5
    v = torch.ones_like(d)
    # a prediction off by a global scale costs nothing; a non-uniform error costs something
    assert abs(S.si_log_loss(d.log() + 0.7, d, v).item()) < 1e-6
    assert abs(S.si_log_loss(d.log() + 0.7, d, v, lam=0.5).item() - 0.5 * 0.7 ** 2) < 1e-5  # Eigen's lam = 0.5
    noisy = d.log() + torch.linspace(0, 1, 16).view(1, 4, 4)
    assert S.si_log_loss(noisy, d, v).item() > 1e-3


def test_mask_iou_and_seg_miou():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True      # 8 pixels
    b[0, 1:3] = True     # 8 pixels, 4 shared -> 4 / 12
    iou = S.mask_iou(a, b)
    assert abs(iou[0].item() - 1 / 3) < 1e-6 and iou[1].item() == 1.0  # empty vs empty
    pred = np.array([[0, 1], [1, 1]])
    tgt = np.array([[0, 1], [0, 1]])
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3
    assert abs(seg_miou(pred, tgt, 2) - (0.5 + 2 / 3) / 2) < 1e-9


def _world_src(n, split="train"):
    return WorldSource(World(0, split, 32), n=n, cache=True)


def _shards(path, need):  # what for_each_shard wrote under path, as a source
    return open_source(os.path.join(path, "*.tar"), "train", require=need)


def test_replay_memory_size(tmp_path):
    # the stored replay memory: the images whose salted key hash falls below replay_frac, P pairs each, built shard
    # by shard (a rebuild skips the shards already written)
    cfg = S.Config(**TINY, n_train=40, replay_frac=0.25, prompts_per_image=3)
    src, out = _world_src(40), str(tmp_path / "replay")
    build = S.replay_shard(cfg, S.SAM(cfg).eval(), "cpu")
    paths = for_each_shard(src, out, build, shard_size=16, progress=False)
    assert len(paths) == 3
    mem = read_samples(_shards(out, ("image", "mask.npy")))
    kept = {s["__key__"].rsplit("-p", 1)[0] for s in mem}
    assert 3 <= len(kept) <= 20 and len(mem) == 3 * len(kept)
    assert all(src.key(i) in kept for i in range(40)
               if key_hash(f"0:replay:{src.key(i)}") < 0.25 * 2 ** 63)
    s = mem[0]
    assert S.decode_npy(s["mask.npy"]).shape == (32, 32) and s["image"].shape == (32, 32, 3)
    assert len(s["prompt"]) == 2 and s["prompt_labels"] in ([1, 0], [2, 3]) and 0 <= s["iou"] <= 1.5
    os.remove(paths[1])
    assert for_each_shard(src, out, build, shard_size=16, progress=False) == paths  # rebuilt, same names


def test_resized_keeps_maps_aligned_at_any_size():
    img = np.zeros((40, 64, 3), np.uint8)
    seg = np.zeros((40, 64), np.uint8)
    img[10:30, 28:36] = 255
    seg[10:30, 28:36] = 3
    s = S.resized({"__key__": "k", "image": img, "seg": seg, "depth": np.ones((40, 64), np.float32), "label": 2}, 32)
    assert s["image"].shape == (32, 32, 3) and s["seg"].shape == (32, 32) and s["depth"].shape == (32, 32)
    assert s["seg"].dtype == np.uint8 and set(np.unique(s["seg"])) == {0, 3} and s["label"] == 2
    assert ((s["image"][..., 0] > 127) == (s["seg"] == 3)).mean() > 0.97  # same geometry for image and mask
    assert set(S.resized(s, 32, ("image",))) == {"__key__", "image", "label"}


def test_zoo_labels_from_members_and_from_experts():
    cfg = S.Config(**TINY, seg_noise=0.2, depth_noise=0.1)
    samples = read_samples(_world_src(4), 4)
    noisy = list(S.zoo_shard(cfg, {}, 11, "cpu")(iter(samples)))
    assert [k for k, _ in noisy] == [s["__key__"] for s in samples]
    seg = np.asarray(Image.open(io.BytesIO(noisy[0][1]["seg.png"])))
    assert 0.7 < (seg == samples[0]["seg"]).mean() < 0.95  # seg_noise of the pixels replaced
    nrm = S.decode_npy(noisy[0][1]["normals.npy"]).astype(np.float32)
    assert nrm.shape == (3, 32, 32) and np.allclose(np.linalg.norm(nrm, axis=0), 1, atol=1e-2)
    again = list(S.zoo_shard(cfg, {}, 11, "cpu")(iter(samples)))
    assert again[0][1]["depth.npy"] == noisy[0][1]["depth.npy"]  # per-key seeds: the same labels on every rebuild
    experts = {"seg": S.Expert(cfg, 11).eval(), "depth": S.Expert(cfg, 1).eval()}
    got = list(S.zoo_shard(cfg, experts, 11, "cpu")(iter(samples)))
    d = S.decode_npy(got[0][1]["depth.npy"]).astype(np.float32)
    assert d.shape == (32, 32) and (d > 0).all() and got[0][1]["txt"] == samples[0]["caption"].encode()


def test_head_probing_freezes_backbone(tmp_path):
    torch.manual_seed(0)
    cfg = S.Config(**TINY, out=str(tmp_path), n_train=16, stage1_steps=3, batch_size=8, replay_batch=4, log_every=0,
                   clip_width=24, replay_frac=0.5)
    sam = S.SAM(cfg).eval()
    emb = {}

    def dclip(samples):  # D_CLIP shards with random unit "teacher" embeddings
        for s in samples:
            emb[s["__key__"]] = e = torch.nn.functional.normalize(torch.randn(24), dim=0).numpy()
            yield s["__key__"], {"png": S.to_bytes(s["image"]), "emb.npy": S.to_bytes(e)}

    src = _world_src(16)
    for_each_shard(src, str(tmp_path / "d"), dclip, progress=False)
    for_each_shard(src, str(tmp_path / "r"), S.replay_shard(cfg, sam, "cpu"), progress=False)
    dc, rp = _shards(str(tmp_path / "d"), ("image", "emb.npy")), _shards(str(tmp_path / "r"), ("image", "mask.npy"))
    st, streams = S.merge(cfg, Dist(), sam, dc, rp, "stage1", False)
    assert len(streams) == 1 and streams[0].seen == 3 * 8
    # parameters and buffers (the conv stem's BatchNorm running statistics) of backbone and SAM head are untouched
    for mine, teacher in ((st.enc, sam.enc), (st.sam, sam.sam)):
        sd = teacher.state_dict()
        assert any("running_mean" in k for k in st.enc.state_dict()) or mine is st.sam
        for k, v in mine.state_dict().items():
            assert torch.equal(v, sd[k]), k
    fresh = S.CLIPHead(cfg.width, 24, cfg.head_layers, cfg.heads)
    assert st.clip.proj.shape == fresh.proj.shape
    # stage 2 starts from stage 1, moves the backbone and draws a replay batch every step from its own stream
    cfg.stage2_steps = 3
    s2, streams = S.merge(cfg, Dist(), sam, dc, rp, "stage2", True, init=st)
    assert any(not torch.equal(a, b) for a, b in zip(s2.enc.parameters(), sam.enc.parameters()))
    assert [s.seen for s in streams] == [3 * 8, 3 * 4]
    # the checkpoints have fixed names; a second call with the same config reuses them (nothing is trained)
    assert {"stage1.safetensors", "stage2.safetensors"} <= set(os.listdir(tmp_path))
    again, streams = S.merge(cfg, Dist(), sam, dc, rp, "stage2", True, init=st)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), s2.parameters()))


def test_stage2_batches_resume_both_streams(tmp_path):
    # stage 2's data, the D_CLIP and replay streams zipped: the state after step 2, loaded into fresh streams, gives
    # the same batches 2.. as the first run (fit checkpoints this state)
    cfg = S.Config(**TINY, replay_frac=0.5)
    src = _world_src(24)
    for_each_shard(src, str(tmp_path / "r"), S.replay_shard(cfg, S.SAM(cfg).eval(), "cpu"), shard_size=8,
                   progress=False)

    def batches():
        mk = lambda s, n: Stream(s, n, lambda x, g: {"x": x["image"]}, seed=1, num_workers=0, shuffle_buffer=5)  # noqa
        return Zip(mk(_world_src(24), 4), mk(_shards(str(tmp_path / "r"), ("image",)), 3))

    a = batches()
    first = [a(i) for i in range(6)]
    b = batches()
    [b(i) for i in range(2)]
    c = batches()
    c.load_state_dict(b.state_dict())
    for i in range(2, 6):
        for x, y in zip(first[i], c(i)):
            assert x["__key__"] == y["__key__"] and torch.equal(x["x"], y["x"])


def test_stage_fingerprints_and_retrain(tmp_path):
    # a stage's fingerprint holds what its result depends on, those of the stages it builds on included
    def fp(name, **kw):
        return S.prepare(S.Config(out=str(tmp_path), **kw), Dist(), name)[1]
    assert fp("stage2") == fp("stage2", zoo_lam=3.0) != fp("stage2", lam=2.0)
    assert fp("stage1") == fp("stage1", lam=2.0) != fp("stage1", clip_lr=4e-3)  # D_CLIP comes from the CLIP teacher
    assert fp("stage2_noreplay") == fp("stage2_noreplay", replay_frac=0.5) != fp("stage2_noreplay", sam_lr=1e-3)
    assert fp("clip_teacher") == fp("clip_teacher", seg_noise=0.3) and fp("zoo") != fp("zoo", seg_noise=0.3)
    assert fp("dclip")["stage"] == "dclip" and fp("dclip") != fp("replay")
    # --retrain removes a stage's output (checkpoint or shard folder) before it is built again; else it stays
    (tmp_path / "replay").mkdir()
    (tmp_path / "sam_teacher.safetensors").write_bytes(b"x")
    assert S.prepare(S.Config(out=str(tmp_path)), Dist(), "replay")[0] == str(tmp_path / "replay")
    assert (tmp_path / "replay").is_dir()
    S.prepare(S.Config(out=str(tmp_path), retrain=True), Dist(), "replay")
    S.prepare(S.Config(out=str(tmp_path), retrain=True), Dist(), "sam_teacher", ".safetensors")
    assert not (tmp_path / "replay").exists() and not (tmp_path / "sam_teacher.safetensors").exists()


def test_renamed_flags_and_one_line_errors():
    for old, new in (("batch", "batch_size"), ("patch", "patch_size")):
        with pytest.raises(SystemExit, match=f"--{old} is now --{new}"):
            S.main([f"--{old}=8"])
    r = subprocess.run([sys.executable, "samclip.py", "--mode=bogus"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --mode='bogus'; expected one of merge, zoo, all, experts"]
    with pytest.raises(ValueError, match="--seg_prompts='bogus'; expected one of world, colour, main_object, "
                                         "size_colour"):
        S.main(["--seg_prompts=bogus"])


def test_seg_prompt_families_name_one_shape_each():
    """Every zero-shot seg prompt has one slot for the shape; the colour families cover every world colour."""
    from common.world import COLORS, SIZES, TEMPLATES
    assert S.SEG_PROMPTS["world"] == TEMPLATES
    for name, T in S.SEG_PROMPTS.items():
        assert all(t.count("{}") == 1 for t in T), name
    assert [t.format("star") for t in S.SEG_PROMPTS["main_object"]] == [f"a large {c} star." for c in COLORS]
    assert len(S.SEG_PROMPTS["size_colour"]) == len(SIZES) * len(COLORS) == 27


def test_logits_in_fp32_under_autocast():
    cfg = S.Config(**TINY, clip_width=32, clip_layers=1, text_layers=1)
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = S.ZooCLIP(cfg, 100, True, 11)(x, torch.randint(1, 99, (2, 8)))[3]
        masks, _ = S.SAM(cfg)(x, torch.rand(2, 2, 2), torch.tensor([[1, 0], [2, 3]]))
        seg = S.Expert(cfg, 11)(x)
    assert dense.dtype == masks.dtype == seg.dtype == torch.float32
    assert dense.shape == (2, 15, 32, 32) and seg.shape == (2, 11, 32, 32)


def test_value_readout_is_attention_without_mixing():
    # MaskCLIP readout: the last block's attention is replaced by its value path. With one token, softmax attention
    # is exactly that value path, so both readouts agree; with many tokens the plain head mixes patches, the value
    # readout does not (changing the other patches leaves patch 0's embedding unchanged).
    torch.manual_seed(0)
    head = S.CLIPHead(32, 16, layers=1, heads=4).eval()
    one = torch.randn(3, 1, 32)
    assert torch.allclose(head(one)[1], head(one, value_readout=True)[1], atol=1e-5)
    tok = torch.randn(2, 9, 32)
    plain, val = head(tok)[1], head(tok, value_readout=True)[1]
    assert not torch.allclose(plain, val, atol=1e-3)
    other = torch.cat([tok[:, :1], torch.randn(2, 8, 32)], 1)
    assert torch.allclose(head(other, value_readout=True)[1][:, 0], val[:, 0], atol=1e-5)
    assert not torch.allclose(head(other)[1][:, 0], plain[:, 0], atol=1e-3)


def test_all_background_cannot_pass_the_seg_bars():
    # 0 = background on 80% of the pixels: predicting all background has a high mIoU (its background IoU is 0.8),
    # far above random labels; the zero-shot seg bar (best trivial map) and the dense representation bar both
    # reject it, while a map that also gets the objects right passes
    rng = np.random.default_rng(0)
    seg = np.where(rng.random((20, 16, 16)) < 0.8, 0, rng.integers(1, 11, (20, 16, 16)))
    allbg = seg_miou(np.zeros_like(seg), seg, 11)
    r = {"chance_seg_miou": seg_miou(rng.integers(0, 11, seg.shape), seg, 11), "allbg_seg_miou": allbg}
    assert allbg == pytest.approx(0.8 / 11, abs=0.01) and allbg > r["chance_seg_miou"]
    assert S.TRIVIAL(r) == allbg and S.DENSE_REPR(r) == pytest.approx(allbg + 0.15)
    good = seg.copy()
    good[rng.random(seg.shape) < 0.1] = 0
    for pred, passes in ((np.zeros_like(seg), False), (good, True)):
        res = dict(r, zeroshot_seg_miou_coarse=seg_miou(pred, seg, 11))
        e = next(e for e in S.EFFECTS if e.a == "zeroshot_seg_miou_coarse")
        assert (S.summarize({0: res}, [e])[0]["d_mean"] > 0) == passes


def test_zero_shot_seg_background_threshold_and_attributes():
    # tau = 0 is the argmax of the per-patch scores; tau above every probability makes every pixel background
    torch.manual_seed(0)
    cfg = S.Config(**TINY, clip_width=16)
    st = S.SAMCLIP(cfg, 16).eval()
    te = S.arrays(read_samples(_world_src(6), 6))
    clf = torch.nn.functional.normalize(torch.randn(11, 16), dim=-1)
    coarse = S.zero_shot_seg(st, clf, te, False, 0, "cpu", tau=0.0)[0]
    assert coarse.shape == (6, 32, 32) and len(np.unique(coarse)) > 1
    assert (S.zero_shot_seg(st, clf, te, False, 0, "cpu", tau=1.01)[0] == 0).all()
    mid = S.zero_shot_seg(st, clf, te, False, 0, "cpu", tau=0.5)[0]
    assert ((mid == coarse) | (mid == 0)).all()  # a threshold only turns pixels into background
    # zero-shot / probe tasks: shape = the label, colour = label_fine % 9 (label_fine = shape * 9 + colour)
    samples = read_samples(_world_src(30), 30)
    t = S.attributes(samples, ["a"] * 10, True)
    assert list(t) == ["shape", "colour"] and list(S.attributes(samples, ["a"] * 10, False)) == ["shape"]
    assert (t["shape"][0] * 9 + t["colour"][0] == np.array([s["label_fine"] for s in samples])).all()


def _tiny_open_clip(path, seed=0, vocab=None, drop=()):
    """A random 24 px ViT CLIP (patch 8, width 64, 1 block per tower, context 20, embed 32, the world's vocabulary)
    saved in open_clip's key names (text tower at the top level, transformer.resblocks, in_proj_weight)."""
    from safetensors.torch import save_file
    from common.models import CLIP, TextTransformer, VisionTransformer
    from common.tokenizer import world_tokenizer

    def name(k):
        k = k.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
        k = k.replace("blocks.", "transformer.resblocks.")
        return k[len("text."):] if k.startswith("text.") else k
    torch.manual_seed(seed)
    m = CLIP(VisionTransformer(24, 8, 64, 1, 1, 4.0, 32),
             TextTransformer(vocab or world_tokenizer().vocab_size, 20, 64, 1, 1, 32))
    save_file({name(k): v.contiguous() for k, v in m.state_dict().items() if name(k) not in drop}, str(path))


CK_RUN = ["--smoke", "--mode=merge", "--n_train=64", "--n_distill=64", "--n_test=24", "--n_probe=24", "--steps=2",
          "--clip_batch=16", "--sam_batch=8", "--batch_size=8", "--replay_batch=4", "--replay_frac=0.5",
          "--log_every=0", "--bg_thresholds=0,0.5"]


def test_clip_teacher_checkpoint_replaces_the_miniature_teacher(tmp_path):
    """--clip_teacher: no miniature CLIP is trained; D_CLIP holds the checkpoint's embeddings of each image at its own
    24 px open_clip preprocessing; the CLIP head has its embed dim (32); the stages' fingerprints name the file."""
    from common.models import load_clip_checkpoint
    from common.transforms import eval_transform
    from safetensors import safe_open
    ck, out = tmp_path / "clip24.safetensors", tmp_path / "run"
    _tiny_open_clip(ck)
    res = S.main(CK_RUN + [f"--out={out}", f"--clip_teacher={ck}"])
    assert not (out / "clip_teacher.safetensors").exists() and (out / "stage2.safetensors").exists()
    teacher = load_clip_checkpoint(str(ck))
    assert teacher.preprocess["size"] == 24 and teacher.preprocess["interpolation"] == "bicubic"
    prep = eval_transform(**teacher.preprocess)
    s = read_samples(_shards(str(out / "dclip"), ("image", "emb.npy")), 3)
    with torch.no_grad():
        want = teacher.encode_image(torch.stack([prep(x["image"]) for x in s])).numpy()
    assert np.allclose(np.stack([S.decode_npy(x["emb.npy"]) for x in s]), want, atol=1e-5)
    sd = safe_open(str(out / "stage2.safetensors"), "pt")
    assert sd.get_tensor(next(k for k in sd.keys() if k.endswith("clip.proj"))).shape[1] == 32
    assert str(ck.resolve()) in sd.metadata()["fingerprint"]
    assert isinstance(res["clip_teacher_zeroshot_acc"], float) and "merged_sam_miou" in res
    # another checkpoint at the same path: the stages built on it are built again
    before = os.stat(out / "stage1.safetensors").st_mtime_ns
    _tiny_open_clip(ck, seed=1)
    S.main(CK_RUN + [f"--out={out}", f"--clip_teacher={ck}"])
    assert os.stat(out / "stage1.safetensors").st_mtime_ns != before


def test_clip_teacher_bad_files_and_flags(tmp_path):
    from common.convert import CheckpointError
    run = lambda *a: S.main(CK_RUN + [f"--out={tmp_path / 'run'}", *a])  # noqa: E731
    with pytest.raises(CheckpointError, match="nope.safetensors: no such file"):
        run(f"--clip_teacher={tmp_path / 'nope.safetensors'}")
    part = tmp_path / "part.safetensors"
    _tiny_open_clip(part, drop=("visual.proj",))
    with pytest.raises(CheckpointError, match=r"part\.safetensors: .*visual\.proj"):
        run(f"--clip_teacher={part}")
    other = tmp_path / "vocab.safetensors"
    _tiny_open_clip(other, vocab=300)
    with pytest.raises(ValueError, match=r"vocab\.safetensors: its token_embedding has 300 rows .* --bpe="):
        run(f"--clip_teacher={other}")
    with pytest.raises(ValueError, match="--bpe and --quick_gelu describe a --clip_teacher"):
        run("--bpe=x.txt")


def test_seeds_runs_every_seed_and_writes_verdicts(tmp_path):
    res = S.main(["--smoke", "--seeds=0,1", f"--out={tmp_path}", "--n_train=64", "--n_distill=64", "--n_test=24",
                  "--n_probe=24", "--steps=2", "--clip_batch=16", "--sam_batch=8", "--batch_size=8",
                  "--replay_batch=4", "--replay_frac=0.5", "--log_every=0", "--probe_steps=2"])
    saved = json.load(open(tmp_path / "seeds.json"))
    assert saved["seeds"] == [0, 1] and [r["effect"] for r in saved["effects"]] == [e.name for e in S.EFFECTS]
    assert res["effects"][0]["verdict"] in ("shown", "not shown")
    for s in (0, 1):  # each seed's own world: the per-seed numbers are that seed's results.json
        r = json.load(open(tmp_path / f"seed{s}" / "results.json"))
        assert saved["effects"][0]["a_values"][s] == r["merged_sam_miou"]
    assert (tmp_path / "sweep.png").exists()


def _log(path):
    return [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]


def test_smoke_learns(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "samclip.py", "--smoke", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    for k in ("clip_teacher_zeroshot_acc", "sam_teacher_miou", "merged_zeroshot_acc", "merged_sam_miou",
              "merged_noreplay_zeroshot_acc", "merged_noreplay_sam_miou", "zeroshot_seg_miou",
              "zeroshot_seg_miou_coarse", "zeroshot_seg_miou_refined", "chance_seg_miou", "clip_zeroshot_acc",
              "zoo_zeroshot_acc", "clip_dense_miou", "zoo_dense_miou", "clip_depth_rmse", "zoo_depth_rmse",
              "seconds", "device"):
        assert k in res, k
    rows = _log(out)
    for run in {r["run"] for r in rows}:  # every stage's loss falls
        ls = [r["loss"] for r in rows if r["run"] == run]
        assert ls[-1] < ls[0], (run, ls)
    # the zero-shot task is the largest object's shape and colour: chance is the mean of 1/10 and 1/9, and every
    # expected effect of EFFECTS was evaluated on this run (a bool, none n/a)
    assert res["chance"] == pytest.approx((1 / 10 + 1 / 9) / 2) and res["zeroshot_attributes"] == ["shape", "colour"]
    assert list(res["expected_effects"]) == [e.name for e in S.EFFECTS]
    assert all(isinstance(v, bool) for v in res["expected_effects"].values())
    # the zoo model is scored in its OWN embedding space: recomputed here from zoo.safetensors with its own text tower
    from common.eval import zero_shot_accuracy, zero_shot_classifier
    from common.tokenizer import world_tokenizer
    from common.train import load_weights
    from common.world import TEMPLATES, class_names
    cfg = S.parse_config(S.Config, ["--smoke"], presets={"smoke": S.SMOKE})
    tok = world_tokenizer(context_length=32)
    zoo = S.ZooCLIP(cfg, tok.vocab_size, True, 11)
    load_weights(str(out / "zoo.safetensors"), zoo)
    te = S.arrays(read_samples(_world_src(cfg.n_test, "test"), cfg.n_test))
    with torch.no_grad():
        f = zoo.eval().clip.encode_image(S.inputs(torch.from_numpy(te["images"])))
        clf = zero_shot_classifier(zoo.clip, tok, class_names("shape"), TEMPLATES, "cpu")
    assert res["zoo_zeroshot_acc_shape"] == pytest.approx(zero_shot_accuracy(f, clf, te["labels"]), abs=1e-6)
    # the background threshold is the val-best of the grid; the promptable masks are not empty
    val, ref = res["bg_threshold_val_miou"], res["refine_threshold_val_miou"]
    assert max(val, key=val.get) == f"{res['dense_readout']}:{res['bg_threshold']}"
    assert max(ref, key=ref.get) == str(res["refine_threshold"])
    assert res["sam_teacher_miou"] > 0.02 and res["merged_sam_miou"] > 0.02
    for f in ("config.json", "zeroshot_seg.png"):
        assert (out / f).exists()
    assert any(f.endswith(".safetensors") for f in os.listdir(out))


# ----------------------------------------------------------------------------------------------------------------
# exported world shards: 1 process (bf16) and 2 gloo processes; image-text shards (no dense members)

# --steps / --lr: every trained stage's steps and peak lr
TINY_RUN = ["--smoke", "--n_test=40", "--n_probe=40", "--steps=3", "--lr=2e-3", "--clip_batch=32", "--sam_batch=16",
            "--batch_size=16", "--replay_batch=8", "--replay_frac=0.5", "--prompts_per_image=2", "--probe_steps=5",
            "--log_every=1"]
# samples each stage trains on: steps x global batch (stage 2: D_CLIP batches + a replay batch every step); every
# run stays within one epoch of its data (160 train images), so no key repeats or reaches two ranks
SEEN = {"clip_teacher": 3 * 32, "sam_teacher": 3 * 16, "stage1": 3 * 16, "stage2": 3 * 16 + 3 * 8,
        "stage2_noreplay": 3 * 16, "zoo": 3 * 32}


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for split, n in (("train", 160), ("val", 40), ("test", 40)):
        export_shards(World(0, split, 32, n), str(d / split), n, shard_size=40)
    return d


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("procs", [1, 2])
def test_shards_smoke(world_shards, tmp_path, procs):
    out = tmp_path / "run"
    args = ["samclip.py", f"--data={world_shards}/{{split}}", f"--out={out}"] + TINY_RUN
    launch = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    cmd = [sys.executable] + (args + ["--amp=bf16"] if procs == 1 else launch + args)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["world_size"] == procs and "merged_sam_miou" in res and "zoo_dense_miou" in res
    data = res["data"]
    assert data["eval_keys_in_train"] == 0 and data["skipped_corrupt"] == 0 and data["eval_samples"] == 80
    assert data["train_samples_seen"] == data["train_unique_keys"] == sum(SEEN.values())  # summed over the stages
    assert data["train_keys_on_several_ranks"] == 0
    for stage, n in SEEN.items():
        st = data["stages"][stage]
        assert st["train_samples_seen"] == st["train_unique_keys"] == n, (stage, st)
        assert st["train_keys_on_several_ranks"] == 0, (stage, st)
    assert all(isinstance(v, bool) for v in res["expected_effects"].values())
    conf = json.load(open(out / "config.json"))
    assert {conf[k] for k in ("clip_steps", "sam_steps", "stage1_steps", "stage2_steps", "expert_steps")} == {3}
    assert {conf[k] for k in ("clip_lr", "sam_lr", "head_lr")} == {2e-3} and conf["probe_steps"] == 5


def _image_text(src, dst):
    """The shards of src without their seg / inst / depth members (image, caption, json stay)."""
    os.makedirs(dst)
    for f in sorted(os.listdir(src)):
        if f.endswith(".tar"):
            with tarfile.open(os.path.join(src, f)) as a, tarfile.open(os.path.join(dst, f), "w") as b:
                for m in a:
                    if not m.name.endswith((".seg.png", ".inst.png", ".depth.npy")):
                        b.addfile(m, a.extractfile(m))


@pytest.mark.filterwarnings("ignore:.*only .* samples")  # --val_data's hash halves hold fewer than n_test
def test_image_text_data_zoo_from_experts_merge_na(world_shards, tmp_path):
    it = str(tmp_path / "imgtext")
    _image_text(str(world_shards / "train"), it)
    run = [f"--data={it}", f"--val_data={world_shards}/test", "--holdout=0", "--num_workers=0"] + TINY_RUN
    # neither dense members nor experts: one message naming the missing members and the flags that would supply them
    with pytest.raises(ValueError) as e:
        S.main(run + [f"--out={tmp_path / 'x'}"])
    for s in ("KEY.seg.png", "KEY.inst.png", "KEY.depth.npy", "--seg_expert=", "--depth_expert=", "--mode=experts"):
        assert s in str(e.value), s
    with pytest.raises(ValueError, match="needs KEY.seg.png / KEY.inst.png members"):
        S.main(run + [f"--out={tmp_path / 'x'}", "--mode=merge"])
    # experts trained on data with dense maps label the image-text data; the SAM-CLIP half is reported as n/a
    ex = S.main([f"--data={world_shards}/{{split}}", "--mode=experts", f"--out={tmp_path / 'ex'}",
                 "--num_workers=0"] + TINY_RUN)
    assert 0 < ex["seg_expert_miou"] <= 1 and ex["depth_expert_rmse"] > 0
    res = S.main(run + [f"--out={tmp_path / 'run'}", f"--seg_expert={ex['seg_expert']}",
                        f"--depth_expert={ex['depth_expert']}"])
    assert res["merge"].startswith("n/a: needs KEY.seg.png / KEY.inst.png members")
    assert res["zoo_pseudo_labels"] == {"seg": f"--seg_expert={ex['seg_expert']}",
                                        "depth": f"--depth_expert={ex['depth_expert']}"}
    assert isinstance(res["zoo_dense_miou"], float) and res["data"]["eval_keys_in_train"] == 0
    eff = res["expected_effects"]
    assert all(v == "n/a" for k, v in eff.items() if any(w in k for w in ("merged", "SAM", "zero-shot seg")))
    assert isinstance(eff["zoo: depth probe RMSE down"], bool) and isinstance(eff["zoo: dense seg probe mIoU up"], bool)
    with pytest.raises(FileNotFoundError, match="--seg_expert='nope.safetensors' does not exist"):
        S.main(run + [f"--out={tmp_path / 'x'}", "--seg_expert=nope.safetensors",
                      f"--depth_expert={ex['depth_expert']}"])
