"""Fused scaled-dot-product attention in Triton (FlashAttention-2 forward and backward) with a PyTorch fallback.

    o = attention(q, k, v, causal=False, scale=None)      # q, k, v, o: (B, H, N, D)

FlashAttention-2 (Dao, arXiv 2307.08691): each program owns one block of queries (forward, dQ) or keys (dK/dV) and
streams the other side through SRAM with an online softmax, so the (N, N) score matrix never reaches HBM.

Preconditions of the Triton path (anything else goes to F.scaled_dot_product_attention in "auto" mode):
  - self-attention: q, k, v have the same shape (B, H, N, D), dtype and device; N >= 1, any N (masked tails);
  - D in {16, 32, 64, 128} (one power-of-two tile over the head dim, and K >= 16 for every tl.dot on NVIDIA);
  - fp16 / bf16 on CUDA; fp32 is accepted (dots then run in exact "ieee" fp32, not tf32, so it matches torch at
    fp32 precision but is slow: "auto" sends fp32 to SDPA); under TRITON_INTERPRET=1 CPU tensors work when
    IMPL = "triton" (bf16 dots are upcast to fp32 there because the interpreter's bf16 dot is wrong, triton#11584);
  - inputs (and the upstream gradient) are made contiguous at the boundary; no attention mask, bias or dropout;
  - causal means key j is visible to query i iff j <= i (top-left aligned, same as SDPA's is_causal for Nq == Nk).

FLOP model (what the benchmark counts): forward 4*B*H*N^2*D (two matmuls of 2*N^2*D per head), halved when causal;
backward 2.5x forward (five matmuls: recomputed q k^T, dV, dP, dQ, dK), so forward+backward = 3.5x forward. The split
backward below does q k^T and dP twice (once per kernel); the model does not count that extra work.

Switch: kernels.attention.IMPL = "auto" | "triton" | "torch" (a module attribute, read at every call).

How this differs from the Triton tutorial (python/tutorials/06-fused-attention.py):
  - any N: key/query tails are masked (the tutorial's backward asserts N % 128 == 0), only the tail/diagonal blocks pay
    for the masks; LSE and Delta are unpadded (B*H, N) fp32 buffers;
  - fp16, bf16 and fp32 everywhere (the tutorial's backward hard-codes fp16 casts);
  - non-causal backward (the image towers are bidirectional);
  - plain pointer arithmetic (block pointers were removed in Triton 3.9, descriptors need TMA/allocators);
  - backward = Delta pre-pass + a dK/dV kernel + a dQ kernel (no atomics, so autotuning reruns are idempotent);
  - the LSE is stored in base 2 (m + log2 l of the log2(e)-prescaled scores) so backward recomputes p = exp2(s - lse);
  - 1-D grid (query block fastest, then batch*head) with int64 batch*head offsets: no 65535 grid-dim limit and no
    int32 overflow for large B*H*N*D;
  - autotune only on CUDA (the autotuner needs a GPU driver); the interpreter gets fixed meta-parameters.
"""
import contextlib

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. macOS: the module still imports and attention() uses the PyTorch path
    HAS_TRITON = False

