"""Demo: SGD vs S-SGD on scikit-learn's digits with a small CNN -- accuracy AND flatness.

    python -m ssgd_fused.demo [--seeds 3] [--noise 0.3] [--dataset digits|mnist1d] ...

Trains the same network from the same initial weights on the same batches with plain SGD and with
S-SGD (gaussian noise) for a few seeds, and prints test accuracy, final training loss, the top
eigenvalue of the training-loss Hessian (``ssgd_fused.flatness``) and wall time, mean +- std over
the seeds, and the per-seed (paired) accuracy difference. The default setting is a cell of the
replication study (``python -m bench.paper``, docs/EVIDENCE.md) where S-SGD's gain is larger than
its spread over seeds: digits, batch 64, 30 epochs, lr 0.05, alpha 0.3 (study, 5 seeds: +0.56 +-
0.34 points, Hessian top eigenvalue 0.64 vs 1.49). ``--dataset mnist1d`` uses mnist1d, generated
offline by the ``mnist1d`` package and cached in the temp directory.

This module also holds what the study shares with the demo: the two data sets (mnist1d,
scikit-learn's digits), the two small CNNs and :func:`train_run`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssgd_fused
from ssgd_fused import flatness

__all__ = ["load_digits", "load_mnist1d", "load", "DigitsCNN", "MNIST1DCNN", "make_model", "train_run", "main"]

MNIST1D_CACHE = "ssgd_fused_mnist1d_v1.pt"


# ---- data ----------------------------------------------------------------------------------

def load_digits(seed: int = 0):
    """scikit-learn's bundled 8x8 digits: ((x_train, y_train), (x_test, y_test)), 1437 / 360
    images (1, 8, 8) in [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def load_mnist1d(cache_dir: str | None = None):
    """mnist1d (Greydanus 2020) from the ``mnist1d`` package's generator with its default
    arguments (4000 train / 1000 test signals of length 40, seed 42), generated offline -- never
    downloaded -- and cached as a .pt file in ``cache_dir`` (default: the temp directory).
    Returns ((x_train, y_train), (x_test, y_test)) with x shaped (N, 1, 40)."""
    path = os.path.join(cache_dir or tempfile.gettempdir(), MNIST1D_CACHE)
    if os.path.exists(path):
        d = torch.load(path, weights_only=True)
    else:
        import numpy as np
        from mnist1d.data import get_dataset_args, make_dataset

        np_state, py_state = np.random.get_state(), random.getstate()  # make_dataset reseeds both
        try:
            raw = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        d = {k: torch.as_tensor(np.asarray(raw[k])) for k in ("x", "y", "x_test", "y_test")}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(d, tmp)
        os.replace(tmp, path)  # atomic: parallel workers never read a half-written file
    x, xt = d["x"].float().unsqueeze(1), d["x_test"].float().unsqueeze(1)
    return (x, d["y"].long()), (xt, d["y_test"].long())


def load(dataset: str, cache_dir: str | None = None):
    if dataset == "mnist1d":
        return load_mnist1d(cache_dir)
    if dataset == "digits":
        return load_digits()
    raise ValueError(f"dataset must be 'mnist1d' or 'digits', got {dataset!r}")


# ---- models --------------------------------------------------------------------------------

class DigitsCNN(nn.Module):
    """2-D CNN for 8x8 digits: conv 16, conv 32, max-pool, dense 64, dense 10 (36 k parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MNIST1DCNN(nn.Module):
    """The mnist1d paper's 1-D CNN: three stride-2 convolutions of 25 channels and a dense
    layer (5.3 k parameters)."""

    def __init__(self, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def make_model(dataset: str) -> nn.Module:
    return MNIST1DCNN() if dataset == "mnist1d" else DigitsCNN()


# ---- one training run ----------------------------------------------------------------------

METHODS = ("sgd", "ssgd", "one_sided", "smoothout")


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train_run(*, dataset: str = "mnist1d", method: str = "sgd", alpha: float = 0.0, distribution: str = "gaussian",
              batch: int = 64, epochs: int = 30, lr: float = 0.05, momentum: float = 0.9,
              weight_decay: float = 5e-4, seed: int = 0, sgd_epochs: int = 0, warmup_epochs: int = 0, data=None,
              cache_dir=None,
              hessian_samples: int = 1000, hessian_iters: int = 20, keep_state: bool = False) -> dict:
    """Train one model and measure it.

    method: "sgd" (torch.optim.SGD), "ssgd" (S-SGD, ``distribution`` noise), "one_sided" (weight
    noise, one pass at w + n) or "smoothout" (one pass, uniform noise); the last three are
    ``ssgd_fused.SSGD`` with that ``mode``, alpha ``alpha``, seed ``seed``. ``sgd_epochs``:
    epochs of plain SGD before the noise starts (the optimizer's ``start_step``). SGD with
    momentum and weight decay, cosine learning rate over ``epochs`` (after a linear warm-up over
    ``warmup_epochs``, 0 by default); the initial weights
    (``torch.manual_seed(seed)``) and the batch order depend on ``seed`` only, so runs of
    different methods with one seed start from the same point and see the same batches.

    Returns test/train accuracy, the final training loss (full training set, eval mode), the top
    Hessian eigenvalue of the training loss on the first ``hessian_samples`` training samples
    (Lanczos, ``hessian_iters`` products; 0 skips it), forward/backward passes, wall time, and
    with ``keep_state`` the final parameters."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    (xtr, ytr), (xte, yte) = data if data is not None else load(dataset, cache_dir)
    torch.manual_seed(seed)
    model = make_model(dataset)
    steps_per_epoch = math.ceil(len(ytr) / batch)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        passes_per_step = 1
    else:
        mode = {"ssgd": "symmetric"}.get(method, method)
        dist = "uniform" if method == "smoothout" else distribution
        opt = ssgd_fused.SSGD(model.parameters(), torch.optim.SGD, lr=lr, momentum=momentum,
                              weight_decay=weight_decay, noise=alpha, distribution=dist, mode=mode, seed=seed,
                              start_step=sgd_epochs * steps_per_epoch)
        passes_per_step = 2 if mode == "symmetric" else 1
    def lr_factor(e):  # linear warm-up over warmup_epochs, then cosine to 0 at `epochs`
        if e < warmup_epochs:
            return (e + 1) / (warmup_epochs + 1)
        return 0.5 * (1 + math.cos(math.pi * e / epochs))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    g = torch.Generator().manual_seed(seed + 1)
    passes = 0
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            xb, yb = xtr[idx], ytr[idx]

            def closure():
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if method == "sgd":
                opt.zero_grad()
                closure()
                opt.step()
            else:
                opt.step(closure)
            passes += passes_per_step if epoch >= sgd_epochs else 1
        sched.step()
    wall = time.perf_counter() - t0
    model.eval()
    train_batches = [(xtr[i:i + 1000], ytr[i:i + 1000]) for i in range(0, len(ytr), 1000)]
    train_loss, train_err = flatness.loss_and_error(model, F.cross_entropy, train_batches)
    out = {"test_acc": _accuracy(model, xte, yte), "train_acc": 1.0 - train_err, "train_loss": train_loss,
           "passes": passes, "steps": epochs * steps_per_epoch, "wall_s": wall}
    if hessian_iters and math.isfinite(train_loss):
        sub = [(xtr[:hessian_samples], ytr[:hessian_samples])]
        out["hessian_top"] = flatness.hessian_top_eigenvalue(model, F.cross_entropy, sub, iters=hessian_iters,
                                                             tol=1e-3, seed=0)
    elif hessian_iters:
        out["hessian_top"] = math.nan  # diverged
    if keep_state:
        out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


# ---- the demo ------------------------------------------------------------------------------

def _fmt(values, scale=1.0, digits=2):
    m = statistics.mean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} +- {s:.{digits}f}"


DEMO_DEFAULTS = {"digits": {"batch": 64, "epochs": 30, "lr": 0.05, "warmup": 0},
                 "mnist1d": {"batch": 250, "epochs": 40, "lr": round(0.2 * math.sqrt(250 / 128), 4), "warmup": 5}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, default=None,
                    help="S-SGD alpha, ||n|| = alpha ||w|| per layer (default: 0.3 on digits, 0.1 on mnist1d)")
    ap.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher"])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="epochs of linear learning-rate warm-up")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--hessian-samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the study's setting; small "
                    "models gain nothing from more)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    for k, v in DEMO_DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.noise is None:
        args.noise = 0.3 if args.dataset == "digits" else 0.1
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args):
    data = load(args.dataset)
    print(f"{args.dataset}: {len(data[0][1])} train / {len(data[1][1])} test, {args.epochs} epochs, "
          f"batch {args.batch}, lr {args.lr} (cosine{f', {args.warmup} warm-up epochs' if args.warmup else ''}), seeds "
          f"0..{args.seeds - 1}, {torch.get_num_threads()} thread(s)")
    rows = {}
    for kind in ("sgd", "ssgd"):
        rows[kind] = [train_run(dataset=args.dataset, method=kind, alpha=args.noise, distribution=args.distribution,
                                batch=args.batch, epochs=args.epochs, lr=args.lr, warmup_epochs=args.warmup,
                                seed=s, data=data, hessian_samples=args.hessian_samples)
                      for s in range(args.seeds)]
    print("| optimizer | test acc % | train loss | Hessian top eigenvalue | wall time s |")
    print("|---|---|---|---|---|")
    for kind, runs in rows.items():
        name = "SGD" if kind == "sgd" else f"S-SGD (alpha {args.noise}, {args.distribution})"
        print(f"| {name} | {_fmt([r['test_acc'] for r in runs], 100)} | "
              f"{_fmt([r['train_loss'] for r in runs], digits=4)} | {_fmt([r['hessian_top'] for r in runs])} | "
              f"{_fmt([r['wall_s'] for r in runs])} |")
    d_acc = [b["test_acc"] - a["test_acc"] for a, b in zip(rows["sgd"], rows["ssgd"])]
    mean = lambda kind, key: statistics.mean(r[key] for r in rows[kind])
    print(f"S-SGD - SGD test accuracy, paired by seed: {_fmt(d_acc, 100)} points; Hessian top eigenvalue "
          f"S-SGD / SGD: {mean('ssgd', 'hessian_top') / mean('sgd', 'hessian_top'):.2f} (lower is flatter); "
          f"wall time S-SGD / SGD: {mean('ssgd', 'wall_s') / mean('sgd', 'wall_s'):.2f}x (two forward/backward "
          "passes per step)")
    return rows


if __name__ == "__main__":
    main()
