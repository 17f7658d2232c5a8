"""One bad request fails alone: what the engine contains, and what it must let propagate.

SamplingParams is a mutable dataclass validated on construction; a request whose params are changed
afterwards can hold values no batch can carry. Such a request must fail by itself (at admission, or
mid-run with an error output) while the others keep their solo outputs; an error no request accounts
for, or a device error, must end the engine instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pytest
import torch

import keel
import keel.engine.core
from keel.engine.core import EngineCore, RequestFault, _is_device_error
from keel.engine.outputs import CoreOutput
from keel.scheduler.req import Req
from tests.helpers import random_prompts

Outputs = dict[int, list[CoreOutput]]


def greedy(max_new_tokens: int = 8) -> keel.SamplingParams:
    # A fresh object per request: a Req keeps a reference to its params, so sharing one would corrupt all.
    return keel.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)


def step_into(core: EngineCore, outs: Outputs) -> None:
    for out in core.step():
        outs.setdefault(out.rid, []).append(out)


def drain(core: EngineCore, outs: Outputs) -> Outputs:
    while core.has_work:
        step_into(core, outs)
    return outs


def tokens(outs: Outputs, rid: int) -> list[int]:
    return [t for out in outs.get(rid, []) for t in out.token_ids]


def find(core: EngineCore, rid: int) -> Req:
    s = core.scheduler
    return next(r for r in [*s.waiting, *s.running, *([s.chunked] if s.chunked else [])] if r.rid == rid)


@pytest.fixture(scope="module")
def solo(tiny_model) -> Callable[[list[list[int]]], list[list[int]]]:
    """solo(prompts): each prompt's greedy tokens when it runs alone on a reference engine (memoised, since
    parametrized tests share prompts; greedy tokens do not depend on page size, overlap or chunking here)."""
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), dtype="float32", device="cpu")
    memo: dict[tuple[int, ...], list[int]] = {}

    def run(prompts: list[list[int]]) -> list[list[int]]:
        for p in prompts:
            if tuple(p) not in memo:
                memo[tuple(p)] = engine.generate([p], greedy())[0].token_ids
        return [memo[tuple(p)] for p in prompts]

    return run


def assert_clean(core: EngineCore) -> None:
    """Drained, and every page free or evictable cache (then free once the cache is flushed)."""
    assert not core.has_work
    core.check_idle()
    core.flush_cache()
    pages = core.kv_cache.pages
    assert pages.num_free == pages.capacity


def assert_failed_alone(outs: Outputs, rid: int) -> None:
    """`rid` ended with one error output, its last, and no token after the fault."""
    last = outs[rid][-1]
    assert last.finish_reason == "abort" and last.token_ids == []
    assert last.error is not None and f"request {rid} cannot be batched" in last.error
    assert [out.error is not None for out in outs[rid]].count(True) == 1


def record_requeues(core: EngineCore) -> list[tuple[int, bool]]:
    """Wrap the scheduler's requeue: (rid, whether it was the mid-prefill chunked request) per call."""
    calls: list[tuple[int, bool]] = []
    requeue = core.scheduler.requeue
    core.scheduler.requeue = lambda req: (calls.append((req.rid, req is core.scheduler.chunked)), requeue(req))[1]
    return calls


def unchecked_core(directory: Path, **options: object) -> EngineCore:
    """An engine left out of make_engine's end-of-test checks: after an error that propagates from step(),
    the engine process ends, so its KV state is not expected to be clean."""
    return keel.Engine(str(directory), dtype="float32", device="cpu", **options).core


