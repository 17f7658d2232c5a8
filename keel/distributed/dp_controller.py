"""Rank 0's data-parallel attention controller: which rank takes each request, and what the ranks answered.

Requests go to the rank holding the fewest tokens (running requests' tokens so far and queued prompts, as each
rank reported after the last step, plus the prompts sent to it since), not round robin: a rank busy with long
requests gets fewer new ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from keel.engine.outputs import CoreOutput


@dataclass(frozen=True)
class RankStep:
    """One rank's answer to a step."""

    outputs: list[CoreOutput]
    load: int  # tokens of the requests it holds after the step
    has_work: bool


class DpController:
    def __init__(self, size: int) -> None:
        self.loads = [0] * size
        self.busy = [False] * size  # a rank may hold work: it said so after the last step, or got a request since

    def assign(self, prompt_tokens: int, rank: Optional[int] = None) -> int:
        """The rank that takes a request of `prompt_tokens` (`rank` when the caller names one)."""
        if rank is None:
            rank = min(range(len(self.loads)), key=lambda r: (self.loads[r], r))
        self.loads[rank] += prompt_tokens
        self.busy[rank] = True
        return rank

    def collect(self, answers: list[RankStep]) -> list[CoreOutput]:
        """Every rank's outputs of one step (in rank order), noting their loads."""
        outputs: list[CoreOutput] = []
        for rank, answer in enumerate(answers):
            outputs += answer.outputs
            self.loads[rank], self.busy[rank] = answer.load, answer.has_work
        return outputs

    @property
    def others_busy(self) -> bool:
        """Whether a rank other than 0 may hold work (rank 0's own is known to its core)."""
        return any(self.busy[1:])
