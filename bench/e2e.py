"""End-to-end training-step time on real small models (CPU): SGD vs S-SGD fused vs S-SGD reference,
and AdamW vs S-SGD fused on AdamW.

S-SGD runs two forward/backward passes per step, so 2x its base optimizer is inherent; the
optimizer's own work is what the fused path makes small (goal: at most 2.05x). Each row's "x base"
is its step time over the plain base optimizer's (SGD, or AdamW for the AdamW rows).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssgd_fused
from bench.timing import rounds_for, summary, warm_up
from ssgd_fused.demo import DigitsCNN


class TinyTransformer(nn.Module):
    """A small pre-norm transformer encoder stack with a token embedding and a classifier head."""

    def __init__(self, vocab=1000, d=128, layers=4, heads=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _models():
    g = torch.Generator().manual_seed(0)
    yield "digits_cnn", DigitsCNN, torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    yield ("transformer_4x128", TinyTransformer, torch.randint(0, 1000, (16, 64), generator=g),
           torch.randint(0, 10, (16,), generator=g))


KINDS = ("sgd", "ssgd_fused", "ssgd_reference", "adamw", "ssgd_fused_adamw")


def base_of(kind):
    return "adamw" if kind.endswith("adamw") else "sgd"


def _stepper(kind, cls, x, y):
    torch.manual_seed(0)
    model = cls()
    base_cls, kw = ((torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)) if base_of(kind) == "adamw"
                    else (torch.optim.SGD, dict(lr=0.01, momentum=0.9)))
    if kind in ("sgd", "adamw"):
        opt = base_cls(model.parameters(), **kw)
    else:
        opt = ssgd_fused.SSGD(model.parameters(), base_cls, noise=0.5, seed=0,
                              backend="reference" if kind == "ssgd_reference" else "cpp", **kw)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        if kind in ("sgd", "adamw"):
            opt.zero_grad()
            closure()
            opt.step()
        else:
            opt.step(closure)

    return model, step


def run_e2e(reps: int = 10, kinds=KINDS):
    """Training-step times, the optimizers of one model timed round-robin (one step each per round),
    after each has warmed up until steady (bench/timing.py); at least `reps` rounds."""
    rows = []
    for name, cls, x, y in _models():
        steppers = {k: _stepper(k, cls, x, y) for k in kinds}
        times = {k: [] for k in kinds}
        warm = [warm_up(step) for _, step in steppers.values()]
        for _ in range(max(reps, rounds_for(sum(w.median_s for w in warm)))):
            for k, (_, step) in steppers.items():
                t0 = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t0)
        bases = {b: summary(times[b])["median_ms"] for b in ("sgd", "adamw") if b in times}
        for k, (model, _) in steppers.items():
            t = summary(times[k])
            n = sum(p.numel() for p in model.parameters())
            base = bases.get(base_of(k))
            rows.append({"model": name, "params": n, "optimizer": k, "base": base_of(k), **t,
                         "x_base": t["median_ms"] / base if base else float("nan")})
    return rows


def markdown(rows) -> str:
    lines = ["| model | params | optimizer | step ms (p20-p80) | x base |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['optimizer']} | {r['median_ms']:.2f} "
                     f"({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | {r['x_base']:.2f}x ({r['base']}) |")
    return "\n".join(lines)
