"""PLACEHOLDER until issue 4 lands: attention() with the PyTorch path only."""
import torch.nn.functional as F


def attention(q, k, v, causal=False, scale=None):
    """q, k, v: (B, H, N, D) -> (B, H, N, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
