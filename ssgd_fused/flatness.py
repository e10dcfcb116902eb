"""Flatness diagnostics: Hessian spectrum, 1-D loss curves and the sharpness S-SGD probes.

Conventions follow PyHessian and hessian-eigenthings: every function takes ``model``,
``criterion`` (``criterion(model(inputs), targets)`` -> scalar loss, a mean over the batch as
torch's losses give with ``reduction="mean"``) and ``batches``, an iterable of
``(inputs, targets)`` pairs (a list, a DataLoader, ...; a single ``(inputs, targets)`` tuple of
tensors counts as one batch). The loss over the batches is the sample-weighted mean of the
per-batch losses (weights = ``len(targets)``), so the result does not depend on how the data are
cut into batches.

    from ssgd_fused import flatness
    lam = flatness.hessian_top_eigenvalue(model, F.cross_entropy, [(x, y)], seed=0)
    tr = flatness.hessian_trace(model, F.cross_entropy, [(x, y)], samples=64, seed=0)
    s = flatness.symmetric_sharpness(model, F.cross_entropy, [(x, y)], alpha=0.5, draws=16)
    curve = flatness.interpolate(model, F.cross_entropy, [(x, y)], sgd_state, ssgd_state)

Behaviour shared by every function:

* The model runs in the mode it is in: call ``model.eval()`` first for the deterministic loss
  (BatchNorm with running statistics, no dropout); in train mode BatchNorm uses batch
  statistics and dropout draws fresh masks on every evaluation, so the Hessian is that of the
  training-mode loss (and stochastic with dropout).
* Nothing of the model changes: it is evaluated with ``torch.func.functional_call`` on detached
  copies of its parameters, and on copies of its buffers (a train-mode BatchNorm does not update
  its running statistics), so weights, buffers and ``.grad`` are bitwise as they were.
* Bad input raises: empty ``batches``, a batch that is not an ``(inputs, targets)`` pair, a
  criterion that returns a non-scalar or a non-tensor, a model without trainable parameters.
* ``batches`` is read once into a list (the functions iterate it many times): give them the
  data to measure, e.g. a fixed subset of the training set.

Hessian-vector products are reverse-over-reverse on ``torch.func`` (the ``vjp`` of ``grad``, i.e.
double backward; ``jvp`` of ``grad`` fails on torch 2.13 for ``mse_loss``): one product costs
about two forward and two backward passes and materialises nothing of the Hessian's size.

Why not a library: PyHessian 0.1 (2021, unmaintained) runs on torch 2.13 but calls
``backward(create_graph=True)`` (torch warns about a reference cycle on every product),
leaves second-order graphs in ``p.grad`` of the model, and takes one batch or a loader with a
``cuda=`` flag; hessian-eigenthings is published only as a pre-release (1.0.0a5) whose power
iteration agrees with this module (tests/test_flatness.py cross-checks when it is installed), but
it averages batches with equal weights, its Lanczos defaults to 2 Krylov steps for ``k=1``, and
its API is still moving. The algorithms here are a few dozen lines on torch's own transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vjp

from . import reference as _reference

__all__ = [
    "hessian_vector_product",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "loss_and_error",
    "interpolate",
    "random_direction",
    "direction_scan",
    "Curve",
    "Sharpness",
    "symmetric_sharpness",
    "epsilon_sharpness",
]


# ---- input handling ------------------------------------------------------------------------

def _batches(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if batches is None:
        raise ValueError("batches is None: give an iterable of (inputs, targets) pairs")
    if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(t, torch.Tensor) for t in batches):
        batches = [batches]  # one (inputs, targets) batch
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches must be an iterable of (inputs, targets) pairs, got a Tensor")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise TypeError(f"batch {i} must be an (inputs, targets) pair, got {type(b).__name__}"
                            + (f" of length {len(b)}" if isinstance(b, (tuple, list)) else ""))
        x, y = b
        n = _count(y if isinstance(y, torch.Tensor) else x)
        if n == 0:
            raise ValueError(f"batch {i} holds no samples")
        out.append((x, y))
    if not out:
        raise ValueError("batches is empty: the diagnostics need at least one (inputs, targets) batch")
    return out


def _count(t) -> int:
    if isinstance(t, torch.Tensor):
        return int(t.shape[0]) if t.dim() > 0 else 1
    return len(t)


def _named_params(model: torch.nn.Module) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameters with requires_grad=True: nothing to measure")
    for n, p in named:
        if not p.is_floating_point():
            raise TypeError(f"parameter {n!r} is {p.dtype}; the diagnostics need floating-point parameters")
    return [n for n, _ in named], tuple(p.detach() for _, p in named)


def _scalar(loss, where="criterion") -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{where} must return a scalar Tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"{where} must return a scalar loss (e.g. reduction='mean'), got a tensor of shape "
                         f"{tuple(loss.shape)}")
    return loss


class _Evaluator:
    """Runs ``criterion(model(x), y)`` on given parameter values, never touching the model."""

    def __init__(self, model, criterion, batches):
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        self.model = model
        self.criterion = criterion
        self.batches = _batches(batches)
        self.names, self.params = _named_params(model)
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        sizes = [_count(y if isinstance(y, torch.Tensor) else x) for x, y in self.batches]
        total = float(sum(sizes))
        self.weights = [s / total for s in sizes]

    def _call(self, params, x):
        # buffers are cloned inside the call: a train-mode BatchNorm updates the copies only, and
        # torch.func accepts the in-place update of a tensor created inside the transform
        buffers = {n: b.clone() for n, b in self.buffers.items()}
        return functional_call(self.model, ({**dict(zip(self.names, params)), **buffers}), (x,))

    def batch_loss(self, params, x, y):
        return _scalar(self.criterion(self._call(params, x), y))

    @torch.no_grad()
    def loss_error(self, params) -> tuple[float, float]:
        """(mean loss, classification error or nan) over all batches at the given parameters."""
        loss, wrong, counted = 0.0, 0.0, 0
        for (x, y), w in zip(self.batches, self.weights):
            out = self._call(params, x)
            loss += w * float(_scalar(self.criterion(out, y)))
            if isinstance(y, torch.Tensor) and not y.is_floating_point() and out.dim() == y.dim() + 1:
                wrong += float((out.argmax(1) != y).sum())
                counted += y.numel()
        return loss, (wrong / counted if counted else math.nan)

    def hvp(self, vec: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        acc = None
        for (x, y), w in zip(self.batches, self.weights):
            # reverse-over-reverse: the vjp of the gradient map is H v (H is symmetric). Forward-
            # over-reverse (jvp of grad) is cheaper but fails on torch 2.13 for mse_loss with
            # targets ("ZeroTensors are immutable"); double backward supports every op autograd does.
            _, hv_fn = vjp(grad(lambda p, x=x, y=y: self.batch_loss(p, x, y)), self.params)
            (hv,) = hv_fn(vec)
            acc = [h * w for h in hv] if acc is None else [a.add_(h, alpha=w) for a, h in zip(acc, hv)]
        return tuple(acc)

    def gradient(self, params) -> tuple[torch.Tensor, ...]:
        acc = None
        for (x, y), w in zip(self.batches, self.weights):
            g = grad(lambda p, x=x, y=y: self.batch_loss(p, x, y))(params)
            acc = [t * w for t in g] if acc is None else [a.add_(t, alpha=w) for a, t in zip(acc, g)]
        return tuple(acc)


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _randn_like(params, gen):
    return tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params)


def _check_int(name, value, lo=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


# ---- Hessian ---------------------------------------------------------------------------------

def hessian_vector_product(model, criterion, batches, vector) -> list[torch.Tensor]:
    """H v for the loss over ``batches``; ``vector`` is a list of tensors shaped like the model's
    trainable parameters (``model.parameters()`` order). Returns a list in the same layout."""
    ev = _Evaluator(model, criterion, batches)
    vec = tuple(vector)
    if len(vec) != len(ev.params) or any(v.shape != p.shape for v, p in zip(vec, ev.params)):
        raise ValueError("vector must be a list of tensors shaped like the model's trainable parameters, "
                         f"{[tuple(p.shape) for p in ev.params]}")
    vec = tuple(v.detach().to(dtype=p.dtype, device=p.device) for v, p in zip(vec, ev.params))
    return list(ev.hvp(vec))


def hessian_top_eigenvalue(model: torch.nn.Module, criterion: Callable, batches: Iterable, *, iters: int = 50,
                           tol: float = 1e-4, seed: int = 0, method: str = "lanczos") -> float:
    """The largest eigenvalue of the Hessian of the loss over ``batches`` w.r.t. the model's
    trainable parameters.

    method "lanczos" (default): Lanczos with full reorthogonalisation, the largest Ritz value,
    stopping when it changes by less than ``tol`` (relative) between iterations or after ``iters``
    Hessian-vector products; converges to the largest *algebraic* eigenvalue, typically in 10-30
    products. method "power": power iteration as in PyHessian (stops on the same relative
    change); converges to the eigenvalue of largest *magnitude*, more slowly when the top two are
    close. The start vector is gaussian from ``torch.Generator().manual_seed(seed)``.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    _check_int("iters", iters)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    ev = _Evaluator(model, criterion, batches)
    gen = torch.Generator().manual_seed(int(seed))
    v = _randn_like(ev.params, gen)
    nrm = math.sqrt(_dot(v, v))
    v = tuple(t / nrm for t in v)
    if method == "power":
        lam = None
        for _ in range(iters):
            hv = ev.hvp(v)
            new = _dot(v, hv)
            if not math.isfinite(new):
                raise FloatingPointError(_NONFINITE)
            nrm = math.sqrt(_dot(hv, hv))
            if nrm == 0.0:
                return 0.0
            v = tuple(t / nrm for t in hv)
            if lam is not None and abs(new - lam) <= tol * max(abs(new), 1e-30):
                return new
            lam = new
        return lam
    # Lanczos, full reorthogonalisation (the Krylov basis is small: iters vectors)
    n_total = sum(p.numel() for p in ev.params)
    basis, alphas, betas = [v], [], []
    prev = None
    for j in range(min(iters, n_total)):
        w = ev.hvp(basis[j])
        a = _dot(basis[j], w)
        if not math.isfinite(a):
            raise FloatingPointError(_NONFINITE)
        alphas.append(a)
        w = [t.clone() for t in w]
        for q in basis:  # Gram-Schmidt against the whole basis (twice is enough)
            c = _dot(q, w)
            w = [t - c * s for t, s in zip(w, q)]
        for q in basis:
            c = _dot(q, w)
            w = [t - c * s for t, s in zip(w, q)]
        b = math.sqrt(max(_dot(w, w), 0.0))
        top = float(torch.linalg.eigvalsh(_tridiag(alphas, betas))[-1])
        if b <= 1e-10 * max(abs(top), 1.0):  # invariant subspace found: the Ritz values are exact
            return top
        if prev is not None and abs(top - prev) <= tol * max(abs(top), 1e-30):
            return top
        prev = top
        betas.append(b)
        basis.append(tuple(t / b for t in w))
    return top


