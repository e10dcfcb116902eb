"""ssgd_fused::perturb_ and ::restore_ on CUDA: w = (src or w) + coef * s * u, and g *= grad_scale."""

import triton
import triton.language as tl

from . import _tables as T
from ._noise import noise_chunk, store_value


@triton.jit
def displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT: tl.constexpr, DIST: tl.constexpr,
              NCOL: tl.constexpr, BLOCK: tl.constexpr, HAS_SRC: tl.constexpr):
    """float32 (src or w) + coef * s * u for one chunk (shared by every update kernel)."""
    if HAS_SRC:
        bp = tl.load(meta + t * NCOL + 1).to(tl.pointer_type(DT))
    else:
        bp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    w = tl.load(bp + offs, mask=mask, other=0.0).to(tl.float32)
    soff = tl.load(meta + t * NCOL + 8)
    if (soff >= 0) & (coef != 0.0):
        tid = tl.load(meta + t * NCOL + 7)
        s = tl.load(sflat + soff)
        u = noise_chunk(seed, start, c1hi, tid, step, DIST, BLOCK)
        w = w + (coef * s) * u
    return w


@triton.jit
def _perturb(meta, chunks, sflat, coef, grad_scale, seed, c1hi, step, DT: tl.constexpr, KIND: tl.constexpr,
             DIST: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr, HAS_SRC: tl.constexpr,
             HAS_GRAD: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    n = tl.load(meta + t * NCOL + 6)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    w = displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT, DIST, NCOL, BLOCK, HAS_SRC)
    wp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    store_value(wp + offs, w, mask, KIND)
    if HAS_GRAD:
        gp = tl.load(meta + t * NCOL + 2).to(tl.pointer_type(DT))
        g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
        store_value(gp + offs, g * grad_scale, mask, KIND)


def _launch(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter, sources):
    T.check(params, (("grads", grads or []),), filter, sources)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, sflat, nchunks = T.build(idx, params, tensor_ids, scales, sources, grads)
        if nchunks:
            _perturb[(nchunks,)](meta, chunks, sflat, float(coef), float(grad_scale), seed, c1hi, step32,
                                 DT=T.triton_dtype(dtype), KIND=T.KIND[dtype], DIST=T.DIST[distribution],
                                 NCOL=T.NCOL, BLOCK=T.BLOCK, HAS_SRC=sources is not None,
                                 HAS_GRAD=grads is not None, enable_fp_fusion=False)


def perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None):
    _launch(params, None, scales, coef, 1.0, seed, step, tensor_ids, sample, distribution, filter, sources)


def restore_(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter,
             sources=None):
    _launch(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter, sources)
