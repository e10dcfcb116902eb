"""ssgd_fused::restore_update_sgd_ on CUDA: restore, mean gradient and torch.optim.SGD's update in one
pass (float32 arithmetic, the fused multiply-adds of torch's ATen ops spelled out), optionally with
the next step's norms of the updated weights."""

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._device import chunk_of, col, displaced, ptr, scale_grad, store_weights_and_next_norms
from ._noise import store_value
from ._reduce import next_norms_into
from ._tables import B1, FLAG


@triton.jit
def _sgd(meta, chunks, sflat, part, coef, grad_scale, seed, c1hi, step, next_step, lr, momentum, omd, wd, sgn,
         DT: tl.constexpr, KIND: tl.constexpr, DIST: tl.constexpr, BLOCK: tl.constexpr, HAS_SRC: tl.constexpr,
         MOM: tl.constexpr, NEST: tl.constexpr, WD: tl.constexpr, NEXT: tl.constexpr, FILTER: tl.constexpr):
    t, start, n, offs, mask = chunk_of(meta, chunks, BLOCK)
    w = displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT, DIST, BLOCK, HAS_SRC, FILTER)
    d = sgn * scale_grad(meta, t, offs, mask, grad_scale, DT, KIND)
    if WD:
        d = tl.fma(w, wd, d)
    if MOM:
        bp = ptr(meta, t, B1, DT)
        init = col(meta, t, FLAG) != 0  # first step: the buffer is d (torch's clone)
        b_old = tl.load(bp + offs, mask=mask, other=0.0).to(tl.float32)  # unused (maybe garbage) if init
        b = tl.where(init, d, tl.fma(d, omd, b_old * momentum))
        store_value(bp + offs, b, mask, KIND)
        b = tl.load(bp + offs, mask=mask, other=0.0).to(tl.float32)
        if NEST:
            d = tl.fma(b, momentum, d)
        else:
            d = b
    w_new = tl.fma(d, -lr, w)
    store_weights_and_next_norms(meta, t, start, n, offs, mask, w_new, part, seed, c1hi, next_step, DT, KIND, DIST,
                                 BLOCK, NEXT)


def restore_update_sgd_(params, grads, momentum_buffers, scales, coef, grad_scale, seed, step, tensor_ids, sample,
                        distribution, filter, sources, lr, momentum, dampening, weight_decay, nesterov, maximize,
                        init_momentum, next_w_sq=(), next_u_sq=(), next_step=0, element_offsets=None):
    T.check(params, (("grads", grads), ("momentum_buffers", momentum_buffers if momentum else [])), sources)
    offsets = T.offsets(params, element_offsets, distribution)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    next_on = len(next_w_sq) > 0
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, sflat, nchunks = T.build(idx, params, tensor_ids, scales, sources, grads,
                                               momentum_buffers if momentum else None,
                                               flags=init_momentum if momentum else None, filter=filter,
                                               offsets=offsets)
        part = torch.zeros(max(nchunks, 1), 2, dtype=torch.float64, device=params[idx[0]].device)
        if nchunks:
            _sgd[(nchunks,)](meta, chunks, sflat, part, float(coef), float(grad_scale), seed, c1hi, step32,
                             next_step & 0xFFFFFFFF, float(lr), float(momentum), float(1 - dampening),
                             float(weight_decay), -1.0 if maximize else 1.0, DT=T.triton_dtype(dtype),
                             KIND=T.KIND[dtype], DIST=T.DIST[distribution], BLOCK=T.BLOCK,
                             HAS_SRC=sources is not None, MOM=momentum != 0, NEST=bool(nesterov and momentum),
                             WD=weight_decay != 0, NEXT=next_on and not filter, FILTER=bool(filter),
                             enable_fp_fusion=False)
        if next_on:
            next_norms_into(next_w_sq, next_u_sq, idx, params, meta, part, nchunks, seed, next_step, tensor_ids,
                            sample, distribution, filter, offsets)
