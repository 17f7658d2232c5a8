"""Structured output (keel/grammar.py): grammars are checked on arrival, and every token of a request with one
stays inside it, in batches shared with unconstrained requests, through retraction, n > 1 and stop strings."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import keel
from keel.grammar import GrammarSpec, InvalidGrammar, check_grammar
from keel.sampling_params import InvalidParameter
from tests.helpers import random_prompts

# nested objects, enums, arrays, integers and booleans; strings by pattern (a random model left free in a string
# would write hundreds of bytes before it closes it)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "vip": {"type": "boolean"}},
                  "required": ["id", "vip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{3}-\d{2}"
# A random model given free whitespace between JSON tokens spends most of its tokens on it (at most 24 in a row
# each time): compact JSON keeps the outputs within the tiny model's 512-token context
COMPACT = dict(constrained_json_disable_any_whitespace=True)


def sampled(seed: int, **grammar) -> keel.SamplingParams:
    return keel.SamplingParams(max_new_tokens=400, temperature=1.0, seed=seed, **grammar)


def assert_valid_json(text: str, finish_reason: str) -> None:
    assert finish_reason == "stop", f"the grammar never completed: {text!r}"
    jsonschema.validate(json.loads(text), SCHEMA)  # json.loads is strict: no raw control characters in strings


@pytest.mark.parametrize("spec,why", [
    (GrammarSpec("json_schema", '{"type": "objekt"}'), 'Unsupported type "objekt"'),
    (GrammarSpec("json_schema", "{not json"), "Failed to parse JSON"),
    (GrammarSpec("regex", "a(b"), "parenthesis is not closed"),
    (GrammarSpec("ebnf", "root ::= undefined_rule"), 'Rule "undefined_rule" is not defined'),
])
def test_an_invalid_grammar_is_refused_with_the_parser_s_reason(spec, why):
    with pytest.raises(InvalidGrammar) as caught:
        check_grammar(spec)
    message = str(caught.value)
    assert message.startswith(f"invalid {spec.kind}: ") and why in message
    assert "/project/" not in message and ".cc:" not in message  # no C++ source locations


def test_sampling_params_take_one_grammar_and_check_it():
    assert keel.SamplingParams(regex="a+").grammar == GrammarSpec("regex", "a+")
    assert keel.SamplingParams().grammar is None
    for fields, param in [(dict(regex="a("), "regex"), (dict(json_schema="{}", ebnf='root ::= "a"'), "ebnf"),
                          (dict(json_schema={"type": "object"}), "json_schema")]:
        with pytest.raises(InvalidParameter) as caught:
            keel.SamplingParams(**fields)
        assert caught.value.param == param


def test_json_schema_output_always_parses_and_validates(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, **COMPACT)
    params = [sampled(seed, json_schema=json.dumps(SCHEMA)) for seed in range(24)]
    for out in engine.generate(random_prompts([5] * len(params), seed=3), params):
        assert_valid_json(out.text, out.finish_reason)


def test_grammar_and_free_requests_share_a_batch(tiny_model, make_engine):
    """A free request decodes exactly as alone while grammar rows in its batch are masked; regex rows match."""
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, **COMPACT)
    prompts = random_prompts([4, 9, 6, 12], seed=5)
    greedy = keel.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    alone = engine.generate(prompts[:2], greedy)
    constrained = [sampled(1, regex=REGEX), sampled(2, json_schema=json.dumps(SCHEMA))]
    mixed = engine.generate(prompts, [greedy, greedy, *constrained])
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    assert re.fullmatch(REGEX, mixed[2].text) and mixed[2].finish_reason == "stop"
    assert_valid_json(mixed[3].text, mixed[3].finish_reason)


def test_grammar_through_retraction_and_stop_strings(tiny_model, make_engine, monkeypatch):
    """Retracted requests keep their matchers (their output is kept, not regenerated); a stop string cuts the
    text of a constrained request like any other."""
    directory, _ = tiny_model("llama3")
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", "3")
    engine = make_engine(directory, page_size=4, **COMPACT)
    params = [sampled(seed, json_schema=json.dumps(SCHEMA)) for seed in range(4)]
    params.append(keel.SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, regex=REGEX, stop="-"))
    outputs = engine.generate(random_prompts([3, 8, 5, 7, 4], seed=8), params)
    for out in outputs[:4]:
        assert_valid_json(out.text, out.finish_reason)
    assert re.fullmatch(r"[a-c]{3}", outputs[4].text) and outputs[4].finish_reason == "stop"


def test_ebnf_grammar(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    ebnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    outs = engine.generate(random_prompts([5] * 6, seed=2), [sampled(seed, ebnf=ebnf) for seed in range(6)])
    assert all(re.fullmatch(r"yes|no|maybe [0-9]", o.text) and o.finish_reason == "stop" for o in outs), outs


def test_free_whitespace_in_json_is_bounded(tiny_model, make_engine):
    """Whitespace between JSON tokens is the model's choice, but never more than MAX_JSON_WHITESPACE in a row, so
    a model that keeps choosing it still reaches the end of its object."""
    from keel.grammar import MAX_JSON_WHITESPACE

    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                         "additionalProperties": False})
    outs = engine.generate(random_prompts([5] * 8, seed=4), [sampled(seed, json_schema=schema) for seed in range(8)])
    runs = [len(run) for o in outs for run in re.findall(r"\s+", o.text)]
    assert max(runs) <= MAX_JSON_WHITESPACE and max(runs) > 3, runs  # free, but bounded
    for out in outs:
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text)["ok"], bool), out.text


def test_grammars_are_refused_under_speculative_decoding():
    from keel.engine.limits import RequestLimits, validate_request

    limits = RequestLimits(vocab_size=300, context_length=512, kv_capacity_tokens=4096, speculative=True)
    validate_request([1, 2], keel.SamplingParams(), limits)
    with pytest.raises(InvalidParameter, match="not supported with speculative decoding") as caught:
        validate_request([1, 2], keel.SamplingParams(regex="a+"), limits)
    assert caught.value.param == "regex"


def test_a_token_outside_the_grammar_ends_that_request_alone(tiny_model, make_engine):
    """Should a mask ever fail, the matcher's refusal ends its request with an error; the batch goes on."""
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    core = engine.core
    free = core.add_request([1, 2, 3], keel.SamplingParams(max_new_tokens=6, ignore_eos=True))
    constrained = core.add_request([4, 5, 6], sampled(1, regex="[a-c]+"))
    req = next(r for r in core.scheduler.waiting if r.rid == constrained)

    class Refusing:  # a matcher whose mask allows what it then refuses
        def __init__(self, matcher):
            self.matcher = matcher

        def fill_next_token_bitmask(self, bitmask, row):
            self.matcher.fill_next_token_bitmask(bitmask, row)

        def accept_token(self, token_id):
            return False

    req.grammar = Refusing(req.grammar)
    final = {}
    while core.has_work:
        for out in core.step():
            if out.finish_reason is not None:
                final[out.rid] = out
    assert final[constrained].finish_reason == "abort" and "outside its grammar" in final[constrained].error
    assert final[free].finish_reason == "length" and final[free].error is None
