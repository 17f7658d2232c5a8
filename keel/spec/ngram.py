"""NGRAM drafting: no extra model. The request's latest n tokens (longest n first) are looked up among its
earlier tokens, prompt and output alike; the tokens that followed their most recent earlier occurrence are the
draft. Pays off where outputs repeat their input: editing, quoting, code, extraction.

Each request's n-grams are indexed incrementally (each token indexed once), in a table that lives exactly as
long as the request does (a weak reference to it), so no exit path needs to remember to drop it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from keel.scheduler.batch import DraftRoots, DraftTokens
from keel.scheduler.req import Req
from keel.scheduler.scheduler import ScheduledBatch
from keel.spec.drafter import TargetStep
from keel.transfer import to_device


class _NgramIndex:
    """The n-grams of one request's tokens [0, len(tokens) - 1), each mapped to where it last ended."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.last_end: dict[tuple[int, ...], int] = {}

    def extend(self, req: Req, min_n: int, max_n: int) -> None:
        """Catch up with `req`'s known tokens. n-grams ending at the very end are not indexed: the current
        suffix must be found earlier, not as itself."""
        old = len(self.tokens)
        self.tokens += req.token_ids(old, req.known_len)
        tokens = self.tokens
        for end in range(max(old, 1), len(tokens)):
            for n in range(min_n, min(max_n, end) + 1):
                self.last_end[tuple(tokens[end - n:end])] = end

    def draft(self, k: int, min_n: int, max_n: int) -> list[int]:
        tokens = self.tokens
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            end = self.last_end.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                return tokens[end:end + k]
        return []


class NgramDrafter:
    reads_target_features = False
    features = None

    def __init__(self, num_draft: int, min_match: int, max_match: int, device: torch.device) -> None:
        self.num_draft = num_draft
        self.min_match, self.max_match = min_match, max_match
        self.device = device
        self._indexes: weakref.WeakKeyDictionary[Req, _NgramIndex] = weakref.WeakKeyDictionary()

    def propose(self, batch: ScheduledBatch, roots: DraftRoots) -> Optional[DraftTokens]:
        """From the tokens on the host (the scheduler drafts only for requests with none pending)."""
        parts = [p for p in batch.sampled if p.num_draft]
        if not parts:
            return None
        drafts = []
        for part in parts:
            index = self._indexes.setdefault(part.req, _NgramIndex())
            index.extend(part.req, self.min_match, self.max_match)
            found = index.draft(self.num_draft, self.min_match, self.max_match)
            # Short of a match, repeat the last token: the verify forward has a fixed shape either way.
            drafts.append(found + [index.tokens[-1]] * (self.num_draft - len(found)))
        return DraftTokens(to_device(drafts, torch.int64, self.device), {p.req.rid: i for i, p in enumerate(parts)})

    def observe(self, step: TargetStep) -> None:
        """The target's forward ran; n-grams keep no KV."""
