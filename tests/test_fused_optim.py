"""SSGD on the fused C++ path against the reference path: trajectories, drift, memory."""

import pytest
import torch

import ssgd_fused
from ssgd_fused import SSGD
from tests.helpers import SmallCNN, closure_for, make_data, require_cpp
from tests.tolerances import DTYPES, assert_trajectory_close, describe

pytestmark = pytest.mark.cpp


@pytest.fixture(autouse=True)
def _cpp():
    require_cpp()


BASES = {
    "sgd_nesterov_wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=3e-3, amsgrad=True)),
}


@pytest.mark.parametrize("scope", ["tensor", "filter"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=describe)
def test_trajectory_fused_matches_reference(dtype, base, scope):
    """20 steps on a small CNN: parameters AND optimizer state of the fused path agree with the
    same algorithm run on the reference ops. (tests/test_optim.py runs the reference *optimizer*,
    which updates through the base optimizer itself, against the fused path in float32; in 16 bits
    torch's for-loop optimizers round after every op while the kernels round once.)

    16-bit runs use rademacher noise, whose values are bit-identical on both paths: with gaussian
    noise (equal within 2e-6) an occasional 16-bit displaced weight rounds the other way, the
    16-bit forward pass amplifies that into a different gradient, and after 20 steps the two runs
    differ by what training on a slightly different batch would give, which says nothing about the
    kernels. The single-step op tests cover gaussian noise in every dtype."""
    cls, kw = BASES[base]
    if dtype == torch.float16 and cls is not torch.optim.SGD:
        kw = dict(kw, eps=1e-3)  # eps=1e-8 in pure float16 Adam divides by an underflowed moment: inf
    dist = "gaussian" if dtype == torch.float32 else "rademacher"
    torch.manual_seed(0)
    models = [SmallCNN(dtype), SmallCNN(dtype)]
    models[1].load_state_dict(models[0].state_dict())
    # the same algorithm (regeneration, fused restore+update) on the reference ops: differences
    # are the kernels' alone
    opts = [SSGD(m.parameters(), cls, noise=0.5, scope=scope, distribution=dist, seed=11, backend="cpp", **kw)
            for m in models]
    opts[1]._cycle.ops = ssgd_fused.reference
    for i in range(20):
        x, y = make_data(dtype=dtype, seed=i)
        losses = [o.step(closure_for(m, x, y)) for m, o in zip(models, opts)]
        assert torch.isfinite(losses[0])
    for pf, pr in zip(models[0].parameters(), models[1].parameters()):
        assert_trajectory_close(pf.detach(), pr.detach(), dtype, msg="param")
        sf, sr = opts[0].state[pf], opts[1].state[pr]
        assert sf.keys() == sr.keys()
        for k in sf:
            if k == "step":
                assert torch.equal(sf[k], sr[k])
            else:
                assert_trajectory_close(sf[k], sr[k], dtype, msg=k)


def test_regeneration_drift_after_1000_steps_is_bounded():
    """Restoring by regeneration is not bit-exact: measure the drift against the exact-backup
    path after 1000 float32 steps (lr = 0, so the weights should not move at all).
    Documented bound (README): ||drift|| / ||w|| <= 1e-5 at alpha = 0.5 (measured about 2e-6)."""
    torch.manual_seed(0)
    x, y = make_data()
    drifts = {}
    for restore in ("regenerate", "exact"):
        model = SmallCNN()
        w0 = [p.detach().clone() for p in model.parameters()]
        opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.0, noise=0.5, seed=3, backend="cpp", restore=restore)

        def closure():
            loss = model(x).float().sum() * 0
            loss.backward()
            return loss

        for _ in range(1000):
            opt.step(closure)
        drifts[restore] = max(((p.detach() - q).norm() / q.norm()).item() for p, q in zip(model.parameters(), w0))
    assert drifts["exact"] == 0.0
    assert drifts["regenerate"] <= 1e-5


