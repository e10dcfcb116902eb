"""The fused S-SGD ops: schemas (declared once, here), fake implementations, backend loading.

Implementations are registered per dispatch key: CPU from the C++ extension ``ssgd_fused._C``
(csrc/), CUDA from the Triton kernels (``ssgd_fused.kernels``). The semantics of every op are
those of the function of the same name in :mod:`ssgd_fused.reference`.
"""

from __future__ import annotations

import os

import torch

LIB = "ssgd_fused"

_NOISE_ARGS = "int seed, int step, int[] tensor_ids, int sample, str distribution, bool filter"
# Sharded tensors (FSDP2 Shard(0)): tensor i's local element e takes the noise of the full tensor's
# element element_offsets[i] + e; None means all zeros. The last argument of every noise op.
_OFFSETS = "int[]? element_offsets=None"

SCHEMAS = {
    "noise": ("(int numel, int seed, int step, int tensor_id, int sample, str distribution, "
              "int element_offset=0) -> Tensor"),
    "norms": f"(Tensor[] params, {_NOISE_ARGS}, {_OFFSETS}) -> (Tensor[], Tensor[])",
    "perturb_": (
        f"(Tensor(a!)[] params, Tensor[] scales, float coef, {_NOISE_ARGS}, Tensor[]? sources, {_OFFSETS}) -> ()"
    ),
    # perturb_ that also writes ||w||^2 of what it displaces (sources or params, before the move)
    # into w_sq, per tensor or slice as norms gives it: the cycle checks its cached norms in the move
    "perturb_norms_": (
        f"(Tensor(a!)[] params, Tensor(b!)[] w_sq, Tensor[] scales, float coef, {_NOISE_ARGS}, Tensor[]? sources, "
        f"{_OFFSETS}) -> ()"
    ),
    "restore_": (
        "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] scales, float coef, float grad_scale, "
        f"{_NOISE_ARGS}, Tensor[]? sources, {_OFFSETS}) -> ()"
    ),
    "restore_update_sgd_": (
        "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor[] scales, "
        f"float coef, float grad_scale, {_NOISE_ARGS}, Tensor[]? sources, float lr, float momentum, "
        "float dampening, float weight_decay, bool nesterov, bool maximize, bool[] init_momentum, "
        f"Tensor(d!)[] next_w_sq, Tensor(e!)[] next_u_sq, int next_step, {_OFFSETS}) -> ()"
    ),
    "restore_update_adam_": (
        "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
        "Tensor(e!)[] max_exp_avg_sqs, Tensor[] scales, float coef, float grad_scale, "
        f"{_NOISE_ARGS}, Tensor[]? sources, float[] steps, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize, "
        f"Tensor(f!)[] next_w_sq, Tensor(g!)[] next_u_sq, int next_step, {_OFFSETS}) -> ()"
    ),
}

