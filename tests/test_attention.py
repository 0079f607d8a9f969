"""kernels/attention.py: the Triton kernels under TRITON_INTERPRET=1 against PyTorch, dispatch, import without CUDA.

The interpreter is chosen when triton.jit runs, i.e. when kernels.attention is imported, so the kernel checks run in
ONE subprocess (this file with --worker, TRITON_INTERPRET=1 in its environment) that reports JSON; the other test files
keep whatever Triton mode their process has. Error budget per element, relative to the same-dtype PyTorch result
(CCE-style): |kernel - ref| <= FACTOR * |torch_same_dtype - ref| + TOL[dtype], with ref = SDPA in fp32 (fp64 for fp32
inputs), for the output and dq, dk, dv under a random (non-unit) upstream gradient.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FACTOR = 2.0
# bf16: the interpreted kernel rounds p to bf16 before p @ v like FA2 on a GPU, torch's CPU bf16 SDPA keeps it in fp32
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 3e-2}

# (B, H, N, D, causal, dtype, scale, blocks, noncontig): every N in {1, 50, 77, 197}, D in {32, 64}, causal/not,
# fp32/fp16 appears at least twice, plus D=16/128, bf16, B*H > 2, a custom scale, non-contiguous inputs, an exact block
# multiple, and block shapes like the CUDA configs (BLOCK_M > BLOCK_N with several masked steps in the causal band).
CASES = [
    (1, 2, 1, 32, False, "float32", None, None, False),
    (1, 2, 1, 64, True, "float16", None, None, False),
    (1, 2, 50, 32, True, "float32", None, None, False),
    (1, 2, 50, 64, False, "float16", None, None, False),
    (1, 2, 77, 64, True, "float16", None, None, True),   # text tower shape, inputs as (B, N, H, D) views
    (1, 2, 77, 32, False, "float32", None, None, False),
    (1, 2, 197, 64, False, "float16", None, None, False),  # ViT-B/16 shape
    (1, 2, 197, 32, True, "float32", None, {"fwd": (128, 32), "dkdv": (16, 64), "dq": (128, 64)}, False),
    (2, 3, 33, 16, True, "float16", None, {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}, False),
    (1, 1, 64, 128, False, "float32", 0.3, None, False),
    (1, 2, 50, 64, True, "bfloat16", None, None, False),
]


def case_id(c):
    B, H, N, D, causal, dt, scale, blocks, nc = c
    return (f"B{B}H{H}N{N}D{D}-{'causal' if causal else 'full'}-{dt}" + (f"-s{scale}" if scale else "")
            + ("-blocks" if blocks else "") + ("-noncontig" if nc else ""))


# ----------------------------------------------------------------------------------------------------------------------
# worker (runs in the TRITON_INTERPRET=1 subprocess)

def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def _check(case, A, scale_error=1.0, attn=None):
    B, H, N, D, causal, dt, scale, blocks, nc = case
    dt = getattr(torch, dt)
    g = torch.Generator().manual_seed(N * 1000 + D)
    if nc:  # (B, N, H, D) storage seen as (B, H, N, D): the layout the models produce before a .transpose(1, 2)
        q, k, v, do = (torch.randn(B, N, H, D, generator=g).to(dt).transpose(1, 2) for _ in range(4))
    else:
        q, k, v, do = (torch.randn(B, H, N, D, generator=g).to(dt) for _ in range(4))
    A.INTERPRET_BLOCKS = dict(blocks or {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)})
    s = (D ** -0.5 if scale is None else scale)
    attn = attn or (lambda q, k, v, causal, scale: A.attention(q, k, v, causal=causal, scale=scale))
    out = _fwd_bwd(lambda q, k, v: attn(q, k, v, causal, s * scale_error), q, k, v, do)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=s)
    rdt = torch.float64 if dt == torch.float32 else torch.float32
    ref = _fwd_bwd(sdpa, *(x.to(rdt) for x in (q, k, v, do)))
    tor = _fwd_bwd(sdpa, q, k, v, do)
    res = {}
    for name, a, r, t in zip(("o", "dq", "dk", "dv"), out, ref, tor):
        assert a.shape == r.shape and a.dtype == dt, (name, a.shape, a.dtype)
        ek, et = (a.to(rdt) - r).abs(), (t.to(rdt) - r).abs()
        excess = (ek - FACTOR * et - TOL[str(dt).split(".")[1]]).max().item()
        res[name] = {"excess": excess, "kernel_err": ek.max().item(), "torch_err": et.max().item(),
                     "finite": bool(torch.isfinite(a).all())}
    return res


def _no_cuda():
    """Make every torch.cuda entry point a kernel could reach on a CPU-only machine raise."""
    def boom(*a, **k):
        raise AssertionError("torch.cuda touched at import or on a CPU call")
    for name in ("is_available", "device_count", "current_device", "init", "get_device_name", "synchronize",
                 "device", "current_stream"):
        setattr(torch.cuda, name, boom)


def _worker(cases):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _no_cuda()  # also checks that import and interpreted CPU runs never touch CUDA
    A = importlib.import_module("kernels.attention")
    assert A._INTERPRET, "kernels.attention did not pick up TRITON_INTERPRET=1"
    A.IMPL = "triton"
    results = {}
    for c in cases:
        try:
            results[case_id(c)] = _check(c, A)
        except Exception as e:  # report, keep the other cases going
            results[case_id(c)] = {"error": f"{type(e).__name__}: {e}"}
    # the CUDA launch path (autotuner, grid = f(meta), the real config lists) with config i of every list, picked
    # through the prune hook so that the autotuner has nothing to time; warps/stages are ignored when interpreted
    prune = A._prune
    A._INTERPRET = False
    for i in range(6):
        A._TUNED.clear()
        A._prune = lambda configs, named_args, i=i, **kw: [configs[min(i, len(configs) - 1)]]
        try:
            case = (1, 1, 150, 32, i % 2 == 0, "float16", None, None, False)
            results[f"tuned-{i}"] = _check(case, A, attn=A._Attention.apply)
        except Exception as e:
            results[f"tuned-{i}"] = {"error": f"{type(e).__name__}: {e}"}
    A._INTERPRET, A._prune = True, prune
    A._TUNED.clear()
    # negative control: the same budget must reject a kernel whose softmax scale is off by 1%
    results["control"] = _check((1, 2, 50, 64, False, "float16", None, None, False), A, scale_error=1.01)
    print(json.dumps(results))


# ----------------------------------------------------------------------------------------------------------------------
# interpreted kernel checks

@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"interpreted worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference(interpreted, case):
    res = interpreted[case_id(case)]
    assert "error" not in res, res.get("error")
    for name in ("o", "dq", "dk", "dv"):
        r = res[name]
        assert r["finite"], f"{name}: non-finite values"
        assert r["excess"] <= 0, (f"{name}: kernel error {r['kernel_err']:.3e} exceeds {FACTOR} x torch error "
                                  f"{r['torch_err']:.3e} + tol by {r['excess']:.3e}")


@pytest.mark.parametrize("i", range(6))
def test_autotune_launch_path(interpreted, i):
    res = interpreted[f"tuned-{i}"]
    assert "error" not in res, res.get("error")
    assert all(res[n]["finite"] and res[n]["excess"] <= 0 for n in ("o", "dq", "dk", "dv")), res


def test_error_budget_rejects_wrong_scale(interpreted):
    assert max(interpreted["control"][n]["excess"] for n in ("o", "dq", "dk", "dv")) > 0


# ----------------------------------------------------------------------------------------------------------------------
# dispatch (in this process; no kernel runs)

@pytest.fixture
def A(monkeypatch):
    A = importlib.import_module("kernels.attention")
    monkeypatch.setattr(A, "IMPL", "auto")
    for name in ("is_available", "device_count", "current_device", "device"):  # CPU calls must not reach CUDA
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: pytest.fail("torch.cuda touched"))

    def boom(*a):
        raise AssertionError("the Triton path was taken")
    monkeypatch.setattr(A._Attention, "apply", boom)
    return A


def _qkv(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_cpu_auto_and_forced_torch_use_sdpa(A, impl):
    A.IMPL = impl
    q, k, v = _qkv(2, 3, 77, 32)
    assert not A.use_triton(q, k, v)
    o = A.attention(q, k, v, causal=True, scale=0.2)
    o.sum().backward()
    g = [x.grad.clone() for x in (q, k, v)]
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    o2 = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=0.2)
    o2.sum().backward()
    assert torch.equal(o, o2)
    assert all(torch.equal(a, b.grad) for a, b in zip(g, (q2, k2, v2)))


def test_unsupported_reasons(A):
    q, k, v = _qkv(1, 2, 10, 48)
    assert "D=48" in A.unsupported(q, k, v)
    q, k, v = _qkv(1, 2, 10, 32)
    assert "shape" in A.unsupported(q, k[:, :, :5], v)
    assert "dtype" in A.unsupported(q, k.half(), v)
    assert A.unsupported(*_qkv(1, 2, 0, 32)) is not None
    A.IMPL = "triton"
    with pytest.raises(ValueError, match="IMPL='triton' but head dim D=48"):
        A.attention(*_qkv(1, 2, 10, 48))
    A.IMPL = "fast"
    with pytest.raises(ValueError, match="expected 'auto', 'triton' or 'torch'"):
        A.attention(q, k, v)


def test_flop_model(A):
    assert A.flops(1, 1, 10, 8, False) == 4 * 100 * 8
    assert A.flops(1, 1, 10, 8, True) == 2 * 100 * 8
    assert A.flops(2, 3, 10, 8, False, "fwd+bwd") == 3.5 * 4 * 6 * 100 * 8


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # as on macOS: `import triton` raises ImportError
from tests.test_attention import _no_cuda
_no_cuda()
import importlib, torch
import kernels
A = importlib.import_module("kernels.attention")
q = torch.randn(1, 2, 5, 32, requires_grad=True)
A.attention(q, q, q, causal=True).sum().backward()
print(A.unsupported(q, q, q))
"""


