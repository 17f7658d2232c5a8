"""The minimal continuous-batching scheduler: admission, reservation, and abort in every state."""

from __future__ import annotations

import keel
from keel.runner.forward_batch import ForwardMode
from keel.scheduler.req import ReqStatus
from tests.helpers import random_prompts

PARAMS = keel.SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


def test_admission_reserves_the_whole_request(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    # each request can hold 10 + 6 - 1 = 15 KV tokens = 4 pages of 4; the pool has 6 pages
    core = make_engine(directory, page_size=4, kv_cache_tokens=24).core
    a, b = (core.add_request(p, PARAMS) for p in random_prompts([10, 10], seed=1))
    batch = core.scheduler.schedule()
    assert [r.rid for r in batch.reqs] == [a] and batch.mode == ForwardMode.EXTEND
    core.scheduler.process(batch, [1])
    while core.scheduler.running:
        assert [r.rid for r in core.scheduler.waiting] == [b]  # never admitted while a holds its reservation
        core.step()
    while core.has_work:
        core.step()


def test_row_limit_queues_requests(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory, max_running_requests=2).core
    for p in random_prompts([3, 4, 5], seed=2):
        core.add_request(p, PARAMS)
    core.step()
    assert len(core.scheduler.running) == 2 and len(core.scheduler.waiting) == 1
    while core.has_work:
        core.step()


def test_abort_in_every_state_releases_kv_once(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory, page_size=4).core
    waiting, in_prefill, running = (core.add_request(p, PARAMS) for p in random_prompts([5, 9, 7], seed=3))
    assert core.abort(waiting)  # still queued: nothing to release
    batch = core.scheduler.schedule()
    assert {r.rid for r in batch.reqs} == {in_prefill, running}
    assert core.abort(in_prefill)  # admitted, forward not processed yet
    core.scheduler.process(batch, [1, 1])
    assert [r.rid for r in core.scheduler.running] == [running]
    assert core.abort(running)
    assert not core.abort(running) and not core.abort(12345)  # already finished / unknown
    assert all(r.status == ReqStatus.FINISHED for r in batch.reqs)
    assert not core.has_work
    core.check_idle()
