"""SSGD: symmetrical weight-noise SGD (Sung et al., arXiv 2009.02479) around any torch.optim optimizer.

The public face only: options (checked by :mod:`ssgd_fused.options`) and the torch.optim API. The
noise cycle itself (which tensors, scales, where the weights are, the passes, the fused
restore+update) is :class:`ssgd_fused.cycle.NoiseCycle`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator

import torch

from . import distributed as _distributed
from . import noise as _noise
from . import ops as _ops
from . import reference as _reference
from .critical import critical
from .cycle import NoiseCycle
from .options import Options, param_groups
from .options import param_group as _checked_group

__all__ = ["SSGD"]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SSGD(torch.optim.Optimizer):
    r"""S-SGD: evaluates the gradient at ``w + n`` and ``w - n`` and updates ``w`` with their mean.

    .. math::
        n_i = \alpha_i \lVert w_i\rVert \, u_i / \lVert u_i\rVert, \qquad
        g = \tfrac12\big(\nabla L(w + n) + \nabla L(w - n)\big), \qquad
        w \leftarrow \mathrm{base\_update}(w, g)

    with a fresh direction ``u_i`` per tensor (or per dim-0 slice) and step, drawn from the
    counter-based stream of :mod:`ssgd_fused.noise`, so the noise is regenerated, never stored.

    Args:
        params: iterable of parameters or param-group dicts. A group may carry ``"noise"`` (its own
            alpha, applied to all its parameters, 1-D ones included).
        base_optimizer_cls: a ``torch.optim.Optimizer`` subclass (``torch.optim.SGD``, ``AdamW``,
            ...); built on the same param_groups with ``**base_kwargs``.
        noise (float or callable, default 0.5): alpha, ``||n_i|| = alpha ||w_i||``; a callable
            ``noise(step) -> alpha`` is an alpha schedule. By default only parameters with
            ``ndim >= 2`` are perturbed; 1-D ones (biases, norms) get noise only through a group's
            own ``"noise"``.
        distribution (str, default "gaussian"; "uniform" for smoothout): "gaussian", "rademacher"
            or "uniform".
        scope (str, default "tensor"): "tensor" (one norm per tensor) or "filter" (per dim-0 slice).
        mode (str, default "symmetric"): "symmetric" (S-SGD, two passes), "one_sided" (weight-noise
            injection, one pass at ``w + n``) or "smoothout" (one pass, uniform noise).
        seed (int, optional): unsigned 64-bit stream seed; drawn from torch's default generator
            when None, so ``torch.manual_seed`` controls it.
        backend (str, default "auto"): "auto" (fused kernels where available, else the reference
            with one warning), "cpp" / "triton" / "fused" (require the kernels; raise if missing),
            "reference" (pure PyTorch, exact backup copy).
        restore (str, default "auto"): how clean weights come back after the passes. "regenerate"
            re-adds the regenerated noise in place (no extra memory, a few ulp of drift per step in
            float32); "exact" keeps a backup copy. "auto": regenerate for float32 parameters, exact
            for 16-bit ones. The reference backend is always exact.
        start_step (int, default 0): steps before this one run the base optimizer alone (one pass,
            no noise): the paper's SGD-then-S-SGD schedule.
        max_grad_norm (float, optional): clip the mean gradient to this total 2-norm before the
            update (torch.nn.utils.clip_grad_norm_'s rule), folded into the fused update.
        nonfinite (str, default "update"): what a step with inf/NaN gradients does: "update" (as
            torch.optim does), "skip" (no update; ``opt.last_step_skipped``) or "raise"
            (FloatingPointError). The weights are clean in every case.
        pairs (int, default 1): antithetic pairs per step (2 * pairs passes, gradients averaged);
            pair j draws its noise from the spec's ``sample = j``.
        bn_stats (str, default "both"): BatchNorm running statistics in the passes: "both" (updated
            by every pass, the paper's behaviour), "first" (first pass only) or "none"; "first"
            and "none" need ``model=``.
        model (nn.Module, optional): the model: its BatchNorm layers for ``bn_stats``; a
            ``DistributedDataParallel`` model runs the passes before the last under ``no_sync()``,
            so each step all-reduces the gradients once; an FSDP2 model (the module
            ``fully_shard`` returned) runs them without reduce-scatter, so each step
            reduce-scatters once, holding every module's unsharded gradient between the passes.
        ranks (str, default "same"): with torch.distributed, "same" (every rank the same noise: the
            paper's algorithm on the global batch), "pairs" (rank r draws its own antithetic pairs,
            the spec's ``sample = r * pairs + j``: world_size pairs per step) or "split" (ranks 2j
            and 2j+1 share pair j, the even rank runs only ``+n`` and the odd only ``-n``: one
            forward/backward per rank, the first-order noise term cancels only in expectation
            over the data). ``seed`` is rank 0's (seed=None) or must be equal on every rank.
    """

    def __init__(self, params, base_optimizer_cls, *, noise: float | Callable[[int], float] = 0.5,
                 distribution: str | None = None, scope: str = "tensor", mode: str = "symmetric",
                 seed: int | None = None, backend: str = "auto", restore: str = "auto", start_step: int = 0,
                 max_grad_norm: float | None = None, nonfinite: str = "update", pairs: int = 1,
                 bn_stats: str = "both", model: torch.nn.Module | None = None, ranks: str = "same",
                 **base_kwargs):
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer_cls must be a torch.optim.Optimizer subclass such as torch.optim.SGD "
                f"(the class, not an instance), got {base_optimizer_cls!r}")
        if issubclass(base_optimizer_cls, SSGD):
            raise TypeError("base_optimizer_cls cannot be SSGD itself")
        options = Options.validate(noise=noise, distribution=distribution, scope=scope, mode=mode, seed=seed,
                                   backend=backend, restore=restore, start_step=start_step,
                                   max_grad_norm=max_grad_norm, nonfinite=nonfinite, pairs=pairs,
                                   bn_stats=bn_stats, model=model, ranks=ranks)
        groups = param_groups(params)
        flat = [p for g in groups for p in g["params"]]
        _distributed.check_params(flat)
        backend = _resolve_backend(options.backend, flat)
        # one noise stream on every rank (a collective: every rank constructs its SSGD)
        options = dataclasses.replace(options, seed=_distributed.shared_seed(options.seed, given=seed is not None))
        _distributed.warn_if_ddp_without_model(flat, model)

        super().__init__(groups, {"noise": None})
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: LR schedulers work on either
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, "noise": None}
        self.options = options
        self.backend = backend
        bn_layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] \
            if model is not None else []
        self._cycle = NoiseCycle(self.base_optimizer, options, _reference if backend == "reference" else _ops,
                                 fused=backend == "fused", bn_layers=bn_layers, model=model)
        self._twin_ready = False
        self._note_gradients()  # gradients from before this optimizer (another's step) are not news

    @property
    def _twin_ready(self) -> bool:
        """A twin_passes() loop has completed and its update is pending. Kept on the cycle, which a
        framework's optimizer wrapper shares (Lightning's LightningOptimizer reads attributes
        through to the SSGD but sets them on itself), so that SSGD.step sees a loop run through it."""
        return self._cycle.twin_ready

    @_twin_ready.setter
    def _twin_ready(self, ready: bool):
        self._cycle.twin_ready = ready

    # ---- the options and the cycle's counters, as attributes ------------------------------------
    def __getattr__(self, name):
        # noise, distribution, scope, mode, restore, start_step, max_grad_norm, nonfinite, pairs, bn_stats
        options = self.__dict__.get("options")
        if options is not None and name in Options.__dataclass_fields__ and name != "seed":
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def seed(self) -> int:
        """The stream's unsigned 64-bit seed."""
        return self._cycle.seed

    @property
    def noise_step(self) -> int:
        """Completed steps (noise cycles): the spec's `step` counter of the next step."""
        return self._cycle.step

    @property
    def last_step_skipped(self) -> bool:
        """True when the last step had non-finite gradients and nonfinite="skip" (no update)."""
        return self._cycle.last_step_skipped

    @property
    def passes_per_step(self) -> int:
        """Forward/backward passes the next step runs on this rank (2 * pairs; 1 before start_step,
        for the one-pass modes and with ranks="split")."""
        return self._cycle.num_passes()

    def current_noise(self) -> float:
        """The default alpha for this step: `noise`, or `noise(step)` for a schedule; 0 before
        `start_step` (the base optimizer alone, as in the paper's SGD-then-S-SGD phases)."""
        return self.options.alpha_at(self._cycle.step)

    # ---- public API ------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """With a closure: zeroes the gradients, runs ``closure`` (forward + backward, no
        zero_grad inside) at ``w + n`` and at ``w - n``, leaves the mean gradient in ``p.grad``,
        restores the clean weights and applies the base optimizer's update. Returns the mean loss.

        Without a closure: applies the base update after a completed ``twin_passes()`` loop."""
        if closure is None:
            if not self._twin_ready and self._is_state_init_call():
                return self.base_optimizer.step()  # lr 0, zero gradients: creates the state, moves nothing
            if not self._twin_ready:
                raise RuntimeError("SSGD.step() needs a closure, or must follow a completed "
                                   "`for _ in opt.twin_passes(): ...backward()` loop. A trainer that calls "
                                   "optimizer.step() itself needs S-SGD's integration: "
                                   "ssgd_fused.integrations.transformers.SSGDTrainer for the Hugging Face Trainer, "
                                   "ssgd_fused.integrations.lightning.SSGDCallback for Lightning")
            self._twin_ready = False
            try:
                with critical():  # the whole update or none of it
                    return self.base_optimizer.step()
            finally:
                self._note_gradients()
        if self._twin_ready:
            raise RuntimeError("SSGD.step(closure) after a completed `for _ in opt.twin_passes(): ...` loop would "
                               "discard that loop's gradients: call step() without a closure (or "
                               "scaler.step(opt)). Lightning's manual optimization passes the optimizer a "
                               "closure: add ssgd_fused.integrations.lightning.SSGDCallback() to the Trainer's "
                               "callbacks")
        self._warn_if_discarding_gradients()
        self.zero_grad(set_to_none=True)
        losses = []
        grad_mode = torch.is_grad_enabled()
        passes = self._cycle.passes()
        try:
            for _ in passes:
                with torch.enable_grad():
                    losses.append(closure())
            self._cycle.finish(update=True)
        except BaseException:  # clean weights whatever happened (Ctrl-C included), then re-raise
            passes.close()
            self._cycle.ensure_clean()
            torch.set_grad_enabled(grad_mode)  # an interrupt inside a no_grad() block skips its exit
            raise
        finally:
            self._note_gradients()
        if any(loss is None for loss in losses):
            return None
        losses = [loss.detach() if isinstance(loss, torch.Tensor) else loss for loss in losses]
        return sum(losses[1:], losses[0]) / len(losses)

    def _grad_marks(self) -> list:
        """(parameter, gradient, gradient version) identities of the parameters that have a
        gradient. Identities, not references: a gradient the user frees stays freed."""
        return [(id(p), id(g), g._version) for grp in self.param_groups for p in grp["params"]
                if (g := p.grad) is not None]

    def _note_gradients(self):
        """Marks what a step leaves in p.grad: SSGD's own gradients, which the next step(closure) may zero."""
        self._grads_left = self._grad_marks()

    def _warn_if_discarding_gradients(self):
        """step(closure) zeroes the gradients before its passes, unlike torch.optim's step: warn when
        that drops gradients computed since the last step (a backward outside the closure, as
        Lightning's gradient accumulation runs without SSGDCallback)."""
        marks = self._grad_marks()
        if marks == self._grads_left:
            return
        left = {m[0]: m for m in self._grads_left}
        fresh = sum(1 for m in marks if left.get(m[0]) != m)
        if fresh:
            warnings.warn(f"ssgd_fused: SSGD.step(closure) zeroes the gradients before its passes, and {fresh} "
                          "parameter(s) had gradients computed since the last step (a backward outside the "
                          "closure): they are discarded. Run every micro-batch inside the closure, or use the "
                          "twin_passes() loop to accumulate; with Lightning's accumulate_grad_batches add "
                          "ssgd_fused.integrations.lightning.SSGDCallback(). Zeroing them with opt.zero_grad() "
                          "before step() silences this.", RuntimeWarning, stacklevel=3)

    def _is_state_init_call(self) -> bool:
        """torch.distributed.checkpoint's state-dict helpers create an empty optimizer's state by
        calling step() with every lr at 0 and zero gradients; that step is the base optimizer's."""
        if self.state or any(g.get("lr", 1.0) != 0 for g in self.param_groups):
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return all(not g.any() for g in grads)

    def twin_passes(self) -> Iterator[int]:
        """For manual training loops (GradScaler, gradient accumulation, DDP no_sync)::

            opt.zero_grad()
            for _ in opt.twin_passes():          # yields 0 at w + n, then 1 at w - n
                loss_fn(model(x), y).backward()
            opt.step()                           # or scaler.step(opt)

        When the loop ends the clean weights are back and p.grad holds the mean gradient; leaving
        the loop early (break, exception) restores the clean weights."""
        self._twin_ready = False
        grad_mode = torch.is_grad_enabled()
        try:
            yield from self._cycle.passes()
            self._cycle.finish(update=False)
        except BaseException:  # close(), or an interrupt between the passes and finish: clean weights
            self._cycle.ensure_clean()
            torch.set_grad_enabled(grad_mode)  # an interrupt inside a no_grad() block skips its exit
            raise
        finally:
            self._note_gradients()  # the passes' gradients are SSGD's, whether the loop ended or not
        self._twin_ready = True

    def zero_grad(self, set_to_none: bool = True):
        """As torch.optim's, except during the passes after the first of a step, where it does
        nothing: the later passes' gradients must add to the first's (frameworks such as Lightning
        call ``optimizer.zero_grad()`` inside the closure). Gradients are zeroed before each step."""
        if self._cycle.in_later_pass():
            return
        super().zero_grad(set_to_none=set_to_none)
        if not set_to_none:  # zeros: nothing a later step(closure) could discard
            self._note_gradients()

    def state_dict(self):
        """The base optimizer's state_dict plus ``"ssgd": {"seed", "step", "spec_version"}``; the
        same three also ride in every param group (``ssgd_seed``, ...), where
        ``torch.distributed.checkpoint``'s state-dict helpers, which keep only "state" and
        "param_groups", carry them."""
        self._cycle.ensure_clean()
        sd = self.base_optimizer.state_dict()
        info = {"seed": self._cycle.seed, "step": self._cycle.step, "spec_version": _noise.SPEC_VERSION}
        sd["ssgd"] = info
        for g in sd["param_groups"]:
            g.update({f"ssgd_{k}": v for k, v in info.items()})
        return sd

    def load_state_dict(self, state_dict):
        info = state_dict.get("ssgd")
        groups = state_dict.get("param_groups") or [{}]
        if info is None and "ssgd_seed" in groups[0]:
            info = {k: groups[0].get(f"ssgd_{k}") for k in ("seed", "step", "spec_version")}
        if info is None:
            raise ValueError("state_dict has no 'ssgd' entry: it was not saved by SSGD.state_dict()")
        if info.get("spec_version") != _noise.SPEC_VERSION:
            raise ValueError(f"state_dict was saved with noise spec {info.get('spec_version')}, "
                             f"this is spec {_noise.SPEC_VERSION}")
        self._cycle.ensure_clean()
        self._twin_ready = False  # a loaded state starts a step afresh
        self._note_gradients()
        base_sd = {k: v for k, v in state_dict.items() if k != "ssgd"}
        if "param_groups" in base_sd:
            base_sd["param_groups"] = [{k: v for k, v in g.items() if not k.startswith("ssgd_")}
                                       for g in base_sd["param_groups"]]
        self.base_optimizer.load_state_dict(base_sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._cycle.seed = int(info["seed"])
        self._cycle.step = int(info["step"])
        self._cycle.forget_norms()

    def add_param_group(self, param_group):
        if not hasattr(self, "base_optimizer"):  # during torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        group = _checked_group(param_group)  # checked before anything changes
        self._cycle.ensure_clean()
        self.base_optimizer.add_param_group(group)
        self._cycle.forget_norms()

    def __repr__(self):
        o = self.options
        return (f"SSGD(noise={o.noise}, distribution={o.distribution!r}, scope={o.scope!r}, "
                f"mode={o.mode!r}, backend={self.backend!r}, base={self.base_optimizer!r})")


def _resolve_backend(backend: str, params) -> str:
    """"reference" or "fused" for the requested backend and these parameters: "auto" falls back to
    the reference with one warning saying why; an explicit kernel backend that cannot run raises."""
    if backend == "reference":
        return "reference"
    devices = {p.device.type for p in params}
    if devices == {"cpu"}:
        kernel_ok, why = _ops.cpp_available(), _ops.cpp_unavailable_reason()
    elif devices == {"cuda"}:
        kernel_ok, why = _ops.triton_available(), "triton is not installed"
    else:
        kernel_ok = False
        why = f"parameters live on {sorted(devices)}; the fused kernels need all on cpu or all on cuda"
    if kernel_ok:
        why = None
        if any(p.dtype not in FUSED_DTYPES for p in params):
            why = "the fused kernels support float32, bfloat16 and float16 parameters"
        elif any(not _distributed.local(p).is_contiguous() for p in params):
            why = "the fused kernels need contiguous parameters"
    if backend in ("cpp", "triton", "fused"):
        want = {"cpp": "cpu", "triton": "cuda"}.get(backend)
        if want is not None and devices != {want}:
            raise RuntimeError(f"backend={backend!r} needs all parameters on {want}, got {sorted(devices)}")
        if why is not None:
            raise RuntimeError(f"backend={backend!r} is unavailable: {why}. Use backend='auto' or 'reference'.")
        return "fused"
    if why is not None:
        warnings.warn(f"ssgd_fused: using the slow reference path because {why}", RuntimeWarning, stacklevel=3)
        return "reference"
    return "fused"
