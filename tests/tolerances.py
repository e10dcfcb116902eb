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
# optimizer trajectories over many steps accumulate rounding differences
TRAJ_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-3),
    torch.float16: dict(rtol=5e-3, atol=1e-4),
}
NORM_RTOL = 1e-6  # ||n_i|| = alpha ||w_i|| relative error
GAUSS_TOL = GAUSSIAN_TOL  # |dz| <= GAUSS_TOL * max(1, |z|) between backends
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 4097, 65537]


def describe(dtype):
    return str(dtype).replace("torch.", "")
