"""The microbenchmarks and the CLI measure the same steady state (issue 15). Run with

    python -m pytest bench/test_bench_agree.py -q       # about 30-60 s; not part of python -m pytest tests

The agreement test runs both commands as a user does, in their own processes, on one small set
(resnet20 float32 gaussian; variants sgd, fused, eager):

    python -m pytest bench/test_microbench.py -k "cycle and resnet20 and float32 and gaussian and ..."
    python -m bench --sets resnet20 --dtypes float32 --dists gaussian --variants sgd fused eager ...

and asserts that their medians agree within a factor of 3 (generous: the machine is shared, and a
disagreement is measured once more before it fails; issue 15's disagreement was 10-200x), and that
both warmed up with bench/timing.py's rule and timed at least its minimum of rounds (the check that
catches a microbenchmark going back to a fixed one-call warm-up, whatever the machine's mood).
Both run with OMP_WAIT_POLICY=PASSIVE unless it is set: on a busy machine the default policy can
stall torch's threads for whole scheduler ticks in one process and not in the other
(bench/timing.py), which would test the machine, not the code. The other tests check the warm-up
rule itself on a fake clock (no timing).
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from bench import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SET, DTYPE, DIST = "resnet20", "float32", "gaussian"
VARIANTS = ["sgd", "fused", "eager"]
FACTOR = 3.0


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CLI would also run the GPU benchmark where there is one
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _measure(d):
    """variant -> pytest-benchmark record, variant -> CLI cycle row, and both commands' output."""
    mjson = d / "micro.json"
    keyword = f"test_cycle and {SET} and {DTYPE} and {DIST} and ({' or '.join(VARIANTS)})"
    micro_out = _run([sys.executable, "-m", "pytest", "bench/test_microbench.py", "-k", keyword, "-q",
                      "-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={mjson}",
                      "--benchmark-columns=median,iqr,rounds"])
    cli_out = _run([sys.executable, "-m", "bench", "--sets", SET, "--dtypes", DTYPE, "--dists", DIST,
                    "--variants", *VARIANTS, "--no-passes", "--no-e2e", "--out", str(d)])
    micro = {b["params"]["vname"]: b for b in json.loads(mjson.read_text())["benchmarks"]}
    (cjson,) = glob.glob(str(d / "bench_*.json"))
    with open(cjson) as f:
        cli = {r["variant"]: r for r in json.load(f)["rows"] if r["pass"] == "cycle"}
    assert sorted(micro) == sorted(cli) == sorted(VARIANTS), (sorted(micro), sorted(cli))
    return {"micro": micro, "cli": cli, "out": micro_out + "\n" + cli_out}


def _ratios(m):
    return {v: 1e3 * m["micro"][v]["stats"]["median"] / m["cli"][v]["median_ms"] for v in VARIANTS}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Both commands' figures. The two processes run seconds apart on a shared machine, so a burst
    of load can hit one and not the other: a disagreement is measured once more (a real one, like
    timing the warm-up, repeats), and the tests judge the second measurement."""
    first = _measure(tmp_path_factory.mktemp("agree"))
    if all(1 / FACTOR < r < FACTOR for r in _ratios(first).values()):
        return first
    second = _measure(tmp_path_factory.mktemp("agree_again"))
    second["out"] = (f"first measurement, micro/CLI: {_ratios(first)}\n{first['out']}\n"
                     f"second measurement:\n{second['out']}")
    return second


@pytest.mark.parametrize("variant", VARIANTS)
def test_microbench_agrees_with_cli(measured, variant):
    micro_ms = 1e3 * measured["micro"][variant]["stats"]["median"]
    cli_ms = measured["cli"][variant]["median_ms"]
    ratio = micro_ms / cli_ms
    assert 1 / FACTOR < ratio < FACTOR, (
        f"{SET} {DTYPE} {DIST} {variant}: pytest-benchmark median {micro_ms:.3f} ms, CLI {cli_ms:.3f} ms "
        f"({ratio:.2f}x)\n{measured['out']}")


def test_both_warm_up_until_steady_then_time_enough_rounds(measured):
    for variant in VARIANTS:
        m, c = measured["micro"][variant], measured["cli"][variant]
        info = m["extra_info"]
        for where, calls, rounds in (("microbench", info.get("warmup_calls"), m["stats"]["rounds"]),
                                     ("CLI", c.get("warmup_calls"), c.get("rounds"))):
            assert calls is not None and calls >= timing.MIN_CALLS, f"{where} {variant}: no shared warm-up"
            assert rounds >= timing.MIN_ROUNDS, f"{where} {variant}: only {rounds} timed rounds"
        assert "steady" in info and "steady" in c


# ---- the warm-up rule on a fake clock ----------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _fake(monkeypatch, durations_ms):
    clock = _Clock()
    monkeypatch.setattr(timing, "time", clock)
    it = iter(durations_ms)

    def fn():
        clock.now += next(it) / 1e3

    return fn


def test_warm_up_waits_for_the_steady_state(monkeypatch):
    # torch.optim.SGD's first steps as issue 15 measured them, then its steady 0.6 ms: one warm-up
    # call and five rounds would have reported 172 ms
    fn = _fake(monkeypatch, [108, 164, 188, 172, 3.0] + [0.6] * 1000)
    w = timing.warm_up(fn)
    assert w.steady and w.median_s == pytest.approx(0.6e-3)
    assert w.calls >= 5 + timing.WINDOW  # both windows' medians are past the slow calls
    assert timing.rounds_for(w.median_s) == timing.MAX_ROUNDS


def test_warm_up_stops_at_its_caps(monkeypatch):
    noisy = [1.0, 3.0] * 5000  # never steady: the medians of the windows alternate
    w = timing.warm_up(_fake(monkeypatch, noisy), max_seconds=0.5)
    assert not w.steady and w.seconds == pytest.approx(0.5, abs=0.01)
    w = timing.warm_up(_fake(monkeypatch, [5000.0] * 10))  # one call longer than the budget
    assert not w.steady and w.calls == timing.MIN_CALLS and w.median_s == pytest.approx(5.0)
    assert timing.rounds_for(w.median_s) == timing.MIN_ROUNDS


def test_stall_note():
    assert timing.stall_note(30.0, 2) is None
    assert timing.stall_note(8000.0, 1) is None  # one thread never waits for another
    assert "scheduler ticks" in timing.stall_note(8000.0, 2)
