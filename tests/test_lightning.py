"""S-SGD in PyTorch Lightning: every Trainer run is compared with the plain loop on the same batches.

The plain loops are the README's: `opt.step(closure)`, or `opt.zero_grad(); for _ in
opt.twin_passes(): <every micro-batch's backward>; clip; opt.step()`.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssgd_fused

pl = pytest.importorskip("lightning.pytorch")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ssgd_fused.integrations.lightning import SSGDCallback  # noqa: E402
from tests import _lightning_ddp as ddp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")

BATCHES = 8  # per epoch
EPOCHS = 2


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_optimizer(params):
    return ssgd_fused.SSGD(params, torch.optim.SGD, lr=0.5, momentum=0.9, noise=0.5, seed=7)


def make_scheduler(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


@pytest.fixture
def loader():
    x, y = torch.randn(BATCHES * 8, 8), torch.randint(0, 3, (BATCHES * 8,))
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Net(pl.LightningModule):
    def __init__(self, scheduler=True):
        super().__init__()
        self.net = make_model()
        self.scheduler = scheduler
        self.before_step = []  # per on_before_optimizer_step: (a weight, its gradient)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = make_optimizer(self.parameters())
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        w = self.net[0].weight
        self.before_step.append((w.detach().clone(), w.grad.clone()))


def fit(module, loader, callbacks=(), max_epochs=EPOCHS, ckpt_path=None, **kwargs):
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=list(callbacks),
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, **kwargs)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def plain_twin_loop(loader, k=1, clip=None, bf16=False, epochs=EPOCHS, scheduler=True):
    """The README's manual loop: all of a step's micro-batches in each pass, loss / k (Lightning's
    normalisation, also for a shorter last window), clipping on the mean gradient."""
    net = make_model()
    opt = make_optimizer(net.parameters())
    sched = make_scheduler(opt) if scheduler else None
    batches = list(loader)
    before = []
    for _ in range(epochs):
        for i in range(0, len(batches), k):
            opt.zero_grad()
            for _ in opt.twin_passes():
                for x, y in batches[i:i + k]:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = F.cross_entropy(net(x), y)
                    (loss / k).backward()
            before.append((net[0].weight.detach().clone(), net[0].weight.grad.clone()))
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
    return net, opt, before


def assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max difference {(p - q).abs().max().item():.3g}"


def test_automatic_optimization_as_written_equals_closure_loop(loader):
    """No callback: configure_optimizers returns an SSGD (and a per-step scheduler); Lightning's
    optimizer.step(closure) runs the closure in both passes. Same bits as the closure loop."""
    module = Net()
    trainer = fit(module, loader)

    net = make_model()
    opt = make_optimizer(net.parameters())
    sched = make_scheduler(opt)
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.step(lambda: F.cross_entropy(net(x), y).backward())
            sched.step()
    assert_same_params(module.net, net)
    ssgd = trainer.optimizers[0]
    assert ssgd.noise_step == opt.noise_step == EPOCHS * BATCHES
    assert ssgd.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.5


@pytest.mark.parametrize("k, clip, precision", [
    (1, None, "32-true"),
    (3, 0.3, "32-true"),      # windows of 3, 3 and 2 micro-batches per epoch; clipping active
    (2, 0.3, "bf16-mixed"),
])
def test_callback_equals_plain_twin_loop(loader, k, clip, precision):
    """SSGDCallback: accumulate_grad_batches runs every micro-batch at w+n and w-n under one noise,
    gradient_clip_val and on_before_optimizer_step act once per step on the mean gradient at the
    clean weights, bf16 autocast; same bits as the plain loop."""
    module = Net()
    trainer = fit(module, loader, [SSGDCallback()], accumulate_grad_batches=k, gradient_clip_val=clip,
                  precision=precision)
    net, opt, before = plain_twin_loop(loader, k=k, clip=clip, bf16=precision == "bf16-mixed")
    assert_same_params(module.net, net)
    steps = EPOCHS * -(-BATCHES // k)
    assert trainer.global_step == trainer.optimizers[0].noise_step == opt.noise_step == steps
    assert len(module.before_step) == steps  # once per step: clean weights, mean gradient
    for (w, g), (w_plain, g_plain) in zip(module.before_step, before):
        assert torch.equal(w, w_plain) and torch.equal(g, g_plain)
    if clip is not None:  # the clipping did something: without it the weights differ
        unclipped, _, _ = plain_twin_loop(loader, k=k, bf16=precision == "bf16-mixed")
        assert not torch.equal(unclipped[0].weight, net[0].weight)


def test_grad_scaler_step_equals_plain_loop(loader):
    """fp16 AMP with a GradScaler (Lightning's MixedPrecision plugin, given a CPU scaler): Lightning
    calls the closure itself, unscales, clips and calls scaler.step(optimizer) bare. Same bits as
    the plain GradScaler loop, skipped steps (inf at the initial scale) included."""
    from lightning.pytorch.plugins import MixedPrecision

    k, init = 2, 2.0**20
    module = Net(scheduler=False)
    trainer = fit(module, loader, [SSGDCallback()], accumulate_grad_batches=k, gradient_clip_val=0.3,
                  plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init))])
    net = make_model()
    opt = make_optimizer(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    batches = list(loader)
    for _ in range(EPOCHS):
        for i in range(0, len(batches), k):
            opt.zero_grad()
            for _ in opt.twin_passes():
                for x, y in batches[i:i + k]:
                    with torch.autocast("cpu", dtype=torch.float16):
                        loss = F.cross_entropy(net(x), y)
                    scaler.scale(loss / k).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.3)
            scaler.step(opt)
            scaler.update()
    assert_same_params(module.net, net)
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale() < init  # some steps were skipped


def test_checkpoint_resume_is_bitwise(loader, tmp_path):
    """Two epochs, or one epoch + Trainer checkpoint + resume for the second: identical parameters
    (SSGD's seed and step, momentum, scheduler and loops restored through the checkpoint)."""
    whole = Net()
    fit(whole, loader, [SSGDCallback()], accumulate_grad_batches=2)

    first = Net()
    trainer = fit(first, loader, [SSGDCallback()], max_epochs=1, accumulate_grad_batches=2)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    resumed = Net()
    torch.nn.init.zeros_(resumed.net[0].weight)  # everything must come from the checkpoint
    trainer = fit(resumed, loader, [SSGDCallback()], ckpt_path=path, accumulate_grad_batches=2)
    assert_same_params(resumed.net, whole.net)
    assert trainer.optimizers[0].noise_step == EPOCHS * BATCHES // 2


class Manual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        for _ in opt.twin_passes():  # w + n, then w - n
            self.manual_backward(F.cross_entropy(self.net(x), y))
        self.clip_gradients(opt, gradient_clip_val=0.3, gradient_clip_algorithm="norm")
        opt.step()

    def configure_optimizers(self):
        return make_optimizer(self.parameters())


def test_manual_optimization_twin_passes(loader):
    """Manual optimization: opt.twin_passes() + self.manual_backward + clip_gradients + opt.step()."""
    module = Manual()
    trainer = fit(module, loader, [SSGDCallback()])
    net, opt, _ = plain_twin_loop(loader, clip=0.3, scheduler=False)
    assert_same_params(module.net, net)
    assert trainer.global_step == opt.noise_step == EPOCHS * BATCHES


def test_manual_optimization_without_the_callback_raises(loader):
    """Without the callback, Lightning's opt.step() hands SSGD a closure after the twin passes:
    refused with an error naming the callback (it would drop the passes' gradients silently)."""
    module = Manual()
    clean = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(RuntimeError, match="SSGDCallback"):
        fit(module, loader, [])
    for a, b in zip(clean, module.net.parameters()):  # clean again (restored by regeneration: a few ulp)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_accumulation_without_the_callback_warns(loader):
    """accumulate_grad_batches without the callback: SSGD's step(closure) would drop the window's
    earlier micro-batches silently; it warns, naming the callback."""
    with pytest.warns(RuntimeWarning, match="SSGDCallback"):
        fit(Net(scheduler=False), loader, [], max_epochs=1, accumulate_grad_batches=2)


class WithValidation(Net):
    def validation_step(self, batch, batch_idx):
        return None


def test_validation_inside_an_accumulation_window_raises(loader):
    """The weights sit at w+n between a window's micro-batches: validation there (after batch 3,
    inside the second window of 2) is refused, and the clean weights of the one completed step
    are back."""
    module = WithValidation(scheduler=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[SSGDCallback()],
                         accumulate_grad_batches=2, val_check_interval=3, num_sanity_val_steps=0, limit_val_batches=1,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    with pytest.raises(RuntimeError, match="middle of an accumulation window"):
        trainer.fit(module, loader, loader)
    net, _, _ = plain_twin_loop(list(loader)[:2], k=2, epochs=1, scheduler=False)
    for p, q in zip(module.net.parameters(), net.parameters()):  # restored by regeneration: a few ulp
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("k", [2])
def test_ddp_two_processes(tmp_path, k):
    """strategy="ddp" on 2 CPU processes (gloo): the replicas stay equal, equal the plain loop on
    the global batches, and each step all-reduces the gradients once. Both ranks are started here
    (LOCAL_RANK set, as torchrun does) so that they import Lightning side by side."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    procs = [subprocess.Popen([sys.executable, str(root / "tests" / "_lightning_ddp.py"), str(tmp_path), str(k)],
                              cwd=root, env={**env, "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    steps = ddp.STEPS_PER_EPOCH_BATCHES // k
    for out in ranks:
        assert out["steps"] == steps
        assert out["all_reduces"] == steps  # the passes before the last and the micro-batches under no_sync
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name

    # the plain loop on the global batch: rank r's b-th batch holds samples r, r+2, ... (DistributedSampler)
    x, y = ddp.make_data()
    net = ddp.make_model()
    opt = ddp.make_optimizer(net.parameters())
    per_rank = [(x[r::2], y[r::2]) for r in range(2)]
    for s in range(steps):
        opt.zero_grad()
        for _ in opt.twin_passes():
            for b in range(s * k, (s + 1) * k):
                sl = slice(b * ddp.BATCH, (b + 1) * ddp.BATCH)
                xb = torch.cat([px[sl] for px, _ in per_rank])
                yb = torch.cat([py[sl] for _, py in per_rank])
                (F.cross_entropy(net(xb), yb) / k).backward()
        opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
