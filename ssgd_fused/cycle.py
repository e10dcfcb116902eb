"""The noise cycle of S-SGD: one object that knows where the weights are.

Per step (README "What S-SGD does")::

    begin     which tensors carry noise, their alphas, norms and scales s_i = alpha_i ||w_i|| / ||u_i||
    passes    weights at +s*u (pass 0), then -s*u (pass 1), for each antithetic pair; the caller runs
              forward/backward in each pass and .grad accumulates
    finish    clean weights back and the gradient scaled to its mean, fused with the base optimizer's
              update where a kernel exists (ssgd_fused.updates), else restore then base.step()

Weights move only through the ops (``ssgd_fused.ops`` kernels or ``ssgd_fused.reference``), by an
offset in units of s*u: a move from offset a to b adds (b - a) * s * u in place ("regenerate"), or
rebuilds the tensor from a clean copy as src + b * s * u ("exact"). `ensure_clean` puts the clean
weights back from wherever a cycle was left (exception, abandoned loop, state_dict in between).

Norms: ||u||^2 is a pure function of the stream, so the update pass measures the next step's
||u||^2 and the next step reuses it. ||w||^2 must be measured afresh every step, because weights
edited through ``.data`` or by other code leave no trace in the version counters. On CPU the first
move measures it while it displaces (``perturb_norms_``, no separate read of the weights): the move
uses the update pass's ||w||^2, and a tensor whose fresh norm differs (weights changed between
steps) gets its scale recomputed and the difference added at once, before any forward pass. On CUDA
that comparison would need a host read, so a weights-only norm pass runs before the move instead.

Asynchronous exceptions: every move of the weights and the bookkeeping that records it run inside
`critical()` (ssgd_fused.critical), so a Ctrl-C lands before or after a move, never between a move
and its record; `ensure_clean` then always knows where the weights are.

Gradients between the passes: the second pass must add into the first's .grad. `GradGuard` holds
the first pass's gradient tensors while later passes run; where a pass sets .grad to None or
replaces it (``model.zero_grad()``, ``set_to_none``), the new gradient is added into the held one
afterwards; an in-place zeroing of the held tensor (``zero_grad(set_to_none=False)``), which
destroys the first pass's gradient, is an error. ``SSGD.zero_grad()`` itself is deferred during
the later passes (frameworks such as Lightning call it inside the closure).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from . import distributed as _distributed
from . import reference as _reference
from .critical import critical
from .options import Options
from .updates import fused_update_for


class _Plan:
    """One step's displacement: the perturbed parameters (alpha > 0), their spec tensor ids, alphas,
    scales and clean copies (exact restore), the antithetic pair applied and the current offset."""

    def __init__(self, params, tids, alphas, exact, step):
        self.params = params
        self.tids = tids
        self.alphas = alphas
        self.exact = exact  # per parameter: rebuilt from a clean copy instead of by regeneration
        self.scales = []
        self.sources = None  # clean copies of the exact parameters, taken at the first displacement
        # (||w||^2 per parameter, ||u||^2 per parameter, indices whose ||w||^2 is the previous update
        # pass's and must be checked by the first move) or None
        self.unchecked = None
        self.step = step
        self.sample = 0  # the antithetic pair whose noise is applied (the spec's `sample`)
        self.offset = 0.0  # current displacement in units of s*u: +1, -1 or 0 (clean)

    def info(self):
        """{param: (scale, clean copy or None)}."""
        return {p: (s, src) for p, s, src in zip(self.params, self.scales, self.sources or [None] * len(self.params))}


def _split(items, key):
    """Items grouped by key(item), in first-seen order of the keys (the kernels take one kind of
    tensor at a time: exact or regenerated, with or without a gradient)."""
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out.items()


class NoiseCycle:
    """The S-SGD cycle over a base optimizer's param_groups; ``ops`` moves the weights."""

    def __init__(self, base: torch.optim.Optimizer, options: Options, ops, fused: bool,
                 bn_layers: list[torch.nn.Module], model: torch.nn.Module | None = None):
        self.base = base
        self.options = options
        # ssgd_fused.ops (the kernels) or ssgd_fused.reference, seen through ShardedOps: DTensor
        # arguments become their local shards, with each shard's element offset
        self.ops = _distributed.ShardedOps(ops)
        self.model = model  # DDP: the passes before the last run under its no_sync()
        self.rank = _distributed.world()[0]
        self.fused = fused  # restore fused with the base update where ssgd_fused.updates has a kernel
        self.bn_layers = bn_layers
        self.seed = options.seed
        self.step = 0  # completed steps (noise cycles); the spec's `step` counter
        self.last_step_skipped = False
        self.twin_ready = False  # SSGD's: a twin_passes() loop is complete, its update pending
        self._plan: _Plan | None = None
        # {"key": (seed, step, ...), "entries": {p: (tensor id, numel, u_sq, w_sq)}}
        self._noise_norms: dict = {}
        self.pass_index: int | None = None  # the pass running now (None outside the passes)
        self._backups: dict[torch.Tensor, torch.Tensor] = {}
        self._alpha_vector: tuple = (None, None)  # (alphas, counts, device), the alphas per norm on the device

    # ---- bookkeeping ---------------------------------------------------------------------------
    def params(self):
        return [p for g in self.base.param_groups for p in g["params"]]

    def tensor_ids(self):
        """The spec's tensor_id of each parameter: its index in the flattened param_groups."""
        return {p: i for i, p in enumerate(self.params())}

    def passes_of(self, step: int):
        """(sample, displacement) per pass of `step` on this rank."""
        return self.options.passes(step, self.rank)

    def num_passes(self) -> int:
        return len(self.passes_of(self.step))

    def forget_norms(self):
        self._noise_norms = {}

    def in_later_pass(self) -> bool:
        """True while a pass after the first runs (its gradients must add to the first's)."""
        return self.pass_index is not None and self.pass_index > 0

    def _stream(self, plan: _Plan, **extra):
        o = self.options
        return {"seed": self.seed, "step": plan.step, "sample": plan.sample, "distribution": o.distribution,
                "filter": o.scope == "filter", **extra}

    def _norm_key(self, step, sample):
        return (self.seed, step, sample, self.options.distribution, self.options.scope)

    def _exact(self, p) -> bool:
        restore = self.options.restore
        # ranks="pairs"/"split": each rank's noise differs, so regeneration would round differently
        # on each rank and the replicas would drift apart; the clean copy keeps them bitwise equal
        if not self.fused or restore == "exact" or self.options.ranks != "same":
            return True
        return restore == "auto" and p.dtype != torch.float32

    def _alpha(self, group, p, default) -> float:
        if self.step < self.options.start_step:
            return 0.0
        if group.get("noise") is not None:
            return group["noise"]
        return default if p.dim() >= 2 else 0.0

    # ---- one cycle -------------------------------------------------------------------------------
    @torch.no_grad()
    def _begin(self) -> _Plan:
        """Chooses the perturbed tensors and measures their scales; displaces nothing."""
        self.ensure_clean()
        ids = self.tensor_ids()
        default = self.options.alpha_at(self.step)
        chosen = [(p, ids[p], a) for g in self.base.param_groups for p in g["params"]
                  if (a := self._alpha(g, p, default)) > 0 and p.numel() > 0]
        params = [c[0] for c in chosen]
        plan = _Plan(params, [c[1] for c in chosen], [c[2] for c in chosen], [self._exact(p) for p in params],
                     self.step)
        plan.sample = self.passes_of(self.step)[0][0]
        if params:
            w_sq, u_sq, unchecked = self._measure(plan)
            plan.scales = self._scales(w_sq, u_sq, plan.alphas)
            if unchecked:
                plan.unchecked = (w_sq, u_sq, unchecked)
        return plan

    def _scales(self, w_sq, u_sq, alphas):
        """reference.scales_from_norms (s = alpha ||w|| / ||u||, 0 where ||w|| = 0), bit for bit,
        computed where the norms are, with no host round trip: one alpha is a Python float; several
        become a device vector, uploaded without blocking and kept while they stay the same."""
        counts = [t.numel() for t in w_sq]
        w2, u2 = torch.cat(w_sq), torch.cat(u_sq)
        if len(set(alphas)) == 1:
            a = float(alphas[0])
        else:
            key = (tuple(alphas), tuple(counts), w2.device)
            if self._alpha_vector[0] != key:
                host = torch.tensor([float(x) for x, n in zip(alphas, counts) for _ in range(n)], dtype=torch.float64)
                self._alpha_vector = (key, host.to(w2.device, non_blocking=True))
            a = self._alpha_vector[1]
        s = torch.where(w2 > 0, a * torch.sqrt(w2 / u2), torch.zeros_like(w2))
        return list(s.split(counts))

    def _check_in_move(self, params) -> bool:
        """Whether the first move can check the cached ||w||^2 (CPU tensors, unsharded: the
        comparison reads the norms on the host, and a shard's norm is a sum over ranks)."""
        return all(p.device.type == "cpu" and not _distributed.is_dtensor(p) for p in params)

    def _measure(self, plan: _Plan):
        """(||w||^2, ||u||^2, unchecked) per perturbed tensor. ||u||^2 from the previous update
        pass where it measured this step's noise (same stream, tensor id and size), else both from
        a norm pass. ||w||^2 afresh, from a weights-only norm pass, or, where the first move can
        check it (`_check_in_move`), the update pass's value, provisionally: `unchecked` lists
        those tensors."""
        fresh = self._noise_norms.get("key") == self._norm_key(plan.step, plan.sample)
        cached = self._noise_norms.get("entries", {}) if fresh else {}
        self._noise_norms = {}
        hits = [cached.get(p) for p in plan.params]
        hits = [h if h is not None and h[:2] == (tid, p.numel()) else None
                for h, p, tid in zip(hits, plan.params, plan.tids)]
        u_sq = [h[2] if h is not None else None for h in hits]
        w_sq = [None] * len(plan.params)
        unchecked = []
        if self._check_in_move(plan.params):
            unchecked = [i for i, h in enumerate(hits) if h is not None and h[3] is not None]
            for i in unchecked:
                w_sq[i] = hits[i][3]
        miss = [i for i, u in enumerate(u_sq) if u is None]
        hit = [i for i, u in enumerate(u_sq) if u is not None and w_sq[i] is None]
        for idx, dist in ((miss, self.options.distribution), (hit, "rademacher")):
            if not idx:
                continue
            # rademacher's ||u||^2 is the element count, known without generating: the norm op then
            # only reads the weights (same accumulation order, so the same ||w||^2)
            w, u = self.ops.norms([plan.params[i] for i in idx], tensor_ids=[plan.tids[i] for i in idx],
                                  **self._stream(plan, distribution=dist))
            for k, i in enumerate(idx):
                w_sq[i] = w[k]
                if u_sq[i] is None:
                    u_sq[i] = u[k]
        return self._over_shards(plan.params, w_sq), self._over_shards(plan.params, u_sq), unchecked

    def _over_shards(self, params, sq):
        """Tensor scope: a sharded tensor's norm is the sum of its shards' (whole rows per shard:
        the filter scope's per-row norms are local)."""
        if self.options.scope == "filter" or not any(map(_distributed.is_dtensor, params)):
            return sq
        return _distributed.sum_over_shards(sq, [self.ops.shard(p).group for p in params])

    def passes(self) -> Iterator[int]:
        """Displaces the weights for each pass and yields the pass index; any exit other than
        running to completion (exception, close) puts the clean weights back. On completion the
        weights stay at the last displacement until `finish`."""
        plan = self._begin()
        self._plan = plan
        guard = None
        done = False
        try:
            schedule = self.passes_of(plan.step)
            for k, (pair, target) in enumerate(schedule):
                with critical():
                    if pair != plan.sample and plan.params:
                        self._switch_pair(plan, pair)
                    self._move(plan, target)
                    frozen = self._freeze_bn(k)
                if k == 1:  # DDP writes gradients in place itself: no overwrite check there
                    guard = GradGuard(self.params(), check=_distributed.world()[1] == 1)
                if guard is not None:
                    guard.watch()
                self.pass_index = k
                # DDP: gradients all-reduced once, in the last pass's backward
                last = k == len(schedule) - 1
                try:
                    with contextlib.nullcontext() if last else _distributed.no_sync(self.model):
                        yield k
                finally:
                    self.pass_index = None
                    with critical():
                        for m in frozen:
                            m.track_running_stats = True
                    if guard is not None:
                        guard.unwatch()
                if self._plan is not plan:
                    raise RuntimeError("the clean weights were restored in the middle of the S-SGD passes "
                                       "(state_dict(), load_state_dict() or a new step was called inside them)")
                if guard is not None:
                    guard.fold()
            self._check_sparse()
            done = True
        finally:
            if not done and self._plan is plan:
                self.ensure_clean()

    @torch.no_grad()
    def finish(self, update: bool):
        """Restores the clean weights and scales the gradients to their mean (fused with the base
        update where a kernel exists), applies the update if asked, and ends the cycle; the
        weights, the optimizer state and the step counter change together (one critical section)."""
        with critical():
            plan = self._plan
            gs = 1.0 / self.num_passes()
            self.last_step_skipped = False
            try:
                gs = self._finite_and_clipped(gs)
                if gs is None:  # non-finite gradients, nonfinite="skip": clean weights, no update
                    self.last_step_skipped = True
                    self._move(plan, 0.0)
                    return
                fused_update = fused_update_for(self.base) if update and self.fused else None
                if fused_update is not None:
                    self._restore_update(plan, gs, fused_update)
                    return
                perturbed = set(plan.params)
                others = [p.grad for p in self.params() if p not in perturbed and p.grad is not None]
                self._move(plan, 0.0, grads=[p.grad for p in plan.params], grad_scale=gs)
                if gs != 1.0 and others:
                    torch._foreach_mul_(others, gs)
                if update:
                    self.base.step()
            finally:
                self.ensure_clean()
                self.step += 1

    def ensure_clean(self):
        """Puts back clean weights if a cycle was left half-way (exception, abandoned loop), and
        drops the gradients an FSDP2 model holds unreduced from its passes."""
        with critical():
            plan = self._plan
            if plan is not None:
                if plan.offset != 0:
                    self._move(plan, 0.0)
                self._plan = None
                _distributed.discard_unreduced(self.model)

    # ---- moves -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _move(self, plan: _Plan, target: float, grads=None, grad_scale: float = 1.0):
        """Moves the perturbed weights from plan.offset to `target` (in units of s*u); with grads,
        also scales them (restore_). Exact tensors are rebuilt from their clean copy. The first move
        of a plan with provisional ||w||^2 measures them as it displaces (perturb_norms_) and then
        corrects the tensors whose norms were stale (`_correct_stale`)."""
        check = plan.unchecked if grads is None and plan.offset == 0 and target != 0 else None
        measured = {}
        if plan.params:
            if any(plan.exact) and plan.sources is None:  # first displacement: take the clean copies
                plan.sources = [self._backup(p) if ex else None for p, ex in zip(plan.params, plan.exact)]
            has_grad = (lambda i: False) if grads is None else (lambda i: grads[i] is not None)
            for (exact, with_grad), idx in _split(range(len(plan.params)), lambda i: (plan.exact[i], has_grad(i))):
                def pick(xs, idx=idx):
                    return [xs[i] for i in idx]

                coef = target if exact else target - plan.offset
                stream = self._stream(plan, tensor_ids=pick(plan.tids), sources=pick(plan.sources) if exact else None)
                if with_grad:
                    self.ops.restore_(pick(plan.params), pick(grads), pick(plan.scales), coef, grad_scale, **stream)
                elif check is not None:
                    w_out = [torch.empty_like(check[0][i]) for i in idx]
                    self.ops.perturb_norms_(pick(plan.params), w_out, pick(plan.scales), coef, **stream)
                    measured.update(zip(idx, w_out))
                else:
                    self.ops.perturb_(pick(plan.params), pick(plan.scales), coef, **stream)
        plan.offset = target
        if check is not None:
            plan.unchecked = None
            self._correct_stale(plan, target, measured, *check)

    def _correct_stale(self, plan: _Plan, target: float, measured, w_sq, u_sq, unchecked):
        """After the first move: where a measured ||w||^2 differs from the provisional one (weights
        changed between steps), the scale is recomputed from it and the difference is added
        (regenerated tensors) or the tensor rebuilt from its clean copy (exact ones), so the weights
        are where the fresh norms put them."""
        stale = [i for i in unchecked if not torch.equal(measured[i], w_sq[i])]
        if not stale:
            return
        new = self._scales([measured[i] for i in stale], [u_sq[i] for i in stale], [plan.alphas[i] for i in stale])
        for exact, ks in _split(range(len(stale)), lambda k: plan.exact[stale[k]]):
            idx = [stale[k] for k in ks]
            stream = self._stream(plan, tensor_ids=[plan.tids[i] for i in idx],
                                  sources=[plan.sources[i] for i in idx] if exact else None)
            # exact: rebuilt as src + target * s; regenerated: + target * (s_new - s_old)
            delta = [new[k] if exact else new[k] - plan.scales[stale[k]] for k in ks]
            self.ops.perturb_([plan.params[i] for i in idx], delta, target, **stream)
            for k in ks:
                plan.scales[stale[k]] = new[k]

    def _restore_update(self, plan: _Plan, grad_scale: float, fused_update):
        """Restore + base update in one pass per param group and kind, which also measures the
        next step's ||u||^2 (pair 0's noise) and ||w||^2 (checked by the next first move: `_measure`)."""
        info = plan.info()
        tids = self.tensor_ids()
        empty = {}  # "no noise" scales, per device
        filter = self.options.scope == "filter"
        next_norms = {}
        # the update measures the next step's noise with this pass's sample: kept when the next step
        # starts with the same one
        measure_next = plan.sample == self.passes_of(plan.step + 1)[0][0]
        for group in self.base.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            # exact tensors rebuild from their clean copy (coef 0); the rest re-add the noise
            for exact, ps in _split(with_grad, lambda p: p in info and info[p][1] is not None):
                rows = [_reference.num_slices(_distributed.local(p), filter) if p in info and measure_next else 0
                        for p in ps]
                nw = [torch.empty(r, dtype=torch.float64, device=p.device) for p, r in zip(ps, rows)]
                nu = [torch.empty(r, dtype=torch.float64, device=p.device) for p, r in zip(ps, rows)]
                stream = self._stream(plan, tensor_ids=[tids[p] for p in ps],
                                      sources=[info[p][1] for p in ps] if exact else None,
                                      next_w_sq=nw, next_u_sq=nu, next_step=plan.step + 1)
                fused_update(self.ops, self.base, group, ps, [p.grad for p in ps],
                             [info[p][0] if p in info else empty.setdefault(p.device, torch.empty(
                                 0, dtype=torch.float64, device=p.device)) for p in ps], 0.0 if exact else -plan.offset,
                             grad_scale, **stream)
                next_norms.update({p: (tids[p], p.numel(), u, w) for p, u, w, r in zip(ps, nu, nw, rows) if r})
        for p in plan.params:  # perturbed parameters that received no gradient: restore only
            if p.grad is None:
                s, src = info[p]
                self.ops.perturb_([p], [s], 0.0 if src is not None else -plan.offset,
                                  **self._stream(plan, tensor_ids=[tids[p]], sources=None if src is None else [src]))
        plan.offset = 0.0
        self._noise_norms = {"key": self._norm_key(plan.step + 1, plan.sample), "entries": next_norms}

    @torch.no_grad()
    def _switch_pair(self, plan: _Plan, sample: int):
        """Back to the clean weights, then the noise of antithetic pair `sample` (its own norms)."""
        self._move(plan, 0.0)
        plan.sample = sample
        w_sq, u_sq = self.ops.norms(plan.params, tensor_ids=plan.tids, **self._stream(plan))
        plan.scales = self._scales(self._over_shards(plan.params, w_sq), self._over_shards(plan.params, u_sq),
                                   plan.alphas)

    def _backup(self, p):
        b = self._backups.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype:
            b = self._backups[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        b.copy_(p)
        return b

    # ---- checks between and after the passes ---------------------------------------------------
    def _freeze_bn(self, k: int):
        """BatchNorm running statistics during pass k: bn_stats="both" updates them in every pass
        (the paper's behaviour), "first" in the first pass only, "none" never. A frozen layer
        still normalises with the batch's statistics in training mode."""
        policy = self.options.bn_stats
        if policy == "both" or (policy == "first" and k == 0):
            return []
        frozen = [m for m in self.bn_layers if m.track_running_stats]
        for m in frozen:
            m.track_running_stats = False
        return frozen

    def _check_sparse(self):
        for p in self.params():
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("SSGD does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                                   "use dense gradients")

    @torch.no_grad()
    def _finite_and_clipped(self, gs: float):
        """The gradient scale for the mean gradient, times the clipping coefficient of
        max_grad_norm; None to skip the step (non-finite gradients with nonfinite="skip")."""
        o = self.options
        if o.max_grad_norm is None and o.nonfinite == "update":
            return gs
        grads = [p.grad for p in self.params() if p.grad is not None]
        if not grads:
            return gs
        norms = [n.full_tensor() if _distributed.is_dtensor(n) else n for n in torch._foreach_norm(grads, 2.0)]
        total = gs * torch.linalg.vector_norm(torch.stack(norms).double(), 2.0).item()
        if not math.isfinite(total):
            if o.nonfinite == "raise":
                raise FloatingPointError("SSGD: non-finite gradients (inf or NaN) in this step; the clean "
                                         "weights were restored and nothing was updated")
            if o.nonfinite == "skip":
                return None
            return gs
        if o.max_grad_norm is not None:
            gs *= min(1.0, o.max_grad_norm / (total + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        return gs


class GradGuard:
    """Keeps the first pass's gradients through the later passes (see the module docstring).

    watch() before a later pass notes each held gradient's version counter and hooks each
    parameter's gradient accumulation: autograd adds into an existing .grad in place, one version
    bump per backward, so a held gradient found with more bumps than accumulations was written in
    place by something else (an in-place zero_grad). fold() after the pass adds gradients that
    replaced a held one into it and puts the held tensor back in .grad. Under torch.distributed
    the check is off (DDP's reducer writes the gradients in place between backwards)."""

    def __init__(self, params, check: bool = True):
        self.held = {p: p.grad for p in params if p.grad is not None}
        self.check = check
        self.version = {}
        self.hooks = []
        self.overwritten = []

    def watch(self):
        if not self.check:
            return
        self.version = {p: g._version for p, g in self.held.items()}
        self.hooks = [p.register_post_accumulate_grad_hook(self._accumulated) for p in self.held
                      if p.requires_grad and p.is_leaf]

    def _accumulated(self, p):
        g = self.held[p]
        if p.grad is g:
            if g._version != self.version[p] + 1:
                self.overwritten.append(p)
            self.version[p] = g._version

    def unwatch(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @torch.no_grad()
    def fold(self):
        if self.overwritten:
            shapes = sorted({tuple(p.shape) for p in self.overwritten})
            raise RuntimeError(
                f"the first pass's gradient was overwritten in place during a later S-SGD pass (parameters of "
                f"shape {shapes[:4]}): zero_grad(set_to_none=False) or grad.zero_() was called inside the "
                "closure or the twin_passes() loop. Zero before the step, call the optimizer's zero_grad() "
                "(deferred during the passes) or use set_to_none=True; the clean weights were restored.")
        for p, g in self.held.items():
            if p.grad is not g:
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g
