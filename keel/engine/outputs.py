"""What the engine returns: per-step core outputs and per-request results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # of the chosen token, under the model's raw distribution
    top: tuple[tuple[int, float], ...] = ()  # the top-N (token id, log-prob) alternatives, best first


@dataclass(slots=True)  # not frozen: one per request and step, and a frozen __init__ costs ~4x (scheduler.py)
class CoreOutput:
    """One request's new tokens from one engine step (crosses the engine/front-end boundary)."""

    rid: int
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]]  # one per token, when the request asked for log-probs
    finish_reason: Optional[FinishReason]  # set on the request's last output
    num_cached_tokens: Optional[int] = None  # prompt tokens the prefix cache served (on the first output)
    error: Optional[str] = None  # why the engine gave up on the request (finish_reason "abort")
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # of prompt tokens 1.., on the first output, when asked
    num_draft_tokens: int = 0  # speculative decoding: draft tokens verified this step
    num_accepted_tokens: int = 0  # of those, accepted


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[FinishReason] = None  # "stop" or "length" once finished ("abort" if it failed)
    logprobs: Optional[list[TokenLogprob]] = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: Optional[str] = None  # set, with finish_reason "abort", when the engine could not serve it
    prompt_logprobs: Optional[list[TokenLogprob]] = None  # of prompt tokens 1.. (SamplingParams.prompt_logprobs)
    # speculative decoding (SGLang's meta_info names): target forwards that verified drafts for this request,
    # the draft tokens they verified, and how many of those were accepted
    spec_verify_ct: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_accept_length(self) -> Optional[float]:
        """Mean tokens per verify step (accepted drafts + the target's own), when speculation ran."""
        return mean_accept_length([self])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def mean_accept_length(outputs: list[RequestOutput]) -> Optional[float]:
    """Tokens per verify step over these requests (accepted drafts + the target's own); None without any."""
    steps = sum(o.spec_verify_ct for o in outputs)
    return 1.0 + sum(o.spec_accepted_tokens for o in outputs) / steps if steps else None
