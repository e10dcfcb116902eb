"""The one warm-up rule and round count of every benchmark (the CLI, pytest-benchmark, end to end).

    w = warm_up(fn)                    # calls fn until its timings are steady
    n = rounds_for(w.median_s)         # timed rounds for a stable median
    t = time_fn(fn)                    # both, then the median and p20/p80 of n timed rounds

Steady means: the median of the last WINDOW call times is within TOL of the median of the WINDOW
calls before them. Warm-up stops there, or after MAX_CALLS calls or MAX_SECONDS seconds (at
least MIN_CALLS calls, so the first call, which pays one-time costs, is never the last);
`Warmup.steady` says which.

What the first calls pay (resnet20 float32, 65 tensors, at 1 and 2 threads, in the least busy
minutes of a shared machine): about 2 ms, once. The first call takes SGD 2.3-2.9 ms (then
0.4-0.6), fused 2.9-4.6 (then 1.6-2.2), eager 3.4-5.7 (then 2.5-3.8); the second is already
steady. It pays for
- torch.optim's first step(): its record_function wrapper imports a profiler module lazily
  (torch.profiler._cupti_monitor) on first entry;
- the fused variant's first cycle: it measures the norms in a separate pass (later cycles take
  them from the previous update pass), and the first call of each op resolves its dispatch;
- the first parallel region of a process, which starts OpenMP's thread team.

The 100x slower "first steps" (SGD 120 ms, eager 360 ms, fused 32 ms, in multiples of 4 ms) are
something else, and no warm-up removes them: on a machine where other processes keep cores busy,
torch's two OpenMP threads can end up on one core (seen in /proc/<pid>/task/*/stat), and
libgomp's default wait policy has the waiting thread spin (300,000 iterations before it sleeps,
evidently longer than a tick here) while the thread it waits for cannot run on that core until
the scheduler tick (HZ=250: 4 ms) preempts the spinner: about two ticks per parallel region,
whatever its size. The state
lasts from a few steps to the whole process and comes back with the load. OMP_WAIT_POLICY=PASSIVE
(set before torch is imported) or `--threads 1` avoids it; `stall_probe_us()` detects it
(docs/PERFORMANCE.md, 2026-12-01).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

WINDOW = 5  # calls per window of the steadiness test
TOL = 0.10  # relative difference of the two windows' medians that counts as steady
MIN_CALLS = 2
MAX_CALLS = 1000
MAX_SECONDS = 3.0  # warm-up budget per callable
TARGET_SECONDS = 1.0  # timed rounds per callable (or per round-robin group), roughly
MIN_ROUNDS = 5
MAX_ROUNDS = 200


@dataclass
class Warmup:
    calls: int
    seconds: float
    steady: bool
    median_s: float  # median of the last window: the steady time per call
    times_s: list = field(default_factory=list, repr=False)


def warm_up(fn, *, window: int = WINDOW, tol: float = TOL, min_calls: int = MIN_CALLS,
            max_calls: int = MAX_CALLS, max_seconds: float = MAX_SECONDS) -> Warmup:
    """Calls fn() until the median of the last `window` timings is within `tol` of the median of
    the `window` before (or a cap is hit); returns what it saw."""
    ts = []
    start = time.perf_counter()
    steady = False
    while True:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        n = len(ts)
        if n >= 2 * window:
            before, last = statistics.median(ts[-2 * window:-window]), statistics.median(ts[-window:])
            if abs(last - before) <= tol * max(last, 1e-9):
                steady = True
                break
        if n >= min_calls and (n >= max_calls or time.perf_counter() - start >= max_seconds):
            break
    tail = ts[max(1, len(ts) - window):] if len(ts) > 1 else ts  # never the first call alone
    return Warmup(len(ts), time.perf_counter() - start, steady, statistics.median(tail), ts)


def rounds_for(seconds_per_round: float, *, target_s: float = TARGET_SECONDS, min_rounds: int = MIN_ROUNDS,
               max_rounds: int = MAX_ROUNDS) -> int:
    """Timed rounds for a stable median: about target_s seconds of them, within [min, max]."""
    if seconds_per_round <= 0:
        return max_rounds
    return max(min_rounds, min(max_rounds, int(target_s / seconds_per_round)))


def summary(ts) -> dict:
    """Median and 20th/80th percentiles (ms) of a list of times in seconds."""
    ts = sorted(ts)
    q = lambda x: ts[min(len(ts) - 1, int(x * len(ts)))]  # noqa: E731
    return {"median_ms": 1e3 * statistics.median(ts), "p20_ms": 1e3 * q(0.2), "p80_ms": 1e3 * q(0.8)}


def time_fn(fn, reps: int = MIN_ROUNDS, *, target_s: float = TARGET_SECONDS) -> dict:
    """Warm fn up, then time at least `reps` rounds (more when they are fast); the summary plus
    the warm-up's calls and whether it reached the steady state."""
    w = warm_up(fn)
    ts = []
    for _ in range(max(reps, rounds_for(w.median_s, target_s=target_s))):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {**summary(ts), "rounds": len(ts), "warmup_calls": w.calls, "steady": w.steady}


def stall_probe_us(reps: int = 9) -> float:
    """Median microseconds of one small parallel region (fill_ of 128 Ki floats): tens of us
    normally, 4000+ (whole scheduler ticks) when torch's threads are stalling (module docstring)."""
    import torch

    x = torch.empty(1 << 17)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.fill_(1.0)
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def stall_note(probe_us: float, threads: int) -> str | None:
    """A warning for the report when the probe saw stalls, else None."""
    if threads > 1 and probe_us > 1000:
        return (f"warning: one small parallel region took {probe_us / 1e3:.1f} ms (normally < 0.1): other "
                f"processes are keeping cores busy and torch's {threads} threads stall for scheduler ticks, "
                f"so these timings count parallel regions more than work (bench/timing.py); "
                f"rerun on a quiet machine, with OMP_WAIT_POLICY=PASSIVE or with --threads 1")
    return None
