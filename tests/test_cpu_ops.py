"""The C++ CPU ops against the pure-PyTorch reference: every op, ISA, dtype, distribution, scope."""

import pytest
import torch

from ssgd_fused import ops
from ssgd_fused import reference as ref
from tests import shards as S
from tests.helpers import require_cpp
from tests.tolerances import DTYPES, GAUSS_TOL, TOL, describe

pytestmark = pytest.mark.cpp

DISTS = ["gaussian", "rademacher", "uniform"]
# odd sizes, a conv weight, a matrix with odd rows for the filter scope
SHAPES = [(1,), (3,), (4097,), (65537,), (5, 3, 3, 3), (7, 129)]
SEED = 0xDEADBEEF12345678  # above 2**63: exercises the unsigned seed


def _isas():
    if not ops.cpp_available():
        return ["unavailable"]
    return ops._C.supported_isas()


@pytest.fixture(params=_isas())
def isa(request):
    require_cpp()
    before = ops._C.isa()
    ops._C.set_isa(request.param)
    yield request.param
    ops._C.set_isa(before)


@pytest.fixture
def cpp():
    require_cpp()


def make_params(shapes, dtype, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def noise_tol(dtype, scales, dist):
    """Allowed |fused - reference| on a displaced weight: the dtype's rounding, plus the spec's
    gaussian tolerance carried through the scale (|z| <= 6 for float32 Box-Muller)."""
    t = dict(TOL[dtype])
    if dist == "gaussian":
        t["atol"] = t["atol"] + 6 * GAUSS_TOL * max(float(s.abs().max()) for s in scales if s.numel())
    return t


def scales_for(params, dist, filter, alpha=0.7):
    w2, u2 = ref.norms(params, SEED, 5, list(range(len(params))), 0, dist, filter)
    return ref.scales_from_norms(w2, u2, [alpha] * len(params))


# ---- the noise streams -------------------------------------------------------------------------
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("n", [1, 3, 127, 129, 4097, 65537])
def test_noise_stream_matches_spec(isa, dist, n):
    out = ops.noise(n, SEED, 2**32 + 3, 11, 2, dist)
    want = ref.noise_like(torch.empty(n), SEED, 2**32 + 3, 11, 2, dist)
    if dist == "gaussian":
        err = (out - want).abs() / want.abs().clamp(min=1)
        assert err.max().item() <= GAUSS_TOL
    else:
        assert torch.equal(out, want)


def test_gaussian_error_over_many_values(isa):
    """The polynomial Box-Muller over 2**20 values stays within the spec tolerance."""
    n = 1 << 20
    out = ops.noise(n, 7, 0, 0, 0, "gaussian")
    want = ref.noise_like(torch.empty(n), 7, 0, 0, 0, "gaussian")
    assert ((out - want).abs() / want.abs().clamp(min=1)).max().item() <= GAUSS_TOL


# ---- norms ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_norms(isa, dtype, dist, filter):
    params = make_params(SHAPES, dtype)
    tids = [3, 0, 17, 2**32 - 1, 5, 9]
    w2, u2 = ops.norms(params, SEED, 5, tids, 0, dist, filter)
    rw2, ru2 = ref.norms(params, SEED, 5, tids, 0, dist, filter)
    for a, b, c, d in zip(w2, rw2, u2, ru2):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        torch.testing.assert_close(c, d, rtol=1e-6 if dist == "gaussian" else 1e-12, atol=0)


# ---- 16-bit rounding on every path ----------------------------------------------------------------
# Per format: the exponent range of ordinary values, the scale that lands float32 sums on the
# format's subnormals (float32 subnormals for bfloat16, whose range is float32's), a value near the
# largest finite one, and the smallest normal.
SPECIAL = {
    torch.float32: dict(exps=(-140, 120), tiny=2.0**-130, big=3.3e38, min_normal=2.0**-126, nan=0x7F800000,
                        payloads=0x800000, bits=torch.int32),
    torch.bfloat16: dict(exps=(-140, 120), tiny=2.0**-130, big=3.3e38, min_normal=2.0**-126, nan=0x7F80,
                         payloads=0x80, bits=torch.int16),
    torch.float16: dict(exps=(-28, 17), tiny=2.0**-20, big=65000.0, min_normal=2.0**-14, nan=0x7C00,
                        payloads=0x400, bits=torch.int16),
}


def _special(n, seed, dtype):
    """Values of a 16-bit dtype that stress the rounding: subnormals, zeros of both signs,
    infinities, NaN (also with payloads, which the hardware conversions keep and the generic loops
    do not), the largest finite values, values halfway between two neighbours, ordinary ones."""
    c = SPECIAL[dtype]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(*c["exps"], (n,), generator=g).float())
    x[::7] = torch.randn(x[::7].shape, generator=g) * c["tiny"]
    x[1::11] = float("nan")
    x[2::13] = float("inf")
    x[3::17] = -0.0
    x[4::19] = c["big"]
    x = x.to(dtype)
    # exponent all ones, then a non-zero payload, the quiet bit (its top bit) set or not, either sign
    payload = torch.randint(1, c["payloads"], x[5::23].shape, generator=g)
    sign = -(2 ** (8 * x.element_size() - 1))
    x.view(c["bits"])[5::23] = (c["nan"] | payload | torch.where(payload % 2 == 0, sign, 0)).to(c["bits"])
    return x


