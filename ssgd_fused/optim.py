"""SSGD: symmetrical weight-noise SGD (Sung et al., arXiv 2009.02479) around any torch.optim optimizer."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import torch

from . import noise as _noise
from . import ops as _ops
from . import reference as _reference

__all__ = ["SSGD"]

MODES = ("symmetric", "one_sided", "smoothout")
NONFINITE = ("update", "skip", "raise")
BN_STATS = ("both", "first", "none")
SCOPES = ("tensor", "filter")
BACKENDS = ("auto", "reference", "cpp", "triton", "fused")
RESTORES = ("auto", "regenerate", "exact")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_alpha(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where} must be a float (the noise level alpha), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} must be a finite float >= 0 (the paper uses 0.25-1.0), got {value}")
    return value


def _choose(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class _Plan:
    """One noise cycle: the perturbed parameters, their scales and where the weights are now."""

    def __init__(self, params, tids, alphas, step):
        self.params = params  # perturbed parameters (alpha > 0)
        self.tids = tids
        self.alphas = alphas
        self.scales = []
        self.sources = None  # clean copies in exact mode
        self.step = step
        self.sample = 0  # the antithetic pair whose noise is applied (the spec's `sample`)
        self.offset = 0.0  # current displacement in units of s*u: +1, -1 or 0 (clean)


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
        model (nn.Module, optional): the model, to find its BatchNorm layers for ``bn_stats``.
    """

    def __init__(self, params, base_optimizer_cls, *, noise: float | Callable[[int], float] = 0.5,
                 distribution: str | None = None, scope: str = "tensor", mode: str = "symmetric",
                 seed: int | None = None, backend: str = "auto", restore: str = "auto", start_step: int = 0,
                 max_grad_norm: float | None = None, nonfinite: str = "update", pairs: int = 1,
                 bn_stats: str = "both", model: torch.nn.Module | None = None, **base_kwargs):
        # ---- validate everything before building anything --------------------------------------
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer_cls must be a torch.optim.Optimizer subclass such as torch.optim.SGD "
                f"(the class, not an instance), got {base_optimizer_cls!r}")
        if issubclass(base_optimizer_cls, SSGD):
            raise TypeError("base_optimizer_cls cannot be SSGD itself")
        if callable(noise):
            _check_alpha(noise(0), "noise(0) (the alpha schedule at step 0)")
        else:
            noise = _check_alpha(noise, "noise")
        _choose("scope", scope, SCOPES)
        _choose("mode", mode, MODES)
        if distribution is None:
            distribution = "uniform" if mode == "smoothout" else "gaussian"
        _choose("distribution", distribution, _noise.DISTRIBUTIONS)
        if mode == "smoothout" and distribution != "uniform":
            raise ValueError(f"mode='smoothout' uses uniform noise; got distribution={distribution!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
            if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm must be a finite float > 0 or None, got {max_grad_norm}")
        _choose("nonfinite", nonfinite, NONFINITE)
        if isinstance(pairs, bool) or not isinstance(pairs, int) or not 1 <= pairs <= 1 << 16:
            raise ValueError(f"pairs must be an int in [1, 65536] (antithetic pairs per step), got {pairs!r}")
        if pairs > 1 and mode != "symmetric":
            raise ValueError(f"pairs={pairs} needs mode='symmetric'")
        _choose("bn_stats", bn_stats, BN_STATS)
        if bn_stats != "both" and not isinstance(model, torch.nn.Module):
            raise ValueError(f"bn_stats={bn_stats!r} needs model=<the nn.Module> (to find its BatchNorm layers)")
        _choose("backend", backend, BACKENDS)
        _choose("restore", restore, RESTORES)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) * 4 + int(torch.randint(0, 4, ()))
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts, got a Tensor")
        groups = list(params)
        if not groups:
            raise ValueError("params is an empty list: SSGD got no parameters")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            g["params"] = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
            if g.get("noise") is not None:
                g["noise"] = _check_alpha(g["noise"], "param group 'noise'")
            for p in g["params"]:
                self._check_param(p)

        super().__init__(groups, {"noise": None})
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: LR schedulers work on either
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, "noise": None}

        self.noise = noise
        self.distribution = distribution
        self.scope = scope
        self.mode = mode
        self.seed = seed
        self.restore = restore
        self.start_step = start_step
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self.pairs = pairs
        self.bn_stats = bn_stats
        self._bn_layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] \
            if model is not None else []
        self.last_step_skipped = False
        self.noise_step = 0  # completed steps (noise cycles); the spec's `step` counter
        self._plan: _Plan | None = None
        self._norm_cache: dict = {}  # {"key": (seed, step, ...), "entries": {p: (w_sq, u_sq, p._version)}}
        self._twin_ready = False
        self._backups: dict[torch.Tensor, torch.Tensor] = {}
        self.backend = self._resolve_backend(backend)
        # the module whose ops move the weights: ssgd_fused.ops (kernels) or ssgd_fused.reference
        self._engine = _reference if self.backend == "reference" else _ops

    # ---- configuration ---------------------------------------------------------------------
    @staticmethod
    def _check_param(p):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must contain Tensors, got {type(p).__name__}")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"SSGD supports real floating-point parameters only, got a {p.dtype} parameter "
                            f"of shape {tuple(p.shape)}")
        if p.is_sparse:
            raise TypeError("SSGD does not support sparse parameters")

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _tensor_ids(self):
        """The spec's tensor_id of each parameter: its index in the flattened param_groups."""
        return {p: i for i, p in enumerate(self._all_params())}

    def _resolve_backend(self, backend: str) -> str:
        params = self._all_params()
        devices = {p.device.type for p in params}
        why = None
        if backend == "reference":
            return "reference"
        if devices == {"cpu"}:
            kernel_ok, kernel_why = _ops.cpp_available(), _ops.cpp_unavailable_reason()
        elif devices == {"cuda"}:
            kernel_ok, kernel_why = _ops.triton_available(), "triton is not installed"
        else:
            kernel_ok = False
            kernel_why = f"parameters live on {sorted(devices)}; the fused kernels need all on cpu or all on cuda"
        if not kernel_ok:
            why = kernel_why
        elif any(p.dtype not in FUSED_DTYPES for p in params):
            why = "the fused kernels support float32, bfloat16 and float16 parameters"
        elif any(not p.is_contiguous() for p in params):
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


    def current_noise(self) -> float:
        """The default alpha for this step: `noise`, or `noise(step)` for a schedule; 0 before
        `start_step` (the base optimizer alone, as in the paper's SGD-then-S-SGD phases)."""
        if self.noise_step < self.start_step:
            return 0.0
        if callable(self.noise):
            return _check_alpha(self.noise(self.noise_step), f"noise({self.noise_step}) (the alpha schedule)")
        return self.noise

    def _alpha(self, group, p, default) -> float:
        if self.noise_step < self.start_step:
            return 0.0
        if group.get("noise") is not None:
            return group["noise"]
        return default if p.dim() >= 2 else 0.0

    def _exact(self, p) -> bool:
        if self.backend == "reference" or self.restore == "exact":
            return True
        return self.restore == "auto" and p.dtype != torch.float32

    # ---- the noise cycle -------------------------------------------------------------------
    def _noise_args(self, plan):
        return dict(seed=self.seed, step=plan.step, sample=plan.sample, distribution=self.distribution,
                    filter=self.scope == "filter")

    @torch.no_grad()
    def _begin(self) -> _Plan:
        """Measures norms and scales; displaces nothing."""
        self._ensure_clean()
        params, tids, alphas = [], [], []
        ids = self._tensor_ids()
        default = self.current_noise()
        for group in self.param_groups:
            for p in group["params"]:
                a = self._alpha(group, p, default)
                if a > 0 and p.numel() > 0:
                    params.append(p)
                    tids.append(ids[p])
                    alphas.append(a)
        plan = _Plan(params, tids, alphas, self.noise_step)
        args = self._noise_args(plan)
        if params:
            # norms left by the previous step's fused update, where the weights have not changed since
            fresh = self._norm_cache.get("key") == self._cache_key(plan.step)
            cached = self._norm_cache.pop("entries", {}) if fresh else {}
            self._norm_cache.clear()
            hit = [cached.get(p) for p in params]
            hit = [h if h is not None and h[2] == p._version else None for h, p in zip(hit, params)]
            miss = [i for i, h in enumerate(hit) if h is None]
            w_sq, u_sq = [h[0] if h else None for h in hit], [h[1] if h else None for h in hit]
            if miss:
                w, u = self._engine.norms([params[i] for i in miss], tensor_ids=[tids[i] for i in miss], **args)
                for i, a, b in zip(miss, w, u):
                    w_sq[i], u_sq[i] = a, b
            plan.scales = _reference.scales_from_norms(w_sq, u_sq, alphas)
        return plan

    def _freeze_bn(self, k: int):
        """BatchNorm running statistics during pass k: bn_stats="both" updates them in every pass
        (the paper's behaviour), "first" in the first pass only, "none" never. A frozen layer
        still normalises with the batch's statistics in training mode."""
        update = self.bn_stats == "both" or (self.bn_stats == "first" and k == 0)
        if update:
            return []
        frozen = [m for m in self._bn_layers if m.track_running_stats]
        for m in frozen:
            m.track_running_stats = False
        return frozen

    def _switch_pair(self, plan: _Plan, sample: int):
        """Back to the clean weights, then the noise of antithetic pair `sample` (its own norms)."""
        self._move(plan, 0.0)
        plan.sample = sample
        w_sq, u_sq = self._engine.norms(plan.params, tensor_ids=plan.tids, **self._noise_args(plan))
        plan.scales = _reference.scales_from_norms(w_sq, u_sq, plan.alphas)

    def _cache_key(self, step):
        return (self.seed, step, self.distribution, self.scope)

    @torch.no_grad()
    def _move(self, plan: _Plan, target: float, grads=None, grad_scale: float = 1.0):
        """Moves the perturbed weights from plan.offset to `target` (in units of s*u); with grads,
        also scales them (restore_). Exact tensors are rebuilt from their clean copy."""
        if plan.params:
            exact = [self._exact(p) for p in plan.params]
            if any(exact) and plan.sources is None:  # first displacement: take the clean copies
                plan.sources = [self._backup(p) if ex else None for p, ex in zip(plan.params, exact)]
            args = self._noise_args(plan)
            for sel in (True, False):
                idx = [i for i, ex in enumerate(exact) if ex == sel]
                if not idx:
                    continue
                coef = target if sel else target - plan.offset
                # parameters with a gradient: restore_ (weights and gradient scale in one pass)
                for with_grad in (False, True):
                    sub = [i for i in idx if (grads is not None and grads[i] is not None) == with_grad]
                    if not sub:
                        continue
                    def pick(xs, sub=sub):
                        return [xs[i] for i in sub]

                    common = dict(tensor_ids=pick(plan.tids), sources=pick(plan.sources) if sel else None, **args)
                    if with_grad:
                        self._engine.restore_(pick(plan.params), pick(grads), pick(plan.scales), coef, grad_scale,
                                              **common)
                    else:
                        self._engine.perturb_(pick(plan.params), pick(plan.scales), coef, **common)
        plan.offset = target

    def _backup(self, p):
        b = self._backups.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype:
            b = self._backups[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        b.copy_(p)
        return b

    def _ensure_clean(self):
        """Puts back clean weights if a cycle was left half-way (exception, abandoned loop)."""
        plan = self._plan
        if plan is not None:
            self._plan = None
            if plan.offset != 0:
                self._move(plan, 0.0)

    def _passes(self):
        """(pair, displacement) per pass: +n_j then -n_j for each antithetic pair j."""
        if self.mode != "symmetric" or self.noise_step < self.start_step:
            return ((0, 1.0),)
        return tuple((j, t) for j in range(self.pairs) for t in (1.0, -1.0))

    def _check_grads(self, first_grads):
        for p in self._all_params():
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("SSGD does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                                   "use dense gradients")
        for p, g in first_grads:
            if p.grad is not g:
                raise RuntimeError(
                    "p.grad was replaced between the two passes (was zero_grad() called inside the closure "
                    "or the twin_passes() loop?). The second pass must accumulate into the first: zero the "
                    "gradients before the step, not between its passes.")

    def _cycle(self) -> Iterator[int]:
        """Displaces the weights for each pass and yields the pass index; any exit other than
        running to completion (exception, close) puts the clean weights back. On completion the
        weights stay at the last displacement and self._plan holds the cycle for _finish()."""
        plan = self._begin()
        self._plan = plan
        first_grads = []
        done = False
        try:
            for k, (pair, target) in enumerate(self._passes()):
                if pair != plan.sample and plan.params:
                    self._switch_pair(plan, pair)
                self._move(plan, target)
                frozen = self._freeze_bn(k)
                try:
                    yield k
                finally:
                    for m in frozen:
                        m.track_running_stats = True
                if self._plan is not plan:
                    raise RuntimeError("the clean weights were restored in the middle of the S-SGD passes "
                                       "(state_dict(), load_state_dict() or a new step was called inside them)")
                if k == 0:
                    first_grads = [(p, p.grad) for p in self._all_params() if p.grad is not None]
            self._check_grads(first_grads)
            done = True
        finally:
            if not done and self._plan is plan:
                self._ensure_clean()

    def _finish(self, update: bool):
        """Restores the clean weights and scales the gradients to their mean (fused with the base
        update where a kernel exists), applies the update if asked, and ends the cycle."""
        plan = self._plan
        gs = 1.0 / len(self._passes())
        self.last_step_skipped = False
        try:
            gs = self._check_finite_and_clip(gs)
            if gs is None:  # non-finite gradients, nonfinite="skip": clean weights, no update
                self.last_step_skipped = True
                self._move(plan, 0.0)
                return
            if not (update and self._fused_update(plan, gs)):
                perturbed = set(plan.params)
                others = [p.grad for p in self._all_params() if p not in perturbed and p.grad is not None]
                self._move(plan, 0.0, grads=[p.grad for p in plan.params], grad_scale=gs)
                if gs != 1.0 and others:
                    torch._foreach_mul_(others, gs)
                if update:
                    self.base_optimizer.step()
        finally:
            self._ensure_clean()
            self.noise_step += 1

    @torch.no_grad()
    def _check_finite_and_clip(self, gs: float):
        """The gradient scale for the mean gradient, times the clipping coefficient of
        max_grad_norm; None to skip the step (non-finite gradients with nonfinite="skip")."""
        if self.max_grad_norm is None and self.nonfinite == "update":
            return gs
        grads = [p.grad for p in self._all_params() if p.grad is not None]
        if not grads:
            return gs
        total = gs * torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)).double(), 2.0).item()
        if not math.isfinite(total):
            if self.nonfinite == "raise":
                raise FloatingPointError("SSGD: non-finite gradients (inf or NaN) in this step; the clean "
                                         "weights were restored and nothing was updated")
            if self.nonfinite == "skip":
                return None
            return gs
        if self.max_grad_norm is not None:
            gs *= min(1.0, self.max_grad_norm / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        return gs

    def _fused_update(self, plan: _Plan, grad_scale: float) -> bool:
        """Restore + base update in one kernel pass (torch.optim.SGD, Adam, AdamW); False where no
        kernel fits the base optimizer, which then runs its own step after a restore pass."""
        base = self.base_optimizer
        kind = type(base)
        if self.backend != "fused" or kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            return False
        for g in self.param_groups:
            if g.get("differentiable") or g.get("capturable") or isinstance(g.get("lr"), torch.Tensor):
                return False
        info = {p: (s, src) for p, s, src in
                zip(plan.params, plan.scales, plan.sources or [None] * len(plan.params))}
        empty = torch.empty(0, dtype=torch.float64)
        args = self._noise_args(plan)
        tids = self._tensor_ids()
        next_norms = {}
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            # exact tensors rebuild from their clean copy (coef 0); the rest re-add the noise
            for exact in (True, False):
                ps = [p for p in with_grad if (p in info and info[p][1] is not None) == exact]
                if not ps:
                    continue
                coef = 0.0 if exact else -plan.offset
                common = dict(tensor_ids=[tids[p] for p in ps], sources=[info[p][1] for p in ps] if exact else None,
                              **args)
                scales = [info[p][0] if p in info else empty for p in ps]
                grads = [p.grad for p in ps]
                # the kernel also measures the updated weights and the next step's noise (pair 0's)
                rows = [_reference.num_slices(p, self.scope == "filter") if p in info and plan.sample == 0 else 0
                        for p in ps]
                nw = [torch.empty(r, dtype=torch.float64) for r in rows]
                nu = [torch.empty(r, dtype=torch.float64) for r in rows]
                common.update(next_w_sq=nw, next_u_sq=nu, next_step=plan.step + 1)
                if kind is torch.optim.SGD:
                    self._fused_sgd(group, ps, grads, scales, coef, grad_scale, common)
                else:
                    self._fused_adam(group, ps, grads, scales, coef, grad_scale, common)
                next_norms.update({p: (w, u, p._version) for p, w, u, r in zip(ps, nw, nu, rows) if r})
        for p in plan.params:  # perturbed parameters that received no gradient: restore only
            if p.grad is None:
                s, src = info[p]
                self._engine.perturb_([p], [s], 0.0 if src is not None else -plan.offset, tensor_ids=[tids[p]],
                                      sources=None if src is None else [src], **args)
        plan.offset = 0.0
        self._norm_cache = {"key": self._cache_key(plan.step + 1), "entries": next_norms}
        return True

    def _fused_sgd(self, group, ps, grads, scales, coef, grad_scale, common):
        momentum = group["momentum"]
        bufs, init = [], []
        if momentum != 0:
            for p in ps:
                b = self.state[p].get("momentum_buffer")
                init.append(b is None)
                bufs.append(torch.empty_like(p) if b is None else b)
        self._engine.restore_update_sgd_(
            ps, grads, bufs, scales, coef, grad_scale, lr=float(group["lr"]), momentum=momentum,
            dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
            maximize=group["maximize"], init_momentum=init, **common)
        if momentum != 0:
            for p, b in zip(ps, bufs):
                self.state[p]["momentum_buffer"] = b

    def _fused_adam(self, group, ps, grads, scales, coef, grad_scale, common):
        amsgrad = group["amsgrad"]
        states = []
        for p in ps:
            st = self.state[p]
            if len(st) == 0:  # the layout torch.optim.Adam creates, so state_dicts interchange
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(st)
        steps = [float(st["step"]) + 1 for st in states]
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", type(self.base_optimizer) is torch.optim.AdamW)
        self._engine.restore_update_adam_(
            ps, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            [st["max_exp_avg_sq"] for st in states] if amsgrad else [], scales, coef, grad_scale, steps=steps,
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=group["maximize"], **common)
        torch._foreach_add_([st["step"] for st in states], 1.0)

    # ---- public API ------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """With a closure: zeroes the gradients, runs ``closure`` (forward + backward, no
        zero_grad inside) at ``w + n`` and at ``w - n``, leaves the mean gradient in ``p.grad``,
        restores the clean weights and applies the base optimizer's update. Returns the mean loss.

        Without a closure: applies the base update after a completed ``twin_passes()`` loop."""
        if closure is None:
            if not self._twin_ready:
                raise RuntimeError("SSGD.step() needs a closure, or must follow a completed "
                                   "`for _ in opt.twin_passes(): ...backward()` loop")
            self._twin_ready = False
            return self.base_optimizer.step()
        self._twin_ready = False
        self.zero_grad(set_to_none=True)
        losses = []
        cycle = self._cycle()
        try:
            for _ in cycle:
                with torch.enable_grad():
                    losses.append(closure())
        except BaseException:
            cycle.close()
            raise
        self._finish(update=True)
        if any(loss is None for loss in losses):
            return None
        losses = [loss.detach() if isinstance(loss, torch.Tensor) else loss for loss in losses]
        return sum(losses[1:], losses[0]) / len(losses)

    def twin_passes(self) -> Iterator[int]:
        """For manual training loops (GradScaler, gradient accumulation, DDP no_sync)::

            opt.zero_grad()
            for _ in opt.twin_passes():          # yields 0 at w + n, then 1 at w - n
                loss_fn(model(x), y).backward()
            opt.step()                           # or scaler.step(opt)

        When the loop ends the clean weights are back and p.grad holds the mean gradient; leaving
        the loop early (break, exception) restores the clean weights."""
        self._twin_ready = False
        yield from self._cycle()
        self._finish(update=False)
        self._twin_ready = True

    def state_dict(self):
        """The base optimizer's state_dict plus ``"ssgd": {"seed", "step", "spec_version"}``."""
        self._ensure_clean()
        sd = self.base_optimizer.state_dict()
        sd["ssgd"] = {"seed": self.seed, "step": self.noise_step, "spec_version": _noise.SPEC_VERSION}
        return sd

    def load_state_dict(self, state_dict):
        self._ensure_clean()
        if "ssgd" not in state_dict:
            raise ValueError("state_dict has no 'ssgd' entry: it was not saved by SSGD.state_dict()")
        info = state_dict["ssgd"]
        if info.get("spec_version") != _noise.SPEC_VERSION:
            raise ValueError(f"state_dict was saved with noise spec {info.get('spec_version')}, "
                             f"this is spec {_noise.SPEC_VERSION}")
        base_sd = {k: v for k, v in state_dict.items() if k != "ssgd"}
        self.base_optimizer.load_state_dict(base_sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.seed = int(info["seed"])
        self.noise_step = int(info["step"])
        self._norm_cache = {}

    def add_param_group(self, param_group):
        if not hasattr(self, "base_optimizer"):  # during torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        self._ensure_clean()
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            self._check_param(p)
        if param_group.get("noise") is not None:
            param_group["noise"] = _check_alpha(param_group["noise"], "param group 'noise'")
        param_group = {**param_group, "params": params}
        param_group.setdefault("noise", None)
        self.base_optimizer.add_param_group(param_group)
        self._norm_cache = {}

    def __repr__(self):
        return (f"SSGD(noise={self.noise}, distribution={self.distribution!r}, scope={self.scope!r}, "
                f"mode={self.mode!r}, backend={self.backend!r}, base={self.base_optimizer!r})")
