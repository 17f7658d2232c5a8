"""Token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from keel.kernels.gemv import gemv, gemv_applies


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to float32 logits; shares the embedding matrix when tied.

    With `fused`, a single row goes through the GEMV kernel, which writes float32 directly."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None,
                 fused: bool = False) -> None:
        super().__init__()
        self.tied = tied_to is not None
        self.fused = fused
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.fused and gemv_applies(hidden, self.weight):
            return gemv(hidden, self.weight, out_dtype=torch.float32)
        return F.linear(hidden, self.weight).float()