# Values that pass validate_request (it checks top_k only against the vocabulary from above) but that
# build_sampling_batch cannot turn into tensors.
CORRUPTIONS: dict[str, Callable[[keel.SamplingParams], None]] = {
    "top_k_below_int64": lambda p: setattr(p, "top_k", -2**64),
    "temperature_str": lambda p: setattr(p, "temperature", "hot"),
    "min_p_none": lambda p: setattr(p, "min_p", None),
    "repetition_penalty_str": lambda p: setattr(p, "repetition_penalty", "2"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_params_are_refused_at_admission_and_nothing_is_queued(tiny_model, make_engine, solo, corrupt):
    directory, _ = tiny_model("llama3")
    good_prompt, bad_prompt = random_prompts([7, 5], seed=40)
    (alone,) = solo([good_prompt])
    core = make_engine(directory, page_size=4).core
    good = core.add_request(good_prompt, greedy())
    params = greedy()
    corrupt(params)
    with pytest.raises(RequestFault, match="request 42 cannot be batched"):
        core.add_request(bad_prompt, params, rid=42)
    assert [r.rid for r in core.scheduler.waiting] == [good]  # the bad one was never queued
    assert 42 not in core.kv_cache.held
    outs = drain(core, {})
    assert tokens(outs, good) == alone and 42 not in outs
    assert_clean(core)


def test_request_fault_is_a_value_error() -> None:
    # The engine process rejects a request whose add_request raises ValueError with that error, alone.
    assert issubclass(RequestFault, ValueError)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_request_corrupted_while_running_fails_alone(tiny_model, make_engine, solo, page_size, overlap):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([5, 9, 3], seed=41)
    alone = solo(prompts)
    core = make_engine(directory, page_size=page_size, disable_overlap=not overlap).core
    assert core.strict_checks  # every step below ends with the full KV invariant check
    requeued = record_requeues(core)
    bad, *good = [core.add_request(p, greedy()) for p in prompts]
    outs: Outputs = {}
    for _ in range(2):
        step_into(core, outs)
    assert bad in [r.rid for r in core.scheduler.running]
    find(core, bad).params.top_k = 2**64  # overflows int64 in the sampling batch
    drain(core, outs)
    assert sorted(rid for rid, _ in requeued) == good  # they shared the failed step, and were retracted
    assert_failed_alone(outs, bad)
    got = tokens(outs, bad)
    assert got == alone[0][:len(got)]  # what it got before the fault was right
    for rid, expected in zip(good, alone[1:]):
        assert tokens(outs, rid) == expected and outs[rid][-1].finish_reason == "length"
    assert_clean(core)


CHUNKED = dict(page_size=4, chunked_prefill_size=8, max_prefill_tokens=8)


def start_chunking(core: EngineCore, short: list[int], long_prompt: list[int], outs: Outputs) -> tuple[int, int]:
    """A short request decoding, and a long one admitted and mid chunked prefill."""
    short_rid = core.add_request(short, greedy())
    step_into(core, outs)
    long_rid = core.add_request(long_prompt, greedy())
    for _ in range(4):
        if core.scheduler.chunked is not None and core.kv_cache.kv_len(long_rid) >= 8:
            break
        step_into(core, outs)
    chunked = core.scheduler.chunked
    assert chunked is not None and chunked.rid == long_rid, "the long prompt was meant to be mid-prefill"
    assert core.kv_cache.kv_len(long_rid) <= len(long_prompt) - 16  # at least two chunks to go
    return short_rid, long_rid


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_request_corrupted_mid_chunked_prefill_fails_alone(tiny_model, make_engine, solo, overlap):
    directory, _ = tiny_model("llama3")
    short, long_prompt = random_prompts([3, 40], seed=42)
    (alone,) = solo([short])
    core = make_engine(directory, disable_overlap=not overlap, **CHUNKED).core
    outs: Outputs = {}
    short_rid, long_rid = start_chunking(core, short, long_prompt, outs)
    find(core, long_rid).params.top_k = 2**64
    drain(core, outs)
    # Chunks mid-prompt sample nothing, so the fault surfaces with its last chunk, which samples.
    assert_failed_alone(outs, long_rid)
    assert tokens(outs, long_rid) == []
    assert tokens(outs, short_rid) == alone
    assert_clean(core)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_fault_beside_a_mid_prefill_chunk_requeues_the_chunk(tiny_model, make_engine, solo, overlap):
    # A mixed batch holds decodes and a chunk; one decode fails: the chunked request is retracted and
    # later prefilled again, with its solo output.
    directory, _ = tiny_model("llama3")
    bad_prompt, good_prompt, long_prompt = random_prompts([3, 6, 40], seed=43)
    alone = solo([bad_prompt, good_prompt, long_prompt])
    core = make_engine(directory, disable_overlap=not overlap, enable_mixed_chunk=True, **CHUNKED).core
    requeued = record_requeues(core)
    outs: Outputs = {}
    good = core.add_request(good_prompt, greedy())
    bad, long_rid = start_chunking(core, bad_prompt, long_prompt, outs)
    find(core, bad).params.top_k = 2**64
    drain(core, outs)
    assert (long_rid, True) in requeued and (good, False) in requeued
    assert_failed_alone(outs, bad)
    got = tokens(outs, bad)
    assert got == alone[0][:len(got)]
    assert tokens(outs, good) == alone[1] and tokens(outs, long_rid) == alone[2]
    assert_clean(core)


def failing_launch(error: Exception) -> Callable[..., object]:
    def launch(*args: object, **kwargs: object) -> object:
        raise error
    return launch


def test_launch_error_no_request_accounts_for_propagates(tiny_model, monkeypatch):
    directory, _ = tiny_model("llama3")
    core = unchecked_core(directory, page_size=4)
    rids = [core.add_request(p, greedy()) for p in random_prompts([5, 9], seed=44)]
    core.step()
    monkeypatch.setattr(keel.engine.core, "launch_step", failing_launch(RuntimeError("no request's fault")))
    with pytest.raises(RuntimeError, match="no request's fault"):
        core.step()
    # Every probe passed, so no request was blamed: the engine does not guess.
    assert not core.scheduler.failed
    assert all(find(core, rid).finish_reason is None for rid in rids)


def test_device_error_detection() -> None:
    assert _is_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert _is_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not _is_device_error(RuntimeError("shape mismatch"))
    assert not _is_device_error(ValueError("Overflow when unpacking long long"))
    accelerator_error: Optional[type] = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None:  # newer torch raises this for device faults, whatever the message
        assert _is_device_error(accelerator_error("unspecified launch failure"))


DEVICE_ERRORS = {"cuda_message": lambda: RuntimeError("CUDA error: an illegal memory access was encountered")}
if hasattr(torch, "AcceleratorError"):
    DEVICE_ERRORS["accelerator_error"] = lambda: torch.AcceleratorError("unspecified launch failure")


@pytest.mark.parametrize("make_error", DEVICE_ERRORS.values(), ids=DEVICE_ERRORS.keys())
def test_device_error_propagates_even_when_a_request_is_at_fault(tiny_model, monkeypatch, make_error):
    directory, _ = tiny_model("llama3")
    core = unchecked_core(directory, page_size=4)
    bad, good = [core.add_request(p, greedy()) for p in random_prompts([5, 9], seed=45)]
    core.step()
    find(core, bad).params.top_k = 2**64  # its probe would fail: a scapegoat the engine must not take
    error = make_error()
    monkeypatch.setattr(keel.engine.core, "launch_step", failing_launch(error))
    with pytest.raises(type(error)) as raised:
        core.step()
    assert raised.value is error
    assert not core.scheduler.failed and find(core, bad).finish_reason is None


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_abort_many_aborts_exactly_the_live_requests(tiny_model, make_engine, solo, overlap):
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([4, 6, 8, 5, 7], seed=46)
    alone = solo([prompts[2], prompts[4]])
    core = make_engine(directory, page_size=4, max_running_requests=2, disable_overlap=not overlap).core
    finished = core.add_request(prompts[0], greedy(2))
    drain(core, {})
    running_a, running_b, waiting_c, waiting_d = [core.add_request(p, greedy()) for p in prompts[1:]]
    outs: Outputs = {}
    step_into(core, outs)
    step_into(core, outs)
    assert [r.rid for r in core.scheduler.running] == [running_a, running_b]
    assert [r.rid for r in core.scheduler.waiting] == [waiting_c, waiting_d]
    aborted = core.abort_many([running_a, waiting_c, 999, finished, running_a])
    assert sorted(aborted) == [running_a, waiting_c]  # unknown, finished and repeated ids are ignored
    assert running_a not in core.kv_cache.held
    assert [r.rid for r in core.scheduler.waiting] == [waiting_d]
    before = {rid: len(tokens(outs, rid)) for rid in (running_a, waiting_c)}
    drain(core, outs)
    assert {rid: len(tokens(outs, rid)) for rid in (running_a, waiting_c)} == before  # nothing after the abort
    assert [tokens(outs, running_b), tokens(outs, waiting_d)] == alone
    assert core.abort_many([running_b, waiting_d]) == []  # finished by now
    assert_clean(core)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
def test_abort_many_of_every_live_request_leaves_the_engine_idle_at_once(tiny_model, make_engine, overlap):
    directory, _ = tiny_model("llama3")
    core = make_engine(directory, page_size=4, disable_overlap=not overlap).core
    rids = [core.add_request(p, greedy()) for p in random_prompts([4, 6, 30], seed=47)]
    core.step()
    core.step()
    assert sorted(core.abort_many(rids)) == rids
    assert not core.has_work  # with overlap, the step in flight was waited for and dropped
    assert_clean(core)
