"""A chat answer in OpenAI's shape: its text split into reasoning (`reasoning_content`), content and tool calls,
as one message or as streamed deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from keel.server.reasoning import StreamedReasoning, split_reasoning
from keel.server.tool_calls import StreamedToolCalls, ToolCall, parse_tool_calls


@dataclass(frozen=True)
class AnswerFormat:
    reasoning_parser: Optional[str]  # --reasoning-parser
    tool_call_parser: Optional[str]  # --tool-call-parser, when the request offers tools (else None)
    parallel_tool_calls: bool = True


def answer_message(fmt: AnswerFormat, text: str, finish_reason: Optional[str]) -> tuple[dict[str, Any], Optional[str]]:
    """The assistant message of a whole answer, and its finish reason ("tool_calls" when it calls tools)."""
    message: dict[str, Any] = {"role": "assistant"}
    if fmt.reasoning_parser is not None:
        message["reasoning_content"], text = split_reasoning(fmt.reasoning_parser, text)
    calls: list[ToolCall] = []
    if fmt.tool_call_parser is not None:
        text, calls = parse_tool_calls(fmt.tool_call_parser, text)
        calls = calls if fmt.parallel_tool_calls else calls[:1]
    message["content"] = text or None if calls else text
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    return message, _finish_reason(finish_reason, bool(calls))


class StreamedAnswer:
    """One choice's streamed answer: feed() turns each text delta into OpenAI deltas, finish() the rest."""

    def __init__(self, fmt: AnswerFormat) -> None:
        self.fmt = fmt
        self._reasoning = StreamedReasoning(fmt.reasoning_parser) if fmt.reasoning_parser else None
        self._tools = StreamedToolCalls(fmt.tool_call_parser) if fmt.tool_call_parser else None
        self._calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._deltas(reasoning, content, final=False)

    def finish(self, finish_reason: Optional[str]) -> tuple[list[dict[str, Any]], Optional[str]]:
        reasoning, content = self._reasoning.finish() if self._reasoning else ("", "")
        deltas = self._deltas(reasoning, content, final=True)
        return deltas, _finish_reason(finish_reason, self._calls > 0)

    def _deltas(self, reasoning: str, content: str, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"reasoning_content": reasoning}] if reasoning else []
        calls: list[ToolCall] = []
        if self._tools is not None:
            content, calls = self._tools.feed(content)
            if final:
                more_content, more_calls = self._tools.finish()
                content, calls = content + more_content, calls + more_calls
        if content:
            deltas.append({"content": content})
        for call in calls:
            if self.fmt.parallel_tool_calls or self._calls == 0:
                deltas.append({"tool_calls": [call.to_openai(index=self._calls)]})
                self._calls += 1
        return deltas


def _finish_reason(reason: Optional[str], called: bool) -> Optional[str]:
    return "tool_calls" if called and reason == "stop" else reason
