"""RMSNorm (and Gemma's variant), computed in float32 as Hugging Face does.

`fused=True` runs it as one Triton kernel (keel.kernels.norm); otherwise plain torch, rounding
exactly where transformers does. Before a projection of one row, the projection's kernel applies
the norm itself (keel.models.layers.linear), so this module only holds the weight there.
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
            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).reshape(x.shape)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: checkpoints store the scale as an offset from 1, and the product with it is
    taken in float32 before rounding (Llama rounds first), as transformers does. Plain torch only:
    keel's fused kernels round the Llama way."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)