IMPL = "auto"  # "auto": Triton on CUDA when supported, else SDPA | "triton": always Triton | "torch": always SDPA
HEAD_DIMS = (16, 32, 64, 128)
# Fixed meta-parameters (BLOCK_M, BLOCK_N) for interpreted runs; asymmetric on purpose so the CPU tests exercise the
# same block-alignment logic as the CUDA configs (fwd/dQ: BLOCK_M % BLOCK_N == 0; dK/dV: BLOCK_N % BLOCK_M == 0).
INTERPRET_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels. Layout: contiguous (B*H, N, D) for q/k/v/o/do/dq/dk/dv, (B*H, N) fp32 for lse and delta.

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        # IEEE: fp32 inputs (exact fp32, NVIDIA would default to tf32) or bf16 under the interpreter (upcast first).
        if IEEE:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, K, V, lo, hi, offs_m, N, qk_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            kv = cols[:, None] * D + offs_d[None, :]
            if MASK:
                k = tl.load(K + kv, mask=cols[:, None] < N, other=0.0)
                v = tl.load(V + kv, mask=cols[:, None] < N, other=0.0)
            else:
                k = tl.load(K + kv)
                v = tl.load(V + kv)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE) * qk_scale
            if MASK:
                ok = cols[None, :] < N
                if CAUSAL:
                    ok = ok & (offs_m[:, None] >= cols[None, :])
                s = tl.where(ok, s, float("-inf"))
            # online softmax (FA2 Alg. 1): every row has seen a visible key by its first block, so m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, N, qk_scale,
                  D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(BLOCK_M % BLOCK_N == 0)
        n_m = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        start_m = (pid % n_m) * BLOCK_M
        bh = (pid // n_m).to(tl.int64)
        Q += bh * N * D
        K += bh * N * D
        V += bh * N * D
        O += bh * N * D
        LSE += bh * N
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < N
        qo = offs_m[:, None] * D + offs_d[None, :]
        q = tl.load(Q + qo, mask=m_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if CAUSAL:
            full_end = start_m  # key blocks left of the diagonal band: all keys < every query, all < N
            hi = tl.minimum(start_m + BLOCK_M, N)
        else:
            full_end = (N // BLOCK_N) * BLOCK_N
            hi = N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, 0, full_end, offs_m, N, qk_scale,
                                   D, BLOCK_M, BLOCK_N, CAUSAL, False, IEEE)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, full_end, hi, offs_m, N, qk_scale,
                                   D, BLOCK_M, BLOCK_N, CAUSAL, True, IEEE)
        tl.store(O + qo, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None])
        tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)

    @triton.jit
    def _bwd_delta(O, DO, DELTA, N, D: tl.constexpr, BLOCK_M: tl.constexpr):
        # Delta_i = sum_d O_id dO_id = sum_j P_ij dP_ij (FA2 Alg. 2 line 4), the softmax-backward row term
        n_m = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        bh = (pid // n_m).to(tl.int64)
        offs_m = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < N
        qo = bh * N * D + offs_m[:, None] * D + offs_d[None, :]
        o = tl.load(O + qo, mask=m_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + qo, mask=m_ok[:, None], other=0.0).to(tl.float32)
        tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, 1), mask=m_ok)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, lo, hi, offs_n, N, qk_scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
        # transposed formulation: rows are this program's keys, columns the streamed queries
        offs_d = tl.arange(0, D)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qo = offs_m[:, None] * D + offs_d[None, :]
            if MASK:
                m_ok = offs_m < N
                q = tl.load(Q + qo, mask=m_ok[:, None], other=0.0)
                do = tl.load(DO + qo, mask=m_ok[:, None], other=0.0)
                lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
            else:
                q = tl.load(Q + qo)
                do = tl.load(DO + qo)
                lse = tl.load(LSE + offs_m)
                delta = tl.load(DELTA + offs_m)
            sT = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE) * qk_scale
            pT = tl.math.exp2(sT - lse[None, :])
            if MASK:
                ok = offs_m[None, :] < N
                if CAUSAL:
                    ok = ok & (offs_m[None, :] >= offs_n[:, None])
                pT = tl.where(ok, pT, 0.0)
            dv = _dot(pT.to(do.dtype), do, dv, IEEE)
            dpT = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
            dsT = pT * (dpT - delta[None, :])
            dk = _dot(dsT.to(q.dtype), q, dk, IEEE)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, N, qk_scale, scale,
                       D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(BLOCK_N % BLOCK_M == 0)
        n_n = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        start_n = (pid % n_n) * BLOCK_N
        bh = (pid // n_n).to(tl.int64)
        Q += bh * N * D
        K += bh * N * D
        V += bh * N * D
        DO += bh * N * D
        DK += bh * N * D
        DV += bh * N * D
        LSE += bh * N
        DELTA += bh * N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        n_ok = offs_n < N
        kv = offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv, mask=n_ok[:, None], other=0.0)
        v = tl.load(V + kv, mask=n_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        if CAUSAL:
            # queries before start_n see none of these keys; the band [start_n, start_n + BLOCK_N) needs the mask
            band_end = tl.minimum(start_n + BLOCK_N, N)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, start_n, band_end, offs_n, N, qk_scale,
                                 D, BLOCK_M, BLOCK_N, CAUSAL, True, IEEE)
            full_end = tl.maximum(band_end, (N // BLOCK_M) * BLOCK_M)
        else:
            band_end = 0
            full_end = (N // BLOCK_M) * BLOCK_M
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, band_end, full_end, offs_n, N, qk_scale,
                             D, BLOCK_M, BLOCK_N, CAUSAL, False, IEEE)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, full_end, N, offs_n, N, qk_scale,
                             D, BLOCK_M, BLOCK_N, CAUSAL, True, IEEE)
        tl.store(DV + kv, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])
        tl.store(DK + kv, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None])

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, K, V, lo, hi, offs_m, N, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            kv = cols[:, None] * D + offs_d[None, :]
            if MASK:
                k = tl.load(K + kv, mask=cols[:, None] < N, other=0.0)
                v = tl.load(V + kv, mask=cols[:, None] < N, other=0.0)
            else:
                k = tl.load(K + kv)
                v = tl.load(V + kv)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if MASK:
                ok = cols[None, :] < N
                if CAUSAL:
                    ok = ok & (offs_m[:, None] >= cols[None, :])
                p = tl.where(ok, p, 0.0)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, IEEE)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, N, qk_scale, scale,
                     D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(BLOCK_M % BLOCK_N == 0)
        n_m = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        start_m = (pid % n_m) * BLOCK_M
        bh = (pid // n_m).to(tl.int64)
        Q += bh * N * D
        K += bh * N * D
        V += bh * N * D
        DO += bh * N * D
        DQ += bh * N * D
        LSE += bh * N
        DELTA += bh * N
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < N
        qo = offs_m[:, None] * D + offs_d[None, :]
        q = tl.load(Q + qo, mask=m_ok[:, None], other=0.0)
        do = tl.load(DO + qo, mask=m_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        if CAUSAL:
            full_end = start_m
            hi = tl.minimum(start_m + BLOCK_M, N)
        else:
            full_end = (N // BLOCK_N) * BLOCK_N
            hi = N
        dq = _dq_inner(dq, q, do, lse, delta, K, V, 0, full_end, offs_m, N, qk_scale,
                       D, BLOCK_M, BLOCK_N, CAUSAL, False, IEEE)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, full_end, hi, offs_m, N, qk_scale,
                       D, BLOCK_M, BLOCK_N, CAUSAL, True, IEEE)
        tl.store(DQ + qo, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])

    # The interpreter decides at decoration time (TRITON_INTERPRET read when triton.jit runs, i.e. at import).
    _INTERPRET = type(_attn_fwd).__name__ == "InterpretedFunction"
else:
    _INTERPRET = False


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration. On CUDA a small autotuned set per kernel (BLOCK constraints above hold in every config);
# interpreted runs call the bare kernels with INTERPRET_BLOCKS (autotune needs a GPU driver, triton#5570).

def _configs(pairs):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


def _prune(configs, named_args, **kwargs):
    # fp32 "ieee" dots run on the FMA units: big tiles spill (ptxas: ~29 KB at 128x64 on sm_80) and take minutes to
    # compile, so the (forced, slow) fp32 path tunes over the small tiles only
    if kwargs.get("IEEE", named_args.get("IEEE")):
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32] or configs[:1]
    return configs


