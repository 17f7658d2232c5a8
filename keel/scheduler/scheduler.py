"""Scheduler: a minimal continuous-batching loop.

Each step either prefills newly admitted requests or decodes every running request; requests
join between steps and leave as soon as they finish. Admission reserves the KV a request can
ever need (prompt + max_new_tokens - 1), so a decode step always finds its pages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from keel.cache.kv_cache import KVCacheManager
from keel.runner.forward_batch import ForwardMode
from keel.scheduler.req import FinishReason, Req, ReqStatus


@dataclass(frozen=True)
class ScheduledBatch:
    mode: ForwardMode
    reqs: list[Req]
    extend_lens: list[int]  # new tokens per request in this step
    seq_lens: list[int]  # KV length of each request once this step's tokens are written
    out_cache_loc: torch.Tensor  # host int64, KV slot of each new token


@dataclass(frozen=True)
class TokenAppended:
    index: int  # the request's position in the batch
    req: Req
    finish_reason: Optional[FinishReason]


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_prefill_tokens: int) -> None:
        self.kv = kv_cache
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Optional[ScheduledBatch]:
        return self._prefill() or self._decode()

    def _prefill(self) -> Optional[ScheduledBatch]:
        admitted: list[Req] = []
        budget = self.max_prefill_tokens
        free_pages = self.kv.pages.num_free - self._pages_still_needed(self.running)
        while self.waiting:
            req = self.waiting[0]
            need = int(self.kv.pages.pages_for(torch.tensor(req.max_kv_len)))
            if need > free_pages or (admitted and len(req.prompt_ids) > budget):
                break
            row = self.kv.assign_row(req.rid)
            if row is None:
                break
            self.waiting.popleft()
            req.row, req.status = row, ReqStatus.RUNNING
            self.running.append(req)  # from here on, abort() finds it and releases its KV
            admitted.append(req)
            budget -= len(req.prompt_ids)
            free_pages -= need
        if not admitted:
            return None
        return self._batch(ForwardMode.EXTEND, admitted, [len(r.prompt_ids) for r in admitted])

    def _decode(self) -> Optional[ScheduledBatch]:
        reqs = [r for r in self.running if r.output_ids]  # all of them, unless a prefill is in flight
        if not reqs:
            return None
        return self._batch(ForwardMode.DECODE, reqs, [1] * len(reqs))

    def _batch(self, mode: ForwardMode, reqs: list[Req], extend_lens: list[int]) -> ScheduledBatch:
        """Grow each request's KV by its extend length and describe the step."""
        rows = torch.tensor([r.row for r in reqs], dtype=torch.int64)
        owners = torch.tensor([r.rid for r in reqs], dtype=torch.int64)
        seq_lens = self.kv_lens(reqs) + torch.tensor(extend_lens, dtype=torch.int64)
        slots = self.kv.grow(rows, owners, seq_lens)
        if slots is None:
            raise RuntimeError("KV pool exhausted although admission reserved every request's pages")
        return ScheduledBatch(mode, reqs, extend_lens, seq_lens.tolist(), slots)

    def kv_lens(self, reqs: list[Req]) -> torch.Tensor:
        return torch.tensor([self.kv.kv_len(r.row) for r in reqs], dtype=torch.int64)

    def _pages_still_needed(self, reqs: list[Req]) -> int:
        if not reqs:
            return 0
        final = self.kv.pages.pages_for(torch.tensor([r.max_kv_len for r in reqs]))
        return int((final - self.kv.pages.pages_for(self.kv_lens(reqs))).sum())

    def process(self, batch: ScheduledBatch, token_ids: list[int]) -> list[TokenAppended]:
        """Append each request's sampled token; finished requests release their KV and leave."""
        appended = []
        for i, (req, token_id) in enumerate(zip(batch.reqs, token_ids)):
            if req.status == ReqStatus.FINISHED:  # aborted while its forward ran
                continue
            reason = req.append_token(token_id)
            if reason is not None:
                self._finish(req, reason)
            appended.append(TokenAppended(i, req, reason))
        return appended

    def abort(self, rid: int, reason: FinishReason = "abort") -> Optional[Req]:
        """Finish a request wherever it is; returns it, or None if it is unknown or already finished."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                req.status, req.finish_reason = ReqStatus.FINISHED, reason
                return req
        for req in self.running:
            if req.rid == rid:
                self._finish(req, reason)
                return req
        return None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        if req.row is not None:
            self.kv.release(req.row, req.rid)
            req.row = None
        if req in self.running:
            self.running.remove(req)
        req.status, req.finish_reason = ReqStatus.FINISHED, reason
