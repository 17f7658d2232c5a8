"""SamplingParams: how one request samples and when it stops. Validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

class InvalidParameter(ValueError):
    """A sampling parameter with an invalid value; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# A temperature below this is greedy decoding (argmax), as in SGLang and vLLM.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass, in (0, 1]"})
    top_k: Optional[int] = field(default=None, metadata={"help": "sample from the k most likely tokens"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p * p(most likely)"})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "divide positive logits of seen tokens (prompt and output) by this"})
    frequency_penalty: float = field(
        default=0.0, metadata={"help": "subtract this times the token's count in the output"})
    presence_penalty: float = field(
        default=0.0, metadata={"help": "subtract this from tokens present in the output"})
    seed: Optional[int] = field(
        default=None, metadata={"help": "per-request seed: same tokens whatever else is batched"})
    stop: Union[str, list[str], None] = field(
        default=None, metadata={"help": "stop strings (never part of the returned text)"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "token ids that end generation"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past end-of-sequence tokens"})
    logprobs: bool = field(default=False, metadata={"help": "return the log-prob of each chosen token"})
    top_logprobs: int = field(
        default=0, metadata={"help": f"also return the top-N alternatives (0-{MAX_TOP_LOGPROBS})"})
    prompt_logprobs: Optional[int] = field(
        default=None, metadata={"help": "return the log-prob of every prompt token after the first, with the "
                                        "top-N alternatives (0-20); such prompts skip the prefix cache"})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is not None and self.top_k in (0, -1):
            self.top_k = None  # 0 / -1 mean "disabled" in vLLM and SGLang
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
               "must be an integer >= 1", self.max_new_tokens)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0",
               self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k",
               "must be an integer >= 1 (or 0 / -1 / None to disable)", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               "must be > 0", self.repetition_penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        _check(self.seed is None or _is_int(self.seed), "seed", "must be an integer", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings",
               self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be integers >= 0", self.stop_token_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a bool", self.ignore_eos)
        _check(isinstance(self.logprobs, bool), "logprobs", "must be a bool", self.logprobs)
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
               f"must be an integer in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
               "prompt_logprobs", f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]", self.prompt_logprobs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, why: str, value: object) -> None:
    if not ok:
        raise InvalidParameter(name, f"invalid sampling parameter {name}={value!r}: {why}")
