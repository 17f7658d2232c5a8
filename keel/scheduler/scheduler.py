"""Scheduler: continuous batching over a prefix cache, with chunked prefill and retraction.

Each step is a prefill (new requests, or the next chunk of a long prompt), a decode of every
running request, or, with mixed chunks enabled, both in one batch. Without mixed chunks the
two alternate while both have work, so decodes keep going during a long chunked prefill.

Admission reserves what a request will still need: its prompt pages now, and a fraction
(`new_token_ratio`, as in SGLang) of its remaining max_new_tokens for later. The fraction
decays while decoding goes well; if a decode step still runs out of pages after evicting the
prefix cache, requests are retracted (fewest generated tokens first) to the front of the
queue, their KV released once, and later re-prefilled from prompt + output so far, which
continues exactly where they stopped.

With overlap scheduling the next step is scheduled before the last one's tokens are read: a
sampled request carries a pending token (counted in its length, its id still on the device), a
request with two steps in flight is not decoded again, and one retracted with a pending token is
re-admitted only once that token is known. A verify step in flight counts every token it may emit:
lengths are then upper bounds, KV is allocated for them, and the next step finds its true positions
on the device; reading the verify gives back what neither it nor the step after it uses.

A request is always in exactly one place: `waiting`, `chunked` (mid-prefill), `running`
(prefilled or prefilling this step, then decoding), `parked` (disaggregation: holding KV outside any
batch while it moves between servers), or finished; so abort() finds it anywhere.
"""

from __future__ import annotations

import functools
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from keel.cache.kv_cache import KVCacheManager
from keel.config import EngineConfig
from keel.runner.forward_batch import ForwardMode
from keel.scheduler.req import FinishReason, Req, ReqStatus

_NO_SLOTS = torch.zeros(0, dtype=torch.int64)
INITIAL_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001  # per decode step
# After a retraction, running requests are assumed to decode this many more steps each (SGLang's estimate).
RETRACT_LOOKAHEAD_STEPS = 20
RETRACT_EVERY_ENV = "KEEL_DEBUG_RETRACT_EVERY"  # fault injection: force a retraction every N decode steps
# Speculative backoff: below this mean of accepted drafts per verify, drafting costs more than it saves (a verify
# of 4 tokens takes ~1.2x a decode step at batch 1, more at larger batches), so the request drafts half as often
# (every 2nd, 4th, ... step, at most every MAX_DRAFT_INTERVAL-th) until its drafts pay again.
MIN_ACCEPTED_DRAFTS = 0.5
MAX_DRAFT_INTERVAL = 64


# BatchPart, TokenAppended and CoreOutput are made per request and step (hundreds per step at high batch): plain
# slotted dataclasses, treated as immutable, because a frozen dataclass's __init__ costs about 4x as much.
@dataclass(slots=True)
class BatchPart:
    """One request's share of a step."""

    req: Req
    row: int
    extend_len: int  # tokens it adds this step
    seq_len: int  # its KV length after this step
    samples: bool  # this step ends the request's prefill (or decodes it), so a token is sampled for it
    # Speculative decoding: the last `num_draft` of the extend_len tokens are draft tokens, proposed after
    # scheduling (their ids come from the drafter); every one of the extend_len positions is scored.
    num_draft: int = 0
    held: int = 0  # decoding: KV slots it holds past its first (root) token, the drafts' and a tree drafter's


@dataclass(frozen=True)
class ScheduledBatch:
    mode: ForwardMode
    parts: list[BatchPart]
    # host int64 [sum of extend_len]: where the new tokens' K/V go, part after part (one tensor for the step: a
    # tensor per part cost a split and a concatenation of hundreds of one-element tensors per decode step)
    slots: torch.Tensor

    @functools.cached_property  # read several times per step
    def sampled(self) -> list[BatchPart]:
        return [p for p in self.parts if p.samples]


