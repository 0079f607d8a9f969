"""Fused linear + sigmoid binary cross-entropy over a large vocabulary (CatLIP's classification head).

    loss = sum_{i,j} bce(z_ij, t_ij) / B,   z = x @ W^T + b,   x (B, D), W (V, D), b (V,), t (B, V) multi-hot

CatLIP (arXiv 2404.15653) trains the image tower as a multi-label classifier over V ~ 24k WordNet synsets with
BCE-with-logits summed over classes and divided by the batch ("batch_mean"). The naive path writes the B x V logits, the
B x V elementwise BCE and the B x V logit gradient; this module never holds more than one chunk of them.

Preconditions (what makes the fusion legal)
- The loss is terminal: its upstream gradient is a scalar. So the gradients are computed *during the forward*, chunk by
  chunk (dZ = (sigmoid(z) - t) * s, s = 1/B for batch_mean), stored, and backward only multiplies them by grad_output
  (Liger FLCE / llm.c classifier_fused.cu trick). backward may run once per forward (no retain_graph double backward).
- Sigmoid-BCE has no per-row normaliser (unlike softmax CE: no log-sum-exp), so loss and dZ are tile-local: any chunk of
  rows x vocab can be finished independently (reference §A4).
- targets: dense multi-hot (B, V) float/bool, or sparse positive indices (B, K) int padded with -1. In the sparse path the
  dense target never exists. Duplicate indices in a row count once (a label is either positive or not): the torch path
  dedupes, the Triton path tests membership, which is idempotent. Rows with no positive label are fine.
- x (B, D) and W (V, D) share a dtype (fp32, fp16, bf16); b is None or (V,). The logits are accumulated and kept in
  fp32 on every path (a bf16 logit has 8 significant bits; the loss and dZ are computed from fp32 z), and the loss
  comes back in fp32. Under torch.autocast, x, W and b are first cast to the autocast dtype, as autocast does for a
  linear layer's operands, so bf16 activations from an autocast trunk meet the head's fp32 weights; the checks run
  after that cast, and the gradients flow back through it in each input's own dtype.
- Chunks are sized by a memory budget (CHUNK_MB of fp32 logits on CUDA, CPU_CHUNK_MB on CPU), not by Liger's
  cdiv(V, D) rule (which gives 32-row chunks, too thin for a GEMM, at CatLIP shapes). Vocabulary chunks are preferred:
  dW[chunk] is then written once and only dX (B x D, small) is accumulated; rows are split as well when one vocabulary
  chunk of all B rows would not fit.

Cost model (B=1024, D=768, V=24320 per GPU in CatLIP)
- FLOP, forward + backward: 2BDV (z) + 2BDV (dX = dZ W) + 2BDV (dW = dZ^T x) = 6BDV = 1.15e11 -> 116 us at 989 TFLOP/s.
- Bytes per element of B x V (bf16 inputs), minimal unfused pipeline: logits write 2, BCE reads logits 2 + dense target
  2, writes dZ 2, the two backward GEMMs read dZ 2 + 2: 12 B = 0.30 GB at CatLIP shapes (~60 us at 4.8 TB/s on H200)
  plus one launch per step. The benchmark's naive path (fp32 BCE on upcast logits and target, as under autocast) moves
  ~3-4x that, and holds the fp32 logits, the upcast target and the fp32 dZ at once.
- Fused (Triton GEMM + epilogue): logits and targets never touch HBM (sparse targets are B x K ints); dZ in the input
  dtype is written once and read by the two cuBLAS GEMMs: 6 B = 0.15 GB. A fully fused backward (dX, dW accumulated
  from registers, CCE-style) would remove that too, at the price of atomics or a second pass; not done here.
- Memory: the fused path holds the gradients plus one chunk (CHUNK_MB fp32 logits, or half of it as a bf16 dZ chunk).

Paths (switch: kernels.bce.IMPL = "auto" | "triton" | "torch")
- "torch": chunked PyTorch (CPU, and CUDA without Triton). Per chunk, all in the logits buffer: addmm -> <z, t> (a gather
  for sparse targets) -> softplus in place, summed -> t - sigmoid(z) = expm1(-softplus) + t in place -> dX += s' G W,
  dW[chunk] = s' G^T x, db[chunk] = s' sum_rows G with s' = -1/B as the GEMMs' alpha (no extra pass for the scale).
- "triton": per chunk one Triton kernel computes the logits tile (tl.dot over D) and its epilogue in registers: BCE value
  partial sums (one per program, no atomics, deterministic), dZ tile (targets from a dense tile load or from a loop over the
  row's K sparse indices). dX and dW are then cuBLAS GEMMs of the dZ chunk. TRITON_GEMM = False instead runs a cuBLAS
  addmm for the logits chunk and the Triton kernel only as the fused epilogue (dZ written in place over z); that addmm
  is fp32 on upcast operands, for fp32 logits (a half-in, fp32-out GEMM, torch.mm(out_dtype=), is CUDA-only and
  recent), so this variant pays fp32 GEMM speed.
- "auto": Triton on CUDA when triton imports and dtype is fp32/fp16/bf16, torch otherwise.
Under TRITON_INTERPRET=1 the Triton path runs on CPU tensors (tests): operands are cast to fp32 before tl.dot (the
interpreter's bf16 dot is wrong, reference §A5), all offsets are int64 and every load/store is masked.

Run `python -m kernels.bench bce` (or bench() below) for the naive vs fused table.
"""
import contextlib
import math
import os

