"""common.eval: metrics on hand-computed cases, probes that must separate informative from random features."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.eval import (dense_probe, depth_rmse, extract_features, knn_accuracy, linear_probe, retrieval_recall,
                         seg_miou, zero_shot_accuracy, zero_shot_classifier)


@pytest.fixture(autouse=True)
def one_thread():
    """OpenMP threads spin when the 2 shared cores are oversubscribed (~30x slower); one thread is fastest here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_seg_miou_hand_computed():
    target = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 2, 1]])
    # class 0: TP 3, FP 0, FN 1 -> 3/4; class 1: TP 3, FP 1, FN 1 -> 3/5; class 2: TP 0, FP 1, FN 0 -> 0
    # class 3 absent in both -> skipped
    assert seg_miou(pred, target, num_classes=4) == pytest.approx((3 / 4 + 3 / 5 + 0) / 3)
    # accumulated over the dataset, not averaged per image
    t2 = np.stack([target, np.zeros_like(target)])
    p2 = np.stack([pred, np.zeros_like(pred)])
    # class 0: TP 3+8, FN 1 -> 11/12; class 1: 3/5; class 2: 0
    assert seg_miou(p2, t2, 4) == pytest.approx((11 / 12 + 3 / 5) / 3)
    assert seg_miou(target, target, 4) == 1.0
    # ignoring target class 1 drops its 4 pixels: class 0 -> 3/4, class 1 only FP -> 0, class 2's FP pixel was on a
    # dropped pixel -> absent
    assert seg_miou(pred, target, 4, ignore_index=1) == pytest.approx((3 / 4 + 0) / 2)


