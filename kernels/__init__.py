"""Triton kernels with PyTorch fallbacks. The models call these two entry points only."""
from kernels.attention import attention
from kernels.bce import linear_bce

__all__ = ["attention", "linear_bce"]
