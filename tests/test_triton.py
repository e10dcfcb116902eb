"""The Triton kernels against the reference: on a GPU when there is one, else in triton's
interpreter on CPU tensors (small odd sizes); plus ahead-of-time compilation for sm_80 / sm_90."""

import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from ssgd_fused import reference as ref
from tests import shards as S
from tests.tolerances import DTYPES, GAUSS_TOL, TOL, describe

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DISTS = ["gaussian", "rademacher", "uniform"]
SHAPES = [(1,), (3,), (4097,), (5, 3, 3, 3), (129, 7)]  # odd sizes; <= 1e4 elements for the interpreter
# the filter scope's norm pass runs a program per row: no 4097-row vector in the interpreter
SHAPES_FILTER = [(1,), (3,), (3, 1365), (5, 3, 3, 3), (129, 7)]
SEED = 0xDEADBEEF12345678
TIDS = [3, 0, 17, 2**32 - 1, 5]


def K(name):
    return importlib.import_module(f"ssgd_fused.kernels.{name}")


def make(dtype, seed=0, positive=False, filter=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in SHAPES_FILTER if filter else SHAPES:
        t = torch.randn(s, generator=g)
        out.append((t.abs() if positive else t).to(dtype).to(DEVICE))
    return out


def cpu(ts):
    return [t.cpu() for t in ts]


def scales_for(params, dist, filter=False):
    w2, u2 = ref.norms(cpu(params), SEED, 5, TIDS, 0, dist, filter)
    return [s.to(DEVICE) for s in ref.scales_from_norms(w2, u2, [0.7] * len(params))]


def close(a, b, dtype, dist, scales):
    t = dict(TOL[dtype])
    if dist == "gaussian":
        t["atol"] = t["atol"] + 6 * GAUSS_TOL * max(float(s.abs().max()) for s in scales if s.numel())
    torch.testing.assert_close(a.cpu(), b.cpu(), **t)


FILTER = pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])


@FILTER
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_norms(dtype, dist, filter):
    params = make(dtype, filter=filter)
    w2, u2 = K("norms").norms(params, SEED, 5, TIDS, 0, dist, filter)
    rw2, ru2 = ref.norms(cpu(params), SEED, 5, TIDS, 0, dist, filter)
    for a, b, c, d in zip(w2, rw2, u2, ru2):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=0)
        torch.testing.assert_close(c.cpu(), d, rtol=1e-6 if dist == "gaussian" else 1e-6, atol=0)


@FILTER
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_perturb_and_restore(dtype, dist, filter):
    params = make(dtype, filter=filter)
    scales = scales_for(params, dist, filter)
    scales[1] = torch.empty(0, dtype=torch.float64, device=DEVICE)
    got, want = [p.clone() for p in params], cpu(params)
    K("perturb").perturb_(got, scales, -2.0, SEED, 5, TIDS, 0, dist, filter)
    ref.perturb_(want, cpu(scales), -2.0, SEED, 5, TIDS, 0, dist, filter)
    for a, b in zip(got, want):
        close(a, b, dtype, dist, scales)
    # restore from poisoned outputs with sources, grads halved
    grads = make(dtype, seed=1, filter=filter)
    out = [torch.full_like(p, float("nan")) for p in params]
    wg = cpu(grads)
    K("perturb").restore_(out, grads, scales, 0.0, 0.5, SEED, 5, TIDS, 0, dist, filter, sources=params)
    ref.restore_(want, wg, cpu(scales), 0.0, 0.5, SEED, 5, TIDS, 0, dist, filter, sources=cpu(params))
    for a, b, ga, gb in zip(out, want, grads, wg):
        assert torch.equal(a.cpu(), b)
        assert torch.equal(ga.cpu(), gb)


