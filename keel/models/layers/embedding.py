"""Token embedding and LM head, split over the vocabulary under tensor parallelism.

With several ranks each holds a contiguous slice of the vocabulary's rows (an equal share, rounded up: the last
rank's rows past the vocabulary are zeros): the embedding looks up the ids in its slice (zeros for the others) and
the ranks sum; the LM head's logits for its slice are gathered from all ranks and cut to the vocabulary, so every
rank has the whole vocabulary's logits (and samples the same token from them). Under
data-parallel attention every rank holds the whole vocabulary (its tokens are its own).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from keel.distributed.parallel import all_gather_last_dim, all_reduce, tensor_parallel, vocab_rows
from keel.kernels.gemv import gemv, gemv_applies


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        rows = vocab_rows(vocab_size)
        self.split = rows < vocab_size
        self.first_id = tensor_parallel().rank * rows if self.split else 0
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        if self.split:
            self.weight.tp_dim, self.weight.tp_padded = 0, True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_id
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        return all_reduce(out)


class LMHead(nn.Module):
    """Projects hidden states to float32 logits; shares the embedding matrix when tied.

    With `fused`, a single row goes through the GEMV kernel, which writes float32 directly, and on a GPU so does
    cuBLAS for many rows (rounding them to bfloat16 and copying them to float32 took two passes over the logits:
    ~0.1 ms of a 5.7 ms step of qwen3-0.6b at batch 256)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None,
                 fused: bool = False) -> None:
        super().__init__()
        self.tied = tied_to is not None
        self.fused = fused
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_rows(vocab_size), hidden_size), requires_grad=False)
            if self.weight.shape[0] < vocab_size:
                self.weight.tp_dim, self.weight.tp_padded = 0, True
        self.split = self.weight.shape[0] < vocab_size

    def forward(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The logits [rows, vocab], written into `out` when given (a CUDA graph's buffer that graphs of every
        size share)."""
        if self.split:  # this rank's columns, then all of them (without the padding past the vocabulary)
            logits = all_gather_last_dim(self._logits(hidden, None))[:, :self.vocab_size]
            return logits if out is None else out.copy_(logits)
        return self._logits(hidden, out)

    def _logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        if self.fused and gemv_applies(hidden, self.weight):
            return gemv(hidden, self.weight, out_dtype=torch.float32, out=out)
        if self.fused and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
            return torch.mm(hidden, self.weight.t(), out_dtype=torch.float32, out=out)
        logits = F.linear(hidden, self.weight).float()
        return logits if out is None else out.copy_(logits)
