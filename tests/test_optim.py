"""The SSGD optimizer: maths, base-optimizer equivalence, state, safety. Runs on every backend."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn

import ssgd_fused
from ssgd_fused import SSGD, ops
from tests.helpers import SmallCNN, clone_params, closure_for, make_data


# ---- maths ----------------------------------------------------------------------------------
def test_quadratic_mean_gradient_is_exact_gradient(backend):
    """For L = 1/2 w'Aw + b'w the S-SGD mean gradient equals the gradient at the clean w."""
    torch.manual_seed(0)
    n = 37
    q = torch.randn(n, n, dtype=torch.float64)
    A = q @ q.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w = nn.Parameter(torch.randn(1, n, dtype=torch.float64))
    if backend == "cpp":  # the fused kernels take 16/32-bit floats
        A, b, w = A.float(), b.float(), nn.Parameter(w.detach().float())
    opt = SSGD([w], torch.optim.SGD, lr=0.0, noise=0.9, backend=backend)
    w0 = w.detach().clone()

    def closure():
        loss = 0.5 * (w @ A @ w.T).squeeze() + (w @ b).squeeze()
        loss.backward()
        return loss

    opt.step(closure)
    exact = (A @ w0.squeeze() + b)
    tol = 1e-10 if w.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(w.grad.squeeze(), exact, rtol=tol, atol=tol)
    # lr = 0: the clean weights come back (exactly from the backup; within the documented few-ulp
    # drift of the noise magnitude when restored by regeneration)
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=0 if backend == "reference" else 1e-6)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_quartic_matches_paper_eq8(alpha, backend):
    """L(w) = w^4 in 1-D: mean gradient = L'(w) + L'''(w) n^2 / 2 = 4 w^3 (1 + 3 alpha^2), exactly,
    because ||n|| = alpha |w| for a one-element tensor."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    w = nn.Parameter(torch.tensor([1.7], dtype=dtype))
    opt = SSGD([{"params": [w], "noise": alpha}], torch.optim.SGD, lr=0.0, backend=backend)

    def closure():
        loss = (w**4).sum()
        loss.backward()
        return loss

    opt.step(closure)
    expected = 4 * 1.7**3 * (1 + 3 * alpha**2)
    assert w.grad.item() == pytest.approx(expected, rel=1e-12 if dtype == torch.float64 else 1e-5)


def _capture_displacements(model, opt, x, y):
    clean = clone_params(model)
    seen = []

    def closure():
        seen.append(clone_params(model))
        return closure_for(model, x, y)()

    opt.step(closure)
    return clean, seen


@pytest.mark.parametrize("scope", ["tensor", "filter"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "uniform"])
def test_noise_norm_is_alpha_times_weight_norm(scope, distribution, backend):
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    alpha = 0.5
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, noise=alpha, scope=scope,
               distribution=distribution, backend=backend, restore="exact")
    clean, (plus, minus) = _capture_displacements(model, opt, x, y)
    for p, c, wp, wm in zip(model.parameters(), clean, plus, minus):
        if p.dim() < 2:
            assert torch.equal(wp, c) and torch.equal(wm, c), "1-D parameters carry no noise by default"
            continue
        rows = c.shape[0] if scope == "filter" else 1
        npl = (wp.double() - c.double()).reshape(rows, -1)
        nmi = (wm.double() - c.double()).reshape(rows, -1)
        target = alpha * c.double().reshape(rows, -1).norm(dim=1)
        torch.testing.assert_close(npl.norm(dim=1), target, rtol=1e-6, atol=0)
        torch.testing.assert_close(nmi, -npl, rtol=1e-5, atol=1e-7)  # symmetric: -n


def test_mean_gradient_in_grad_and_mean_loss():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.0, noise=0.5, seed=5, backend="reference")
    twin = copy.deepcopy(model)
    grads, losses = [], []
    for sign in (1, -1):  # evaluate by hand at w + n and w - n with the same noise
        m = copy.deepcopy(twin)
        with torch.no_grad():
            for tid, p in enumerate(m.parameters()):
                if p.dim() >= 2:
                    u = ssgd_fused.noise.gaussian(p.numel(), 5, 0, tid).view(p.shape)
                    s = 0.5 * p.double().norm() / u.double().norm()
                    p.add_(sign * (s.float() * u))
        losses.append(closure_for(m, x, y)())
        grads.append([p.grad for p in m.parameters()])
    loss = opt.step(closure_for(model, x, y))
    assert loss.item() == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-6)
    for p, gp, gm in zip(model.parameters(), *grads):
        torch.testing.assert_close(p.grad, (gp + gm) / 2, rtol=1e-5, atol=1e-7)


