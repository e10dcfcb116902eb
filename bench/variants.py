"""The S-SGD implementations the benchmarks compare, each as named passes over a parameter list.

One cycle = norms -> perturb (+n) -> flip (-n) -> restore + SGD-momentum update (the forward and
backward passes a real step runs between them are left out: they are the same for every variant).

- fused:     ssgd_fused's kernels (C++ on CPU), restore by regeneration, no extra buffer
- exact:     ssgd_fused's kernels with restore="exact" (one backup copy)
- reference: ssgd_fused's pure-PyTorch reference path
- eager:     what a careful user writes: preallocated backup and noise buffers, foreach ops,
             torch's normal_ RNG, torch.optim.SGD(foreach=True)
- naive:     clone + randn_like every step, per-tensor ops
- compiled:  torch.compile of the eager cycle
- sgd:       plain torch.optim.SGD(momentum, foreach=True).step(): one update pass, no noise
- fused_adamw: `fused` on torch.optim.AdamW (restore + AdamW update in one pass), the optimizer's cycle
- adamw:     plain torch.optim.AdamW(foreach=True).step()

Each variant names its `base`, the plain optimizer step its cycle is counted in ("x base" in the
tables: the sgd step, or the adamw step for the AdamW variants), and holds that optimizer's state
as after a first step (`state`: per parameter, the buffers the base optimizer keeps).
"""

from __future__ import annotations

import torch

import ssgd_fused
from ssgd_fused import ops
from ssgd_fused import reference as ref

ALPHA = 0.5
LR = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2  # AdamW's

# The byte model of the memory floor. Bytes each variant must move between memory and the cores per
# parameter element per cycle, for a 4-byte dtype, if each pass streams its operands once: reads
# and writes count separately (a read-modify-write of w is 8), and the fused variants' noise is
# regenerated in registers, so it moves nothing. run.py turns bytes x elements into the floor
# time with the measured x.add_(y) bandwidth (floor_ms, and x floor = time / floor); 16-bit
# parameters move half for weights, gradients and buffers (run.py scales by itemsize / 4).
# Passes: N noise and norms, P perturb (+n), F flip (to -n), U restore + SGD-momentum update.
BYTES_PER_ELEM = {
    # P: r/w w | F: r/w w | U: read w g m, write w g m (the next step's norms are taken there too,
    # from the weights in cache, so there is no separate norm pass)
    "fused": 8 + 8 + 24,
    # exact: P also writes the backup; F and U read it instead of w
    "exact": 12 + 8 + 24,
    "reference": 4 + 12 + 8 + 28,
    # N: read w, write u, read u, r/w u (scale) | P: backup copy 8, w += u 12 | F: w -= 2u 12 |
    # U: copy back 8, grad *= .5 8, foreach SGD 32
    "eager": 20 + 20 + 12 + 48,
    "naive": 20 + 20 + 12 + 48,
    "compiled": 20 + 20 + 12 + 48,
    "sgd": 32,  # foreach SGD: buf *= m (8), buf += g (12), w -= lr buf (12)
    # P, F as fused | U: read w g m v, write w g m v (the next step's norms taken there)
    "fused_adamw": 8 + 8 + 32,
    # foreach AdamW: w *= decay 8, lerp m 12, v *= b2 8, addcmul v 12, sqrt v -> t 8, t /= bc 8,
    # t += eps 8, addcdiv w 16
    "adamw": 80,
}


