"""The scheduler: admission, policies, chunked prefill, mixed batches, retraction, abort in every state."""

from __future__ import annotations

import pytest

import keel
from keel.runner.forward_batch import ForwardMode
from keel.scheduler.req import Req, ReqStatus
from tests.helpers import assert_same_greedy, random_prompts

GREEDY = keel.SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, top_logprobs=2)


def run_to_end(core) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    while core.has_work:
        for out in core.step():
            tokens.setdefault(out.rid, []).extend(out.token_ids)
    return tokens


def test_row_limit_queues_requests(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory, max_running_requests=2).core
    for p in random_prompts([3, 4, 5], seed=2):
        core.add_request(p, GREEDY)
    core.step()
    assert len(core.scheduler.running) == 2 and len(core.scheduler.waiting) == 1
    run_to_end(core)


def test_abort_in_every_state_releases_kv_once(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory, page_size=4, chunked_prefill_size=8, max_prefill_tokens=8).core
    long_prompt, short, waiting = random_prompts([30, 5, 7], seed=3)
    chunked = core.add_request(long_prompt, GREEDY)
    running = core.add_request(short, GREEDY)
    queued = core.add_request(waiting, GREEDY)
    core.step()  # the long prompt's first chunk uses the whole budget
    assert core.scheduler.chunked is not None and core.scheduler.chunked.rid == chunked
    assert core.abort(queued)  # still queued: nothing to release
    assert core.abort(chunked)  # mid chunked prefill
    core.step()  # `running` is admitted
    batch = core.scheduler.schedule()  # decode: in flight
    assert batch.mode == ForwardMode.DECODE
    assert core.abort(running)  # its forward is "running": the result is dropped, its KV released now
    core.scheduler.process(batch, [[1]])
    assert not core.abort(running) and not core.abort(12345)  # already finished / unknown
    assert not core.has_work


def record_batches(core) -> list:
    """Wrap the runner so every forward's ForwardBatch is recorded."""
    seen = []
    forward = core.runner.forward_full

    def recording(batch):
        seen.append(batch)
        return forward(batch)

    core.runner.forward_full = recording
    return seen


def test_chunked_prefill_interleaves_with_decodes_and_keeps_outputs(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    short, long_prompt = random_prompts([3, 40], seed=4)
    long_params = keel.SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, top_logprobs=2)
    short_params = keel.SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)
    reference = make_engine(directory, chunked_prefill_size=None).generate([long_prompt], long_params)[0]
    core = make_engine(directory, page_size=4, chunked_prefill_size=8).core
    batches = record_batches(core)
    core.add_request(short, short_params)
    core.step()  # the short request is now decoding
    long_rid = core.add_request(long_prompt, long_params)
    tokens = run_to_end(core)
    assert tokens[long_rid] == reference.token_ids
    chunk_steps = [b for b in batches if b.mode == ForwardMode.EXTEND]
    assert [b.extend_lens_cpu for b in chunk_steps[1:]] == [(8,), (8,), (8,), (8,), (8,)]
    chunk_at = [i for i, b in enumerate(batches) if b.mode == ForwardMode.EXTEND][1:]
    # the short request decodes between every two of the long prompt's chunks
    assert all(ForwardMode.DECODE in [b.mode for b in batches[a + 1:b]] for a, b in zip(chunk_at, chunk_at[1:]))


