"""Disaggregation at the engine level: a prefill engine and a decode engine, their KV moved over NIXL (UCX, host
memory, one process), driven by a small router loop. Every request gets the tokens one engine alone gives it;
aborts at each stage and failed transfers end requests with errors and leave every page free on both sides (the
invariant checker runs after every step on both: the tests set KEEL_STRICT_CHECKS)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Optional

import pytest

import keel
from keel.config import EngineConfig
from keel.disagg.kv_transfer import PeerInfo
from keel.engine.core import EngineCore

_names = itertools.count()


def _core(model, **options) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model), device="cpu", dtype="float32", **options))


@pytest.fixture
def closing() -> Iterator[Callable[..., tuple[EngineCore, ...]]]:
    """closing(*cores) -> cores, each closed (its NIXL agent released) after the test."""
    cores: list[EngineCore] = []

    def keep(*made: EngineCore) -> tuple[EngineCore, ...]:
        cores.extend(made)
        return made

    yield keep
    for core in cores:
        core.close()


def _pair(model, page_size: int = 1, **options) -> tuple[EngineCore, EngineCore]:
    n = next(_names)
    prefill, decode = _core(model, page_size=page_size, **options), _core(model, page_size=page_size, **options)
    prefill.enable_disaggregation("prefill", f"p{n}")
    decode.enable_disaggregation("decode", f"d{n}", transfer_timeout_s=30.0)
    prefill.disagg.connect(decode.disagg.peer_info())
    return prefill, decode


@dataclasses.dataclass
class Routed:
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: Optional[str] = None
    error: Optional[str] = None


def _route(prefill: EngineCore, decode: EngineCore, work: list[tuple[list[int], keel.SamplingParams]],
           abort: Optional[dict[int, str]] = None, max_steps: int = 5000) -> dict[int, Routed]:
    """A router in one loop: preallocate on the decode engine (in order, as room allows), prefill there, stream
    from the decode engine; `abort` {request index: stage} aborts a request on both sides at a stage: "queued"
    (preallocated, not yet prefilled), "prefilling" (its prefill launched, its token not read yet), "decoding"
    (first token out)."""
    abort = abort or {}
    results = {i: Routed() for i in range(len(work))}
    queue = list(range(len(work)))
    on_prefill: dict[int, int] = {}  # prefill rid -> request index
    on_decode: dict[int, int] = {}  # decode rid -> request index
    decode_rid: dict[int, int] = {}  # request index -> decode rid

    def abort_both(i: int) -> None:
        for rid, j in on_prefill.items():
            if j == i:  # the prefill engine reports its end once nothing more is written for it
                prefill.abort(rid)
        if i in decode_rid:
            decode.abort(decode_rid[i])
        results[i].finish = results[i].finish or "abort"

    for _ in range(max_steps):
        while queue:
            i = queue[0]
            prompt, params = work[i]
            destination = decode.preallocate(prompt, params)
            if destination is None:
                break
            queue.pop(0)
            on_decode[destination.rid] = i
            decode_rid[i] = destination.rid
            on_prefill[prefill.add_request(prompt, params, kv_destination=destination)] = i
            if abort.get(i) == "queued":
                abort_both(i)
        if prefill.has_work:
            for out in prefill.step():
                i = on_prefill[out.rid]
                if out.finish_reason is None:
                    continue
                del on_prefill[out.rid]
                if out.finish_reason == "abort":  # nothing more will be written for it: the decoder may free it
                    if results[i].finish is None:  # its KV never reached the decoder
                        results[i].finish, results[i].error = "abort", out.error
                        decode.abort(decode_rid[i])
                    decode.disagg.sender_done(decode_rid[i])
            for rid, i in list(on_prefill.items()):
                if abort.get(i) == "prefilling" and any(r.rid == rid for r in prefill.scheduler.running):
                    abort_both(i)
        if decode.has_work:
            for out in decode.step():
                i = on_decode[out.rid]
                if results[i].finish == "abort":
                    continue
                results[i].tokens += out.token_ids
                if out.finish_reason is not None:
                    results[i].finish, results[i].error = out.finish_reason, out.error
                if abort.get(i) == "decoding" and results[i].finish is None:
                    abort_both(i)
        if not (queue or prefill.has_work or decode.has_work):
            return results
    raise AssertionError("the disaggregated engines never drained")


def _solo(model, work, page_size: int = 1) -> list[list[int]]:
    engine = keel.Engine(str(model), device="cpu", dtype="float32", page_size=page_size)
    return [o.token_ids for o in engine.generate([p for p, _ in work], [s for _, s in work])]


def _work(n: int, seed: int, vocab: int = 200) -> list[tuple[list[int], keel.SamplingParams]]:
    rng = random.Random(seed)
    work = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 30))]
        sampled = i % 2 == 1
        work.append((prompt, keel.SamplingParams(temperature=0.8 if sampled else 0.0, seed=100 + i if sampled else None,
                                                 max_new_tokens=rng.randint(1, 12), ignore_eos=True)))
    return work


def _assert_every_request_fails(prefill: EngineCore, decode: EngineCore, work, message: str) -> None:
    for result in _route(prefill, decode, work).values():
        assert result.finish == "abort" and message in result.error
    _assert_clean(prefill, decode)


def _assert_clean(*cores: EngineCore) -> None:
    for core in cores:
        assert not core.has_work
        core.flush_cache()
        core.check_idle()
        assert core.kv_cache.pages.num_free == core.kv_cache.pages.capacity


@pytest.mark.parametrize("page_size", [1, 4])
def test_each_request_gets_what_one_engine_gives_it(tiny_model, closing, page_size):
    model, _ = tiny_model("llama3")
    work = _work(12, seed=page_size)
    work.append((work[0][0] + [7, 8, 9], work[0][1]))  # a prompt extending an earlier one: prefix-cache hits on both
    prefill, decode = closing(*_pair(model, page_size))
    results = _route(prefill, decode, work)
    solo = _solo(model, work, page_size)
    for i, result in results.items():
        assert result.finish == "length" and result.error is None
        assert result.tokens == solo[i], f"request {i}"
    _assert_clean(prefill, decode)


@pytest.mark.parametrize("stage", ["queued", "prefilling", "decoding"])
def test_an_abort_at_any_stage_frees_both_sides(tiny_model, closing, stage):
    model, _ = tiny_model("llama3")
    work = _work(6, seed=11)
    work = [(p, dataclasses.replace(s, max_new_tokens=8)) for p, s in work]
    prefill, decode = closing(*_pair(model, page_size=4))
    results = _route(prefill, decode, work, abort={1: stage, 4: stage})
    solo = _solo(model, work, page_size=4)
    for i, result in results.items():
        if i in (1, 4):
            assert result.finish == "abort"
        else:
            assert result.tokens == solo[i] and result.finish == "length"
    _assert_clean(prefill, decode)


def test_a_failed_transfer_ends_the_request_with_an_error_on_both_sides(tiny_model, closing):
    model, _ = tiny_model("llama3")
    prefill, decode = closing(*_pair(model, page_size=4))
    prefill.disagg.agent.disconnect(decode.disagg.agent.name)  # the decode server is unreachable
    _assert_every_request_fails(prefill, decode, _work(3, seed=5), "no connection")


def test_kv_that_never_arrives_times_out_and_frees_the_preallocation(tiny_model, closing):
    model, _ = tiny_model("llama3")
    (decode,) = closing(_core(model, page_size=4))
    decode.enable_disaggregation("decode", f"lonely{next(_names)}", transfer_timeout_s=0.0)
    destination = decode.preallocate([5, 6, 7, 8, 9], keel.SamplingParams(max_new_tokens=4))
    assert destination is not None and destination.pages
    (out,) = decode.step()
    assert out.finish_reason == "abort" and "did not arrive" in out.error
    _assert_clean(decode)


def test_what_a_role_cannot_do_is_refused(tiny_model, closing):
    model, _ = tiny_model("llama3")
    plain = _core(model)
    params = keel.SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="decode server"):
        plain.preallocate([1, 2, 3], params)
    (prefill,) = closing(_core(model))
    prefill.enable_disaggregation("prefill", f"solo{next(_names)}")
    with pytest.raises(ValueError, match="already a prefill server"):
        prefill.enable_disaggregation("decode")
    with pytest.raises(ValueError, match="decode server"):
        prefill.preallocate([1, 2, 3], params)
    with pytest.raises(ValueError, match="KV destination needs a prefill server"):
        plain.add_request([1, 2, 3], params, kv_destination=object())
    (decode,) = closing(_core(model))
    decode.enable_disaggregation("decode", f"solo{next(_names)}")
    for asks in ({"logprobs": True}, {"prompt_logprobs": 1}):
        with pytest.raises(ValueError, match="log-probs are not served"):
            decode.preallocate([1, 2, 3], dataclasses.replace(params, **asks))
    assert isinstance(decode.disagg.peer_info(), PeerInfo)
    assert not decode.has_work


@pytest.mark.parametrize("seed", range(3))
def test_random_workloads_with_aborts_and_failed_transfers_free_every_page(tiny_model, closing, monkeypatch, seed):
    monkeypatch.setenv("KEEL_DEBUG_FAIL_KV_TRANSFER_EVERY", "4")
    model, _ = tiny_model("llama3")
    rng = random.Random(seed)
    work = _work(16, seed=100 + seed)
    stages = ["queued", "prefilling", "decoding"]
    abort = {i: rng.choice(stages) for i in rng.sample(range(len(work)), 5)}
    # a tight decode pool: preallocation waits for room, as a decode server's queue does
    prefill, decode = closing(*_pair(model, page_size=4, kv_cache_tokens=160))
    results = _route(prefill, decode, work, abort)
    solo = _solo(model, work, page_size=4)
    failed = [i for i, r in results.items() if r.error is not None]
    assert failed and all("failed to start" in results[i].error for i in failed)
    for i, result in results.items():
        if i not in abort and i not in failed:
            assert result.finish == "length" and result.tokens == solo[i], f"request {i}"
    _assert_clean(prefill, decode)


def test_an_aborted_request_keeps_its_pages_until_its_transfer_ends(tiny_model, closing, monkeypatch):
    """A transfer still in flight may read the prefill server's pages and write the decode server's: neither side
    frees them on an abort until the transfer has ended."""
    model, _ = tiny_model("llama3")
    prefill, decode = closing(*_pair(model, page_size=4))
    agent = prefill.disagg.agent
    real_poll, polls = agent.poll, {"left": 3}

    def slow_poll(transfer):  # the transfer shows as in flight for 3 polls (it already ran: UCX in one process)
        if polls["left"] > 0:
            polls["left"] -= 1
            return transfer.state.IN_PROGRESS
        return real_poll(transfer)

    monkeypatch.setattr(agent, "poll", slow_poll)
    params = keel.SamplingParams(max_new_tokens=5, ignore_eos=True)
    destination = decode.preallocate(list(range(10, 30)), params)
    rid = prefill.add_request(list(range(10, 30)), params, kv_destination=destination)
    while rid not in prefill.disagg.sending:
        prefill.step()
    held = prefill.kv_cache.pages.capacity - prefill.kv_cache.pages.num_free
    assert prefill.abort(rid) and decode.abort(destination.rid)
    assert prefill.kv_cache.pages.capacity - prefill.kv_cache.pages.num_free == held  # still sending: kept
    assert destination.rid in decode.scheduler.parked  # the decode side keeps its pages too
    ends = []
    for _ in range(1000):  # the sender's polls make progress; then the notification frees the decode side
        if prefill.has_work:
            ends += prefill.step()
            assert ends == [] or rid not in prefill.scheduler.parked  # its end is reported once nothing is sent
        assert decode.step() == []
        if not prefill.has_work and not decode.has_work:
            break
    assert [(out.rid, out.finish_reason, out.error) for out in ends] == [(rid, "abort", None)]
    _assert_clean(prefill, decode)


def test_chunked_prefill_and_retraction_on_either_side(tiny_model, closing, monkeypatch):
    """The prefill engine prefills long prompts in chunks (their pages partly in its prefix cache when sent); the
    decode engine retracts a request every 3 decode steps and prefills it again itself."""
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", "3")
    model, _ = tiny_model("llama3")
    work = [(p + p, dataclasses.replace(s, max_new_tokens=10)) for p, s in _work(8, seed=21)]
    prefill, decode = closing(*_pair(model, page_size=4, chunked_prefill_size=8))
    requeued, chunks = [], []
    requeue, cache_prefix = decode.scheduler.requeue, prefill.kv_cache.cache_prefix
    monkeypatch.setattr(decode.scheduler, "requeue", lambda req: (requeued.append(req.rid), requeue(req)))
    monkeypatch.setattr(prefill.kv_cache, "cache_prefix", lambda *a: (chunks.append(a[0]), cache_prefix(*a)))
    results = _route(prefill, decode, work)
    solo = _solo(model, work, page_size=4)
    for i, result in results.items():
        assert result.finish == "length" and result.tokens == solo[i], f"request {i}"
    assert requeued and chunks  # both paths ran
    _assert_clean(prefill, decode)


def test_a_transfer_that_never_finishes_is_given_up_on(tiny_model, closing, monkeypatch):
    """A decode server gone mid-transfer leaves the transfer in progress for good: past the timeout the prefill
    side ends the request with an error and frees its pages; the decode side frees its preallocation once told."""
    from keel.disagg.kv_transfer import Transfer, TransferState

    model, _ = tiny_model("llama3")
    prefill, decode = closing(*_pair(model, page_size=4))
    prefill.disagg.transfer_timeout_s = 0.0
    agent = prefill.disagg.agent
    monkeypatch.setattr(agent, "write", lambda peer, note, plan: Transfer(note, peer, None, TransferState.IN_PROGRESS, 0))
    monkeypatch.setattr(agent, "poll", lambda transfer: transfer.state)
    _assert_every_request_fails(prefill, decode, _work(3, seed=9), "did not finish within 0 s")
