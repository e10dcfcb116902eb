"""Timing, memory and reporting machinery of the benchmarks (used by the CLI and pytest-benchmark)."""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

from bench import shapes, timing
from bench.variants import BYTES_PER_ELEM, VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- timing (the warm-up rule and round count live in bench/timing.py, shared with pytest) -------
def time_fn(f, reps: int = 5):
    """Warm f up until steady, then the median and p20/p80 of at least `reps` timed calls."""
    return timing.time_fn(f, reps)


def add_bandwidth(n: int = 1 << 25, reps: int = 5) -> float:
    """GB/s of x.add_(y, alpha) on two large float32 arrays (read x, read y, write x)."""
    x, y = torch.rand(n), torch.rand(n)
    t = time_fn(lambda: x.add_(y, alpha=1e-3), reps=reps)["median_ms"] / 1e3
    return 12 * n / t / 1e9


# ---- memory (measured in a fresh process: peak resident set growth) ------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(variant: str, set_name: str, dtype: str, dist: str, cycles: int = 2) -> dict:
    """Peak RSS growth while constructing `variant` and running cycles, beyond the parameters,
    gradients and the base optimizer's state (which exist before the measurement)."""
    dt = getattr(torch, dtype)
    warm = VARIANTS[variant](shapes.make("resnet20", dt), dist)  # first-use costs (code pages, thread
    for _ in range(2):  # pools, lazy inits) are not the variant's memory: pay them on a small set
        warm.cycle()
    del warm
    params = shapes.make(set_name, dt)
    state = VARIANTS[variant].make_state(params)  # the base optimizer's state, allocated (and touched) up front
    gc.collect()
    try:  # hand freed heap pages back, so that reusing them later counts as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _rss_kib("VmRSS:")
    v = VARIANTS[variant](params, dist, state=state)
    for _ in range(cycles):
        v.cycle()
    peak = _rss_kib("VmHWM:")
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    extra = max(0, peak - base) * 1024
    return {"extra_bytes": extra, "param_bytes": param_bytes, "extra_frac": extra / param_bytes}


def measure_memory(variant: str, set_name: str, dtype: str, dist: str) -> dict:
    code = ("import json, sys; from bench.run import measure_memory_here; "
            f"print(json.dumps(measure_memory_here({variant!r}, {set_name!r}, {dtype!r}, {dist!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- environment ------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode:
            commit += "+dirty"
    except OSError:
        commit = "unknown"
    from ssgd_fused import ops

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "cpu_isa": ops._C.isa() if ops.cpp_available() else "none",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        # PASSIVE makes idle OpenMP threads sleep: it slows torch's optimizer steps (many small
        # parallel regions) more than the fused passes, so ratios compare only within one policy
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }
    return info


# ---- a run --------------------------------------------------------------------------------------
_summary = timing.summary  # the name e2e.py and older callers import


