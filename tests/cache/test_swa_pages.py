"""The hybrid pool's SWA pages and full->SWA map, alone and inside KVCacheManager and the radix cache."""

import pytest
import torch

from keel.cache.id_allocator import CACHE, KVAccountingError
from keel.cache.kv_cache import KVCacheManager
from keel.cache.swa_pages import SwaPages
from keel.debug import invariants
from keel.debug.guards import DISABLE_ENV

CPU = torch.device("cpu")


def hybrid(num_pages=64, num_swa_pages=16, page_size=4, window=6, prefix_cache=True):
    return KVCacheManager(num_pages, page_size, 4, 128, CPU, prefix_cache=prefix_cache, num_swa_pages=num_swa_pages,
                          window=window)


def problems(kv: KVCacheManager) -> list[str]:
    """The invariant checker's page, radix and SWA findings (no scheduler: these managers hold no requests'
    queues)."""
    found = invariants._page_problems(kv) + invariants._swa_problems(kv, kv.swa, device_table=True)
    return found + (invariants._radix_problems(kv, kv.radix) if kv.radix is not None else [])


def tensor(values):
    return torch.tensor(values, dtype=torch.int64)


def test_attach_sets_and_detach_clears_the_map_in_one_call():
    swa = SwaPages(num_full_pages=8, num_swa_pages=4, page_size=2, device=CPU)
    assert swa.attach(tensor([3, 5]), tensor([7, 7]))
    assert swa.present(tensor([3, 5, 4])).tolist() == [True, True, False]
    assert (swa.allocator.owner_of(swa.map[tensor([3, 5])]) == 7).all()
    assert torch.equal(swa.device_map.pages.long(), swa.map)
    assert swa.detach(tensor([3, 4]), 7) == 1  # page 4 has none: nothing to free
    assert swa.map[3] == 0 and swa.detach(tensor([3]), 7) == 0  # cleared: a second detach frees nothing
    assert torch.equal(swa.device_map.pages.long(), swa.map)
    with pytest.raises(KVAccountingError, match="foreign free"):
        swa.detach(tensor([5]), 8)
    assert not swa.attach(tensor([1, 2, 6, 7]), tensor([9, 9, 9, 9]))  # 3 left: nothing taken
    assert swa.allocator.num_free == 3


def test_a_full_page_handed_out_still_mapped_is_refused():
    swa = SwaPages(num_full_pages=8, num_swa_pages=4, page_size=1, device=CPU)
    assert swa.attach(tensor([2]), tensor([1]))
    with pytest.raises(KVAccountingError, match="full page 2 was handed out still mapped"):
        swa.attach(tensor([2]), tensor([1]))


def test_with_the_guard_off_a_stale_mapping_frees_another_owners_page(monkeypatch):
    """Seed 002 in miniature: the entry outlives its SWA page, which goes to someone else; freeing the full page
    again frees that page. The allocator catches the foreign free."""
    monkeypatch.setenv(DISABLE_ENV, "mapping-reset")
    swa = SwaPages(num_full_pages=8, num_swa_pages=1, page_size=1, device=CPU)
    assert swa.attach(tensor([2]), tensor([1]))
    swa.detach(tensor([2]), 1)  # the window KV went out of the window; the entry stays
    assert swa.attach(tensor([3]), tensor([2]))  # owner 2 gets the same SWA page
    with pytest.raises(KVAccountingError, match="foreign free"):
        swa.detach(tensor([2]), 1)  # owner 1 finishes


@pytest.mark.parametrize("page_size", [1, 4])
def test_pages_behind_the_window_go_back_and_release_frees_both_pools(page_size):
    kv = hybrid(page_size=page_size, num_swa_pages=64, window=6)
    assert kv.admit(1, kv.match_prefix([]))
    kv.grow([1], [20])
    pages = kv.row_pages(1)
    assert bool(kv.swa.present(pages).all())
    kv.free_out_of_window([1], [20])  # the next token (position 20) sees keys 15..20
    kept = kv.swa.present(pages)
    first_needed = 15 // page_size
    assert not bool(kept[:first_needed].any()) and bool(kept[first_needed:].all())
    assert problems(kv) == []
    kv.grow([1], [23])
    kv.truncate([1], [21])
    assert problems(kv) == []
    kv.release(1)
    assert kv.pages.num_free == kv.pages.capacity and kv.swa.allocator.num_free == kv.swa.allocator.capacity
    assert int(kv.swa.map.count_nonzero()) == 0


