"""S-SGD in training loops built on Hugging Face ``accelerate``.

``accelerator.prepare(model, ssgd, dataloader)`` wraps the SSGD in an ``AcceleratedOptimizer``,
which has no ``twin_passes()``; :func:`twin_passes` takes either and runs the SSGD's passes:

    model, optimizer, loader = accelerator.prepare(model, ssgd_fused.SSGD(...), loader)
    for x, y in loader:
        for _ in twin_passes(optimizer, accelerator, model):   # w + n, then w - n
            accelerator.backward(loss_fn(model(x), y))
        optimizer.step()                                        # the base update, clean weights
        optimizer.zero_grad()

Gradient accumulation: S-SGD draws one noise per optimizer step and evaluates *every* micro-batch
at ``w + n`` and at ``w - n``, so the passes go around all the step's micro-batches, not inside
each one. :func:`micro_batches` groups the loader into optimizer steps and :func:`accumulated_passes`
yields each micro-batch once per pass:

    for step_batches in micro_batches(loader, accelerator.gradient_accumulation_steps):
        for x, y in accumulated_passes(optimizer, step_batches, accelerator, model):
            with accelerator.accumulate(model):        # optional: accelerate's own bookkeeping
                accelerator.backward(loss_fn(model(x), y))   # divides by gradient_accumulation_steps
        optimizer.step()
        optimizer.zero_grad()

Under DDP, every backward but the step's last runs under ``accelerator.no_sync(model)``: the
gradients are all-reduced once per step. Running ``twin_passes`` inside
``accelerator.accumulate()`` for each micro-batch (a new noise, and the mean taken, per
micro-batch) raises an error that shows the pattern above.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator

from ._common import import_framework, num_passes, require

import_framework("accelerate", "accelerate")

__all__ = ["twin_passes", "accumulated_passes", "micro_batches"]


def _check_not_per_micro_batch(optimizer):
    state = getattr(optimizer, "gradient_state", None)  # AcceleratedOptimizer's
    if state is not None and state.num_steps > 1 and not state.sync_gradients:
        raise RuntimeError(
            "S-SGD's passes were started inside accelerator.accumulate() on a micro-batch that does not end "
            "the optimizer step: S-SGD draws one noise per optimizer step and runs every micro-batch at w+n and "
            "at w-n, so the passes must go around all of the step's micro-batches: `for step_batches in "
            "micro_batches(loader, accelerator.gradient_accumulation_steps): for batch in "
            "accumulated_passes(optimizer, step_batches, accelerator, model): ...` "
            "(ssgd_fused.integrations.accelerate)")


def _sync(accelerator, model, final: bool):
    if final or accelerator is None or model is None:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def twin_passes(optimizer, accelerator=None, model=None) -> Iterator[int]:
    """``SSGD.twin_passes()`` of ``optimizer`` (an SSGD, or accelerate's ``AcceleratedOptimizer``
    of one): yields 0 at ``w + n``, then 1 at ``w - n`` (more with ``pairs``); afterwards the clean
    weights are back and the gradients hold their mean, for ``optimizer.step()``. With
    ``accelerator`` and ``model`` the passes before the last run under
    ``accelerator.no_sync(model)`` (one all-reduce per step under DDP)."""
    _check_not_per_micro_batch(optimizer)
    ssgd = require(optimizer)
    last = num_passes(ssgd) - 1
    passes = ssgd.twin_passes()
    try:
        for k in passes:
            with _sync(accelerator, model, k == last):
                yield k
    finally:
        passes.close()  # a loop left early puts the clean weights back


def accumulated_passes(optimizer, batches, accelerator=None, model=None) -> Iterator:
    """Each of ``batches`` (one optimizer step's micro-batches) in every S-SGD pass: all of them at
    ``w + n``, then all at ``w - n``. With ``accelerator`` and ``model``, every backward but the
    step's last runs under ``accelerator.no_sync(model)``."""
    batches = list(batches)
    _check_not_per_micro_batch(optimizer)
    ssgd = require(optimizer)
    last = num_passes(ssgd) - 1
    passes = ssgd.twin_passes()
    try:
        for k in passes:
            for i, batch in enumerate(batches):
                with _sync(accelerator, model, k == last and i == len(batches) - 1):
                    yield batch
    finally:
        passes.close()


def micro_batches(iterable: Iterable, n: int) -> Iterator[list]:
    """Consecutive groups of ``n`` items (the micro-batches of one optimizer step); the last group
    may be shorter. Where ``len(iterable)`` is known, the last group is taken without reading past
    the end, so that accelerate's loader still marks the end of the epoch while it is used
    (``accelerator.accumulate()`` then ends the step on it)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    try:
        remaining = len(iterable)
    except TypeError:
        remaining = None
    it = iter(iterable)
    while True:
        size = n if remaining is None or remaining <= 0 else min(n, remaining)
        group = list(itertools.islice(it, size))
        if not group:
            return
        if remaining is not None:
            remaining -= len(group)
        yield group
