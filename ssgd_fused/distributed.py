"""Many devices: one noise stream across ranks, DDP's all-reduce once per step, FSDP2 shards, and
the rank-parallel variants.

The noise is a pure function of (seed, step, tensor id, element index in the UNSHARDED tensor), so
every rank regenerates its part with no communication. What needs the process group:

- the seed: rank 0's, broadcast once at construction (`seed=None`), or checked equal on all ranks;
- FSDP2 (parameters that are DTensors sharded on dim 0): the kernels work on each local shard,
  whose element e is element `offset + e` of the full tensor; tensor-scope norms are sums over the
  shards: local partial sums, all-gathered over the shard group in float64 and added in rank
  order, so that every rank computes the same scale bit for bit. Filter-scope norms (whole rows
  per shard) stay local;
- `ranks=`: "same" (every rank the same noise: the paper's algorithm on the global batch),
  "pairs" (rank r draws its own antithetic pairs, spec `sample = r * pairs + j`) or "split" (ranks
  2j and 2j+1 share pair j; the even rank runs only +n, the odd only -n: one pass per rank).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

RANKS = ("same", "pairs", "split")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised default process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def check_ranks(ranks: str) -> None:
    """Raises (before anything is built) where `ranks` cannot run in this process group."""
    if ranks not in RANKS:
        raise ValueError(f"ranks must be one of {RANKS}, got {ranks!r}")
    if ranks == "same":
        return
    if _dist() is None:
        raise RuntimeError(f"ranks={ranks!r} needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    rank, size = world()
    if ranks == "split" and size % 2:
        raise ValueError(f"ranks='split' pairs ranks 2j and 2j+1 and needs an even world size, got {size}")


def _object_collective(fn, obj):
    dist = _dist()
    out = [None] * dist.get_world_size() if fn == "all_gather" else [obj]
    if fn == "all_gather":
        dist.all_gather_object(out, obj)
    else:
        dist.broadcast_object_list(out, src=0)
    return out


def shared_seed(seed: int, given: bool) -> int:
    """The stream seed every rank uses: rank 0's when the caller gave none (each rank drew its own),
    else the caller's, checked equal on every rank."""
    if _dist() is None or world()[1] == 1:
        return seed
    if not given:
        return int(_object_collective("broadcast", seed)[0])
    seeds = _object_collective("all_gather", seed)
    if len(set(seeds)) > 1:
        by_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(seeds))
        raise ValueError(f"SSGD seed differs across ranks ({by_rank}); every rank must use the same noise "
                         "stream: pass the same seed everywhere, or seed=None to take rank 0's")
    return seed


def warn_if_ddp_without_model(params, model) -> None:
    if model is not None or _dist() is None or world()[1] == 1 or any(is_dtensor(p) for p in params):
        return
    warnings.warn("ssgd_fused: torch.distributed is initialised but SSGD got no model=: if the model is "
                  "wrapped in DistributedDataParallel, pass model=<the DDP module> so that the first pass runs "
                  "under no_sync() and each step all-reduces once instead of twice", RuntimeWarning, stacklevel=4)


def no_sync(model):
    """The context of the passes before the last: DDP's no_sync(); for an FSDP2 module (the root
    that fully_shard returned), no reduce-scatter (its unsharded gradients accumulate locally,
    the last pass reduce-scatters their sum); a context that does nothing for any other model."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if _is_fsdp_module(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def _is_fsdp_module(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch.distributed not built, or a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def _fsdp_param_groups(model):
    """FSDP2's parameter groups of model and its submodules (private state, read defensively)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
            yield from getattr(state, "_fsdp_param_groups", None) or ()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    """No reduce-scatter (nor HSDP all-reduce) inside; each group's previous flags restored after,
    or, where FSDP2's private state cannot be read, sync switched back on (its default)."""
    groups = list(_fsdp_param_groups(model))
    before = [(getattr(g, "reduce_grads", None), getattr(g, "all_reduce_grads", None)) for g in groups]
    readable = bool(groups) and all(None not in b for b in before)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if readable:
            for g, (reduce, all_reduce) in zip(groups, before):
                g.reduce_grads, g.all_reduce_grads = reduce, all_reduce
        else:
            model.set_requires_gradient_sync(True)


