"""Linear layers. Weights are created empty; the loader fills them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FusedLinear(Linear):
    """Several projections of one input stored as one matrix (QKV, gate+up), so they run as one GEMM.

    Checkpoints store the parts separately; each parameter records `shard_sizes` so the loader
    can copy part i into rows [sum(sizes[:i]), sum(sizes[:i+1])).
    """

    def __init__(self, in_features: int, out_sizes: tuple[int, ...], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = out_sizes
        for param in self.parameters():
            param.shard_sizes = out_sizes
