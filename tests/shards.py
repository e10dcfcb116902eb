"""Sharded tensors for the element_offsets tests (FSDP2 Shard(0)): full tensors cut along dim 0 into
shards, each with its element offset in its full tensor, and checks that an op applied to the
shards (one call, all shards, their offsets) gives the slices of the op applied to the full tensors.

Each backend's test file runs the same checks with its own op module (reference, C++, Triton)."""

from __future__ import annotations

import torch

from ssgd_fused import reference as ref
from tests.tolerances import GAUSS_TOL, TOL

SEED = 0xDEADBEEF12345678
STEP = 5

# name: (full shape, cuts along dim 0). Offsets are cut * row length: a 1-D tensor is cut anywhere
# (0, 1, 3, 5, 127, 129, 4099: inside a 4-block and a 128-block); 2-D ones at rows (13x7 at 0, 35, 63;
# 9x129 at 129, 387, 1032; 5x20001 at 40002, shards of several C++ work items).
CASES = {
    "1d": ((4200,), (0, 1, 3, 5, 127, 129, 4099, 4200)),
    "13x7": ((13, 7), (0, 5, 9, 13)),
    "9x129": ((9, 129), (0, 1, 3, 8, 9)),
    "129x7": ((129, 7), (0, 1, 19, 128, 129)),
    "3": ((3,), (0, 1, 3)),
    "5x20001": ((5, 20001), (0, 2, 5)),
}
SMALL = [n for n in CASES if n != "5x20001"]  # for the reference and triton's interpreter
FEW_ROWS = ["13x7", "9x129", "3"]  # the interpreter runs the filter scope's norm pass a program per row


class Problem:
    """Full tensors (tensor_id 10 + k for case k) and their shards, with the matching scales: per
    tensor, a shard takes its full tensor's scale; per row, its rows' scales."""

    def __init__(self, names, dtype, dist, filter, device="cpu", gen_seed=0, positive=False, alpha=0.7):
        g = torch.Generator().manual_seed(gen_seed)
        self.dist, self.filter, self.dtype = dist, filter, dtype
        self.full, self.tids, self.cuts = [], [], []
        for k, name in enumerate(names):
            shape, cuts = CASES[name]
            t = torch.randn(shape, generator=g)
            self.full.append((t.abs() if positive else t).to(dtype))
            self.tids.append(10 + k)
            self.cuts.append(cuts)
        w2, u2 = ref.norms(self.full, SEED, STEP, self.tids, 0, dist, filter)
        self.full_scales = ref.scales_from_norms(w2, u2, [alpha] * len(self.full))
        self.owner, self.offsets, self.shard_tids, self.shard_scales = [], [], [], []
        for k, (f, cuts) in enumerate(zip(self.full, self.cuts)):
            row_len = f[0].numel() if f.dim() else 1
            for a, b in zip(cuts, cuts[1:]):
                self.owner.append((k, a, b))
                self.offsets.append(a * row_len)
                self.shard_tids.append(self.tids[k])
                s = self.full_scales[k]
                self.shard_scales.append(s[a:b].clone() if filter else s.clone())
        self.device = device
        self.full = [t.to(device) for t in self.full]
        self.full_scales = [s.to(device) for s in self.full_scales]
        self.shard_scales = [s.to(device) for s in self.shard_scales]

    def shards(self, fulls=None):
        """Clones of the shards of `fulls` (default: the full tensors)."""
        fulls = self.full if fulls is None else fulls
        return [fulls[k][a:b].clone() for k, a, b in self.owner]

    def like(self, fill, fulls=None):
        """Per full tensor and per shard, a tensor like it filled with `fill` (poison)."""
        fulls = self.full if fulls is None else fulls
        return [torch.full_like(f, fill) for f in fulls], [torch.full_like(s, fill) for s in self.shards(fulls)]

    def join(self, shards):
        """The shards put back together along dim 0, one tensor per full tensor."""
        parts = [[] for _ in self.full]
        for (k, _, _), s in zip(self.owner, shards):
            parts[k].append(s)
        return [torch.cat(p) for p in parts]

    def row_norms(self, values):
        """Per-shard norms (one entry per shard or per shard row) as per-full-tensor values: the
        shards' sums (tensor scope) or their rows put together (filter scope)."""
        if self.filter:
            return self.join(values)
        out = [torch.zeros(1, dtype=torch.float64, device=v.device) for v in values[:len(self.full)]]
        for (k, _, _), v in zip(self.owner, values):
            out[k] = out[k] + v
        return out

    def stream(self):
        """Keyword arguments of the full tensors' and the shards' calls: (full, sharded)."""
        common = dict(seed=SEED, step=STEP, sample=0, distribution=self.dist, filter=self.filter)
        return (dict(common, tensor_ids=self.tids),
                dict(common, tensor_ids=self.shard_tids, element_offsets=self.offsets))

    def next_norm_outputs(self):
        """Poisoned next_w_sq / next_u_sq for the full tensors and for the shards."""
        def rows(ts):
            return [torch.full((ref.num_slices(t, self.filter),), float("nan"), dtype=torch.float64,
                               device=t.device) for t in ts]
        sh = self.shards()
        return (rows(self.full), rows(self.full)), (rows(sh), rows(sh))