_lib = torch.library.Library(LIB, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


# ---- fake (meta) implementations: shapes only, for torch.compile and opcheck ------------------
@torch.library.register_fake(f"{LIB}::noise")
def _noise_fake(numel, seed, step, tensor_id, sample, distribution, element_offset=0):
    return torch.empty(numel, dtype=torch.float32)


@torch.library.register_fake(f"{LIB}::norms")
def _norms_fake(params, seed, step, tensor_ids, sample, distribution, filter, element_offsets=None):
    from .reference import num_slices

    shapes = [num_slices(p, filter) for p in params]
    mk = lambda: [p.new_empty(n, dtype=torch.float64) for p, n in zip(params, shapes)]  # noqa: E731
    return mk(), mk()


def _fake_noop(*args, **kwargs):
    return None


for _name in ("perturb_", "perturb_norms_", "restore_", "restore_update_sgd_", "restore_update_adam_"):
    torch.library.register_fake(f"{LIB}::{_name}", _fake_noop)


# ---- the C++ extension --------------------------------------------------------------------
_C = None
_C_ERROR: str | None = None


def _load_cpp():
    global _C, _C_ERROR
    if _C is not None or _C_ERROR is not None:
        return _C
    if os.environ.get("SSGD_FUSED_DISABLE_CPP", "") not in ("", "0"):
        _C_ERROR = "disabled by SSGD_FUSED_DISABLE_CPP"
        return None
    try:
        from . import _C as mod  # registers the CPU kernels with the dispatcher
    except ImportError as e:  # not built
        _C_ERROR = f"the C++ extension ssgd_fused._C is not built ({e})"
        return None
    _C = mod
    return _C


def cpp_available() -> bool:
    """True when the CPU kernels of csrc/ are built and registered."""
    return _load_cpp() is not None


def cpp_unavailable_reason() -> str | None:
    _load_cpp()
    return _C_ERROR


def triton_available() -> bool:
    """True when CUDA is present and triton imports (the kernels themselves load on first use)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---- CUDA: the Triton kernels, imported on the first CUDA call ---------------------------------
# Each launcher takes the op schema's arguments in the schema's order (tests/test_op_contract.py).
KERNEL_MODULES = {"norms": "norms", "perturb_": "perturb", "perturb_norms_": "perturb", "restore_": "perturb",
                  "restore_update_sgd_": "sgd", "restore_update_adam_": "adam"}


def triton_launcher(name):
    """The Triton launcher of op `name` (imports triton and the kernels)."""
    import importlib

    return getattr(importlib.import_module(f"ssgd_fused.kernels.{KERNEL_MODULES[name]}"), name)


def _cuda_impl(name):
    def impl(*args):
        return triton_launcher(name)(*args)

    return impl


for _name in KERNEL_MODULES:
    torch.library.register_kernel(f"{LIB}::{_name}", "cuda", _cuda_impl(_name))


def seed_to_i64(seed: int) -> int:
    """The unsigned 64-bit seed as the signed int64 an op schema carries (same bits)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


# ---- thin Python wrappers with the reference module's signatures ---------------------------
def _op(name):
    return getattr(torch.ops.ssgd_fused, name)


def _offs(element_offsets):
    return None if element_offsets is None else [int(o) for o in element_offsets]


def noise(numel, seed, step, tensor_id, sample, distribution, element_offset=0):
    _load_cpp()
    return _op("noise")(numel, seed_to_i64(seed), step, tensor_id, sample, distribution, element_offset)


def norms(params, seed, step, tensor_ids, sample, distribution, filter, element_offsets=None):
    return _op("norms")(params, seed_to_i64(seed), step, tensor_ids, sample, distribution, filter,
                        _offs(element_offsets))


def _bump(*lists):
    """In-place writes by these ops bump the tensors' version counters, as torch's in-place ops do
    (autograd's saved-tensor checks and the optimizer's norm cache rely on them)."""
    for ts in lists:
        if ts:
            torch.autograd.graph.increment_version(ts)


def perturb_(params, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None,
             element_offsets=None):
    _op("perturb_")(params, scales, coef, seed_to_i64(seed), step, tensor_ids, sample, distribution, filter,
                    sources, _offs(element_offsets))
    _bump(params)


def perturb_norms_(params, w_sq, scales, coef, seed, step, tensor_ids, sample, distribution, filter, sources=None,
                   element_offsets=None):
    _op("perturb_norms_")(params, w_sq, scales, coef, seed_to_i64(seed), step, tensor_ids, sample, distribution,
                          filter, sources, _offs(element_offsets))
    _bump(params)


def restore_(params, grads, scales, coef, grad_scale, seed, step, tensor_ids, sample, distribution, filter,
             sources=None, element_offsets=None):
    _op("restore_")(params, grads, scales, coef, grad_scale, seed_to_i64(seed), step, tensor_ids, sample,
                    distribution, filter, sources, _offs(element_offsets))
    _bump(params, grads)


def restore_update_sgd_(params, grads, momentum_buffers, scales, coef, grad_scale, seed, step, tensor_ids,
                        sample, distribution, filter, sources, lr, momentum, dampening, weight_decay,
                        nesterov, maximize, init_momentum, next_w_sq=(), next_u_sq=(), next_step=0,
                        element_offsets=None):
    _op("restore_update_sgd_")(params, grads, momentum_buffers, scales, coef, grad_scale, seed_to_i64(seed), step,
                               tensor_ids, sample, distribution, filter, sources, lr, momentum, dampening,
                               weight_decay, nesterov, maximize, init_momentum, list(next_w_sq), list(next_u_sq),
                               next_step, _offs(element_offsets))
    _bump(params, grads, momentum_buffers)


def restore_update_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scales, coef, grad_scale,
                         seed, step, tensor_ids, sample, distribution, filter, sources, steps, lr, beta1,
                         beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, next_w_sq=(),
                         next_u_sq=(), next_step=0, element_offsets=None):
    _op("restore_update_adam_")(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scales, coef, grad_scale,
                                seed_to_i64(seed), step, tensor_ids, sample, distribution, filter, sources,
                                [float(s) for s in steps], lr, beta1, beta2, eps, weight_decay,
                                decoupled_weight_decay, amsgrad, maximize, list(next_w_sq), list(next_u_sq),
                                next_step, _offs(element_offsets))
    _bump(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
