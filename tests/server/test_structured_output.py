"""Structured output through `keel serve` and the official openai client: response_format json_schema and
json_object, SGLang's regex and ebnf fields, on completions, chat and /generate, streamed or not; tool calls
(the Hermes format) and reasoning content (Qwen 3's)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import start_server, stop_server
from tests.test_grammar import REGEX, SCHEMA

RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, keel_cache_dir):
    # compact JSON: keel-demo, a toy model, would otherwise spend its tokens on free whitespace
    running = start_server(tmp_path_factory.mktemp("server") / "serve.log", "--constrained-json-disable-any-whitespace",
                           "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_json_schema_output_always_validates(client):
    """100 seeded requests sampled at temperature 1, in flight together: every answer parses and validates."""
    def ask(seed: int) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model="keel-demo", messages=MESSAGES, temperature=1.0, seed=seed,
                                              max_tokens=300, response_format=RESPONSE_FORMAT)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(100)))
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_with_n_choices(client):
    stream = client.chat.completions.create(model="keel-demo", messages=MESSAGES, temperature=1.0, seed=3, n=3,
                                            max_tokens=300, stream=True, response_format=RESPONSE_FORMAT)
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_gives_an_object(client):
    def answers(**extra):
        return client.chat.completions.create(model="keel-demo", messages=MESSAGES, temperature=1.0, seed=3, n=8,
                                              max_tokens=40, **extra).choices

    assert not any(c.message.content.startswith("{") for c in answers())  # a toy model writes no JSON of its own
    choices = answers(response_format={"type": "json_object"})
    # whether a toy model closes its object within 40 tokens depends on its training; whatever it closed is one
    assert all(c.message.content.startswith("{") for c in choices)
    finished = [c for c in choices if c.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(c.message.content), dict) for c in finished)


def test_regex_and_ebnf_on_completions(client):
    result = client.completions.create(model="keel-demo", prompt="Code:", temperature=1.0, seed=1, n=4,
                                       max_tokens=20, extra_body={"regex": REGEX})
    assert all(re.fullmatch(REGEX, c.text) and c.finish_reason == "stop" for c in result.choices), result
    result = client.completions.create(model="keel-demo", prompt="Answer:", temperature=1.0, seed=2, max_tokens=20,
                                       extra_body={"ebnf": 'root ::= "yes" | "no"'})
    assert result.choices[0].text in ("yes", "no")


def test_native_generate_takes_a_grammar(server):
    body = {"text": "Code:", "sampling_params": {"max_new_tokens": 20, "temperature": 1.0, "regex": REGEX}}
    result = httpx.post(f"{server.url}/generate", json=body).json()
    assert re.fullmatch(REGEX, result["text"]), result


@pytest.mark.parametrize("extra,param,why", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}),
     "response_format", 'Unsupported type "objekt"'),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format",
     "needs json_schema.schema"),
    (dict(response_format={"type": "yaml"}), "response_format.type", "'text', 'json_object' or 'json_schema'"),
    (dict(extra_body={"regex": "a(b"}), "regex", "parenthesis is not closed"),
    (dict(extra_body={"regex": "a", "ebnf": 'root ::= "a"'}), "ebnf", "only one of"),
])
def test_an_invalid_grammar_is_a_400_naming_it(client, extra, param, why):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="keel-demo", messages=MESSAGES, max_tokens=5, **extra)
    error = caught.value.body
    assert error["param"] == param and why in error["message"], error


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
SMALL = {"type": "integer", "minimum": -999, "maximum": 999}  # a toy model left free writes endless digits
ADD = {"type": "object", "properties": {"a": SMALL, "b": SMALL}, "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"weather": WEATHER, "add": ADD}


def assert_calls(calls, only=None) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (only or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_always_parses_to_a_declared_call(client):
    """One call each (parallel_tool_calls false): keel-demo, a toy model, would go on calling until max_tokens,
    where a trained model ends its turn (several calls in one answer: tests/server/test_tool_calls.py)."""
    def ask(seed: int):
        return client.chat.completions.create(model="keel-demo", messages=MESSAGES, temperature=1.0, seed=seed,
                                              max_tokens=200, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False).choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(24)))
    for choice in choices:
        assert choice.finish_reason == "tool_calls", choice
        assert_calls(choice.message.tool_calls)


def test_named_tool_choice_and_single_calls(client):
    choice = client.chat.completions.create(
        model="keel-demo", messages=MESSAGES, temperature=1.0, seed=5, max_tokens=200, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert_calls(choice.message.tool_calls, only=["add"])


def test_streamed_tool_calls_have_the_openai_shape(client):
    stream = client.chat.completions.create(model="keel-demo", messages=MESSAGES, temperature=1.0, seed=9,
                                            max_tokens=200, tools=TOOLS, tool_choice="required", stream=True,
                                            parallel_tool_calls=False)
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls and list(calls) == list(range(len(calls)))
    for entry in calls.values():
        assert entry["id"].startswith("call_")
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


def test_tool_requests_the_server_refuses(client):
    for extra, param in [(dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
                          "tool_choice"),
                         (dict(tool_choice="required"), "tools")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="keel-demo", messages=MESSAGES, max_tokens=5, **extra)
        assert caught.value.body["param"] == param


def test_a_tool_exchange_renders_through_the_template(client):
    """An assistant's earlier call and the tool's answer are accepted as messages (the template renders them)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    answer = client.chat.completions.create(model="keel-demo", messages=messages, max_tokens=5, tools=TOOLS)
    assert answer.choices[0].finish_reason in ("length", "stop")


REASONED = 'root ::= "<think>" [a-z ]{1,12} "</think>" "\\n"? [a-z]{1,8}'


def test_reasoning_content_whole_and_streamed(client):
    """The grammar makes keel-demo think first; --reasoning-parser qwen3 moves the thought out of the content."""
    extra = dict(model="keel-demo", messages=MESSAGES, temperature=1.0, seed=4, max_tokens=40,
                 extra_body={"ebnf": REASONED})
    message = client.chat.completions.create(**extra).choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert re.fullmatch(r"[a-z ]{1,12}", reasoning) and re.fullmatch(r"[a-z]{1,8}", message.content), message
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(**extra, stream=True):
        for choice in chunk.choices:
            streamed["content"] += choice.delta.content or ""
            streamed["reasoning_content"] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
    assert streamed == {"reasoning_content": reasoning, "content": message.content}