class Variant:
    name = "?"
    base = "sgd"

    def __init__(self, params, distribution="gaussian", state=None):
        self.params = params
        self.distribution = distribution
        # the base optimizer's state as after a first step (the memory bench hands in its own)
        self.state = state or self.make_state(params)
        self.momentum_buffers = [s["momentum_buffer"] for s in self.state] if self.base == "sgd" else None

    @classmethod
    def make_state(cls, params):
        """Per parameter, the base optimizer's state after one step (allocated and touched)."""
        if cls.base == "sgd":
            return [{"momentum_buffer": torch.zeros_like(p)} for p in params]
        return [{"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                for p in params]

    def _give_state(self, opt):
        for p, s in zip(self.params, self.state):
            opt.state[p].update(s)

    def passes(self) -> dict:
        """name -> callable; calling them in order is one cycle."""
        return {"cycle": self.cycle}

    def cycle(self):
        for f in self.passes().values():
            f()


class Fused(Variant):
    """Through the SSGD optimizer (what users run); per-pass timings call the ops directly."""

    name = "fused"
    restore = "regenerate"

    def __init__(self, params, distribution="gaussian", state=None, backend="cpp"):
        super().__init__(params, distribution, state)
        # every tensor perturbed (a group alpha), as the eager variants do
        self.opt = ssgd_fused.SSGD([{"params": params, "noise": ALPHA}], torch.optim.SGD, lr=LR,
                                   momentum=MOMENTUM, distribution=distribution, seed=1, backend=backend,
                                   restore=self.restore)
        self._give_state(self.opt)
        self._tids = list(range(len(params)))
        self._scales = None

    def _args(self, step=0):
        return dict(seed=1, step=step, tensor_ids=self._tids, sample=0, distribution=self.distribution, filter=False)

    def norms(self):
        w2, u2 = ops.norms(self.params, **self._args())
        self._scales = ref.scales_from_norms(w2, u2, [ALPHA] * len(self.params))

    def perturb(self):
        if self._scales is None:  # the first cycle measures; later ones reuse the update's norms
            self.norms()
        ops.perturb_(self.params, self._scales, 1.0, **self._args())

    def flip(self):
        ops.perturb_(self.params, self._scales, -2.0, **self._args())

    def update(self):
        nw = [torch.empty(1, dtype=torch.float64) for _ in self.params]
        nu = [torch.empty(1, dtype=torch.float64) for _ in self.params]
        ops.restore_update_sgd_(self.params, [p.grad for p in self.params], self.momentum_buffers, self._scales, 1.0,
                                0.5, sources=None, lr=LR, momentum=MOMENTUM, dampening=0.0, weight_decay=0.0,
                                nesterov=False, maximize=False, init_momentum=[False] * len(self.params),
                                next_w_sq=nw, next_u_sq=nu, next_step=0, **self._args())
        self._scales = ref.scales_from_norms(nw, nu, [ALPHA] * len(self.params))

    def passes(self):
        """The optimizer's steady state: the update pass also measures the next step's norms."""
        if self.restore != "regenerate":
            return {"cycle": self.cycle}
        return {"perturb": self.perturb, "flip": self.flip, "restore+update+norms": self.update}

    def cycle(self):
        # the optimizer's own cycle with the gradients already in place (no forward/backward): the
        # closure API minus its zero_grad and closure calls, so the update is the fused one
        cycle = self.opt._cycle
        for _ in cycle.passes():
            pass
        cycle.finish(update=True)


class Exact(Fused):
    name = "exact"
    restore = "exact"


class Reference(Fused):
    name = "reference"
    restore = "exact"

    def __init__(self, params, distribution="gaussian", state=None):
        super().__init__(params, distribution, state, backend="reference")


class Eager(Variant):
    name = "eager"

    def __init__(self, params, distribution="gaussian", state=None):
        super().__init__(params, distribution, state)
        self.grads = [p.grad for p in params]
        self.backup = [torch.empty_like(p) for p in params]
        self.noise = [torch.empty_like(p) for p in params]
        self.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)
        self._give_state(self.opt)

    @torch.no_grad()
    def norms(self):
        for n in self.noise:
            if self.distribution == "gaussian":
                n.normal_()
            elif self.distribution == "rademacher":
                n.bernoulli_(0.5).mul_(2).sub_(1)
            else:
                n.uniform_(-1, 1)
        wn = torch._foreach_norm(self.params)
        un = torch._foreach_norm(self.noise)
        scale = torch._foreach_div(torch._foreach_mul(wn, ALPHA), un)
        torch._foreach_mul_(self.noise, scale)

    @torch.no_grad()
    def perturb(self):
        torch._foreach_copy_(self.backup, self.params)
        torch._foreach_add_(self.params, self.noise)

    @torch.no_grad()
    def flip(self):
        torch._foreach_sub_(self.params, self.noise, alpha=2.0)

    @torch.no_grad()
    def update(self):
        torch._foreach_copy_(self.params, self.backup)
        torch._foreach_mul_(self.grads, 0.5)
        self.opt.step()

    def passes(self):
        return {"norms": self.norms, "perturb": self.perturb, "flip": self.flip, "restore+update": self.update}


class Naive(Variant):
    name = "naive"

    def __init__(self, params, distribution="gaussian", state=None):
        super().__init__(params, distribution, state)
        self.opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        self._give_state(self.opt)

    @torch.no_grad()
    def cycle(self):
        backup = [p.clone() for p in self.params]
        noise = []
        for p in self.params:
            n = torch.randn_like(p)
            noise.append(n * (ALPHA * p.norm() / n.norm()))
        for p, n in zip(self.params, noise):
            p.add_(n)
        for p, n in zip(self.params, noise):
            p.sub_(2 * n)
        for p, b in zip(self.params, backup):
            p.copy_(b)
            p.grad.mul_(0.5)
        self.opt.step()


class Compiled(Eager):
    name = "compiled"

    def __init__(self, params, distribution="gaussian", state=None):
        super().__init__(params, distribution, state)
        self._compiled = torch.compile(self._eager_cycle)

    def _eager_cycle(self):
        with torch.no_grad():
            Eager.norms(self)
            Eager.perturb(self)
            Eager.flip(self)
            torch._foreach_copy_(self.params, self.backup)
            torch._foreach_mul_(self.grads, 0.5)

    def passes(self):
        return {"cycle": self.cycle}

    def cycle(self):
        self._compiled()
        self.opt.step()


class PlainStep(Variant):
    """A plain torch.optim step (its `optimizer`), from the given state: one update pass, no noise."""

    def __init__(self, params, distribution="gaussian", state=None):
        super().__init__(params, distribution, state)
        self.opt = self.optimizer(params)
        self._give_state(self.opt)

    def cycle(self):
        self.opt.step()


class Sgd(PlainStep):
    name = "sgd"

    @staticmethod
    def optimizer(params):
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)


class FusedAdamW(Variant):
    """S-SGD on AdamW through the optimizer's own cycle (restore + AdamW update fused)."""

    name = "fused_adamw"
    base = "adamw"

    def __init__(self, params, distribution="gaussian", state=None):
        super().__init__(params, distribution, state)
        self.opt = ssgd_fused.SSGD([{"params": params, "noise": ALPHA}], torch.optim.AdamW, lr=LR,
                                   weight_decay=WEIGHT_DECAY, distribution=distribution, seed=1, backend="cpp",
                                   restore="regenerate")  # as `fused` (16-bit parameters default to exact)
        self._give_state(self.opt)

    cycle = Fused.cycle


class AdamW(PlainStep):
    name = "adamw"
    base = "adamw"

    @staticmethod
    def optimizer(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)


VARIANTS = {v.name: v for v in (Fused, Exact, Reference, Eager, Naive, Compiled, Sgd, FusedAdamW, AdamW)}
