"""kernels/bce.py: fused linear + sigmoid BCE against F.binary_cross_entropy_with_logits(x @ W.T + b, t, "sum") / B.

Ground truth is fp64 autograd on the same (rounded) inputs; a result passes when, elementwise, its error is at most the
same-dtype torch error plus a small tolerance (Cut Cross-Entropy's criterion, reference §A3/C8). The chunked torch path
runs in this process; the Triton kernel runs under TRITON_INTERPRET=1 in one subprocess (the flag must be set before
triton is imported, and must not leak into other test files), with small blocks so odd shapes exercise every mask.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels.bce as kb  # noqa: E402

B, D, V, K = 37, 45, 1031, 6
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
CHUNK_V = B * 300 * 4      # -> 256-column vocabulary chunks: 1031 = 4 * 256 + 7 (last chunk 7 wide)
CHUNK_RV = B * 100 * 4     # -> rows split too: 14-row x 256-column chunks (14 + 14 + 9 rows)


def make(dtype=torch.float32, seed=0, B=B, D=D, V=V, K=K):
    """Inputs whose logits span roughly [-8, 6]; sparse targets with -1 padding, two empty rows, one duplicate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    W = torch.randn(V, D, generator=g) * 2 * D ** -0.5
    b = torch.randn(V, generator=g) - 2
    idx = torch.randint(0, V, (B, K), generator=g)
    idx[:, K // 2:] = torch.where(torch.rand(B, K - K // 2, generator=g) < 0.5, -1, idx[:, K // 2:])
    idx[0] = -1                 # rows with no positive label
    idx[B // 2] = -1
    idx[1, 1] = idx[1, 0]       # a duplicate counts once
    idx[2, 0] = V - 1           # the last column (last, narrowest chunk)
    return x.to(dtype), W.to(dtype), b.to(dtype), idx


def dense(idx, V=V, dtype=torch.float32):
    t = torch.zeros(idx.shape[0], V)
    t.scatter_add_(1, idx.clamp_min(0), (idx >= 0).float()).clamp_max_(1)
    return t.to(dtype)


def run(fn, x, W, b, targets, reduction="batch_mean", g=1.0, **kw):
    """Loss and grads of x, W, b for fn(x, W, b, targets) scaled by the upstream gradient g."""
    x, W = x.clone().requires_grad_(), W.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    loss = fn(x, W, b, targets, reduction, **kw)
    (loss * g).backward()
    return [loss.detach()] + [p.grad if p is not None else None for p in (x, W, b)]


def torch_ref(x, W, b, t, reduction="batch_mean"):
    z = x @ W.t()
    if b is not None:
        z = z + b
    loss = F.binary_cross_entropy_with_logits(z, t.to(z.dtype), reduction="sum")
    return loss / {"batch_mean": x.shape[0], "sum": 1, "mean": z.numel()}[reduction]


def errors(out, x, W, b, idx, reduction="batch_mean", g=1.0):
    """Max of (|out - gt| - |same - gt|) / max|gt| per output: <= TOL[dtype] passes. Also returns |out - gt| / max|gt|."""
    dt = x.dtype
    up = lambda a: a.double() if a is not None else None  # noqa: E731
    gt = run(torch_ref, up(x), up(W), up(b), dense(idx, dtype=torch.float64), reduction, g)
    same = run(torch_ref, x, W, b, dense(idx, dtype=dt), reduction, g)
    res = {}
    for name, o, t, s in zip(("loss", "dx", "dW", "db"), out, gt, same):
        if t is None:
            assert o is None, name
            continue
        assert o is not None and o.shape == t.shape, name
        assert o.dtype == (torch.float32 if name == "loss" else dt), (name, o.dtype)
        scale = t.abs().max().item()
        excess = ((o.double() - t).abs() - (s.double() - t).abs()).max().item() / scale
        res[name] = (excess, (o.double() - t).abs().max().item() / scale)
    return res


def assert_ok(res, dtype):
    bad = {k: v for k, v in res.items() if not v[0] <= TOL[dtype]}
    assert not bad, f"beyond same-dtype torch error + {TOL[dtype]} (excess, rel err): {bad}"


@pytest.fixture(autouse=True)
def torch_impl():
    kb.IMPL = "torch"
    yield
    kb.IMPL = "auto"


# ----------------------------------------------------------------------------- chunked torch path (in process)

def test_chunk_shape_budget():
    assert kb.chunk_shape(37, 1031, 1 << 30) == (37, 1031)
    assert kb.chunk_shape(37, 1031, CHUNK_V) == (37, 256)
    assert kb.chunk_shape(37, 1031, CHUNK_RV) == (14, 256)
    for Bq, Vq, mb in [(1024, 24320, 64), (4096, 24320, 16), (10 ** 6, 24320, 64), (3, 7, 0)]:
        R, Vc = kb.chunk_shape(Bq, Vq, mb << 20)
        assert 1 <= R <= Bq and 1 <= Vc <= Vq
        assert R * Vc * 4 <= max(mb << 20, 4 * min(Vq, 256)), (Bq, Vq, R, Vc)
    # a budget, not Liger's cdiv(V, D) rule (which gives 32 rows at CatLIP shapes): 64 MiB -> all 1024 rows
    assert kb.chunk_shape(1024, 24320, 64 << 20) == (1024, 16384)


@pytest.mark.parametrize("kind", ["dense", "bool", "sparse"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [CHUNK_V, CHUNK_RV])
def test_torch_path_fp32(kind, bias, chunk):
    x, W, b, idx = make(seed=1)
    b = b if bias else None
    t = {"dense": dense(idx), "bool": dense(idx).bool(), "sparse": idx}[kind]
    out = run(kb.linear_bce, x, W, b, t, g=1.7, chunk_bytes=chunk)
    assert_ok(errors(out, x, W, b, idx, g=1.7), torch.float32)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_torch_path_reductions(reduction):
    x, W, b, idx = make(seed=2)
    out = run(kb.linear_bce, x, W, b, idx, reduction, g=-0.3, chunk_bytes=CHUNK_V)
    assert_ok(errors(out, x, W, b, idx, reduction, g=-0.3), torch.float32)


def test_torch_path_fp16():
    x, W, b, idx = make(torch.float16, seed=3)
    out = run(kb.linear_bce, x, W, b, idx, g=2.5, chunk_bytes=CHUNK_RV)
    assert_ok(errors(out, x, W, b, idx, g=2.5), torch.float16)


def test_dense_and_sparse_agree_and_duplicates_count_once():
    x, W, b, idx = make(seed=4)
    a = run(kb.linear_bce, x, W, b, dense(idx), chunk_bytes=CHUNK_V)
    s = run(kb.linear_bce, x, W, b, idx, chunk_bytes=CHUNK_V)
    dup = torch.cat([idx, idx[:, :2]], 1)   # every row repeats two of its labels (and padding)
    d = run(kb.linear_bce, x, W, b, dup, chunk_bytes=CHUNK_V)
    for p, q, r in zip(a, s, d):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_result():
    x, W, b, idx = make(seed=5)
    full = run(kb.linear_bce, x, W, b, idx, chunk_bytes=1 << 30)
    for c in (CHUNK_V, CHUNK_RV, 1):   # 1 byte: one row x 256 columns per chunk
        for p, q in zip(run(kb.linear_bce, x, W, b, idx, chunk_bytes=c), full):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_no_positive_labels_and_extreme_logits():
    x, W, b, idx = make(seed=6)
    idx[:] = -1
    W = W * 40   # logits of a few hundred: exp overflows in a naive formula
    out = run(kb.linear_bce, x, W, b, idx, chunk_bytes=CHUNK_V)
    assert all(torch.isfinite(o).all() for o in out)
    assert_ok(errors(out, x, W, b, idx), torch.float32)
    z = (x.double() @ W.double().t() + b.double())
    torch.testing.assert_close(out[0].double(), F.softplus(z).sum() / B, rtol=1e-5, atol=0)


def test_upstream_grad_scales_and_only_needed_grads():
    x, W, b, idx = make(seed=7)
    one = run(kb.linear_bce, x, W, b, idx)
    three = run(kb.linear_bce, x, W, b, idx, g=-3.0)
    for p, q in zip(one[1:], three[1:]):
        torch.testing.assert_close(q, -3.0 * p)
    Wq = W.clone().requires_grad_()   # x and b frozen: only dW
    kb.linear_bce(x, Wq, b, idx).backward()
    torch.testing.assert_close(Wq.grad, one[2])
    with torch.no_grad():
        torch.testing.assert_close(kb.linear_bce(x, W, b, idx), one[0])


def test_backward_twice_raises():
    x, W, b, idx = make(seed=8)
    loss = kb.linear_bce(x.requires_grad_(), W, b, idx)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_name_the_problem():
    x, W, b, idx = make(seed=9)
    with pytest.raises(ValueError, match="sparse target indices"):
        kb.linear_bce(x, W, b, idx.clamp_max(V - 1) + 1)          # V itself is out of range
    with pytest.raises(ValueError, match="reduction"):
        kb.linear_bce(x, W, b, idx, reduction="avg")
    with pytest.raises(ValueError, match="dense targets shape"):
        kb.linear_bce(x, W, b, dense(idx)[:, :-1])
    with pytest.raises(ValueError, match="bias shape"):
        kb.linear_bce(x, W, b[:-1], idx)
    with pytest.raises(ValueError, match="bias shape"):
        kb.linear_bce(x, W, b.double(), idx)
    with pytest.raises(ValueError, match="uint8 targets are ambiguous"):
        kb.linear_bce(x, W, b, dense(idx).to(torch.uint8))


def test_autocast_bf16_cpu_close_to_fp32():
    x, W, b, idx = make(seed=10)
    ref = run(kb.linear_bce, x, W, b, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(kb.linear_bce, x, W, b, idx)
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.float32   # grads land on the fp32 params
    for p, q in zip(out, ref):
        assert (p - q).abs().max() <= 0.05 * q.abs().max()


def _bf16_autocast_case(seed):
    """catlip --amp=bf16: bf16 features from the autocast trunk, the head's fp32 weights. Returns the fused result
    under CPU bf16 autocast, the naive fp32 result on the bf16-rounded operands autocast feeds the GEMM (bf16 -> fp32
    is exact) and the naive fp32 result on the fp32-upcast inputs as given."""
    x, W, b, idx = make(seed=seed)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(kb.linear_bce, xb, W, b, idx)
    r16 = lambda a: a.bfloat16().float()  # noqa: E731
    exact = run(kb.naive_linear_bce, xb.float(), r16(W), r16(b), idx)
    upcast = run(kb.naive_linear_bce, xb.float(), W, b, idx)
    return out, exact, upcast


def test_autocast_bf16_activations_fp32_weights():
    out, exact, upcast = _bf16_autocast_case(seed=12)   # used to raise "x dtype torch.bfloat16 != weight dtype"
    assert out[0].dtype == torch.float32
    assert [o.dtype for o in out[1:]] == [torch.bfloat16, torch.float32, torch.float32]   # each parameter's own dtype
    # fp32 logits: the loss matches the fp32 computation on the same bf16 operands to fp32 precision (7e-8 here);
    # bf16 logits (the torch path before) miss it by ~1e-5
    assert abs(out[0].item() - exact[0].item()) <= 1e-6 * exact[0].item()
    # against the fp32-upcast inputs the difference is autocast rounding W and b to bf16 (9e-5), and the gradient
    # GEMMs run in bf16 (dZ rounded to bf16: ~4e-3 of the largest entry)
    assert abs(out[0].item() - upcast[0].item()) <= 1e-3 * upcast[0].item()
    for name, o, e, u in zip(("dx", "dW", "db"), out[1:], exact[1:], upcast[1:]):
        for ref in (e, u):
            assert (o.double() - ref.double()).abs().max() <= 2e-2 * ref.abs().max(), name


def test_naive_reference_matches_F():
    x, W, b, idx = make(seed=11)
    torch.testing.assert_close(kb.naive_linear_bce(x, W, b, idx), torch_ref(x, W, b, dense(idx)))


def test_import_without_triton_uses_torch_path():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels.bce as kb\n"
            "assert not kb.HAS_TRITON\n"
            "x = torch.randn(5, 16, requires_grad=True); W = torch.randn(40, 16)\n"
            "kb.linear_bce(x, W, None, torch.tensor([[1, -1]] * 5)).backward(); assert x.grad is not None\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- Triton kernel, interpreted

# (name, dtype, target kind, bias, fused GEMM?, chunk bytes, reduction, upstream grad)
CASES = [
    ("fp32-dense-bias-gemm", "float32", "dense", True, True, CHUNK_V, "batch_mean", 1.7),
    ("fp32-sparse-nobias-gemm-rowchunks", "float32", "sparse", False, True, CHUNK_RV, "batch_mean", -0.5),
    ("fp32-bool-bias-epilogue", "float32", "bool", True, False, CHUNK_V, "batch_mean", 1.0),
    ("fp32-sparse-bias-epilogue-sum", "float32", "sparse", True, False, CHUNK_V, "sum", 0.25),
    ("fp32-sparse-bias-gemm-mean", "float32", "sparse", True, True, 1 << 30, "mean", 3.0),
    ("fp16-sparse-bias-gemm", "float16", "sparse", True, True, CHUNK_V, "batch_mean", 2.5),
    ("fp16-dense-nobias-epilogue", "float16", "dense", False, False, CHUNK_RV, "batch_mean", 1.0),
]


def _interpreted_main():
    """Runs in the TRITON_INTERPRET=1 subprocess: every case's error dict, plus cross-path agreement, as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    kb.IMPL = "triton"
    kb.BLOCK_M, kb.BLOCK_N, kb.BLOCK_K = 16, 64, 16   # >= 16 (GPU dot minimum), 3 x 4-5 programs per chunk
    out = {}
    for name, dt, kind, bias, gemm, chunk, red, g in CASES:
        kb.TRITON_GEMM = gemm
        dtype = getattr(torch, dt)
        x, W, b, idx = make(dtype, seed=len(out) + 20)
        b = b if bias else None
        t = {"dense": dense(idx, dtype=dtype), "bool": dense(idx).bool(), "sparse": idx}[kind]
        res = run(kb.linear_bce, x, W, b, t, red, g, chunk_bytes=chunk)
        out[name] = {"dtype": dt, "errors": errors(res, x, W, b, idx, red, g)}
    # dense vs sparse vs duplicated sparse through the kernel, and kernel vs chunked torch path
    kb.TRITON_GEMM = True
    x, W, b, idx = make(seed=40)
    ref = run(kb.linear_bce, x, W, b, dense(idx), chunk_bytes=CHUNK_V)
    kb.IMPL = "torch"
    other = {"torch-path": run(kb.linear_bce, x, W, b, idx, chunk_bytes=CHUNK_V)}
    kb.IMPL = "triton"
    other["sparse"] = run(kb.linear_bce, x, W, b, idx, chunk_bytes=CHUNK_V)
    other["sparse-dup"] = run(kb.linear_bce, x, W, b, torch.cat([idx, idx[:, :3]], 1), chunk_bytes=CHUNK_V)
    for k, res in other.items():
        out["agree-" + k] = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(res, ref))
    # bf16 autocast through the kernel: fp32 accumulation of exactly-upcast bf16 operands = fp32 logits
    res, exact, _ = _bf16_autocast_case(seed=41)
    out["autocast-bf16"] = {"loss_rel": abs(res[0].item() - exact[0].item()) / exact[0].item(),
                            "dtypes": [str(o.dtype) for o in res]}
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    code = "import sys; sys.path.insert(0, 'tests'); import test_bce; test_bce._interpreted_main()"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, f"interpreted run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_triton_interpreted(interpreted, name):
    r = interpreted[name]
    assert_ok(r["errors"], getattr(torch, r["dtype"]))
    assert set(r["errors"]) >= {"loss", "dx", "dW"}


@pytest.mark.parametrize("other", ["torch-path", "sparse", "sparse-dup"])
def test_triton_interpreted_agrees(interpreted, other):
    assert interpreted["agree-" + other] < 1e-5


def test_triton_interpreted_autocast_bf16(interpreted):
    r = interpreted["autocast-bf16"]
    assert r["loss_rel"] <= 1e-6
    assert r["dtypes"] == ["torch.float32", "torch.bfloat16", "torch.float32", "torch.float32"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_cuda(dtype):
    """Compiled kernel at a CatLIP-like odd shape (tf32 off for fp32: the kernel uses ieee dots for fp32)."""
    kb.IMPL = "triton"
    x, W, b, idx = [a.cuda() for a in make(dtype, seed=50, B=300, D=200, V=5003, K=8)]
    out = run(kb.linear_bce, x, W, b, idx, g=1.3, chunk_bytes=300 * 2048 * 4)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    res = errors([o.cpu() if o is not None else None for o in out], *[a.cpu() for a in (x, W, b, idx)], g=1.3)
    bad = {k: v for k, v in res.items() if not v[0] <= tol}
    assert not bad, bad
