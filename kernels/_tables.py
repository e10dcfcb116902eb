"""Host side of the multi-tensor launches: one launch per pass and dtype, whatever the number of
tensors. Each program handles one chunk of BLOCK elements of one tensor; the tensors' addresses
and sizes travel in a small int64 table (one row per tensor, the columns below), the chunks in
another.

Sharded tensors (element_offsets): column NOFF holds the tensor's offset in its full tensor. Its
chunks are laid out on BLOCK boundaries of the GLOBAL index (the first one starts at local element
-(NOFF % BLOCK), its lanes below 0 masked), so that every chunk's noise starts on a Philox block
and the block generator (noise_chunk) serves any offset: at most one extra, partly masked chunk per
tensor, no per-element generation. With NOFF % BLOCK == 0 the layout is the unsharded one."""

from __future__ import annotations

import collections

import torch
import triton.language as tl

from ..noise import check_element_offsets
from ..reference import num_slices

BLOCK = 1024  # elements per program (a multiple of 128: chunks start on rademacher blocks)

# Columns of the per-tensor table, read by name in the kernels (ssgd_fused.kernels._device.col).
W = tl.constexpr(0)  # the parameter's address
SRC = tl.constexpr(1)  # its clean copy (exact restore), or 0
G = tl.constexpr(2)  # its gradient, or 0
B1 = tl.constexpr(3)  # optimizer buffers: SGD momentum; Adam exp_avg,
B2 = tl.constexpr(4)  # exp_avg_sq,
B3 = tl.constexpr(5)  # max_exp_avg_sq
NUMEL = tl.constexpr(6)
TID = tl.constexpr(7)  # the spec's tensor_id
SOFF = tl.constexpr(8)  # offset of its scales in the flat scale vector, -1 for no noise
CLO = tl.constexpr(9)  # its chunks: [CLO, CHI) in the chunk table
CHI = tl.constexpr(10)
ROWLEN = tl.constexpr(11)  # elements per dim-0 slice (filter scope)
FLAG = tl.constexpr(12)  # a per-tensor flag: SGD's "first step, the momentum buffer is d"
NOFF = tl.constexpr(13)  # element offset in the full tensor: local element e takes noise element NOFF + e
NCOL = tl.constexpr(14)

KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DIST = {"gaussian": 0, "rademacher": 1, "uniform": 2}