def _on_every_path(run, near_reference=()):
    """run(ops module) -> list of tensors, on every ISA and the reference. The ISAs' results are
    bitwise equal: 16-bit ones NaN payloads included (their stores canonicalise NaN), float32 ones
    with NaN in the same places (a float32 NaN keeps whichever operand's payload the instruction
    propagates, which differs between vector and scalar code). The reference's are the same bits
    wherever they are not NaN, except for the outputs numbered in near_reference: within 1 ulp in
    16 bits, 16 in float32 (Adam's weights: torch's vectorised sqrt, in the reference, is not
    correctly rounded, and a weight and its step that nearly cancel magnify that ulp)."""
    isas = ops._C.supported_isas()
    outs = {}
    for name in isas + ["reference"]:
        if name != "reference":
            ops._C.set_isa(name)
        try:
            outs[name] = run(ref if name == "reference" else ops)
        finally:
            ops._C.set_isa(isas[0])
    bits = lambda t: t.view(SPECIAL[t.dtype]["bits"])  # noqa: E731
    for name in isas:
        for a, b in zip(outs[name], outs[isas[-1]]):
            if a.element_size() == 2:
                assert torch.equal(bits(a), bits(b)), name
            else:
                assert torch.equal(a.isnan(), b.isnan()), name
                assert torch.equal(bits(a)[~a.isnan()], bits(b)[~b.isnan()]), name
    for k, (a, b) in enumerate(zip(outs[isas[0]], outs["reference"])):  # torch propagates NaN payloads its own way
        assert torch.equal(a.isnan(), b.isnan())
        ulps = (bits(a)[~a.isnan()].long() - bits(b)[~b.isnan()].long()).abs()
        assert ulps.max() <= ((1 if a.element_size() == 2 else 16) if k in near_reference else 0), k
    return outs[isas[0]]


def _adam_step(mod, w, g, m, v, x, s, amsgrad, wd, decoupled, beta1=0.9, maximize=False):
    mod.restore_update_adam_([w], [g], [m], [v], [x] if amsgrad else [], s, -1.0, 0.5, SEED, 5, [0], 0, "rademacher",
                             False, None, steps=[3.0], lr=2.0**-5, beta1=beta1, beta2=0.999, eps=1e-8,
                             weight_decay=wd, decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)


LP16 = [torch.bfloat16, torch.float16]  # the hand-written AVX-512 loops; float32 checks the generic loop


@pytest.mark.parametrize("dtype", [torch.float32] + LP16, ids=describe)
@pytest.mark.parametrize("amsgrad, wd, decoupled", [(False, 0.0, False), (True, 1e-2, False), (False, 1e-2, True)],
                         ids=["adam", "adam_wd_ams", "adamw"])
@pytest.mark.parametrize("beta1, maximize", [(0.9, False), (0.3, True)], ids=["lerp_from_m", "lerp_from_g_max"])
def test_adam_paths_agree_bitwise_on_special_values(cpp, dtype, amsgrad, wd, decoupled, beta1, maximize):
    """As below, for the Adam / AdamW update loop, on both forms of ATen's lerp (1 - beta1 below
    0.5 or not), so that the reference's bits check the generic loop too: the moments bit for bit,
    the weights within an ulp (torch's vectorised sqrt, in the reference, is not correctly rounded)."""
    src = [_special(4097, k, dtype) for k in (1, 2, 3, 4, 5)]
    src[3] = src[3].abs()  # exp_avg_sq and max_exp_avg_sq: non-negative, as Adam keeps them
    src[4] = src[4].abs()
    s = [torch.full((1,), SPECIAL[dtype]["tiny"], dtype=torch.float64)]

    def run(mod):
        w, g, m, v, x = (t.clone() for t in src)
        _adam_step(mod, w, g, m, v, x, s, amsgrad, wd, decoupled, beta1, maximize)
        return [w, g, m, v, x]

    _on_every_path(run, near_reference=(0,))


