"""SSGD's options, validated in one place: every check runs before anything is built or moved.

`Options.validate(...)` takes the keyword arguments of :class:`ssgd_fused.SSGD` (less the base
optimizer's), checks each and returns a frozen record; `check_alpha`, `check_param` and
`param_groups` are the checks shared with ``add_param_group``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from . import distributed as _distributed
from . import noise as _noise

MODES = ("symmetric", "one_sided", "smoothout")
NONFINITE = ("update", "skip", "raise")
BN_STATS = ("both", "first", "none")
SCOPES = ("tensor", "filter")
BACKENDS = ("auto", "reference", "cpp", "triton", "fused")
RESTORES = ("auto", "regenerate", "exact")


def check_alpha(value, where: str) -> float:
    """A noise level: a finite float >= 0."""
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


def _check_int(name, value, lo, hi, what=""):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}]{what}, got {value!r}")
    return value


def check_param(p) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"params must contain Tensors, got {type(p).__name__}")
    if p.is_complex() or not p.is_floating_point():
        raise TypeError(f"SSGD supports real floating-point parameters only, got a {p.dtype} parameter "
                        f"of shape {tuple(p.shape)}")
    if p.is_sparse:
        raise TypeError("SSGD does not support sparse parameters")


def param_group(group: dict) -> dict:
    """A checked copy of one param-group dict: params as a list, "noise" checked (None if absent)."""
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    for p in params:
        check_param(p)
    noise = group.get("noise")
    return {**group, "params": params, "noise": None if noise is None else check_alpha(noise, "param group 'noise'")}


def param_groups(params) -> list[dict]:
    """SSGD's `params` argument (tensors or group dicts) as checked group dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of Tensors or dicts, got a Tensor")
    groups = list(params)
    if not groups:
        raise ValueError("params is an empty list: SSGD got no parameters")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [param_group(g) for g in groups]


@dataclasses.dataclass(frozen=True)
class Options:
    """SSGD's own options (see the SSGD docstring for each); built by `validate`."""

    noise: float | Callable[[int], float]
    distribution: str
    scope: str
    mode: str
    seed: int
    backend: str
    restore: str
    start_step: int
    max_grad_norm: float | None
    nonfinite: str
    pairs: int
    bn_stats: str
    ranks: str = "same"

    @classmethod
    def validate(cls, *, noise=0.5, distribution=None, scope="tensor", mode="symmetric", seed=None, backend="auto",
                 restore="auto", start_step=0, max_grad_norm=None, nonfinite="update", pairs=1, bn_stats="both",
                 model=None, ranks="same") -> Options:
        if callable(noise):
            check_alpha(noise(0), "noise(0) (the alpha schedule at step 0)")
        else:
            noise = check_alpha(noise, "noise")
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
        _check_int("pairs", pairs, 1, 1 << 16, " (antithetic pairs per step)")
        if pairs > 1 and mode != "symmetric":
            raise ValueError(f"pairs={pairs} needs mode='symmetric'")
        _choose("bn_stats", bn_stats, BN_STATS)
        if bn_stats != "both" and not isinstance(model, torch.nn.Module):
            raise ValueError(f"bn_stats={bn_stats!r} needs model=<the nn.Module> (to find its BatchNorm layers)")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be the torch.nn.Module being trained, got {type(model).__name__}")
        _choose("backend", backend, BACKENDS)
        _choose("restore", restore, RESTORES)
        _distributed.check_ranks(ranks)
        if ranks == "split" and (pairs != 1 or mode != "symmetric"):
            raise ValueError("ranks='split' runs one pass per rank (+n on even ranks, -n on odd ones): it needs "
                             f"mode='symmetric' and pairs=1, got mode={mode!r}, pairs={pairs}")
        if ranks != "same" and restore == "regenerate":
            raise ValueError(f"ranks={ranks!r} gives each rank its own noise: restoring by regeneration would "
                             "round differently on each rank and the replicas would drift apart; use "
                             "restore='auto' or 'exact' (a clean copy of the weights)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) * 4 + int(torch.randint(0, 4, ()))
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        return cls(noise, distribution, scope, mode, seed, backend, restore, start_step, max_grad_norm, nonfinite,
                   pairs, bn_stats, ranks)

    def alpha_at(self, step: int) -> float:
        """The default alpha at noise step `step`: `noise` or `noise(step)`; 0 before start_step."""
        if step < self.start_step:
            return 0.0
        if callable(self.noise):
            return check_alpha(self.noise(step), f"noise({step}) (the alpha schedule)")
        return self.noise

    def passes(self, step: int, rank: int = 0) -> tuple[tuple[int, float], ...]:
        """(the spec's sample, displacement in units of s*u) per pass of step `step` on `rank`:
        +n_j then -n_j for each antithetic pair j; with ranks="pairs" rank r's pairs are
        r * pairs + j; with ranks="split" rank r runs pair r // 2 alone, +n if r is even, -n if odd."""
        if self.mode != "symmetric" or step < self.start_step:
            return ((0, 1.0),)
        if self.ranks == "split":
            return ((rank // 2, 1.0 if rank % 2 == 0 else -1.0),)
        first = rank * self.pairs if self.ranks == "pairs" else 0
        return tuple((first + j, t) for j in range(self.pairs) for t in (1.0, -1.0))