def test_depth_rmse_hand_computed():
    t = torch.tensor([[1.0, 2.0], [0.0, float("nan")]])  # 0 and NaN are invalid pixels
    p = torch.tensor([[2.0, 4.0], [100.0, 100.0]])
    assert depth_rmse(p, t) == pytest.approx(math.sqrt((1 + 4) / 2))
    assert depth_rmse(p, t, valid=torch.tensor([[True, False], [True, True]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ"):
        depth_rmse(p[:1], t)


def test_retrieval_recall_hand_computed():
    # 3 pairs; image 0 -> text 0 best, image 1 -> text 1 ranked 2nd, image 2 -> text 2 ranked 3rd
    img = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = retrieval_recall(img, txt, ks=(1, 2, 3))
    # sim rows: i0 [1, 0, 0]; i1 [.6, .8, 0]; i2 [1, 0, 0] -> diagonal ranks 0, 0, 2
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    # columns: t0 vs images [1, .6, 1] correct i0 rank 0; t1 [0, .8, 0] rank 0; t2 [0, 0, 0] all tie -> index order
    # puts i0, i1 before i2 -> rank 2
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert r["mean_r1"] == pytest.approx(2 / 3)
    assert r["mean_recall"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # ties: identical features everywhere -> image i ranks its caption at position i
    r = retrieval_recall(torch.ones(4, 2), torch.ones(4, 2), ks=(1, 2))
    assert r["i2t_r1"] == 0.25 and r["i2t_r2"] == 0.5
    # random features with perfect pairing
    x = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert retrieval_recall(x, x)["mean_r1"] == 1.0


def test_knn_hand_computed():
    tr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    ytr = torch.tensor([0, 0, 1, 1, 1])
    te = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    yte = torch.tensor([0, 1])
    assert knn_accuracy(tr, ytr, te, yte, k=1) == 1.0
    # k=5 plain majority: everyone sees 3 votes for class 1 -> test 0 wrong
    assert knn_accuracy(tr, ytr, te, yte, k=5, weighted=False) == 0.5
    # weighted (T = 0.07): the two near class-0 points dominate for test 0
    assert knn_accuracy(tr, ytr, te, yte, k=5, weighted=True) == 1.0


def test_zero_shot_accuracy_and_classifier():
    cls = torch.eye(3)
    img = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.9], [1.0, 0.0, 1.1]])
    y = torch.tensor([0, 2, 1, 0])
    assert zero_shot_accuracy(img, cls, y) == 0.75
    assert zero_shot_accuracy(img, cls, y, k=2) == 1.0

    class Fake(nn.Module):  # encode_text: the embedding of a prompt is a fixed vector per word
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def encode_text(self, tok, normalize=True):
            return tok.float()

    def tok(texts):  # "a {} photo." -> [len(class), is "photo", 1] (prompts differ -> ensemble matters)
        return torch.tensor([[len(t.split()[1]), 3.0 * ("photo" in t), 1.0] for t in texts])

    C = zero_shot_classifier(Fake(), tok, ["ab", "abcd"], ["a {} photo.", "a {} drawing."])
    e = lambda v: F.normalize(torch.tensor(v), dim=0)  # noqa: E731
    want0 = F.normalize((e([2.0, 3, 1]) + e([2.0, 0, 1])) / 2, dim=0)
    assert C.shape == (2, 3) and torch.allclose(C[0], want0, atol=1e-6)
    assert torch.allclose(C.norm(dim=-1), torch.ones(2))


def _blobs(n, d=16, c=4, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(c, (n,), generator=g)
    return mu[y] + noise * torch.randn(n, d, generator=g), y


def test_linear_probe_and_knn_separate_signal_from_noise():
    xtr, ytr = _blobs(400)
    xte, yte = _blobs(200, seed=1)
    acc = linear_probe(xtr, ytr, xte, yte, epochs=100)
    assert acc > 0.9
    assert linear_probe(xtr, ytr, xte, yte, epochs=100) == acc  # deterministic
    noise = torch.randn(400, 16, generator=torch.Generator().manual_seed(5))
    assert linear_probe(noise, ytr, torch.randn(200, 16), yte, epochs=100) < 0.5
    assert knn_accuracy(xtr, ytr, xte, yte, k=10) > 0.9
    # minibatch path
    assert linear_probe(xtr, ytr, xte, yte, epochs=20, batch_size=64) > 0.9


def test_linear_probe_returns_a_head_that_reproduces_its_accuracy():
    xtr, ytr = _blobs(400)
    xte, yte = _blobs(200, seed=1)
    acc, head = linear_probe(xtr, ytr, xte, yte, epochs=50, return_head=True)
    logits = head(xte)
    assert logits.shape == (200, 4)
    assert (logits.argmax(1) == yte).float().mean().item() == acc  # same standardisation + weights
    assert acc == linear_probe(xtr, ytr, xte, yte, epochs=50)


def test_extract_features_batches_and_converts():
    imgs = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    f = extract_features(lambda x: x.mean(dim=(2, 3)), imgs, batch_size=3)
    want = torch.from_numpy(imgs).float().div(255).mean(dim=(1, 2))
    assert f.shape == (10, 3) and torch.allclose(f, want, atol=1e-6)


def _scenes(n, seed):
    """16x16 images of 4x4 patches; each patch has a class (0..2) and a depth; patch features encode them."""
    g = np.random.default_rng(seed)
    cls = g.integers(0, 3, (n, 4, 4))
    dep = 1.0 + cls * 2.0 + g.random((n, 4, 4)) * 0.1
    seg = cls.repeat(4, 1).repeat(4, 2)
    depth = dep.repeat(4, 1).repeat(4, 2).astype(np.float32)
    img = (np.stack([seg * 80] * 3, -1)).astype(np.uint8)
    return img, seg, depth


def _patch_fn(x):
    """(B, 3, 16, 16) -> tokens (B, 16, 8): one-hot of the patch's class (read back from the pixels) + noise."""
    c = (x[:, 0, ::4, ::4] * 255 / 80).round().long().clamp(0, 2)
    f = F.one_hot(c.flatten(1), 8).float()
    return f + 0.05 * torch.randn(f.shape, generator=torch.Generator().manual_seed(int(c.sum())))


def test_dense_probe_learns_seg_and_depth():
    tr = _scenes(64, 0)
    te = _scenes(16, 1)
    r = dense_probe(_patch_fn, *tr, *te, num_classes=3, steps=150)
    assert r["miou"] > 0.8
    assert r["depth_rmse"] < 1.0  # depth spans 1..5 (mean prediction ~1.6); bilinear blur at patch borders costs
    # random features: the probe cannot do better than chance-level
    rnd = dense_probe(lambda x: torch.randn(len(x), 16, 8, generator=torch.Generator().manual_seed(len(x))),
                      *tr, *te, num_classes=3, steps=150)
    assert rnd["miou"] < 0.5 and rnd["depth_rmse"] > 1.2
    # label_fraction: fewer labelled images still trains (and uses the seeded subset deterministically)
    a = dense_probe(_patch_fn, *tr, *te, num_classes=3, steps=50, label_fraction=0.25)
    b = dense_probe(_patch_fn, *tr, *te, num_classes=3, steps=50, label_fraction=0.25)
    assert a == b and a["miou"] > 0.5
    only_seg = dense_probe(_patch_fn, tr[0], tr[1], None, te[0], te[1], None, num_classes=3, steps=20)
    assert set(only_seg) == {"miou"}
