"""Noise specification, version 1, in pure PyTorch integer ops.

This module *defines* the random directions used by S-SGD. Every backend (the C++ kernels in
csrc/, the Triton kernels in kernels/) must produce the same stream: integer Philox words and
rademacher signs bit-identical, gaussian floats within :data:`GAUSSIAN_TOL`.

Philox-4x32-10 (Salmon et al. 2011, as in Random123 / at::Philox4_32 / tl.philox)::

    key     = (seed & 0xFFFFFFFF, seed >> 32)                    seed: unsigned 64-bit
    counter = (block & 0xFFFFFFFF,
               ((block >> 32) & 0xFFFF) | (sample << 16),       sample: antithetic pair index
               tensor_id,                                        parameter index in param_groups
               step & 0xFFFFFFFF)                                optimizer steps completed

    uniform(x)  = (2 * (x >> 9) + 1) * 2**-24                    exact float32 in (0, 1)
    gaussian    block = e >> 2; words (x0, x1, x2, x3); Box-Muller on (x0, x1) and (x2, x3):
                r = sqrt(-2 ln uniform(xa)), th = 2 pi uniform(xb), z_a = r cos th, z_b = r sin th
    rademacher  block = e >> 7; bit k = e & 127 (word k >> 5, bit k & 31); +1 if set else -1
    uniform_sym block = e >> 2, word e & 3; 2 * uniform(x) - 1

Sharded tensors (e.g. FSDP2's Shard(0)): an op given ``element_offsets`` perturbs tensor i's local
element e with the noise of element ``element_offsets[i] + e`` of the full tensor (same seed, step,
tensor_id, sample), so every rank sees exactly the unsharded noise; a shard may start inside a
Philox block (4 elements for gaussian / uniform, 128 for rademacher).

The reference evaluates the transcendentals in float64 and rounds once to float32, so it is the
most accurate float32 rendering of the spec; fast backends use polynomials and must stay within
``|dz| <= 2e-6 * max(1, |z|)`` of it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SPEC_VERSION",
    "DISTRIBUTIONS",
    "GAUSSIAN_TOL",
    "philox4x32_10",
    "philox_words",
    "uniform01",
    "gaussian",
    "rademacher",
    "uniform_sym",
    "generate",
    "check_stream_args",
    "check_element_offsets",
]

SPEC_VERSION = 1
DISTRIBUTIONS = ("gaussian", "rademacher", "uniform")
#: Allowed difference between backends for gaussian floats: |dz| <= GAUSSIAN_TOL * max(1, |z|).
GAUSSIAN_TOL = 2e-6

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85

# The fused kernels' Box-Muller (not part of the spec, which is r cos th, r sin th in float32): the
# angle's quadrant from the integer bits, then sin(pi/2 t), cos(pi/2 t) on |t| <= 1/2 as
# t (S0 + S1 t^2 + S2 t^4 + S3 t^6) and 1 + C1 t^2 + ... + C4 t^8; the C++ kernels also take -2 ln u
# as k M2LN2 + f (-2 + f Q(f)), f = z - 1 for z in [sqrt(1/2), sqrt(2)), Q = LQ0 + LQ1 f + ...
# Minimax fits rounded to float32, |error| <= 6.8e-7 over every input (within GAUSSIAN_TOL).
# csrc/noise_consts.h and kernels/_noise.py carry the same numbers (tests/test_noise.py checks).
SINCOS_POLY = {name: float.fromhex(h) for name, h in (
    ("S0", "0x1.921fb6p+0"), ("S1", "-0x1.4abbbap-1"), ("S2", "0x1.465e92p-4"), ("S3", "-0x1.2d9306p-8"),
    ("C1", "-0x1.3bd3ccp+0"), ("C2", "0x1.03c1dep-2"), ("C3", "-0x1.55c664p-6"), ("C4", "0x1.d9f7bcp-11"))}
LOG_POLY = {name: -2.0 * float.fromhex(h) for name, h in (
    ("LQ0", "-0x1.fffffap-2"), ("LQ1", "0x1.5556f4p-2"), ("LQ2", "-0x1.00049ap-2"), ("LQ3", "0x1.98d2c0p-3"),
    ("LQ4", "-0x1.535d32p-3"), ("LQ5", "0x1.318522p-3"), ("LQ6", "-0x1.250490p-3"), ("LQ7", "0x1.65c770p-4"),
    ("M2LN2", "0x1.62e430p-1"))}

_MASK32 = 0xFFFFFFFF
_MAX_BLOCKS = 1 << 48  # 32 bits in c0 + 16 bits in c1


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors holding values < 2**32.

    int64 cannot hold the 64-bit product, so m is split into 16-bit halves (each partial
    product < 2**48)."""
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on int64 tensors (or Python ints) holding unsigned 32-bit values.

    Arguments broadcast against each other. Returns the four output words as int64 tensors.
    Known answer: counter = key = 0 gives 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    """
    ts = [x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.int64) for x in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = torch.broadcast_tensors(*[t.to(torch.int64) & _MASK32 for t in ts])
    k0 = int(k0) & _MASK32
    k1 = int(k1) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def check_stream_args(seed: int, step: int, tensor_id: int, sample: int = 0) -> None:
    """Raises ValueError naming the argument when a stream coordinate is out of range."""
    for name, value, bits in (("seed", seed, 64), ("tensor_id", tensor_id, 32), ("sample", sample, 16)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= value < (1 << bits):
            raise ValueError(f"{name} must be in [0, 2**{bits}), got {value}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def philox_words(nblocks: int, seed: int, step: int, tensor_id: int, sample: int = 0, first_block: int = 0):
    """The Philox output words of blocks first_block .. first_block+nblocks-1 as an (nblocks, 4)
    int64 tensor (values in [0, 2**32))."""
    check_stream_args(seed, step, tensor_id, sample)
    if first_block < 0 or first_block + nblocks > _MAX_BLOCKS:
        raise ValueError(f"blocks must lie in [0, 2**48), got [{first_block}, {first_block + nblocks})")
    b = torch.arange(first_block, first_block + nblocks, dtype=torch.int64)
    c0 = b & _MASK32
    c1 = ((b >> 32) & 0xFFFF) | (sample << 16)
    x = philox4x32_10(c0, c1, tensor_id, step & _MASK32, seed & _MASK32, seed >> 32)
    return torch.stack(x, dim=1)


def uniform01(x: torch.Tensor) -> torch.Tensor:
    """uniform(x) = (2 * (x >> 9) + 1) * 2**-24 as float64 (exact; also exact in float32)."""
    return ((x >> 9) * 2 + 1).to(torch.float64) * 2.0**-24


def _check_numel(numel: int, per_block: int, start: int = 0) -> tuple[int, int]:
    """(first block, number of blocks) that hold elements start .. start + numel - 1."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if start + numel > per_block * _MAX_BLOCKS:
        what = f"start + numel={start + numel}" if start else f"numel={numel}"
        raise ValueError(f"{what} exceeds the spec's counter range ({per_block} * 2**48 elements)")
    first = start // per_block
    return first, -(-(start + numel) // per_block) - first


def check_element_offsets(element_offsets, numels, distribution: str) -> list[int]:
    """The per-tensor element offsets of a sharded op as a list of ints (None: all zeros).

    Tensor i's local element e is element element_offsets[i] + e of the full tensor's stream, so
    each offset must be >= 0 and offset + numel within the spec's counter range. Raises ValueError
    naming the argument."""
    numels = list(numels)
    if element_offsets is None:
        return [0] * len(numels)
    offs = list(element_offsets)
    if len(offs) != len(numels):
        raise ValueError(f"element_offsets has {len(offs)} entries for {len(numels)} params")
    per_block = 128 if distribution == "rademacher" else 4
    for i, (o, n) in enumerate(zip(offs, numels)):
        if isinstance(o, bool) or not isinstance(o, int):
            raise ValueError(f"element_offsets[{i}] must be an int, got {o!r}")
        if o < 0:
            raise ValueError(f"element_offsets[{i}] must be >= 0, got {o}")
        if o + n > per_block * _MAX_BLOCKS:
            raise ValueError(f"element_offsets[{i}] + numel = {o + n} exceeds the spec's counter range "
                             f"({per_block} * 2**48 elements for {distribution})")
    return offs


def gaussian(numel: int, seed: int, step: int, tensor_id: int, sample: int = 0, start: int = 0) -> torch.Tensor:
    """Standard normal stream (float32, CPU): elements start .. start + numel - 1, element e from
    block e >> 2."""
    first, nblocks = _check_numel(numel, 4, start)
    x = philox_words(nblocks, seed, step, tensor_id, sample, first_block=first)
    out = torch.empty(nblocks, 4, dtype=torch.float64)
    for a, b in ((0, 1), (2, 3)):
        r = torch.sqrt(-2.0 * torch.log(uniform01(x[:, a])))
        th = (2.0 * math.pi) * uniform01(x[:, b])
        out[:, a] = r * torch.cos(th)
        out[:, b] = r * torch.sin(th)
    k = start - 4 * first
    return out.reshape(-1)[k:k + numel].to(torch.float32)


def rademacher(numel: int, seed: int, step: int, tensor_id: int, sample: int = 0, start: int = 0) -> torch.Tensor:
    """+-1 stream (float32, CPU): elements start .. start + numel - 1, element e is bit e & 127 of
    block e >> 7."""
    first, nblocks = _check_numel(numel, 128, start)
    x = philox_words(nblocks, seed, step, tensor_id, sample, first_block=first)
    bits = (x.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1  # (nblocks, word, bit)
    k = start - 128 * first
    return (bits.reshape(-1)[k:k + numel] * 2 - 1).to(torch.float32)


def uniform_sym(numel: int, seed: int, step: int, tensor_id: int, sample: int = 0, start: int = 0) -> torch.Tensor:
    """Uniform stream on (-1, 1) (float32, CPU): elements start .. start + numel - 1, element e =
    word e & 3 of block e >> 2."""
    first, nblocks = _check_numel(numel, 4, start)
    x = philox_words(nblocks, seed, step, tensor_id, sample, first_block=first)
    k = start - 4 * first
    return (2.0 * uniform01(x) - 1.0).reshape(-1)[k:k + numel].to(torch.float32)


_GENERATORS = {"gaussian": gaussian, "rademacher": rademacher, "uniform": uniform_sym}


def generate(distribution: str, numel: int, seed: int, step: int, tensor_id: int, sample: int = 0,
             start: int = 0) -> torch.Tensor:
    """Elements start .. start + numel - 1 of the named distribution's stream ("gaussian",
    "rademacher" or "uniform"); only the Philox blocks that hold them are generated."""
    try:
        gen = _GENERATORS[distribution]
    except KeyError:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}") from None
    return gen(numel, seed, step, tensor_id, sample, start)
