"""The OpenAI API through the official `openai` client, against the offline Engine as reference."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

import keel

PROMPT = "The scheduler"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline() -> keel.Engine:
    return keel.Engine("keel-demo", device="cpu", dtype="float32", page_size=4, kv_cache_tokens=4096)


def greedy(offline: keel.Engine, prompt, max_tokens: int, **extra) -> keel.RequestOutput:
    return offline.generate(prompt, keel.SamplingParams(temperature=0.0, max_new_tokens=max_tokens, **extra))[0]


def chat_prompt_ids(offline: keel.Engine, messages: list[dict]) -> list[int]:
    text = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return offline.tokenizer(text, add_special_tokens=False).input_ids


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["keel-demo"]


def test_completion_matches_the_offline_engine(client, offline):
    result = client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=32, temperature=0)
    expected = greedy(offline, PROMPT, 32)
    choice = result.choices[0]
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason == "length"
    assert result.usage.completion_tokens == 32 and result.usage.prompt_tokens == len(offline.tokenizer(PROMPT).input_ids)


def test_streamed_completion_adds_up_and_reports_usage(client, offline):
    chunks = list(client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy(offline, PROMPT, 32).text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_token_id_prompts_and_several_prompts(client, offline):
    ids = [offline.tokenizer(text).input_ids for text in ("Hello", "The sky")]
    by_ids = client.completions.create(model="keel-demo", prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model="keel-demo", prompt=["Hello", "The sky"], max_tokens=8, temperature=0)
    for result in (by_ids, by_text):
        assert [c.index for c in result.choices] == [0, 1]
        assert [c.text for c in result.choices] == [greedy(offline, [i], 8).text for i in ids]


def test_chat_completion_matches_the_offline_engine(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a page?"}]
    result = client.chat.completions.create(model="keel-demo", messages=messages, max_tokens=24, temperature=0)
    expected = greedy(offline, [chat_prompt_ids(offline, messages)], 24)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected.text
    chunks = list(client.chat.completions.create(model="keel-demo", messages=messages, max_tokens=24,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_n_choices_and_seed_reproducibility(client):
    def run(seed):
        # an unfamiliar prompt and a high temperature: the demo model is unsure, so samples differ
        result = client.completions.create(model="keel-demo", prompt="zq#", max_tokens=16, temperature=1.5,
                                           n=2, seed=seed)
        return [c.text for c in sorted(result.choices, key=lambda c: c.index)]

    first = run(7)
    assert len(first) == 2 and first[0] != first[1]
    assert run(7) == first
    assert run(8) != first
    chat = client.chat.completions.create(model="keel-demo", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, n=2, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content


def test_completion_logprobs_match_the_offline_engine(client, offline):
    result = client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    expected = greedy(offline, PROMPT, 6, top_logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == result.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    result = client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1,
                                       echo=True)
    choice = result.choices[0]
    prompt_len = len(offline.tokenizer(PROMPT).input_ids)
    assert choice.text.startswith(PROMPT)
    assert len(choice.logprobs.tokens) == prompt_len + 2
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has no context
    scored = offline.generate(PROMPT, keel.SamplingParams(max_new_tokens=1, prompt_logprobs=1))[0]
    assert choice.logprobs.token_logprobs[1:prompt_len] == pytest.approx(
        [e.logprob for e in scored.prompt_logprobs], abs=1e-5)


def test_chat_logprobs(client):
    result = client.chat.completions.create(model="keel-demo", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == 5 and all(len(item.top_logprobs) == 2 for item in content)
    assert all(item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob for item in content)


def test_stop_string_never_leaks(client, offline):
    text = greedy(offline, PROMPT, 48).text
    stop = next(text[i:i + 3] for i in range(8, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
    cut = text[:text.index(stop)]
    result = client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=48, temperature=0, stop=stop)
    assert result.choices[0].text == cut and result.choices[0].finish_reason == "stop"
    chunks = [c.choices[0].text for c in client.completions.create(
        model="keel-demo", prompt=PROMPT, max_tokens=48, temperature=0, stop=[stop], stream=True) if c.choices]
    assert "".join(chunks) == cut  # the stop string spans several byte tokens: held back, never sent


def test_native_generate(server, offline):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
    result = httpx.post(f"{server.url}/generate", json=body).json()
    expected = greedy(offline, PROMPT, 10)
    assert result["text"] == expected.text and result["output_ids"] == expected.token_ids
    assert result["meta_info"]["finish_reason"] == "length"
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(e["text"] for e in events) == expected.text
    assert sum((e["output_ids"] for e in events), []) == expected.token_ids


# ---- OpenAI-compatibility gaps found with real clients (issue 16, item 4) ---------------------------------------


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client, offline):
    """lm-evaluation-harness's log-likelihood request: the prompt's log-probs and nothing generated."""
    result = client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=0, temperature=0, logprobs=1,
                                       echo=True)
    choice = result.choices[0]
    prompt_len = len(offline.tokenizer(PROMPT).input_ids)
    assert choice.text == PROMPT and len(choice.logprobs.tokens) == prompt_len
    scored = offline.generate(PROMPT, keel.SamplingParams(max_new_tokens=1, prompt_logprobs=1))[0]
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in scored.prompt_logprobs], abs=1e-5)
    assert result.usage.completion_tokens == 0 and choice.finish_reason == "length"


def test_top_logprobs_include_the_chosen_token(client):
    """Up to k + 1 alternatives: the sampled token is listed when it is not among the top k."""
    result = client.chat.completions.create(model="keel-demo", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=40, temperature=2.0, seed=1, logprobs=True, top_logprobs=1)
    outside = 0
    for item in result.choices[0].logprobs.content:
        tops = [(t.token, t.logprob) for t in item.top_logprobs]
        assert (item.token, item.logprob) in tops and len(tops) <= 2
        outside += len(tops) == 2
    assert outside, "at temperature 2 some sampled token should fall outside the top 1"
    completion = client.completions.create(model="keel-demo", prompt=PROMPT, max_tokens=40, temperature=2.0,
                                           seed=1, logprobs=1)
    logprobs = completion.choices[0].logprobs
    for token, top in zip(logprobs.tokens, logprobs.top_logprobs):
        assert token in top and len(top) <= 2


def test_continuous_usage_stats(client):
    chunks = list(client.chat.completions.create(
        model="keel-demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts)
    assert counts[-1] == 8 and chunks[-1].usage.prompt_tokens == chunks[0].usage.prompt_tokens > 0


def test_usage_reports_prefix_cache_hits(client):
    prompt = "A prompt long enough to fill several KV pages of four tokens, sent twice. " * 3
    first = client.completions.create(model="keel-demo", prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model="keel-demo", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 8


def test_tokenize_and_detokenize(server, offline):
    ids = offline.tokenizer(PROMPT).input_ids
    result = httpx.post(f"{server.url}/tokenize", json={"model": "keel-demo", "prompt": PROMPT}).json()
    assert result["tokens"] == ids and result["count"] == len(ids) and result["max_model_len"] > 0
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"] == offline.tokenizer.decode(ids)
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == chat_prompt_ids(offline, [{"role": "user", "content": "Hi"}])
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("route,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}},
     "logit_bias"),
])
def test_unsupported_requests_are_refused_not_ignored(server, route, body, param):
    response = httpx.post(f"{server.url}{route}", json={"model": "keel-demo", "max_tokens": 3, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_kv_pages_used_counts_held_pages_only(server, client):
    from tests.server.test_load import metric

    client.completions.create(model="keel-demo", prompt="cache this prompt " * 4, max_tokens=3, temperature=0)
    deadline = time.monotonic() + 5
    while True:  # the engine sends fresh stats at least every STATS_INTERVAL_S
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "keel_kv_pages_used") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert metric(text, "keel_kv_pages_used") == 0  # idle: nothing held, whatever the cache keeps
    assert metric(text, "keel_kv_pages_evictable") == metric(text, "keel_kv_pages_cached") > 0
