"""RMSNorm, computed in float32 as Hugging Face does, with an optional fused residual add.

`fused=True` runs it as one Triton kernel (keel.kernels.norm); otherwise plain torch, rounding
exactly where transformers does.
"""

from __future__ import annotations

import torch
from torch import nn

from keel.kernels.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)[0].reshape(x.shape)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's sum stays in the model dtype."""
        if self.fused:
            normed, summed = rms_norm(x, self.weight, self.eps, residual)
            assert summed is not None
            return normed, summed
        summed = x + residual
        return self.forward(summed), summed
