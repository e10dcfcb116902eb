"""Pure-PyTorch reference implementations of the S-SGD ops.

Each function here has the same signature and semantics as the fused op of the same name in
:mod:`ssgd_fused.ops` (C++ on CPU, Triton on CUDA) and is what the tests compare them against.
They are written for clarity, not speed: the noise is materialised with :mod:`ssgd_fused.noise`.

Conventions shared by all ops
-----------------------------
* ``tensor_ids[i]``: the spec's tensor index of ``params[i]``; ``seed``, ``step``, ``sample`` and
  ``distribution`` select the stream (see :mod:`ssgd_fused.noise`).
* ``filter``: norms and scales per slice along dim 0 (``rows = p.shape[0]``) instead of per tensor.
* ``scales[i]``: float64 tensor with one entry per slice (``s = alpha ||w|| / ||u||``), or an
  empty tensor for a parameter that carries no noise (the op then generates nothing for it).
* ``sources[i]`` (exact mode): the clean weights; ``p = sources[i] + coef * s * u`` instead of
  ``p = p + coef * s * u``.
* ``element_offsets`` (optional, one int per tensor, last argument of every op that generates
  noise): tensor i is a shard of a larger tensor whose local element e is the full tensor's element
  ``element_offsets[i] + e``; its noise is the full tensor's at those elements (None: all zeros).
  Rows (filter scope) stay the local tensor's dim-0 slices (a Shard(0) shard holds whole rows).
* Arithmetic is float32 for every parameter dtype; 16-bit values are rounded to nearest even once
  per write.
"""

from __future__ import annotations

import torch

from . import noise as _noise

__all__ = [
    "num_slices",
    "noise_like",
    "norms",
    "scales_from_norms",
    "perturb_",
    "perturb_norms_",
    "restore_",
    "restore_update_sgd_",
    "restore_update_adam_",
]


def num_slices(p: torch.Tensor, filter: bool) -> int:
    return p.shape[0] if (filter and p.dim() >= 1) else 1


def noise_like(p, seed, step, tensor_id, sample, distribution, element_offset=0) -> torch.Tensor:
    """The spec's direction u for parameter p, float32, shaped like p, on p's device; p's element e
    takes the stream's element element_offset + e."""
    u = _noise.generate(distribution, p.numel(), seed, step, tensor_id, sample, start=element_offset)
    return u.to(p.device).view(p.shape)


def _rows(t: torch.Tensor, filter: bool) -> torch.Tensor:
    return t.reshape(num_slices(t, filter), -1)


def _offsets(params, element_offsets, distribution):
    return _noise.check_element_offsets(element_offsets, [p.numel() for p in params], distribution)


def norms(params, seed, step, tensor_ids, sample, distribution, filter, element_offsets=None):
    """(||w||^2, ||u||^2) per tensor (or per dim-0 slice), float64."""
    w_sq, u_sq = [], []
    for p, tid, off in zip(params, tensor_ids, _offsets(params, element_offsets, distribution)):
        u = noise_like(p, seed, step, tid, sample, distribution, off)
        w_sq.append(_rows(p.detach().double(), filter).pow(2).sum(1))
        u_sq.append(_rows(u.double(), filter).pow(2).sum(1))
    return w_sq, u_sq


def scales_from_norms(w_sq, u_sq, alphas):
    """s = alpha * ||w|| / ||u|| per slice, float64; s = 0 where ||w|| = 0. Kernels use it rounded
    to their arithmetic type (float32 for 16/32-bit parameters).

    Shared by every backend (a handful of ops whatever the number of tensors)."""
    if not w_sq:
        return []
    counts = [t.numel() for t in w_sq]
    w2, u2 = torch.cat(w_sq), torch.cat(u_sq)
    a = torch.repeat_interleave(torch.tensor([float(x) for x in alphas], dtype=torch.float64),
                                torch.tensor(counts)).to(w2.device)
    s = torch.where(w2 > 0, a * torch.sqrt(w2 / u2), torch.zeros_like(w2))
    return list(s.split(counts))


