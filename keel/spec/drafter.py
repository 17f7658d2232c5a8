"""The drafter contract, and the drafter an EngineConfig asks for."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from keel.config import EngineConfig
from keel.runner.forward_batch import ForwardBatch
from keel.runner.model_runner import ModelRunner
from keel.scheduler.batch import DraftTokens
from keel.scheduler.scheduler import ScheduledBatch


class Drafter(Protocol):
    def propose(self, batch: ScheduledBatch) -> Optional[DraftTokens]:
        """Draft tokens for the batch's parts with num_draft > 0 (None when it has none); their KV slots are
        already allocated, so a draft model may write into them."""
        ...

    def observe(self, batch: ForwardBatch) -> None:
        """The target has just run `batch` (prefill chunks and verified drafts): a draft model writes its own KV
        for the same tokens, so its cache covers everything the target's does."""
        ...


def create_drafter(config: EngineConfig, device: torch.device,
                   draft_runner: Optional[ModelRunner]) -> Optional[Drafter]:
    if config.speculative_algorithm is None:
        return None
    if config.speculative_algorithm == "NGRAM":
        from keel.spec.ngram import NgramDrafter

        return NgramDrafter(config.num_draft_tokens, config.speculative_ngram_min_match_window_size,
                            config.speculative_ngram_max_match_window_size, device)
    if config.speculative_algorithm == "STANDALONE":
        from keel.spec.draft_model import DraftModelDrafter

        assert draft_runner is not None  # EngineCore loads it for STANDALONE
        return DraftModelDrafter(draft_runner, config.num_draft_tokens, draft_runner.model_config.vocab_size)
    raise ValueError(f"speculative algorithm {config.speculative_algorithm} is not available")
