"""Demo: a small CNN on scikit-learn's bundled 8x8 digits, trained with SGD and with S-SGD.

    python -m ssgd_fused.demo [--epochs 30] [--noise 0.5] [--backend auto]

Prints test accuracy, final training loss and wall time of both runs (same initial weights,
same batches).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssgd_fused


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


class DigitsCNN(nn.Module):
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


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(kind: str, epochs: int, noise: float, backend: str, lr: float, batch: int, seed: int):
    (xtr, ytr), (xte, yte) = load_digits(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = ssgd_fused.SSGD(model.parameters(), torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4,
                              noise=noise, seed=seed, backend=backend)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            xb, yb = xtr[idx], ytr[idx]

            def closure():
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if kind == "sgd":
                opt.zero_grad()
                loss = closure()
                opt.step()
            else:
                loss = opt.step(closure)
        sched.step()
    wall = time.perf_counter() - t0
    extra = f" backend={opt.backend}" if kind != "sgd" else ""
    return {"optimizer": kind + extra, "test_acc": accuracy(model, xte, yte),
            "train_acc": accuracy(model, xtr, ytr), "loss": float(loss), "wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--noise", type=float, default=0.5, help="S-SGD alpha (||n|| = alpha ||w|| per layer)")
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "cpp"])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"digits: 1437 train / 360 test images, {args.epochs} epochs, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    rows = [train(kind, args.epochs, args.noise, args.backend, args.lr, args.batch, args.seed)
            for kind in ("sgd", "ssgd")]
    print("| optimizer | test acc | train acc | final batch loss | wall time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {100 * r['test_acc']:.2f}% | {100 * r['train_acc']:.2f}% | "
              f"{r['loss']:.4f} | {r['wall_s']:.2f} s |")
    print(f"S-SGD / SGD wall time: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x "
          f"(two forward/backward passes per step are inherent)")
    return rows


if __name__ == "__main__":
    main()