@FILTER
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_restore_update_sgd(dtype, dist, filter):
    params, grads, bufs = make(dtype, 0, False, filter), make(dtype, 1, False, filter), make(dtype, 2, False, filter)
    scales = scales_for(params, dist, filter)
    init = [i % 2 == 0 for i in range(len(params))]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False,
              init_momentum=init)
    rows = [ref.num_slices(p, filter) for p in params]
    nw = [torch.full((r,), float("nan"), dtype=torch.float64, device=DEVICE) for r in rows]
    nu = [torch.full((r,), float("nan"), dtype=torch.float64, device=DEVICE) for r in rows]
    outs = []
    for mod, dev in ((K("sgd"), DEVICE), (ref, "cpu")):
        p, g = [x.clone().to(dev) for x in params], [x.clone().to(dev) for x in grads]
        b = [torch.full_like(x, float("nan")).to(dev) if i else x.clone().to(dev) for x, i in zip(bufs, init)]
        w2 = [t.clone().to(dev) for t in nw]
        u2 = [t.clone().to(dev) for t in nu]
        mod.restore_update_sgd_(p, g, b, [s.to(dev) for s in scales], 1.0, 0.5, SEED, 5, TIDS, 0, dist, filter,
                                None, next_w_sq=w2, next_u_sq=u2, next_step=6, **kw)
        outs.append((p, g, b, w2, u2))
    for k in range(5):
        for a, b in zip(outs[0][k], outs[1][k]):
            assert not a.isnan().any(), k
            if k == 0:
                close(a, b, dtype, dist, scales)
            elif k >= 3:
                torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)
            else:
                torch.testing.assert_close(a.cpu(), b, **TOL[dtype])


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_restore_update_adam(dtype, dist, amsgrad):
    filter = amsgrad  # both scopes, without doubling the interpreter's time
    params, grads = make(dtype, 0, False, filter), make(dtype, 1, False, filter)
    m0, v0, x0 = (make(dtype, 2, False, filter), make(dtype, 3, True, filter), make(dtype, 4, True, filter))
    scales = scales_for(params, dist, filter)
    kw = dict(steps=[float(i + 1) for i in range(len(params))], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=1e-2, decoupled_weight_decay=True, amsgrad=amsgrad, maximize=False)
    outs = []
    for mod, dev in ((K("adam"), DEVICE), (ref, "cpu")):
        t = lambda xs: [x.clone().to(dev) for x in xs]  # noqa: E731
        p, g, m, v, x = t(params), t(grads), t(m0), t(v0), t(x0)
        mod.restore_update_adam_(p, g, m, v, x if amsgrad else [], [s.to(dev) for s in scales], 1.0, 0.5, SEED, 5,
                                 TIDS, 0, dist, filter, None, **kw)
        outs.append((p, g, m, v, x))
    for k in range(5):
        for a, b in zip(outs[0][k], outs[1][k]):
            if k == 0:
                close(a, b, dtype, dist, scales)
            else:
                torch.testing.assert_close(a.cpu(), b, **TOL[dtype])


# ---- sharded tensors: element_offsets ---------------------------------------------------------------
def launchers():
    """The Triton launchers as an op module (the reference's names and signatures)."""
    return types.SimpleNamespace(norms=K("norms").norms, perturb_=K("perturb").perturb_,
                                 restore_=K("perturb").restore_, restore_update_sgd_=K("sgd").restore_update_sgd_,
                                 restore_update_adam_=K("adam").restore_update_adam_)


@pytest.mark.parametrize("op", list(S.CHECKS))
@FILTER
@pytest.mark.parametrize("dist", DISTS)
def test_sharded_equals_full(op, dist, filter):
    """Each op on row-shards (offsets 0, 1, 3, 5, 127, 129, 4099, 35, 63, 387, ...) gives the full
    tensor's slice: the shards' chunks lie on the full tensor's BLOCK boundaries, the first one
    partly masked (values exact for the integer streams; norms the shards' sums / rows)."""
    p = S.Problem(S.FEW_ROWS if filter else S.SMALL, torch.float32, dist, filter, device=DEVICE)
    S.CHECKS[op](launchers(), p)


@pytest.mark.parametrize("dist", DISTS)
def test_sharded_perturb_bfloat16(dist):
    S.check_perturb(launchers(), S.Problem(S.FEW_ROWS, torch.bfloat16, dist, True, device=DEVICE))


