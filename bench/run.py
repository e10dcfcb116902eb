"""Timing, memory and reporting machinery of the benchmarks (used by the CLI and pytest-benchmark)."""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from bench import shapes
from bench.variants import BYTES_PER_ELEM, VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- timing -------------------------------------------------------------------------------------
def time_fn(f, reps: int = 5, warmup: int = 1):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return _summary(ts)


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
    gradients and the base optimizer's momentum buffers (which exist before the measurement)."""
    dt = getattr(torch, dtype)
    warm = VARIANTS[variant](shapes.make("resnet20", dt), dist)  # first-use costs (code pages, thread
    for _ in range(2):  # pools, lazy inits) are not the variant's memory: pay them on a small set
        warm.cycle()
    del warm
    params = shapes.make(set_name, dt)
    state = [torch.zeros_like(p) for p in params]  # the base optimizer's state, allocated (and touched) up front
    gc.collect()
    try:  # hand freed heap pages back, so that reusing them later counts as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _rss_kib("VmRSS:")
    v = VARIANTS[variant](params, dist, momentum_buffers=state)
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
    }
    return info


# ---- a run --------------------------------------------------------------------------------------
def _summary(ts):
    ts = sorted(ts)
    q = lambda x: ts[min(len(ts) - 1, int(x * len(ts)))]  # noqa: E731
    return {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * q(0.2), "p80_ms": 1e3 * q(0.8)}


def run(sets, dtypes, dists, variants, reps=5, per_pass=True, memory=False, progress=None):
    """Times every (set, dtype, distribution, variant); returns the rows and the bandwidth.

    The variants of one (set, dtype, distribution) are timed round-robin, one cycle each per round,
    so that a slow spell of a shared machine hits all of them alike and their ratios hold."""
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
                    built[vname].cycle()  # warm-up (and torch.compile's compilation)
                n = sum(p.numel() for p in next(iter(built.values())).params)
                times = {v: [] for v in built}
                for r in range(reps):
                    for vname, v in built.items():
                        if vname == "reference" and r >= max(1, reps // 3):
                            continue
                        t0 = time.perf_counter()
                        v.cycle()
                        times[vname].append(time.perf_counter() - t0)
                for vname, v in built.items():
                    moved = BYTES_PER_ELEM[vname] * n * (dt.itemsize / 4)
                    t = _summary(times[vname])
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
    # derived: speed-up over eager S-SGD and ratio to the fused cycle's memory floor
    cycles = {(r["set"], r["dtype"], r["dist"], r["variant"]): r for r in rows if r["pass"] == "cycle"}
    for r in rows:
        if r["pass"] != "cycle":
            continue
        eager = cycles.get((r["set"], r["dtype"], r["dist"], "eager"))
        if eager:
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
        r["x_floor"] = r["median_ms"] / r["floor_ms"]
        if memory:
            r["memory"] = measure_memory(r["variant"], r["set"], r["dtype"], r["dist"])
    return rows, bw


def markdown(rows, bw, info) -> str:
    lines = [f"{info['date']} | {info['cpu']} | {info['threads']} threads | torch {info['torch']} | "
             f"ISA {info['cpu_isa']} | commit {info['commit']} | add_ bandwidth {bw:.1f} GB/s", ""]
    lines += ["| set | dtype | noise | variant | cycle ms (p20-p80) | vs eager | x floor | GB/s | extra memory |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["pass"] != "cycle":
            continue
        mem = r.get("memory", {})
        mem_s = f"{mem['extra_bytes'] / 2**20:.1f} MiB ({100 * mem['extra_frac']:.1f}%)" if "extra_bytes" in mem else (
            mem.get("error", "-"))
        vs = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        lines.append(f"| {r['set']} ({r['params'] / 1e6:.2f} M) | {r['dtype']} | {r['dist']} | {r['variant']} | "
                     f"{r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | {vs} | {r['x_floor']:.2f} | "
                     f"{r['gbps']:.1f} | {mem_s} |")
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
