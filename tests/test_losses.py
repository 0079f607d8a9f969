"""Tests for common/losses.py: analytic values, open_clip reference values, a direct SigLIP formula, and the
2-process gloo equivalence (loss and parameter gradients) with the single-process loss on the concatenated batch.

Run as a script (`python tests/test_losses.py OUT_DIR` with torchrun-like env vars) it is the distributed worker."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common.losses import clip_loss, distill_kl, fp32_logits, gather_features, siglip_loss  # noqa: E402

W, B, DIN, D = 2, 4, 12, 6   # world size, local batch, input dim, feature dim


def test_clip_loss_identity_analytic():
    # each row: logits 10 on the diagonal, 0 elsewhere -> CE = log(1 + 3 e^-10) in both directions
    want = math.log(1 + 3 * math.exp(-10))                       # 1.3619e-4
    e = torch.eye(4, dtype=torch.float64)
    assert abs(clip_loss(e, e, 10.0).item() - want) < 1e-12
    # fp32: logsumexp(10 + ...) - 10 loses ~1 ulp of 10 (open_clip's fp32 value is 1.3625e-4)
    assert abs(clip_loss(e.float(), e.float(), 10.0).item() - want) < 1e-6


def test_siglip_loss_identity_analytic():
    e = torch.eye(4, dtype=torch.float64)
    want = math.log(2) + 3 * math.log(1 + math.exp(-10))         # 0.693283
    assert abs(siglip_loss(e, e, 10.0, -10.0).item() - want) < 1e-12
    assert abs(siglip_loss(e.float(), e.float(), 10.0, -10.0).item() - want) < 1e-6


def test_openclip_reference_values():
    # computed with open_clip 3.3.0 ClipLoss / SigLipLoss on these seed-0 features
    torch.manual_seed(0)
    i = F.normalize(torch.randn(8, 16), dim=-1)
    t = F.normalize(torch.randn(8, 16), dim=-1)
    assert abs(clip_loss(i, t, 1 / 0.07).item() - 4.22906) < 1e-4
    assert abs(siglip_loss(i, t, 10.0, -10.0).item() - 8.98586) < 1e-4


def test_clip_loss_direct_formula_and_grad():
    torch.manual_seed(1)
    i = F.normalize(torch.randn(5, 7), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(5, 7), dim=-1).requires_grad_()
    s = torch.tensor(3.0, requires_grad=True)
    # explicit softmax CE written with loops
    want = 0.0
    for a in range(5):
        row = [s * (i[a] @ t[b]) for b in range(5)]
        col = [s * (t[a] @ i[b]) for b in range(5)]
        want = want - (row[a] - torch.logsumexp(torch.stack(row), 0)) - (col[a] - torch.logsumexp(torch.stack(col), 0))
    want = want / 10
    got = clip_loss(i, t, s)
    assert torch.allclose(got, want, atol=1e-6)
    g1 = torch.autograd.grad(got, (i, t, s))
    g2 = torch.autograd.grad(want, (i, t, s))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)


def test_siglip_loss_direct_formula():
    torch.manual_seed(2)
    i = F.normalize(torch.randn(6, 5), dim=-1)
    t = F.normalize(torch.randn(6, 5), dim=-1)
    s, b = 7.0, -3.0
    want = 0.0
    for a in range(6):
        for c in range(6):
            z = 1.0 if a == c else -1.0
            want -= math.log(1 / (1 + math.exp(-z * (s * float(i[a] @ t[c]) + b))))
    assert abs(siglip_loss(i, t, s, b).item() - want / 6) < 1e-5
    # a matching pair pulled together lowers the loss
    assert siglip_loss(i, i, s, b).item() < siglip_loss(i, t, s, b).item()


def _bf16_features(seed=3, N=16, D=32):
    g = torch.Generator().manual_seed(seed)
    f = lambda: F.normalize(torch.randn(N, D, generator=g), dim=-1).bfloat16().requires_grad_()  # noqa: E731
    return f(), f()


def test_logits_are_fp32_under_autocast():
    """bf16 features from an autocast region, losses called inside it: the result is the fp32 computation on the
    exactly upcast features, to fp32 precision. A bf16 matmul (what autocast does to a plain `s * a @ b.T`, and what
    these losses did before) puts the logits off by 4e-3 and the losses by 9e-5 (CLIP) and 8e-4 (SigLIP) relative here,
    ~100x and more this test's tolerance; the old losses also came back in bf16 (SigLIP)."""
    i, t = _bf16_features()
    s, b = torch.tensor(50.0), torch.tensor(-10.0)        # CLIP's learned scale ends near 100
    ref_z = s * i.detach().float() @ t.detach().float().T   # outside autocast: fp32
    ref_c = clip_loss(i.float(), t.float(), s)
    ref_s = siglip_loss(i.float(), t.float(), s, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (s * i.float() @ t.float().T).dtype == torch.bfloat16   # the trap: autocast re-casts an fp32 matmul
        z = fp32_logits(i, t, s)
        c = clip_loss(i, t, s)
        sg = siglip_loss(i, t, s, b)
    assert z.dtype == c.dtype == sg.dtype == torch.float32
    torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, ref_c, rtol=1e-6, atol=0)
    torch.testing.assert_close(sg, ref_s, rtol=1e-6, atol=0)
    gi, gt = torch.autograd.grad(c + sg, (i, t))
    assert gi.dtype == gt.dtype == torch.bfloat16          # gradients come back in the features' own dtype


