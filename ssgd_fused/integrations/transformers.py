"""S-SGD in the Hugging Face ``transformers.Trainer``: :class:`SSGDTrainer`.

The Trainer runs ``training_step`` (forward, ``accelerator.backward``) once per micro-batch, then,
after the last micro-batch of an optimizer step, clips the gradients
(``accelerator.clip_grad_norm_``) and calls ``optimizer.step()`` bare. S-SGD needs every
micro-batch evaluated at ``w + n`` and at ``w - n`` with one noise per optimizer step, so
:class:`SSGDTrainer` keeps the step's micro-batches (the Trainer has already fetched them all) and,
at the last one, runs ``SSGD.twin_passes()`` around the Trainer's own ``training_step`` for each of
them. Everything else is the Trainer's: loss scaling for gradient accumulation and
``num_items_in_batch``, AMP, ``accelerator.backward``, clipping and the step (on the mean gradient
at the clean weights, after the passes), the LR schedule, logging (the logged loss is the mean
over the passes), checkpoints (``optimizer.pt`` holds SSGD's state, so resuming continues the
noise stream) and DDP (every backward but the step's last runs under ``no_sync``).

A plain ``Trainer`` given an SSGD fails at its first ``optimizer.step()`` with an error that names
this class.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..optim import SSGD
from ._common import import_framework, num_passes, unwrap

_transformers = import_framework("transformers", "transformers")

__all__ = ["SSGDTrainer"]


class SSGDTrainer(_transformers.Trainer):
    """A ``transformers.Trainer`` that trains with S-SGD.

    Args:
        ssgd_kwargs: S-SGD's options (``noise``, ``distribution``, ``seed``, ``pairs``, ...; see
            ``ssgd_fused.SSGD``) for the optimizer this trainer builds when none is passed. Its base
            optimizer is the one ``TrainingArguments`` selects (``optim``, default AdamW, with
            ``learning_rate``, ``weight_decay`` on the same parameters as the Trainer's,
            ``adam_beta1``...); entries that are base-optimizer arguments (e.g. ``momentum`` with
            ``optim="sgd"``) override those.
        *args, **kwargs: as for ``transformers.Trainer``. ``optimizers=(SSGD(...), scheduler)``
            passes a ready-made SSGD instead.

    Without an SSGD optimizer it behaves exactly as ``transformers.Trainer``.
    """

    def __init__(self, *args, ssgd_kwargs: dict | None = None, **kwargs):
        self.ssgd_kwargs = dict(ssgd_kwargs or {})
        self._ssgd_micro: list = []
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        """An SSGD around the base optimizer ``TrainingArguments`` selects, on the Trainer's
        parameter groups (weight decay except on biases and normalisation weights)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            base_cls, base_kwargs = self.optimizer_cls_and_kwargs
        else:
            base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)) or \
                {"params", "model", "optimizer_dict"} & set(base_kwargs):
            raise ValueError(f"SSGDTrainer: S-SGD wraps a torch.optim optimizer built on the parameters; "
                             f"optim={self.args.optim!r} gives {base_cls!r} with {sorted(base_kwargs)}")
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        with warnings.catch_warnings():
            # the model is wrapped in DDP only after the optimizer exists; training_step runs the
            # passes before the last under no_sync itself
            warnings.filterwarnings("ignore", message=r"ssgd_fused: torch\.distributed is initialised but SSGD got no")
            self.optimizer = SSGD([g for g in groups if g["params"]], base_cls,
                                  **{**base_kwargs, **self.ssgd_kwargs})
        return self.optimizer

    def train(self, *args, **kwargs):
        self._ssgd_micro = []
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's training step, run in every S-SGD pass over all the micro-batches of the
        optimizer step, at the step's last micro-batch; the others return 0 (their loss is in the
        last one's). Returns the sum over the micro-batches of the mean over the passes."""
        ssgd = unwrap(self.optimizer)
        if ssgd is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._ssgd_micro.append(inputs)
        if not self.accelerator.sync_gradients:  # not the optimizer step's last micro-batch yet
            return torch.zeros((), device=self.args.device)
        micro, self._ssgd_micro = self._ssgd_micro, []
        last_pass = num_passes(ssgd) - 1
        total = None
        passes = ssgd.twin_passes()
        try:
            for k in passes:
                for i, mb in enumerate(micro):
                    final = k == last_pass and i == len(micro) - 1  # the step's one all-reduce under DDP
                    with contextlib.nullcontext() if final else self.accelerator.no_sync(model):
                        loss = super().training_step(model, mb, num_items_in_batch)
                    total = loss if total is None else total + loss
        finally:
            passes.close()
        return total / (k + 1)
