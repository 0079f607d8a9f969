"""PLACEHOLDER until issue 5 lands: linear_bce() with the naive PyTorch path only."""
import torch
import torch.nn.functional as F


def linear_bce(x, weight, bias, targets, reduction="batch_mean"):
    """x (B, D), weight (V, D), bias (V,) or None, targets dense (B, V) or sparse indices (B, K) padded with -1."""
    z = x @ weight.t()
    if bias is not None:
        z = z + bias
    if targets.dtype in (torch.int64, torch.int32):
        t = torch.zeros_like(z)
        idx = targets.clamp_min(0).long()
        t.scatter_(1, idx, (targets >= 0).to(z.dtype))
    else:
        t = targets.to(z.dtype)
    loss = F.binary_cross_entropy_with_logits(z.float(), t.float(), reduction="sum")
    return loss / x.shape[0] if reduction == "batch_mean" else loss
