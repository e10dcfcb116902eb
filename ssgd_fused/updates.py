"""Restore + base-optimizer update in one kernel pass, as a table from base-optimizer class to function.

Each function takes the ops module (``ssgd_fused.ops`` or ``ssgd_fused.reference``), the base
optimizer, one param group and a batch of its parameters of one kind (all exact or all restored by
regeneration), and runs the op that restores the clean weights, scales the gradients to their mean
and applies the base optimizer's update, keeping the base optimizer's state layout (so state dicts
interchange with torch.optim). Adding a fused optimizer is adding a row to `FUSED_UPDATES`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


def _sgd(ops, base, group, params, grads, scales, coef, grad_scale, **stream):
    state = base.state
    momentum = group["momentum"]
    bufs, init = [], []
    if momentum != 0:
        for p in params:
            b = state[p].get("momentum_buffer")
            init.append(b is None)
            bufs.append(torch.empty_like(p) if b is None else b)
    ops.restore_update_sgd_(
        params, grads, bufs, scales, coef, grad_scale, lr=float(group["lr"]), momentum=momentum,
        dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
        maximize=group["maximize"], init_momentum=init, **stream)
    if momentum != 0:
        for p, b in zip(params, bufs):
            state[p]["momentum_buffer"] = b


def _adam(ops, base, group, params, grads, scales, coef, grad_scale, **stream):
    amsgrad = group["amsgrad"]
    states = []
    for p in params:
        st = base.state[p]
        if len(st) == 0:  # the layout torch.optim.Adam creates, so state_dicts interchange
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            _HOST_STEPS[st["step"]] = (0.0, st["step"]._version)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states.append(st)
    steps = [_host_step(st["step"]) + 1 for st in states]
    beta1, beta2 = group["betas"]
    decoupled = group.get("decoupled_weight_decay", type(base) is torch.optim.AdamW)
    ops.restore_update_adam_(
        params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
        [st["max_exp_avg_sq"] for st in states] if amsgrad else [], scales, coef, grad_scale, steps=steps,
        lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=group["maximize"], **stream)
    torch._foreach_add_([st["step"] for st in states], 1.0)
    for st, t in zip(states, steps):
        _HOST_STEPS[st["step"]] = (t, st["step"]._version)


# Adam's step counts as host numbers, keyed by torch's "step" tensors (which stay the state dict's
# format) with their version counters: the kernels take them as arguments, and reading the
# tensors back each step would be a host read per parameter (a device synchronisation where they
# live on the GPU). A step tensor changed elsewhere (torch.optim's own step after twin_passes(), a
# loaded state dict) has another version and is read once.
_HOST_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _host_step(t: torch.Tensor) -> float:
    v = _HOST_STEPS.get(t)
    if v is None or v[1] != t._version:
        v = _HOST_STEPS[t] = (float(t), t._version)
    return v[0]


FusedUpdate = Callable[..., None]

FUSED_UPDATES: dict[type, FusedUpdate] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
}


def fused_update_for(base: torch.optim.Optimizer) -> FusedUpdate | None:
    """The fused update for this base optimizer, or None where none applies: another class (a
    subclass may change the update), or options the kernels do not implement (differentiable,
    capturable, a tensor learning rate)."""
    fn = FUSED_UPDATES.get(type(base))
    if fn is None:
        return None
    for g in base.param_groups:
        if g.get("differentiable") or g.get("capturable") or isinstance(g.get("lr"), torch.Tensor):
            return None
    return fn
