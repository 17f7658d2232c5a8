"""Tool calls in a chat answer: the formats models write them in (`--tool-call-parser`), the grammar that enforces
`tool_choice: "required"` or a named function (an xgrammar structural tag), and the parsers that turn an answer,
whole or streamed, into OpenAI's `tool_calls`.

- `llama3` (vLLM's `llama3_json`): the answer is a JSON object `{"name": ..., "parameters": {...}}`
  (`"arguments"` also read), optionally after `<|python_tag|>`; several are separated by `;`.
- `hermes` (also `qwen25`, `qwen3`: Hermes, Qwen 2.5 and Qwen 3): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, after any text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from keel.grammar import MAX_JSON_WHITESPACE

# --tool-call-parser name -> xgrammar's name of the model format (for the structural tag)
PARSERS = {"llama3": "llama", "llama3_json": "llama", "hermes": "qwen_3", "qwen25": "qwen_3", "qwen3": "qwen_3"}
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
SEPARATORS = {"llama3": "; ", "llama3_json": "; ", "hermes": "\n", "qwen25": "\n", "qwen3": "\n"}  # parallel calls
LLAMA_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(re.escape(HERMES_START) + r"\s*(.*?)\s*" + re.escape(HERMES_END), re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: Optional[int] = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def tool_grammar(parser: str, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool,
                 compact: bool = False) -> str:
    """The structural tag (JSON text) that makes a model of format `parser` call a tool: one of `tools` for
    "required", the named one for {"type": "function", ...}; each call's arguments valid for its schema, with at
    most MAX_JSON_WHITESPACE whitespace characters in a row (`compact`: one)."""
    import xgrammar as xgr

    tag = json.loads(xgr.get_model_structural_tag(
        PARSERS[parser], tools=tools, tool_choice=tool_choice, reasoning=False,
        parallel_tool_calls=parallel_tool_calls, max_whitespace_cnt=1 if compact else MAX_JSON_WHITESPACE
    ).model_dump_json())
    found = tag["format"]
    if found["type"] == "triggered_tags":  # "required": xgrammar allows text around the calls; the answer is calls
        tag["format"] = {"type": "tags_with_separator", "tags": found["tags"], "separator": SEPARATORS[parser],
                         "at_least_one": True, "stop_after_first": found["stop_after_first"]}
    return json.dumps(tag)


def parse_tool_calls(parser: str, text: str) -> tuple[str, list[ToolCall]]:
    """Split a whole answer into its text and its tool calls. Text that does not parse as a call stays text."""
    if PARSERS[parser] == "llama":
        calls = _llama_calls(text)
        return ("", calls) if calls else (text, [])
    calls, kept = [], []
    position = 0
    for match in _HERMES_CALL.finditer(text):
        call = _call(match.group(1), "arguments")
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    # whitespace between and after calls (the newlines models put there) is not content
    return kept[0] + "".join(part for part in kept[1:] if part.strip()), calls


def _llama_calls(text: str) -> list[ToolCall]:
    body = text.strip()
    if body.startswith(LLAMA_TAG):
        body = body[len(LLAMA_TAG):].strip()
    if not body.startswith("{"):
        return []
    calls = []
    for part in body.split(";"):  # Llama 3 separates parallel calls with semicolons
        call = _call(part.strip(), "parameters", "arguments")
        if call is None:
            return []  # not all of it is calls: it is text
        calls.append(call)
    return calls


def _call(text: str, *argument_keys: str) -> Optional[ToolCall]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in argument_keys if key in value), {})
    return ToolCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class StreamedToolCalls:
    """Tool calls out of a streamed answer: feed() takes each text delta and returns the text that is surely
    not part of a call and the calls completed so far; finish() returns what is left. Hermes calls are held
    from `<tool_call>` to `</tool_call>`; a Llama 3 answer that starts like a call is held to the end."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self._held = ""
        self._llama_held = False
        self._started = False  # any non-blank text seen
        self._gap: Optional[str] = None  # after a call: blank text so far, dropped unless other text follows

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._held += delta
        if PARSERS[self.parser] == "llama":
            return self._feed_llama()
        return self._feed_hermes()

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self._held = self._held, ""
        text, calls = parse_tool_calls(self.parser, held) if held else ("", [])
        if PARSERS[self.parser] == "llama" or not text:
            return text, calls
        return self._text(text), calls

    def _text(self, text: str) -> str:
        """Hermes text as it may go out: after a call, blank text is held until other text follows."""
        if self._gap is None:
            return text
        self._gap += text
        if not self._gap.strip():
            return ""
        text, self._gap = self._gap, None
        return text

    def _feed_llama(self) -> tuple[str, list[ToolCall]]:
        if not self._started:
            start = self._held.lstrip()
            if not start or (len(start) < len(LLAMA_TAG) and LLAMA_TAG.startswith(start)):
                return "", []  # blank, or maybe the start of <|python_tag|>: wait
            self._started = True
            self._llama_held = start.startswith("{") or start.startswith(LLAMA_TAG)
        if self._llama_held:
            return "", []
        text, self._held = self._held, ""
        return text, []

    def _feed_hermes(self) -> tuple[str, list[ToolCall]]:
        text, calls = [], []
        while True:
            start = self._held.find(HERMES_START)
            if start < 0:
                keep = partial_suffix(self._held, HERMES_START)
                text.append(self._text(self._held[:len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep:]
                break
            end = self._held.find(HERMES_END, start)
            if end < 0:
                text.append(self._text(self._held[:start]))
                self._held = self._held[start:]
                break
            before, whole = self._held[:start], self._held[start:end + len(HERMES_END)]
            self._held = self._held[end + len(HERMES_END):]
            _, found = parse_tool_calls(self.parser, whole)
            if found:
                if self._gap is None or before.strip():
                    text.append(self._text(before))
                calls += found
                self._gap = ""
            else:
                text.append(self._text(before + whole))
        return "".join(text), calls


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may be completed by the next delta)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
