"""S-SGD in PyTorch Lightning (``lightning.pytorch``): :class:`SSGDCallback`.

``configure_optimizers`` returns an ``ssgd_fused.SSGD`` as it would any optimizer. Lightning's
automatic optimization calls ``optimizer.step(closure)``, and SSGD runs the closure at ``w + n``
and at ``w - n``: that alone trains correctly. What it gets wrong without this callback is what
Lightning does *inside* its closure or around the step:

- gradient clipping (``gradient_clip_val``) and ``on_before_optimizer_step`` run inside the
  closure, so they would see each pass's gradient at displaced weights; with the callback they run
  once, on the mean gradient at the clean weights, right before the update;
- ``accumulate_grad_batches=k``: Lightning runs micro-batches 1..k-1 outside the optimizer and
  only the last one inside ``optimizer.step(closure)``. S-SGD draws one noise per optimizer step
  and every micro-batch must be evaluated at ``w + n`` and at ``w - n``. The callback moves the
  weights to ``w + n`` when the window's first micro-batch starts, so Lightning's own forward and
  backward of each micro-batch are the first pass; at the step it runs the later passes over the
  window's micro-batches (their batches were kept) through the strategy's ``training_step`` and
  ``backward``. The result equals the plain loop
  ``for _ in opt.twin_passes(): for each micro-batch: (loss / k).backward()``;
- 16-bit AMP with a GradScaler (``precision="16-mixed"``) calls ``scaler.step(optimizer)``, a bare
  ``step()``; with the callback the passes run inside Lightning's closure first;
- manual optimization: ``opt = self.optimizers()`` is Lightning's wrapper, whose ``step()`` hands
  SSGD a closure; the callback makes ``opt.twin_passes()`` and ``opt.step()`` run the twin passes
  and then the update.

With DDP, every backward but the step's last runs under the strategy's ``block_backward_sync()``:
gradients are all-reduced once per step.

Between the micro-batches of an accumulation window the weights stay at ``w + n``; validation or
a checkpoint there (``val_check_interval`` or checkpoint intervals that are not multiples of
``accumulate_grad_batches``) raise an error instead of seeing displaced weights.
"""

from __future__ import annotations

import contextlib

from ._common import import_framework, num_passes, unwrap, update_after_closure

_pl = import_framework("lightning.pytorch", "lightning")
from lightning.pytorch.loops.optimization.automatic import ClosureResult  # noqa: E402
from lightning.pytorch.trainer import call as _call  # noqa: E402
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature  # noqa: E402

__all__ = ["SSGDCallback"]