def _opmath(p):
    """float32 arithmetic for 16/32-bit parameters; float64 ones (reference only) stay float64."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _displaced(p, s, src, coef, tid, seed, step, sample, distribution, filter, off=0):
    """(src or p) + coef * s * u in opmath (src/p unchanged)."""
    base = (src if src is not None else p).detach().to(_opmath(p))
    if s.numel() == 0:
        return base
    u = noise_like(p, seed, step, tid, sample, distribution, off).to(base.dtype)
    n = (_rows(u, filter) * s.to(device=p.device, dtype=base.dtype).view(-1, 1)).view(p.shape)
    return base + (coef * n)


@torch.no_grad()
def perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None,
             element_offsets=None):
    """p = (sources[i] or p) + coef * s_i * u_i, in place."""
    offs = _offsets(params, element_offsets, distribution)
    for i, (p, s, tid) in enumerate(zip(params, scales, tensor_ids)):
        src = sources[i] if sources is not None else None
        p.copy_(_displaced(p, s, src, coef, tid, seed, step, sample, distribution, filter, offs[i]))


@torch.no_grad()
def perturb_norms_(params, w_sq, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None,
                   element_offsets=None):
    """perturb_, and w_sq[i] = ||w||^2 (as norms gives it, one float64 per tensor or slice) of what it
    displaces: sources[i] if given, else params[i] before the move."""
    bases = [sources[i] if sources is not None else p for i, p in enumerate(params)]
    got, _ = norms(bases, seed, step, tensor_ids, sample, "rademacher", filter, element_offsets)
    for out, w in zip(w_sq, got):
        out.copy_(w)
    perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources, element_offsets)


@torch.no_grad()
def restore_(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter,
             sources=None, element_offsets=None):
    """perturb_ with coef (undoing the displacement), and grads[i] *= grad_scale."""
    perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources, element_offsets)
    for g in grads:
        g.copy_(g.to(_opmath(g)) * grad_scale)


@torch.no_grad()
def restore_update_sgd_(params, grads, momentum_buffers, scales, coef, grad_scale, seed, step, tensor_ids,
                        sample, distribution, filter, sources, lr, momentum, dampening, weight_decay,
                        nesterov, maximize, init_momentum, next_w_sq=(), next_u_sq=(), next_step=0,
                        element_offsets=None):
    """Restore (as restore_), then torch.optim.SGD's update with the scaled gradient.

    The update is torch.optim.SGD's own op sequence, run in float32 (float64 for float64
    parameters) and rounded once to the parameter dtype: for float32 it is torch's result bit for
    bit. grads are overwritten with the scaled gradient (p.grad holds the mean gradient); where
    init_momentum[i] the momentum buffer starts as this step's d_p (torch's clone).

    next_w_sq / next_u_sq (optional, one float64 tensor per parameter, numel 0 to skip): receive
    norms(updated weights) for step next_step, so that the next cycle can skip its norm pass (with
    element_offsets, as norms would measure them)."""
    for i, w, d in _restored(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution,
                             filter, sources, maximize, element_offsets):
        if weight_decay != 0:
            d = d.add(w, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if init_momentum[i]:
                buf.copy_(d)
            else:
                buf.copy_(buf.to(w.dtype).mul_(momentum).add_(d, alpha=1 - dampening))
            b = buf.to(w.dtype)  # what was stored (16-bit buffers round)
            d = d.add(b, alpha=momentum) if nesterov else b
        params[i].copy_(w.add_(d, alpha=-lr))
    _next_norms(params, next_w_sq, next_u_sq, seed, next_step, tensor_ids, sample, distribution, filter,
                element_offsets)


def _restored(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter,
              sources, maximize, element_offsets):
    """Per parameter: (i, restored weights in opmath, descent direction d), the gradient scaled in
    place (g *= grad_scale, rounded to its dtype) and d taken from the stored value."""
    offs = _offsets(params, element_offsets, distribution)
    for i, (p, g, s, tid) in enumerate(zip(params, grads, scales, tensor_ids)):
        src = sources[i] if sources is not None else None
        w = _displaced(p, s, src, coef, tid, seed, step, sample, distribution, filter, offs[i])
        g.copy_(g.to(w.dtype) * grad_scale)
        d = g.to(w.dtype)
        yield i, w, (-d if maximize else d)


def _next_norms(params, next_w_sq, next_u_sq, seed, step, tensor_ids, sample, distribution, filter,
                element_offsets):
    offs = _offsets(params, element_offsets, distribution)
    for p, w_out, u_out, tid, off in zip(params, next_w_sq, next_u_sq, tensor_ids, offs):
        if w_out.numel():
            (w2,), (u2,) = norms([p], seed, step, [tid], sample, distribution, filter, [off])
            w_out.copy_(w2)
            u_out.copy_(u2)


@torch.no_grad()
def restore_update_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scales, coef, grad_scale,
                         seed, step, tensor_ids, sample, distribution, filter, sources, steps, lr, beta1,
                         beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, next_w_sq=(),
                         next_u_sq=(), next_step=0, element_offsets=None):
    """Restore (as restore_), then torch.optim.Adam / AdamW's update (torch's op sequence, in
    float32, 16-bit state rounded once per write). steps[i] is the parameter's Adam step count
    AFTER this step's increment. next_w_sq / next_u_sq: as in restore_update_sgd_."""
    for i, w, d in _restored(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution,
                             filter, sources, maximize, element_offsets):
        if weight_decay != 0:
            if decoupled_weight_decay:
                w.mul_(1 - lr * weight_decay)
            else:
                d = d.add(w, alpha=weight_decay)
        exp_avgs[i].copy_(exp_avgs[i].to(w.dtype).lerp_(d, 1 - beta1))
        exp_avg_sqs[i].copy_(exp_avg_sqs[i].to(w.dtype).mul_(beta2).addcmul_(d, d, value=1 - beta2))
        m, v = exp_avgs[i].to(w.dtype), exp_avg_sqs[i].to(w.dtype)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sqs[i], out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i].to(w.dtype)
        t = float(steps[i])
        step_size = lr / (1 - beta1**t)
        bc2_sqrt = (1 - beta2**t) ** 0.5
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        params[i].copy_(w.addcdiv_(m, denom, value=-step_size))
    _next_norms(params, next_w_sq, next_u_sq, seed, next_step, tensor_ids, sample, distribution, filter,
                element_offsets)