@FILTER
@pytest.mark.parametrize("dist", DISTS)
def test_far_offsets_match_the_reference(dist, filter):
    """Offsets above 2**32 blocks and at the end of the counter range, against the reference."""
    g = torch.Generator().manual_seed(0)
    # filter scope: a program per row in the interpreter, so the long tensor gets 3 rows, not 1500
    params = [torch.randn(s, generator=g).to(DEVICE) for s in ((7, 13), (3, 500) if filter else (1500,), (3,))]
    top = (128 if dist == "rademacher" else 4) << 48
    offs, tids = [2**34 + 1, 2**40 + 4099, top - 3], [1, 2, 3]
    w2, u2 = K("norms").norms(params, SEED, 5, tids, 0, dist, filter, offs)
    rw2, ru2 = ref.norms(cpu(params), SEED, 5, tids, 0, dist, filter, offs)
    for a, b in zip(w2 + u2, rw2 + ru2):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)
    scales = ref.scales_from_norms(rw2, ru2, [0.5] * 3)
    got, want = [p.clone() for p in params], cpu(params)
    K("perturb").perturb_(got, [s.to(DEVICE) for s in scales], 1.0, SEED, 5, tids, 0, dist, filter, None, offs)
    ref.perturb_(want, scales, 1.0, SEED, 5, tids, 0, dist, filter, None, offs)
    for a, b in zip(got, want):
        close(a, b, torch.float32, dist, scales)


def test_bad_element_offsets_named():
    p = [torch.randn(6, 5).to(DEVICE), torch.randn(13).to(DEVICE)]
    s = [torch.ones(1, dtype=torch.float64, device=DEVICE)] * 2
    for offs, match in (([0], "element_offsets has 1 entries for 2 params"),
                        ([0, -1], r"element_offsets\[1\] must be >= 0"),
                        ([0, (4 << 48) - 12], r"element_offsets\[1\] \+ numel = .* exceeds")):
        with pytest.raises(ValueError, match=match):
            K("norms").norms(p, 0, 0, [0, 1], 0, "gaussian", False, offs)
        with pytest.raises(ValueError, match=match):
            K("perturb").perturb_(p, s, 1.0, 0, 0, [0, 1], 0, "uniform", False, None, offs)


def test_one_launch_per_pass_whatever_the_tensor_count(monkeypatch):
    """Multi-tensor: a list of 40 tensors costs one kernel launch per pass and dtype."""
    perturb = K("perturb")
    launches = []
    real = perturb._perturb

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(perturb, "_perturb", Counting())
    params = [torch.randn(37 + i).to(DEVICE) for i in range(40)]
    scales = [torch.full((1,), 0.01, dtype=torch.float64, device=DEVICE) for _ in params]
    perturb.perturb_(params, scales, 1.0, 1, 0, list(range(40)), 0, "rademacher", False)
    assert len(launches) == 1


def test_aot_compiles_for_sm80_and_sm90():
    """Every kernel and configuration compiles to PTX and cubin (catches what the interpreter lets
    through); registers and spills come from the cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "ssgd_fused.kernels.aot", "--arch", "80", "90", "--json"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * (3 * 3 * 5 + 1)
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    for row in rows:
        assert row["ptx_bytes"] > 0
        if row["registers"] is not None:
            assert row["registers"] <= 255


def test_launch_tables_are_uploaded_once_and_reused():
    """A pass with the same tensors reuses its uploaded tables (nothing goes to the device again);
    a different tensor (another address) gets its own table, and the results stay right."""
    from ssgd_fused.kernels import _tables as T

    params = make(torch.float32)
    scales = scales_for(params, "rademacher")
    T._TABLES.clear()
    K("perturb").perturb_(params, scales, 1.0, SEED, 5, TIDS, 0, "rademacher", False)
    first = dict(T._TABLES)
    K("perturb").perturb_(params, scales, -1.0, SEED, 5, TIDS, 0, "rademacher", False)
    assert dict(T._TABLES).keys() == first.keys() and all(T._TABLES[k] is first[k] for k in first)
    moved = [p.clone() for p in params]
    K("perturb").perturb_(moved, scales, 1.0, SEED, 5, TIDS, 0, "rademacher", False)
    assert len(T._TABLES) == len(first) + 1  # new addresses: a new pointer table, the same chunk table
    want = cpu(moved)
    ref.perturb_(want, cpu(scales), -1.0, SEED, 5, TIDS, 0, "rademacher", False)
    K("perturb").perturb_(moved, scales, -1.0, SEED, 5, TIDS, 0, "rademacher", False)
    for a, b in zip(moved, want):
        close(a, b, torch.float32, "rademacher", scales)
