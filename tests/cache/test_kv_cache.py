import pytest
import torch

from keel.cache.id_allocator import CACHE, KVAccountingError
from keel.cache.kv_cache import KVCacheManager
from keel.cache.radix import PrefixMatch

CPU = torch.device("cpu")
NO_PREFIX = PrefixMatch([], None)


def manager(num_pages=64, page_size=4, max_requests=4, context_length=128, prefix_cache=True) -> KVCacheManager:
    return KVCacheManager(num_pages, page_size, max_requests, context_length, CPU, prefix_cache=prefix_cache)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_slots_follow_pages_and_table_mirrors_them(page_size):
    kv = manager(page_size=page_size)
    assert kv.admit(1, NO_PREFIX) and kv.admit(2, NO_PREFIX)
    first = kv.grow([1, 2], [5, page_size + 1])
    second = kv.grow([1, 2], [6, page_size + 3])
    assert first.numel() == 5 + page_size + 1 and second.numel() == 1 + 2
    for owner, length in [(1, 6), (2, page_size + 3)]:
        slots = kv.table.slots[kv.row(owner), :length].long()
        pages = slots // page_size
        assert (slots % page_size == torch.arange(length) % page_size).all()
        assert (pages[::page_size].repeat_interleave(page_size)[:length] == pages).all()
        assert (kv.pages.owner_of(pages) == owner).all()
        assert (pages > 0).all()  # page 0 is never handed out
    all_slots = torch.cat([kv.table.slots[kv.row(1), :6], kv.table.slots[kv.row(2), :page_size + 3]])
    assert all_slots.unique().numel() == all_slots.numel()
    kv.release(1)
    kv.release(2)
    assert kv.pages.num_free == kv.pages.capacity and kv.rows.num_free == kv.rows.capacity


def test_truncate_frees_the_pages_past_the_committed_length_only():
    kv = manager(num_pages=16, page_size=4)
    for owner in (1, 2):
        assert kv.admit(owner, NO_PREFIX)
    kv.grow([1, 2], [6, 13])  # 2 and 4 pages
    kv.truncate([1, 2], [5, 9])  # 1: same 2 pages; 2: 3 pages, its 4th freed
    assert (kv.kv_len(1), kv.kv_len(2)) == (5, 9) and kv.pages.num_free == 16 - 5
    assert kv.row_pages(2).numel() == 3 and (kv.pages.owner_of(kv.row_pages(2)) == 2).all()
    kv.grow([2], [13])  # grows back onto a fresh page
    with pytest.raises(KVAccountingError, match="outside"):
        kv.truncate([1], [7])  # past what it holds
    kv.release(1, list(range(5)))  # one whole page into the cache
    assert kv.admit(3, kv.match_prefix(list(range(5))))
    kv.grow([3], [6])
    with pytest.raises(KVAccountingError, match="outside"):
        kv.truncate([3], [3])  # into the cached prefix it does not own
    kv.release(2)
    kv.release(3)


def test_grow_returns_none_and_allocates_nothing_when_pool_is_short():
    kv = manager(num_pages=3, page_size=4, max_requests=2, context_length=64, prefix_cache=False)
    kv.admit(1, NO_PREFIX)
    kv.admit(2, NO_PREFIX)
    assert kv.grow([1], [8]) is not None
    assert kv.grow([1, 2], [9, 4]) is None  # needs 2 pages, 1 free
    assert kv.kv_len(1) == 8 and kv.kv_len(2) == 0
    assert kv.pages.num_free == 1
    kv.release(1)
    kv.release(2)


def test_release_twice_raises():
    kv = manager()
    kv.admit(5, NO_PREFIX)
    kv.grow([5], [3])
    kv.release(5)
    with pytest.raises(KVAccountingError, match="released twice"):
        kv.release(5)


def test_admitting_an_owner_twice_raises():
    kv = manager()
    kv.admit(5, NO_PREFIX)
    with pytest.raises(KVAccountingError, match="admitted twice"):
        kv.admit(5, NO_PREFIX)
    kv.release(5)


