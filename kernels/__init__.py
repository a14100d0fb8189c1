"""Triton kernels and their launchers (tensors and packed formats in, tensors out).

Nothing here imports ``sparse_ops``; nothing here touches the GPU at import time.
"""
