"""pytest-benchmark microbenchmarks (not collected by the test suite):

    python -m pytest bench/test_microbench.py --benchmark-columns=median,iqr,ops
    python -m pytest bench/test_microbench.py -k "gpt25m and fused" --benchmark-json=out.json

Per pass (norms, perturb, flip, restore+update) and per cycle, for every parameter set, dtype and
variant of bench/variants.py. The CLI (python -m bench) adds the derived columns and memory.
"""

import pytest
import torch

from bench import shapes
from bench.variants import VARIANTS

SETS = ["resnet20", "gpt25m", "resnet50", "gpt2"]
DTYPES = ["float32", "bfloat16"]
VARIANT_NAMES = ["fused", "exact", "eager", "naive", "sgd", "reference", "compiled"]

_cache = {}


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
    benchmark.extra_info.update(params=sum(p.numel() for p in v.params), threads=torch.get_num_threads())
    benchmark.pedantic(v.cycle, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("pass_name", ["norms", "perturb", "flip", "restore+update"])
@pytest.mark.parametrize("vname", ["fused", "eager"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("set_name", SETS)
def test_pass(benchmark, set_name, dtype, vname, pass_name):
    v = _variant(set_name, dtype, vname, "gaussian")
    passes = v.passes()
    order = list(passes)
    for name in order[: order.index(pass_name)]:  # bring the state to just before this pass
        passes[name]()
    benchmark.pedantic(passes[pass_name], rounds=5, warmup_rounds=0)