import torch
import torch.nn.functional as F

try:  # importing must work where triton is absent; no driver call happens at import
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False

IMPL = "auto"            # "auto" | "triton" | "torch": tests force either path
TRITON_GEMM = True       # True: GEMM tile + epilogue in one kernel; False: cuBLAS logits chunk + Triton epilogue kernel
CHUNK_MB = 64            # CUDA: MiB of fp32 logits per chunk (the dZ chunk buffer is this / 2 in bf16)
CPU_CHUNK_MB = 16        # CPU: few enough chunks that per-op overhead (OpenMP barriers on a busy box) stays small
# Triton tile (GPU); tests shrink these to exercise masks cheaply. Offline sm_90a compile (cuobjdump -res-usage):
# 128x64, 8 warps -> 252 registers, no spill; 128x128 spills (1.3 KB stack per thread) because of the epilogue's
# live fp32 tiles and 64-bit pointer tiles. Not timed on a GPU yet.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 64, 64
NUM_WARPS, NUM_STAGES = 8, 3

REDUCTIONS = ("batch_mean", "sum", "mean")


# ----------------------------------------------------------------------------- targets and chunking

def _is_sparse(targets):
    return not (targets.dtype.is_floating_point or targets.dtype == torch.bool)


def _check(x, weight, bias, targets, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_bce: reduction={reduction!r}, expected one of {REDUCTIONS}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_bce: x {tuple(x.shape)} and weight {tuple(weight.shape)}: expected (B, D) and (V, D)")
    if x.dtype != weight.dtype:
        raise ValueError(f"linear_bce: x dtype {x.dtype} != weight dtype {weight.dtype}")
    B, V = x.shape[0], weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (V,) or bias.dtype != x.dtype):
        raise ValueError(f"linear_bce: bias shape {tuple(bias.shape)} dtype {bias.dtype}, expected ({V},) {x.dtype}")
    if targets.dtype == torch.uint8:
        raise ValueError("linear_bce: uint8 targets are ambiguous; pass bool/float (B, V) multi-hot or int64 (B, K) indices")
    if targets.dim() != 2 or targets.shape[0] != B:
        raise ValueError(f"linear_bce: targets shape {tuple(targets.shape)}, expected ({B}, {V}) dense or ({B}, K) indices")
    if not _is_sparse(targets) and targets.shape[1] != V:
        raise ValueError(f"linear_bce: dense targets shape {tuple(targets.shape)}, expected ({B}, {V})")
    if _is_sparse(targets) and targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())  # one host sync; a bad index would read out of bounds
        if lo < -1 or hi >= V:
            raise ValueError(f"linear_bce: sparse target indices span [{lo}, {hi}], expected -1 (padding) or [0, {V})")


def dedupe(idx):
    """(B, K) int indices padded with -1 -> (B, K) int64 sorted per row, duplicates and padding set to -1."""
    s = idx.long().sort(dim=1).values
    if s.shape[1] > 1:
        dup = torch.zeros_like(s, dtype=torch.bool)
        dup[:, 1:] = s[:, 1:] == s[:, :-1]
        s = s.masked_fill(dup, -1)
    return s


