"""Tool-call and reasoning parsers (keel/server/tool_calls.py, reasoning.py, chat_answer.py): whole answers, and
the same answers streamed in pieces split at every point, give the same content, reasoning and calls."""

from __future__ import annotations

import json

import pytest

from keel.server.chat_answer import AnswerFormat, StreamedAnswer, answer_message
from keel.server.reasoning import split_reasoning
from keel.server.tool_calls import parse_tool_calls

HERMES = ('Let me check.<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
LLAMA = '{"name": "weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {"a": 1}}'


def calls(found) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in found]


def test_hermes_calls_and_the_text_around_them():
    content, found = parse_tool_calls("hermes", HERMES)
    assert content == "Let me check." and calls(found) == [("weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    broken = "<tool_call>\n{not json}\n</tool_call> plain"
    assert parse_tool_calls("hermes", broken) == (broken, [])


def test_llama3_json_calls():
    content, found = parse_tool_calls("llama3", "<|python_tag|>" + LLAMA)
    assert content == "" and calls(found) == [("weather", {"city": "Paris"}), ("add", {"a": 1})]
    assert parse_tool_calls("llama3", 'The answer is {"name": 1}') == ('The answer is {"name": 1}', [])
    assert parse_tool_calls("llama3", '{"name": "f", "parameters": {}}; trailing text')[1] == []


@pytest.mark.parametrize("parser,text", [
    ("qwen3", "<think>\nfirst, weigh it</think>\n\nIt is 3."),
    ("qwen3", "No reasoning here."),
    ("deepseek-r1", "weigh it</think>It is 3."),
    ("deepseek-r1", "<think>weigh it</think>It is 3."),
    ("deepseek-r1", "still thinking when the tokens ran out"),
])
def test_reasoning_split(parser, text):
    reasoning, content = split_reasoning(parser, text)
    if "</think>" in text or (parser == "deepseek-r1"):
        assert "weigh it" in reasoning or "still thinking" in reasoning
        assert "</think>" not in reasoning + content and "<think>" not in reasoning + content
    else:
        assert (reasoning, content) == ("", text)
    if "It is 3." in text:
        assert content == "It is 3."


@pytest.mark.parametrize("fmt,text", [
    (AnswerFormat(None, "hermes"), HERMES),
    (AnswerFormat(None, "llama3"), LLAMA),
    (AnswerFormat(None, "llama3"), "Plain text, no call."),
    (AnswerFormat("qwen3", "hermes"), "<think>need the weather</think>\n" + HERMES),
    (AnswerFormat("deepseek-r1", None), "think </thi nk> more</think>done"),
    (AnswerFormat(None, "hermes", parallel_tool_calls=False), HERMES),
])
def test_streamed_answers_equal_whole_answers(fmt, text):
    whole, whole_reason = answer_message(fmt, text, "stop")
    for split in range(len(text) + 1):
        for pieces in ([text[:split], text[split:]], [text[:split]] + list(text[split:])):
            stream = StreamedAnswer(fmt)
            deltas = [d for piece in pieces for d in stream.feed(piece)]
            tail, reason = stream.finish("stop")
            deltas += tail
            content = "".join(d.get("content", "") for d in deltas)
            assert reason == whole_reason
            assert content == (whole["content"] or ""), (split, deltas)
            assert "".join(d.get("reasoning_content", "") for d in deltas) == whole.get("reasoning_content", "")
            streamed = [c for d in deltas for c in d.get("tool_calls", [])]
            assert [c["index"] for c in streamed] == list(range(len(streamed)))
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in streamed] == \
                [(c["function"]["name"], c["function"]["arguments"]) for c in whole.get("tool_calls", [])]


def test_tool_call_message_shape():
    message, reason = answer_message(AnswerFormat(None, "hermes"), HERMES, "stop")
    assert reason == "tool_calls" and message["content"] == "Let me check."
    call = message["tool_calls"][0]
    assert set(call) == {"id", "type", "function"} and call["type"] == "function" and call["id"].startswith("call_")
    assert answer_message(AnswerFormat(None, "hermes"), HERMES, "length")[1] == "length"