@dataclass(slots=True)
class TokenAppended:
    index: int  # position among the batch's sampled parts
    req: Req
    token_ids: list[int]  # what the request kept: one token, or accepted drafts and one more (speculative)
    finish_reason: Optional[FinishReason]
    num_draft: int = 0  # draft tokens it was verified with this step
    num_accepted: int = 0  # of those, how many the target accepted


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, config: EngineConfig) -> None:
        self.kv = kv_cache
        self.config = config
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Optional[Req] = None
        # Disaggregation: requests holding KV outside any batch while it moves: on a decode server, preallocated
        # and waiting for the prefill server's pages; on a prefill server, prefilled and sending them
        self.parked: dict[int, Req] = {}
        self.failed: list[Req] = []  # finished with an error while scheduling; the core reports them
        self.new_token_ratio = INITIAL_NEW_TOKEN_RATIO
        self._last_mode: Optional[ForwardMode] = None
        self._decode_steps = 0
        self._retract_every = int(os.environ.get(RETRACT_EVERY_ENV, "0") or 0)

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.parked)

    @property
    def has_batch_work(self) -> bool:
        """Requests a batch could take (parked ones wait for their KV to move, not for a batch)."""
        return bool(self.waiting or self.running or self.chunked)

    @property
    def load_tokens(self) -> int:
        """Tokens of the requests this scheduler holds: running ones' so far, queued ones' prompts (what a
        data-parallel controller balances)."""
        return sum(r.known_len for r in self._in_batches()) + sum(len(r.prompt_ids) for r in self.waiting)

    # ---- choosing the next batch -------------------------------------------------------------

    def schedule(self) -> Optional[ScheduledBatch]:
        mixed = self.config.enable_mixed_chunk
        has_prefill = bool(self.waiting) or self.chunked is not None
        decode_first = bool(self.running) and (mixed or not has_prefill or self._last_mode == ForwardMode.EXTEND)
        decodes, decode_slots = self._decode_parts() if decode_first else ([], _NO_SLOTS)
        prefills = self._prefill_parts() if mixed or not decodes else []
        if not prefills and not decodes and self.running:
            decodes, decode_slots = self._decode_parts()  # nothing could be admitted: decode instead of idling
        if not prefills and not decodes and (self.waiting or self.chunked is not None):
            prefills = self._prefill_parts()  # a retraction just now may have made room
        if not prefills and not decodes:
            self._last_mode = None
            return None
        mode = ForwardMode.MIXED if prefills and decodes else ForwardMode.EXTEND if prefills else ForwardMode.DECODE
        if mode == ForwardMode.DECODE and any(p.num_draft for p in decodes):
            mode = ForwardMode.TARGET_VERIFY  # with prefills, drafts are verified in a MIXED (extend) batch
        self._last_mode = mode
        slots = torch.cat([slots for _, slots in prefills] + [decode_slots]) if prefills else decode_slots
        return ScheduledBatch(mode, [part for part, _ in prefills] + decodes, slots)

    def _decode_parts(self) -> tuple[list[BatchPart], torch.Tensor]:
        """Every decodable request's part, and their new tokens' slots (one tensor, part after part)."""
        self._decode_steps += 1
        ready = self._decodable()
        if self._retract_every and self._decode_steps % self._retract_every == 0 and ready:
            self._retract(self._retraction_victim(ready))
            ready = self._decodable()
        drafts: list[int] = []
        held: list[int] = []  # KV slots each holds past its last token: its drafts' (and a tree drafter's)
        # the step's first query is at the last known token's position or later (a step in flight adds tokens)
        self.kv.free_out_of_window([r.rid for r in ready], [r.known_len - 1 for r in ready])
        seq_lens: list[int] = []
        while ready:
            rids, seq_lens = [r.rid for r in ready], [r.seq_len for r in ready]
            drafts = [self._draft_budget(r) for r in ready] if self.config.num_draft_tokens else [0] * len(ready)
            held = [self.config.draft_reserve if d and self.config.draft_tree else d for d in drafts]
            slots = self._grow(rids, [n + h for n, h in zip(seq_lens, held)])
            if slots is None and any(drafts):  # short of pages: decode without drafts before retracting anyone
                drafts = held = [0] * len(ready)
                slots = self._grow(rids, seq_lens)
            if slots is not None:
                break
            if len(ready) == 1 and self.chunked is None:
                if len(self.running) > 1 or self.parked:
                    # the others are at their last (pending) token, or parked: their KV comes back soon
                    return [], _NO_SLOTS
                self.fail(ready[0], f"the KV pool ({self.kv.capacity_tokens} tokens) cannot hold this request's "
                                    f"{ready[0].seq_len} tokens")
                return [], _NO_SLOTS
            self._retract(self._retraction_victim(ready))
            ready = self._decodable()
        if not ready:
            return [], _NO_SLOTS
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        # Each part's slots from its last token on. grow() gave those of the positions past the KV held so far:
        # the same when each request grew by its one last token (the KV held so far ended before it), not after a
        # verify in flight (lengths are upper bounds then, and the device shifts these slots back).
        if any(drafts) or slots.numel() != len(ready):
            slots = self.kv.slots(rids, [n - 1 for n in seq_lens], [n + d for n, d in zip(seq_lens, drafts)])
        return [BatchPart(r, self.kv.row(r.rid), 1 + d, n + d, True, d, h)
                for r, n, d, h in zip(ready, seq_lens, drafts, held)], slots

    def _grow(self, rids: list[int], lens: list[int]) -> Optional[torch.Tensor]:
        """kv.grow to `lens`, but never below what a request holds: a tree step in flight holds its drafter's
        reserve, which can reach past this step's tokens (a step without drafts, or a reserve above the drafts)."""
        return self.kv.grow(rids, [max(n, held) for n, held in zip(lens, self.kv.kv_lens(rids))])

    def wants_drafts(self) -> bool:
        """Whether the next decode step would draft for some request with a drafter that reads its tokens on the
        host (NGRAM): then the step in flight must be read first. Draft models start from the device."""
        step = self._decode_steps + 1
        return self.config.drafter_reads_host_tokens and any(
            self._drafts_in(r, step) and r.num_generated + 1 < r.params.max_new_tokens for r in self.running)

    def _drafts_in(self, req: Req, step: int) -> bool:
        """Whether `req` may draft in decode step `step`: not with penalties (they count each output token on the
        host before the next is drawn), and not on the steps its backoff skips."""
        return self.config.num_draft_tokens > 0 and not req.params.has_penalties and step % req.draft_every == 0

    def _draft_budget(self, req: Req) -> int:
        """Draft tokens `req` gets in the decode step being scheduled: the configured number when it may draft
        (`_drafts_in`), but none past its max_new_tokens or the context (as far as the host knows), and none while
        it has a pending token if the drafter reads tokens on the host. A tree is drafted whole or not at all, and
        needs room for its drafter's reserve too."""
        if (req.pending and self.config.drafter_reads_host_tokens) or not self._drafts_in(req, self._decode_steps):
            return 0
        keepable = req.params.max_new_tokens - req.num_generated - 1  # drafts that could still be kept
        room = self.kv.context_length - req.seq_len  # KV slots past the last token
        if self.config.draft_tree:
            return self.config.num_draft_tokens if keepable >= 1 and room >= self.config.draft_reserve else 0
        return max(0, min(self.config.num_draft_tokens, keepable, room))

    def _decodable(self) -> list[Req]:
        """Running requests with at most one step in flight, whose KV covers all but their last token, and that
        may still owe tokens."""
        kv_lens = self.kv.kv_lens([r.rid for r in self.running])
        return [r for r, kv_len in zip(self.running, kv_lens)
                if len(r.held_in_flight) <= 1 and kv_len >= r.seq_len - 1 and r.num_generated < r.params.max_new_tokens]

    @property
    def _prefill_budget(self) -> int:
        """Most prompt tokens one step prefills."""
        budget = self.config.max_prefill_tokens
        if self.config.chunked_prefill_size is not None:
            budget = min(budget, self.config.chunked_prefill_size)
        return budget

    def _prefill_parts(self) -> list[tuple[BatchPart, torch.Tensor]]:
        """The step's prefill parts, each with its new tokens' slots."""
        budget = self._prefill_budget
        parts: list[tuple[BatchPart, torch.Tensor]] = []
        if self.chunked is not None:
            extended = self._extend(self.chunked, budget)
            if extended is None:
                return []
            parts.append(extended)
            budget -= extended[0].extend_len
            if not extended[0].samples:
                return parts
            self.running.append(self.chunked)
            self.chunked = None
        expected = sum(self._expected_tokens(r) for r in self._holding_kv())  # grows with each admission
        for req in self._admission_order():
            if budget <= 0 or (parts and not self._chunking and len(req.prompt_ids) > budget):
                break
            admitted = self._admit(req, budget, expected)
            if admitted is None:
                break
            parts.append(admitted)
            part = admitted[0]
            budget -= part.extend_len
            expected += self._expected_tokens(req)
            if not part.samples:
                self.chunked = req
                break
            self.running.append(req)
        return parts

    @property
    def _chunking(self) -> bool:
        return self.config.chunked_prefill_size is not None

    def _admission_order(self) -> list[Req]:
        """Waiting requests to try, in policy order; one retracted while its last token was still pending
        waits until that token is known (its prefill needs every id)."""
        ready = [r for r in self.waiting if not r.pending]
        if self.config.schedule_policy == "lpm":  # longest cached prefix first; ties keep arrival order
            cached = {r.rid: len(self.kv.match_prefix(self._prefix_probe(r)).pages) for r in ready}
            return sorted(ready, key=lambda r: -cached[r.rid])
        return ready

    def _admit(self, req: Req, budget: int, expected: float) -> Optional[tuple[BatchPart, torch.Tensor]]:
        """Give `req` its row, cached prefix and the pages of this step's tokens (`expected`: the KV tokens the
        requests holding KV are expected to add); None (nothing held) if it does not fit now."""
        if len(self.running) + (self.chunked is not None) >= self.config.max_running_requests:
            return None
        if not self.kv.admit(req.rid, self.kv.match_prefix(self._prefix_probe(req))):
            return None
        idle = not self.running and self.chunked is None and not self.parked  # (parked KV comes back once moved)
        window_tokens = min(req.seq_len - self.kv.kv_len(req.rid), self._prefill_budget)
        if not idle and not self._fits(req, window_tokens, expected):
            self.kv.release(req.rid)
            return None
        extended = self._extend(req, budget)
        if extended is None:
            self.kv.release(req.rid)
            if idle:
                self.fail(req, f"the KV pool ({self.kv.capacity_tokens} tokens) cannot hold this request's "
                               f"{req.seq_len} tokens")
            return None
        self.waiting.remove(req)
        req.status = ReqStatus.RUNNING
        if req.num_cached_tokens is None:
            req.num_cached_tokens = self.kv.kv_len(req.rid) - extended[0].extend_len
        return extended

    def _prefix_probe(self, req: Req) -> list[int]:
        """The tokens to look up in the prefix cache: all but the last, which must be computed for its logits;
        none while prompt log-probs are still owed, since those need every prompt position's logits."""
        if req.prompt_logprob_positions:
            return []
        return req.token_ids(0, req.seq_len - 1)

    def _fits(self, req: Req, window_tokens: int, expected: float) -> bool:
        """Room for `req`'s uncached tokens and its expected output, after the `expected` KV tokens of the
        requests holding KV; on a hybrid pool, for the `window_tokens` (from a page start) whose window KV it takes
        now."""
        if math.ceil((expected + self._expected_tokens(req)) / self.kv.page_size) > self.kv.available_pages():
            return False
        if self.kv.swa is None:
            return True
        # window KV: the new request's now, and about a page per holding request as windows move
        return math.ceil(window_tokens / self.kv.page_size) + len(self._holding_kv()) <= self.kv.available_swa_pages()

    def _expected_tokens(self, req: Req) -> float:
        """KV tokens `req` is still expected to add: the rest of its prefill, and a share of its output."""
        remaining_output = req.params.max_new_tokens - req.num_generated
        return req.seq_len - self.kv.kv_len(req.rid) + self.new_token_ratio * remaining_output

    def _in_batches(self) -> list[Req]:
        """The requests batches take: running and mid-prefill ones."""
        return self.running + ([self.chunked] if self.chunked is not None else [])

    def _holding_kv(self) -> list[Req]:
        return self._in_batches() + list(self.parked.values())

    def _extend(self, req: Req, budget: int) -> Optional[tuple[BatchPart, torch.Tensor]]:
        """The next prefill step of an admitted request: all of the rest, or a page-aligned chunk of it."""
        start = self.kv.kv_len(req.rid)
        end = req.seq_len
        if self._chunking and end - start > budget:
            end = (start + budget) // self.kv.page_size * self.kv.page_size  # chunks end on page boundaries
            if end <= start:
                return None
        self.kv.free_out_of_window([req.rid], [start])
        slots = self.kv.grow([req.rid], [end])
        if slots is None:
            return None
        return BatchPart(req, self.kv.row(req.rid), end - start, end, end == req.seq_len), slots

    # ---- retraction and failure -----------------------------------------------------------------

    @staticmethod
    def _retraction_victim(candidates: list[Req]) -> Req:
        """Fewest generated tokens first (least work lost); of those, the longest prompt (most pages back)."""
        return min(candidates, key=lambda r: (r.num_generated, -len(r.prompt_ids)))

    def _retract(self, req: Req) -> None:
        self.requeue(req)
        left = self.running
        max_new = sum(r.params.max_new_tokens for r in left)
        if max_new:
            decoded = sum(r.num_generated for r in left) + RETRACT_LOOKAHEAD_STEPS * len(left)
            self.new_token_ratio = min(1.0, max(self.new_token_ratio, decoded / max_new))

    def requeue(self, req: Req) -> None:
        """Release a running (or mid-prefill) request's KV and put it first in the queue; it is re-prefilled from
        prompt + output so far when admitted again."""
        if req is self.chunked:
            self.chunked = None
        else:
            self.running.remove(req)
        self.kv.release(req.rid)
        req.status = ReqStatus.WAITING
        self.waiting.appendleft(req)

    def fail(self, req: Req, error: str) -> None:
        self._finish(req, "abort", error=error)
        self.failed.append(req)

    # ---- results, abort, finish ---------------------------------------------------------------------

    def launched(self, batch: ScheduledBatch) -> None:
        """`batch`'s forward is on its way: each sampled request now has one more (pending) token, so the
        next step can be scheduled before the host reads it (overlap scheduling)."""
        for part in batch.sampled:
            part.req.pending += 1 + part.num_draft
            part.req.held_in_flight.append(part.held)

    def process(self, batch: ScheduledBatch, token_ids: list[list[int]]) -> list[TokenAppended]:
        """Apply a launched step's results: chunks go into the prefix cache, sampled tokens replace the pending
        ones, slots of rejected draft tokens are freed, finished requests release their KV. `token_ids` has one
        list per sampled part: its one token, or (speculative) its accepted drafts and the target's next token."""
        for part in batch.parts:
            if not part.samples and part.req.status == ReqStatus.RUNNING:  # (else aborted or requeued while its
                # forward ran: KV released)
                self.kv.cache_prefix(part.req.rid, part.req.token_ids(0, part.seq_len))
        kept = []  # (index, part, tokens kept, finish reason)
        for index, (part, tokens) in enumerate(zip(batch.sampled, token_ids)):
            req = part.req
            if req.status != ReqStatus.FINISHED:
                req.held_in_flight.pop(0)
                kept.append((index, part, *req.append_tokens(tokens, 1 + part.num_draft)))
        verified = [p.req for _, p, _, _ in kept if p.num_draft and p.req.status == ReqStatus.RUNNING]
        if verified:  # keep the KV of every kept token but the newest, and what a step in flight writes; the
            # rejected drafts' pages go back
            self.kv.truncate([r.rid for r in verified], [_kv_in_use(r) for r in verified])
        appended = []
        for index, part, count, reason in kept:
            req, tokens = part.req, token_ids[index]
            if part.num_draft:
                self._update_draft_rate(req, len(tokens) - 1)
            if reason is not None:
                if reason != "abort" and req.kv_destination is not None:
                    req.finish_reason = reason  # prefilled for a decode server: it finishes once its KV is there
                    self._park(req)
                    reason = None
                else:
                    self._finish(req, reason, req.error)
            appended.append(TokenAppended(index, req, tokens if count == len(tokens) else tokens[:count], reason,
                                          part.num_draft, len(tokens) - 1))
        return appended

    def _update_draft_rate(self, req: Req, accepted: int) -> None:
        """Backoff: how often `req` drafts, from a running mean of its accepted drafts."""
        if self.config.disable_speculative_backoff:
            return
        req.draft_accept_mean = 0.5 * req.draft_accept_mean + 0.5 * accepted
        failing = req.draft_accept_mean < MIN_ACCEPTED_DRAFTS
        req.draft_every = min(MAX_DRAFT_INTERVAL, 2 * req.draft_every) if failing else 1

    def abort_many(self, rids: set[int], reason: FinishReason = "abort") -> list[Req]:
        """Finish these requests wherever they are, in one pass over the queues; returns those found unfinished.
        Parked ones are not touched: their KV may be in flight (the disaggregation side ends them)."""
        found = [req for req in (*self.waiting, *self._in_batches()) if req.rid in rids]
        for req in found:
            self._finish(req, reason, remove_from_queue=False)
        if found:
            self.waiting = deque(r for r in self.waiting if r.status != ReqStatus.FINISHED)
        return found

    # ---- disaggregation: requests parked while their KV moves ------------------------------------------

    def preallocate(self, req: Req) -> bool:
        """Decode server: hold the KV of `req`'s whole prompt (its cached prefix, and new pages for the rest, which
        the prefill server writes) and park it until they have arrived; False, holding nothing, if it does not
        fit now."""
        if len(self._holding_kv()) >= self.config.max_running_requests:
            return False
        if not self.kv.admit(req.rid, self.kv.match_prefix(self._prefix_probe(req))):
            return False
        holding = self._holding_kv()
        expected = sum(self._expected_tokens(r) for r in holding)
        fits = not holding or self._fits(req, self._prompt_window_tokens(req), expected)
        if not fits or not self._hold_prompt(req):
            self.kv.release(req.rid)
            return False
        req.num_cached_tokens = self.kv.cached_pages(req.rid) * self.kv.page_size
        self._park(req)
        return True

    def _prompt_window_tokens(self, req: Req) -> int:
        """Hybrid pools: the prompt tokens, from a page start, whose window KV a preallocated `req` holds: those the
        first decode step (at the prompt's end) reads, past its cached prefix (which has its own)."""
        if self.kv.swa is None:
            return 0
        start = max(self.kv.cached_pages(req.rid), self.kv.window_floor(req.seq_len))
        return req.seq_len - start * self.kv.page_size

    def _hold_prompt(self, req: Req) -> bool:
        """Pages for the rest of `req`'s prompt; on a hybrid pool, SWA pages only for those the first decode step
        reads (the prefill server sends their window KV and no other: the earlier pages' is never read here)."""
        self.kv.free_out_of_window([req.rid], [req.seq_len])
        return self.kv.grow([req.rid], [req.seq_len]) is not None

    def _park(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)
        req.status = ReqStatus.TRANSFERRING
        self.parked[req.rid] = req

    def unpark(self, rid: int, first_token: Optional[int]) -> tuple[Req, Optional[FinishReason]]:
        """A parked request's KV has moved: with `first_token` (decode server: the prefill server's sampled
        token), it joins the running requests, unless that token ends it; without, it finishes normally (prefill
        server: its KV has been sent; its pages go into the prefix cache)."""
        req = self.parked.pop(rid)
        if first_token is None:
            self._finish(req, req.finish_reason or "length")
            return req, req.finish_reason
        req.pending += 1
        _, reason = req.append_tokens([first_token])
        if reason is not None:
            self._finish(req, reason, req.error)
        else:
            req.status = ReqStatus.RUNNING
            self.running.append(req)
        return req, reason

    def drop_parked(self, rid: int, error: Optional[str]) -> Req:
        """End a parked request, its KV freed (not cached): its transfer failed, or it was aborted and nothing
        writes into or reads from its pages any more."""
        req = self.parked.pop(rid)
        self._finish(req, "abort", error)
        return req

    def _finish(self, req: Req, reason: FinishReason, error: Optional[str] = None,
                remove_from_queue: bool = True) -> None:
        if req.rid in self.kv.held:
            # Only a request that finished normally has all of its KV written; only that goes to the cache.
            normal = reason in ("stop", "length") and error is None
            cached = min(self.kv.kv_len(req.rid), req.known_len)  # a step in flight may hold KV past them
            self.kv.release(req.rid, req.token_ids(0, cached) if normal else None)
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked:
            self.chunked = None
        if remove_from_queue and req in self.waiting:  # abort_many filters the queue once instead
            self.waiting.remove(req)
        req.status, req.finish_reason, req.error = ReqStatus.FINISHED, reason, error


def _kv_in_use(req: Req) -> int:
    """The KV a verified request keeps: every known token's but the last, and, with a step in flight, the slots
    that step writes from the last token on."""
    if req.held_in_flight:
        return req.known_len + req.held_in_flight[0]
    return req.seq_len - 1
