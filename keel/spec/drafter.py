"""The drafter contract, and the drafter an EngineConfig asks for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from keel.cache.req_table import ReqToTokenTable
from keel.config import EngineConfig
from keel.runner.forward_batch import ForwardBatch
from keel.runner.model_runner import ModelRunner
from keel.scheduler.batch import DraftRoots, DraftTokens
from keel.scheduler.req import Req
from keel.scheduler.scheduler import ScheduledBatch


@dataclass(frozen=True)
class TargetStep:
    """What the target's forward leaves a drafter: its batch and, for a drafter that reads the target's hidden
    states (EAGLE), those states and the tokens that follow each position."""

    batch: ForwardBatch
    features: Optional[torch.Tensor] = None  # [tokens, dim] the target's captured hidden states
    next_token_ids: Optional[torch.Tensor] = None  # [tokens] the token after each one (junk past rejected drafts)
    last_tokens: Optional[torch.Tensor] = None  # [sampled parts] token index of each one's last committed token
    last_req_rows: Optional[torch.Tensor] = None  # [sampled parts] their request-table rows
    last_reqs: tuple[Req, ...] = ()  # their requests


class Drafter(Protocol):
    reads_target_features: bool  # observe needs TargetStep's optional fields (EAGLE)
    # EAGLE: the head's input feature of each request's last committed position, per request-table row (state a
    # disaggregated prefill server sends the decode server with the KV); None for other drafters
    features: Optional[torch.Tensor]

    def propose(self, batch: ScheduledBatch, roots: DraftRoots) -> Optional[DraftTokens]:
        """Draft tokens for the batch's parts with num_draft > 0 (None when it has none), from `roots` (their
        last tokens and positions, on the device); their KV slots are already allocated, so a draft model may
        write into them."""
        ...

    def observe(self, step: TargetStep) -> None:
        """The target has just run step.batch (prefill chunks and verified drafts) and its tokens are drawn: a
        draft model writes its own KV for the same positions, so its cache covers everything the target's does."""
        ...


def create_drafter(config: EngineConfig, device: torch.device, draft_runner: Optional[ModelRunner],
                   table: ReqToTokenTable) -> Optional[Drafter]:
    if config.speculative_algorithm is None:
        return None
    if config.speculative_algorithm == "NGRAM":
        from keel.spec.ngram import NgramDrafter

        return NgramDrafter(config.num_draft_tokens, config.speculative_ngram_min_match_window_size,
                            config.speculative_ngram_max_match_window_size, device)
    from keel.spec.draft_model import DraftModelDrafter

    assert draft_runner is not None  # EngineCore loads it for STANDALONE, EAGLE and EAGLE3
    return DraftModelDrafter(draft_runner, config.num_draft_tokens, table, config.speculative_num_steps,
                             config.speculative_eagle_topk)
