"""Triton kernels for CUDA GPUs, installed as ssgd_fused.kernels and imported lazily: ssgd_fused.ops
registers them as the CUDA implementations of its ops and imports a kernel module on the first
call with CUDA tensors. One file per op (kernel + launcher); _noise.py holds the spec's noise in
Triton, _tables.py the multi-tensor pointer tables, aot.py the ahead-of-time compilation check.

Floating-point contraction is off at every launch (enable_fp_fusion=False): the kernels spell out
the fused multiply-adds they use, as the C++ kernels do.
"""

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
