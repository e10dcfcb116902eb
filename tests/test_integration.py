"""Training-loop integration: AMP, accumulation, clipping, non-finite gradients, schedules and
modes, tied / non-contiguous / partly-used parameters, torch.compile, random inputs."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ssgd_fused
from ssgd_fused import SSGD
from tests.helpers import SmallCNN, clone_params, closure_for, make_data


def _pair(backend, **kw):
    torch.manual_seed(0)
    a = SmallCNN()
    b = copy.deepcopy(a)
    args = dict(lr=0.05, momentum=0.9, seed=5, backend=backend, **kw)
    return a, b, SSGD(a.parameters(), torch.optim.SGD, **args), SSGD(b.parameters(), torch.optim.SGD, **args)


# ---- AMP ----------------------------------------------------------------------------------------
def test_grad_scaler_with_twin_passes_matches_unscaled(backend):
    a, b, oa, ob = _pair(backend)
    x, y = make_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        oa.zero_grad()
        for _ in oa.twin_passes():
            scaler.scale(F.cross_entropy(a(x), y)).backward()
        scaler.unscale_(oa)
        torch.nn.utils.clip_grad_norm_(a.parameters(), 10.0)
        scaler.step(oa)
        scaler.update()
        ob.zero_grad()
        for _ in ob.twin_passes():
            F.cross_entropy(b(x), y).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 10.0)
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):  # power-of-two scaling is exact
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_skipped_step_leaves_clean_weights_and_no_state(backend):
    a, _, oa, _ = _pair(backend)
    x, y = make_data()
    scaler = torch.amp.GradScaler("cpu")
    clean = clone_params(a)
    oa.zero_grad()
    for k in oa.twin_passes():
        loss = F.cross_entropy(a(x), y)
        if k == 1:
            loss = loss * float("inf")  # an overflow in the second pass
        scaler.scale(loss).backward()
    scaler.step(oa)  # finds inf: skips opt.step()
    scaler.update()
    assert scaler.get_scale() < 2.0**16
    for p, c in zip(a.parameters(), clean):
        torch.testing.assert_close(p.detach(), c, rtol=0, atol=1e-6)
    assert all("momentum_buffer" not in oa.state[p] for p in a.parameters())
    # and the next step works normally
    oa.zero_grad()
    for _ in oa.twin_passes():
        scaler.scale(F.cross_entropy(a(x), y)).backward()
    scaler.step(oa)
    assert all("momentum_buffer" in oa.state[p] for p in a.parameters())


def test_bf16_autocast_trains(backend):
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(15):
        last = opt.step(closure).item()
    assert math.isfinite(last) and last < first
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- accumulation, clipping, non-finite gradients -------------------------------------------------
def test_gradient_accumulation_inside_twin_passes(backend):
    a, b, oa, ob = _pair(backend)
    x, y = make_data(n=32)
    oa.zero_grad()
    for _ in oa.twin_passes():  # noise drawn once per step, two micro-batches per pass
        for xs, ys in ((x[:16], y[:16]), (x[16:], y[16:])):
            (F.cross_entropy(a(xs), ys) / 2).backward()
    oa.step()
    ob.step(closure_for(b, x, y))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_clips_the_mean_gradient(backend):
    a, b, oa, ob = _pair(backend, max_grad_norm=0.05)
    x, y = make_data()
    oa.step(closure_for(a, x, y))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in a.parameters()]))
    assert total.item() == pytest.approx(0.05, rel=1e-4)
    # the same as clipping by hand with torch's utility after an unclipped S-SGD gradient
    ob.zero_grad()
    for _ in ob.twin_passes():
        F.cross_entropy(b(x), y).backward()
    torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradients_skip_or_raise_with_clean_weights(policy, backend):
    a, _, oa, _ = _pair(backend, nonfinite=policy)
    x, y = make_data()
    clean = clone_params(a)

    def closure():
        loss = F.cross_entropy(a(x), y) * float("nan")
        loss.backward()
        return loss

    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            oa.step(closure)
    else:
        oa.step(closure)
        assert oa.last_step_skipped
    for p, c in zip(a.parameters(), clean):
        torch.testing.assert_close(p.detach(), c, rtol=0, atol=1e-6)
    assert all("momentum_buffer" not in oa.state[p] for p in a.parameters())
    oa.step(closure_for(a, x, y))  # a finite step afterwards updates
    assert not oa.last_step_skipped


# ---- schedules and modes ----------------------------------------------------------------------------
def test_start_step_runs_the_base_optimizer_alone_first(backend):
    torch.manual_seed(0)
    a = SmallCNN()
    b = copy.deepcopy(a)
    x, y = make_data()
    oa = SSGD(a.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, start_step=3, backend=backend)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    calls = []
    inner = closure_for(a, x, y)
    for _ in range(3):
        oa.step(lambda: calls.append(1) or inner())
        ob.zero_grad()
        closure_for(b, x, y)()
        ob.step()
    assert len(calls) == 3  # one pass per step before start_step
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    oa.step(lambda: calls.append(1) or inner())
    assert len(calls) == 5  # S-SGD from step 3 on: two passes


def test_alpha_schedule(backend):
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.0, noise=lambda step: 0.1 * (step + 1), backend=backend,
               restore="exact")
    for step in range(3):
        clean = model.fc1.weight.detach().clone()
        seen = {}

        def closure():
            seen.setdefault("w", model.fc1.weight.detach().clone())
            return closure_for(model, x, y)()

        opt.step(closure)
        ratio = ((seen["w"] - clean).norm() / clean.norm()).item()
        assert ratio == pytest.approx(0.1 * (step + 1), rel=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        SSGD(model.parameters(), torch.optim.SGD, lr=0.1, noise=lambda step: -1.0)


def test_smoothout_mode_is_one_pass_of_uniform_noise():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, mode="smoothout", backend="reference")
    assert opt.distribution == "uniform"
    calls = []
    inner = closure_for(model, x, y)
    opt.step(lambda: calls.append(1) or inner())
    assert len(calls) == 1
    with pytest.raises(ValueError, match="smoothout"):
        SSGD(model.parameters(), torch.optim.SGD, lr=0.1, mode="smoothout", distribution="gaussian")


# ---- unusual parameters --------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, idx):
        h = torch.tanh(self.mid(self.emb(idx)))
        return h @ self.emb.weight.T  # the embedding matrix used twice (tied output layer)


def test_tied_parameters_fused_matches_reference():
    from tests.helpers import require_cpp

    require_cpp()
    torch.manual_seed(0)
    models = [Tied(), None]
    models[1] = copy.deepcopy(models[0])
    idx, tgt = torch.randint(0, 11, (20,)), torch.randint(0, 11, (20,))
    opts = [SSGD(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=1, backend=b, restore="exact")
            for m, b in zip(models, ("cpp", "reference"))]
    for _ in range(5):
        for m, o in zip(models, opts):
            o.step(closure_for(m, idx, tgt))
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_contiguous_parameters_fall_back_with_one_warning():
    w = nn.Parameter(torch.randn(6, 9).t())  # non-contiguous
    assert not w.is_contiguous()
    with pytest.warns(RuntimeWarning, match="contiguous") as rec:
        opt = SSGD([w], torch.optim.SGD, lr=0.1)
    assert opt.backend == "reference" and len(rec) == 1
    clean = w.detach().clone()
    seen = {}

    def closure():
        seen.setdefault("w", w.detach().clone())
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert ((seen["w"] - clean).norm() / clean.norm()).item() == pytest.approx(0.5, rel=1e-5)


def test_parameter_with_gradient_in_one_pass_only(backend):
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4, 3))
    opt = SSGD([a, b], torch.optim.SGD, lr=0.0, noise=0.0, backend=backend)
    calls = []

    def closure():
        calls.append(1)
        loss = (a * 2).sum() + ((b * 3).sum() if len(calls) == 1 else 0.0)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(a.grad, torch.full_like(a, 2.0))  # mean of 2 and 2
    torch.testing.assert_close(b.grad, torch.full_like(b, 1.5))  # mean of 3 and (nothing = 0)


def test_torch_compiled_model_trains_with_ssgd():
    torch.manual_seed(0)
    model = SmallCNN()
    compiled = torch.compile(model)
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=3)
    first = opt.step(closure_for(compiled, x, y)).item()
    for _ in range(5):
        last = opt.step(closure_for(compiled, x, y)).item()
    assert last < first


# ---- random inputs against the reference -------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       alpha=st.floats(0.0, 2.0), dist=st.sampled_from(["gaussian", "rademacher", "uniform"]),
       filter=st.booleans(), seed=st.integers(0, 2**64 - 1))
def test_random_shapes_dtypes_alphas_against_reference(shape, dtype, alpha, dist, filter, seed):
    from ssgd_fused import ops
    from ssgd_fused import reference as ref
    from tests.helpers import require_cpp
    from tests.tolerances import GAUSS_TOL, TOL

    require_cpp()
    g = torch.Generator().manual_seed(seed % 2**31)
    p = torch.randn(shape, generator=g).to(dtype)
    w2, u2 = ops.norms([p], seed, 7, [2], 0, dist, filter)
    rw2, ru2 = ref.norms([p], seed, 7, [2], 0, dist, filter)
    torch.testing.assert_close(w2[0], rw2[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(u2[0], ru2[0], rtol=1e-6, atol=0)
    s = ref.scales_from_norms(rw2, ru2, [alpha])
    a, b = p.clone(), p.clone()
    ops.perturb_([a], s, 1.0, seed, 7, [2], 0, dist, filter)
    ref.perturb_([b], s, 1.0, seed, 7, [2], 0, dist, filter)
    tol = dict(TOL[dtype])
    tol["atol"] += 6 * GAUSS_TOL * float(s[0].max())
    torch.testing.assert_close(a, b, **tol)
    assert ssgd_fused.noise.SPEC_VERSION == 1


# ---- antithetic pairs and BatchNorm statistics ---------------------------------------------------------
def test_k_antithetic_pairs(backend):
    """pairs=3: six passes, each pair its own direction (spec sample j); on a quadratic loss the
    mean gradient is still the exact gradient at the clean weights."""
    torch.manual_seed(0)
    n = 23
    q = torch.randn(n, n)
    A = q @ q.T + torch.eye(n)
    w = nn.Parameter(torch.randn(1, n))
    opt = SSGD([w], torch.optim.SGD, lr=0.0, noise=0.8, pairs=3, backend=backend, restore="exact")
    w0 = w.detach().clone()
    seen = []

    def closure():
        seen.append(w.detach().clone())
        loss = 0.5 * (w @ A @ w.T).squeeze()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(seen) == 6
    dirs = [s - w0 for s in seen]
    for j in range(3):
        torch.testing.assert_close(dirs[2 * j + 1], -dirs[2 * j], rtol=1e-5, atol=1e-6)  # +n_j, -n_j
        assert (dirs[2 * j].norm() / w0.norm()).item() == pytest.approx(0.8, rel=1e-5)
    assert not torch.allclose(dirs[0], dirs[2]) and not torch.allclose(dirs[2], dirs[4])
    torch.testing.assert_close(w.grad.squeeze(), A @ w0.squeeze(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pairs"):
        SSGD([w], torch.optim.SGD, lr=0.1, pairs=2, mode="one_sided")


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("policy,updates", [("both", 2), ("first", 1), ("none", 0)])
def test_batchnorm_running_statistics_policy(policy, updates, backend):
    torch.manual_seed(0)
    model = BNNet()
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, bn_stats=policy, model=model, backend=backend)
    before = model.bn.running_mean.clone()
    opt.step(closure_for(model, x, y))
    assert int(model.bn.num_batches_tracked) == updates
    assert torch.equal(model.bn.running_mean, before) == (updates == 0)
    assert model.bn.track_running_stats  # restored after the passes
    with pytest.raises(ValueError, match="model="):
        SSGD(model.parameters(), torch.optim.SGD, lr=0.1, bn_stats="first")


def test_ops_compile_fullgraph():
    """The fused ops trace into one graph (fake implementations, declared mutations): a compiled
    function that perturbs and measures equals the eager one."""
    from ssgd_fused import ops
    from tests.helpers import require_cpp

    require_cpp()
    ps = [torch.randn(7, 5), torch.randn(13)]
    sc = [torch.full((1,), 0.01, dtype=torch.float64)] * 2

    def f(params):
        ops.perturb_(params, sc, 1.0, 1, 0, [0, 1], 0, "gaussian", False)
        w2, u2 = ops.norms(params, 1, 1, [0, 1], 0, "gaussian", False)
        return w2[0] + u2[1]

    a, b = [p.clone() for p in ps], [p.clone() for p in ps]
    r = torch.compile(f, fullgraph=True)(a)
    assert torch.equal(r, f(b))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
