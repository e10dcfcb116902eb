"""ssgd_fused::perturb_, ::perturb_norms_ and ::restore_ on CUDA: w = (src or w) + coef * s * u, and g *=
grad_scale; perturb_norms_ also returns ||w||^2 of what it displaces."""

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._device import chunk_of, displaced, ptr, scale_grad
from ._noise import store_value
from ._reduce import norm_pass
from ._tables import W


@triton.jit
def _perturb(meta, chunks, sflat, coef, grad_scale, seed, c1hi, step, DT: tl.constexpr, KIND: tl.constexpr,
             DIST: tl.constexpr, BLOCK: tl.constexpr, HAS_SRC: tl.constexpr, HAS_GRAD: tl.constexpr,
             FILTER: tl.constexpr):
    t, start, n, offs, mask = chunk_of(meta, chunks, BLOCK)
    w = displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT, DIST, BLOCK, HAS_SRC, FILTER)
    store_value(ptr(meta, t, W, DT) + offs, w, mask, KIND)
    if HAS_GRAD:
        scale_grad(meta, t, offs, mask, grad_scale, DT, KIND)


def _launch(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter, sources,
            element_offsets):
    T.check(params, (("grads", grads or []),), sources)
    offsets = T.offsets(params, element_offsets, distribution)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, sflat, nchunks = T.build(idx, params, tensor_ids, scales, sources, grads, filter=filter,
                                               offsets=offsets)
        if nchunks:
            _perturb[(nchunks,)](meta, chunks, sflat, float(coef), float(grad_scale), seed, c1hi, step32,
                                 DT=T.triton_dtype(dtype), KIND=T.KIND[dtype], DIST=T.DIST[distribution],
                                 BLOCK=T.BLOCK, HAS_SRC=sources is not None, HAS_GRAD=grads is not None,
                                 FILTER=bool(filter), enable_fp_fusion=False)


def perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None,
             element_offsets=None):
    _launch(params, None, scales, coef, 1.0, seed, step, tensor_ids, sample, distribution, filter, sources,
            element_offsets)


def perturb_norms_(params, w_sq, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None,
                   element_offsets=None):
    # a weights-only norm pass (rademacher's ||u||^2 is the count: nothing generated), then the move
    bases = list(sources) if sources is not None else list(params)
    T.check(bases)
    got, _ = norm_pass(bases, seed, step, tensor_ids, sample, "rademacher", filter,
                       T.offsets(bases, element_offsets, "rademacher"))
    torch._foreach_copy_(list(w_sq), got)
    perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources, element_offsets)


def restore_(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter,
             sources=None, element_offsets=None):
    _launch(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter, sources,
            element_offsets)