def _no_sync(strategy):
    """The strategy's DDP no_sync (``block_backward_sync``), or nothing on a single device."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


class _Window:
    """One optimizer step's passes: the SSGD's twin_passes() generator (at pass 0 once opened) and
    the micro-batches seen in pass 0, kept for the later passes."""

    def __init__(self, ssgd):
        self.ssgd = ssgd
        self.passes = ssgd.twin_passes()
        self.num_passes = num_passes(ssgd)
        self.micro: list = []  # (batch, batch_idx) of every micro-batch of the window so far
        next(self.passes)  # the weights move to pass 0's displacement

    def advance(self) -> bool:
        """To the next pass; False when the passes are done (clean weights, mean gradient)."""
        try:
            next(self.passes)
        except StopIteration:
            return False
        return True

    def close(self):
        self.passes.close()  # an unfinished cycle puts the clean weights back


class SSGDCallback(_pl.Callback):
    """Runs S-SGD's passes where Lightning's training loop needs them (see the module docstring).

    ``Trainer(callbacks=[SSGDCallback()])``; the LightningModule's ``configure_optimizers`` returns
    an ``ssgd_fused.SSGD``. Optimizers that are not SSGD pass through untouched.
    """

    def __init__(self):
        super().__init__()
        self._window: _Window | None = None
        self._patched = None  # (strategy, its own optimizer_step)

    # ---- set-up -------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or self._patched is not None:
            return
        strategy = trainer.strategy
        original = strategy.optimizer_step

        def optimizer_step(optimizer, closure, model=None, **kwargs):
            return self._optimizer_step(trainer, original, optimizer, closure, model, **kwargs)

        strategy.optimizer_step = optimizer_step  # the one place every optimizer.step() of Lightning goes
        self._patched = (strategy, original)

    def teardown(self, trainer, pl_module, stage):
        self._close()
        if self._patched is not None:
            strategy, _ = self._patched
            vars(strategy).pop("optimizer_step", None)
            self._patched = None

    def on_train_start(self, trainer, pl_module):
        # manual optimization: `self.optimizers()` is Lightning's wrapper; its inherited
        # twin_passes() would run with the wrapper as self: point it at the SSGD's own method
        optimizers = pl_module.optimizers(use_pl_optimizer=True)
        for lo in optimizers if isinstance(optimizers, list) else [optimizers]:
            ssgd = unwrap(lo)
            if ssgd is not None and lo is not ssgd:
                lo.twin_passes = ssgd.twin_passes

    # ---- accumulation windows -------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not pl_module.automatic_optimization or trainer.accumulate_grad_batches == 1:
            return  # without accumulation the passes start inside the optimizer step
        ssgd = unwrap(trainer.optimizers[0]) if trainer.optimizers else None
        if ssgd is None:
            return
        if self._window is None:
            self._window = _Window(ssgd)
        self._window.micro.append((batch, batch_idx))

    def on_train_epoch_end(self, trainer, pl_module):
        self._close()  # a window left open by a skipped batch (on_train_batch_start returned -1)

    def on_exception(self, trainer, pl_module, exception):
        self._close()

    def on_validation_start(self, trainer, pl_module):
        if self._window is not None:
            self._mid_window(trainer, "validation")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._window is not None:
            self._mid_window(trainer, "a checkpoint")

    def _mid_window(self, trainer, what):
        self._close()
        raise RuntimeError(
            f"SSGDCallback: {what} in the middle of an accumulation window (accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}), where S-SGD's noise displaces the weights. Make "
            "val_check_interval and the checkpoint intervals multiples of accumulate_grad_batches.")

    def _close(self):
        window, self._window = self._window, None
        if window is not None:
            window.close()

    # ---- the step -------------------------------------------------------------------------------
    def _optimizer_step(self, trainer, original, optimizer, closure, model, **kwargs):
        ssgd = unwrap(optimizer)
        if ssgd is None:
            return original(optimizer, closure, model, **kwargs)
        if trainer.lightning_module.automatic_optimization:
            window, self._window = self._window, None
            if window is None:
                window = _Window(ssgd)
            inner = closure

            def closure():
                return self._run_passes(trainer, window, ssgd, inner)
        # the precision plugin calls ssgd.step(closure) (or scaler.step(ssgd) after calling the
        # closure itself); the closure runs the passes, then Lightning's clipping and hooks
        with update_after_closure(ssgd):
            return original(optimizer, closure, model, **kwargs)

    def _run_passes(self, trainer, window: _Window, ssgd, closure):
        """Lightning's closure (this batch's training_step + backward) in every pass, after the
        window's earlier micro-batches in the passes after the first; only the step's last backward
        all-reduces under DDP. Returns the mean over the passes of the closure's loss."""
        strategy = trainer.strategy
        losses = []
        k = 0
        try:
            while True:
                if k > 0:
                    for batch, batch_idx in window.micro[:-1]:
                        with _no_sync(strategy):
                            self._replay(trainer, ssgd, batch, batch_idx)
                last = k == window.num_passes - 1
                with contextlib.nullcontext() if last else _no_sync(strategy):
                    losses.append(closure())
                if not window.advance():
                    break
                k += 1
        except BaseException:
            window.close()
            raise
        if any(loss is None for loss in losses):
            return None
        return sum(losses[1:], losses[0]) / len(losses)

    @staticmethod
    def _replay(trainer, optimizer, batch, batch_idx):
        """An earlier micro-batch's training_step and backward, as Lightning's closure runs them."""
        module = trainer.lightning_module
        args = (batch, batch_idx) if is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2) \
            else (batch,)
        output = _call._call_strategy_hook(trainer, "training_step", *args)
        trainer.strategy.post_training_step()
        result = ClosureResult.from_training_step_output(output, trainer.accumulate_grad_batches)
        if result.closure_loss is not None:
            _call._call_strategy_hook(trainer, "backward", result.closure_loss, optimizer)
