"""SamplingParams: how one request samples and when it stops. Validated on construction."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Optional, Union

from keel.grammar import GrammarSpec, InvalidGrammar, check_grammar


class InvalidParameter(ValueError):
    """A sampling parameter with an invalid value; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# A temperature below this is greedy decoding (argmax), as in SGLang and vLLM.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100  # far flatter than uniform already; bounds what reaches the sampler
MAX_INT32 = 2**31 - 1  # counts and token ids must fit the engine's int32/int64 tensors
# Bounds on what one request may ask the front end to match: untrusted requests come from the server.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")


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
    json_schema: Optional[str] = field(
        default=None, metadata={"help": "constrain the output to JSON valid for this schema (JSON text)"})
    regex: Optional[str] = field(default=None, metadata={"help": "constrain the output to match this regex"})
    ebnf: Optional[str] = field(default=None, metadata={"help": "constrain the output to this EBNF grammar"})
    structural_tag: Optional[str] = field(
        default=None, metadata={"help": "constrain the output to this xgrammar structural tag (JSON text)"})

    def __post_init__(self) -> None:
        # Types first: the server passes arbitrary JSON values, which must not reach list() or comparisons.
        _check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop",
               "must be a string or a list of strings", self.stop)
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               "must be a list of integers", self.stop_token_ids)
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if _is_int(self.top_k) and self.top_k in (0, -1):
            self.top_k = None  # 0 / -1 mean "disabled" in vLLM and SGLang
        self._validate_numbers()
        self._validate_stops()
        self._validate_flags()
        self._validate_grammar()

    def _validate_numbers(self) -> None:
        _check(_is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_INT32, "max_new_tokens",
               f"must be an integer in [1, {MAX_INT32}]", self.max_new_tokens)
        _check(_is_finite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
               f"must be a number in [0, {MAX_TEMPERATURE}]", self.temperature)
        _check(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number in (0, 1]", self.top_p)
        _check(self.top_k is None or (_is_int(self.top_k) and 1 <= self.top_k <= MAX_INT32), "top_k",
               f"must be an integer in [1, {MAX_INT32}] (or 0 / -1 / None to disable)", self.top_k)
        _check(_is_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be a number in [0, 1]", self.min_p)
        _check(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               "must be a finite number > 0", self.repetition_penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_is_finite(value) and -2 <= value <= 2, name, "must be a number in [-2, 2]", value)
        # Any signed or unsigned 64-bit value (the batch takes it modulo 2**63).
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64), "seed",
               "must be an integer in [-2**63, 2**64)", self.seed)

    def _validate_stops(self) -> None:
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"must be at most {MAX_STOP_STRINGS} strings",
               self.stop)
        _check(all(_is_stop_string(s) for s in self.stop), "stop",
               f"must be non-empty strings of valid Unicode, at most {MAX_STOP_STRING_CHARS} characters each",
               self.stop)
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"must be at most {MAX_STOP_TOKEN_IDS} token ids", self.stop_token_ids)
        _check(all(_is_int(t) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids), "stop_token_ids",
               f"must be integers in [0, {MAX_INT32}]", self.stop_token_ids)

    def _validate_flags(self) -> None:
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a bool", self.ignore_eos)
        _check(isinstance(self.logprobs, bool), "logprobs", "must be a bool", self.logprobs)
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
               f"must be an integer in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
               "prompt_logprobs", f"must be None or an integer in [0, {MAX_TOP_LOGPROBS}]", self.prompt_logprobs)

    def _validate_grammar(self) -> None:
        given = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        for name in given:
            _check(isinstance(getattr(self, name), str), name, "must be a string", getattr(self, name))
        _check(len(given) <= 1, given[-1] if given else "json_schema",
               "only one of json_schema, regex, ebnf and structural_tag may be given", given)
        if given:
            try:
                check_grammar(self.grammar)
            except InvalidGrammar as e:
                raise InvalidParameter(given[0], str(e)) from e

    @property
    def grammar(self) -> Optional[GrammarSpec]:
        """The grammar the output must follow (json_schema, regex or ebnf), if any."""
        for name in GRAMMAR_FIELDS:
            if getattr(self, name) is not None:
                return GrammarSpec(name, getattr(self, name))
        return None

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


def _is_finite(value: object) -> bool:
    """An int or float that is a finite float: no inf / nan, and no int too large to convert."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_stop_string(value: object) -> bool:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STOP_STRING_CHARS:
        return False
    try:
        value.encode("utf-8")  # lone surrogates ("\ud800") are not text and cannot be encoded
    except UnicodeEncodeError:
        return False
    return True


def _check(ok: bool, name: str, why: str, value: object) -> None:
    if not ok:  # reprlib: an oversized value is not echoed back in full
        raise InvalidParameter(name, f"invalid sampling parameter {name}={reprlib.repr(value)}: {why}")