_NONFINITE = "the Hessian-vector product is not finite (inf/NaN in the loss, the weights or the data)"


def _tridiag(alphas, betas) -> torch.Tensor:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def hessian_trace(model: torch.nn.Module, criterion: Callable, batches: Iterable, *, samples: int = 64,
                  seed: int = 0, return_stderr: bool = False):
    """Hutchinson's estimate of the Hessian trace: the mean of ``v^T H v`` over ``samples``
    Rademacher probes ``v`` (from ``torch.Generator().manual_seed(seed)``). Unbiased; exact for a
    diagonal Hessian with any number of probes. With ``return_stderr`` returns
    ``(estimate, standard error of the mean)``."""
    _check_int("samples", samples)
    ev = _Evaluator(model, criterion, batches)
    gen = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(samples):
        v = tuple((torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(dtype=p.dtype, device=p.device)
                  for p in ev.params)
        vals.append(_dot(v, ev.hvp(v)))
        if not math.isfinite(vals[-1]):
            raise FloatingPointError(_NONFINITE)
    est = sum(vals) / len(vals)
    if not return_stderr:
        return est
    var = sum((x - est) ** 2 for x in vals) / max(len(vals) - 1, 1)
    return est, math.sqrt(var / len(vals))


# ---- 1-D curves ----------------------------------------------------------------------------

@dataclass
class Curve:
    """Loss and classification error (nan when the targets are not class labels) at
    ``origin + t * direction`` for each t."""

    t: list[float]
    loss: list[float]
    error: list[float]

    def as_dict(self) -> dict:
        return {"t": self.t, "loss": self.loss, "error": self.error}


def loss_and_error(model: torch.nn.Module, criterion: Callable, batches: Iterable) -> tuple[float, float]:
    """(mean loss, classification error) of the model as it is over ``batches``; the error is nan
    unless the outputs are logits ``(N, C, ...)`` and the targets integer labels ``(N, ...)``."""
    ev = _Evaluator(model, criterion, batches)
    return ev.loss_error(ev.params)


def _as_tensors(ev: _Evaluator, state, what: str) -> tuple[torch.Tensor, ...]:
    if isinstance(state, torch.nn.Module):
        state = dict(state.named_parameters())
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a state_dict-like mapping (parameter name -> tensor) or a Module, "
                        f"got {type(state).__name__}")
    missing = [n for n in ev.names if n not in state]
    if missing:
        raise KeyError(f"{what} lacks parameters {missing[:5]}")
    out = []
    for n, p in zip(ev.names, ev.params):
        t = state[n]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            raise ValueError(f"{what}[{n!r}] must be a tensor of shape {tuple(p.shape)}")
        out.append(t.detach().to(dtype=p.dtype, device=p.device))
    return tuple(out)


