"""What a request may ask of the engine, checked the same way by the engine and the API server."""

from __future__ import annotations

from dataclasses import dataclass

from keel.sampling_params import InvalidParameter, SamplingParams


class ContextLengthError(ValueError):
    """The request does not fit the model's context or the KV pool."""


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    context_length: int
    kv_capacity_tokens: int
    speculative: bool = False  # speculative decoding is on: grammars cannot constrain its drafts yet


def validate_request(prompt_ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Raise ValueError (ContextLengthError for size limits), naming the numbers, for a request the engine
    could never serve. Nothing is allocated before this passes."""
    vocab = limits.vocab_size
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        bad = next(t for t in prompt_ids if not 0 <= t < vocab)
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    if params.top_k is not None and params.top_k > vocab:
        raise InvalidParameter("top_k", f"top_k={params.top_k} exceeds the vocabulary size {vocab}")
    for name in ("top_logprobs", "prompt_logprobs"):
        if (getattr(params, name) or 0) > vocab:
            raise InvalidParameter(name, f"{name}={getattr(params, name)} exceeds the vocabulary size {vocab}")
    if any(t >= vocab for t in params.stop_token_ids):
        raise InvalidParameter("stop_token_ids", f"stop_token_ids reach outside the vocabulary [0, {vocab})")
    if limits.speculative and params.grammar is not None:
        raise InvalidParameter(params.grammar.kind, f"{params.grammar.kind} (structured output) is not supported "
                               "with speculative decoding: serve without --speculative-algorithm")
    total = len(prompt_ids) + params.max_new_tokens
    if total > limits.context_length:
        raise ContextLengthError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} "
                                 f"= {total} tokens exceeds the context length {limits.context_length}")
    if total - 1 > limits.kv_capacity_tokens:
        raise ContextLengthError(f"request needs {total - 1} KV tokens, more than the whole KV pool "
                                 f"({limits.kv_capacity_tokens} tokens)")
