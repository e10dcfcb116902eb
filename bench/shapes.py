"""Parameter sets shaped like real models (shapes only; values are random)."""

from __future__ import annotations

import torch


def _bn(c):
    return [(c,), (c,)]


def resnet20():
    """CIFAR ResNet-20 (He et al. 2016): 0.27 M parameters."""
    shapes = [(16, 3, 3, 3), *_bn(16)]
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(3):
            shapes += [(cout, cin, 3, 3), *_bn(cout), (cout, cout, 3, 3), *_bn(cout)]
            if cin != cout:  # projection shortcut (option B)
                shapes += [(cout, cin, 1, 1), *_bn(cout)]
            cin = cout
    return shapes + [(10, 64), (10,)]


def resnet50():
    """torchvision ResNet-50: 25.6 M parameters, 161 tensors."""
    shapes = [(64, 3, 7, 7), *_bn(64)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            cout = width * 4
            shapes += [(width, cin, 1, 1), *_bn(width), (width, width, 3, 3), *_bn(width), (cout, width, 1, 1),
                       *_bn(cout)]
            if b == 0:
                shapes += [(cout, cin, 1, 1), *_bn(cout)]
            cin = cout
    return shapes + [(1000, 2048), (1000,)]


def gpt(vocab, ctx, d, layers):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


SETS = {
    "resnet20": resnet20,
    "gpt25m": lambda: gpt(8192, 1024, 576, 5),  # 25 M parameters in 64 tensors, small-GPT-shaped
    "resnet50": resnet50,
    "gpt2": lambda: gpt(50257, 1024, 768, 12),  # GPT-2 small: 124 M
}


def make(name: str, dtype=torch.float32, seed: int = 0):
    """Parameters (with gradients) of the named set."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in SETS[name]():
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype)
        params.append(p)
    return params


def numel(name: str) -> int:
    total = 0
    for s in SETS[name]():
        n = 1
        for d in s:
            n *= d
        total += n
    return total
