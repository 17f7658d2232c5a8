"""Request bodies of the HTTP API (OpenAI's schema, plus keel's native /generate).

Types are checked here, strictly: no string or bool stands in for a number, no number is
infinite, every string is valid Unicode (the JSON parser rejects lone surrogates and bad UTF-8).
Values (ranges, combinations) are checked by SamplingParams and the request limits, so the engine
and the server can never disagree on what is valid. Unknown fields are ignored, as
OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import reprlib
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class UnsupportedContent(ValueError):
    """A chat content part keel cannot take (an image, audio, ...)."""


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class JsonSchemaFormat(_Body):
    name: str
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions (with keel's extensions)."""

    model: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # extension
    min_p: Optional[float] = None  # extension
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: Optional[float] = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    logit_bias: Optional[dict[str, float]] = None  # not implemented: refused unless empty
    regex: Optional[str] = None  # extension (SGLang): the output matches this regular expression
    ebnf: Optional[str] = None  # extension (SGLang): the output follows this EBNF grammar


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None  # only 1 (or unset): keel does not rank candidates


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # a tool's answer: the call it answers

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise UnsupportedContent(f"content parts of type {reprlib.repr(part.type)} are not supported: this "
                                         "server takes text only (parts of type 'text' with a 'text' string)")
        return "".join(part.text or "" for part in self.content)


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None  # extension (vLLM, SGLang): e.g. enable_thinking


class GenerateRequest(_Body):
    """keel's native route: text or token ids in, SamplingParams fields by name."""

    text: Optional[str] = None
    input_ids: Optional[list[int]] = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the template."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]
