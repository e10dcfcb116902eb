"""Noise spec v1 inside Triton kernels: tl.philox (bit-identical to the spec, tested), Box-Muller with
the quadrant taken from the integer bits of the angle word and short polynomials for sin/cos on a
quarter turn (ssgd_fused.noise.SINCOS_POLY, as in csrc/noise_consts.h), and storage conversions.

Element order: a chunk of BLOCK elements starting at a multiple of 128 takes BLOCK // 4 Philox
blocks (one call per four gaussian or uniform values) or BLOCK // 128 blocks (rademacher). Element
indices here are the stream's (global) ones: a shard's chunks are laid out so that they start on
such a boundary of the full tensor (kernels/_tables.py)."""

import triton
import triton.language as tl

from ..noise import SINCOS_POLY as _P

# sin(pi/2 t), cos(pi/2 t) on |t| <= 1/2: the coefficients of ssgd_fused.noise.SINCOS_POLY
S0 = tl.constexpr(_P["S0"])
S1 = tl.constexpr(_P["S1"])
S2 = tl.constexpr(_P["S2"])
S3 = tl.constexpr(_P["S3"])
C1 = tl.constexpr(_P["C1"])
C2 = tl.constexpr(_P["C2"])
C3 = tl.constexpr(_P["C3"])
C4 = tl.constexpr(_P["C4"])

GAUSSIAN = tl.constexpr(0)
RADEMACHER = tl.constexpr(1)
UNIFORM = tl.constexpr(2)


@triton.jit
def _odd24(x):
    """2 * (x >> 9) + 1 as uint32 (< 2**24, exact in float32)."""
    return (x >> 9) * 2 + 1


@triton.jit
def _uniform(x):
    return _odd24(x).to(tl.float32) * 5.9604644775390625e-08  # * 2**-24, exact


@triton.jit
def _m2log(x):
    """r^2 = -2 ln uniform(x)."""
    return -2.0 * tl.log(_uniform(x))


@triton.jit
def _box_muller(xa, xb):
    r = tl.sqrt(_m2log(xa))
    v = _odd24(xb)
    q = (v + (1 << 21)) >> 22  # quadrant of the angle 2 pi v 2^-24 = (q + t) pi / 2
    t = (v.to(tl.int32) - (q << 22).to(tl.int32)).to(tl.float32) * 2.384185791015625e-07  # * 2**-22
    t2 = t * t
    s = ((S3 * t2 + S2) * t2 + S1) * t2 + S0
    s = s * t
    c = (((C4 * t2 + C3) * t2 + C2) * t2 + C1) * t2 + 1.0
    odd = (q & 1) != 0
    cv = tl.where(odd, s, c)
    sv = tl.where(odd, c, s)
    cneg = ((q + 1) & 2) != 0
    sneg = (q & 2) != 0
    zc = tl.where(cneg, -r, r) * cv
    zs = tl.where(sneg, -r, r) * sv
    return zc, zs


@triton.jit
def _words(seed, blocks, c1hi, tid, step):
    """Philox words of int64 block indices `blocks` (one call per block)."""
    c0 = (blocks & 0xFFFFFFFF).to(tl.uint32)
    c1 = (((blocks >> 32) & 0xFFFF) | c1hi).to(tl.uint32)
    c2 = (blocks * 0 + tid).to(tl.uint32)
    c3 = (blocks * 0 + step).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3, 10)


