"""S-SGD in training frameworks. Each submodule imports its framework only when it is used:

- :mod:`ssgd_fused.integrations.lightning`: ``SSGDCallback`` for ``lightning.pytorch.Trainer``
  (gradient clipping, ``accumulate_grad_batches``, AMP, manual optimization with ``twin_passes()``);
- :mod:`ssgd_fused.integrations.transformers`: ``SSGDTrainer``, a ``transformers.Trainer`` whose
  training step runs the twin passes;
- :mod:`ssgd_fused.integrations.accelerate`: ``twin_passes`` and ``micro_batches`` for loops built
  on ``accelerate.Accelerator``.

``unwrap(optimizer)`` finds the SSGD inside a framework's optimizer wrapper.
"""

from __future__ import annotations

import importlib

from ._common import unwrap

__all__ = ["unwrap", "lightning", "transformers", "accelerate"]

_SUBMODULES = ("lightning", "transformers", "accelerate")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
