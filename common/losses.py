"""Contrastive losses for two-tower training: CLIP's symmetric InfoNCE (arXiv:2103.00020 §2.3, Fig. 3) and SigLIP's
pairwise sigmoid loss (arXiv:2303.15343 §3.1-3.3), both with a differentiable all-gather *inside* the loss.

Distributed semantics (open_clip's `--local-loss --gather-with-grad`, clip-family.md §3.1): each rank scores its
B local rows against the W*B gathered columns. The gather's backward sums the column gradients of every rank's
loss and hands each rank the slice of its own features, so after DDP averages parameter gradients over the W ranks
they equal the gradients of the single-process loss on the concatenated batch (tests/test_losses.py checks this on
2 gloo processes). All ranks must use the same local batch size B.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _fp32(x):
    """Upcast half/bf16 features to fp32 for the logits; keep fp32/fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
    Logits in at least fp32 (autocast-safe). gather=False: this rank's batch only (no collective)."""
    img_f, txt_f = _fp32(img_f), _fp32(txt_f)
    all_img, rank = gather_features(img_f, gather)
    all_txt, _ = gather_features(txt_f, gather)
    B = img_f.shape[0]
    labels = torch.arange(B, device=img_f.device) + rank * B
    logits_i = logit_scale * img_f @ all_txt.T                          # (B, W*B)
    logits_t = logit_scale * txt_f @ all_img.T
    return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


def siglip_loss(img_f, txt_f, logit_scale, logit_bias, gather=True):
    """SigLIP: -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on matching pairs, -1 elsewhere (§3.1).
    Distributed: local images against all gathered texts (the other ranks' texts are negatives; the paper's chunked
    ring exchange computes the same sum), divided by the local B -- DDP's mean over ranks gives the global loss."""
    img_f, txt_f = _fp32(img_f), _fp32(txt_f)
    all_txt, rank = gather_features(txt_f, gather)
    B = img_f.shape[0]
    logits = logit_scale * img_f @ all_txt.T + logit_bias              # (B, W*B)
    z = -torch.ones_like(logits)
    idx = torch.arange(B, device=img_f.device)
    z[idx, idx + rank * B] = 1.0
    return -F.logsigmoid(z * logits).sum() / B