def test_rows_run_out_and_recycled_rows_start_empty():
    kv = manager(max_requests=2)
    assert kv.admit(1, NO_PREFIX) and kv.admit(2, NO_PREFIX)
    assert not kv.admit(3, NO_PREFIX)
    kv.grow([1], [5])
    row = kv.row(1)
    kv.release(1)
    assert kv.admit(3, NO_PREFIX) and kv.row(3) == row and kv.kv_len(3) == 0
    kv.grow([3], [2])
    assert (kv.pages.owner_of(kv.row_pages(3)) == 3).all()
    kv.release(3)
    kv.release(2)


def test_growth_past_context_length_is_refused():
    kv = manager(context_length=8, page_size=1)
    kv.admit(1, NO_PREFIX)
    with pytest.raises(ValueError, match="context length 8"):
        kv.grow([1], [9])
    kv.release(1)


def test_table_write_checks_its_extent():
    kv = manager(context_length=4)
    with pytest.raises(IndexError):
        kv.table.write(torch.tensor([1]), torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(IndexError):
        kv.table.write(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))  # row 0 is the padding row


def test_finished_kv_goes_to_the_cache_and_is_shared():
    kv = manager(page_size=4)
    tokens = list(range(100, 111))  # 11 tokens: 2 whole pages + 3
    kv.admit(1, NO_PREFIX)
    kv.grow([1], [len(tokens)])
    own = kv.row_pages(1)
    kv.release(1, tokens)
    assert kv.radix.total_pages == 2 and kv.radix.locked_pages == 0
    assert (kv.pages.owner_of(own[:2]) == CACHE).all()  # whole pages handed over
    assert kv.pages.num_free == kv.pages.capacity - 2  # the partial page was freed

    match = kv.match_prefix(tokens[:10] + [7])
    assert match.pages == own[:2].tolist()
    kv.admit(2, match)
    assert kv.kv_len(2) == 8 and kv.radix.locked_pages == 2
    cached_slots = own[:2].repeat_interleave(4) * 4 + torch.arange(8) % 4
    assert torch.equal(kv.table.slots[kv.row(2), :8].long(), cached_slots)
    kv.grow([2], [12])
    kv.release(2)  # aborted: its own page is freed, the cached ones stay cached and unlocked
    assert kv.radix.locked_pages == 0 and kv.radix.evictable_pages == 2
    assert kv.flush_cache() == 2 and kv.pages.num_free == kv.pages.capacity


def test_same_tokens_cached_twice_keep_one_copy():
    kv = manager(page_size=2)
    tokens = [1, 2, 3, 4, 5]
    for owner in (1, 2):  # both computed the prefix themselves, concurrently
        kv.admit(owner, NO_PREFIX)
        kv.grow([owner], [5])
    first_pages = kv.row_pages(1)[:2]
    kv.release(1, tokens)
    kv.cache_prefix(2, tokens)  # the tree already has these tokens: 2 switches to the cached pages
    assert torch.equal(kv.row_pages(2)[:2], first_pages)
    expected = first_pages.repeat_interleave(2) * 2 + torch.arange(4) % 2
    assert torch.equal(kv.table.slots[kv.row(2), :4].long(), expected)  # the device table moved with it
    assert kv.radix.total_pages == 2 and kv.radix.locked_pages == 2
    kv.release(2)
    assert kv.flush_cache() == 2 and kv.pages.num_free == kv.pages.capacity


def test_locked_pages_are_not_evicted():
    kv = manager(num_pages=4, page_size=2, prefix_cache=True)
    kv.admit(1, NO_PREFIX)
    kv.grow([1], [4])
    kv.release(1, [1, 2, 3, 4])
    kv.admit(2, kv.match_prefix([1, 2, 3, 4, 9]))  # locks both cached pages
    kv.admit(3, NO_PREFIX)
    assert kv.grow([3], [6]) is None  # 2 free pages, the cached ones are locked
    assert kv.radix.total_pages == 2
    kv.release(2)
    assert kv.grow([3], [6]) is not None  # now the cache gives them up
    kv.release(3)
