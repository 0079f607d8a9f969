"""Triton kernels with PyTorch fallbacks: `kernels.attention.attention` (FlashAttention-2-style) and
`kernels.bce.linear_bce` (fused linear + sigmoid BCE). Nothing is re-exported here, so `kernels.attention` and
`kernels.bce` are the modules, and setting `kernels.attention.IMPL = "torch"` switches the implementation."""
