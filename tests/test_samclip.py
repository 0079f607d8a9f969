"""Tests for samclip.py: SAM-shaped teacher shapes, losses on hand-computed cases, IoU metrics, replay sampling,
frozen-backbone head probing, and end-to-end smokes (single process and torchrun x2)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import samclip as S
from common.eval import seg_miou
from common.train import Dist

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


def test_replay_sampling_ratio_and_memory_size():
    use = S.replay_steps(4000, 0.25, seed=3)
    assert abs(use.mean() - 0.25) < 0.03
    assert (S.replay_steps(4000, 0.25, seed=3) == use).all()        # same on every rank / on resume
    assert not S.replay_steps(100, 0.0, 0).any() and S.replay_steps(100, 1.0, 0).all()
    cfg = S.Config(**TINY, n_train=20, replay_frac=0.2, prompts_per_image=3)
    tr = S.load_data(cfg, "train", 20)
    mem = S.build_replay(cfg, S.SAM(cfg).eval(), tr, S.instance_list(tr["instances"]), "cpu")
    assert mem["n_images"] == 4 and len(mem["x"]) == 12 and mem["m"].shape == (12, 32, 32)


def test_head_probing_freezes_backbone(tmp_path):
    torch.manual_seed(0)
    cfg = S.Config(**TINY, out=str(tmp_path), n_train=16, stage1_steps=3, batch=8, replay_batch=4, log_every=0)
    tr = S.load_data(cfg, "train", 16)
    sam = S.SAM(cfg).eval()
    t_emb = torch.nn.functional.normalize(torch.randn(16, 24), dim=-1)
    mem = S.build_replay(cfg, sam, tr, S.instance_list(tr["instances"]), "cpu")
    st = S.merge(cfg, Dist(), sam, t_emb, tr, mem, "stage1", False)
    # parameters and buffers (the conv stem's BatchNorm running statistics) of backbone and SAM head are untouched
    for mine, teacher in ((st.enc, sam.enc), (st.sam, sam.sam)):
        sd = teacher.state_dict()
        assert any("running_mean" in k for k in st.enc.state_dict()) or mine is st.sam
        for k, v in mine.state_dict().items():
            assert torch.equal(v, sd[k]), k
    fresh = S.CLIPHead(cfg.width, 24, cfg.head_layers, cfg.heads)
    assert st.clip.proj.shape == fresh.proj.shape
    # stage 2 starts from stage 1 and moves the backbone
    cfg.stage2_steps = 3
    s2 = S.merge(cfg, Dist(), sam, t_emb, tr, mem, "stage2", True, init=st)
    assert any(not torch.equal(a, b) for a, b in zip(s2.enc.parameters(), sam.enc.parameters()))


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
    # --smoke is too short for zero-shot accuracy to leave chance; the default run measures that. Here: the dense
    # probe on the zoo model's features beats random labels, and the promptable masks are not empty.
    assert res["zoo_dense_miou"] > res["chance_seg_miou"]
    assert res["sam_teacher_miou"] > 0.02 and res["merged_sam_miou"] > 0.02
    for f in ("config.json", "zeroshot_seg.png"):
        assert (out / f).exists()
    assert any(f.endswith(".safetensors") for f in os.listdir(out))


def test_torchrun_two_process_smoke(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "samclip.py",
           "--smoke", f"--out={out}", "--n_train=200", "--n_test=50", "--clip_steps=4", "--sam_steps=4",
           "--stage1_steps=2", "--stage2_steps=4", "--n_probe=50", "--probe_steps=5", "--replay_ratio=0.5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["world_size"] == 2 and "merged_sam_miou" in res and "zoo_dense_miou" in res