@pytest.mark.parametrize("dtype", [torch.float32] + LP16, ids=describe)
@pytest.mark.parametrize("nesterov", [False, True])
def test_paths_agree_bitwise_on_special_values(cpp, dtype, nesterov):
    """The AVX-512 16-bit loops (vcvtneps2bf16 where the CPU has AVX512_BF16, vcvtps2ph) round
    exactly as the auto-vectorised loops (the other ISAs) and the reference: subnormals, NaN,
    infinities, overflow, ties; in float32 the generic loops of every ISA agree with the reference
    bit for bit. (NaN payloads may differ from torch's, which propagates them differently.)"""
    # values whose sums and products land on subnormals, ties and overflow once rounded
    w0, g0, b0 = _special(4097, 1, dtype), _special(4097, 2, dtype), _special(4097, 3, dtype)
    s = [torch.full((1,), SPECIAL[dtype]["tiny"], dtype=torch.float64)]

    def run(mod):
        w, g, b = w0.clone(), g0.clone(), b0.clone()
        mod.perturb_([w], s, 1.0, SEED, 5, [0], 0, "rademacher", False)
        p = w.clone()
        mod.restore_update_sgd_([w], [g], [b], s, -1.0, 0.5, SEED, 5, [0], 0, "rademacher", False, None,
                                lr=2.0**-3, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=nesterov,
                                maximize=False, init_momentum=[False])
        return [p, w, g, b]

    p = _on_every_path(run)[0]
    tiny = (p.float().abs() < SPECIAL[dtype]["min_normal"]).logical_and(p != 0)
    assert p.isnan().any() and tiny.any() and p.isinf().any()  # the cases occur


# ---- perturb_ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
@pytest.mark.parametrize("coef", [1.0, -2.0])
def test_perturb_in_place(isa, dtype, dist, filter, coef):
    params = make_params(SHAPES, dtype)
    scales = scales_for(params, dist, filter)
    scales[1] = torch.empty(0, dtype=torch.float64)  # a tensor without noise is left alone
    tids = list(range(len(params)))
    got = [p.clone() for p in params]
    want = [p.clone() for p in params]
    ops.perturb_(got, scales, coef, SEED, 5, tids, 0, dist, filter)
    ref.perturb_(want, scales, coef, SEED, 5, tids, 0, dist, filter)
    assert torch.equal(got[1], params[1])
    for a, b in zip(got, want):
        if dist == "gaussian":
            torch.testing.assert_close(a, b, **noise_tol(dtype, scales, dist))
        else:  # integer streams: the same float32 arithmetic, the same roundings
            assert torch.equal(a, b)


@pytest.mark.parametrize("sources", [False, True], ids=["in_place", "sources"])
@pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_perturb_norms_moves_as_perturb_and_measures_as_norms(isa, dtype, dist, filter, sources):
    """perturb_norms_ returns ||w||^2 of what it displaces, bitwise as norms and the update ops'
    next_w_sq sum it (the cycle compares them for equality), and moves the weights as perturb_."""
    clean = make_params(SHAPES, dtype)
    scales = scales_for(clean, dist, filter)
    tids = list(range(len(clean)))
    src = [p.clone() for p in clean] if sources else None
    got = [torch.full_like(p, float("nan")) for p in clean] if sources else [p.clone() for p in clean]
    moved = [p.clone() for p in clean]
    w_sq = [torch.full((ref.num_slices(p, filter),), float("nan"), dtype=torch.float64) for p in clean]  # poisoned
    ops.perturb_norms_(got, w_sq, scales, -1.0, SEED, 5, tids, 0, dist, filter, sources=src)
    ops.perturb_(moved, scales, -1.0, SEED, 5, tids, 0, dist, filter)
    for a, b in zip(got, moved):
        assert torch.equal(a, b)
    want, _ = ops.norms(clean, SEED, 5, tids, 0, dist, filter)
    ref_w, _ = ref.norms(clean, SEED, 5, tids, 0, dist, filter)
    # the update pass's ||w||^2 of the weights it writes: restore + SGD with lr 0 leaves them as they are
    nw = [torch.empty(ref.num_slices(p, filter), dtype=torch.float64) for p in clean]
    nu = [torch.empty(ref.num_slices(p, filter), dtype=torch.float64) for p in clean]
    same = [p.clone() for p in clean]
    no_noise = [torch.empty(0, dtype=torch.float64)] * len(clean)
    ops.restore_update_sgd_(same, [torch.zeros_like(p) for p in clean], [], no_noise, 0.0, 1.0, SEED, 5, tids, 0,
                            dist, filter, None, 0.0, 0.0, 0.0, 0.0, False, False, [], nw, nu, 6)
    for a, b, c, r in zip(w_sq, want, nw, ref_w):
        assert a.dtype == torch.float64 and a.shape == b.shape
        assert torch.equal(a, b) and torch.equal(a, c)
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_perturb_from_sources_writes_every_element(isa, dtype, dist):
    clean = make_params(SHAPES, dtype)
    scales = scales_for(clean, dist, False)
    tids = list(range(len(clean)))
    got = [torch.full_like(p, float("nan")) for p in clean]  # poisoned: every element must be written
    want = [p.clone() for p in clean]
    ops.perturb_(got, scales, -1.0, SEED, 5, tids, 0, dist, False, sources=clean)
    ref.perturb_(want, scales, -1.0, SEED, 5, tids, 0, dist, False, sources=clean)
    for a, b in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, **noise_tol(dtype, scales, dist))
    # coef 0 with sources is an exact restore
    ops.perturb_(got, scales, 0.0, SEED, 5, tids, 0, dist, False, sources=clean)
    for a, c in zip(got, clean):
        assert torch.equal(a, c)


