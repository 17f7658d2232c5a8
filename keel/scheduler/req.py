"""Req: one request's state inside the engine."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from keel.engine.outputs import FinishReason, TokenLogprob
from keel.sampling_params import SamplingParams


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"  # disaggregation: parked with its KV while the KV moves (Scheduler.parked)
    FINISHED = "finished"


@dataclass(eq=False)  # identity, not field-by-field, comparison
class Req:
    rid: int  # also the owner id of the request's KV pages and table row
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # params.seed, or one drawn from the engine's seed
    stop_token_ids: frozenset[int]  # params.stop_token_ids, plus the model's EOS unless ignore_eos
    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None  # why the engine gave up on it, when it did
    num_cached_tokens: Optional[int] = None  # prompt tokens served by the prefix cache at first admission
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.. (when asked)
    # Tokens sampled by a forward whose results the host has not read yet (overlap scheduling): they count
    # in seq_len, so the next step can be built around them, but their ids exist only on the device. A verify
    # step counts all it may emit (its drafts + 1); how many it did is on the device too, so while one is in
    # flight seq_len and num_generated are upper bounds, and a step built on them shifts its positions back on
    # the device (PendingTokens.shifts).
    pending: int = 0
    # Per launched, unread decode step (oldest first): the KV slots it holds past its root (its drafts', or a
    # tree drafter's reserve), so that reading one step keeps what the next still writes
    held_in_flight: list[int] = field(default_factory=list)
    # Speculative decoding: a running mean of the drafts accepted per verify step, and how often the request
    # drafts (on every draft_every-th decode step; more rarely while its drafts keep failing)
    draft_accept_mean: float = 1.0
    draft_every: int = 1
    # Structured output: the xgrammar matcher of the request's grammar (SamplingParams.grammar), advanced by
    # every token read back; the next step's bitmask comes from it
    grammar: Optional[Any] = None
    # Disaggregation, prefill side: where its prompt's KV goes once prefilled (a KVDestination); None: served here
    kv_destination: Optional[Any] = None
    kv_send_by: float = math.inf  # time.monotonic() after which its KV must not be sent: the decode server's pages

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_generated(self) -> int:
        """Output tokens so far, the pending ones included."""
        return len(self.output_ids) + self.pending

    @property
    def known_len(self) -> int:
        """Tokens whose ids the host knows: the prompt and the output read back so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions whose logits are still needed for prompt log-probs (position p scores prompt token p+1)."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(len(self.prompt_logprobs), len(self.prompt_ids) - 1)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
        if end > self.known_len:
            raise ValueError(f"request {self.rid}: tokens up to {end} asked for, only {self.known_len} are known "
                             "on the host (the rest are still on the device)")
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    def append_tokens(self, token_ids: list[int], launched: int = 1) -> tuple[int, Optional[FinishReason]]:
        """Record the tokens of the oldest pending result, now read back (one, or a speculative step's accepted
        drafts and the target's own token), which was launched counting `launched` pending tokens. Tokens past a
        stop token or max_new_tokens are dropped. Returns how many were kept and why the request is now finished,
        if it is."""
        if self.pending < launched or not 1 <= len(token_ids) <= launched:
            raise ValueError(f"request {self.rid}: {len(token_ids)} tokens arrived for a step that owed it "
                             f"{launched} of its {self.pending} pending")
        self.pending -= launched
        for kept, token_id in enumerate(token_ids, 1):
            self.output_ids.append(token_id)
            if self.grammar is not None and not self.grammar.accept_token(token_id):  # the mask failed: end it alone
                self.error = f"request {self.rid}: token {token_id} was sampled outside its grammar"
                return kept, "abort"
            if token_id in self.stop_token_ids or (self.grammar is not None and self.grammar.is_terminated()):
                return kept, "stop"
            if len(self.output_ids) >= self.params.max_new_tokens:
                return kept, "length"
        return len(token_ids), None