def discard_unreduced(model) -> None:
    """For a cycle abandoned after a pass run without reduce-scatter (an exception, a loop left
    early): drops the unsharded gradients an FSDP2 model holds from it, which its next synced
    backward would otherwise add into the next step's gradients. (No-op for any other model.)"""
    if not _is_fsdp_module(model):
        return
    for group in _fsdp_param_groups(model):
        for fp in getattr(group, "fsdp_params", ()):
            if getattr(fp, "unsharded_accumulated_grad", None) is not None:
                fp.unsharded_accumulated_grad = None
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None and unsharded.grad is not None:
                unsharded.grad = None


# ---- FSDP2 / DTensor shards -----------------------------------------------------------------------
_DTENSOR = None  # the DTensor class, or () where torch.distributed is not built; looked up once


def is_dtensor(t) -> bool:
    global _DTENSOR
    if _DTENSOR is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch.distributed not built
            DTensor = ()
        _DTENSOR = DTensor
    return isinstance(t, _DTENSOR)


def local(t):
    """The local shard of a DTensor (sharing its storage), or t itself."""
    return t._local_tensor if is_dtensor(t) else t


class Shard:
    """Where a DTensor parameter's local shard lies in the full tensor."""

    def __init__(self, p):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor import Shard as DShard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or not all(isinstance(pl, (DShard, Replicate)) for pl in placements) or \
                any(isinstance(pl, DShard) and pl.dim != 0 for pl in placements):
            raise ValueError(f"SSGD supports DTensor parameters sharded on dim 0 of a 1-D device mesh (FSDP2's "
                             f"fully_shard) or replicated; got placements {placements} on a {p.device_mesh.ndim}-D "
                             f"mesh for a parameter of shape {tuple(p.shape)}")
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
        self.sharded = any(isinstance(pl, DShard) for pl in placements)
        row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        self.element_offset = (offset[0] * row) if (self.sharded and p.dim() >= 1) else 0
        self.group = p.device_mesh.get_group(0) if self.sharded else None


def check_params(params) -> None:
    """A clear error for DTensor placements the kernels cannot take (raised at construction)."""
    for p in params:
        if is_dtensor(p):
            Shard(p)


def sum_over_shards(values, groups):
    """values[i]: this rank's partial sums (float64) for a tensor sharded over groups[i] (None: not
    sharded). Returns the sums over the shards, added in rank order (the same bits on every rank)."""
    dist = _dist()
    out = list(values)
    by_group: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            by_group.setdefault(g, []).append(i)
    for g, idx in by_group.items():
        flat = torch.cat([values[i].reshape(-1) for i in idx]).to(torch.float64)
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(g))]
        dist.all_gather(gathered, flat, group=g)
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        sizes = [values[i].numel() for i in idx]
        for i, t in zip(idx, total.split(sizes)):
            out[i] = t.view_as(values[i])
    return out


class ShardedOps:
    """An ops module (ssgd_fused.ops or ssgd_fused.reference) that takes DTensor arguments: every
    tensor becomes its local shard and the ops get each parameter's element offset in the full
    tensor. Without DTensors the calls pass through unchanged."""

    def __init__(self, ops):
        self.module = ops
        self._shards: dict = {}

    def shard(self, p) -> Shard:
        s = self._shards.get(p)
        if s is None:
            s = self._shards[p] = Shard(p)
        return s

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(params, *args, **kwargs):
            if not any(is_dtensor(p) for p in params):
                return fn(params, *args, **kwargs)
            offsets = [self.shard(p).element_offset if is_dtensor(p) else 0 for p in params]
            args = [_locals(a) for a in args]
            kwargs = {k: _locals(v) for k, v in kwargs.items()}
            return fn([local(p) for p in params], *args, element_offsets=offsets, **kwargs)

        return call


def _locals(v):
    if isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
        return [local(t) if isinstance(t, torch.Tensor) else t for t in v]
    return local(v) if isinstance(v, torch.Tensor) else v
