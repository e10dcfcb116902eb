"""The bench's variants do what they are named for, and each cycle is counted in its own base
optimizer's step (timings are not asserted: benchmarks are not tests)."""

import pytest
import torch

from tests.helpers import require_cpp

pytestmark = pytest.mark.cpp


def test_adamw_variants_step_adamw_from_the_given_state():
    require_cpp()
    from bench import shapes
    from bench.variants import VARIANTS

    for name in ("fused_adamw", "adamw"):
        cls = VARIANTS[name]
        assert cls.base == "adamw"
        params = shapes.make("resnet20", torch.float32)
        state = cls.make_state(params)
        v = cls(params, "gaussian", state=state)
        before = [p.detach().clone() for p in params]
        v.cycle()
        v.cycle()
        st = v.opt.state[params[0]]
        assert st["exp_avg"] is state[0]["exp_avg"]  # the state handed in is the one stepped
        assert float(st["step"]) == 3.0
        assert all(s["exp_avg"].abs().sum() > 0 and s["exp_avg_sq"].abs().sum() > 0 for s in state)
        assert all(not torch.equal(a, b) for a, b in zip(before, params))


def test_cycles_are_counted_in_their_base_optimizers_step():
    require_cpp()
    from bench import run as R

    rows, _ = R.run(["resnet20"], ["float32"], ["rademacher"], ["fused", "sgd", "fused_adamw", "adamw", "eager"],
                    reps=1, per_pass=False)
    cyc = {r["variant"]: r for r in rows if r["pass"] == "cycle"}
    for name, base in (("fused", "sgd"), ("eager", "sgd"), ("fused_adamw", "adamw"), ("adamw", "adamw")):
        assert cyc[name]["x_base"] == pytest.approx(cyc[name]["median_ms"] / cyc[base]["median_ms"])
    assert "speedup_vs_eager" in cyc["fused"] and "speedup_vs_eager" not in cyc["fused_adamw"]
    text = R.markdown(rows, 40.0, R.machine_info())
    assert "| x base |" in text and "x (adamw) |" in text and "x (sgd) |" in text


def test_e2e_counts_adamw_rows_in_adamw_steps():
    require_cpp()
    from bench import e2e

    rows = e2e.run_e2e(reps=1, kinds=("adamw", "ssgd_fused_adamw"))
    assert {r["optimizer"] for r in rows} == {"adamw", "ssgd_fused_adamw"}
    for r in rows:
        assert r["base"] == "adamw"
        base = next(b for b in rows if b["model"] == r["model"] and b["optimizer"] == "adamw")
        assert r["x_base"] == pytest.approx(r["median_ms"] / base["median_ms"])
    assert "x (adamw) |" in e2e.markdown(rows)