def test_mixed_chunk_batches_decode_and_prefill_together(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([3, 40, 9], seed=5)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    plain = make_engine(directory).generate(prompts, params)
    core = make_engine(directory, page_size=4, chunked_prefill_size=8, enable_mixed_chunk=True).core
    batches = record_batches(core)
    rids = [core.add_request(prompts[0], params)]
    first = core.step()  # with overlap, its token is read by a later step
    rids += [core.add_request(p, params) for p in prompts[1:]]
    tokens = run_to_end(core)
    tokens[rids[0]] = [t for out in first for t in out.token_ids] + tokens[rids[0]]
    assert [tokens[r] for r in rids] == [o.token_ids for o in plain]
    assert any(b.mode == ForwardMode.MIXED for b in batches)


def test_lpm_admits_the_longest_cached_prefix_first(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, page_size=4, schedule_policy="lpm", max_running_requests=1)
    core = engine.core
    base = random_prompts([24], seed=6)[0]
    engine.generate([base], keel.SamplingParams(max_new_tokens=1))  # base is now cached
    other, similar = random_prompts([20], seed=7)[0], base[:20] + [1, 2]
    first = core.add_request(other, GREEDY)
    second = core.add_request(similar, GREEDY)
    core.step()
    assert [r.rid for r in core.scheduler.running] == [second] and core.scheduler.waiting[0].rid == first
    run_to_end(core)


def test_forced_retraction_keeps_outputs(tiny_model, make_engine, monkeypatch):
    directory, _ = tiny_model("qwen3")
    prompts = random_prompts([5, 12, 3, 20], seed=8)
    reference = make_engine(directory).generate(prompts, GREEDY)
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", "2")
    engine = make_engine(directory, page_size=4)
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_retraction_under_memory_pressure_keeps_outputs(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([6, 9, 4, 11, 7, 5], seed=9)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    reference = make_engine(directory).generate(prompts, params)
    # Each request needs up to 35 KV tokens = 9 pages of 4; the pool has 12: admission's estimate lets
    # several in, and decoding then runs out, so the scheduler must retract.
    engine = make_engine(directory, page_size=4, kv_cache_tokens=48)
    retracted = []
    original = engine.core.scheduler._retract
    engine.core.scheduler._retract = lambda req: (retracted.append(req.rid), original(req))
    outputs = engine.generate(prompts, params)
    assert retracted, "the pool was meant to force retractions"
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_request_too_big_for_the_pool_fails_alone_and_others_finish(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, page_size=4, kv_cache_tokens=32)
    core = engine.core
    small = core.add_request([1, 2, 3], keel.SamplingParams(max_new_tokens=4, ignore_eos=True))
    # Skip validation to reach the scheduler's own guard: 40 prompt tokens never fit in 32 slots.
    from keel.scheduler.req import Req
    core.scheduler.add(Req(999, list(range(40)), keel.SamplingParams(max_new_tokens=2), 0, frozenset()))
    outputs = run_to_end_outputs(core)
    assert outputs[999].finish_reason == "abort" and "cannot hold" in outputs[999].error
    assert outputs[small].finish_reason == "length"


def run_to_end_outputs(core):
    final = {}
    while core.has_work:
        for out in core.step():
            if out.finish_reason is not None:
                final[out.rid] = out
    return final


def test_waiting_request_status(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory).core
    rid = core.add_request([1, 2], GREEDY)
    assert core.scheduler.waiting[0].status == ReqStatus.WAITING
    core.abort(rid)


@pytest.mark.parametrize("page_size", [1, 16])
def test_long_prompt_in_chunks_gives_the_unchunked_tokens(page_size, tiny_model, make_engine):
    directory, _ = tiny_model("mistral")  # sliding window 8: chunks must see the right window too
    prompts = random_prompts([150, 33, 64], seed=30)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, top_logprobs=2)
    whole = make_engine(directory, page_size=page_size, chunked_prefill_size=None).generate(prompts, params)
    core = make_engine(directory, page_size=page_size, chunked_prefill_size=32, max_prefill_tokens=32).core
    batches = record_batches(core)
    rids = [core.add_request(p, params) for p in prompts]
    outputs: dict = {}
    collect(core, outputs)
    assert max(sum(b.extend_lens_cpu) for b in batches if b.mode == ForwardMode.EXTEND) <= 32
    assert sum(1 for b in batches if b.mode == ForwardMode.EXTEND) >= (150 + 33 + 64) // 32
    for i, rid in enumerate(rids):
        assert_same_greedy(outputs[rid], whole[i], f"prompt {i}")


def test_sixteen_requests_through_eviction_and_retraction(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    shared = random_prompts([24], seed=31)[0]
    suffixes = random_prompts([1, 3, 5, 8, 13, 2, 7, 4, 9, 6, 11, 1, 10, 3, 12, 5], seed=32)
    prompts = [shared[:8 * (i % 4)] + s for i, s in enumerate(suffixes)]  # four families of shared prefixes
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True, top_logprobs=2)
    solo_engine = make_engine(directory)
    solo = [solo_engine.generate([p], params)[0] for p in prompts]
    largest = max(len(p) for p in prompts) + 20 - 1
    engine = make_engine(directory, page_size=4, kv_cache_tokens=(largest // 4 + 3) * 4)  # one request + 3 pages
    retracted, evicted = [], []
    scheduler, radix = engine.core.scheduler, engine.core.kv_cache.radix
    retract, evict = scheduler._retract, radix.evict
    scheduler._retract = lambda req: (retracted.append(req.rid), retract(req))[1]
    radix.evict = lambda n: (lambda freed: (evicted.append(freed), freed)[1])(evict(n))
    outputs = engine.generate(prompts, params)
    assert retracted and sum(evicted) > 0, "the tiny pool was meant to force both retraction and eviction"
    for i, (out, ref) in enumerate(zip(outputs, solo)):
        assert_same_greedy(out, ref, f"request {i}")


def test_impossible_requests_are_refused_clearly_while_others_run(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([5, 9], seed=33)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, top_logprobs=2)
    engine = make_engine(directory, page_size=4, kv_cache_tokens=96, context_length=128)
    solo = [engine.generate([p], params)[0] for p in prompts]
    core = engine.core
    rids = [core.add_request(p, params) for p in prompts]
    outputs: dict = {}
    for out in core.step():
        outputs[out.rid] = keel.RequestOutput(str(out.rid), None, [], token_ids=list(out.token_ids),
                                              finish_reason=out.finish_reason, logprobs=list(out.logprobs))
    bad = [
        (list(range(130)), keel.SamplingParams(max_new_tokens=1), "130 tokens.*context length 128"),
        (list(range(110)), keel.SamplingParams(max_new_tokens=20), "130 tokens exceeds the context length 128"),
        (list(range(90)), keel.SamplingParams(max_new_tokens=20), "109 KV tokens.*KV pool \\(96 tokens\\)"),
    ]
    for prompt, p, message in bad:
        held = dict(core.kv_cache.held)
        with pytest.raises(ValueError, match=message):
            core.add_request(prompt, p)
        assert core.kv_cache.held.keys() == held.keys()  # refused before any KV was touched
    with pytest.raises(ValueError, match="max_new_tokens=200"):
        engine.generate([[1, 2]], [keel.SamplingParams(max_new_tokens=200)])
    collect(core, outputs)
    for i, rid in enumerate(rids):
        assert_same_greedy(outputs[rid], solo[i], f"request {i}")


def collect(core, outputs: dict) -> None:
    """Step the core to the end, accumulating each request's tokens, log-probs and finish reason."""
    while core.has_work:
        for out in core.step():
            result = outputs.setdefault(out.rid, keel.RequestOutput(str(out.rid), None, [], logprobs=[]))
            result.token_ids += out.token_ids
            result.logprobs += out.logprobs or []
            result.finish_reason = out.finish_reason


def test_abort_of_a_retracted_request(tiny_model, make_engine, monkeypatch):
    directory, _ = tiny_model("llama3")
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", "3")
    core = make_engine(directory, page_size=4).core
    rids = [core.add_request(p, GREEDY) for p in random_prompts([4, 9], seed=34)]
    for _ in range(20):  # until one is retracted back to the queue with tokens already generated
        retracted = [r.rid for r in core.scheduler.waiting if r.output_ids]
        if retracted:
            break
        core.step()
    assert retracted, "forced retraction did not happen"
    victim = retracted[0]
    assert victim not in core.kv_cache.held
    assert core.abort(victim)
    outputs: dict = {}
    collect(core, outputs)
    (other,) = set(rids) - {victim}
    assert victim not in outputs and outputs[other].finish_reason == "length"


def test_pending_tokens_count_in_length_but_are_not_readable():
    req = Req(1, [5, 6, 7], GREEDY, seed=0, stop_token_ids=frozenset([9]))
    req.pending = 3  # a verify step of 2 drafts in flight: up to 3 tokens
    assert req.seq_len == 6 and req.known_len == 3 and req.num_generated == 3
    with pytest.raises(ValueError, match="still on the device"):
        req.token_ids(0, 4)
    assert req.append_tokens([9, 4], launched=3) == (1, "stop") and req.pending == 0 and req.output_ids == [9]
    with pytest.raises(ValueError, match="owed it 1 of its 0 pending"):
        req.append_tokens([3])


# ---- requeue and abort_many, called on the scheduler directly

from keel.debug.invariants import check_invariants  # noqa: E402  (this section was appended)


def tokens_so_far(outputs: list) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for out in outputs:
        tokens.setdefault(out.rid, []).extend(out.token_ids)
    return tokens


def solo_greedy(engine: keel.Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_requeue_of_a_running_request_releases_kv_and_puts_it_first(tiny_model, make_engine, overlap):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([6, 5], seed=35)
    solo = solo_greedy(make_engine(directory, page_size=4), prompts)
    core = make_engine(directory, page_size=4, max_running_requests=1, disable_overlap=not overlap).core
    running, queued = [core.add_request(p, GREEDY) for p in prompts]
    first = core.step() + core.step()  # prefilled, and decoding
    (req,) = core.scheduler.running
    assert req.rid == running and req.output_ids
    core.scheduler.requeue(req)
    assert running not in core.kv_cache.held and req.status == ReqStatus.WAITING
    assert [r.rid for r in core.scheduler.waiting] == [running, queued] and not core.scheduler.running
    check_invariants(core.scheduler)
    tokens = tokens_so_far(first)
    for rid, more in run_to_end(core).items():
        tokens.setdefault(rid, []).extend(more)
    assert [tokens[running], tokens[queued]] == solo  # re-prefilled from prompt + output, it goes on exactly


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_requeue_of_the_chunked_request_releases_kv_and_puts_it_first(tiny_model, make_engine, overlap):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([40, 5], seed=36)
    solo = solo_greedy(make_engine(directory, page_size=4), prompts)
    core = make_engine(directory, page_size=4, chunked_prefill_size=8, max_prefill_tokens=8,
                       disable_overlap=not overlap).core
    long_rid, queued = [core.add_request(p, GREEDY) for p in prompts]
    core.step()
    core.step()  # two chunks of the long prompt in, with overlap the second still in flight
    chunked = core.scheduler.chunked
    assert chunked is not None and chunked.rid == long_rid and core.kv_cache.kv_len(long_rid) == 16
    core.scheduler.requeue(chunked)
    assert core.scheduler.chunked is None and long_rid not in core.kv_cache.held
    assert [r.rid for r in core.scheduler.waiting] == [long_rid, queued]
    check_invariants(core.scheduler)
    tokens = run_to_end(core)
    assert [tokens[long_rid], tokens[queued]] == solo


@pytest.mark.parametrize("reason", ["abort", "stop"])
def test_scheduler_abort_many_finishes_the_named_requests_wherever_they_are(tiny_model, make_engine, reason):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([4, 6, 8, 5], seed=37)
    solo = solo_greedy(make_engine(directory, page_size=1), prompts)
    core = make_engine(directory, page_size=1, max_running_requests=2, disable_overlap=True).core
    rids = [core.add_request(p, GREEDY) for p in prompts]
    first = core.step() + core.step()
    running_a, running_b, waiting_c, waiting_d = rids
    found = core.scheduler.abort_many({running_a, waiting_c, 999}, reason)
    assert sorted(r.rid for r in found) == [running_a, waiting_c]  # 999 is unknown
    assert all(r.status == ReqStatus.FINISHED and r.finish_reason == reason for r in found)
    assert [r.rid for r in core.scheduler.running] == [running_b]
    assert [r.rid for r in core.scheduler.waiting] == [waiting_d]
    assert running_a not in core.kv_cache.held
    check_invariants(core.scheduler)
    # Only a "stop" (a stop string found by the front end) hands the written KV to the prefix cache.
    cached = len(core.kv_cache.match_prefix(prompts[0]).pages)
    assert cached > 0 if reason == "stop" else cached == 0
    assert core.scheduler.abort_many({running_a, waiting_c}) == []  # already finished
    tokens = tokens_so_far(first)
    for rid, more in run_to_end(core).items():
        tokens.setdefault(rid, []).extend(more)
    assert tokens[running_b] == solo[1] and tokens[waiting_d] == solo[3]
