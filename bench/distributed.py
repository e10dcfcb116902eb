"""DDP training steps on CPU ranks: plain SGD vs S-SGD and its rank variants, with the all-reduces counted.

    python -m bench.distributed                 # 2 gloo ranks, 1 thread each (about a minute)
    python -m bench.distributed --quick         # fewer rounds, shorter warm-up
    python -m bench.distributed --world 4 --steps 60
    python -m bench --distributed ...           # the same, through the bench CLI

Each rank is a spawned process (OMP_NUM_THREADS=1) of one gloo process group, with the
environment torchrun would set. Every variant is a DistributedDataParallel copy of the same MLP
(about 1 M parameters, so that the gradient all-reduce is a visible part of the step) trained on
a fixed synthetic batch per rank:

    sgd            DDP + torch.optim.SGD(momentum=0.9): one forward/backward, one all-reduce
    same           SSGD(ranks="same", model=ddp): two passes, the first under no_sync()
    same_no_model  SSGD(ranks="same") without model=: two passes, each all-reduced
    pairs          SSGD(ranks="pairs", model=ddp): each rank its own antithetic pair
    split          SSGD(ranks="split", model=ddp): even ranks run +n, odd ranks -n (one pass)
    allreduce      one dist.all_reduce of a gradient-sized float32 buffer alone (what a bucket costs)

Timing follows bench/timing.py's rule, made collective: a step's time is the slowest rank's
(all-reduced with MAX after the step, outside the timed region), so every rank sees the same
times and takes the same warm-up decision (until the median of the last 5 steps is within 10 %
of the 5 before, at least 2, at most 1000 steps or 3 s), then the variants are timed round-robin
(as bench/run.py times cycles), at least --steps rounds and about a second of them. A counting
comm hook (DDP's own all-reduce, counted) gives the buckets and bytes all-reduced per step.
Prints a markdown table; writes JSON (machine from lscpu, torch, commit, date) to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {  # name -> (SSGD ranks= or None for plain SGD, model= given, forward/backward passes per rank)
    "sgd": (None, True, 1),
    "same": ("same", True, 2),
    "same_no_model": ("same", False, 2),
    "pairs": ("pairs", True, 2),
    "split": ("split", True, 1),
}
LABELS = {
    "sgd": "DDP + torch.optim.SGD (momentum)",
    "same": 'S-SGD `ranks="same"`, `model=ddp`',
    "same_no_model": 'S-SGD `ranks="same"`, no `model=`',
    "pairs": 'S-SGD `ranks="pairs"`, `model=ddp`',
    "split": 'S-SGD `ranks="split"`, `model=ddp`',
    "allreduce": "one all-reduce of the gradients alone (gloo)",
}
SIZES = (512, 1024, 512, 10)  # MLP widths: 1.05 M parameters
BATCH = 64  # per rank


# ---- the worker (one rank) --------------------------------------------------------------------
def _mlp():
    import torch.nn as nn

    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(SIZES) - 2 else [])
    return nn.Sequential(*layers)


def _counting_hook(counter):
    """DDP's default all-reduce (the mean over ranks), counting buckets and bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        buf = bucket.buffer()
        counter["buckets"] += 1
        counter["bytes"] += buf.numel() * buf.element_size()
        return allreduce_hook(state, bucket)

    return hook


def _build(name, rank):
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ssgd_fused import SSGD

    ranks, model_arg, _ = VARIANTS[name]
    torch.manual_seed(0)
    model = _mlp()
    ddp = DDP(model)
    counter = {"buckets": 0, "bytes": 0}
    ddp.register_comm_hook(None, _counting_hook(counter))
    kw = dict(lr=0.01, momentum=0.9)
    if ranks is None:
        opt = torch.optim.SGD(ddp.parameters(), **kw)
    else:
        with warnings.catch_warnings():  # without model= SSGD warns (two all-reduces): that is the point here
            warnings.simplefilter("ignore", RuntimeWarning)
            opt = SSGD(ddp.parameters(), torch.optim.SGD, noise=0.5, seed=0, ranks=ranks,
                       model=ddp if model_arg else None, **kw)
    g = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(BATCH, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (BATCH,), generator=g)

    def closure():
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        return loss

    if ranks is None:
        def step():
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()
    else:
        def step():
            opt.step(closure)

    return {"step": step, "counter": counter, "model": model, "opt": opt}


def _slowest(t: float) -> float:
    """The largest of the ranks' times (every rank gets the same number)."""
    import torch
    import torch.distributed as dist

    buf = torch.tensor([t], dtype=torch.float64)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return float(buf.item())


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - t0)


def collective_warm_up(fn, max_seconds: float):
    """bench.timing.warm_up's rule on the slowest rank's times: identical decisions on every rank."""
    import statistics

    from bench import timing

    ts = []
    steady = False
    while True:
        ts.append(_timed(fn))
        n, w = len(ts), timing.WINDOW
        if n >= 2 * w:
            before, last = statistics.median(ts[-2 * w:-w]), statistics.median(ts[-w:])
            if abs(last - before) <= timing.TOL * max(last, 1e-9):
                steady = True
                break
        if n >= timing.MIN_CALLS and (n >= timing.MAX_CALLS or sum(ts) >= max_seconds):
            break
    tail = ts[max(1, len(ts) - timing.WINDOW):]
    return {"calls": len(ts), "steady": steady, "median_s": statistics.median(tail)}