def assert_values(got, want, dtype, dist, scales):
    """Shard results against the full tensor's slice: exact for the integer streams (the same float32
    arithmetic on the same noise), within the spec's gaussian tolerance carried through the scale."""
    for a, b in zip(got, want):
        assert not a.isnan().any()
        if dist == "gaussian":
            t = dict(TOL[dtype])
            t["atol"] += 6 * GAUSS_TOL * max(float(s.abs().max()) for s in scales if s.numel())
            torch.testing.assert_close(a.cpu(), b.cpu(), **t)
        else:
            assert torch.equal(a.cpu(), b.cpu())


def assert_norms(p: Problem, shard_w2, shard_u2, full_w2, full_u2):
    """Tensor scope: the shards' sums equal the full tensor's; filter scope: the rows' values. ||u||^2:
    exact for rademacher (element counts); otherwise 1e-6 (the gaussian edges by z^2, whole blocks by
    r^2; Triton's per-chunk partial sums of u^2 are float32)."""
    for a, b in zip(p.row_norms(list(shard_w2)), full_w2):
        assert not a.isnan().any()
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-12, atol=0)
    for a, b in zip(p.row_norms(list(shard_u2)), full_u2):
        assert not a.isnan().any()
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0 if p.dist == "rademacher" else 1e-6, atol=0)


# ---- the checks, one per op, for an op module with the reference's signatures -----------------
def check_norms(mod, p: Problem):
    full_kw, shard_kw = p.stream()
    fw, fu = mod.norms(p.full, **full_kw)
    sw, su = mod.norms(p.shards(), **shard_kw)
    assert_norms(p, sw, su, fw, fu)


def check_perturb(mod, p: Problem, coef=-2.0):
    """perturb_ in place, then from sources into poisoned outputs; restore_ with halved grads."""
    full_kw, shard_kw = p.stream()
    full, shards = [t.clone() for t in p.full], p.shards()
    mod.perturb_(full, p.full_scales, coef, **full_kw)
    mod.perturb_(shards, p.shard_scales, coef, **shard_kw)
    assert_values(p.join(shards), full, p.dtype, p.dist, p.full_scales)
    out_f, out_s = p.like(float("nan"))
    mod.perturb_(out_f, p.full_scales, 1.0, **full_kw, sources=p.full)
    mod.perturb_(out_s, p.shard_scales, 1.0, **shard_kw, sources=p.shards())
    assert_values(p.join(out_s), out_f, p.dtype, p.dist, p.full_scales)
    grads_f = [t.clone() for t in full]
    grads_s = p.shards(grads_f)
    mod.restore_(full, grads_f, p.full_scales, -coef, 0.5, **full_kw)
    mod.restore_(shards, grads_s, p.shard_scales, -coef, 0.5, **shard_kw)
    assert_values(p.join(shards), full, p.dtype, p.dist, p.full_scales)
    assert_values(p.join(grads_s), grads_f, p.dtype, "exact", p.full_scales)


