"""ssgd_fused.flatness against analytic cases: quadratics and linear least squares with known
Hessians, known interpolation curves, the optimizer's own noise; bad input; no side effects."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ssgd_fused
from ssgd_fused import flatness
from ssgd_fused import noise as spec


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Quadratic(nn.Module):
    """model(x) = w (the input is ignored); with criterion _quad_loss(H, c) the loss is
    0.5 (w - c)^T H (w - c), so the Hessian is H everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return self.w


def _quad_loss(H, c):
    def crit(out, _target):
        d = out - c
        return 0.5 * d @ H @ d
    return crit


def _spd(n, seed, dtype=torch.float64):
    a = torch.randn(n, n, generator=_gen(seed), dtype=dtype)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=dtype)


def _dummy(n=1):
    return [(torch.zeros(n, 1), torch.zeros(n))]


def _least_squares(seed, n=37, d=5):
    """Linear(d, 1) with MSELoss on random data, cut into unequal batches; Hessian 2/n [X 1]^T [X 1]."""
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).double()
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = 2.0 / n * a.T @ a  # parameter order: weight (1, d) flattened, then bias
    batches = [(x[:5], y[:5]), (x[5:22], y[5:22]), (x[22:], y[22:])]
    return model, nn.MSELoss(), batches, H


# ---- Hessian -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_quadratic(seed, method):
    n = 12
    H = _spd(n, seed)
    c = torch.randn(n, generator=_gen(seed + 100), dtype=torch.float64)
    model = Quadratic(torch.randn(n, generator=_gen(seed + 200), dtype=torch.float64))
    got = flatness.hessian_top_eigenvalue(model, _quad_loss(H, c), _dummy(), iters=300, tol=1e-10, seed=seed,
                                          method=method)
    assert got == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_top_eigenvalue_indefinite_lanczos_algebraic_power_magnitude():
    # spectrum {-5, 3, 1, 0.5, ...}: Lanczos finds the largest algebraic (3), power the largest magnitude (-5)
    n = 8
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(7), dtype=torch.float64))
    lam = torch.tensor([-5.0, 3.0, 1.0, 0.5, 0.25, 0.1, -0.2, 0.0], dtype=torch.float64)
    H = q @ torch.diag(lam) @ q.T
    model = Quadratic(torch.zeros(n, dtype=torch.float64))
    crit = _quad_loss(H, torch.zeros(n, dtype=torch.float64))
    assert flatness.hessian_top_eigenvalue(model, crit, _dummy(), iters=50, tol=1e-12) == pytest.approx(3.0, rel=1e-8)
    got = flatness.hessian_top_eigenvalue(model, crit, _dummy(), iters=500, tol=1e-12, method="power")
    assert got == pytest.approx(-5.0, rel=1e-6)


@pytest.mark.parametrize("seed", [3, 4])
def test_least_squares_hessian_weighted_by_samples(seed):
    model, crit, batches, H = _least_squares(seed)
    want = float(torch.linalg.eigvalsh(H)[-1])
    assert flatness.hessian_top_eigenvalue(model, crit, batches, tol=1e-12) == pytest.approx(want, rel=1e-8)
    # one batch or three unequal ones: the same loss, the same Hessian
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert flatness.hessian_top_eigenvalue(model, crit, (x, y), tol=1e-12) == pytest.approx(want, rel=1e-8)
    v = [torch.randn(p.shape, generator=_gen(seed + 9), dtype=p.dtype) for p in model.parameters()]
    hv = flatness.hessian_vector_product(model, crit, batches, v)
    flat_v = torch.cat([t.reshape(-1) for t in v])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hv]), H @ flat_v, rtol=1e-10, atol=1e-12)


