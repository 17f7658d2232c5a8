"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keel.kernels.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """silu(gate) * up for a fused [gate | up] projection output (one Triton kernel when `fused`)."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu(gate, tanh approximation) * up for a fused [gate | up] projection output (Gemma)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
