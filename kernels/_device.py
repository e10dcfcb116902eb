"""Device helpers shared by the per-op kernels: table columns by name, a program's chunk, the
displaced weights, the scaled gradient, and the store of updated weights with the next step's
partial norms."""

import triton
import triton.language as tl

from ._noise import noise_chunk, noise_sq_chunk, store_value
from ._tables import NCOL, NOFF, NUMEL, ROWLEN, SOFF, SRC, TID, G, W


@triton.jit
def col(meta, t, C: tl.constexpr):
    """Column C of tensor t's row of the table (ssgd_fused.kernels._tables)."""
    return tl.load(meta + t * NCOL + C)


@triton.jit
def ptr(meta, t, C: tl.constexpr, DT: tl.constexpr):
    """Column C of tensor t's row as a pointer to DT."""
    return tl.load(meta + t * NCOL + C).to(tl.pointer_type(DT))


@triton.jit
def chunk_of(meta, chunks, BLOCK: tl.constexpr):
    """(tensor, first element, numel, element offsets, mask) of this program's chunk. A shard's first
    chunk may start below element 0 (its chunks lie on the full tensor's BLOCK boundaries): masked."""
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    n = col(meta, t, NUMEL)
    offs = start + tl.arange(0, BLOCK)
    return t, start, n, offs, (offs >= 0) & (offs < n)


@triton.jit
def displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT: tl.constexpr, DIST: tl.constexpr,
              BLOCK: tl.constexpr, HAS_SRC: tl.constexpr, FILTER: tl.constexpr):
    """float32 (src or w) + coef * s * u for one chunk; with FILTER, s is the element's row's scale."""
    if HAS_SRC:
        bp = ptr(meta, t, SRC, DT)
    else:
        bp = ptr(meta, t, W, DT)
    w = tl.load(bp + offs, mask=mask, other=0.0).to(tl.float32)
    soff = col(meta, t, SOFF)
    if (soff >= 0) & (coef != 0.0):
        if FILTER:
            s = tl.load(sflat + soff + offs // col(meta, t, ROWLEN), mask=mask, other=0.0)
        else:
            s = tl.load(sflat + soff)
        u = noise_chunk(seed, start + col(meta, t, NOFF), c1hi, col(meta, t, TID), step, DIST, BLOCK)
        w = w + (coef * s) * u
    return w


@triton.jit
def scale_grad(meta, t, offs, mask, grad_scale, DT: tl.constexpr, KIND: tl.constexpr):
    """g *= grad_scale in place; returns the stored (rounded) value as float32."""
    gp = ptr(meta, t, G, DT)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    store_value(gp + offs, g, mask, KIND)
    return tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_weights_and_next_norms(meta, t, start, n, offs, mask, w_new, part, seed, c1hi, next_step,
                                 DT: tl.constexpr, KIND: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr,
                                 NEXT: tl.constexpr):
    """Stores the updated weights; with NEXT, this chunk's partial ||w||^2 and the next step's ||u||^2."""
    wp = ptr(meta, t, W, DT)
    store_value(wp + offs, w_new, mask, KIND)
    if NEXT:
        pid = tl.program_id(0)
        wq = tl.load(wp + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(part + 2 * pid, tl.sum(wq * wq, axis=0))
        tl.store(part + 2 * pid + 1, chunk_u_sq(meta, t, start, n, seed, c1hi, next_step, DIST, BLOCK))


@triton.jit
def chunk_u_sq(meta, t, start, n, seed, c1hi, step, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """||u||^2 (float64) of the chunk's elements of tensor t, in the full tensor's stream indices."""
    noff = col(meta, t, NOFF)
    u2 = noise_sq_chunk(seed, start + noff, noff, noff + n, c1hi, col(meta, t, TID), step, DIST, BLOCK)
    return u2.to(tl.float64)
