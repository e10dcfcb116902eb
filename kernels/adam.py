"""ssgd_fused::restore_update_adam_ on CUDA: restore, mean gradient and torch.optim.Adam / AdamW's update
in one pass (float32 arithmetic), optionally with the next step's norms of the updated weights."""

import math

import torch
import triton
import triton.language as tl

from . import _tables as T
from ._device import chunk_of, displaced, ptr, scale_grad, store_weights_and_next_norms
from ._noise import store_value
from ._reduce import next_norms_into
from ._tables import B1, B2, B3


@triton.jit
def _adam(meta, fmeta, chunks, sflat, part, coef, grad_scale, seed, c1hi, step, next_step, w1, beta2, omb2, eps,
          wd, decay, sgn, DT: tl.constexpr, KIND: tl.constexpr, DIST: tl.constexpr,
          BLOCK: tl.constexpr, HAS_SRC: tl.constexpr, COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
          AMS: tl.constexpr, SMALL_W: tl.constexpr, NEXT: tl.constexpr, FILTER: tl.constexpr):
    t, start, n, offs, mask = chunk_of(meta, chunks, BLOCK)
    w = displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT, DIST, BLOCK, HAS_SRC, FILTER)
    d = sgn * scale_grad(meta, t, offs, mask, grad_scale, DT, KIND)
    if DECOUPLED:
        w = w * decay
    if COUPLED:
        d = tl.fma(w, wd, d)
    mp = ptr(meta, t, B1, DT)
    vp = ptr(meta, t, B2, DT)
    mo = tl.load(mp + offs, mask=mask, other=0.0).to(tl.float32)
    diff = d - mo
    if SMALL_W:  # ATen lerp
        mn = tl.fma(w1, diff, mo)
    else:
        mn = tl.fma(w1 - 1.0, diff, d)
    store_value(mp + offs, mn, mask, KIND)
    vn = tl.fma(omb2 * d, d, tl.load(vp + offs, mask=mask, other=0.0).to(tl.float32) * beta2)
    store_value(vp + offs, vn, mask, KIND)
    m = tl.load(mp + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(vp + offs, mask=mask, other=0.0).to(tl.float32)
    if AMS:
        xp = ptr(meta, t, B3, DT)
        x = tl.maximum(tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32), v)
        store_value(xp + offs, x, mask, KIND)
        v = x
    step_size = tl.load(fmeta + 2 * t)
    bc2 = tl.load(fmeta + 2 * t + 1)
    denom = tl.sqrt_rn(v) / bc2 + eps
    w_new = w + (-step_size * m) / denom
    store_weights_and_next_norms(meta, t, start, n, offs, mask, w_new, part, seed, c1hi, next_step, DT, KIND, DIST,
                                 BLOCK, NEXT)


def restore_update_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scales, coef, grad_scale, seed, step,
                         tensor_ids, sample, distribution, filter, sources, steps, lr, beta1, beta2, eps,
                         weight_decay, decoupled_weight_decay, amsgrad, maximize, next_w_sq=(), next_u_sq=(),
                         next_step=0, element_offsets=None):
    T.check(params, (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                     ("max_exp_avg_sqs", max_exp_avg_sqs if amsgrad else [])), sources)
    offsets = T.offsets(params, element_offsets, distribution)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    next_on = len(next_w_sq) > 0
    w1 = 1 - beta1
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, sflat, nchunks = T.build(idx, params, tensor_ids, scales, sources, grads, exp_avgs, exp_avg_sqs,
                                               max_exp_avg_sqs if amsgrad else None, filter=filter,
                                               offsets=offsets)
        # per tensor, as torch.optim.adam computes them in Python floats
        fm = [(lr / (1 - beta1 ** steps[i]), math.sqrt(1 - beta2 ** steps[i])) for i in idx]
        dev = params[idx[0]].device
        fmeta = torch.tensor(fm, dtype=torch.float32).to(dev)
        part = torch.zeros(max(nchunks, 1), 2, dtype=torch.float64, device=dev)
        if nchunks:
            _adam[(nchunks,)](meta, fmeta, chunks, sflat, part, float(coef), float(grad_scale), seed, c1hi, step32,
                              next_step & 0xFFFFFFFF, float(w1), float(beta2), float(1 - beta2), float(eps),
                              float(weight_decay), float(1 - lr * weight_decay), -1.0 if maximize else 1.0,
                              DT=T.triton_dtype(dtype), KIND=T.KIND[dtype], DIST=T.DIST[distribution],
                              BLOCK=T.BLOCK, HAS_SRC=sources is not None,
                              COUPLED=weight_decay != 0 and not decoupled_weight_decay,
                              DECOUPLED=weight_decay != 0 and decoupled_weight_decay, AMS=bool(amsgrad),
                              SMALL_W=w1 < 0.5, NEXT=next_on and not filter, FILTER=bool(filter),
                              enable_fp_fusion=False)
        if next_on:
            next_norms_into(next_w_sq, next_u_sq, idx, params, meta, part, nchunks, seed, next_step, tensor_ids,
                            sample, distribution, filter, offsets)