def _update_inputs(p: Problem):
    full_kw, shard_kw = p.stream()
    displaced = [t.cpu().clone() for t in p.full]
    ref.perturb_(displaced, [s.cpu() for s in p.full_scales], -1.0, **full_kw)
    displaced = [t.to(p.device) for t in displaced]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(p.dtype).to(p.device) for t in p.full]
    return full_kw, shard_kw, displaced, grads


def check_sgd(mod, p: Problem):
    """restore_update_sgd_ with momentum (buffers poisoned where init) and the next step's norms."""
    full_kw, shard_kw, displaced, grads = _update_inputs(p)
    bufs = [torch.randn_like(t) for t in p.full]
    init_f = [k % 2 == 0 for k in range(len(p.full))]
    init_s = [init_f[k] for k, _, _ in p.owner]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False,
              next_step=STEP + 1)
    runs = []
    for is_shard, kwargs, init in ((False, full_kw, init_f), (True, shard_kw, init_s)):
        pick = p.shards if is_shard else (lambda ts: [t.clone() for t in ts])
        w, gr, b = pick(displaced), pick(grads), pick(bufs)
        b = [torch.full_like(x, float("nan")) if i else x for x, i in zip(b, init)]
        nw, nu = p.next_norm_outputs()[is_shard]
        scales = p.shard_scales if is_shard else p.full_scales
        mod.restore_update_sgd_(w, gr, b, scales, 1.0, 0.5, sources=None, init_momentum=init, next_w_sq=nw,
                                next_u_sq=nu, **kwargs, **kw)
        runs.append((w, gr, b, nw, nu))
    (fw, fg, fb, fnw, fnu), (sw, sg, sb, snw, snu) = runs
    assert_values(p.join(sw), fw, p.dtype, p.dist, p.full_scales)
    assert_values(p.join(sg) + p.join(sb), fg + fb, p.dtype, "exact", p.full_scales)
    assert_norms(p, snw, snu, fnw, fnu)


def check_adam(mod, p: Problem, amsgrad=True):
    """restore_update_adam_ (AdamW, amsgrad) and the next step's norms."""
    full_kw, shard_kw, displaced, grads = _update_inputs(p)
    m0 = [torch.randn_like(t) for t in p.full]
    v0 = [torch.rand_like(t) for t in p.full]
    x0 = [t + 0.5 for t in v0]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled_weight_decay=True,
              amsgrad=amsgrad, maximize=False, next_step=STEP + 1)
    runs = []
    for is_shard, kwargs in ((False, full_kw), (True, shard_kw)):
        pick = p.shards if is_shard else (lambda ts: [t.clone() for t in ts])
        state = [pick(displaced), pick(grads), pick(m0), pick(v0), pick(x0)]
        nw, nu = p.next_norm_outputs()[is_shard]
        scales = p.shard_scales if is_shard else p.full_scales
        steps = [3.0] * len(state[0])
        mod.restore_update_adam_(*state[:4], state[4] if amsgrad else [], scales, 1.0, 0.5, sources=None,
                                 steps=steps, next_w_sq=nw, next_u_sq=nu, **kwargs, **kw)
        runs.append((state, nw, nu))
    (fs, fnw, fnu), (ss, snw, snu) = runs
    assert_values(p.join(ss[0]), fs[0], p.dtype, p.dist, p.full_scales)
    for a, b in zip(ss[1:], fs[1:]):
        assert_values(p.join(a), b, p.dtype, "exact", p.full_scales)
    assert_norms(p, snw, snu, fnw, fnu)


CHECKS = {"norms": check_norms, "perturb_": check_perturb, "restore_update_sgd_": check_sgd,
          "restore_update_adam_": check_adam}