def _checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def worker(cfg: dict, out_path: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from bench import timing

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg["timeout_s"]))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        built = {name: _build(name, rank) for name in cfg["variants"]}
        grads = torch.zeros(sum(p.numel() for p in _mlp().parameters()))
        built["allreduce"] = {"step": lambda: dist.all_reduce(grads), "model": None,  # the all-reduce alone
                              "counter": {"buckets": 1, "bytes": grads.numel() * grads.element_size()}}
        warm = {name: collective_warm_up(b["step"], cfg["warmup_s"]) for name, b in built.items()}
        rounds = max(cfg["steps"], timing.rounds_for(sum(w["median_s"] for w in warm.values()),
                                                     target_s=cfg["target_s"]))
        for name, b in built.items():
            if name != "allreduce":
                b["counter"].update(buckets=0, bytes=0)
        times = {name: [] for name in built}
        for _ in range(rounds):
            for name, b in built.items():
                times[name].append(_timed(b["step"]))
        rows = []
        for name, b in built.items():
            row = {"variant": name, **timing.summary(times[name]), "rounds": rounds,
                   "warmup_calls": warm[name]["calls"], "steady": warm[name]["steady"], "params": grads.numel()}
            if name == "allreduce":
                row.update(passes_per_rank=0, allreduce_buckets_per_step=1,
                           allreduce_bytes_per_step=b["counter"]["bytes"])
            else:
                sums = [None] * world
                dist.all_gather_object(sums, _checksum(b["model"]))
                row.update(passes_per_rank=VARIANTS[name][2], replicas_equal=len(set(sums)) == 1,
                           allreduce_buckets_per_step=b["counter"]["buckets"] / rounds,
                           allreduce_bytes_per_step=b["counter"]["bytes"] / rounds)
            rows.append(row)
        sgd = next((r for r in rows if r["variant"] == "sgd"), None)
        for r in rows:
            if sgd is not None:
                r["x_sgd"] = r["median_ms"] / sgd["median_ms"]
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- the launcher -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: dict, world: int, timeout_s: float) -> list[dict]:
    """Runs the worker on `world` spawned processes of one gloo group; returns rank 0's rows."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.json")
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.distributed", "--worker", out_path,
                                           "--config", json.dumps(cfg)], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout_s
        outs = []
        try:
            for p in procs:
                try:
                    outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
                except subprocess.TimeoutExpired:
                    outs.append(f"(killed after {timeout_s:.0f} s)")
        finally:
            for p in procs:
                p.kill()
                p.wait()
        for rank, (p, out) in enumerate(zip(procs, outs)):
            if p.returncode != 0:
                raise RuntimeError(f"rank {rank} failed ({p.returncode}):\n{out[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def lscpu() -> dict:
    """The machine, as lscpu describes it (a few fields)."""
    keep = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
            "L1d cache", "L2 cache", "L3 cache", "Hypervisor vendor")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: fields[k].strip() for k in keep if k in fields}


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _equal(row) -> str:
    return "-" if "replicas_equal" not in row else "yes" if row["replicas_equal"] else "NO"


def markdown(rows, info) -> str:
    lines = [f"{info['date']} | {info['cpu']} ({info['cores']} cores) | {info['world']} gloo ranks x 1 thread | "
             f"torch {info['torch']} | commit {info['commit']} | MLP {'-'.join(map(str, SIZES))} "
             f"({rows[0]['params'] / 1e6:.2f} M parameters, {4 * rows[0]['params'] / 2**20:.1f} MiB of float32 "
             f"gradients), batch {BATCH} per rank | 1-min load average {info['loadavg_1min']['before']:.1f} before, "
             f"{info['loadavg_1min']['after']:.1f} after", ""]
    lines += ["| variant | ms per step (p20-p80) | x SGD | fwd/bwd per rank | all-reduced buckets per step | "
              "MiB all-reduced per step | replicas equal |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        xs = f"{r['x_sgd']:.2f}x" if "x_sgd" in r else "-"
        lines.append(f"| {LABELS[r['variant']]} | {_ms(r['median_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}) | "
                     f"{xs} | {r['passes_per_rank']} | {r['allreduce_buckets_per_step']:g} | "
                     f"{r['allreduce_bytes_per_step'] / 2**20:.2f} | {_equal(r)} |")
    unsteady = [r["variant"] for r in rows if not r["steady"]]
    lines += ["", f"{rows[0]['rounds']} timed rounds per variant (round-robin) after the shared warm-up"
              + (f"; not steady within the warm-up budget: {', '.join(unsteady)}" if unsteady else "")]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None,
                    help="at least this many timed steps per variant, after the warm-up (default 100, --quick 10)")
    ap.add_argument("--world", type=int, default=2, help="ranks (processes); 'split' needs an even number")
    ap.add_argument("--quick", action="store_true", help="10 timed steps, 1 s of warm-up at most per variant")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.config), args.worker)
    if "split" in args.variants and args.world % 2:
        ap.error("ranks='split' needs an even --world")

    from bench import timing
    from bench.run import machine_info

    cfg = {"variants": args.variants, "steps": args.steps or (10 if args.quick else 100),
           "warmup_s": 1.0 if args.quick else timing.MAX_SECONDS, "target_s": timing.TARGET_SECONDS,
           "timeout_s": args.timeout}
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = launch(cfg, args.world, args.timeout)
    info = {**machine_info(), "threads": 1, "world": args.world, "lscpu": lscpu(), "backend": "gloo",
            "model": {"mlp": list(SIZES), "batch_per_rank": BATCH}, "wall_s": round(time.perf_counter() - t0, 1),
            "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]}}
    print(markdown(rows, info))
    os.makedirs(args.out, exist_ok=True)
    stamp = info["date"].replace(" ", "_").replace(":", "")
    path = os.path.join(args.out, f"distributed_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"info": info, "config": cfg, "rows": rows}, f, indent=1)
    print(f"\nwrote {path} ({info['wall_s']} s)")
    return rows


if __name__ == "__main__":
    main()
