"""ssgd_fused::norms on CUDA: (||w||^2, ||u||^2) per tensor or per dim-0 slice, float64, in a
fixed reduction order (the norm pass of ssgd_fused.kernels._reduce)."""

from . import _tables as T
from ._reduce import norm_pass


def norms(params, seed, step, tensor_ids, sample, distribution, filter, element_offsets=None):
    T.check(params)
    offsets = T.offsets(params, element_offsets, distribution)
    return norm_pass(params, seed, step, tensor_ids, sample, distribution, filter, offsets)