def test_hutchinson_exact_on_diagonal_and_unbiased_on_dense():
    n = 10
    diag = torch.rand(n, generator=_gen(11), dtype=torch.float64) * 4 - 1
    model = Quadratic(torch.randn(n, generator=_gen(12), dtype=torch.float64))
    crit = _quad_loss(torch.diag(diag), torch.zeros(n, dtype=torch.float64))
    # Rademacher probes: v^T D v = trace(D) for every v
    assert flatness.hessian_trace(model, crit, _dummy(), samples=3, seed=5) == pytest.approx(float(diag.sum()),
                                                                                             rel=1e-12)
    model, crit, batches, H = _least_squares(13)
    est, se = flatness.hessian_trace(model, crit, batches, samples=400, seed=1, return_stderr=True)
    assert se > 0
    assert abs(est - float(H.trace())) < 5 * se


def test_matches_hessian_eigenthings_when_installed():
    he = pytest.importorskip("hessian_eigenthings")
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 4, generator=_gen(22), dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=_gen(23))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]  # equal sizes: their per-batch mean is ours
    op = he.HessianOperator(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    theirs, _, _, _, converged = he.power_iteration_one(op, max_iter=300, tol=1e-8, seed=0)
    assert converged
    ours = flatness.hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=100, tol=1e-10)
    assert ours == pytest.approx(theirs, rel=1e-5)


# ---- curves --------------------------------------------------------------------------------

def test_interpolation_of_a_quadratic_is_the_known_parabola():
    n = 6
    H = _spd(n, 30)
    c = torch.randn(n, generator=_gen(31), dtype=torch.float64)
    a = torch.randn(n, generator=_gen(32), dtype=torch.float64)
    b = torch.randn(n, generator=_gen(33), dtype=torch.float64)
    model = Quadratic(torch.zeros(n, dtype=torch.float64))
    ts = [-0.5, 0.0, 0.3, 1.0, 1.5]
    curve = flatness.interpolate(model, _quad_loss(H, c), _dummy(), {"w": a}, {"w": b}, ts=ts)
    want = [float(0.5 * (a + t * (b - a) - c) @ H @ (a + t * (b - a) - c)) for t in ts]
    assert curve.t == ts
    assert curve.loss == pytest.approx(want, rel=1e-12)
    assert all(math.isnan(e) for e in curve.error)  # no class labels


def test_interpolation_error_of_a_classifier():
    torch.manual_seed(40)
    start, end = nn.Linear(4, 3), nn.Linear(4, 3)
    x = torch.randn(50, 4, generator=_gen(41))
    y = torch.randint(0, 3, (50,), generator=_gen(42))
    model = nn.Linear(4, 3)
    curve = flatness.interpolate(model, F.cross_entropy, [(x[:20], y[:20]), (x[20:], y[20:])], start, end,
                                 ts=[0.0, 1.0])
    for t, m in zip(curve.t, (start, end)):
        with torch.no_grad():
            out = m(x)
        i = curve.t.index(t)
        assert curve.loss[i] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
        assert curve.error[i] == pytest.approx(float((out.argmax(1) != y).float().mean()))


def test_direction_scan_is_taylor_exact_for_a_quadratic():
    n = 5
    H = _spd(n, 50)
    c = torch.randn(n, generator=_gen(51), dtype=torch.float64)
    w = torch.randn(n, generator=_gen(52), dtype=torch.float64)
    d = torch.randn(n, generator=_gen(53), dtype=torch.float64)
    model = Quadratic(w)
    ts = [-1.0, -0.25, 0.0, 0.5, 2.0]
    curve = flatness.direction_scan(model, _quad_loss(H, c), _dummy(), {"w": d}, ts=ts)
    g = H @ (w - c)
    l0 = float(0.5 * (w - c) @ H @ (w - c))
    assert curve.loss == pytest.approx([l0 + t * float(g @ d) + 0.5 * t * t * float(d @ H @ d) for t in ts],
                                       rel=1e-12)


def test_random_direction_is_filter_normalised():
    torch.manual_seed(60)
    model = nn.Sequential(nn.Conv1d(2, 7, 3), nn.ReLU(), nn.Flatten(), nn.Linear(7 * 6, 4))
    d = flatness.random_direction(model, seed=3)
    assert d.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.count_nonzero(d[name]) == 0  # biases: ignored (Li et al.'s default)
        else:
            torch.testing.assert_close(d[name].reshape(p.shape[0], -1).norm(dim=1),
                                       p.detach().reshape(p.shape[0], -1).norm(dim=1))
    again = flatness.random_direction(model, seed=3)
    other = flatness.random_direction(model, seed=4)
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert not torch.equal(d["0.weight"], other["0.weight"])
    with_1d = flatness.random_direction(model, seed=3, ignore_1d=False)
    torch.testing.assert_close(with_1d["0.bias"].norm(), model[0].bias.detach().norm())


