"""Overlap scheduling: step N+1 is launched before step N's results are read, with the same results."""

from __future__ import annotations

import dataclasses

import pytest

import keel
from keel.engine.launched_step import LaunchedStep
from tests.engine.test_engine import mixed_params
from tests.helpers import random_prompts


def run(engine: keel.Engine, prompts: list[list[int]], params: list[keel.SamplingParams]) -> list:
    outputs = engine.generate(prompts, params)
    return [(o.token_ids, o.finish_reason, o.logprobs, o.prompt_logprobs) for o in outputs]


def record_order(engine: keel.Engine) -> list[tuple[str, int]]:
    """Log ('launch', n) / ('read', n) for the n-th forward, in the order they happen."""
    events: list[tuple[str, int]] = []
    core, forward, read = engine.core, engine.core.runner.forward_full, LaunchedStep.read
    count = iter(range(10**6))

    def recording_forward(batch):
        events.append(("launch", next(count)))
        return forward(batch)

    launched = {}

    def recording_read(step):
        events.append(("read", launched[id(step)]))
        return read(step)

    original_launch = core._launch

    def recording_launch(batch, previous):
        step = original_launch(batch, previous)
        launched[id(step)] = events[-1][1]
        return step

    core.runner.forward_full = recording_forward
    core._launch = recording_launch
    LaunchedStep.read = recording_read
    return events


@pytest.fixture
def restore_read():
    read = LaunchedStep.read
    yield
    LaunchedStep.read = read


@pytest.mark.parametrize("page_size,chunk", [(1, None), (4, 8)])
def test_overlap_gives_the_results_of_sequential_steps(tiny_model, make_engine, page_size, chunk):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([1, 5, 9, 16, 17, 30], seed=21)
    params = mixed_params(len(prompts), max_new_tokens=7)
    params[0] = dataclasses.replace(params[0], max_new_tokens=1)  # finishes at its first, pending token
    params[1] = dataclasses.replace(params[1], logprobs=True, top_logprobs=3, prompt_logprobs=2)
    params[2] = dataclasses.replace(params[2], stop_token_ids=list(range(1, 384, 2)), ignore_eos=False)
    options = dict(page_size=page_size, chunked_prefill_size=chunk, max_prefill_tokens=chunk or 4096)
    sequential = run(make_engine(directory, disable_overlap=True, **options), prompts, params)
    overlapped = run(make_engine(directory, **options), prompts, params)
    assert overlapped == sequential
    assert sequential[2][1] == "stop" and len(sequential[2][0]) > 1 and len(sequential[0][0]) == 1


def test_next_step_launches_before_the_previous_is_read(tiny_model, make_engine, restore_read):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    events = record_order(engine)
    greedy = keel.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    engine.generate(random_prompts([5, 3], seed=2), greedy)
    # prefill, then 3 decodes; each step's results are read after the next step is launched
    assert events == [("launch", 0), ("launch", 1), ("read", 0), ("launch", 2), ("read", 1),
                      ("launch", 3), ("read", 2), ("read", 3)]


def test_penalties_keep_overlap_on(tiny_model, make_engine, restore_read):
    """Penalty counts live on the device (keel.runner.penalties): the next step launches before the host has
    read the token it counts, and the tokens are those of a run without overlap."""
    directory, _ = tiny_model("llama3")
    penalized = keel.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, frequency_penalty=0.5)
    prompts = random_prompts([5], seed=2)
    sequential = make_engine(directory, disable_overlap=True).generate(prompts, penalized)[0].token_ids
    engine = make_engine(directory)
    events = record_order(engine)
    assert engine.generate(prompts, penalized)[0].token_ids == sequential
    assert events == [("launch", 0), ("launch", 1), ("read", 0), ("launch", 2), ("read", 1),
                      ("launch", 3), ("read", 2), ("read", 3)]
    assert len(engine.core.penalties) == 0  # the finished request's slot was freed


def test_disable_overlap_reads_each_step_before_the_next(tiny_model, make_engine, restore_read):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, disable_overlap=True)
    events = record_order(engine)
    engine.generate(random_prompts([5], seed=2), keel.SamplingParams(temperature=0.0, max_new_tokens=2))
    assert events == [("launch", 0), ("read", 0), ("launch", 1), ("read", 1)]


def test_abort_while_its_step_is_in_flight(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    core = engine.core
    greedy = keel.SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    prompts = random_prompts([6, 9], seed=4)
    alone = engine.generate([prompts[1]], greedy)[0].token_ids
    victim, survivor = (core.add_request(p, greedy) for p in prompts)
    core.step()  # the prefill of both is in flight
    assert core.abort(victim)
    tokens = []
    while core.has_work:
        for out in core.step():
            assert out.rid == survivor
            tokens += out.token_ids
    assert tokens == alone


def test_aborting_the_last_request_leaves_the_engine_idle(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory).core
    rid = core.add_request(random_prompts([6], seed=4)[0], keel.SamplingParams(max_new_tokens=6))
    core.step()
    assert core.abort(rid)
    assert not core.has_work  # the step in flight was waited for; check_idle ran in abort()