def _step_allocations(opt, model, grads):
    """Bytes allocated (profiler, CPU) inside one opt.step whose closure only hands out gradients."""
    def closure():
        for p, g in zip(model.parameters(), grads):
            if p.grad is None:
                p.grad = g
        return torch.zeros(())

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step(closure)
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("base", ["sgd_nesterov_wd", "adamw"])
def test_fused_step_allocates_no_parameter_sized_tensor(base):
    cls, kw = BASES[base]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Linear(256, 384), torch.nn.Linear(384, 128))
    grads = [torch.randn_like(p) for p in model.parameters()]
    smallest_matrix = min(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)
    for restore, expect_copy in (("regenerate", False), ("exact", True)):
        opt = SSGD(model.parameters(), cls, noise=0.5, backend="cpp", restore=restore, **kw)
        first = _step_allocations(opt, model, grads)  # the base optimizer creates its state here
        largest = _step_allocations(opt, model, grads)
        if expect_copy:  # the check can see a parameter-sized allocation: the exact mode's backup
            assert first >= smallest_matrix
        else:
            assert largest < 4096, f"a {largest}-byte allocation during a fused step"


def test_noise_norms_are_reused_and_weight_norms_measured_every_step(monkeypatch):
    """The fused update leaves the next step's ||u||^2 and ||w||^2; on CPU the next step's first
    move measures ||w||^2 as it displaces (perturb_norms_, no norm pass) and checks the cached
    value, every step, so weights changed in any way between steps get noise of the right size."""
    from ssgd_fused import ops

    torch.manual_seed(0)
    model = SmallCNN()
    x, y = make_data()
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, noise=0.5, backend="cpp")
    calls = []
    real = {name: getattr(ops, name) for name in ("norms", "perturb_norms_", "perturb_")}

    def counting(name):
        def call(params, *args, **kw):
            calls.append((name, len(params), kw["distribution"]))
            return real[name](params, *args, **kw)
        return call

    for name in real:
        monkeypatch.setattr(ops, name, counting(name))
    opt.step(closure_for(model, x, y))
    # first step: a norm pass (the three weight matrices and their noise), then +n and -n
    assert calls == [("norms", 3, "gaussian"), ("perturb_", 3, "gaussian"), ("perturb_", 3, "gaussian")]
    del calls[:]
    opt.step(closure_for(model, x, y))
    assert calls == [("perturb_norms_", 3, "gaussian"), ("perturb_", 3, "gaussian")]  # no norm pass
    del calls[:]
    with torch.no_grad():
        model.fc1.weight.mul_(3.0)  # the user changes a weight between steps
    seen = {}

    def closure():
        if "fc1" not in seen:
            seen["fc1"] = model.fc1.weight.detach().clone()
        return closure_for(model, x, y)()

    clean = model.fc1.weight.detach().clone()
    opt.step(closure)
    # the checked move finds fc1's norm stale and adds the difference for that tensor alone
    assert calls == [("perturb_norms_", 3, "gaussian"), ("perturb_", 1, "gaussian"), ("perturb_", 3, "gaussian")]
    n = (seen["fc1"] - clean).norm() / clean.norm()
    assert n.item() == pytest.approx(0.5, rel=1e-5)  # the noise follows the new weights


@pytest.mark.parametrize("scope", ["tensor", "filter"])
@pytest.mark.parametrize("restore", ["regenerate", "exact"])
def test_weight_norms_checked_in_the_move_match_a_norm_pass(monkeypatch, restore, scope):
    """The trajectory with ||w||^2 checked inside the first move equals the one with a separate
    weights-only norm pass: bitwise while nothing edits the weights (the norms are summed
    identically), and after a .data edit bitwise for exact restore (rebuilt from the clean copy),
    within float32 rounding for regeneration (the difference is added to the displaced weights)."""
    from ssgd_fused.cycle import NoiseCycle

    def run(check):
        torch.manual_seed(0)
        model = SmallCNN()
        x, y = make_data()
        opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, noise=0.5, backend="cpp",
                   restore=restore, scope=scope)
        with monkeypatch.context() as m:
            if not check:
                m.setattr(NoiseCycle, "_check_in_move", lambda self, params: False)
            for k in range(5):
                if k == 3:
                    with torch.no_grad():
                        model.fc1.weight.data.mul_(0.5)  # through .data: no version bump
                opt.step(closure_for(model, x, y))
                if k == 2:
                    before_edit = [p.detach().clone() for p in model.parameters()]
        return before_edit, [p.detach().clone() for p in model.parameters()]

    (a_mid, a_end), (b_mid, b_end) = run(True), run(False)
    for a, b in zip(a_mid, b_mid):
        assert torch.equal(a, b)
    for a, b in zip(a_end, b_end):
        if restore == "exact":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
