"""One op contract: the schemas (ssgd_fused.ops.SCHEMAS) name the arguments, in order, of the
reference functions, the ops' Python wrappers and the Triton launchers; the CUDA registration
(`fn(*args)` in the schema's order) runs end to end, in triton's interpreter on CPU tensors when
there is no GPU, against the reference."""

import inspect

import pytest
import torch

from ssgd_fused import ops
from ssgd_fused import reference as ref
from tests import shards as S
from tests.tolerances import GAUSS_TOL, TOL


def schema_names(name):
    return [a.name for a in getattr(torch.ops.ssgd_fused, name).default._schema.arguments]


def param_names(fn):
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_signatures_follow_the_schema(name):
    want = schema_names(name)
    assert param_names(getattr(ops, name)) == want, "ssgd_fused.ops wrapper"
    if name != "noise":  # the reference's noise is ssgd_fused.noise.generate / reference.noise_like
        assert param_names(getattr(ref, name)) == want, "ssgd_fused.reference"
    if name in ops.KERNEL_MODULES:
        pytest.importorskip("triton")
        assert param_names(ops.triton_launcher(name)) == want, "Triton launcher"


def test_every_op_but_noise_has_a_cuda_implementation():
    assert set(ops.KERNEL_MODULES) == set(ops.SCHEMAS) - {"noise"}


# ---- the CUDA registration path, end to end -----------------------------------------------------
SEED, STEP, TIDS = 0x0123456789ABCDEF, 7, [4, 0, 9]
SHAPES = [(3,), (129, 7), (5, 3, 3)]


def _cuda_call(name, *args):
    """The dispatcher's CUDA implementation: on CUDA tensors when there is a GPU; without one, the
    same registered function called on CPU tensors (conftest runs triton's interpreter)."""
    op = getattr(torch.ops.ssgd_fused, name).default
    if torch.cuda.is_available():
        return op(*args)
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def _inputs(dtype, dist):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).to(dtype).to(device) for s in SHAPES]
    grads = [torch.randn(s, generator=g).to(dtype).to(device) for s in SHAPES]
    w2, u2 = ref.norms([p.cpu() for p in params], SEED, STEP, TIDS, 0, dist, False)
    scales = [s.to(device) for s in ref.scales_from_norms(w2, u2, [0.6] * len(params))]
    return params, grads, scales


def _close(got, want, dtype, dist):
    t = dict(TOL[dtype])
    if dist == "gaussian":
        t["atol"] += 6 * GAUSS_TOL
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.cpu(), **t)


def _clones(ts):
    return [t.clone() for t in ts]


DTYPE = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
DIST = pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
OFFSETS = [5, 129 * 7 * 2 + 3, 2**34 + 1]  # shards: inside a 4-block, inside a 128-block, blocks above 2**32
OFFS = pytest.mark.parametrize("offsets", [None, OFFSETS], ids=["unsharded", "offsets"])


@pytest.fixture(autouse=True)
def _need_triton():
    pytest.importorskip("triton")


@OFFS
@pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])
@DIST
def test_cuda_registration_norms(dist, filter, offsets):
    params, _, _ = _inputs(torch.float32, dist)
    got = _cuda_call("norms", params, ops.seed_to_i64(SEED), STEP, TIDS, 0, dist, filter, offsets)
    want = ref.norms([p.cpu() for p in params], SEED, STEP, TIDS, 0, dist, filter, offsets)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)


@OFFS
@DTYPE
@DIST
def test_cuda_registration_perturb_and_restore(dtype, dist, offsets):
    params, grads, scales = _inputs(dtype, dist)
    got, want = _clones(params), _clones(params)
    _cuda_call("perturb_", got, scales, -2.0, ops.seed_to_i64(SEED), STEP, TIDS, 0, dist, False, None, offsets)
    ref.perturb_(want, scales, -2.0, SEED, STEP, TIDS, 0, dist, False, None, offsets)
    _close(got, want, dtype, dist)
    src = _clones(params)
    nw = [torch.full((1,), float("nan"), dtype=torch.float64, device=p.device) for p in params]
    rw = [torch.full((1,), float("nan"), dtype=torch.float64) for p in params]
    _cuda_call("perturb_norms_", got, nw, scales, 1.0, ops.seed_to_i64(SEED), STEP, TIDS, 0, dist, False, src,
               offsets)
    ref.perturb_norms_(want, rw, scales, 1.0, SEED, STEP, TIDS, 0, dist, False, src, offsets)
    _close(got, want, dtype, dist)
    for a, b in zip(nw, rw):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=0)
    gg, gw = _clones(grads), _clones(grads)
    _cuda_call("restore_", got, gg, scales, 1.0, 0.5, ops.seed_to_i64(SEED), STEP, TIDS, 0, dist, False, None,
               offsets)
    ref.restore_(want, gw, scales, 1.0, 0.5, SEED, STEP, TIDS, 0, dist, False, None, offsets)
    _close(got + gg, want + gw, dtype, dist)