def _ts(ts) -> list[float]:
    ts = [float(t) for t in ts]
    if not ts:
        raise ValueError("ts is empty: give the points t of the curve")
    return ts


def direction_scan(model: torch.nn.Module, criterion: Callable, batches: Iterable, direction,
                   *, ts=tuple(i / 10 - 1 for i in range(21)), origin=None) -> Curve:
    """Loss and error at ``origin + t * direction`` (origin: the model's parameters unless given
    as a mapping name -> tensor). ``direction``: a mapping name -> tensor, e.g. from
    :func:`random_direction`; parameters it lacks do not move."""
    ev = _Evaluator(model, criterion, batches)
    o = ev.params if origin is None else _as_tensors(ev, origin, "origin")
    if not isinstance(direction, Mapping):
        raise TypeError(f"direction must be a mapping parameter name -> tensor, got {type(direction).__name__}")
    d = tuple(direction[n].detach().to(dtype=p.dtype, device=p.device) if n in direction else torch.zeros_like(p)
              for n, p in zip(ev.names, ev.params))
    for n, a, b in zip(ev.names, d, o):
        if a.shape != b.shape:
            raise ValueError(f"direction[{n!r}] has shape {tuple(a.shape)}, the parameter {tuple(b.shape)}")
    curve = Curve([], [], [])
    for t in _ts(ts):
        loss, err = ev.loss_error(tuple(a + t * b for a, b in zip(o, d)))
        curve.t.append(t)
        curve.loss.append(loss)
        curve.error.append(err)
    return curve


