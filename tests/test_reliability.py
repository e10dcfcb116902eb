"""Reliability: asynchronous interrupts never leave the weights displaced, weights edited through
`.data` get noise of the right size, and a fuzz of the public API keeps its invariants."""

import copy
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssgd_fused import SSGD
from tests.helpers import SmallCNN, clone_params, closure_for, make_data, require_cpp

ON_MAIN_THREAD_UNIX = hasattr(signal, "setitimer")


# ---- asynchronous KeyboardInterrupt at random moments -------------------------------------------
class MLP(nn.Module):
    def __init__(self, bn=False):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.bn = nn.BatchNorm1d(256) if bn else nn.Identity()
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(opt, model, x, y, api):
    if api == "closure":
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    else:
        opt.zero_grad()
        for _ in opt.twin_passes():
            F.cross_entropy(model(x), y).backward()
        opt.step()


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _max_rel_err(a, b):
    return max(((u - v).norm() / v.norm().clamp(min=1e-12)).item() for u, v in zip(a, b))


CASES = {
    "closure-regenerate": dict(api="closure", backend="cpp", restore="regenerate"),
    "closure-exact": dict(api="closure", backend="cpp", restore="exact"),
    "twin_passes": dict(api="twin", backend="cpp", restore="regenerate"),
    "pairs2-bn-first": dict(api="closure", backend="cpp", restore="regenerate", pairs=2, bn_stats="first", bn=True),
    "reference": dict(api="closure", backend="reference"),
}


