"""Workers for tests/test_distributed.py: each runs in its own process of a real gloo process group
(started by `launch`, environment as torchrun sets it) and saves what it measured for the test.

    python -m tests.dist_workers <worker> <out_dir>       (RANK, WORLD_SIZE, MASTER_* set)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ssgd_fused import SSGD

STEPS = 3
BATCH = 16  # per rank


def make_model():
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast them anyway)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def batch(step, rank, world):
    """This rank's part of the global batch of step `step` (the global batch is the ranks' in order)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH * world, 12, generator=g), torch.randint(0, 5, (BATCH * world,), generator=g)
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def counting_hook(counter):
    """A DDP comm hook that all-reduces as DDP does and counts the buckets it reduced."""

    def allreduce_counted(state, bucket):
        counter["calls"] += 1
        t = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

    return allreduce_counted


def _ddp(model_arg=True, api="closure", ranks="same", seed=None, max_grad_norm=None, accumulate=1):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    torch.manual_seed(100 + rank)  # ranks seeded differently (augmentation): seed=None must still agree
    ddp = nn.parallel.DistributedDataParallel(model)
    counter = {"calls": 0}
    ddp.register_comm_hook(None, counting_hook(counter))
    opt = SSGD(ddp.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, noise=0.5, seed=seed, ranks=ranks,
               model=ddp if model_arg else None, max_grad_norm=max_grad_norm)
    seen, passes = [], []
    for step in range(STEPS):
        x, y = batch(step, rank, world)
        if api == "closure":
            def closure():
                seen.append([p.detach().clone() for p in model.parameters()])
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:  # twin_passes, the batch in `accumulate` micro-batches, DDP's own no_sync for all but the last
            opt.zero_grad()
            for k in opt.twin_passes():
                seen.append([p.detach().clone() for p in model.parameters()])
                xs, ys = x.chunk(accumulate), y.chunk(accumulate)
                for i, (xi, yi) in enumerate(zip(xs, ys)):
                    if i < accumulate - 1:  # forward and backward under no_sync: DDP decides in forward
                        with ddp.no_sync():
                            (F.cross_entropy(ddp(xi), yi) / accumulate).backward()
                    else:
                        (F.cross_entropy(ddp(xi), yi) / accumulate).backward()
                passes.append(k)
            opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "allreduce_buckets": counter["calls"],
            "seed": opt.seed, "seen": seen, "sd_seed": opt.state_dict()["ssgd"]["seed"]}


def ddp_closure():
    return _ddp()


def ddp_no_model():
    return _ddp(model_arg=False)


def ddp_twin_accumulate_clip():
    return _ddp(api="twin", accumulate=2, max_grad_norm=0.5)


def ddp_pairs():
    return _ddp(ranks="pairs", seed=7)


def ddp_split():
    return _ddp(ranks="split", seed=7)


def mismatched_seeds():
    model = make_model()
    try:
        SSGD(model.parameters(), torch.optim.SGD, lr=0.1, seed=10 + dist.get_rank())
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def split_odd_world():
    try:
        SSGD(make_model().parameters(), torch.optim.SGD, lr=0.1, ranks="split")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


# ---- FSDP2 -------------------------------------------------------------------------------------------
def make_fsdp_model():
    """Uneven dim-0 shards on 2 ranks whose element offsets fall inside 4- and 128-element noise blocks:
    21 rows of 13 (rank 1 starts at element 11 * 13 = 143), 5 rows of 21 (rank 1 at 3 * 21 = 63)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 21), nn.Tanh(), nn.Linear(21, 5))


def fsdp_batch(step, rank, world):
    g = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(BATCH * world, 13, generator=g), torch.randint(0, 5, (BATCH * world,), generator=g)
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


FSDP_KW = dict(lr=0.1, momentum=0.9, noise=0.5, seed=7)


def _sharded(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_steps(model, opt, steps, first=0):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(first, first + steps):
        x, y = fsdp_batch(step, rank, world)
        opt.step(lambda: F.cross_entropy(model(x), y).backward())


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _count_reduce_scatters():
    """Counts FSDP2's gradient reduce-scatters (one foreach_reduce per parameter group and backward)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

    counter = {"n": 0}
    inner = pg.foreach_reduce

    def counted(*args, **kwargs):
        counter["n"] += 1
        return inner(*args, **kwargs)

    pg.foreach_reduce = counted
    return counter, lambda: setattr(pg, "foreach_reduce", inner)


def _fsdp(model_arg=False, **kw):
    model = _sharded(make_fsdp_model())
    opt = SSGD(model.parameters(), torch.optim.SGD, **FSDP_KW, **kw, **(dict(model=model) if model_arg else {}))
    counter, undo = _count_reduce_scatters()
    try:
        _fsdp_steps(model, opt, STEPS)
    finally:
        undo()
    return {"params": _full(model), "local_numels": [p._local_tensor.numel() for p in model.parameters()],
            "reduce_scatters_per_step": counter["n"] / STEPS}