def interpolate(model: torch.nn.Module, criterion: Callable, batches: Iterable, start, end,
                *, ts=tuple(i / 20 - 0.5 for i in range(41))) -> Curve:
    """1-D linear interpolation ``(1 - t) * start + t * end`` (the paper's Figure 2, Goodfellow et
    al. 2015): loss and error over ``batches`` for each t (default -0.5 .. 1.5 in steps of 0.05).
    ``start`` / ``end``: state dicts (or Modules) with the model's parameter names; buffers (e.g.
    BatchNorm statistics) are the model's own."""
    ev = _Evaluator(model, criterion, batches)
    a, b = _as_tensors(ev, start, "start"), _as_tensors(ev, end, "end")
    return direction_scan(model, criterion, ev.batches, {n: y - x for n, x, y in zip(ev.names, a, b)},
                          ts=ts, origin=dict(zip(ev.names, a)))


def random_direction(model: torch.nn.Module, *, seed: int = 0, filter_normalize: bool = True,
                     ignore_1d: bool = True) -> dict[str, torch.Tensor]:
    """A gaussian direction shaped like the model's trainable parameters (Li et al. 2018).

    filter_normalize: each dim-0 slice ("filter": an output channel or row) of the direction is
    rescaled to the norm of the same slice of the weights, so that curves of networks with
    different weight scales compare. ignore_1d: 1-D parameters (biases, normalisation) get zero,
    as in Li et al.'s default; otherwise they are rescaled to the parameter's norm."""
    names, params = _named_params(model)
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for n, p in zip(names, params):
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
        if p.dim() <= 1:
            if ignore_1d:
                d.zero_()
            elif filter_normalize:
                d.mul_(p.norm() / d.norm().clamp_min(1e-30))
        elif filter_normalize:
            rows_d, rows_p = d.reshape(p.shape[0], -1), p.reshape(p.shape[0], -1)
            rows_d.mul_((rows_p.norm(dim=1) / rows_d.norm(dim=1).clamp_min(1e-30)).unsqueeze(1))
        out[n] = d
    return out


# ---- sharpness -----------------------------------------------------------------------------

@dataclass
class Sharpness:
    """``value``: the mean over draws of ``(L(w+n) + L(w-n))/2 - L(w)``; ``std``: its standard
    deviation over draws; ``loss``: ``L(w)``; ``draws``: the per-draw values."""

    value: float
    std: float
    loss: float
    draws: list[float] = field(default_factory=list)

    def __float__(self) -> float:
        return self.value


