"""Disaggregation at the engine level: a prefill engine and a decode engine, their KV moved over NIXL (UCX, host
memory, one process), driven by a small router loop. Every request gets the tokens one engine alone gives it;
aborts at each stage and failed transfers end requests with errors and leave every page free on both sides (the
invariant checker runs after every step on both: the tests set KEEL_STRICT_CHECKS)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Optional

import pytest
import torch

import keel
from keel.config import EngineConfig
from keel.disagg.kv_transfer import PeerInfo, TransferError
from keel.engine.core import EngineCore

_names = itertools.count()


def _core(model, **options) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model), device="cpu", dtype="float32", **options))


def _pair(model, page_size: int = 1, **options) -> tuple[EngineCore, EngineCore]:
    n = next(_names)
    prefill, decode = _core(model, page_size=page_size, **options), _core(model, page_size=page_size, **options)
    prefill.enable_disaggregation("prefill", f"p{n}")
    decode.enable_disaggregation("decode", f"d{n}", transfer_timeout_s=30.0)
    prefill.connect_kv_peer(decode.kv_peer_info())
    return prefill, decode


@dataclasses.dataclass
class Routed:
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: Optional[str] = None
    error: Optional[str] = None
    accepted: int = 0  # draft tokens the decode engine accepted (speculative decoding)
    prefill_cached: Optional[int] = None  # prompt tokens each side's prefix cache served
    decode_cached: Optional[int] = None


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
                if out.num_cached_tokens is not None:
                    results[i].prefill_cached = out.num_cached_tokens
                if out.finish_reason is None:
                    continue
                del on_prefill[out.rid]
                if out.finish_reason == "abort":  # nothing more will be written for it: the decoder may free it
                    if results[i].finish is None:  # its KV never reached the decoder
                        results[i].finish, results[i].error = "abort", out.error
                        decode.abort(decode_rid[i])
                    decode.kv_sender_done([decode_rid[i]])
            for rid, i in list(on_prefill.items()):
                if abort.get(i) == "prefilling" and any(r.rid == rid for r in prefill.scheduler.running):
                    abort_both(i)
        if decode.has_work:
            for out in decode.step():
                i = on_decode[out.rid]
                if results[i].finish == "abort":
                    continue
                if out.num_cached_tokens is not None:
                    results[i].decode_cached = out.num_cached_tokens
                results[i].tokens += out.token_ids
                results[i].accepted += out.num_accepted_tokens
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


def _work(n: int, seed: int, vocab: int = 200,
          lengths: Optional[list[int]] = None) -> list[tuple[list[int], keel.SamplingParams]]:
    """n requests, greedy and seeded sampling in turn; prompts of `lengths` (n of them), or of 3 to 30 tokens."""
    rng = random.Random(seed)
    work = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(lengths[i] if lengths else rng.randint(3, 30))]
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
        kv = core.kv_cache
        for pool in (kv.pages,) + ((kv.swa.allocator,) if kv.swa is not None else ()):
            assert pool.num_free == pool.capacity, f"{pool.capacity - pool.num_free} {pool.what}s not free after flush"


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
    peer = decode.kv_peer_info()
    assert isinstance(peer, PeerInfo) and len(peer.agents) == 1
    with pytest.raises(TransferError, match="same --tp-size"):  # a decode server of two ranks
        prefill.connect_kv_peer(PeerInfo(peer.agents * 2))
    with pytest.raises(ValueError, match="needs a prefill server"):
        decode.connect_kv_peer(peer)
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


def test_kv_ready_after_the_decode_servers_deadline_is_not_sent(tiny_model, closing, monkeypatch):
    """The decode server gives up a preallocation at its timeout; a prefill server that only gets to send later
    (stalled, queued) must not write into those pages, which may be another request's by then: past the order's
    send_within_s it fails the request instead, and the decode side frees its preallocation once told."""
    from keel.disagg import engine_side

    monkeypatch.setattr(engine_side, "SEND_WITHIN", 1e-9)  # the deadline passes before any prefill ends
    model, _ = tiny_model("llama3")
    prefill, decode = closing(*_pair(model, page_size=4))
    written = []
    write = prefill.disagg.agent.write
    monkeypatch.setattr(prefill.disagg.agent, "write", lambda *a: (written.append(a), write(*a))[1])
    _assert_every_request_fails(prefill, decode, _work(3, seed=9), "after the decode server's deadline")
    assert not written


def test_a_transfer_that_never_finishes_is_given_up_on(tiny_model, closing, monkeypatch):
    """A decode server gone mid-transfer leaves the transfer in progress for good: past the timeout the prefill
    side ends the request with an error and frees its pages; the decode side frees its preallocation once told."""
    from keel.disagg.kv_transfer import Transfer, TransferState

    model, _ = tiny_model("llama3")
    prefill, decode = closing(*_pair(model, page_size=4))
    prefill.disagg.transfer_timeout_s = 0.0
    agent = prefill.disagg.agent
    monkeypatch.setattr(agent, "write",
                        lambda peer, note, plan: Transfer(note, peer, None, TransferState.IN_PROGRESS, 0))
    monkeypatch.setattr(agent, "poll", lambda transfer: transfer.state)
    _assert_every_request_fails(prefill, decode, _work(3, seed=9), "did not finish within 0 s")


# Hybrid sliding-window pools: a tiny Qwen2 whose second layer slides (window 8) and a window pool of kv_plan's floor,
# a prefill chunk and two windows (36 tokens at page size 1, 48 at 4), so prompts can be longer than the window pool
# and a decode server can hold their KV only if it takes window KV for their last window alone.
HYBRID = dict(chunked_prefill_size=16, max_prefill_tokens=16, swa_full_tokens_ratio=0.05, kv_cache_tokens=400)


def _hybrid_pair(model, page_size: int = 4, **options) -> tuple[EngineCore, EngineCore]:
    prefill, decode = _pair(model, page_size, **{**HYBRID, **options})
    assert decode.kv_cache.swa is not None and decode.kv_cache.window == 8
    return prefill, decode


@pytest.mark.parametrize("page_size", [1, 4])
def test_hybrid_pool_requests_get_what_one_engine_gives_them(tiny_model, closing, page_size):
    """Prompts shorter and longer than the window, greedy and sampled; then conversations continuing them (prefix-
    cache hits, with their window KV, on both sides) and a prompt sharing the start of the longest, whose cached
    pages kept no window KV on either side (tombstones, which must not be reused)."""
    model, _ = tiny_model("qwen2-window")
    # a window pool roomy enough to keep the first turns' window KV cached for the second
    prefill, decode = closing(*_hybrid_pair(model, page_size, swa_full_tokens_ratio=0.5))
    first = _work(6, seed=30 + page_size, lengths=[5, 40, 9, 23, 61, 14])  # window 8
    results = list(_route(prefill, decode, first).values())
    second = [(p + r.tokens + [7, 8, 9], s) for (p, s), r in zip(first, results)]
    tombstoned = first[4][0][:30] + [1, 2, 3]
    second.append((tombstoned, first[1][1]))
    for core in (prefill, decode):  # its first 30 tokens' full pages are cached on both sides
        assert len(core.kv_cache.radix.match_prefix(tombstoned).pages) >= 30 // page_size
    results += _route(prefill, decode, second).values()
    solo = _solo(model, first + second, page_size)
    for i, result in enumerate(results):
        assert result.finish == "length" and result.error is None
        assert result.tokens == solo[i], f"request {i}"
    assert all(r.prefill_cached and r.decode_cached for r in results[len(first):-1])
    assert results[-1].decode_cached == 0 and results[-1].prefill_cached == 0  # but not their window KV
    _assert_clean(prefill, decode)


def test_hybrid_pool_aborts_and_failed_transfers_free_both_pools(tiny_model, closing, monkeypatch):
    monkeypatch.setenv("KEEL_DEBUG_FAIL_KV_TRANSFER_EVERY", "4")
    model, _ = tiny_model("qwen2-window")
    work = _work(12, seed=40, lengths=[45, 7, 30, 60, 12, 3, 52, 20, 9, 38, 16, 57])
    work = [(p, dataclasses.replace(s, max_new_tokens=8)) for p, s in work]
    abort = {1: "queued", 3: "prefilling", 6: "decoding", 9: "prefilling", 10: "decoding", 11: "queued"}
    # a decode pool of 40 pages (12 of window KV): preallocation waits for room
    prefill, decode = closing(*_hybrid_pair(model, kv_cache_tokens=160))
    results = _route(prefill, decode, work, abort)
    solo = _solo(model, work, page_size=4)
    failed = [i for i, r in results.items() if r.error is not None]
    assert failed and all("failed to start" in results[i].error for i in failed)
    for i, result in results.items():
        if i in abort:
            assert result.finish == "abort"
        elif i not in failed:
            assert result.finish == "length" and result.tokens == solo[i], f"request {i}"
    _assert_clean(prefill, decode)


@pytest.mark.parametrize("kind", ["qwen2-window", "mistral"])
def test_only_the_last_window_kv_travels_and_decoding_reads_it(tiny_model, closing, monkeypatch, kind):
    """A prompt longer than the window pool (Qwen2 with one sliding layer; Mistral, whose layers all slide): the
    decode server takes window KV for the first decode step's window alone, the prefill server writes its own KV of
    those positions there (without it they would hold zeros), and decoding goes on as on one engine."""
    model, _ = tiny_model(kind)
    # a model whose layers all slide has no full K/V: kv_cache_tokens sizes its window pool
    prefill, decode = closing(*_hybrid_pair(model, **({"kv_cache_tokens": 48} if kind == "mistral" else {})))
    agent, plans = prefill.disagg.agent, []
    write = agent.write
    monkeypatch.setattr(agent, "write", lambda peer, note, plan: (plans.append(plan), write(peer, note, plan))[1])
    window_pool = decode.kv_cache.swa.allocator
    prompt, params = _work(1, seed=50, lengths=[57])[0]
    params = dataclasses.replace(params, max_new_tokens=8)
    assert window_pool.capacity * 4 < len(prompt)
    destination = decode.preallocate(prompt, params)
    # its 15 pages; the first decode step (position 57) reads positions 50.. (window 8): pages 12 to 14
    assert (len(destination.pages), destination.window_page, len(destination.swa_pages)) == (15, 12, 3)
    assert window_pool.capacity - window_pool.num_free == 3
    prefill.add_request(prompt, params, kv_destination=destination)
    while not (arrived := decode.step()):  # until the KV and the first token have landed (no decode step yet)
        assert all(out.error is None for out in prefill.step())
    tokens = arrived[0].token_ids
    (plan,) = plans
    assert plan.dst_swa == destination.swa_pages and plan.dst_full == destination.pages
    sent, landed = prefill.runner.kv_pool, decode.runner.kv_pool
    for part in ("swa_k_cache", "swa_v_cache"):
        src, dst = getattr(sent, part), getattr(landed, part)
        for src_page, dst_page in zip(plan.src_swa, plan.dst_swa):
            kv = src[:, src_page * 4:(src_page + 1) * 4]
            assert kv.abs().sum() > 0 and torch.equal(dst[:, dst_page * 4:(dst_page + 1) * 4], kv)
    while decode.has_work:
        tokens += [t for out in decode.step() for t in out.token_ids]
    assert tokens == _solo(model, [(prompt, params)], page_size=4)[0]
    _assert_clean(prefill, decode)
