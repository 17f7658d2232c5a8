"""The radix prefix cache: matching at page granularity, splitting, locks, LRU eviction, and sharing end to end."""

from __future__ import annotations

import pytest
import torch

import keel
from keel.cache.id_allocator import CACHE, KVAccountingError
from keel.cache.page_allocator import PageAllocator
from keel.cache.radix import RadixCache
from tests.helpers import hf_greedy, random_prompts

OWNER = 1


def cache_with(page_size: int = 2, num_pages: int = 32) -> RadixCache:
    return RadixCache(PageAllocator(num_pages, page_size))


def insert(cache: RadixCache, tokens: list[int]) -> list[int]:
    """Insert `tokens` (page aligned) with freshly allocated pages; returns the tree's pages for them."""
    pages = cache.allocator.alloc(torch.full((len(tokens) // cache.page_size,), OWNER)).tolist()
    _, tree_pages = cache.insert(tokens, pages, OWNER)
    cache.allocator.free(torch.tensor([p for p, t in zip(pages, tree_pages) if p != t]), OWNER)
    return tree_pages


def test_match_is_page_granular_and_splits_nodes():
    cache = cache_with(page_size=2)
    pages = insert(cache, [1, 2, 3, 4, 5, 6])
    assert cache.match_prefix([9]).pages == []
    assert cache.match_prefix([1, 2, 3]).pages == pages[:1]  # the half page [3] does not count: split after 1
    assert cache.match_prefix([1, 2, 3, 4, 7, 7]).pages == pages[:2]  # split again after 2
    assert [len(n.pages) for n in cache.nodes()] == [1, 1, 1]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).pages == pages
    assert (cache.allocator.owner_of(torch.tensor(pages)) == CACHE).all()
    assert cache.evictable_pages == 3 and cache.locked_pages == 0


def test_inserting_known_tokens_keeps_the_trees_pages():
    cache = cache_with(page_size=2)
    first = insert(cache, [1, 2, 3, 4])
    again = insert(cache, [1, 2, 3, 4, 5, 6])  # shares two pages, adds one
    assert again[:2] == first and cache.total_pages == 3


def test_locks_protect_paths_and_eviction_is_lru():
    cache = cache_with(page_size=1)
    insert(cache, [1, 2, 3])
    insert(cache, [1, 2, 9])  # splits: [1, 2] -> {[3], [9]}
    insert(cache, [5, 6])
    locked = cache.match_prefix([1, 2, 3]).node
    cache.lock(locked)
    assert cache.locked_pages == 3 and cache.evictable_pages == 3
    cache.match_prefix([1, 2, 9])  # touch [9]: [5, 6] is now the least recently used
    assert cache.evict(1) == 2  # a whole leaf goes: [5, 6]
    assert cache.match_prefix([5, 6]).pages == []
    assert cache.evict(10) == 1  # only [9] is unlocked
    assert cache.match_prefix([1, 2, 3]).node is locked
    cache.unlock(locked)
    with pytest.raises(KVAccountingError, match="unlocked more often"):
        cache.unlock(locked)
    assert cache.evict(10) == 3 and cache.total_pages == 0


def test_eviction_takes_the_least_recently_used_unlocked_leaf_through_random_use():
    """The eviction heap is kept across calls, its entries going stale as nodes are touched, locked, split or
    grow children: through random use each evict(1) must still take an unlocked leaf of the oldest access, and
    every unlocked leaf must stay reachable (at the end, all unlocked pages can be evicted)."""
    import random

    rng = random.Random(0)
    cache = cache_with(page_size=1, num_pages=3000)
    locked = []
    for _ in range(4000):
        op = rng.random()
        tokens = [rng.randrange(3) for _ in range(rng.randint(1, 8))]  # few symbols: shared prefixes, splits
        if op < 0.35 and cache.allocator.num_free >= len(tokens):
            insert(cache, tokens)
        elif op < 0.6:
            node = cache.match_prefix(tokens).node
            if node is not cache.root and rng.random() < 0.5:
                cache.lock(node)
                locked.append(node)
        elif op < 0.75 and locked:
            cache.unlock(locked.pop(rng.randrange(len(locked))))
        else:
            leaves = {id(n): n.last_access for n in cache.evictable_leaves()}
            if not leaves:
                continue
            assert cache.evict(1) >= 1
            gone = set(leaves) - {id(n) for n in cache.nodes()}
            assert len(gone) == 1 and leaves[gone.pop()] == min(leaves.values())
        assert {id(n) for n in cache.evictable_leaves()} <= cache.offered()
    for node in locked:
        cache.unlock(node)
    total = cache.total_pages
    assert cache.evict(total) == total and cache.total_pages == 0 and cache.num_nodes == 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_shared_prefix_requests_reuse_cached_pages_and_match_transformers(page_size, tiny_model, make_engine):
    directory, hf_model = tiny_model("qwen2")
    system = random_prompts([37], seed=20)[0]
    prompts = [system + suffix for suffix in random_prompts([3, 9, 1, 14], seed=21)]
    engine = make_engine(directory, page_size=page_size)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    first = engine.generate([prompts[0]], params)[0]
    assert first.num_cached_tokens == 0
    rest = engine.generate(prompts[1:], params)
    shared = 37 // page_size * page_size  # whole pages of the common prefix
    assert [o.num_cached_tokens for o in rest] == [shared] * 3
    for prompt, out in zip(prompts, [first, *rest]):
        assert out.token_ids == hf_greedy(hf_model, prompt, 8)[0]
    again = engine.generate([prompts[0]], params)[0]  # its own prompt and output are cached now
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // page_size * page_size
    assert again.token_ids == first.token_ids


def test_disabled_radix_cache_shares_nothing(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, disable_radix_cache=True)
    prompt = random_prompts([20], seed=22)[0]
    params = keel.SamplingParams(max_new_tokens=2)
    engine.generate([prompt], params)
    assert engine.generate([prompt], params)[0].num_cached_tokens == 0
    assert engine.core.kv_cache.radix is None