# ---- sharpness -----------------------------------------------------------------------------

def _spec_noise(p, alpha, seed, step, tid, distribution):
    """n = alpha ||w|| u / ||u|| written out from the spec's generator."""
    u = spec.generate(distribution, p.numel(), seed, step, tid).double().view(p.shape)
    return alpha * p.detach().double().norm() * u / u.norm()


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "uniform"])
def test_symmetric_sharpness_of_a_quadratic_is_half_nHn(distribution):
    n = 9
    H = _spd(n, 70)
    c = torch.randn(n, generator=_gen(71), dtype=torch.float64)
    model = Quadratic(torch.randn(n, generator=_gen(72), dtype=torch.float64))
    s = flatness.symmetric_sharpness(model, _quad_loss(H, c), _dummy(), alpha=0.3, distribution=distribution,
                                     draws=4, seed=99, perturb="all")
    want = [0.5 * float(nv @ H @ nv) for nv in (_spec_noise(model.w, 0.3, 99, k, 0, distribution)
                                               for k in range(4))]
    assert s.draws == pytest.approx(want, rel=1e-9)
    assert s.value == pytest.approx(sum(want) / 4, rel=1e-9)
    assert s.std == pytest.approx(float(torch.tensor(want).std()), rel=1e-6)
    w = model.w.detach()
    assert s.loss == pytest.approx(float(0.5 * (w - c) @ H @ (w - c)), rel=1e-12)


def test_symmetric_sharpness_uses_the_optimizers_noise():
    # the loss S-SGD sees in its two passes at step 0 gives the sharpness' first draw
    torch.manual_seed(80)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(64, 5, generator=_gen(81))
    y = torch.randint(0, 3, (64,), generator=_gen(82))
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
    opt = ssgd_fused.SSGD(model.parameters(), torch.optim.SGD, lr=0.0, noise=0.4, seed=1234)
    seen = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        seen.append(loss.item())
        return loss

    opt.step(closure)
    s = flatness.symmetric_sharpness(model, F.cross_entropy, [(x, y)], alpha=0.4, draws=1, seed=1234)
    assert s.loss == pytest.approx(clean, rel=1e-6)
    assert s.draws[0] == pytest.approx((seen[0] + seen[1]) / 2 - clean, rel=1e-3, abs=1e-6)
    assert s.value > 0


def test_epsilon_sharpness_exact_for_a_linear_loss():
    n = 7
    g = torch.randn(n, generator=_gen(90), dtype=torch.float64)
    w = torch.randn(n, generator=_gen(91), dtype=torch.float64)
    model = Quadratic(w)
    crit = lambda out, _y: out @ g  # L(w) = g^T w: the box maximum is at the corner sign(g)
    eps = 1e-2
    gain = float((eps * (w.abs() + 1) * g.abs()).sum())
    want = 100 * gain / (1 + float(w @ g))
    for steps in (1, 5):
        assert flatness.epsilon_sharpness(model, crit, _dummy(), epsilon=eps, steps=steps) == pytest.approx(want,
                                                                                                            rel=1e-9)


def test_sharper_quadratic_is_sharper_by_every_measure():
    n = 6
    model = Quadratic(torch.randn(n, generator=_gen(95), dtype=torch.float64))
    c = torch.zeros(n, dtype=torch.float64)
    H = _spd(n, 96)
    flat_m, sharp_m = _quad_loss(H, c), _quad_loss(4 * H, c)
    kw = {"batches": _dummy()}
    assert flatness.hessian_top_eigenvalue(model, sharp_m, **kw) == pytest.approx(
        4 * flatness.hessian_top_eigenvalue(model, flat_m, **kw), rel=1e-6)
    assert flatness.symmetric_sharpness(model, sharp_m, **kw, perturb="all").value == pytest.approx(
        4 * flatness.symmetric_sharpness(model, flat_m, **kw, perturb="all").value, rel=1e-9)
    assert flatness.epsilon_sharpness(model, sharp_m, **kw) > flatness.epsilon_sharpness(model, flat_m, **kw)


