"""ssgd_fused::restore_update_adam_ on CUDA: restore, mean gradient and torch.optim.Adam / AdamW's update
in one pass (float32 arithmetic), optionally with the next step's norms of the updated weights."""

import math

import torch
import triton
import triton.language as tl

from . import _tables as T
from . import norms as N
from ._noise import noise_sq_chunk, store_value
from .perturb import displaced


@triton.jit
def _adam(meta, fmeta, chunks, sflat, part, coef, grad_scale, seed, c1hi, step, next_step, w1, beta2, omb2, eps,
          wd, decay, sgn, DT: tl.constexpr, KIND: tl.constexpr, DIST: tl.constexpr, NCOL: tl.constexpr,
          BLOCK: tl.constexpr, HAS_SRC: tl.constexpr, COUPLED: tl.constexpr, DECOUPLED: tl.constexpr,
          AMS: tl.constexpr, SMALL_W: tl.constexpr, NEXT: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    n = tl.load(meta + t * NCOL + 6)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    w = displaced(meta, t, start, offs, mask, sflat, coef, seed, c1hi, step, DT, DIST, NCOL, BLOCK, HAS_SRC)
    gp = tl.load(meta + t * NCOL + 2).to(tl.pointer_type(DT))
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    store_value(gp + offs, g, mask, KIND)
    d = sgn * tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    if DECOUPLED:
        w = w * decay
    if COUPLED:
        d = tl.fma(w, wd, d)
    mp = tl.load(meta + t * NCOL + 3).to(tl.pointer_type(DT))
    vp = tl.load(meta + t * NCOL + 4).to(tl.pointer_type(DT))
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
        xp = tl.load(meta + t * NCOL + 5).to(tl.pointer_type(DT))
        x = tl.maximum(tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32), v)
        store_value(xp + offs, x, mask, KIND)
        v = x
    step_size = tl.load(fmeta + 2 * t)
    bc2 = tl.load(fmeta + 2 * t + 1)
    denom = tl.sqrt_rn(v) / bc2 + eps
    w_new = w + (-step_size * m) / denom
    wp = tl.load(meta + t * NCOL + 0).to(tl.pointer_type(DT))
    store_value(wp + offs, w_new, mask, KIND)
    if NEXT:
        wq = tl.load(wp + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(part + 2 * pid, tl.sum(wq * wq, axis=0))
        tid = tl.load(meta + t * NCOL + 7)
        tl.store(part + 2 * pid + 1, noise_sq_chunk(seed, start, n, c1hi, tid, next_step, DIST, BLOCK).to(tl.float64))


def restore_update_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scales, coef, grad_scale, seed, step,
                         tensor_ids, sample, distribution, filter, sources, *, steps, lr, beta1, beta2, eps,
                         weight_decay, decoupled_weight_decay, amsgrad, maximize, next_w_sq=(), next_u_sq=(),
                         next_step=0):
    T.check(params, (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                     ("max_exp_avg_sqs", max_exp_avg_sqs if amsgrad else [])), filter, sources)
    seed, c1hi, step32 = T.stream_args(seed, step, sample)
    next_on = len(next_w_sq) > 0
    w1 = 1 - beta1
    for dtype, idx in T.groups_by_dtype(params).items():
        meta, chunks, sflat, nchunks = T.build(idx, params, tensor_ids, scales, sources, grads, exp_avgs, exp_avg_sqs,
                                               max_exp_avg_sqs if amsgrad else None)
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
                              NCOL=T.NCOL, BLOCK=T.BLOCK, HAS_SRC=sources is not None,
                              COUPLED=weight_decay != 0 and not decoupled_weight_decay,
                              DECOUPLED=weight_decay != 0 and decoupled_weight_decay, AMS=bool(amsgrad),
                              SMALL_W=w1 < 0.5, NEXT=next_on, enable_fp_fusion=False)
        if next_on:
            out = N.finish(meta, part, len(idx), dev) if nchunks else torch.zeros(len(idx), 2, dtype=torch.float64,
                                                                                   device=dev)
            for k, i in enumerate(idx):
                if next_w_sq[i].numel():
                    next_w_sq[i].copy_(out[k, 0:1])
                    next_u_sq[i].copy_(out[k, 1:2])
