"""ssgd_fused::perturb_ and ::restore_ on CUDA: w = (src or w) + coef * s * u, and g *= grad_scale."""

import triton
import triton.language as tl

from . import _tables as T
from ._noise import noise_chunk, noise_sq_chunk, store_value


@triton.jit
def displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT: tl.constexpr, DIST: tl.constexpr,
              NCOL: tl.constexpr, BLOCK: tl.constexpr, HAS_SRC: tl.constexpr, FILTER: tl.constexpr):
    """float32 (src or w) + coef * s * u for one chunk (shared by every update kernel); with FILTER,
    s is the element's row's scale."""
    if HAS_SRC:
        bp = tl.load(meta + t * NCOL + 1).to(tl.pointer_type(DT))
    else:
        bp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    w = tl.load(bp + offs, mask=mask, other=0.0).to(tl.float32)
    soff = tl.load(meta + t * NCOL + 8)
    if (soff >= 0) & (coef != 0.0):
        tid = tl.load(meta + t * NCOL + 7)
        if FILTER:
            s = tl.load(sflat + soff + offs // tl.load(meta + t * NCOL + 11), mask=mask, other=0.0)
        else:
            s = tl.load(sflat + soff)
        u = noise_chunk(seed, start, c1hi, tid, step, DIST, BLOCK)
        w = w + (coef * s) * u
    return w


@triton.jit
def chunk_of(meta, chunks, NCOL: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor, first element, numel, element offsets, mask) of this program's chunk."""
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    n = tl.load(meta + t * NCOL + 6)
    offs = start + tl.arange(0, BLOCK)
    return t, start, n, offs, offs < n


@triton.jit
def scale_grad(meta, t, offs, mask, grad_scale, DT: tl.constexpr, KIND: tl.constexpr, NCOL: tl.constexpr):
    """g *= grad_scale in place; returns the stored (rounded) value as float32."""
    gp = tl.load(meta + t * NCOL + 2).to(tl.pointer_type(DT))
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    store_value(gp + offs, g, mask, KIND)
    return tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_weights_and_next_norms(meta, t, start, n, offs, mask, w_new, part, seed, c1hi, next_step,
                                 DT: tl.constexpr, KIND: tl.constexpr, DIST: tl.constexpr, NCOL: tl.constexpr,
                                 BLOCK: tl.constexpr, NEXT: tl.constexpr):
    """Stores the updated weights; with NEXT, this chunk's partial ||w||^2 and the next step's ||u||^2."""
    wp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    store_value(wp + offs, w_new, mask, KIND)
    if NEXT:
        pid = tl.program_id(0)
        wq = tl.load(wp + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(part + 2 * pid, tl.sum(wq * wq, axis=0))
        tid = tl.load(meta + t * NCOL + 7)
        tl.store(part + 2 * pid + 1, noise_sq_chunk(seed, start, n, c1hi, tid, next_step, DIST, BLOCK).to(tl.float64))


@triton.jit
def _perturb(meta, chunks, sflat, coef, grad_scale, seed, c1hi, step, DT: tl.constexpr, KIND: tl.constexpr,
             DIST: tl.constexpr, NCOL: tl.constexpr, BLOCK: tl.constexpr, HAS_SRC: tl.constexpr,
             HAS_GRAD: tl.constexpr, FILTER: tl.constexpr):
    t, start, n, offs, mask = chunk_of(meta, chunks, NCOL, BLOCK)
    w = displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT, DIST, NCOL, BLOCK, HAS_SRC, FILTER)
    wp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    store_value(wp + offs, w, mask, KIND)
    if HAS_GRAD:
        scale_grad(meta, t, offs, mask, grad_scale, DT, KIND, NCOL)


def _launch(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter, sources):
    T.check(params, (("grads", grads or []),), filter, sources)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, sflat, nchunks = T.build(idx, params, tensor_ids, scales, sources, grads, filter=filter)
        if nchunks:
            _perturb[(nchunks,)](meta, chunks, sflat, float(coef), float(grad_scale), seed, c1hi, step32,
                                 DT=T.triton_dtype(dtype), KIND=T.KIND[dtype], DIST=T.DIST[distribution],
                                 NCOL=T.NCOL, BLOCK=T.BLOCK, HAS_SRC=sources is not None,
                                 HAS_GRAD=grads is not None, FILTER=bool(filter), enable_fp_fusion=False)


def perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None):
    _launch(params, None, scales, coef, 1.0, seed, step, tensor_ids, sample, distribution, filter, sources)


def restore_(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter,
             sources=None):
    _launch(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter, sources)