def chunk_shape(B, V, budget_bytes):
    """Rows R and vocabulary columns Vc per chunk so that R * Vc fp32 logits fit budget_bytes.
    Vocabulary chunks first (dW[chunk] written once, only the small dX accumulates); rows too when B is huge."""
    elems = max(1, budget_bytes // 4)
    if B * V <= elems:
        return B, V
    vmin = min(V, 256)               # narrower chunks make thin GEMMs (the Liger 32-row problem, turned sideways)
    Vc = elems // B
    if Vc >= vmin:
        Vc = Vc // 128 * 128 if Vc >= 128 else Vc   # whole Triton/BLAS column tiles
        return B, min(Vc, V)
    return max(1, elems // vmin), vmin


# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    @triton.jit
    def _linear_bce_kernel(x_ptr, w_ptr, b_ptr, z_ptr, t_ptr, idx_ptr, dz_ptr, part_ptr,
                           R, Vc, D, K, v0, sxm, swn, szm, stm, sim, sdm, scale,
                           HAS_BIAS: tl.constexpr, GEMM: tl.constexpr, SPARSE: tl.constexpr, WRITE_DZ: tl.constexpr,
                           DOT_F32: tl.constexpr, PREC: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One (BM x BN) tile of a chunk: z = x W^T (+b) in registers, then partial BCE sum and dZ = (sigmoid(z)-t)*scale.
        x_ptr -> chunk rows (R, D); w_ptr/b_ptr -> chunk vocab (Vc, D)/(Vc,); z_ptr (R, Vc) when not GEMM;
        t_ptr (R, Vc) dense or idx_ptr (R, K) sparse (global vocab ids, -1 pad); dz_ptr (R, Vc); part_ptr (grid,)."""
        pid_m = tl.program_id(0)   # fastest-varying: neighbouring programs share the same W tile (L2 reuse)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < R
        mn = rn < Vc
        msk = mm[:, None] & mn[None, :]
        rm64 = rm.to(tl.int64)     # int64 offsets: R * stride overflows int32 at B*V > 2^31
        rn64 = rn.to(tl.int64)
        if GEMM:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            rk = tl.arange(0, BK)
            for k0 in range(0, D, BK):
                kk = k0 + rk
                mk = kk < D
                a = tl.load(x_ptr + rm64[:, None] * sxm + kk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
                w = tl.load(w_ptr + rn64[:, None] * swn + kk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
                if DOT_F32:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, tl.trans(w), acc, input_precision=PREC)
            z = acc
        else:
            z = tl.load(z_ptr + rm64[:, None] * szm + rn64[None, :], mask=msk, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(b_ptr + rn64, mask=mn, other=0.0).to(tl.float32)[None, :]
        if SPARSE:
            # t_ij = [j in idx_i]: K compares per element, K << D so this is cheap next to the GEMM; idempotent, so
            # duplicate indices count once, and -1 padding never matches a column
            col = rn + v0   # int32 compares (V < 2^31): int64 ones double the registers of this loop
            t = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K):
                ik = tl.load(idx_ptr + rm64 * sim + k, mask=mm, other=-1).to(tl.int32)
                t = tl.where(ik[:, None] == col[None, :], 1.0, t)
        else:
            t = tl.load(t_ptr + rm64[:, None] * stm + rn64[None, :], mask=msk, other=0).to(tl.float32)
        # stable BCE: max(z,0) - z t + log1p(exp(-|z|)); log1p via log(u) * e / (u - 1) (Goldberg), no tl.log1p
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        loss = tl.where(msk, tl.maximum(z, 0.0) - z * t + lp, 0.0)
        tl.store(part_ptr + pid_n * tl.num_programs(0) + pid_m, tl.sum(tl.sum(loss, axis=1), axis=0))
        if WRITE_DZ:
            s = tl.where(z >= 0, 1.0 / u, e / u)   # sigmoid(z) from the same exp, no overflow either side
            dz = (s - t) * scale
            tl.store(dz_ptr + rm64[:, None] * sdm + rn64[None, :], dz.to(dz_ptr.dtype.element_ty), mask=msk)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile_triton(xc, Wc, bc, tc, idxc, v0, scale, need_grad):
    """Loss sum and dZ (R, Vc) in the input dtype (or None) of one chunk via the Triton kernel."""
    R, Vc, D = xc.shape[0], Wc.shape[0], xc.shape[1]
    interp = _interpreting()
    dt = xc.dtype
    gemm = TRITON_GEMM
    z = None
    if not gemm:  # cuBLAS logits chunk (bias included), Triton epilogue overwrites it with dZ (fp32, as z)
        z = _logits_f32(xc, Wc, bc)
    dz = (z if z is not None else torch.empty((R, Vc), dtype=dt, device=xc.device)) if need_grad else None
    grid = (triton.cdiv(R, BLOCK_M), triton.cdiv(Vc, BLOCK_N))
    part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=xc.device)
    sparse = idxc is not None
    dummy = part
    if tc is not None and tc.dtype == torch.bool:
        tc = tc.view(torch.uint8)   # zero-copy; triton loads bytes
    _linear_bce_kernel[grid](
        xc, Wc, bc if (gemm and bc is not None) else dummy, z if z is not None else dummy,
        tc if tc is not None else dummy, idxc if sparse else dummy, dz if dz is not None else dummy, part,
        R, Vc, D, idxc.shape[1] if sparse else 0, v0,
        xc.stride(0), Wc.stride(0), z.stride(0) if z is not None else 0, tc.stride(0) if tc is not None else 0,
        idxc.stride(0) if sparse else 0, dz.stride(0) if dz is not None else 0, scale,
        HAS_BIAS=bool(gemm and bc is not None), GEMM=gemm, SPARSE=sparse, WRITE_DZ=need_grad,
        DOT_F32=bool(interp or dt == torch.float32), PREC="ieee" if (dt == torch.float32 or interp) else "tf32",
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K if (dt != torch.float32 or interp) else min(BLOCK_K, 32),  # fp32: smem
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return part.sum(), dz


# ----------------------------------------------------------------------------- torch chunk

def _logits_f32(xc, Wc, bc):
    """z = xc Wc^T + bc of one chunk: (R, D), (Vc, D), (Vc,) or None -> (R, Vc) fp32 whatever the input dtype.
    Half operands are upcast first (exact), so z is the half GEMM with fp32 accumulation that the Triton kernel
    computes; a half addmm would round every logit to 8 (bf16) or 11 (fp16) significant bits before the loss sees it."""
    f32 = torch.float32
    xc, Wc = xc.to(f32), Wc.to(f32)   # no copy for fp32
    return torch.addmm(bc.to(f32), xc, Wc.t()) if bc is not None else xc @ Wc.t()


def _tile_torch(xc, Wc, bc, tc, pos, need_grad, one):
    """Like _tile_triton, but returns -dZ/s = t - sigmoid(z) in fp32 (the sign and the scale s are folded into the GEMMs'
    alpha and db by the caller). pos: flat positions r * Vc + c of the chunk's positives (sparse targets).
    Sparse targets: everything happens in the one logits buffer (peak = one chunk); dense: one more chunk for z * t."""
    z = _logits_f32(xc, Wc, bc)
    if tc is not None:
        tcf = tc if tc.dtype == z.dtype else tc.to(z.dtype)
        zt = (z * tcf).sum()
    else:
        tcf = None
        zt = z.view(-1)[pos].sum()   # -z.t is a gather at the positives
    # softplus(z) = max(z,0) + log1p(exp(-|z|)) (stable; torch returns z past 20, where the log1p term is < 2.1e-9),
    # written over z: F.softplus has no in-place form, its out= variant does it
    sp = torch._C._nn.softplus(z, 1, 20, out=z)
    loss = sp.sum() - zt
    if not need_grad:
        return loss, None
    # -sigmoid(z) = expm1(-softplus(z)), accurate to ~1 ulp at both tails (checked against fp64 on [-80, 80])
    nd = sp.neg_().expm1_()
    if tcf is not None:
        nd.add_(tcf)
    else:
        nd.view(-1).index_put_((pos,), one, accumulate=True)   # positions are unique after dedupe
    return loss, nd


# ----------------------------------------------------------------------------- driver + autograd

def _use_triton(x, impl):
    if impl == "torch":
        return False
    ok = HAS_TRITON and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if impl == "triton":
        if not ok:
            raise RuntimeError(f"linear_bce: IMPL='triton' but triton available={HAS_TRITON}, dtype={x.dtype}")
        if not x.is_cuda and not _interpreting():
            raise RuntimeError("linear_bce: IMPL='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before import")
        return True
    if impl != "auto":
        raise ValueError(f"linear_bce: kernels.bce.IMPL={impl!r}, expected 'auto', 'triton' or 'torch'")
    return ok and x.is_cuda


def _forward(x, W, b, targets, reduction, need, chunk_bytes=None, impl=None):
    """-> loss (fp32 scalar), dx, dW, db (None where not needed; unscaled by grad_output)."""
    B, D = x.shape
    V = W.shape[0]
    use_triton = _use_triton(x, IMPL if impl is None else impl)
    if chunk_bytes is None:
        chunk_bytes = (CHUNK_MB if x.is_cuda else CPU_CHUNK_MB) << 20
    R, Vc = chunk_shape(B, V, chunk_bytes)
    scale = {"batch_mean": 1.0 / B, "sum": 1.0, "mean": 1.0 / (B * V)}[reduction]
    # Triton scales dZ for free in its epilogue; the torch path folds -scale into the GEMMs' alpha and the small db
    # instead of spending one more pass over every B x V chunk
    post = 1.0 if use_triton else -scale
    x, W = x.contiguous(), W.contiguous()
    b = b.contiguous() if b is not None else None
    sparse = _is_sparse(targets)
    if sparse:   # the kernel's membership test is idempotent; the torch path's gather/index_put needs unique indices
        idx = dedupe(targets) if not use_triton else targets.contiguous()
    else:
        targets = targets.contiguous()   # chunks are read with row stride only
    need_dx, need_dw, need_db = need
    need_grad = any(need)
    f32 = torch.float32
    loss = torch.zeros((), dtype=f32, device=x.device)
    one = torch.ones((), dtype=f32, device=x.device)
    dx = torch.zeros((B, D), dtype=f32, device=x.device) if need_dx else None
    dW = torch.empty_like(W) if need_dw else None
    db = torch.empty(V, dtype=f32, device=x.device) if need_db else None
    for v0 in range(0, V, Vc):
        v1 = min(V, v0 + Vc)
        Wc = W[v0:v1]
        bc = b[v0:v1] if b is not None else None
        dw_acc = torch.zeros((v1 - v0, D), dtype=f32, device=x.device) if (need_dw and R < B) else None
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            xc = x[r0:r1]
            tc = targets[r0:r1, v0:v1] if not sparse else None
            if use_triton:
                part, dz = _tile_triton(xc, Wc, bc, tc, idx[r0:r1] if sparse else None, v0, scale, need_grad)
            else:
                pos = None
                if sparse:
                    ic = idx[r0:r1]
                    hit = (ic >= v0) & (ic < v1)
                    rows = torch.arange(r1 - r0, device=x.device)[:, None].expand_as(ic)
                    pos = rows[hit] * (v1 - v0) + (ic[hit] - v0)
                part, dz = _tile_torch(xc, Wc, bc, tc, pos, need_grad, one)
            loss += part
            if not need_grad:
                continue
            if need_db:
                s = dz.sum(0, dtype=f32) * post
                if r0 == 0:
                    db[v0:v1] = s
                else:
                    db[v0:v1] += s
            dzc = dz.to(x.dtype)   # GEMMs in the input dtype, like autograd of the naive path (no copy for fp32)
            if need_dx:
                if x.dtype == f32:
                    dx[r0:r1].addmm_(dzc, Wc, alpha=post)
                else:
                    dx[r0:r1] += (dzc @ Wc).float() * post
            if need_dw:
                if dw_acc is None:   # each vocabulary chunk of dW is written exactly once (beta=0 ignores empty())
                    dW[v0:v1].addmm_(dzc.t(), xc, beta=0, alpha=post)
                elif x.dtype == f32:
                    dw_acc.addmm_(dzc.t(), xc, alpha=post)
                else:
                    dw_acc += (dzc.t() @ xc).float() * post
            del dz, dzc
        if dw_acc is not None:
            dW[v0:v1] = dw_acc
    loss = loss * scale
    return (loss, dx.to(x.dtype) if dx is not None else None, dW,
            db.to(b.dtype) if db is not None else None)


class LinearBCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, reduction, chunk_bytes):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, dx, dW, db = _forward(x, weight, bias, targets, reduction, need, chunk_bytes)
        ctx.save_for_backward(dx, dW, db)
        ctx.done = False
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.done:
            raise RuntimeError("linear_bce: backward ran twice; its gradients are computed once in forward")
        ctx.done = True
        dx, dW, db = ctx.saved_tensors
        # terminal loss: g is a scalar, so the chain rule is one multiply; in place (no sync on g == 1, no copy of dW)
        out = [t.mul_(g.to(t.dtype)) if t is not None else None for t in (dx, dW, db)]
        return out[0], out[1], out[2], None, None, None


def linear_bce(x, weight, bias, targets, reduction="batch_mean", chunk_bytes=None):
    """BCE-with-logits of z = x @ weight^T + bias against multi-hot targets, never holding the full B x V logits.
    x (B, D), weight (V, D), bias (V,) or None, targets dense (B, V) float/bool or sparse (B, K) int indices (-1 pad).
    reduction: "batch_mean" (sum / B, CatLIP), "sum", or "mean" (sum / (B V)). Returns a fp32 scalar.
    chunk_bytes: fp32 logits per chunk (default CHUNK_MB on CUDA, CPU_CHUNK_MB on CPU).
    Under torch.autocast the operands are cast to the autocast dtype (x may come bf16, weight fp32); logits stay fp32."""
    dev = x.device.type
    amp = torch.is_autocast_enabled(dev)
    if amp:   # cast like autocast's F.linear *before* checking, or bf16 x vs fp32 W would fail the dtype check
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    _check(x, weight, bias, targets, reduction)
    with torch.autocast(dev, enabled=False) if amp else contextlib.nullcontext():
        return LinearBCE.apply(x, weight, bias, targets, reduction, chunk_bytes)


def naive_linear_bce(x, weight, bias, targets, reduction="batch_mean"):
    """Reference: materialise the logits and a dense target, as CatLIP/corenet does (F.one_hot -> BCE-with-logits)."""
    z = F.linear(x, weight, bias)
    if _is_sparse(targets):
        t = torch.zeros_like(z)   # scatter_add then clamp: padding adds 0, duplicates count once
        t.scatter_add_(1, targets.clamp_min(0).long(), (targets >= 0).to(z.dtype)).clamp_max_(1)
    else:
        t = targets.to(z.dtype)
    loss = F.binary_cross_entropy_with_logits(z.float(), t.float(), reduction="sum")
    return loss / {"batch_mean": x.shape[0], "sum": 1, "mean": z.numel()}[reduction]


# ----------------------------------------------------------------------------- benchmark

BENCH_SHAPES = ((1024, 768, 24320), (4096, 768, 24320))   # CatLIP per-GPU batch, and 4x that
VARIANTS = ("naive", "fused-dense", "fused-sparse")
K_POS = 8   # sparse targets per row: a caption names a handful of synsets; rows keep some -1 padding


def _bench_inputs(B, D, V, variant, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * D ** -0.5).to(device, dtype).requires_grad_()
    b = torch.full((V,), -math.log(V / K_POS), device=device, dtype=dtype).requires_grad_()   # sigmoid prior ~ K/V
    idx = torch.randint(0, V, (B, K_POS), generator=g)
    idx[:, K_POS // 2:] = torch.where(torch.rand(B, K_POS - K_POS // 2, generator=g) < 0.5, -1, idx[:, K_POS // 2:])
    idx = idx.to(device)
    if variant == "fused-sparse":
        return x, W, b, idx
    t = torch.zeros(B, V, device=device, dtype=dtype)   # the naive path's dense multi-hot target (corenet one_hot)
    t.scatter_(1, idx.clamp_min(0), (idx >= 0).to(dtype))
    return x, W, b, t


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _bench_worker(B, D, V, variant, repeats, dtype="float32"):
    """Runs in a fresh process (CPU): median fwd+bwd seconds and peak extra RSS over the state with only inputs alive."""
    import gc
    import time
    fn = naive_linear_bce if variant == "naive" else linear_bce
    fn(*_bench_inputs(64, D, V, variant, getattr(torch, dtype), "cpu")).backward()   # warm-up: BLAS, thread pools
    x, W, b, t = _bench_inputs(B, D, V, variant, getattr(torch, dtype), "cpu")
    gc.collect()
    base = _rss()
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0); else peak is measured from process start
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    ts = []
    for _ in range(repeats):
        x.grad = W.grad = b.grad = None
        t0 = time.perf_counter()
        loss = fn(x, W, b, t)
        loss.backward()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"seconds": ts[len(ts) // 2], "all_seconds": ts, "peak_extra_mb": (_hwm() - base) / 2**20,
            "grads_mb": _grads_mb(x, W, b), "hwm_reset": reset, "loss": float(loss), "threads": torch.get_num_threads()}


def _grads_mb(*ps):
    """Size of the gradient outputs: part of every path's peak (dW alone is 71 MiB at CatLIP shapes in fp32)."""
    return sum(p.numel() * p.element_size() for p in ps) / 2**20


def _bench_cuda(B, D, V, variant, repeats, dtype=torch.bfloat16):
    x, W, b, t = _bench_inputs(B, D, V, variant, dtype, "cuda")
    fn = naive_linear_bce if variant == "naive" else linear_bce
    for _ in range(2):   # warm-up: Triton compile, cuBLAS heuristics
        x.grad = W.grad = b.grad = None
        fn(x, W, b, t).backward()
    x.grad = W.grad = b.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(repeats):
        x.grad = W.grad = b.grad = None
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(x, W, b, t).backward()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    ts.sort()
    s = ts[len(ts) // 2]
    tflops = 6 * B * D * V / s / 1e12
    return {"seconds": s, "all_seconds": ts, "peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "grads_mb": _grads_mb(x, W, b), "tflops": tflops, "frac_of_989": tflops / 989,
            "impl": "torch" if variant == "naive" else ("triton" if _use_triton(x, IMPL) else "torch"),
            "triton_gemm": TRITON_GEMM}


def bench(device=None, shapes=BENCH_SHAPES, repeats=None, rounds=2, variants=VARIANTS):
    """Naive (linear + BCE-with-logits on a dense target) vs fused forward+backward. Prints a table, returns rows.
    CPU: fp32; every (round, variant) runs in a fresh subprocess, variants interleaved round by round so that load
    from other processes hits all of them alike; seconds = median wall clock over all timed runs; peak extra memory =
    VmHWM - RSS with only the inputs alive (glibc told to mmap >= 1 MiB, so freed chunks leave RSS), max over rounds.
    CUDA: bf16 (CatLIP), CUDA events, median; torch.cuda.max_memory_allocated minus the inputs; TFLOP/s at 6BDV and
    the fraction of the 989 TFLOP/s dense bf16 peak."""
    import json
    import subprocess
    import sys
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for (B, D, V) in shapes:
        runs = {var: [] for var in variants}
        for rnd in range(1 if cuda else rounds):
            for var in variants:
                if cuda:
                    r = _bench_cuda(B, D, V, var, repeats or 20)
                else:
                    n = repeats or (3 if B <= 1024 else 2)
                    code = f"import json, kernels.bce as kb; print(json.dumps(kb._bench_worker({B}, {D}, {V}, {var!r}, {n})))"
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
                    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise RuntimeError(f"bench worker {var} B={B} failed:\n{out.stderr}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(B=B, D=D, V=V, variant=var, device="cuda" if cuda else "cpu", round=rnd)
                print(json.dumps(r), flush=True)
                runs[var].append(r)
        for var in variants:
            r = dict(runs[var][0])
            ts = sorted(t for q in runs[var] for t in q["all_seconds"])
            r.update(seconds=ts[len(ts) // 2], all_seconds=ts, peak_extra_mb=max(q["peak_extra_mb"] for q in runs[var]))
            if cuda:
                r.update(tflops=6 * B * D * V / r["seconds"] / 1e12)
                r.update(frac_of_989=r["tflops"] / 989)
            rows.append(r)
    print(f"\nfused linear + BCE, forward+backward ({'cuda bf16' if cuda else 'cpu fp32'}), median; ratios vs naive;"
          " work = peak extra minus the gradient outputs")
    print(f"{'B':>6} {'variant':>13} {'seconds':>9} {'x naive':>8} {'peak MiB':>9} {'x naive':>8} {'work MiB':>9}"
          f" {'x naive':>8}" + (f" {'TFLOP/s':>8} {'/989':>6}" if cuda else ""))
    for r in rows:
        n = next((q for q in rows if q["B"] == r["B"] and q["variant"] == "naive"), r)
        w, nw = r["peak_extra_mb"] - r["grads_mb"], n["peak_extra_mb"] - n["grads_mb"]
        line = (f"{r['B']:>6} {r['variant']:>13} {r['seconds']:>9.3f} {r['seconds'] / n['seconds']:>8.2f} "
                f"{r['peak_extra_mb']:>9.1f} {r['peak_extra_mb'] / max(n['peak_extra_mb'], 1e-9):>8.2f} "
                f"{w:>9.1f} {w / max(nw, 1e-9):>8.2f}")
        if cuda:
            line += f" {r['tflops']:>8.1f} {r['frac_of_989']:>6.3f}"
        print(line)
    return rows


if __name__ == "__main__":
    bench()