# ---- bad input and side effects ------------------------------------------------------------

def _small_model():
    torch.manual_seed(100)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))


def _data(n=32):
    return [(torch.randn(n, 4, generator=_gen(101)), torch.randint(0, 3, (n,), generator=_gen(102)))]


ALL = [
    lambda m, c, b: flatness.hessian_top_eigenvalue(m, c, b, iters=3),
    lambda m, c, b: flatness.hessian_top_eigenvalue(m, c, b, iters=3, method="power"),
    lambda m, c, b: flatness.hessian_trace(m, c, b, samples=2),
    lambda m, c, b: flatness.loss_and_error(m, c, b),
    lambda m, c, b: flatness.interpolate(m, c, b, m.state_dict(), {k: v + 1 for k, v in m.state_dict().items()},
                                         ts=[0.0, 0.5]),
    lambda m, c, b: flatness.direction_scan(m, c, b, flatness.random_direction(m), ts=[0.0, 1.0]),
    lambda m, c, b: flatness.symmetric_sharpness(m, c, b, draws=2),
    lambda m, c, b: flatness.epsilon_sharpness(m, c, b, steps=2),
    lambda m, c, b: flatness.hessian_vector_product(m, c, b, [torch.ones_like(p) for p in m.parameters()]),
]


@pytest.mark.parametrize("fn", ALL, ids=["lanczos", "power", "trace", "loss", "interp", "scan", "sym", "eps", "hvp"])
@pytest.mark.parametrize("train", [True, False])
def test_model_weights_buffers_grads_and_mode_untouched(fn, train):
    model = _small_model()
    model.train(train)
    model[0].weight.grad = torch.randn(model[0].weight.shape, generator=_gen(103))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_before = model[0].weight.grad.clone()
    versions = [p._version for p in model.parameters()]
    fn(model, F.cross_entropy, _data())
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # bitwise, BatchNorm running statistics included
    assert torch.equal(model[0].weight.grad, grad_before)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert [p._version for p in model.parameters()] == versions
    assert model.training is train
    assert all(m.training is train for m in model.modules())


def test_mode_as_given():
    model = _small_model()[:3]  # Linear, BatchNorm, ReLU: deterministic in both modes
    crit = lambda out, y: out.pow(2).mean()
    (x, y), = _data()
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            want = crit(model(x), y).item()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # the forward above moved the running statistics in train mode
        got = flatness.loss_and_error(model, crit, [(x, y)])[0]
        if train:  # batch statistics: the model's own forward (which moved its statistics) agrees
            assert got == pytest.approx(want, rel=1e-6)
        else:
            assert got == pytest.approx(want, rel=1e-6)
    model.train()
    lam_train = flatness.hessian_top_eigenvalue(model, crit, [(x, y)], iters=30)
    model.eval()
    lam_eval = flatness.hessian_top_eigenvalue(model, crit, [(x, y)], iters=30)
    assert lam_train != pytest.approx(lam_eval, rel=1e-3)  # train mode normalises by batch statistics


@pytest.mark.parametrize("fn", ALL[:3] + ALL[6:8], ids=["lanczos", "power", "trace", "sym", "eps"])
def test_bad_input(fn):
    model = _small_model().eval()
    data = _data()
    with pytest.raises(ValueError, match="empty"):
        fn(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="empty"):
        fn(model, F.cross_entropy, iter([]))
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pair"):
        fn(model, F.cross_entropy, [data[0][0]])
    with pytest.raises(ValueError, match="scalar"):
        fn(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), data)
    with pytest.raises(TypeError, match="scalar Tensor"):
        fn(model, lambda out, y: 1.0, data)
    with pytest.raises(TypeError, match="callable"):
        fn(model, "cross_entropy", data)
    with pytest.raises(ValueError, match="no samples"):
        fn(model, F.cross_entropy, [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))])
    frozen = _small_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        fn(frozen, F.cross_entropy, data)
    with pytest.raises(TypeError, match="nn.Module"):
        fn(lambda x: x, F.cross_entropy, data)


