"""Norm passes: per-chunk partial sums of w^2 (float64) and u^2, then one program per tensor (or,
for the filter scope, per row) adds its chunks' partials in a fixed order (deterministic, no
floating-point atomics). Used by the norms op and, for the next step's norms, by the update ops."""

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._device import chunk_of, chunk_u_sq, col, ptr
from ._noise import noise_at
from ._tables import NOFF, TID, W


@triton.jit
def _norms_partial(meta, chunks, part, seed, c1hi, step, DT: tl.constexpr, DIST: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t, start, n, offs, mask = chunk_of(meta, chunks, BLOCK)
    w = tl.load(ptr(meta, t, W, DT) + offs, mask=mask, other=0.0).to(tl.float64)
    tl.store(part + 2 * pid, tl.sum(w * w, axis=0))
    tl.store(part + 2 * pid + 1, chunk_u_sq(meta, t, start, n, seed, c1hi, step, DIST, BLOCK))


@triton.jit
def _norms_rows_partial(meta, chunks, part, seed, c1hi, step, DT: tl.constexpr, DIST: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Filter scope: chunks lie inside one row and may start anywhere, so the noise is generated
    per element (noise_at), at the full tensor's indices (NOFF + local)."""
    pid = tl.program_id(0)
    t = tl.load(chunks + 3 * pid)
    start = tl.load(chunks + 3 * pid + 1)
    end = tl.load(chunks + 3 * pid + 2)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < end
    w = tl.load(ptr(meta, t, W, DT) + offs, mask=m, other=0.0).to(tl.float64)
    tl.store(part + 2 * pid, tl.sum(w * w, axis=0))
    u = noise_at(seed, offs + col(meta, t, NOFF), c1hi, col(meta, t, TID), step, DIST)
    tl.store(part + 2 * pid + 1, tl.sum(tl.where(m, u * u, 0.0), axis=0).to(tl.float64))


@triton.jit
def _norms_finish(ranges, part, out, STRIDE: tl.constexpr, LO: tl.constexpr, RBLOCK: tl.constexpr):
    """out[t] = sum of part[ranges[t, LO] : ranges[t, LO + 1]] in a fixed order."""
    t = tl.program_id(0)
    clo = tl.load(ranges + t * STRIDE + LO)
    chi = tl.load(ranges + t * STRIDE + LO + 1)
    accw = tl.zeros((RBLOCK,), tl.float64)
    accu = tl.zeros((RBLOCK,), tl.float64)
    for c in range(clo, chi, RBLOCK):
        idx = c + tl.arange(0, RBLOCK)
        m = idx < chi
        accw += tl.load(part + 2 * idx, mask=m, other=0.0)
        accu += tl.load(part + 2 * idx + 1, mask=m, other=0.0)
    tl.store(out + 2 * t, tl.sum(accw, axis=0))
    tl.store(out + 2 * t + 1, tl.sum(accu, axis=0))


def finish(meta, part, nt, device):
    """(nt, 2) float64: per tensor of the table, the sums of its chunks' partials."""
    out = torch.empty(nt, 2, dtype=torch.float64, device=device)
    _norms_finish[(nt,)](meta, part, out, STRIDE=T.NCOL, LO=T.CLO, RBLOCK=256)
    return out


def norm_pass(params, seed, step, tensor_ids, sample, distribution, filter, offsets=None):
    """([||w||^2], [||u||^2]) per tensor (one entry) or per dim-0 slice (filter), float64; `offsets`:
    the checked element offsets (T.offsets), one per param, or None."""
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    w2 = [None] * len(params)
    u2 = [None] * len(params)
    for dtype, idx in T.groups_by_dtype(params).items():
        dev = params[idx[0]].device
        kw = dict(DT=T.triton_dtype(dtype), DIST=T.DIST[distribution], BLOCK=T.BLOCK, enable_fp_fusion=False)
        if filter:
            meta, chunks, nchunks, rc, nrows = T.build_rows(idx, params, tensor_ids, offsets)
            part = torch.zeros(max(nchunks, 1), 2, dtype=torch.float64, device=dev)
            if nchunks:
                _norms_rows_partial[(nchunks,)](meta, chunks, part, seed, c1hi, step32, **kw)
            out = torch.zeros(max(nrows, 1), 2, dtype=torch.float64, device=dev)
            if nrows:
                _norms_finish[(nrows,)](rc, part, out, STRIDE=2, LO=0, RBLOCK=256)
            r0 = 0
            for i in idx:
                nr = T.num_slices(params[i], True)
                w2[i], u2[i] = out[r0:r0 + nr, 0].clone(), out[r0:r0 + nr, 1].clone()
                r0 += nr
            continue
        meta, chunks, _, nchunks = T.build(idx, params, tensor_ids, offsets=offsets)
        part = torch.zeros(max(nchunks, 1), 2, dtype=torch.float64, device=dev)
        if nchunks:
            _norms_partial[(nchunks,)](meta, chunks, part, seed, c1hi, step32, **kw)
        out = finish(meta, part, len(idx), dev)
        for k, i in enumerate(idx):
            w2[i] = out[k, 0:1]  # one-element views of the one result tensor: no copy launch per tensor
            u2[i] = out[k, 1:2]
    return w2, u2


def next_norms_into(next_w_sq, next_u_sq, idx, params, meta, part, nchunks, seed, next_step, tensor_ids, sample,
                    distribution, filter, offsets):
    """After an update launch: the next step's norms into next_w_sq / next_u_sq (entries of size 0
    skipped). Tensor scope: from the update kernel's partials; filter scope: a norm pass."""
    dev = params[idx[0]].device
    if filter:
        w2, u2 = norm_pass([params[i] for i in idx], seed, next_step, [tensor_ids[i] for i in idx], sample,
                           distribution, True, [offsets[i] for i in idx])
        out = list(zip(w2, u2))
    else:
        fin = finish(meta, part, len(idx), dev) if nchunks else torch.zeros(len(idx), 2, dtype=torch.float64,
                                                                              device=dev)
        out = [(fin[k, 0:1], fin[k, 1:2]) for k in range(len(idx))]
    for k, i in enumerate(idx):
        if next_w_sq[i].numel():
            next_w_sq[i].copy_(out[k][0])
            next_u_sq[i].copy_(out[k][1])