def test_grow_takes_nothing_when_the_sliding_window_pool_is_short():
    kv = hybrid(num_swa_pages=3, page_size=4, window=6, prefix_cache=False)
    assert kv.admit(1, kv.match_prefix([]))
    assert kv.grow([1], [16]) is None  # 4 pages, 3 SWA pages
    assert kv.pages.num_free == kv.pages.capacity and kv.kv_len(1) == 0
    assert kv.grow([1], [12]) is not None
    kv.free_out_of_window([1], [12])  # keys 7.. : page 0 goes back
    assert kv.grow([1], [16]) is not None
    assert problems(kv) == []
    kv.release(1)


def finish(kv: KVCacheManager, owner: int, tokens: list[int], first_query: int) -> None:
    """Admit `owner` with its cached prefix, grow to all of `tokens`, let its window move to `first_query`, and
    release it into the cache."""
    assert kv.admit(owner, kv.match_prefix(tokens))
    kv.grow([owner], [len(tokens)])
    kv.free_out_of_window([owner], [first_query])
    kv.release(owner, tokens)


@pytest.mark.parametrize("window", [1, 3, 4, 6, 9])
def test_a_cached_prefix_is_used_only_as_far_as_its_window_kv_reaches(window):
    page_size = 4
    kv = hybrid(page_size=page_size, num_swa_pages=64, window=window)
    tokens = list(range(100, 140))  # 10 pages
    finish(kv, 1, tokens, first_query=40)  # SWA kept from position 40 - window + 1 on
    present = kv.swa.present(tensor(kv.radix.match_prefix(tokens).pages))  # the tree's, before truncation
    assert problems(kv) == []
    for end in range(1, 11):  # a request whose prompt shares the first `end` pages
        match = kv.match_prefix(tokens[:end * page_size] + [999])
        usable = len(match.pages)
        # brute force: the longest e <= end whose keys from e * page_size - window + 1 on all have SWA pages
        expected = max(e for e in range(end + 1)
                       if all(present[p] for p in range(max(0, e * page_size - window + 1) // page_size, e)))
        assert usable == expected, (window, end)


def test_sliding_window_eviction_leaves_tombstones_and_spares_locked_nodes():
    kv = hybrid(page_size=2, num_swa_pages=12, window=3)
    finish(kv, 1, list(range(10)), first_query=9)  # keeps SWA of the last 2 pages (keys 7..9)
    finish(kv, 2, list(range(50, 60)), first_query=9)
    assert kv.radix.evictable_swa_pages == 4 and problems(kv) == []
    locked = kv.match_prefix(list(range(50, 61)))
    assert len(locked.pages) == 5
    assert kv.admit(3, locked)  # locks the second prompt's path
    assert kv.radix.evict_swa(10) == 2  # only the unlocked node's window KV
    assert problems(kv) == []
    assert kv.match_prefix(list(range(11))).pages == kv.match_prefix(list(range(2))).pages == []
    assert len(kv.match_prefix(list(range(50, 61))).pages) == 5
    kv.release(3)
    assert kv.flush_cache() == 10 and kv.swa.allocator.num_free == kv.swa.allocator.capacity
    assert problems(kv) == []


def test_a_request_revives_a_tombstone_with_its_own_window_kv():
    """Two requests compute the same prompt; the first one's copy lost its window KV in the cache; the second
    inserts the same tokens: the tree keeps its full pages and adopts the second one's SWA pages."""
    kv = hybrid(page_size=2, num_swa_pages=16, window=3)
    tokens = list(range(8))
    assert kv.admit(2, kv.match_prefix([]))  # starts before the first one is cached
    kv.grow([2], [8])
    finish(kv, 1, tokens, first_query=8)
    kv.radix.evict_swa(16)
    assert kv.match_prefix(tokens).pages == []  # tombstones only
    kv.cache_prefix(2, tokens)  # the second one shares its finished pages
    assert problems(kv) == []
    assert len(kv.match_prefix(tokens + [99]).pages) == 4
    kv.release(2)
    assert problems(kv) == []
    kv.flush_cache()
    assert kv.swa.allocator.num_free == kv.swa.allocator.capacity and int(kv.swa.map.count_nonzero()) == 0


def test_evicting_a_node_frees_its_window_kv_too():
    kv = hybrid(num_pages=6, page_size=2, num_swa_pages=6, window=3)
    finish(kv, 1, list(range(10)), first_query=9)
    assert kv.swa.allocator.num_free == 4
    assert kv.admit(2, kv.match_prefix([]))
    assert kv.grow([2], [12]) is not None  # needs all 6 full pages: the cached ones are evicted
    assert problems(kv) == []
    assert CACHE not in kv.swa.allocator.owned_counts()
    kv.release(2)
