"""Noise spec v1: known answers, stream layout, statistics, and agreement with tl.philox."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ssgd_fused import noise

M32 = 0xFFFFFFFF


def philox_scalar(c, k):
    """Independent plain-int Philox-4x32-10 (Random123's formulation) to cross-check the tensor one."""
    c = list(c)
    k0, k1 = k
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def words(*args):
    return [int(v) for v in noise.philox4x32_10(*args)]


def test_known_answer_zero():
    assert words(0, 0, 0, 0, 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_known_answer_all_ones():
    assert words(M32, M32, M32, M32, M32, M32) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_known_answer_pi():  # Random123 kat_vectors: philox4x32 10 with pi digits
    c = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    k = (0xA4093822, 0x299F31D0)
    assert words(*c, *k) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_tensor_philox_matches_scalar_on_random_counters():
    g = torch.Generator().manual_seed(7)
    c = torch.randint(0, 2**32, (4, 500), generator=g, dtype=torch.int64)
    k = [int(v) for v in torch.randint(0, 2**32, (2,), generator=g, dtype=torch.int64)]
    out = torch.stack(noise.philox4x32_10(*c, *k))
    for j in range(0, 500, 37):
        assert [int(v) for v in out[:, j]] == philox_scalar([int(v) for v in c[:, j]], k)


def test_counter_layout():
    seed, step, tid, sample = 0x0123456789ABCDEF, 2**32 + 5, 77, 3
    first = (1 << 32) + 10  # a block above 2**32 exercises c1's low 16 bits
    w = noise.philox_words(2, seed, step, tid, sample, first_block=first)
    for j in range(2):
        b = first + j
        c = [b & M32, ((b >> 32) & 0xFFFF) | (sample << 16), tid, step & M32]
        assert [int(v) for v in w[j]] == philox_scalar(c, (seed & M32, seed >> 32))


def test_gaussian_element_order_and_box_muller():
    x = noise.philox_words(3, 11, 2, 5)
    z = noise.gaussian(12, 11, 2, 5).double()
    for b in range(3):
        for a, bb in ((0, 1), (2, 3)):
            ua = (2 * (int(x[b, a]) >> 9) + 1) * 2.0**-24
            ub = (2 * (int(x[b, bb]) >> 9) + 1) * 2.0**-24
            r = math.sqrt(-2 * math.log(ua))
            assert z[4 * b + a] == pytest.approx(r * math.cos(2 * math.pi * ub), abs=1e-6)
            assert z[4 * b + bb] == pytest.approx(r * math.sin(2 * math.pi * ub), abs=1e-6)


def test_rademacher_bits():
    x = noise.philox_words(2, 3, 0, 1)
    r = noise.rademacher(200, 3, 0, 1)
    for e in (0, 1, 31, 32, 100, 127, 128, 199):
        b, k = divmod(e, 128)
        bit = (int(x[b, k >> 5]) >> (k & 31)) & 1
        assert r[e] == (1.0 if bit else -1.0)


def test_uniform_sym_values():
    x = noise.philox_words(2, 9, 1, 0)
    u = noise.uniform_sym(7, 9, 1, 0)
    for e in range(7):
        v = (2 * (int(x[e // 4, e % 4]) >> 9) + 1) * 2.0**-24
        assert u[e].item() == 2 * v - 1  # exact in float32
    assert u.abs().max() < 1


def test_prefix_property():
    """A stream does not depend on numel: a shorter tensor sees a prefix of a longer one."""
    for gen in (noise.gaussian, noise.rademacher, noise.uniform_sym):
        assert torch.equal(gen(1000, 1, 2, 3)[:333], gen(333, 1, 2, 3))


@pytest.mark.parametrize("dist", noise.DISTRIBUTIONS)
def test_generate_from_start_is_the_slice(dist):
    """Known answer for shards: generate(dist, n, ..., start=k) == generate(dist, k + n, ...)[k:],
    bit for bit, with k inside a 4-element and a 128-element Philox block."""
    for k in (0, 1, 3, 4, 5, 127, 128, 129, 4096 + 3):
        for n in (0, 1, 3, 130, 1000):
            got = noise.generate(dist, n, 0x0123456789ABCDEF, 9, 4, 2, start=k)
            want = noise.generate(dist, k + n, 0x0123456789ABCDEF, 9, 4, 2)[k:]
            assert got.shape == (n,) and torch.equal(got, want), (k, n)


def test_start_generates_only_the_blocks_it_needs(monkeypatch):
    """A far start costs its own blocks only: element e of the stream from its own block's words."""
    calls = []
    real = noise.philox_words

    def counting(nblocks, *args, **kw):
        calls.append((nblocks, kw.get("first_block", 0)))
        return real(nblocks, *args, **kw)

    monkeypatch.setattr(noise, "philox_words", counting)
    start = (5 << 45) + 131  # rademacher block (5 << 38) + 1, bit 3; 4 per block: block (5 << 43) + 32, word 3
    r = noise.rademacher(3, 7, 1, 2, 0, start=start)
    assert calls[-1] == (1, start >> 7)
    x = real(1, 7, 1, 2, 0, first_block=start >> 7)
    for j in range(3):
        k = (start + j) & 127
        assert r[j] == (1.0 if (int(x[0, k >> 5]) >> (k & 31)) & 1 else -1.0)
    u = noise.uniform_sym(6, 7, 1, 2, 0, start=start)  # word 3 of a block, a whole block, word 0 of the next
    assert calls[-1] == (3, start >> 2)
    x = real(3, 7, 1, 2, 0, first_block=start >> 2)
    for j in range(6):
        e = start + j - 4 * (start >> 2)
        assert u[j].item() == 2 * ((2 * (int(x[e // 4, e % 4]) >> 9) + 1) * 2.0**-24) - 1
    noise.gaussian(1, 7, 1, 2, 0, start=start)
    assert calls[-1] == (1, start >> 2)


def test_bad_start_and_element_offsets():
    top = 4 << 48
    assert noise.gaussian(4, 0, 0, 0, start=top - 4).shape == (4,)  # the last four elements
    with pytest.raises(ValueError, match="counter range"):
        noise.gaussian(4, 0, 0, 0, start=top - 3)
    assert noise.rademacher(4, 0, 0, 0, start=(128 << 48) - 4).shape == (4,)
    with pytest.raises(ValueError, match="start"):
        noise.uniform_sym(4, 0, 0, 0, start=-1)
    assert noise.check_element_offsets(None, [3, 4], "gaussian") == [0, 0]
    assert noise.check_element_offsets((1, 2), [3, 4], "gaussian") == [1, 2]
    for offs, match in (([1], "element_offsets has 1 entries for 2 params"),
                        ([0, -2], r"element_offsets\[1\] must be >= 0"),
                        ([0, True], r"element_offsets\[1\] must be an int"),
                        ([top - 2, 0], r"element_offsets\[0\] \+ numel = .* exceeds")):
        with pytest.raises(ValueError, match=match):
            noise.check_element_offsets(offs, [3, 4], "gaussian")
    assert noise.check_element_offsets([top - 2, 0], [3, 4], "rademacher") == [top - 2, 0]


@pytest.mark.parametrize("gen", [noise.gaussian, noise.uniform_sym, noise.rademacher])
def test_streams_unrelated(gen):
    n = 100_000
    base = gen(n, 42, 7, 3, 0)
    for other in (gen(n, 43, 7, 3, 0), gen(n, 42, 8, 3, 0), gen(n, 42, 7, 4, 0), gen(n, 42, 7, 3, 1),
                  gen(n, 42 + 2**32, 7, 3, 0)):
        assert not torch.equal(base, other)
        corr = torch.corrcoef(torch.stack([base, other]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)  # 5 sigma for independent streams


def test_gaussian_moments():
    n = 1_000_000
    z = noise.gaussian(n, 2024, 0, 0).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean().item()) < 5 * math.sqrt(15) * se
    kurt = (z**4).mean().item()
    assert abs(kurt - 3) < 5 * math.sqrt(96) * se
    # each Box-Muller output, separately
    for a in range(4):
        za = z[a::4]
        assert abs(za.var().item() - 1) < 5 * math.sqrt(2 / za.numel())


def test_uniform_moments():
    n = 1_000_000
    u = noise.uniform_sym(n, 5, 1, 2).double()
    assert abs(u.mean().item()) < 5 * math.sqrt(1 / 3 / n)
    assert abs(u.var().item() - 1 / 3) < 5 * math.sqrt(4 / 45 / n)


@pytest.mark.parametrize("n", [1, 3, 127, 128, 129, 4097])
def test_rademacher_norm_is_numel(n):
    r = noise.rademacher(n, 1, 2, 3)
    assert r.pow(2).sum().item() == n
    assert set(r.unique().tolist()) <= {-1.0, 1.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        noise.gaussian(4, -1, 0, 0)
    with pytest.raises(ValueError, match="seed"):
        noise.gaussian(4, 2**64, 0, 0)
    with pytest.raises(ValueError, match="tensor_id"):
        noise.gaussian(4, 0, 0, 2**32)
    with pytest.raises(ValueError, match="sample"):
        noise.gaussian(4, 0, 0, 0, 2**16)
    with pytest.raises(ValueError, match="step"):
        noise.gaussian(4, 0, -1, 0)
    with pytest.raises(ValueError, match="numel"):
        noise.gaussian(-1, 0, 0, 0)
    with pytest.raises(ValueError, match="distribution"):
        noise.generate("laplace", 4, 0, 0, 0)


TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl
    from ssgd_fused import noise

    @triton.jit
    def k(out, seed, c1v, tid, step, n, BLOCK: tl.constexpr):
        b = tl.arange(0, BLOCK)
        m = b < n
        c0 = b.to(tl.uint32)
        c1 = (tl.full((BLOCK,), 0, tl.int64) + c1v).to(tl.uint32)
        c2 = (tl.full((BLOCK,), 0, tl.int64) + tid).to(tl.uint32)
        c3 = (tl.full((BLOCK,), 0, tl.int64) + step).to(tl.uint32)
        x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3, 10)
        tl.store(out + 4 * b + 0, x0.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out + 4 * b + 1, x1.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out + 4 * b + 2, x2.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out + 4 * b + 3, x3.to(tl.int64) & 0xFFFFFFFF, mask=m)

    fails = 0
    for seed, step, tid, sample in [(0, 0, 0, 0), (0x0123456789ABCDEF, 5, 9, 3), (2**64 - 1, 2**32 - 1, 2**32 - 1, 0)]:
        n = 1000
        out = torch.full((n * 4,), -1, dtype=torch.int64)
        k[(1,)](out, seed, sample << 16, tid, step, n, BLOCK=1024)
        ref = noise.philox_words(n, seed, step, tid, sample).reshape(-1)
        if not torch.equal(out, ref):
            fails += 1
            print("mismatch", seed, step, tid, sample, (out != ref).sum().item())
    print("OK" if fails == 0 else "FAIL")
""")


def test_matches_tl_philox_in_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]


# ---- the fused kernels' Box-Muller constants: one set of numbers in C++, Triton and Python --------
def _header_constants():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "csrc" / "noise_consts.h").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    out = {}
    for name, expr in re.findall(r"\b([A-Z][A-Z0-9]*)\s*=\s*([^,;]+?f)\s*[,;]", text):
        m = re.fullmatch(r"(?:(-?[\d.]+)f\s*\*\s*)?(-?0x[\da-f.]+p[+-]?\d+)f", expr.strip())
        if m:
            out[name] = (float(m.group(1)) if m.group(1) else 1.0) * float.fromhex(m.group(2))
    return out


def test_cpp_box_muller_constants_are_the_python_ones():
    got = _header_constants()
    want = {**noise.SINCOS_POLY, **noise.LOG_POLY}
    assert set(want) <= set(got), f"missing in csrc/noise_consts.h: {set(want) - set(got)}"
    for k, v in want.items():
        assert got[k] == v, k


def test_triton_box_muller_constants_are_the_python_ones():
    pytest.importorskip("triton")
    from ssgd_fused.kernels import _noise as tn

    for k, v in noise.SINCOS_POLY.items():
        assert getattr(tn, k).value == v, k


def test_box_muller_polynomials_within_spec_tolerance_on_every_input():
    """Every float32 t the kernels feed the polynomials (t = j 2^-22, |t| <= 1/2; f = z - 1 for
    every float32 z in [sqrt(1/2), sqrt(2))), evaluated in float32 as the kernels do."""
    import numpy as np

    f32 = np.float32
    t = (np.arange(-(1 << 21), (1 << 21) + 1, dtype=np.int64) * 2.0**-22).astype(f32)
    P = {k: f32(v) for k, v in noise.SINCOS_POLY.items()}
    t2 = t * t
    s = (((P["S3"] * t2 + P["S2"]) * t2 + P["S1"]) * t2 + P["S0"]) * t
    c = (((P["C4"] * t2 + P["C3"]) * t2 + P["C2"]) * t2 + P["C1"]) * t2 + f32(1)
    td = t.astype(np.float64) * (np.pi / 2)
    assert np.abs(s - np.sin(td)).max() <= 1e-6
    assert np.abs(c - np.cos(td)).max() <= 1e-6
    lo, hi = np.float32(np.sqrt(0.5)).view(np.int32), np.float32(np.sqrt(2.0)).view(np.int32)
    z = np.arange(lo, hi, dtype=np.int32).view(f32)
    f = z - f32(1)
    L = {k: f32(v) for k, v in noise.LOG_POLY.items()}
    q = L["LQ7"]
    for k in ("LQ6", "LQ5", "LQ4", "LQ3", "LQ2", "LQ1", "LQ0"):
        q = q * f + L[k]
    m2ln = f * (f32(-2) + f * q)
    exact = -2 * np.log(z.astype(np.float64))
    assert np.abs(m2ln - exact).max() <= 2e-6 * 0.5  # half the spec's budget: r = sqrt adds its own