def test_bad_options_and_nonfinite():
    model = _small_model().eval()
    data = _data()
    with pytest.raises(ValueError, match="method"):
        flatness.hessian_top_eigenvalue(model, F.cross_entropy, data, method="arnoldi")
    with pytest.raises(ValueError, match="iters"):
        flatness.hessian_top_eigenvalue(model, F.cross_entropy, data, iters=0)
    with pytest.raises(ValueError, match="samples"):
        flatness.hessian_trace(model, F.cross_entropy, data, samples=0)
    with pytest.raises(ValueError, match="alpha"):
        flatness.symmetric_sharpness(model, F.cross_entropy, data, alpha=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        flatness.epsilon_sharpness(model, F.cross_entropy, data, epsilon=0.0)
    with pytest.raises(ValueError, match="ts is empty"):
        flatness.direction_scan(model, F.cross_entropy, data, flatness.random_direction(model), ts=[])
    with pytest.raises(KeyError, match="lacks"):
        flatness.interpolate(model, F.cross_entropy, data, {}, model.state_dict())
    with pytest.raises(ValueError, match="shaped like"):
        flatness.hessian_vector_product(model, F.cross_entropy, data, [torch.ones(3)])
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        flatness.hessian_top_eigenvalue(model, F.cross_entropy, data, iters=3)


# ---- the study's kit -----------------------------------------------------------------------

def test_train_run_pairs_methods_from_one_start():
    from ssgd_fused.demo import train_run

    (x, y), (xt, yt) = _digits_small()
    data = ((x, y), (xt, yt))
    kw = {"dataset": "digits", "epochs": 1, "batch": 100, "lr": 0.05, "seed": 3, "data": data, "hessian_iters": 3,
          "hessian_samples": 100, "keep_state": True}
    sgd = train_run(method="sgd", **kw)
    ssgd = train_run(method="ssgd", alpha=0.0, **kw)  # alpha 0: S-SGD is SGD bit for bit, with twice the passes
    assert all(torch.equal(sgd["state"][k], ssgd["state"][k]) for k in sgd["state"])
    assert ssgd["passes"] == 2 * sgd["passes"] == 2 * sgd["steps"]
    assert math.isfinite(sgd["hessian_top"]) and sgd["hessian_top"] > 0
    noisy = train_run(method="one_sided", alpha=0.3, **kw)
    assert not torch.equal(noisy["state"]["fc2.weight"], sgd["state"]["fc2.weight"])
    with pytest.raises(ValueError, match="method"):
        train_run(method="adam", **kw)


def _digits_small():
    g = _gen(110)
    x = torch.rand(300, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    return (x[:200], y[:200]), (x[200:], y[200:])


def test_mnist1d_generated_offline_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    import requests

    from ssgd_fused.demo import load_mnist1d

    def no_network(*a, **k):
        raise AssertionError("mnist1d must be generated, not downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(5)
    random.seed(5)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    (x, y), (xt, yt) = load_mnist1d(str(tmp_path))
    assert x.shape == (4000, 1, 40) and xt.shape == (1000, 1, 40)
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert any(p.name.endswith(".pt") for p in tmp_path.iterdir())
    (x2, _), _ = load_mnist1d(str(tmp_path))  # from the cache
    assert torch.equal(x, x2)


def test_demo_prints_accuracy_and_flatness_without_warnings(capsys, tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    import warnings

    from ssgd_fused import demo

    monkeypatch.setattr(demo.tempfile, "gettempdir", lambda: str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = demo.main(["--seeds", "2", "--epochs", "1", "--batch", "500", "--hessian-samples", "200"])
    out = capsys.readouterr().out
    assert "Hessian top eigenvalue" in out and "test acc" in out
    assert len(rows["sgd"]) == len(rows["ssgd"]) == 2
    assert all(math.isfinite(r["hessian_top"]) for r in rows["sgd"] + rows["ssgd"])