_TUNED = {}


def _tuned(name):
    """The autotuned wrapper of a kernel, built on first CUDA use so that import never touches a driver."""
    if name not in _TUNED:
        if name == "fwd":  # (BLOCK_M queries, BLOCK_N keys per step)
            cfg = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                   (128, 128, 8, 2)]
            fn = _attn_fwd
        elif name == "dkdv":  # (BLOCK_M queries per step, BLOCK_N keys owned)
            cfg = [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 4, 2), (64, 128, 8, 2), (16, 64, 4, 3)]
            fn = _attn_bwd_dkdv
        else:  # dq: (BLOCK_M queries owned, BLOCK_N keys per step)
            cfg = [(64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 16, 4, 3)]
            fn = _attn_bwd_dq
        # cache_results: the timings go to Triton's disk cache, so later processes (every torchrun rank, every run)
        # skip the ~16 compile+time rounds per (N, D, causal, dtype)
        _TUNED[name] = triton.autotune(_configs(cfg), key=["N", "D", "CAUSAL", "IEEE"], cache_results=True,
                                       prune_configs_by={"early_config_prune": _prune})(fn)
    return _TUNED[name]


def _launch(name, fn, n_rows, N, *args, **const):
    """Launch `fn` on a 1-D grid of cdiv(N, BLOCK_rows) * B*H programs (BLOCK_rows = the block each program owns)."""
    own = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    if _INTERPRET or name == "delta":
        if name != "delta":
            const["BLOCK_M"], const["BLOCK_N"] = INTERPRET_BLOCKS[name]
        fn[(triton.cdiv(N, const[own]) * n_rows,)](*args, **const)
    else:
        _tuned(name)[lambda meta: (triton.cdiv(N, meta[own]) * n_rows,)](*args, **const)


