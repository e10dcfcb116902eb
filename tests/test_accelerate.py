"""S-SGD in accelerate loops: prepare(model, SSGD, loader), twin_passes / accumulated_passes,
accelerator.backward / accumulate / clip_grad_norm_, against the plain loop on the same batches."""

import pytest
import torch
import torch.nn.functional as F

import ssgd_fused

accelerate = pytest.importorskip("accelerate")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ssgd_fused.integrations.accelerate import accumulated_passes, micro_batches, twin_passes  # noqa: E402

BATCHES, CLIP = 8, 0.3


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state (gradient accumulation flags) process-wide: start each test anew."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_optimizer(params):
    return ssgd_fused.SSGD(params, torch.optim.SGD, lr=0.5, momentum=0.9, noise=0.5, seed=7)


@pytest.fixture
def data():
    return TensorDataset(torch.randn(BATCHES * 8, 8), torch.randint(0, 3, (BATCHES * 8,)))


def plain_loop(data, k, epochs=2):
    net = make_model()
    opt = make_optimizer(net.parameters())
    batches = list(DataLoader(data, batch_size=8))
    for _ in range(epochs):
        for i in range(0, len(batches), k):
            opt.zero_grad()
            for _ in opt.twin_passes():
                for x, y in batches[i:i + k]:
                    (F.cross_entropy(net(x), y) / k).backward()  # accelerator.backward divides by k
            torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            opt.step()
    return net, opt


def assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p - q).abs().max().item()


def test_twin_passes_through_accelerated_optimizer(data):
    """twin_passes() takes the AcceleratedOptimizer that prepare() returns; accelerator.backward,
    accelerator.accumulate (one micro-batch per step) and clip_grad_norm_ on the mean gradient."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    model, optimizer, loader = accelerator.prepare(model, make_optimizer(model.parameters()),
                                                   DataLoader(data, batch_size=8))
    assert isinstance(optimizer, accelerate.optimizer.AcceleratedOptimizer)
    for _ in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                for _ in twin_passes(optimizer, accelerator, model):
                    accelerator.backward(F.cross_entropy(model(x), y))
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()
                optimizer.zero_grad()
    net, opt = plain_loop(data, k=1)
    assert_same(model, net)
    assert optimizer.optimizer.noise_step == opt.noise_step == 2 * BATCHES


def test_prepare_wraps_the_ssgd_given():
    """prepare() wraps the very SSGD (its param groups are the model's parameters)."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    ssgd = make_optimizer(model.parameters())
    model, optimizer = accelerator.prepare(model, ssgd)
    assert ssgd_fused.integrations.unwrap(optimizer) is ssgd


@pytest.mark.parametrize("k", [2, 3])  # 3: the epoch's 8 micro-batches end with a window of 2
def test_accumulated_passes_equals_plain_loop(data, k):
    """gradient_accumulation_steps=k: every micro-batch of a step at w+n, then all at w-n (one noise),
    inside accelerator.accumulate(); the step happens once per k micro-batches."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=k)
    model = make_model()
    model, optimizer, loader = accelerator.prepare(model, make_optimizer(model.parameters()),
                                                   DataLoader(data, batch_size=8))
    for _ in range(2):
        for step_batches in micro_batches(loader, accelerator.gradient_accumulation_steps):
            for x, y in accumulated_passes(optimizer, step_batches, accelerator, model):
                with accelerator.accumulate(model):
                    accelerator.backward(F.cross_entropy(model(x), y))
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()
    net, opt = plain_loop(data, k=k)
    assert_same(model, net)
    assert optimizer.optimizer.noise_step == opt.noise_step == 2 * -(-BATCHES // k)


def test_passes_inside_each_micro_batch_raise(data):
    """twin_passes inside accelerator.accumulate() per micro-batch would draw a noise and take the
    mean per micro-batch: refused, with the right pattern in the message; clean weights."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    model, optimizer, loader = accelerator.prepare(model, make_optimizer(model.parameters()),
                                                   DataLoader(data, batch_size=8))
    w = model[0].weight.detach().clone()
    x, y = next(iter(loader))
    with pytest.raises(RuntimeError, match="accumulated_passes"):
        with accelerator.accumulate(model):
            for _ in twin_passes(optimizer, accelerator, model):
                accelerator.backward(F.cross_entropy(model(x), y))
    assert torch.equal(model[0].weight, w)


def test_micro_batches():
    assert list(micro_batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(micro_batches(iter(range(4)), 2)) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        list(micro_batches(range(3), 0))
