"""What the framework integrations share; imports no framework."""

from __future__ import annotations

import contextlib
import importlib

import torch

from ..optim import SSGD


def unwrap(optimizer) -> SSGD | None:
    """The SSGD inside framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, nested), the optimizer itself if it is one, else None."""
    o = optimizer
    for _ in range(8):
        inner = getattr(o, "optimizer", None)  # the wrappers' attribute; SSGD has none
        if not isinstance(inner, torch.optim.Optimizer) or inner is o:
            break
        o = inner
    return o if isinstance(o, SSGD) else None


def require(ssgd_or_wrapper) -> SSGD:
    ssgd = unwrap(ssgd_or_wrapper)
    if ssgd is None:
        raise TypeError(f"expected an ssgd_fused.SSGD (or a framework's wrapper of one), got "
                        f"{type(ssgd_or_wrapper).__name__}")
    return ssgd


def num_passes(ssgd: SSGD) -> int:
    """Forward/backward passes of SSGD's next step (2 for S-SGD, 2 * pairs with pairs, 1 for the
    one-pass modes and before start_step), as its noise cycle will run them."""
    return ssgd.passes_per_step


def import_framework(name: str, pip_name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"ssgd_fused.integrations needs {pip_name!r} for this: pip install {pip_name}") from e


@contextlib.contextmanager
def update_after_closure(ssgd: SSGD):
    """While active, ``ssgd.step(closure)`` behaves as torch.optim optimizers do for a framework that
    runs the twin passes itself: it calls ``closure`` once (the framework's closure, which runs the
    passes and then its own hooks and gradient clipping on the mean gradient at the clean weights)
    and then applies the base update; ``ssgd.step()`` (GradScaler's call) applies the update.

    It replaces ``ssgd.step`` on the instance for the duration (as accelerate does for GradScaler),
    keeping whatever wrapper an LR scheduler installed there."""
    missing = object()
    previous = ssgd.__dict__.get("step", missing)
    update = previous if previous is not missing else ssgd.__class__.step.__get__(ssgd)

    def step(closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update()  # SSGD.step() after the completed twin passes: the base optimizer's update
        return loss

    ssgd.step = step
    try:
        yield
    finally:
        if previous is missing:
            del ssgd.step
        else:
            ssgd.step = previous
