"""ssgd_fused::norms on CUDA: per-chunk partial sums of w^2 (float64) and u^2, then one program per
tensor adds its chunks' partials in a fixed order (deterministic, no floating-point atomics)."""

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._noise import noise_sq_chunk


@triton.jit
def _norms_partial(meta, chunks, part, seed, c1hi, step, DT: tl.constexpr, DIST: tl.constexpr,
                   NCOL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    wp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    n = tl.load(meta + t * NCOL + 6)
    tid = tl.load(meta + t * NCOL + 7)
    offs = start + tl.arange(0, BLOCK)
    w = tl.load(wp + offs, mask=offs < n, other=0.0).to(tl.float64)
    tl.store(part + 2 * pid, tl.sum(w * w, axis=0))
    u2 = noise_sq_chunk(seed, start, n, c1hi, tid, step, DIST, BLOCK)
    tl.store(part + 2 * pid + 1, u2.to(tl.float64))


@triton.jit
def _norms_finish(meta, part, out, NCOL: tl.constexpr, RBLOCK: tl.constexpr):
    t = tl.program_id(0)
    clo = tl.load(meta + t * NCOL + 9)
    chi = tl.load(meta + t * NCOL + 10)
    accw = tl.zeros((RBLOCK,), tl.float64)
    accu = tl.zeros((RBLOCK,), tl.float64)
    for c in range(clo, chi, RBLOCK):
        idx = c + tl.arange(0, RBLOCK)
        m = idx < chi
        accw += tl.load(part + 2 * idx, mask=m, other=0.0)
        accu += tl.load(part + 2 * idx + 1, mask=m, other=0.0)
    tl.store(out + 2 * t, tl.sum(accw, axis=0))
    tl.store(out + 2 * t + 1, tl.sum(accu, axis=0))


def finish(meta, part, nt, device, ncol=T.NCOL):
    out = torch.empty(nt, 2, dtype=torch.float64, device=device)
    _norms_finish[(nt,)](meta, part, out, NCOL=ncol, RBLOCK=256)
    return out


def partials_into(part, meta, chunks, nchunks, dtype, seed, c1hi, step, dist):
    _norms_partial[(nchunks,)](meta, chunks, part, seed, c1hi, step, DT=T.triton_dtype(dtype), DIST=T.DIST[dist],
                               NCOL=T.NCOL, BLOCK=T.BLOCK, enable_fp_fusion=False)


def norms(params, seed, step, tensor_ids, sample, distribution, filter):
    T.check(params, filter=filter)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    w2 = [None] * len(params)
    u2 = [None] * len(params)
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, _, nchunks = T.build(idx, params, tensor_ids)
        dev = params[idx[0]].device
        part = torch.zeros(max(nchunks, 1), 2, dtype=torch.float64, device=dev)
        if nchunks:
            partials_into(part, meta, chunks, nchunks, dtype, seed, c1hi, step32, distribution)
        out = finish(meta, part, len(idx), dev)
        for k, i in enumerate(idx):
            w2[i] = out[k, 0:1].clone()
            u2[i] = out[k, 1:2].clone()
    return w2, u2