def test_one_sided_mode_single_pass():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, mode="one_sided", backend="reference")
    calls = []
    inner = closure_for(model, x, y)
    clean = clone_params(model)
    opt.step(lambda: calls.append(1) or inner())
    assert len(calls) == 1
    assert not all(torch.equal(a, b) for a, b in zip(clean, model.parameters()))


# ---- noise = 0 is the base optimizer, bit for bit --------------------------------------------
BASES = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
]


@pytest.mark.parametrize("base_cls,kw", BASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_noise_zero_is_base_optimizer_bitwise(base_cls, kw, backend):
    torch.manual_seed(0)
    m1 = SmallCNN()
    m2 = copy.deepcopy(m1)
    x, y = make_data()
    base = base_cls(m1.parameters(), **kw)
    opt = SSGD(m2.parameters(), base_cls, noise=0.0, backend=backend, **kw)
    for _ in range(10):
        base.zero_grad()
        closure_for(m1, x, y)()
        base.step()
        opt.step(closure_for(m2, x, y))
    # Bitwise everywhere except fused Adam: torch's vectorised CPU sqrt is not correctly rounded
    # (about 20% of float32 results are 1 ulp off the IEEE sqrt the kernel uses), so fused
    # Adam/AdamW agree with torch to an ulp per step instead of bit for bit.
    bitwise = backend == "reference" or base_cls is torch.optim.SGD
    check = (lambda a, b: torch.equal(a, b)) if bitwise else (
        lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert check(a, b)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert base.state[a].keys() == opt.state[b].keys()
        for k, v in base.state[a].items():
            assert check(torch.as_tensor(v), torch.as_tensor(opt.state[b][k])), k


# ---- groups, defaults, schedulers ----------------------------------------------------------
def test_one_d_parameters_untouched_by_default_but_group_alpha_applies():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    groups = [{"params": [model.conv.weight, model.fc1.weight, model.fc2.weight, model.fc1.bias]},
              {"params": [model.scale], "noise": 0.3},
              {"params": [model.conv.bias, model.fc2.bias], "noise": 0.0}]
    opt = SSGD(groups, torch.optim.SGD, lr=0.1, noise=0.5, backend="reference")
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    def closure():
        seen.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return closure_for(model, x, y)()

    opt.step(closure)
    assert torch.equal(seen["fc1.bias"], clean["fc1.bias"])
    assert torch.equal(seen["conv.bias"], clean["conv.bias"])
    n = (seen["scale"] - clean["scale"]).norm() / clean["scale"].norm()
    assert n.item() == pytest.approx(0.3, rel=1e-5)
    n = (seen["fc1.weight"] - clean["fc1.weight"]).norm() / clean["fc1.weight"].norm()
    assert n.item() == pytest.approx(0.5, rel=1e-5)


def test_seed_from_torch_manual_seed():
    model = SmallCNN()
    torch.manual_seed(3)
    a = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference").seed
    torch.manual_seed(3)
    b = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference").seed
    torch.manual_seed(4)
    c = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference").seed
    assert a == b != c and 0 <= a < 2**64


def test_param_groups_shared_and_lr_scheduler():
    model = SmallCNN()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_data()
    opt.step(closure_for(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_parameter_without_grad_is_restored_and_skipped(backend):
    torch.manual_seed(0)
    model = SmallCNN()
    unused = nn.Parameter(torch.randn(4, 6))
    x, y = make_data()
    opt = SSGD(list(model.parameters()) + [unused], torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    before = unused.detach().clone()
    opt.step(closure_for(model, x, y))
    assert unused.grad is None
    assert torch.allclose(unused, before, rtol=0, atol=1e-6)  # restored (by regeneration: within ulps)
    assert "momentum_buffer" not in opt.state[unused]


# ---- state ----------------------------------------------------------------------------------
def _train(model, opt, steps, seed=0):
    for i in range(steps):
        x, y = make_data(seed=seed + i)
        opt.step(closure_for(model, x, y))


@pytest.mark.parametrize("base_cls,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                         (torch.optim.AdamW, dict(lr=1e-2))], ids=["sgd", "adamw"])
def test_resume_gives_same_trajectory(base_cls, kw, backend):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = SSGD(model.parameters(), base_cls, noise=0.5, seed=99, backend=backend, **kw)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 4, seed=3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = SmallCNN()
    model2.load_state_dict(ckpt["model"])
    opt2 = SSGD(model2.parameters(), base_cls, noise=0.5, seed=1, backend=backend, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.seed == 99 and opt2.noise_step == 3
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    _train(model2, opt2, 4, seed=3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_state_dict_contents():
    model = SmallCNN()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=2**64 - 1, backend="reference")
    _train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["ssgd"] == {"seed": 2**64 - 1, "step": 2, "spec_version": 1}
    assert len(sd["state"]) == len(list(model.parameters()))
    assert all(g["ssgd_seed"] == 2**64 - 1 and g["ssgd_step"] == 2 for g in sd["param_groups"])
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()  # not SSGD's
    with pytest.raises(ValueError, match="ssgd"):
        opt.load_state_dict(plain)
    # what torch.distributed.checkpoint's helpers keep ("state", "param_groups") is enough
    opt2 = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=5, backend="reference")
    opt2.load_state_dict(copy.deepcopy({k: v for k, v in sd.items() if k != "ssgd"}))
    assert (opt2.seed, opt2.noise_step) == (2**64 - 1, 2)
    assert all(not any(k.startswith("ssgd_") for k in g) for g in opt2.param_groups)


# ---- weights are never left displaced -------------------------------------------------------
class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_pass", [0, 1])
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_in_closure_restores_clean_weights(fail_pass, exc, backend):
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    clean = clone_params(model)
    calls = []
    inner = closure_for(model, x, y)

    def closure():
        calls.append(1)
        if len(calls) == fail_pass + 1:
            raise exc()
        return inner()

    with pytest.raises(exc):
        opt.step(closure)
    for a, b in zip(clean, model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert opt.noise_step == 0
    opt.step(inner)  # usable afterwards
    assert opt.noise_step == 1


def test_twin_passes_manual_loop_and_break(backend):
    torch.manual_seed(0)
    model = SmallCNN()
    ref = copy.deepcopy(model)
    x, y = make_data()
    kw = dict(lr=0.1, momentum=0.9, seed=7, backend=backend)
    opt = SSGD(model.parameters(), torch.optim.SGD, **kw)
    opt_ref = SSGD(ref.parameters(), torch.optim.SGD, **kw)
    opt.zero_grad()
    passes = []
    for k in opt.twin_passes():
        passes.append(k)
        closure_for(model, x, y)()
    opt.step()
    opt_ref.step(closure_for(ref, x, y))
    assert passes == [0, 1]
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # leaving the loop early restores the clean weights and does not allow a step
    clean = clone_params(model)
    for _ in opt.twin_passes():
        closure_for(model, x, y)()
        break
    for a, b in zip(clean, model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="twin_passes"):
        opt.step()


def test_state_dict_inside_passes_restores_first():
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    clean = clone_params(model)
    with pytest.raises(RuntimeError, match="restored in the middle"):
        for _ in opt.twin_passes():
            closure_for(model, x, y)()
            opt.state_dict()
            for a, b in zip(clean, model.parameters()):
                assert torch.equal(a, b)
    for a, b in zip(clean, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["opt.zero_grad()", "model.zero_grad()", "grad = None"])
def test_closure_that_zeroes_or_drops_grads_accumulates_both_passes(backend, how):
    """optimizer.zero_grad() inside the closure (Lightning's automatic optimization does it) is
    deferred in the second pass; gradients set to None there (model.zero_grad(), set_to_none) are
    added back into the first pass's tensors. Either way the result is the closure's without it."""
    torch.manual_seed(0)
    models = [SmallCNN(), SmallCNN()]
    models[1].load_state_dict(models[0].state_dict())
    x, y = make_data()
    opts = [SSGD(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=5, backend=backend) for m in models]
    inner = [closure_for(m, x, y) for m in models]

    def zeroing():
        if how == "opt.zero_grad()":
            opts[0].zero_grad()
        elif how == "model.zero_grad()":
            models[0].zero_grad()
        else:
            for p in models[0].parameters():
                p.grad = None
        return inner[0]()

    for _ in range(3):
        la, lb = opts[0].step(zeroing), opts[1].step(inner[1])
        assert torch.equal(la, lb)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_closure_that_zeroes_grads_in_place_is_refused(backend):
    """zero_grad(set_to_none=False) on the model inside the closure destroys the first pass's
    gradient: a clear error, the clean weights restored, nothing updated."""
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    clean = clone_params(model)
    inner = closure_for(model, x, y)

    def closure():
        model.zero_grad(set_to_none=False)
        return inner()

    with pytest.raises(RuntimeError, match="overwritten in place"):
        opt.step(closure)
    for a, b in zip(clean, model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert opt.noise_step == 0 and len(opt.state) == 0
    opt.step(inner)  # still usable


# ---- bad input: clear errors, nothing modified -----------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(noise=-0.1), ValueError, "noise"),
    (dict(noise=float("nan")), ValueError, "noise"),
    (dict(noise=float("inf")), ValueError, "noise"),
    (dict(noise="0.5"), TypeError, "noise"),
    (dict(distribution="laplace"), ValueError, "distribution"),
    (dict(scope="layer"), ValueError, "scope"),
    (dict(mode="sam"), ValueError, "mode"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(restore="never"), ValueError, "restore"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
])
def test_bad_options(kwargs, exc, match):
    model = SmallCNN()
    before = clone_params(model)
    with pytest.raises(exc, match=match):
        SSGD(model.parameters(), torch.optim.SGD, lr=0.1, **kwargs)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_bad_group_alpha():
    model = SmallCNN()
    with pytest.raises(ValueError, match="param group 'noise'"):
        SSGD([{"params": model.parameters(), "noise": -1.0}], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("p", [torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, 3, dtype=torch.complex64)],
                         ids=["int64", "complex64"])
def test_bad_parameter_dtype(p):
    with pytest.raises(TypeError, match="floating-point"):
        SSGD([p], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("cls", [torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), torch.nn.Linear, "SGD", SSGD],
                         ids=["instance", "module", "string", "ssgd"])
def test_bad_base_optimizer(cls):
    with pytest.raises(TypeError, match="base_optimizer_cls"):
        SSGD(SmallCNN().parameters(), cls, lr=0.1)


def test_sparse_gradient_refused_and_weights_clean():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = SSGD(emb.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    clean = emb.weight.detach().clone()

    def closure():
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure)
    assert torch.equal(emb.weight, clean)


def test_step_without_closure_needs_twin_passes():
    opt = SSGD(SmallCNN().parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_step_with_a_closure_after_twin_passes_raises_and_keeps_the_loop(backend):
    """A closure handed to step() after a completed twin_passes() loop (Lightning's manual
    optimization without the callback does this) would discard the loop's gradients: a clear error,
    with the weights clean and the gradients the loop's; step() then applies the loop's update."""
    torch.manual_seed(0)
    model = SmallCNN()
    ref = copy.deepcopy(model)
    x, y = make_data()
    kw = dict(lr=0.1, momentum=0.9, seed=7, backend=backend)
    opt, opt_ref = SSGD(model.parameters(), torch.optim.SGD, **kw), SSGD(ref.parameters(), torch.optim.SGD, **kw)
    clean = clone_params(model)
    opt.zero_grad()
    for _ in opt.twin_passes():
        closure_for(model, x, y)()
    grads = [p.grad.clone() for p in model.parameters()]
    after = clone_params(model)
    for a, b in zip(clean, after):  # restored by regeneration: a few ulp
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="discard that loop's gradients.*SSGDCallback"):
        opt.step(closure_for(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(after, model.parameters()))  # the refusal moved nothing
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert opt.noise_step == 1
    opt.step()
    opt_ref.step(closure_for(ref, x, y))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt.step(closure_for(model, x, y))  # the closure API again, once the update is applied
    assert opt.noise_step == 2


def test_load_state_dict_after_twin_passes_starts_afresh():
    """A loaded state drops a completed loop's pending update: step(closure) runs a new step."""
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=7, backend="reference")
    sd = opt.state_dict()
    for _ in opt.twin_passes():
        closure_for(model, x, y)()
    opt.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="twin_passes"):
        opt.step()  # nothing pending any more
    opt.step(closure_for(model, x, y))
    assert opt.noise_step == 1


def test_step_with_closure_warns_when_it_discards_fresh_gradients():
    """step(closure) zeroes the gradients first: a backward outside the closure since the last step
    (what Lightning's accumulation does without the callback) is reported, not silently dropped;
    an ordinary closure loop, or gradients zeroed in place by the optimizer, are not."""
    import warnings

    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, seed=7, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(closure_for(model, x, y))
        opt.zero_grad(set_to_none=False)
        opt.step(closure_for(model, x, y))
        opt.zero_grad()
        for _ in opt.twin_passes():
            closure_for(model, x, y)()
        opt.step()
        opt.step(closure_for(model, x, y))
    closure_for(model, x, y)()  # a micro-batch's backward outside the closure
    n = sum(1 for p in model.parameters())
    with pytest.warns(RuntimeWarning, match=f"{n} parameter\\(s\\) had gradients computed since the last step"):
        opt.step(closure_for(model, x, y))


def test_auto_backend_warns_once_when_falling_back(monkeypatch):
    monkeypatch.setattr(ops, "cpp_available", lambda: False)
    monkeypatch.setattr(ops, "cpp_unavailable_reason", lambda: "test says so")
    with pytest.warns(RuntimeWarning, match="test says so") as rec:
        opt = SSGD(SmallCNN().parameters(), torch.optim.SGD, lr=0.1)
    assert len(rec) == 1 and opt.backend == "reference"
    with pytest.raises(RuntimeError, match="test says so"):
        SSGD(SmallCNN().parameters(), torch.optim.SGD, lr=0.1, backend="cpp")


def test_float64_parameters_use_reference():
    model = SmallCNN(dtype=torch.float64)
    x, y = make_data(dtype=torch.float64)
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    loss = opt.step(closure_for(model, x, y))
    assert math.isfinite(loss.item())
