"""Shared test helpers: small models and data (deterministic), the C++-kernel requirement."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    """Conv (4-D weights), linear (2-D) and bias/1-D parameters, odd sizes."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc1 = nn.Linear(5 * 4 * 4, 17)
        self.fc2 = nn.Linear(17, 3)
        self.scale = nn.Parameter(torch.ones(17))
        self.to(dtype)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        x = torch.tanh(self.fc1(x.flatten(1))) * self.scale
        return self.fc2(x)


def make_data(n=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def closure_for(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    return closure


def clone_params(model):
    return [p.detach().clone() for p in model.parameters()]


def require_cpp():
    """Skips a C++-kernel test when the extension is missing, unless SSGD_FUSED_REQUIRE_CPP=1
    (set by scripts/test.sh and CI), where a missing build is a failure."""
    from ssgd_fused import ops

    if not ops.cpp_available():
        if os.environ.get("SSGD_FUSED_REQUIRE_CPP", "0") not in ("", "0"):
            pytest.fail(f"C++ extension required but unavailable: {ops.cpp_unavailable_reason()}")
        pytest.skip(f"C++ extension unavailable: {ops.cpp_unavailable_reason()}")