@OFFS
@DTYPE
@DIST
def test_cuda_registration_restore_update_sgd(dtype, dist, offsets):
    params, grads, scales = _inputs(dtype, dist)
    bufs = [torch.randn_like(p) for p in params]
    outs = []
    for fn in (lambda *a: _cuda_call("restore_update_sgd_", *a), ref.restore_update_sgd_):
        p, g, b = _clones(params), _clones(grads), _clones(bufs)
        nw = [torch.full((1,), float("nan"), dtype=torch.float64, device=p[0].device) for _ in p]
        nu = [torch.full((1,), float("nan"), dtype=torch.float64, device=p[0].device) for _ in p]
        seed = ops.seed_to_i64(SEED) if fn is not ref.restore_update_sgd_ else SEED
        fn(p, g, b, scales, -1.0, 0.5, seed, STEP, TIDS, 0, dist, False, None, 0.1, 0.9, 0.0, 1e-2, True, False,
           [False, True, False], nw, nu, STEP + 1, offsets)
        outs.append((p, g, b, nw, nu))
    (p1, g1, b1, nw1, nu1), (p2, g2, b2, nw2, nu2) = outs
    _close(p1 + g1 + b1, p2 + g2 + b2, dtype, dist)
    for a, b in zip(nw1 + nu1, nw2 + nu2):
        assert not a.isnan().any()
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=0)


@OFFS
@DIST
def test_cuda_registration_restore_update_adam(dist, offsets):
    """With offsets, also the next step's norms (poisoned outputs), which take the offsets too."""
    dtype = torch.float32
    params, grads, scales = _inputs(dtype, dist)
    state = [[torch.randn_like(p) for p in params], [torch.rand_like(p) for p in params],
             [torch.rand_like(p) + 1 for p in params]]
    outs = []
    for fn in (lambda *a: _cuda_call("restore_update_adam_", *a), ref.restore_update_adam_):
        p, g = _clones(params), _clones(grads)
        m, v, vmax = (_clones(s) for s in state)
        seed = ops.seed_to_i64(SEED) if fn is not ref.restore_update_adam_ else SEED
        n = 1 if offsets else 0
        nw = [torch.full((n,), float("nan"), dtype=torch.float64, device=p[0].device) for _ in p] if n else []
        nu = [t.clone() for t in nw]
        fn(p, g, m, v, vmax, scales, -1.0, 0.5, seed, STEP, TIDS, 0, dist, False, None, [3.0, 3.0, 3.0], 1e-3, 0.9,
           0.999, 1e-8, 1e-2, True, True, False, nw, nu, STEP + 1 if n else 0, offsets)
        outs.append((p + g + m + v + vmax, nw + nu))
    _close(outs[0][0], outs[1][0], dtype, dist)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert not a.isnan().any()
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=0)


# ---- sharded tensors: element_offsets -----------------------------------------------------------
def test_every_noise_op_takes_element_offsets_last():
    assert schema_names("noise")[-1] == "element_offset"
    for name in set(ops.SCHEMAS) - {"noise"}:
        arg = getattr(torch.ops.ssgd_fused, name).default._schema.arguments[-1]
        assert arg.name == "element_offsets" and str(arg.type) == "Optional[List[int]]", name
        assert arg.default_value is None


@pytest.mark.parametrize("op", ["norms", "perturb_", "restore_update_sgd_", "restore_update_adam_"])
@pytest.mark.parametrize("filter", [False, True], ids=["tensor", "filter"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher", "uniform"])
def test_reference_sharded_equals_full(op, dist, filter):
    """The reference (the definition): each op on row-shards with their offsets gives the full
    tensor's slice (norms: the shards' sums / rows). The backends' files run the same checks."""
    S.CHECKS[op](ref, S.Problem(S.SMALL, torch.float32, dist, filter))


def test_reference_bad_element_offsets_named():
    p = [torch.randn(6, 5), torch.randn(13)]
    for offs, match in (([0], "element_offsets has 1 entries for 2 params"),
                        ([0, -1], r"element_offsets\[1\] must be >= 0"),
                        ([0, 1.0], r"element_offsets\[1\] must be an int"),
                        ([0, (4 << 48) - 12], r"element_offsets\[1\] \+ numel = .* exceeds")):
        with pytest.raises(ValueError, match=match):
            ref.norms(p, 0, 0, [0, 1], 0, "gaussian", False, offs)
        with pytest.raises(ValueError, match=match):
            ref.perturb_(p, [torch.ones(1, dtype=torch.float64)] * 2, 1.0, 0, 0, [0, 1], 0, "uniform", False, None,
                         offs)