def fsdp_gaussian():
    return _fsdp()


def fsdp_model_arg():
    return _fsdp(model_arg=True)


def fsdp_unreadable_state():
    """model= where FSDP2's private per-group flags cannot be read: sync is switched back on after
    each no-sync pass all the same (one reduce-scatter per step, flags back at their default)."""
    from ssgd_fused import distributed as D

    readable = D._fsdp_param_groups
    D._fsdp_param_groups = lambda model: iter(())
    try:
        out = _fsdp(model_arg=True)
    finally:
        D._fsdp_param_groups = readable
    return out


def _fsdp_abandoned(model_arg):
    """A twin_passes() loop left after its first pass's backward, then STEPS ordinary steps."""
    model = _sharded(make_fsdp_model())
    opt = SSGD(model.parameters(), torch.optim.SGD, **FSDP_KW, **(dict(model=model) if model_arg else {}))
    x, y = fsdp_batch(100, dist.get_rank(), dist.get_world_size())
    opt.zero_grad()
    for _ in opt.twin_passes():
        F.cross_entropy(model(x), y).backward()
        break
    _fsdp_steps(model, opt, STEPS)
    return {"params": _full(model)}


def fsdp_abandoned():
    return _fsdp_abandoned(False)


def fsdp_abandoned_model_arg():
    return _fsdp_abandoned(True)


def fsdp_user_sync_flags():
    """A layer the user set to no gradient sync keeps that setting through an S-SGD step with model=."""
    model = _sharded(make_fsdp_model())
    opt = SSGD(model.parameters(), torch.optim.SGD, **FSDP_KW, model=model)
    model[0].set_requires_gradient_sync(False, recurse=False)
    _fsdp_steps(model, opt, 1)
    from torch.distributed.fsdp import FSDPModule

    flags = [g.reduce_grads for m in model.modules() if isinstance(m, FSDPModule)
             for g in m._get_fsdp_state()._fsdp_param_groups]
    return {"first_layer": model[0]._get_fsdp_state()._fsdp_param_groups[0].reduce_grads, "all": flags}


def fsdp_rademacher_filter():
    return _fsdp(distribution="rademacher", scope="filter")


def fsdp_checkpoint():
    """Two steps, a distributed checkpoint, two more; then a fresh model and optimizer resume from
    the checkpoint and take the same two steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = os.environ["SSGD_TEST_CKPT"]
    model = _sharded(make_fsdp_model())
    opt = SSGD(model.parameters(), torch.optim.SGD, **FSDP_KW)
    _fsdp_steps(model, opt, 2)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)
    _fsdp_steps(model, opt, 2, first=2)
    straight = _full(model)
    model2 = _sharded(make_fsdp_model())
    opt2 = SSGD(model2.parameters(), torch.optim.SGD, **{**FSDP_KW, "seed": 12345})
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    _fsdp_steps(model2, opt2, 2, first=2)
    return {"straight": straight, "resumed": _full(model2), "seed": opt2.seed, "step": opt2.noise_step}


def fsdp_bad_placement():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = nn.Parameter(distribute_tensor(torch.randn(6, 8), mesh, [Shard(1)]))
    try:
        SSGD([w], torch.optim.SGD, lr=0.1)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


WORKERS = {f.__name__: f for f in (fsdp_gaussian, fsdp_model_arg, fsdp_unreadable_state, fsdp_abandoned,
                                   fsdp_abandoned_model_arg,
                                   fsdp_user_sync_flags, fsdp_rademacher_filter, fsdp_checkpoint,
                                   fsdp_bad_placement, ddp_closure, ddp_no_model, ddp_twin_accumulate_clip, ddp_pairs,
                                   ddp_split, mismatched_seeds, split_odd_world)}


# ---- launching ------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workers, world: int, out_dir: Path, timeout: float = 300.0, extra_env=None):
    """Runs the named workers one after the other on `world` processes of one gloo group; returns
    {worker: [each rank's result]} (a worker that raised gives {"exception": traceback})."""
    names = [workers] if isinstance(workers, str) else list(workers)
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.dist_workers", ",".join(names), str(out_dir)],
                                      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} of {names} failed ({p.returncode}):\n{out[-4000:]}")
    return {n: [torch.load(out_dir / f"{n}.{r}.pt", weights_only=False) for r in range(world)] for n in names}


def main():
    names, out_dir = sys.argv[1].split(","), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name in names:
            try:
                result = WORKERS[name]()
            except Exception:  # reported to the test, which fails with it
                import traceback

                result = {"exception": traceback.format_exc()}
            torch.save(result, out_dir / f"{name}.{dist.get_rank()}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
    print(json.dumps({"rank": int(os.environ["RANK"]), "ok": True}))


if __name__ == "__main__":
    main()
