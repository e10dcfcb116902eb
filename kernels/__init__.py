"""Triton kernels for CUDA GPUs, installed as ssgd_fused.kernels and imported lazily.

The CUDA implementations of the ops declared in ssgd_fused.ops are registered here when CUDA
and triton are present. Until they are, REGISTERED is False and CUDA parameters use the
reference path (SSGD says so with one warning).
"""

REGISTERED = False