def test_import_and_cpu_call_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _NO_TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "triton is not installed"


# ----------------------------------------------------------------------------------------------------------------------
# CUDA only: compiled kernels (autotuned configs, bf16, tf32-free fp32) against the same budget

@pytest.mark.cuda
@pytest.mark.parametrize("N,D,causal,dt", [(197, 64, False, "bfloat16"), (77, 64, True, "bfloat16"),
                                           (77, 64, True, "float16"), (1000, 128, False, "bfloat16"),
                                           (300, 128, True, "float16"), (50, 16, False, "float16"),
                                           (129, 32, True, "float32")])
def test_cuda_matches_reference(N, D, causal, dt):
    A = importlib.import_module("kernels.attention")
    dtype = getattr(torch, dt)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, 3, N, D, device="cuda", generator=g).to(dtype) for _ in range(4))
    A.IMPL = "triton"
    try:
        if dtype != torch.float32:
            assert A.use_triton(q, k, v)
        out = _fwd_bwd(lambda q, k, v: A.attention(q, k, v, causal=causal), q, k, v, do)
    finally:
        A.IMPL = "auto"
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    rdt = torch.float64 if dtype == torch.float32 else torch.float32
    ref = _fwd_bwd(sdpa, *(x.to(rdt) for x in (q, k, v, do)))
    tor = _fwd_bwd(sdpa, q, k, v, do)
    for name, a, r, t in zip(("o", "dq", "dk", "dv"), out, ref, tor):
        ek, et = (a.to(rdt) - r).abs(), (t.to(rdt) - r).abs()
        tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 2e-2}[dt]
        assert (ek <= FACTOR * et + tol).all(), f"{name}: max err {ek.max():.3e} vs torch {et.max():.3e}"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.path.insert(0, str(ROOT))
    _worker(CASES)


def test_impl_switch_is_a_module_attribute():
    """`kernels.attention` / `kernels.bce` are the modules (nothing re-exported over them), so setting IMPL there
    is what the dispatch reads."""
    import kernels
    import kernels.attention
    import kernels.bce
    assert kernels.attention is sys.modules["kernels.attention"] and kernels.bce is sys.modules["kernels.bce"]
    q = torch.randn(1, 1, 4, 16)
    kernels.attention.IMPL = "triton"
    try:
        if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
            with pytest.raises(ValueError, match="IMPL='triton'"):
                kernels.attention.attention(q, q, q)
    finally:
        kernels.attention.IMPL = "auto"
    assert kernels.attention.HAS_TRITON == kernels.bce.HAS_TRITON  # one spelling of the flag