def time_cycles(built: dict, reps: int = 5, target_s: float = timing.TARGET_SECONDS) -> dict:
    """name -> cycle timing summary of built variants (of one parameter set), timed round-robin.

    Each variant is first warmed up until steady (bench/timing.py: the rule pytest-benchmark uses
    too; it also covers torch.compile's compilation). Then the variants are timed round-robin, one
    cycle each per round, so that a slow spell of a shared machine hits all of them alike and
    their ratios hold; at least `reps` rounds, more when a round is fast (about target_s seconds
    of them). The reference path is timed in the first third of the rounds only (it is slow)."""
    warm = {name: timing.warm_up(v.cycle) for name, v in built.items()}
    rounds = max(reps, timing.rounds_for(sum(w.median_s for w in warm.values()), target_s=target_s))
    times = {name: [] for name in built}
    for r in range(rounds):
        for name, v in built.items():
            if name == "reference" and r >= max(1, rounds // 3):
                continue
            t0 = time.perf_counter()
            v.cycle()
            times[name].append(time.perf_counter() - t0)
    return {name: {**timing.summary(ts), "rounds": len(ts), "warmup_calls": warm[name].calls,
                   "steady": warm[name].steady} for name, ts in times.items()}


def run(sets, dtypes, dists, variants, reps=5, per_pass=True, memory=False, progress=None):
    """Times every (set, dtype, distribution, variant); returns the rows and the bandwidth.

    Cycles are timed by time_cycles (warm-up until steady, then round-robin); passes by time_fn."""
    bw = add_bandwidth()
    rows = []
    for set_name in sets:
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            for dist in dists:
                built = {}
                for vname in variants:
                    if progress:
                        progress(f"{set_name} {dtype} {dist} {vname}")
                    built[vname] = VARIANTS[vname](shapes.make(set_name, dt), dist)
                n = sum(p.numel() for p in next(iter(built.values())).params)
                timed = time_cycles(built, reps)
                for vname, v in built.items():
                    moved = BYTES_PER_ELEM[vname] * n * (dt.itemsize / 4)
                    t = timed[vname]
                    rows.append({"set": set_name, "params": n, "dtype": dtype, "dist": dist, "variant": vname,
                                 "pass": "cycle", **t, "gbps": moved / (t["median_ms"] / 1e3) / 1e9,
                                 "floor_ms": 1e3 * moved / (bw * 1e9)})
                    passes = v.passes() if per_pass else {}
                    if len(passes) > 1:
                        for pname, f in passes.items():
                            rows.append({"set": set_name, "params": n, "dtype": dtype, "dist": dist,
                                         "variant": vname, "pass": pname, **time_fn(f, reps=reps)})
                del built
                gc.collect()
    # derived: speed-up over eager S-SGD, cost in plain SGD steps, ratio to the memory floor
    cycles = {(r["set"], r["dtype"], r["dist"], r["variant"]): r for r in rows if r["pass"] == "cycle"}
    eager_base = VARIANTS["eager"].base
    for r in rows:
        if r["pass"] != "cycle":
            continue
        eager = cycles.get((r["set"], r["dtype"], r["dist"], "eager"))
        if eager and VARIANTS[r["variant"]].base == eager_base:  # eager S-SGD runs on SGD
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
        base = cycles.get((r["set"], r["dtype"], r["dist"], VARIANTS[r["variant"]].base))
        if base:  # what the S-SGD cycle costs beyond the two passes, in plain base-optimizer steps
            r["x_base"] = r["median_ms"] / base["median_ms"]
        r["x_floor"] = r["median_ms"] / r["floor_ms"]
        if memory:
            r["memory"] = measure_memory(r["variant"], r["set"], r["dtype"], r["dist"])
    return rows, bw


def _ms(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def markdown(rows, bw, info) -> str:
    lines = [f"{info['date']} | {info['cpu']} | {info['threads']} threads | torch {info['torch']} | "
             f"ISA {info['cpu_isa']} | OMP_WAIT_POLICY {info.get('omp_wait_policy', 'unset')} | "
             f"commit {info['commit']} | add_ bandwidth {bw:.1f} GB/s", ""]
    if info.get("stall_note"):  # set by the CLI from bench.timing.stall_probe_us before and after the run
        lines += [info["stall_note"], ""]
    lines += ["| set | dtype | noise | variant | cycle ms (p20-p80) | vs eager | x base | x floor | GB/s | "
              "extra memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["pass"] != "cycle":
            continue
        mem = r.get("memory", {})
        mem_s = f"{mem['extra_bytes'] / 2**20:.1f} MiB ({100 * mem['extra_frac']:.1f}%)" if "extra_bytes" in mem else (
            mem.get("error", "-"))
        vs = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        xs = f"{r['x_base']:.2f}x ({VARIANTS[r['variant']].base})" if "x_base" in r else "-"
        ms = f"{_ms(r['median_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])})"
        lines.append(f"| {r['set']} ({r['params'] / 1e6:.2f} M) | {r['dtype']} | {r['dist']} | {r['variant']} | "
                     f"{ms} | {vs} | {xs} | {r['x_floor']:.2f} | {r['gbps']:.1f} | {mem_s} |")
    passes = [r for r in rows if r["pass"] != "cycle"]
    if passes:
        lines += ["", "| set | dtype | noise | variant | pass | ms (p20-p80) |", "|---|---|---|---|---|---|"]
        for r in passes:
            lines.append(f"| {r['set']} | {r['dtype']} | {r['dist']} | {r['variant']} | {r['pass']} | "
                         f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) |")
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cyc = [r for r in rows if r["pass"] == "cycle"]
    labels = [f"{r['set']}\n{r['dtype']} {r['dist'][:5]}\n{r['variant']}" for r in cyc]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(cyc)), 5.5))
    ax.bar(range(len(cyc)), [r["median_ms"] for r in cyc],
           yerr=[[r["median_ms"] - r["p20_ms"] for r in cyc], [r["p80_ms"] - r["median_ms"] for r in cyc]])
    ax.scatter(range(len(cyc)), [r["floor_ms"] for r in cyc], marker="_", s=300, color="k", label="memory floor")
    ax.set_xticks(range(len(cyc)))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    ax.set_ylabel("ms per S-SGD cycle (no forward/backward)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