# ---- restore_ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_restore_scales_grads(isa, dtype, dist):
    params = make_params(SHAPES, dtype)
    grads = make_params(SHAPES, dtype, gen_seed=1)
    scales = scales_for(params, dist, True)
    tids = list(range(len(params)))
    gp, gg = [p.clone() for p in params], [g.clone() for g in grads]
    wp, wg = [p.clone() for p in params], [g.clone() for g in grads]
    ops.restore_(gp, gg, scales, 1.0, 0.5, SEED, 5, tids, 0, dist, True)
    ref.restore_(wp, wg, scales, 1.0, 0.5, SEED, 5, tids, 0, dist, True)
    for a, b in zip(gp, wp):
        torch.testing.assert_close(a, b, **noise_tol(dtype, scales, dist))
    for a, b in zip(gg, wg):
        assert torch.equal(a, b)  # halving is exact


def test_perturb_then_restore_round_trip(cpp):
    """+n, flip to -n, restore: back to the clean weights within a few ulp of |n|."""
    params = make_params(SHAPES, torch.float32)
    clean = [p.clone() for p in params]
    scales = scales_for(params, "gaussian", False, alpha=0.5)
    tids = list(range(len(params)))
    for coef in (1.0, -2.0, 1.0):
        ops.perturb_(params, scales, coef, SEED, 5, tids, 0, "gaussian", False)
    for p, c, s in zip(params, clean, scales):
        n_max = float(s) * 6
        assert (p - c).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * max(n_max, c.abs().max().item())


# ---- restore + SGD --------------------------------------------------------------------------------
SGD_CASES = [
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True),
    dict(lr=0.2, momentum=0.0, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False),
]


@pytest.mark.parametrize("case", SGD_CASES, ids=["nesterov_wd", "damp_max", "plain_wd"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
@pytest.mark.parametrize("exact", [False, True], ids=["regen", "exact"])
def test_restore_update_sgd(isa, dtype, dist, case, exact):
    clean = make_params(SHAPES, dtype)
    grads = make_params(SHAPES, dtype, gen_seed=1)
    bufs = make_params(SHAPES, dtype, gen_seed=2)
    scales = scales_for(clean, dist, False)
    scales[0] = torch.empty(0, dtype=torch.float64)
    tids = list(range(len(clean)))
    init = [i % 2 == 0 for i in range(len(clean))]
    displaced = [p.clone() for p in clean]
    ref.perturb_(displaced, scales, -1.0, SEED, 5, tids, 0, dist, False)
    sources = clean if exact else None
    coef = 0.0 if exact else 1.0
    outs = {}
    for name, mod in (("fused", ops), ("ref", ref)):
        p = [torch.full_like(c, float("nan")) if exact else d.clone() for c, d in zip(clean, displaced)]
        g = [x.clone() for x in grads]
        b = [torch.full_like(x, float("nan")) if i else x.clone() for x, i in zip(bufs, init)]  # poisoned when init
        mod.restore_update_sgd_(p, g, b, scales, coef, 0.5, SEED, 5, tids, 0, dist, False, sources,
                                init_momentum=init, **case)
        outs[name] = (p, g, b)
    tol = noise_tol(dtype, scales, dist) if not exact else TOL[dtype]
    for a, b in zip(outs["fused"][0], outs["ref"][0]):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(outs["fused"][1], outs["ref"][1]):
        assert torch.equal(a, b)
    if case["momentum"] != 0:
        for a, b in zip(outs["fused"][2], outs["ref"][2]):
            assert not a.isnan().any()
            torch.testing.assert_close(a, b, **TOL[dtype])


# ---- restore + Adam / AdamW ----------------------------------------------------------------------
ADAM_CASES = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
         amsgrad=False, maximize=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2, decoupled_weight_decay=False,
         amsgrad=True, maximize=True),
    dict(lr=1e-3, beta1=0.3, beta2=0.95, eps=1e-8, weight_decay=5e-2, decoupled_weight_decay=True,
         amsgrad=False, maximize=False),
]


