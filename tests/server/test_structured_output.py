"""Structured output through `keel serve` and the official openai client: response_format json_schema and
json_object, SGLang's regex and ebnf fields, on completions, chat and /generate, streamed or not."""

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
    running = start_server(tmp_path_factory.mktemp("server") / "serve.log", "--constrained-json-disable-any-whitespace")
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
    def answer(**extra):
        return client.chat.completions.create(model="keel-demo", messages=MESSAGES, temperature=0.0, max_tokens=40,
                                              **extra).choices[0]

    assert not answer().message.content.startswith("{")  # keel-demo, a toy model, writes no JSON of its own
    choice = answer(response_format={"type": "json_object"})
    assert isinstance(json.loads(choice.message.content), dict) and choice.finish_reason == "stop"


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
