"""ssgd_fused: S-SGD (symmetrical weight-noise SGD) with fused, memory-free kernels.

    import torch, ssgd_fused
    opt = ssgd_fused.SSGD(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, noise=0.5)
    loss = opt.step(closure)        # closure: forward + backward, returns the loss
"""

from . import noise, ops, reference
from .optim import SSGD

__all__ = ["SSGD", "noise", "ops", "reference", "__version__"]
__version__ = "0.1.0"
