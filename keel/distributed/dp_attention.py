"""Data-parallel attention: each rank attends over its own requests; the MLP / expert layers see every rank's tokens.

Every rank runs one forward per round, in lockstep, because the MLP layers gather hidden states from all of them.
Before each forward the ranks agree, on the host, on the round's shape (`agree_round`): how many tokens each brings.
A rank with no requests brings zero and runs an IDLE forward; a round where no rank has tokens runs no forward at
all. In a decode round (every rank decoding or idle) each rank pads its batch to the largest one, so every rank
runs the same shape (the same captured CUDA graph; padded rows are neutral), and an idle rank's forward is all
padding. Around each MLP the round's tokens are gathered (`DpRound.gather`), the split MLP runs on all of them, and
its partial results are summed over the ranks by a reduce-scatter that leaves each rank its own rows
(`DpRound.scatter_sum`).

The round is a value of its forward, carried by its ForwardBatch like the attention metadata (DESIGN rule
"metadata is a value"): nothing of a previous round is reachable from the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from keel.distributed.parallel import all_gather_rows, reduce_scatter_rows, tensor_parallel


@dataclass(frozen=True)
class DpRound:
    """The shape of one forward on every data-parallel rank."""

    rank: int  # this rank
    tokens: tuple[int, ...]  # tokens each rank's forward holds (padded rows included)
    decode: bool  # every rank decodes (or idles): the batches are padded to one size

    def __post_init__(self) -> None:
        if not 0 <= self.rank < len(self.tokens) or min(self.tokens) < 0:
            raise ValueError(f"DpRound: rank {self.rank} of token counts {self.tokens}")
        if self.decode and len(set(self.tokens)) != 1:
            raise ValueError(f"DpRound: a decode round pads every rank to one size, got {self.tokens}")

    @property
    def padded(self) -> int:
        """Rows each rank contributes to the gather."""
        return max(self.tokens)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, [ranks * padded, dim]: rank r's at [r * padded, r * padded + tokens[r]), zeros after."""
        mine = self.tokens[self.rank]
        if hidden.shape[0] != mine:
            raise ValueError(f"DP round: rank {self.rank} brings {hidden.shape[0]} rows, the round says {mine}")
        return all_gather_rows(F.pad(hidden, (0, 0, 0, self.padded - mine)) if mine < self.padded else hidden)

    def scatter_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the sum over the ranks of `partial` (each rank's partial result of a split layer on
        the gathered rows): a reduce-scatter, half the traffic of an all-reduce, and no rank adds rows it drops."""
        return reduce_scatter_rows(partial)[:self.tokens[self.rank]]


def agree_round(tokens: int, decode: bool) -> DpRound | None:
    """Exchange (on the host) what each rank brings to this round; None when no rank has a token (no forward).
    Every rank calls it once per engine step, whether or not it has a batch."""
    tp = tensor_parallel()
    mine = torch.tensor([tokens, int(decode)], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(parts, mine, group=tp.control)
    counts = tuple(int(p[0]) for p in parts)
    if not any(counts):
        return None
    if all(int(p[1]) for p in parts):
        return DpRound(tp.rank, (max(counts),) * tp.size, True)
    return DpRound(tp.rank, counts, False)
