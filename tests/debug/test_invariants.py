"""The invariant checker catches each kind of corruption it promises to (a silent checker proves nothing)."""

from __future__ import annotations

import pytest
import torch

import keel
from keel.debug.invariants import InvariantViolation, check_drained, check_invariants
from tests.helpers import random_prompts


@pytest.fixture
def busy_engine(tiny_model):
    """An engine mid-flight: a cached prefix, two requests decoding (one on the cached prefix), one waiting."""
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), device="cpu", dtype="float32", page_size=4, max_running_requests=2)
    prefix = random_prompts([12], seed=40)[0]
    engine.generate([prefix + [1]], keel.SamplingParams(max_new_tokens=2))
    core = engine.core
    params = keel.SamplingParams(max_new_tokens=50, ignore_eos=True)
    for prompt in (prefix + [5, 6], [7, 8, 9], [10]):
        core.add_request(prompt, params)
    core.step()
    core.step()
    check_invariants(core.scheduler)  # sound before each corruption
    return core


def expect(core, message: str) -> None:
    with pytest.raises(InvariantViolation, match=message):
        check_invariants(core.scheduler)


def test_leaked_page(busy_engine):
    busy_engine.kv_cache.pages.alloc(torch.tensor([999]))
    expect(busy_engine, "owned by 999, who holds no KV")


def test_stale_device_table(busy_engine):
    owner = busy_engine.scheduler.running[0].rid
    busy_engine.kv_cache.table.slots[busy_engine.kv_cache.row(owner), 2] += 1
    expect(busy_engine, f"owner {owner}'s device table maps position 2")


def test_lock_count_off(busy_engine):
    node = next(n for n in busy_engine.kv_cache.radix.nodes() if n.lock_ref)
    node.lock_ref += 1
    expect(busy_engine, "lock count 2, its holders make 1")


def test_radix_counters_off(busy_engine):
    busy_engine.kv_cache.radix.evictable_pages += 1
    expect(busy_engine, "radix counters")


def test_radix_node_count_off(busy_engine):
    busy_engine.kv_cache.radix.num_nodes += 1
    expect(busy_engine, "its count says")


def test_request_in_two_places(busy_engine):
    busy_engine.scheduler.waiting.append(busy_engine.scheduler.running[0])
    expect(busy_engine, "is in 2 places")


def test_page_freed_under_a_running_request(busy_engine):
    owner = busy_engine.scheduler.running[-1].rid
    own_page = busy_engine.kv_cache.row_pages(owner)[-1:]
    busy_engine.kv_cache.pages.free(own_page, owner)  # a free that bypassed the release path
    expect(busy_engine, f"owner {owner}'s row lists pages it does not own")


def test_stray_kv_holder(busy_engine):
    busy_engine.scheduler.running.pop()
    expect(busy_engine, "holds KV but is neither running, chunked nor parked")


@pytest.fixture
def drained_engine(tiny_model):
    """An engine that has served requests and drained, its prefix cache holding their pages."""
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), device="cpu", dtype="float32", page_size=4)
    engine.generate(random_prompts([9, 14], seed=41), keel.SamplingParams(max_new_tokens=3))
    check_drained(engine.core.scheduler)  # sound before each corruption
    return engine.core


def test_unlocked_leaf_missing_from_the_eviction_heap(drained_engine):
    drained_engine.kv_cache.radix._leaves.clear()  # evict() could no longer find the cached prompts' pages
    with pytest.raises(InvariantViolation, match="no live entry in the eviction heap"):
        check_invariants(drained_engine.scheduler)


def test_the_drain_check_counts_a_leaked_page(drained_engine):
    drained_engine.kv_cache.pages.alloc(torch.tensor([999]))
    with pytest.raises(InvariantViolation, match="1 leaked"):
        check_drained(drained_engine.scheduler)


def test_the_drain_check_counts_a_taken_row(drained_engine):
    drained_engine.kv_cache.rows.alloc(torch.tensor([999]))
    with pytest.raises(InvariantViolation, match="1 rows are taken"):
        check_drained(drained_engine.scheduler)


def test_the_drain_check_counts_a_lock_left_behind(drained_engine):
    radix = drained_engine.kv_cache.radix
    radix.lock(next(radix.nodes()))
    with pytest.raises(InvariantViolation, match="cached pages are still locked"):
        check_drained(drained_engine.scheduler)


def test_the_engine_checks_counters_when_it_drains_without_strict_checks(tiny_model, monkeypatch):
    """A leak is caught on the step that drains the engine even with the full recount off."""
    monkeypatch.setenv("KEEL_STRICT_CHECKS", "0")
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), device="cpu", dtype="float32", page_size=4)
    engine.core.add_request([1, 2, 3], keel.SamplingParams(max_new_tokens=2))
    engine.core.kv_cache.pages.alloc(torch.tensor([999]))
    with pytest.raises(InvariantViolation, match="leaked"):
        while engine.core.has_work:
            engine.core.step()
