"""Contrastive losses for two-tower training: CLIP's symmetric InfoNCE (arXiv:2103.00020 §2.3, Fig. 3) and SigLIP's
pairwise sigmoid loss (arXiv:2303.15343 §3.1-3.3), both with a differentiable all-gather *inside* the loss.

Distributed semantics (open_clip's `--local-loss --gather-with-grad`): each rank scores its
B local rows against the W*B gathered columns. The gather's backward sums the column gradients of every rank's
loss and hands each rank the slice of its own features, so after DDP averages parameter gradients over the W ranks
they equal the gradients of the single-process loss on the concatenated batch (tests/test_losses.py checks this on
2 gloo processes). All ranks must use the same local batch size B.

Precision: every loss here computes its logits in fp32 (fp64 stays fp64), inside a torch.autocast region too.
Features that arrive in bf16 are upcast (exact), and the matmul runs with autocast disabled, since autocast would cast
it straight back to bf16: 8 significant bits, an error of up to 0.25 at CLIP's logit scale of 100, which the softmax
sees as noise.
Method scripts get the same for their own (e.g. distillation) logits from two helpers:

    z = fp32_logits(img_f, txt_f, scale)             # scale * img_f @ txt_f^T, (N, M) fp32 even under autocast
    z = fp32_logits(f, head.weight, bias=head.bias)  # a linear head's logits, the same way
    loss = distill_kl(student_z, teacher_z, T)       # T^2 KL(softmax(teacher_z / T) || softmax(student_z / T))
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _fp32(x):
    """Upcast half/bf16 features to fp32 for the logits; keep fp32/fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def fp32_logits(a, b, scale=1.0, bias=None):
    """scale * a @ b^T + bias in (at least) fp32: a (N, D), b (M, D) -> (N, M). scale: float or scalar tensor; bias:
    None, a scalar (SigLIP) or (M,) (a linear head). Inputs are upcast and autocast is off for the matmul, which
    autocast would otherwise run in bf16; gradients flow back to a and b in their own dtypes."""
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    up = lambda v: v.to(dt) if torch.is_tensor(v) else v  # noqa: E731 - python floats stay as they are
    with torch.autocast(a.device.type, enabled=False):
        z = up(scale) * up(a) @ up(b).T
        return z if bias is None else z + up(bias)


def distill_kl(student_logits, teacher_logits, T=1.0):
    """Knowledge distillation (Hinton et al., arXiv:1503.02531): T^2 KL(softmax(t / T) || softmax(s / T)), mean over
    the N rows. student_logits, teacher_logits: (N, C); the teacher gets no gradient. T^2 keeps the gradient's size
    independent of T (their §2). Computed in fp32 with autocast off; logits that were themselves computed in bf16 stay
    as rounded as they came, so compute them with fp32_logits."""
    with torch.autocast(student_logits.device.type, enabled=False):
        s = _fp32(student_logits) / T
        t = _fp32(teacher_logits.detach()) / T
        return T * T * F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")


class _GatherWithGrad(torch.autograd.Function):
    """(B, ...) on each rank -> (W*B, ...) in rank order; backward: all-reduce(sum) the full gradient (the gradient
    of sum_r loss_r) and return this rank's slice. all_reduce instead of reduce_scatter because gloo lacks it."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.rank, ctx.B = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g)
        return g[ctx.rank * ctx.B:(ctx.rank + 1) * ctx.B]


def gather_features(x, gather=True):
    """x: (B, D) local -> (all (W*B, D) in rank order, rank); identity (x, 0) when not distributed or gather=False
    (e.g. one rank evaluating or timing a loss on its own inside a torchrun job)."""
    if not gather or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank()


def clip_loss(img_f, txt_f, logit_scale, gather=True):
    """img_f, txt_f: (B, D) L2-normalised local features; logit_scale: the temperature multiplier exp(t) (scalar).
    Mean of image->text and text->image cross-entropy; local rows vs gathered columns, labels offset by rank*B.
    Logits in at least fp32, under autocast too. gather=False: this rank's batch only (no collective)."""
    img_f, txt_f = _fp32(img_f), _fp32(txt_f)   # before the gather: the gradient's all-reduce then runs in fp32 too
    all_img, rank = gather_features(img_f, gather)
    all_txt, _ = gather_features(txt_f, gather)
    B = img_f.shape[0]
    labels = torch.arange(B, device=img_f.device) + rank * B
    logits_i = fp32_logits(img_f, all_txt, logit_scale)                # (B, W*B)
    logits_t = fp32_logits(txt_f, all_img, logit_scale)
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


def siglip_loss(img_f, txt_f, logit_scale, logit_bias, gather=True):
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on matching pairs, -1 elsewhere (§3.1).
    Distributed: local images against all gathered texts (the other ranks' texts are negatives; the paper's chunked
    ring exchange computes the same sum), divided by the local B -- DDP's mean over ranks gives the global loss."""
    img_f, txt_f = _fp32(img_f), _fp32(txt_f)
    all_txt, rank = gather_features(txt_f, gather)
    B = img_f.shape[0]
    logits = fp32_logits(img_f, all_txt, logit_scale, logit_bias)      # (B, W*B)
    z = -torch.ones_like(logits)
    idx = torch.arange(B, device=img_f.device)
    z[idx, idx + rank * B] = 1.0
    return -F.logsigmoid(z * logits).sum() / B
