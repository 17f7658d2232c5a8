"""Speculative decoding on a disaggregated decode server: the drafter's state (a draft model's or EAGLE head's K/V,
the head's input features) travels with the prompt's KV, so the decode server drafts exactly as a single
speculative engine does: the same tokens (the target's, as without speculation) and the same accepted drafts."""

from __future__ import annotations

import dataclasses

import pytest

import keel
from tests.disagg.test_engine_side import _assert_clean, _pair, _route, _work

pytest.importorskip("nixl_cu13")


def _greedy_work(n: int, seed: int) -> list[tuple[list[int], keel.SamplingParams]]:
    work = _work(n, seed, lengths=[3, 9, 17, 30, 41, 6][:n])
    work.append(([7, 8, 9, 10, 11] * 6, keel.SamplingParams()))  # repeats itself: n-grams find it
    return [(prompt, dataclasses.replace(params, temperature=0.0, seed=None, max_new_tokens=14, ignore_eos=True))
            for prompt, params in work]


@pytest.mark.parametrize("drafter", ["ngram", "self", "noisy", "eagle3", "eagle"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_the_decode_server_drafts_as_one_speculative_engine(drafter, page_size, drafters, tiny_model, closing):
    model, _ = tiny_model("llama3")
    # drafting on every step: with back-off, when a request drafts depends on the steps it shared with others
    options = dict(drafters[drafter], disable_speculative_backoff=True)
    work = _greedy_work(6, seed=31)
    alone = keel.Engine(str(model), device="cpu", dtype="float32", page_size=page_size, **options)
    expected = alone.generate([p for p, _ in work], [s for _, s in work])
    prefill, decode = closing(*_pair(model, page_size, **options))
    results = _route(prefill, decode, work)
    assert [results[i].tokens for i in range(len(work))] == [o.token_ids for o in expected]
    assert [results[i].accepted for i in range(len(work))] == [o.spec_accepted_tokens for o in expected]
    if drafter == "self":  # the target drafting for itself: every draft is accepted
        assert all(results[i].accepted > 0 for i in range(len(work)))
    _assert_clean(prefill, decode)


def test_servers_with_different_drafters_are_refused(drafters, tiny_model, closing):
    from keel.disagg.kv_transfer import TransferError

    model, _ = tiny_model("llama3")
    prefill, _ = closing(*_pair(model, 1))
    _, decode = closing(*_pair(model, 1, **drafters["eagle3"]))
    with pytest.raises(TransferError, match="does not match"):
        prefill.connect_kv_peer(decode.kv_peer_info())
