"""Triton kernels for CUDA GPUs, installed as ssgd_fused.kernels and imported lazily: ssgd_fused.ops
registers them as the CUDA implementations of its ops and imports a kernel module on the first
call with CUDA tensors.

Layout (each module imports only the ones below it):

    norms.py perturb.py sgd.py adam.py   one op each: its kernel(s) and the launcher, whose
                                         arguments are the op schema's, in its order
    _reduce.py                           the norm passes and the fixed-order reduction of partials
    _device.py                           device helpers of the per-op kernels (table columns by name,
                                         a program's chunk, the displaced weights, the gradient scale)
    _noise.py  _tables.py                the spec's noise in Triton; the multi-tensor pointer tables
    aot.py                               ahead-of-time compilation of every kernel (no GPU needed)

Floating-point contraction is off at every launch (enable_fp_fusion=False): the kernels spell out
the fused multiply-adds they use, as the C++ kernels do. Nothing here changes process-wide settings.
"""