@pytest.fixture
def one_thread():
    """Steps of steady length on a shared machine, so that the interrupts spread over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not ON_MAIN_THREAD_UNIX, reason="needs signal.setitimer")
@pytest.mark.parametrize("name", list(CASES))
def test_random_keyboard_interrupts_never_leave_weights_displaced(name, one_thread):
    """A timer signal raises KeyboardInterrupt at a random moment of a step, many times. After
    each, the weights are the clean ones of before the step or exactly the completed step (a
    shadow optimizer that is never interrupted takes the same steps), the optimizer's state dict
    agrees, and training goes on."""
    case = dict(CASES[name])
    api, bn = case.pop("api"), case.pop("bn", False)
    if case["backend"] == "cpp":
        require_cpp()
    torch.manual_seed(0)
    model, shadow = MLP(bn), MLP(bn)
    shadow.load_state_dict(model.state_dict())
    kw = dict(lr=0.05, momentum=0.9, noise=0.5, seed=3, **case)
    opt, sopt = (SSGD(m.parameters(), torch.optim.SGD, model=m, **kw) for m in (model, shadow))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    t0 = time.perf_counter()
    for _ in range(3):
        _run(sopt, shadow, x, y, api)
        _run(opt, model, x, y, api)
    step_s = (time.perf_counter() - t0) / 6
    rng = random.Random(0)
    old = signal.signal(signal.SIGALRM, _interrupt)
    trials, interrupted, budget = 0, 0, time.perf_counter() + 15
    try:
        while trials < 250 and time.perf_counter() < budget:
            trials += 1
            # the shadow starts each trial where the model is: each trial checks one step
            shadow.load_state_dict(model.state_dict())
            sopt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own buffers
            before = _weights(model)
            step_before = opt.noise_step
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0, 1.3 * step_s))
                _run(opt, model, x, y, api)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                signal.setitimer(signal.ITIMER_REAL, 0)
                interrupted += 1
            now = _weights(model)
            if opt.noise_step == step_before + 1:  # the passes completed
                if api == "twin":  # ... and the update after them, unless interrupted before it
                    sopt.zero_grad()
                    for _ in sopt.twin_passes():
                        F.cross_entropy(shadow(x), y).backward()
                    if _max_rel_err(now, before) > 1e-5:
                        sopt.step()
                else:
                    _run(sopt, shadow, x, y, api)
                err = _max_rel_err(now, _weights(shadow))
                assert err < 1e-5, f"trial {trials}: completed step differs from the shadow by {err:.3g}"
            else:
                assert opt.noise_step == step_before, "the step counter moved by more than one step"
                err = _max_rel_err(now, before)
                assert err < 1e-5, f"trial {trials}: interrupted step left weights displaced by {err:.3g}"
            assert opt.state_dict()["ssgd"]["step"] == opt.noise_step
            assert torch.is_grad_enabled(), "an interrupt left autograd disabled"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert trials >= 60 and interrupted >= trials // 4, (trials, interrupted)
    _run(opt, model, x, y, api)  # still trains
    assert all(torch.isfinite(p).all() for p in model.parameters())


_TRAINER = textwrap.dedent("""
    import sys, torch, torch.nn as nn, torch.nn.functional as F
    from ssgd_fused import SSGD
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, noise=0.5, seed=9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    try:
        for i in range(100000):
            opt.step(lambda: F.cross_entropy(model(x), y).backward())
            if i == 2:
                print("ready", flush=True)
    except KeyboardInterrupt:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, sys.argv[1])
        print("saved", flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_sigint_to_a_training_process_saves_a_clean_checkpoint(tmp_path):
    """A real SIGINT from another process: the checkpoint the trainer saves on KeyboardInterrupt
    holds the weights of exactly the steps its optimizer state says were taken."""
    script = tmp_path / "train.py"
    script.write_text(_TRAINER)
    ckpts = []
    for trial, delay in enumerate((0.05, 0.21, 0.37)):
        ckpt = tmp_path / f"ckpt{trial}.pt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert "saved" in out and proc.returncode == 0
        ckpts.append(torch.load(ckpt, weights_only=True))
    # replay: the same seeds and data, uninterrupted, for each checkpoint's number of steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = SSGD(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, noise=0.5, seed=9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
    for ck in sorted(ckpts, key=lambda c: c["opt"]["ssgd"]["step"]):
        while opt.noise_step < ck["opt"]["ssgd"]["step"]:
            opt.step(lambda: F.cross_entropy(model(x), y).backward())
        for k, v in model.state_dict().items():
            torch.testing.assert_close(ck["model"][k], v, rtol=1e-4, atol=1e-5, msg=f"{k} after {opt.noise_step}")


# ---- weights edited through .data between steps -----------------------------------------------------
@pytest.mark.parametrize("edit", ["assign", "in-place", "copy_"])
@pytest.mark.parametrize("scope", ["tensor", "filter"])
def test_data_edits_get_noise_of_the_right_size(backend, edit, scope):
    """||n|| = alpha ||w|| on the step after weights were changed through .data (which bumps no
    version counter), measured on the displaced weights the closure sees."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 16)
    alpha = 0.5
    opt = SSGD(lin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, noise=alpha, scope=scope, backend=backend)
    x = torch.randn(32, 8)
    opt.step(lambda: lin(x).pow(2).mean().backward())
    opt.step(lambda: lin(x).pow(2).mean().backward())
    if edit == "assign":
        lin.weight.data = torch.randn(16, 8) * 10
    elif edit == "in-place":
        lin.weight.data.mul_(7.0)
    else:
        lin.weight.data.copy_(torch.randn(16, 8) * 3)
    clean = lin.weight.detach().clone()
    seen = []

    def closure():
        seen.append(lin.weight.detach().clone())
        lin(x).pow(2).mean().backward()

    opt.step(closure)
    n = seen[0] - clean
    if scope == "tensor":
        torch.testing.assert_close(n.norm(), alpha * clean.norm(), rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(n.norm(dim=1), alpha * clean.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(seen[1] - clean, -n, rtol=1e-5, atol=1e-6)


# ---- fuzz: random sequences of public-API calls ---------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

ACTIONS = ["step", "twin", "break", "exception", "interrupt", "zero_grad", "state_dict", "add_param_group",
           "scheduler"]


class Growing(nn.Module):
    """A small CNN whose output also sums extra layers added later (add_param_group)."""

    def __init__(self):
        super().__init__()
        self.body = SmallCNN()
        self.extra = nn.ModuleList()

    def forward(self, x):
        out = self.body(x)
        for m in self.extra:
            out = out + m(out)
        return out


class Raise(Exception):
    pass


def _apply(action, model, opt, sched, x, y, rng):
    inner = closure_for(model, x, y)
    if action == "step":
        opt.step(inner)
    elif action == "twin":
        opt.zero_grad()
        for _ in opt.twin_passes():
            inner()
        opt.step()
    elif action == "break":
        for _ in opt.twin_passes():
            inner()
            break
    elif action in ("exception", "interrupt"):
        fail_at = rng.randrange(2)
        calls = []

        def closure():
            calls.append(1)
            if len(calls) == fail_at + 1:
                raise Raise() if action == "exception" else KeyboardInterrupt()
            return inner()

        with pytest.raises(Raise if action == "exception" else KeyboardInterrupt):
            opt.step(closure)
    elif action == "zero_grad":
        opt.zero_grad(set_to_none=rng.random() < 0.5)
    elif action == "state_dict":
        sd = copy.deepcopy(opt.state_dict())
        opt.load_state_dict(sd)
        assert opt.state_dict()["ssgd"] == sd["ssgd"]
    elif action == "add_param_group":
        torch.manual_seed(len(model.extra) + 100)
        layer = nn.Linear(3, 3)
        model.extra.append(layer)
        opt.add_param_group({"params": list(layer.parameters()), "lr": 0.02})
    elif action == "scheduler":
        sched.step()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
@hypothesis.settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(actions=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=8),
                  base=st.sampled_from(["sgd", "adamw"]), restore=st.sampled_from(["regenerate", "exact"]))
def test_fuzz_public_api_invariants(actions, base, restore):
    """The same random call sequence on the fused path and on the reference: after every call
    the weights agree (fused = reference within tolerance), calls that end without a step leave
    the clean weights, the state dict round-trips, and the step counters agree."""
    from ssgd_fused import ops

    if not ops.cpp_available():
        pytest.skip("needs the C++ kernels")
    cls, kw = (torch.optim.SGD, dict(lr=0.05, momentum=0.9)) if base == "sgd" else (torch.optim.AdamW, dict(lr=1e-3))
    torch.manual_seed(0)
    models = [Growing(), Growing()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SSGD(models[0].parameters(), cls, noise=0.5, seed=4, backend="cpp", restore=restore, **kw),
            SSGD(models[1].parameters(), cls, noise=0.5, seed=4, backend="reference", **kw)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9) for o in opts]
    for i, action in enumerate(actions):
        x, y = make_data(seed=i)
        before = clone_params(models[0])
        steps = opts[0].noise_step
        for m, o, s in zip(models, opts, scheds):
            _apply(action, m, o, s, x, y, random.Random(i))
        assert opts[0].noise_step == opts[1].noise_step
        if opts[0].noise_step == steps and action != "add_param_group":
            for a, b in zip(before, models[0].parameters()):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"after {actions[:i + 1]}")


# ---- the critical sections themselves ----------------------------------------------------------------
@pytest.mark.skipif(not ON_MAIN_THREAD_UNIX, reason="POSIX signals")
def test_critical_section_delivers_a_signal_after_the_block():
    from ssgd_fused.critical import critical

    seen = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append("handler"))
    try:
        with critical():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            for _ in range(1000):  # bytecodes at which the handler would otherwise run
                pass
            seen.append("block done")
        assert seen == ["block done", "handler"]
        assert signal.getsignal(signal.SIGUSR1) is not None and critical._owner is None
        os.kill(os.getpid(), signal.SIGUSR1)  # handlers are back: delivered at once
        time.sleep(0.01)
        assert seen[-1] == "handler" and len(seen) == 3
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.skipif(not ON_MAIN_THREAD_UNIX, reason="POSIX signals")
@pytest.mark.parametrize("fail_on", [1, 2])
def test_critical_section_survives_a_signal_while_entering_or_leaving(monkeypatch, fail_on):
    """A KeyboardInterrupt raised while the handlers are swapped (entering) or put back (leaving)
    leaves every handler as it was and no section marked active, so later sections still defer."""
    import _signal

    from ssgd_fused import critical as C

    handler = lambda s, f: None  # noqa: E731
    old = signal.signal(signal.SIGUSR2, handler)
    real = _signal.signal
    calls = {"n": 0}

    def flaky(sig, h):
        calls["n"] += 1
        if calls["n"] == fail_on:  # 1: the first swap while entering; 2: the first restore while leaving
            raise KeyboardInterrupt
        return real(sig, h)

    try:
        monkeypatch.setattr(C._signal, "signal", flaky)
        with pytest.raises(KeyboardInterrupt):
            with C.critical():
                pass
        monkeypatch.setattr(C._signal, "signal", real)
        assert C.critical._owner is None
        assert signal.getsignal(signal.SIGUSR2) is handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with C.critical() as sec:
            assert sec.active
    finally:
        signal.signal(signal.SIGUSR2, old)