@pytest.mark.parametrize("case", ADAM_CASES, ids=["adam", "adam_wd_ams_max", "adamw_lowbeta"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_restore_update_adam(isa, dtype, dist, case):
    clean = make_params(SHAPES, dtype)
    grads = make_params(SHAPES, dtype, gen_seed=1)
    m0 = make_params(SHAPES, dtype, gen_seed=2)
    v0 = [x.float().abs().to(dtype) for x in make_params(SHAPES, dtype, gen_seed=3)]
    x0 = [x.float().abs().to(dtype) for x in make_params(SHAPES, dtype, gen_seed=4)]
    scales = scales_for(clean, dist, True)
    tids = list(range(len(clean)))
    steps = [float(i + 1) for i in range(len(clean))]
    displaced = [p.clone() for p in clean]
    ref.perturb_(displaced, scales, -1.0, SEED, 5, tids, 0, dist, True)
    outs = {}
    for name, mod in (("fused", ops), ("ref", ref)):
        p, g = [d.clone() for d in displaced], [x.clone() for x in grads]
        m, v, x = [t.clone() for t in m0], [t.clone() for t in v0], [t.clone() for t in x0]
        mod.restore_update_adam_(p, g, m, v, x if case["amsgrad"] else [], scales, 1.0, 0.5, SEED, 5, tids, 0,
                                 dist, True, None, steps=steps, **case)
        outs[name] = (p, g, m, v, x)
    tol = noise_tol(dtype, scales, dist)
    for k, what in enumerate(("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")):
        for a, b in zip(outs["fused"][k], outs["ref"][k]):
            torch.testing.assert_close(a, b, **(tol if k == 0 else TOL[dtype]), msg=what)


# ---- determinism, errors, registration ------------------------------------------------------------
def assert_same_with_one_and_two_threads(run):
    """run() -> lists of tensors; bitwise equal whether torch uses 1 or 2 threads."""
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            results.append(run())
        finally:
            torch.set_num_threads(2)
    for a, b in zip(results[0], results[1]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_bitwise_identical_with_one_and_two_threads(cpp):
    shapes = [(3000, 77), (65537,), (9, 5, 3, 3)]

    def run():
        params = make_params(shapes, torch.float32)
        w2, u2 = ops.norms(params, SEED, 1, [0, 1, 2], 0, "gaussian", True)
        scales = ref.scales_from_norms(w2, u2, [0.5] * 3)
        grads = make_params(shapes, torch.float32, gen_seed=1)
        bufs = [torch.zeros_like(p) for p in params]
        ops.restore_update_sgd_(params, grads, bufs, scales, 1.0, 0.5, SEED, 1, [0, 1, 2], 0, "gaussian", True,
                                None, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True,
                                maximize=False, init_momentum=[False] * 3)
        return w2, u2, params, bufs

    assert_same_with_one_and_two_threads(run)


def test_isas_agree_on_norms(cpp):
    params = make_params(SHAPES, torch.float32)
    before = ops._C.isa()
    got = {}
    try:
        for name in ops._C.supported_isas():
            ops._C.set_isa(name)
            got[name] = ops.norms(params, SEED, 0, list(range(len(params))), 0, "gaussian", False)
    finally:
        ops._C.set_isa(before)
    first = next(iter(got.values()))
    for w2, u2 in got.values():
        for a, b in zip(w2 + u2, first[0] + first[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_unknown_isa_is_a_clear_error(cpp):
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        ops._C.set_isa("neon")


@pytest.mark.parametrize("bad,match", [
    (lambda p: [p[0].double()], "float32, bfloat16 and float16"),
    (lambda p: [p[0].t()], "contiguous"),
])
def test_bad_inputs_named(cpp, bad, match):
    params = [torch.randn(6, 5)]
    with pytest.raises(RuntimeError, match=match):
        ops.norms(bad(params), 0, 0, [0], 0, "gaussian", False)


def test_bad_scales_and_distribution(cpp):
    p = [torch.randn(6, 5)]
    with pytest.raises(RuntimeError, match="scales\\[0\\] has 1 entries, expected 6"):
        ops.perturb_(p, [torch.ones(1, dtype=torch.float64)], 1.0, 0, 0, [0], 0, "gaussian", True)
    with pytest.raises(RuntimeError, match="distribution"):
        ops.perturb_(p, [torch.ones(1, dtype=torch.float64)], 1.0, 0, 0, [0], 0, "laplace", False)
    with pytest.raises(RuntimeError, match="tensor_ids"):
        ops.perturb_(p, [torch.ones(1, dtype=torch.float64)], 1.0, 0, 0, [0, 1], 0, "gaussian", False)


def _opcheck_samples():
    p = [torch.randn(7, 5), torch.randn(13)]
    g = [torch.randn(7, 5), torch.randn(13)]
    s = [torch.full((1,), 0.01, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
    seed = ops.seed_to_i64(SEED)
    na = (seed, 3, [0, 1], 0, "gaussian", False)
    clone = lambda xs: [x.clone() for x in xs]  # noqa: E731
    return {
        "norms": (clone(p), *na),
        "perturb_": (clone(p), s, 1.0, *na, None),
        "perturb_norms_": (clone(p), [torch.empty(1, dtype=torch.float64) for _ in p], s, 1.0, *na, None),
        "restore_": (clone(p), clone(g), s, 1.0, 0.5, *na, clone(p)),
        "restore_update_sgd_": (clone(p), clone(g), clone(g), s, 1.0, 0.5, *na, None, 0.1, 0.9, 0.0, 1e-4, True,
                                False, [True, False], [], [], 0),
        "restore_update_adam_": (clone(p), clone(g), clone(g), [x.abs() for x in g], [], s, 1.0, 0.5, *na, None,
                                 [1.0, 2.0], 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, [], [], 0),
    }


@pytest.mark.parametrize("name", ["norms", "perturb_", "perturb_norms_", "restore_", "restore_update_sgd_",
                                  "restore_update_adam_"])
def test_opcheck(cpp, name):
    args = _opcheck_samples()[name]
    torch.library.opcheck(getattr(torch.ops.ssgd_fused, name), args)


@pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("which", ["sgd", "adam"])
def test_update_also_measures_next_step_norms(isa, which, dist, filter):
    """The update ops' next_w_sq / next_u_sq equal a norms pass over the updated weights with the
    next step's stream; entries of size 0 are skipped (poisoned outputs prove every row written)."""
    params = make_params(SHAPES, torch.float32)
    grads = make_params(SHAPES, torch.float32, gen_seed=1)
    scales = scales_for(params, dist, filter)
    tids = list(range(len(params)))
    rows = [ref.num_slices(p, filter) for p in params]
    rows[2] = 0
    nw = [torch.full((r,), float("nan"), dtype=torch.float64) for r in rows]
    nu = [torch.full((r,), float("nan"), dtype=torch.float64) for r in rows]
    common = (scales, 1.0, 0.5, SEED, 5, tids, 0, dist, filter, None)
    if which == "sgd":
        ops.restore_update_sgd_(params, grads, [torch.zeros_like(p) for p in params], *common, lr=0.1, momentum=0.9,
                                dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                                init_momentum=[True] * len(params), next_w_sq=nw, next_u_sq=nu, next_step=6)
    else:
        z = [torch.zeros_like(p) for p in params]
        ops.restore_update_adam_(params, grads, z, [torch.zeros_like(p) for p in params], [], *common,
                                 steps=[1.0] * len(params), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False, maximize=False,
                                 next_w_sq=nw, next_u_sq=nu, next_step=6)
    w2, u2 = ops.norms(params, SEED, 6, tids, 0, dist, filter)
    for i in range(len(params)):
        if rows[i] == 0:
            assert nw[i].numel() == 0
            continue
        torch.testing.assert_close(nw[i], w2[i], rtol=1e-12, atol=0)
        torch.testing.assert_close(nu[i], u2[i], rtol=1e-12, atol=0)


def test_opcheck_with_next_norms(cpp):
    p = [torch.randn(7, 5), torch.randn(13)]
    g = [torch.randn(7, 5), torch.randn(13)]
    s = [torch.full((1,), 0.01, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
    nw = [torch.empty(1, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
    nu = [torch.empty(1, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
    args = (p, g, [torch.zeros_like(x) for x in g], s, 1.0, 0.5, 3, 3, [0, 1], 0, "gaussian", False, None, 0.1, 0.9,
            0.0, 0.0, False, False, [True, True], nw, nu, 4)
    torch.library.opcheck(torch.ops.ssgd_fused.restore_update_sgd_, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=describe)
def test_16bit_conversions_exhaustive(isa, dtype):
    """The kernels' own 16-bit <-> float conversions: every 16-bit pattern survives a round trip
    (NaN stays NaN), and float results round to nearest even exactly as torch's .to(dtype),
    through overflow to inf and the subnormal range."""
    h = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(dtype)
    out = torch.full_like(h, float("nan"))
    no_noise = [torch.empty(0, dtype=torch.float64)]
    ops.perturb_([out], no_noise, 0.0, 0, 0, [0], 0, "gaussian", False, sources=[h])
    same = (out.view(torch.int16) == h.view(torch.int16)) | (h.isnan() & out.isnan())
    assert bool(same.all())
    finite = h[torch.isfinite(h)]
    for scale in (1.0, 0.1, 3.3e-5, 1e4, 7e-8, 1.7e38):
        grads = finite.clone()
        ops.restore_([torch.zeros_like(grads)], [grads], no_noise, 0.0, scale, 0, 0, [0], 0, "gaussian", False)
        want = (finite.float() * scale).to(dtype)
        ok = (grads.view(torch.int16) == want.view(torch.int16)) | (want.isnan() & grads.isnan())
        assert bool(ok.all()), (scale, int((~ok).sum()))


# ---- sharded tensors: element_offsets ---------------------------------------------------------------
FILTER = pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])


@pytest.mark.parametrize("op", list(S.CHECKS))
@FILTER
@pytest.mark.parametrize("dist", DISTS)
def test_sharded_equals_full(isa, op, dist, filter):
    """Each op on row-shards (offsets 0, 1, 3, 5, 127, 129, 4099, 35, 63, 40002, ...: inside 4- and
    128-element Philox blocks, shards spanning several work items) gives the full tensor's slice:
    values exact for the integer streams, norms the shards' sums (tensor) or rows (filter)."""
    S.CHECKS[op](ops, S.Problem(list(S.CASES), torch.float32, dist, filter))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe)
@pytest.mark.parametrize("dist", DISTS)
def test_sharded_perturb_16bit(isa, dtype, dist):
    S.check_perturb(ops, S.Problem(S.SMALL, dtype, dist, True))


@pytest.mark.parametrize("dist", DISTS)
def test_noise_element_offset(isa, dist):
    for k in (0, 1, 3, 5, 127, 128, 129, 4099, 40001):
        for n in (1, 3, 130, 40000):
            out = ops.noise(n, SEED, 7, 3, 1, dist, k)
            assert torch.equal(out, ops.noise(k + n, SEED, 7, 3, 1, dist)[k:]), (k, n)
    # far offsets (blocks above 2**32, the last blocks of the counter range) against the reference
    top = (128 if dist == "rademacher" else 4) << 48
    for k in (2**34 + 3, top - 1000):
        out = ops.noise(1000, SEED, 7, 3, 1, dist, k)
        want = ref.noise_like(torch.empty(1000), SEED, 7, 3, 1, dist, k)
        torch.testing.assert_close(out, want, rtol=0, atol=GAUSS_TOL * 6 if dist == "gaussian" else 0)


@pytest.mark.parametrize("dist", DISTS)
def test_far_offsets_match_the_reference(isa, dist):
    """Offsets above 2**32 blocks and at the end of the counter range: norms and perturb_ against the
    reference (which generates only the blocks it needs)."""
    params = make_params([(7, 13), (65537,), (3,)], torch.float32)
    top = (128 if dist == "rademacher" else 4) << 48
    offs = [2**34 + 1, 2**40 + 4099, top - 3]
    tids = [1, 2, 3]
    for filter in (False, True):
        w2, u2 = ops.norms(params, SEED, 5, tids, 0, dist, filter, offs)
        rw2, ru2 = ref.norms(params, SEED, 5, tids, 0, dist, filter, offs)
        for a, b in zip(w2 + u2, rw2 + ru2):
            torch.testing.assert_close(a, b, rtol=1e-6 if dist == "gaussian" else 1e-12, atol=0)
        scales = ref.scales_from_norms(rw2, ru2, [0.5] * 3)
        got, want = [p.clone() for p in params], [p.clone() for p in params]
        ops.perturb_(got, scales, 1.0, SEED, 5, tids, 0, dist, filter, None, offs)
        ref.perturb_(want, scales, 1.0, SEED, 5, tids, 0, dist, filter, None, offs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **noise_tol(torch.float32, scales, dist))


def test_sharded_bitwise_identical_with_one_and_two_threads(cpp):
    shapes = [(3000, 77), (65537,), (9, 5, 3, 3)]
    offs = [3 * 77 * 1000 + 5, 129, 4099]

    def run():
        out = []
        for dist, filter in (("gaussian", True), ("gaussian", False), ("uniform", False)):
            params = make_params(shapes, torch.float32)
            w2, u2 = ops.norms(params, SEED, 1, [0, 1, 2], 0, dist, filter, offs)
            scales = ref.scales_from_norms(w2, u2, [0.5] * 3)
            grads = make_params(shapes, torch.float32, gen_seed=1)
            bufs = [torch.zeros_like(p) for p in params]
            nw = [torch.empty(ref.num_slices(p, filter), dtype=torch.float64) for p in params]
            nu = [torch.empty(ref.num_slices(p, filter), dtype=torch.float64) for p in params]
            ops.restore_update_sgd_(params, grads, bufs, scales, 1.0, 0.5, SEED, 1, [0, 1, 2], 0, dist, filter, None,
                                    lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True,
                                    maximize=False, init_momentum=[False] * 3, next_w_sq=nw, next_u_sq=nu,
                                    next_step=2, element_offsets=offs)
            out += [w2, u2, params, bufs, nw, nu]
        return out

    assert_same_with_one_and_two_threads(run)


def test_offsets_none_and_zeros_are_bit_identical(isa):
    params = make_params(SHAPES, torch.float32)
    tids = list(range(len(params)))
    for dist in DISTS:
        for filter in (False, True):
            a = ops.norms(params, SEED, 5, tids, 0, dist, filter)
            b = ops.norms(params, SEED, 5, tids, 0, dist, filter, [0] * len(params))
            for x, y in zip(a[0] + a[1], b[0] + b[1]):
                assert torch.equal(x, y)
            scales = ref.scales_from_norms(*a, [0.5] * len(params))
            x, y = [p.clone() for p in params], [p.clone() for p in params]
            ops.perturb_(x, scales, 1.0, SEED, 5, tids, 0, dist, filter)
            ops.perturb_(y, scales, 1.0, SEED, 5, tids, 0, dist, filter, None, [0] * len(params))
            assert all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.mark.parametrize("offs,match", [
    ([0], "element_offsets has 1 entries for 2 params"),
    ([0, -1], "element_offsets\\[1\\] must be >= 0"),
    ([0, (4 << 48) - 12], "element_offsets\\[1\\] \\+ numel .* exceeds the spec's counter range"),
])
def test_bad_element_offsets_named(cpp, offs, match):
    p = [torch.randn(6, 5), torch.randn(13)]
    s = [torch.ones(1, dtype=torch.float64)] * 2
    with pytest.raises(RuntimeError, match=match):
        ops.norms(p, 0, 0, [0, 1], 0, "gaussian", False, offs)
    with pytest.raises(RuntimeError, match=match):
        ops.perturb_(p, s, 1.0, 0, 0, [0, 1], 0, "uniform", False, None, offs)
    with pytest.raises(RuntimeError, match=match):
        ops.restore_update_sgd_(p, [x.clone() for x in p], [], s, 1.0, 1.0, 0, 0, [0, 1], 0, "gaussian", False, None,
                                0.1, 0.0, 0.0, 0.0, False, False, [], element_offsets=offs)
    assert ops.norms(p, 0, 0, [0, 1], 0, "rademacher", False, [0, (4 << 48) - 12])  # rademacher: 128 * 2**48
    with pytest.raises(RuntimeError, match="element_offset must be >= 0"):
        ops.noise(4, 0, 0, 0, 0, "gaussian", -1)
    with pytest.raises(RuntimeError, match="element_offset \\+ numel"):
        ops.noise(4, 0, 0, 0, 0, "gaussian", (4 << 48) - 3)


@pytest.mark.parametrize("name", ["norms", "perturb_", "restore_", "restore_update_sgd_", "restore_update_adam_"])
def test_opcheck_with_element_offsets(cpp, name):
    args = _opcheck_samples()[name] + ([5, 2**34 + 3],)
    if name.startswith("restore_update"):  # with the next step's norms, which take the offsets too
        nw = [torch.empty(1, dtype=torch.float64), torch.empty(0, dtype=torch.float64)]
        args = args[:-4] + (nw, [t.clone() for t in nw], 4, args[-1])
    torch.library.opcheck(getattr(torch.ops.ssgd_fused, name), args)
