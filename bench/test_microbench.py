"""pytest-benchmark microbenchmarks (not collected by the test suite, `python -m pytest tests`):

    python -m pytest bench/test_microbench.py -k "cycle and gpt25m and float32" --benchmark-columns=median,iqr,rounds
    python -m pytest bench/test_microbench.py -k "gpt25m and fused" --benchmark-json=out.json

Per pass (norms, perturb, flip, restore+update) and per cycle, for every parameter set, dtype and
variant of bench/variants.py. Each benchmark first calls its function until the timings are steady
(bench/timing.py: the warm-up rule of the CLI too), then times about a second of rounds (5-200)
with no further warm-up, so the median is the steady state the CLI reports (python -m bench, which
adds the derived columns and memory). bench/test_bench_agree.py checks that the two agree.
"""

import pytest
import torch

from bench import shapes, timing
from bench.variants import VARIANTS

SETS = ["resnet20", "gpt25m", "resnet50", "gpt2"]
DTYPES = ["float32", "bfloat16"]
VARIANT_NAMES = ["fused", "exact", "eager", "naive", "sgd", "reference", "compiled"]

_cache = {}


def steady_benchmark(benchmark, fn):
    """Warm fn up until steady, then let pytest-benchmark time rounds_for(...) rounds of it."""
    w = timing.warm_up(fn)
    rounds = timing.rounds_for(w.median_s)
    benchmark.extra_info.update(warmup_calls=w.calls, warmup_s=round(w.seconds, 3), steady=w.steady,
                                threads=torch.get_num_threads())
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    return w


def _variant(set_name, dtype, vname, dist):
    key = (set_name, dtype, vname, dist)
    if key not in _cache:
        _cache.clear()  # one parameter set alive at a time
        _cache[key] = VARIANTS[vname](shapes.make(set_name, getattr(torch, dtype)), dist)
    return _cache[key]


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("vname", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("set_name", SETS)
def test_cycle(benchmark, set_name, dtype, vname, dist):
    if vname in ("reference", "compiled") and set_name in ("resnet50", "gpt2"):
        pytest.skip("too slow for a microbenchmark; use python -m bench --variants reference/compiled")
    v = _variant(set_name, dtype, vname, dist)
    benchmark.extra_info.update(params=sum(p.numel() for p in v.params))
    steady_benchmark(benchmark, v.cycle)


# the passes as each variant names them (Fused.passes: the update pass also measures the next norms)
PASSES = [("fused", p) for p in ("perturb", "flip", "restore+update+norms")] + [
    ("eager", p) for p in ("norms", "perturb", "flip", "restore+update")]


@pytest.mark.parametrize("vname,pass_name", PASSES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("set_name", SETS)
def test_pass(benchmark, set_name, dtype, vname, pass_name):
    v = _variant(set_name, dtype, vname, "gaussian")
    passes = v.passes()
    order = list(passes)
    for name in order[: order.index(pass_name)]:  # bring the state to just before this pass
        passes[name]()
    steady_benchmark(benchmark, passes[pass_name])