def _device(t):
    """Triton launches on the current CUDA device: make it the tensors' one (several GPUs in one process)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _Attention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, N, D = q.shape
        o = torch.empty_like(q)
        lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
        ieee = q.dtype == torch.float32 or (_INTERPRET and q.dtype == torch.bfloat16)
        qk_scale = scale * 1.4426950408889634  # log2(e): the kernels use exp2
        with _device(q):
            _launch("fwd", _attn_fwd, B * H, N, q, k, v, o, lse, N, qk_scale, D=D, CAUSAL=causal, IEEE=ieee)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.ieee = causal, scale, ieee
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        B, H, N, D = q.shape
        delta = torch.empty_like(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qk_scale = ctx.scale * 1.4426950408889634
        const = dict(D=D, CAUSAL=ctx.causal, IEEE=ctx.ieee)
        with _device(q):
            _launch("delta", _bwd_delta, B * H, N, o, do, delta, N, D=D, BLOCK_M=64)
            _launch("dkdv", _attn_bwd_dkdv, B * H, N, q, k, v, do, lse, delta, dk, dv, N, qk_scale, ctx.scale,
                    **const)
            _launch("dq", _attn_bwd_dq, B * H, N, q, k, v, do, lse, delta, dq, N, qk_scale, ctx.scale, **const)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch

def unsupported(q, k, v):
    """Why the Triton kernel cannot take these inputs (a message), or None when it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not (q.dim() == 4 and q.shape == k.shape == v.shape):
        return f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    B, H, N, D = q.shape
    if D not in HEAD_DIMS:
        return f"head dim D={D} not in {HEAD_DIMS}"
    if q.numel() == 0:
        return f"empty input of shape {tuple(q.shape)}"
    if N * D >= 2**31:
        return f"N*D={N * D} overflows the kernel's int32 in-head offsets"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of fp16/bf16/fp32 for all three"
    if not (q.device == k.device == v.device):
        return f"devices differ: {q.device}, {k.device}, {v.device}"
    if q.device.type != "cuda" and not _INTERPRET:
        return f"tensors on {q.device} (the Triton path needs CUDA, or TRITON_INTERPRET=1 set before importing triton)"
    return None


def use_triton(q, k, v):
    """The "auto" rule: Triton for fp16/bf16 CUDA tensors it supports; everything else goes to SDPA."""
    # the device/dtype test comes first so that CPU calls never reach triton
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not _INTERPRET
            and unsupported(q, k, v) is None)


