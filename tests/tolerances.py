"""Tolerances, in one place. (rtol, atol) per dtype for comparisons with the float32 reference.

16-bit: one rounding of the stored value is half an ulp (bf16 2^-9, fp16 2^-12 relative); a fused
kernel that computes in float32 and rounds once may land one ulp away from the reference where
the reference's float32 value sits near a rounding boundary, so atol/rtol allow about one ulp.
"""

import torch

from ssgd_fused.noise import GAUSSIAN_TOL

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2 ** -7, atol=1e-5),
    torch.float16: dict(rtol=2 ** -10, atol=1e-6),
}
# Optimizer trajectories over many steps accumulate rounding differences. In 16 bits a noise value
# that differs within the spec tolerance occasionally rounds a stored momentum/moment entry one ulp
# the other way; that ulp of an O(1) buffer reaches the weights through lr / (1 - momentum). So
# 16-bit trajectories are compared in ulps of each tensor's largest magnitude.
TRAJ_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-3),
    torch.float16: dict(rtol=5e-3, atol=1e-4),
}
TRAJ_ULPS = 4  # 16-bit: |a - b| <= 4 ulp(max |b|)


def assert_trajectory_close(a, b, dtype, msg=""):
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, **TRAJ_TOL[dtype], msg=msg)
        return
    scale = b.float().abs().max().clamp(min=torch.finfo(dtype).tiny)
    bound = TRAJ_ULPS * torch.finfo(dtype).eps * scale
    err = (a.float() - b.float()).abs().max()
    assert err <= bound, f"{msg}: max |diff| {err.item():.3g} > {TRAJ_ULPS} ulp of max |b| ({bound.item():.3g})"
NORM_RTOL = 1e-6  # ||n_i|| = alpha ||w_i|| relative error
GAUSS_TOL = GAUSSIAN_TOL  # |dz| <= GAUSS_TOL * max(1, |z|) between backends
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 4097, 65537]


def describe(dtype):
    return str(dtype).replace("torch.", "")