def triton_dtype(dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _addr(t):
    return 0 if t is None else t.data_ptr()


def _at(xs, i):
    return None if xs is None else xs[i]


def check(params, others=(), sources=None):
    """Dtypes the kernels take; every tensor contiguous and on params[0]'s device."""
    dtypes = {p.dtype for p in params}
    if not dtypes <= set(KIND):
        raise RuntimeError(f"ssgd_fused: the Triton kernels support float32, bfloat16 and float16, got {dtypes}")
    for name, ts in (("params", params), *others, ("sources", sources or [])):
        for i, t in enumerate(ts):
            if t is None:
                continue
            if not t.is_contiguous():
                raise RuntimeError(f"ssgd_fused: {name}[{i}] must be contiguous")
            if t.device != params[0].device:
                raise RuntimeError(f"ssgd_fused: {name}[{i}] is on {t.device}, params[0] on {params[0].device}")


def offsets(params, element_offsets, distribution):
    """element_offsets checked (ValueError naming it), one int per param (None: zeros)."""
    return check_element_offsets(element_offsets, [p.numel() for p in params], distribution)


def groups_by_dtype(params):
    out = {}
    for i, p in enumerate(params):
        out.setdefault(p.dtype, []).append(i)
    return out


def build(idx, params, tensor_ids, scales=None, sources=None, grads=None, b1=None, b2=None, b3=None, flags=None,
          filter=False, offsets=None):
    """(meta, chunks, scales_flat, nchunks) device tensors for the tensors `idx` of the lists; with
    `filter`, a tensor's scales hold one entry per slice along dim 0 (row length in ROWLEN); with
    `offsets` (one int per param), chunks on global BLOCK boundaries (the module's docstring)."""
    rows, sizes = [], []
    flat, off, nchunks = [], 0, 0
    for i in idx:
        p = params[i]
        n = p.numel()
        s = scales[i] if scales is not None else None
        soff = -1
        if s is not None and s.numel():
            soff = off
            flat.append(s.reshape(-1))
            off += s.numel()
        noff = int(offsets[i]) if offsets is not None else 0
        first = -(noff % BLOCK) if n else 0
        sizes.append((n, first))
        clo = nchunks
        nchunks += len(range(first, n, BLOCK))
        row = [0] * NCOL.value
        row[W], row[SRC], row[G] = _addr(p), _addr(_at(sources, i)), _addr(_at(grads, i))
        row[B1], row[B2], row[B3] = _addr(_at(b1, i)), _addr(_at(b2, i)), _addr(_at(b3, i))
        row[NUMEL], row[TID], row[SOFF], row[CLO], row[CHI] = n, int(tensor_ids[i]), soff, clo, nchunks
        row[ROWLEN] = max(1, n // max(1, num_slices(p, filter)))
        row[FLAG] = int(bool(flags[i])) if flags is not None else 0
        row[NOFF] = noff
        rows.append(row)
    dev = params[idx[0]].device
    meta = _upload(dev, ("meta", tuple(map(tuple, rows))), lambda: rows)

    def chunk_list():
        out = [(k, c) for k, (n, first) in enumerate(sizes) for c in range(first, n, BLOCK)]
        return out or [(0, 0)]

    ch = _upload(dev, ("chunks", tuple(sizes)), chunk_list)
    # one conversion for all scales (they are float64 on the device already)
    sflat = torch.cat(flat).to(device=dev, dtype=torch.float32) if flat else torch.zeros(1, dtype=torch.float32,
                                                                                        device=dev)
    return meta, ch, sflat, nchunks


# Launch tables, uploaded once per content and reused: a table holds only the tensors' addresses,
# sizes, ids and flags, which repeat from pass to pass and step to step (the caching allocator
# hands gradients the same addresses), so a step usually uploads nothing. Keyed by content, a hit
# is always right, whatever was freed or reallocated in between; the kernels only read tables.
_TABLES: collections.OrderedDict = collections.OrderedDict()
TABLE_CACHE_SIZE = 32


def _upload(dev, key, make):
    key = (str(dev), key)
    t = _TABLES.get(key)
    if t is None:
        t = torch.tensor(make(), dtype=torch.int64).to(dev, non_blocking=True)
        _TABLES[key] = t
        while len(_TABLES) > TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return t


def build_rows(idx, params, tensor_ids, offsets=None):
    """For the filter scope's norm pass: chunks that never cross a row, (tensor, start, end) each,
    a row's chunks consecutive; and per row the range of its chunks. The noise is generated per
    element there, so a shard's offset (column NOFF) needs no other layout."""
    rows, chunks, row_chunks = [], [], []
    for k, i in enumerate(idx):
        p = params[i]
        n = p.numel()
        nr = num_slices(p, True)
        L = n // nr if nr else 0
        row = [0] * NCOL.value
        row[W], row[NUMEL], row[TID], row[SOFF], row[ROWLEN] = _addr(p), n, int(tensor_ids[i]), -1, max(L, 1)
        row[NOFF] = int(offsets[i]) if offsets is not None else 0
        rows.append(row)
        for r in range(nr):
            lo = len(chunks)
            chunks.extend((k, s, min(s + BLOCK, (r + 1) * L)) for s in range(r * L, (r + 1) * L, BLOCK))
            row_chunks.append((lo, len(chunks)))
    dev = params[idx[0]].device
    meta = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
    ch = torch.tensor(chunks if chunks else [(0, 0, 0)], dtype=torch.int64).to(dev, non_blocking=True)
    rc = torch.tensor(row_chunks if row_chunks else [(0, 0)], dtype=torch.int64).to(dev, non_blocking=True)
    return meta, ch, len(chunks), rc, len(row_chunks)


def stream_args(seed, step, sample):
    """seed as an unsigned 64-bit int (the schema carries it as int64), c1 high bits, step & 2**32-1."""
    seed = seed + (1 << 64) if seed < 0 else seed
    return seed, (sample << 16), step & 0xFFFFFFFF