def test_fp32_logits_linear_head_and_fp64():
    g = torch.Generator().manual_seed(4)
    f, Wt, bias = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    torch.testing.assert_close(fp32_logits(f, Wt, bias=bias), F.linear(f, Wt, bias))
    assert fp32_logits(f.double(), Wt.double()).dtype == torch.float64   # fp64 is never downcast


def test_distill_kl_formula_temperature_and_autocast():
    g = torch.Generator().manual_seed(5)
    s, t, T = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g) * 3, 2.0
    p, q = (t / T).softmax(-1), (s / T).softmax(-1)
    want = T * T * (p * (p.log() - q.log())).sum(-1).mean()       # T^2 KL(p || q), mean over rows
    torch.testing.assert_close(distill_kl(s, t, T), want, rtol=1e-6, atol=1e-7)
    assert distill_kl(t, t, T).abs().item() < 1e-6
    sb = s.bfloat16().requires_grad_()
    tr = t.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = distill_kl(sb, tr, T)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, distill_kl(sb.detach().float(), t, T), rtol=1e-6, atol=0)
    got.backward()
    assert sb.grad.dtype == torch.bfloat16 and tr.grad is None   # the teacher gets no gradient


def test_gather_identity_without_dist():
    x = torch.randn(3, 2)
    y, r = gather_features(x)
    assert y is x and r == 0


# ---------------------------------------------------------------------------------------------------------------
# distributed equivalence

def _problem():
    """A tiny linear two-tower model and a batch of W*B pairs, identical in every process."""
    g = torch.Generator().manual_seed(0)
    xi, xt = torch.randn(W * B, DIN, generator=g), torch.randn(W * B, DIN, generator=g)
    wi = torch.randn(DIN, D, generator=g).requires_grad_()
    wt = torch.randn(DIN, D, generator=g).requires_grad_()
    s = torch.tensor(2.0, requires_grad=True)      # logit scale (log)
    b = torch.tensor(-1.0, requires_grad=True)     # siglip bias
    return xi, xt, [wi, wt, s, b]


def _losses(xi, xt, params):
    wi, wt, s, b = params
    fi, ft = F.normalize(xi @ wi, dim=-1), F.normalize(xt @ wt, dim=-1)
    return clip_loss(fi, ft, s.exp()), siglip_loss(fi, ft, s.exp(), b)


def _grads(loss, params):
    return [g if g is not None else torch.zeros_like(p) for g, p in
            zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]


def _worker(out_dir):
    """One rank: local half of the batch, DDP-style gradient mean (all-reduce sum / W); rank 0 saves results."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    dist.init_process_group("gloo")
    r, ws = dist.get_rank(), dist.get_world_size()
    xi, xt, params = _problem()
    sl = slice(r * B, (r + 1) * B)
    lc, ls = _losses(xi[sl], xt[sl], params)
    out = {}
    for name, loss in (("clip", lc), ("siglip", ls)):
        grads = _grads(loss, params)
        for k, g in enumerate(grads):
            dist.all_reduce(g)
            out[f"{name}_grad{k}"] = g / ws
        lv = loss.detach().clone()
        dist.all_reduce(lv)
        out[f"{name}_loss"] = lv / ws
    if r == 0:
        save_file({k: v.contiguous() for k, v in out.items()}, str(Path(out_dir) / "dist.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    from safetensors.torch import load_file
    port = _free_port()
    procs = []
    for r in range(W):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(W), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(tmp_path)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out.decode()[-3000:]
    got = load_file(str(tmp_path / "dist.safetensors"))
    xi, xt, params = _problem()
    lc, ls = _losses(xi, xt, params)                 # single process, concatenated batch
    for name, loss in (("clip", lc), ("siglip", ls)):
        assert torch.allclose(got[f"{name}_loss"], loss.detach(), atol=1e-6), name
        for k, g in enumerate(_grads(loss, params)):
            assert g.abs().sum() > 0 or (name, k) == ("clip", 3)     # clip_loss has no bias
            assert torch.allclose(got[f"{name}_grad{k}"], g, atol=1e-6, rtol=1e-5), (name, k)


if __name__ == "__main__":
    _worker(sys.argv[1])