def attention(q, k, v, causal=False, scale=None):
    """Softmax(q k^T * scale [+ causal mask]) v. q, k, v: (B, H, N, D) -> (B, H, N, D); scale defaults to D^-0.5."""
    if IMPL not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels.attention.IMPL={IMPL!r}: expected 'auto', 'triton' or 'torch'")
    if IMPL == "torch" or (IMPL == "auto" and not use_triton(q, k, v)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    why = unsupported(q, k, v)
    if why is not None:
        raise ValueError(f"kernels.attention.IMPL='triton' but {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _Attention.apply(q, k, v, bool(causal), scale)


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark (`python -m kernels.bench attention`)

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 tensor-core peak (no sparsity)
BENCH_SHAPES = [  # (name, B, H, N, D, causal)
    ("vit-b16", 256, 12, 197, 64, False),
    ("text", 256, 8, 77, 64, True),
    ("long", 4, 16, 4096, 128, False),
]


def flops(B, H, N, D, causal, mode="fwd"):
    """The FLOP model of the file header; mode "fwd" or "fwd+bwd" (= 3.5x fwd)."""
    f = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def bench():
    """Time forward and forward+backward of the Triton kernel vs SDPA (flash backend) on CUDA; reference only on CPU."""
    if not torch.cuda.is_available():
        import time
        print("attention bench: no CUDA device, so the Triton kernel is not timed; PyTorch SDPA (CPU, fp32) only:")
        print(f"{'shape':>28} {'mode':>8} {'ms':>9} {'GFLOP/s':>9}")
        for B, H, N, D, causal in [(2, 12, 197, 64, False), (2, 8, 77, 64, True)]:
            q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
            do = torch.randn(B, H, N, D)
            for mode in ("fwd", "fwd+bwd"):
                def step():
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    if mode == "fwd+bwd":
                        o.backward(do)
                step()
                t0, reps = time.perf_counter(), 5
                for _ in range(reps):
                    step()
                ms = (time.perf_counter() - t0) / reps * 1e3
                name = f"B{B} H{H} N{N} D{D}" + (" causal" if causal else "")
                print(f"{name:>28} {mode:>8} {ms:9.2f} {flops(B, H, N, D, causal, mode) / ms / 1e6:9.1f}")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"attention bench on {torch.cuda.get_device_name()} ({dt}); TFLOP/s by the header's FLOP model; "
          f"peak = {PEAK_TFLOPS:.0f} TFLOP/s; speedup = SDPA time / Triton time")
    print(f"{'shape':>34} {'mode':>8} {'triton ms':>10} {'TFLOP/s':>8} {'sdpa ms':>9} {'TFLOP/s':>8} "
          f"{'speedup':>8} {'%peak':>6} {'max|diff|':>10}")
    for name, B, H, N, D, causal in BENCH_SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
        scale = D ** -0.5

        def tri():
            return _Attention.apply(q, k, v, causal, scale)

        def ref():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

        # agreement first: output and the three gradients, Triton vs SDPA flash
        diffs = []
        for fn in (tri, ref):
            q.grad = k.grad = v.grad = None
            o = fn()
            o.backward(do)
            diffs.append([o.detach(), q.grad, k.grad, v.grad])
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*diffs))
        for mode in ("fwd", "fwd+bwd"):
            ms = []
            for fn in (tri, ref):
                if mode == "fwd":
                    with torch.no_grad():
                        ms.append(triton.testing.do_bench(fn, return_mode="median"))
                else:
                    ms.append(triton.testing.do_bench(lambda: fn().backward(do), grad_to_none=[q, k, v],
                                                      return_mode="median"))
            tf = [flops(B, H, N, D, causal, mode) / t / 1e9 for t in ms]
            label = f"{name} B{B} H{H} N{N} D{D}" + (" causal" if causal else "")
            print(f"{label:>34} {mode:>8} {ms[0]:10.3f} {tf[0]:8.1f} {ms[1]:9.3f} {tf[1]:8.1f} "
                  f"{ms[1] / ms[0]:7.2f}x {100 * tf[0] / PEAK_TFLOPS:5.1f}% {diff:10.2e}")
        del q, k, v, do, diffs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    bench()