def symmetric_sharpness(model: torch.nn.Module, criterion: Callable, batches: Iterable, *, alpha: float = 0.5,
                        distribution: str = "gaussian", draws: int = 16, seed: int = 0, scope: str = "tensor",
                        perturb: str = "matrices") -> Sharpness:
    """The sharpness S-SGD itself probes: ``(L(w+n) + L(w-n))/2 - L(w)`` with the optimizer's noise.

    ``n_i = alpha ||w_i|| u_i / ||u_i||`` per tensor (or per dim-0 slice with ``scope="filter"``),
    ``u`` the spec's stream (:mod:`ssgd_fused.noise`) for ``seed`` and steps ``0 .. draws-1``,
    tensor ids = the parameter's index in ``model.parameters()`` -- the noise an
    ``SSGD(model.parameters(), ..., noise=alpha, seed=seed)`` draws in its first ``draws`` steps.
    perturb "matrices" (the optimizer's default: parameters with ndim >= 2) or "all". For a
    quadratic loss the value is ``n^T H n / 2`` exactly (the first-order terms cancel)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r}")
    _check_int("draws", draws)
    if scope not in ("tensor", "filter"):
        raise ValueError(f"scope must be 'tensor' or 'filter', got {scope!r}")
    if perturb not in ("matrices", "all"):
        raise ValueError(f"perturb must be 'matrices' or 'all', got {perturb!r}")
    ev = _Evaluator(model, criterion, batches)
    # the optimizer's tensor ids count every parameter of model.parameters(), frozen ones too
    tid_of = {id(p): i for i, p in enumerate(model.parameters())}
    named = dict(model.named_parameters())
    tids = [tid_of[id(named[n])] for n in ev.names]
    chosen = [i for i, p in enumerate(ev.params) if perturb == "all" or p.dim() >= 2]
    if not chosen:
        raise ValueError("no parameter to perturb (perturb='matrices' needs parameters with ndim >= 2)")
    base, _ = ev.loss_error(ev.params)
    vals = []
    for step in range(draws):
        ps = [ev.params[i] for i in chosen]
        ids = [tids[i] for i in chosen]
        w_sq, u_sq = _reference.norms(ps, seed, step, ids, 0, distribution, scope == "filter")
        scales = _reference.scales_from_norms(w_sq, u_sq, [float(alpha)] * len(ps))
        noise = {}
        for i, p, tid, s in zip(chosen, ps, ids, scales):
            u = _reference.noise_like(p, seed, step, tid, 0, distribution).to(p.dtype)
            rows = _reference.num_slices(p, scope == "filter")
            noise[i] = (u.reshape(rows, -1) * s.to(device=p.device, dtype=p.dtype).view(-1, 1)).view(p.shape)
        plus = tuple(p + noise[i] if i in noise else p for i, p in enumerate(ev.params))
        minus = tuple(p - noise[i] if i in noise else p for i, p in enumerate(ev.params))
        vals.append((ev.loss_error(plus)[0] + ev.loss_error(minus)[0]) / 2 - base)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
    return Sharpness(mean, std, base, vals)


def epsilon_sharpness(model: torch.nn.Module, criterion: Callable, batches: Iterable, *, epsilon: float = 1e-3,
                      steps: int = 10) -> float:
    """Keskar et al. (2017)'s epsilon-sharpness in percent,
    ``100 * (max_{d in C} L(w + d) - L(w)) / (1 + L(w))`` over the box
    ``C = {|d_i| <= epsilon (|w_i| + 1)}`` (all trainable parameters, full space).

    The maximum is approximated from below by ``steps`` of projected sign-gradient ascent (each
    step ``2.5 * box / steps``, clipped to the box), keeping the best point met; for a loss
    linear in ``w`` one step is exact. Keskar et al. use L-BFGS-B; this is the cheap variant
    (``steps`` gradient evaluations)."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}")
    _check_int("steps", steps)
    ev = _Evaluator(model, criterion, batches)
    box = tuple(epsilon * (p.abs() + 1) for p in ev.params)
    base, _ = ev.loss_error(ev.params)
    d = tuple(torch.zeros_like(p) for p in ev.params)
    best = base
    for _ in range(steps):
        g = ev.gradient(tuple(p + t for p, t in zip(ev.params, d)))
        d = tuple(torch.maximum(torch.minimum(t + (2.5 / steps) * b * gi.sign(), b), -b)
                  for t, b, gi in zip(d, box, g))
        best = max(best, ev.loss_error(tuple(p + t for p, t in zip(ev.params, d)))[0])
    return 100.0 * (best - base) / (1.0 + base)
