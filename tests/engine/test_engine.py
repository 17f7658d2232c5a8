"""The offline Engine: batching invariance, streaming, stops, validation and continuous batching."""

from __future__ import annotations

import pytest
import torch

import keel
from keel.models.byte_tokenizer import PAD_ID
from tests.helpers import random_prompts

LENGTHS = [1, 4, 9, 16, 17, 30, 5, 12]


def mixed_params(n: int, max_new_tokens: int = 10) -> list[keel.SamplingParams]:
    """Greedy and seeded sampling with every filter, so batch invariance covers each sampler path."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, seed=1),
        dict(temperature=1.0, top_k=5, seed=2),
        dict(temperature=0.7, top_p=0.8, seed=3),
        dict(temperature=1.2, min_p=0.1, seed=4),
        dict(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, seed=5),
    ]
    return [keel.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **kinds[i % len(kinds)])
            for i in range(n)]


@pytest.mark.parametrize("page_size", [1, 4])
def test_same_tokens_alone_and_in_a_batch(tiny_model, make_engine, page_size):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts(LENGTHS, seed=11)
    params = mixed_params(len(prompts))
    engine = make_engine(directory, page_size=page_size)
    together = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        alone = engine.generate([prompt], p)[0]
        assert alone.token_ids == out.token_ids


def test_requests_joining_between_steps_get_their_solo_output(tiny_model, make_engine):
    directory, _ = tiny_model("qwen3")
    prompts = random_prompts([6, 13, 2, 21], seed=5)
    params = mixed_params(4, max_new_tokens=8)
    engine = make_engine(directory, page_size=4)
    solo = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    core = engine.core
    tokens: dict[int, list[int]] = {}
    rids = [core.add_request(prompts[0], params[0])]
    step = 0
    while core.has_work or len(rids) < len(prompts):
        if step in (2, 3, 7) and len(rids) < len(prompts):  # arrivals while others decode
            rids.append(core.add_request(prompts[len(rids)], params[len(rids)]))
        for out in core.step():
            tokens.setdefault(out.rid, []).extend(out.token_ids)
        step += 1
    assert [tokens[r] for r in rids] == solo


def test_seeded_sampling_is_reproducible_and_seed_sensitive(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    prompt = random_prompts([7], seed=1)[0]

    def run(seed):
        return engine.generate([prompt], keel.SamplingParams(temperature=1.0, seed=seed, max_new_tokens=16,
                                                             ignore_eos=True))[0].token_ids

    assert run(123) == run(123)
    assert run(123) != run(124)


def test_engine_seed_makes_unseeded_runs_reproducible(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    prompt = random_prompts([7], seed=1)[0]
    params = keel.SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    a = make_engine(directory, seed=7).generate([prompt], params)[0].token_ids
    b = make_engine(directory, seed=7).generate([prompt], params)[0].token_ids
    c = make_engine(directory, seed=8).generate([prompt], params)[0].token_ids
    assert a == b and a != c


def test_penalised_greedy_matches_transformers(tiny_model, make_engine):
    directory, hf_model = tiny_model("llama2")
    prompt = random_prompts([6], seed=2)[0]
    out = make_engine(directory).generate([prompt], keel.SamplingParams(
        temperature=0.0, repetition_penalty=1.8, max_new_tokens=16, ignore_eos=True))[0]
    ids = torch.tensor([prompt])
    ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, repetition_penalty=1.8,
                            max_new_tokens=16, eos_token_id=None, pad_token_id=PAD_ID)
    assert out.token_ids == ref[0, len(prompt):].tolist()


def test_finish_reasons_and_logprob_shapes(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    prompt = random_prompts([5], seed=3)[0]
    free_run = engine.generate([prompt], keel.SamplingParams(temperature=0.0, max_new_tokens=6,
                                                             ignore_eos=True))[0]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 6
    assert free_run.logprobs is None
    stop_at = free_run.token_ids[3]
    first = free_run.token_ids.index(stop_at)
    stopped = engine.generate([prompt], keel.SamplingParams(
        temperature=0.0, max_new_tokens=6, ignore_eos=True, stop_token_ids=[stop_at], top_logprobs=2))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run.token_ids[:first + 1]  # the stop token is included
    assert len(stopped.logprobs) == len(stopped.token_ids)
    assert all(len(entry.top) == 2 for entry in stopped.logprobs)


def test_eos_ends_a_request_unless_ignored(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    eos = engine.core.model_config.eos_token_ids
    assert eos == (257,)
    engine.core.add_request([1, 2], keel.SamplingParams())
    engine.core.add_request([1, 2], keel.SamplingParams(ignore_eos=True, stop_token_ids=[9]))
    with_eos, without = engine.core.scheduler.waiting
    assert with_eos.stop_token_ids == frozenset(eos) and without.stop_token_ids == frozenset({9})
    for req in (with_eos, without):
        engine.core.abort(req.rid)


def demo_text(engine: keel.Engine, prompt: str, n: int = 48) -> str:
    return engine.generate(prompt, keel.SamplingParams(temperature=0.0, max_new_tokens=n))[0].text


def pick_stop(text: str) -> tuple[str, int]:
    """A two-character stop string from the middle of `text` (not at its first occurrence boundary)."""
    for start in range(len(text) // 3, len(text) - 2):
        candidate = text[start:start + 2]
        if "\ufffd" not in candidate:
            return candidate, text.index(candidate)
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_is_cut_from_text_and_stream(make_engine):
    engine = make_engine("keel-demo")
    prompt = "The quick brown fox"
    text = demo_text(engine, prompt)
    stop, at = pick_stop(text)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=48, stop=[stop])
    out = engine.generate(prompt, params)[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:at]
    deltas = list(engine.stream(prompt, params))
    assert "".join(deltas) == out.text
    assert all(stop not in d for d in deltas)


def test_stream_adds_up_to_generate_and_early_close_frees_kv(make_engine):
    engine = make_engine("keel-demo")
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=24)
    assert "".join(engine.stream("Hello", params)) == engine.generate("Hello", params)[0].text
    stream = engine.stream("Hello", keel.SamplingParams(max_new_tokens=200, ignore_eos=True))
    next(stream)
    assert engine.core.kv_cache.pages.num_free < engine.core.kv_cache.pages.capacity
    stream.close()  # the consumer goes away: the request is aborted and its KV released
    assert not engine.core.has_work
    engine.core.check_idle()


def test_invalid_requests_raise_before_any_request_starts(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, kv_cache_tokens=64, context_length=100)
    ok = [1, 2, 3]
    small = keel.SamplingParams(max_new_tokens=4)
    cases = [
        ([ok, list(range(95))], keel.SamplingParams(max_new_tokens=10), "context length 100"),
        ([ok, list(range(60))], keel.SamplingParams(max_new_tokens=10), "KV pool"),
        ([ok, [1, 999]], small, "outside the vocabulary"),
        ([ok, []], small, "empty"),
        ([ok], keel.SamplingParams(max_new_tokens=4, stop_token_ids=[5000]), "stop_token_ids"),
        ([ok, ok], [keel.SamplingParams()], "2 prompts"),
        ([ok, 3.5], small, "prompt must be"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.generate(prompts, params)
        assert not engine.core.has_work  # nothing of the call was started
    assert len(engine.generate([ok], keel.SamplingParams(max_new_tokens=3))[0].token_ids) <= 3


def test_tiny_pool_and_few_rows_queue_requests_and_keep_outputs(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([20, 3, 17, 9, 25, 1], seed=8)
    params = mixed_params(len(prompts), max_new_tokens=12)
    roomy = make_engine(directory, page_size=4).generate(prompts, params)
    # room for about one request at a time, and at most two rows
    tight = make_engine(directory, page_size=4, kv_cache_tokens=40, max_running_requests=2)
    outputs = tight.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in roomy]


def test_max_prefill_tokens_splits_admission(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([10, 10, 10], seed=9)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    engine = make_engine(directory, max_prefill_tokens=15)
    batches = []
    forward = engine.core.runner.forward_full
    engine.core.runner.forward_full = lambda batch: (batches.append(batch), forward(batch))[1]
    for p in prompts:
        engine.core.add_request(p, params)
    engine.core.step()
    assert batches[0].extend_lens_cpu == (10, 5)  # 10 + 10 > 15: the second prompt's first 5 tokens, a chunk
    while engine.core.has_work:
        engine.core.step()