@triton.jit
def _quad(a, b, c, d, BLOCK: tl.constexpr):
    """(BLOCK//4,) x 4 -> (BLOCK,) in the order a0 b0 c0 d0 a1 b1 ..."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (BLOCK,))


@triton.jit
def noise_chunk(seed, start, c1hi, tid, step, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """The spec's noise for elements start .. start + BLOCK - 1 (start a multiple of 128)."""
    if DIST == RADEMACHER:
        nb: tl.constexpr = BLOCK // 128
        blocks = (start // 128 + tl.arange(0, nb)).to(tl.int64)
        x0, x1, x2, x3 = _words(seed, blocks, c1hi, tid, step)
        w = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (nb, 4))
        bits = (w[:, :, None] >> tl.arange(0, 32).to(tl.uint32)[None, None, :]) & 1
        u = tl.reshape(bits, (BLOCK,)).to(tl.float32) * 2.0 - 1.0
    else:
        nb4: tl.constexpr = BLOCK // 4
        blocks = (start // 4 + tl.arange(0, nb4)).to(tl.int64)
        x0, x1, x2, x3 = _words(seed, blocks, c1hi, tid, step)
        if DIST == GAUSSIAN:
            z0, z1 = _box_muller(x0, x1)
            z2, z3 = _box_muller(x2, x3)
            u = _quad(z0, z1, z2, z3, BLOCK)
        else:
            u = _quad(_uniform(x0), _uniform(x1), _uniform(x2), _uniform(x3), BLOCK) * 2.0 - 1.0
    return u


@triton.jit
def _pick(k, a, b, c, d):
    return tl.where(k == 0, a, tl.where(k == 1, b, tl.where(k == 2, c, d)))


@triton.jit
def noise_at(seed, offs, c1hi, tid, step, DIST: tl.constexpr):
    """The spec's noise at arbitrary int64 element indices `offs` (one Philox call per element:
    for chunks that do not start on a block boundary, e.g. rows in the filter scope's norm pass).
    Gaussian: the element's word pair is picked first, so one Box-Muller per element."""
    if DIST == RADEMACHER:
        x0, x1, x2, x3 = _words(seed, offs >> 7, c1hi, tid, step)
        k = offs & 127
        x = _pick(k >> 5, x0, x1, x2, x3)
        u = ((x >> (k & 31).to(tl.uint32)) & 1).to(tl.float32) * 2.0 - 1.0
    else:
        x0, x1, x2, x3 = _words(seed, offs >> 2, c1hi, tid, step)
        a = offs & 3
        if DIST == GAUSSIAN:
            hi = a >= 2
            zc, zs = _box_muller(tl.where(hi, x2, x0), tl.where(hi, x3, x1))
            u = tl.where((a & 1) != 0, zs, zc)
        else:
            u = _uniform(_pick(a, x0, x1, x2, x3)) * 2.0 - 1.0
    return u


@triton.jit
def _inside(e, lo, hi):
    return (e >= lo) & (e < hi)


@triton.jit
def noise_sq_chunk(seed, start, lo, hi, c1hi, tid, step, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of u^2 over the elements of start .. start + BLOCK - 1 (start a multiple of 128) that lie
    in [lo, hi), float32: the chunk's part of the tensor (or shard) [lo, hi), in stream indices."""
    if DIST == RADEMACHER:
        return (tl.minimum(hi - start, BLOCK) - tl.maximum(lo - start, 0)).to(tl.float32)
    elif DIST == GAUSSIAN:
        # whole blocks by r^2 = -2 ln u (no sin/cos); ragged first / last blocks are generated
        nb4: tl.constexpr = BLOCK // 4
        blocks = (start // 4 + tl.arange(0, nb4)).to(tl.int64)
        x0, x1, x2, x3 = _words(seed, blocks, c1hi, tid, step)
        e = start + tl.arange(0, nb4).to(tl.int64) * 4
        whole = (e >= lo) & ((e + 4) <= hi)
        r2 = tl.where(whole, _m2log(x0) + _m2log(x2), 0.0)
        z0, z1 = _box_muller(x0, x1)
        z2, z3 = _box_muller(x2, x3)
        part = tl.where(_inside(e, lo, hi), z0 * z0, 0.0) + tl.where(_inside(e + 1, lo, hi), z1 * z1, 0.0) + \
            tl.where(_inside(e + 2, lo, hi), z2 * z2, 0.0) + tl.where(_inside(e + 3, lo, hi), z3 * z3, 0.0)
        return tl.sum(tl.where(whole, r2, part), axis=0)
    else:
        u = noise_chunk(seed, start, c1hi, tid, step, DIST, BLOCK)
        offs = start + tl.arange(0, BLOCK)
        return tl.sum(tl.where(_inside(offs, lo, hi), u * u, 0.0), axis=0)


@triton.jit
def store_value(ptr, x, mask, KIND: tl.constexpr):
    """Stores float32 x as the pointer's dtype; KIND 1 = bfloat16, rounded to nearest even by bit
    arithmetic (the interpreter's float -> bfloat16 cast truncates)."""
    if KIND == 1:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        nan = (b & 0x7FFFFFFF) > 0x7F800000
        r = tl.where(nan, (b >> 16) | 0x40, r)
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
