import pytest
import torch

from keel.cache.id_allocator import CACHE, KVAccountingError, OwnedIdAllocator
from keel.cache.page_allocator import PageAllocator


def owners(owner: int, n: int) -> torch.Tensor:
    return torch.full((n,), owner, dtype=torch.int64)


def test_alloc_hands_out_free_ids_only_and_never_id_zero():
    alloc = OwnedIdAllocator(9, "page")
    a = alloc.alloc(owners(1, 3))
    b = alloc.alloc(owners(2, 5))
    assert alloc.num_free == 0
    taken = torch.cat([a, b]).tolist()
    assert sorted(taken) == list(range(1, 9))
    assert alloc.alloc(owners(3, 1)) is None  # nothing taken on failure
    assert alloc.owner_of(a).tolist() == [1, 1, 1]


def test_ids_freed_by_several_owners_come_back_lowest_first_as_one_run():
    """A churned pool still hands out consecutive runs (a disaggregated server sends one KV descriptor per run)."""
    alloc = OwnedIdAllocator(17, "page")
    a, b, c = alloc.alloc(owners(1, 4)), alloc.alloc(owners(2, 4)), alloc.alloc(owners(3, 4))
    assert a.tolist() == [1, 2, 3, 4] and c.tolist() == [9, 10, 11, 12]
    alloc.free(b, 2)
    alloc.free(a, 1)
    assert alloc.alloc(owners(4, 8)).tolist() == list(range(1, 9))


def test_failed_alloc_takes_nothing():
    alloc = OwnedIdAllocator(5, "page")
    assert alloc.alloc(owners(1, 5)) is None
    assert alloc.num_free == 4
    alloc.check_consistent()


def test_double_free_raises_and_names_both_owners():
    alloc = OwnedIdAllocator(5, "page")
    ids = alloc.alloc(owners(7, 2))
    alloc.free(ids, 7)
    with pytest.raises(KVAccountingError, match=r"double free: owner 7 tried to free page \d, which is free"):
        alloc.free(ids, 7)


def test_foreign_free_raises_and_changes_nothing():
    alloc = OwnedIdAllocator(6, "page")
    mine = alloc.alloc(owners(1, 2))
    theirs = alloc.alloc(owners(2, 2))
    with pytest.raises(KVAccountingError, match=r"foreign free: owner 1 tried to free page \d, which is owner 2"):
        alloc.free(torch.cat([mine, theirs[:1]]), 1)
    assert alloc.owner_of(mine).tolist() == [1, 1]  # the call freed nothing, not even its own pages
    assert alloc.num_free == 1
    alloc.check_consistent()


def test_freeing_the_same_id_twice_in_one_call_raises():
    alloc = OwnedIdAllocator(6, "page")
    ids = alloc.alloc(owners(1, 2))
    with pytest.raises(KVAccountingError, match="twice in one call"):
        alloc.free(torch.cat([ids, ids[:1]]), 1)


def test_reserved_id_zero_cannot_be_freed():
    alloc = OwnedIdAllocator(4, "page")
    with pytest.raises(KVAccountingError, match="reserved"):
        alloc.free(torch.tensor([0]), 1)


def test_owners_must_be_positive():
    with pytest.raises(KVAccountingError):
        OwnedIdAllocator(4, "page").alloc(owners(0, 1))


def test_mixed_owner_alloc_and_counts():
    alloc = OwnedIdAllocator(10, "page")
    ids = alloc.alloc(torch.tensor([3, 3, 4, 5, 5, 5]))
    assert alloc.owned_counts() == {3: 2, 4: 1, 5: 3}
    alloc.free(ids[2:3], 4)
    assert alloc.owned_counts() == {3: 2, 5: 3}


def test_transfer_checks_the_giver_and_changes_the_owner():
    alloc = OwnedIdAllocator(6, "page")
    ids = alloc.alloc(owners(1, 2))
    with pytest.raises(KVAccountingError, match="foreign transfer"):
        alloc.transfer(ids, 2, CACHE)
    alloc.transfer(ids, 1, CACHE)
    assert alloc.owner_of(ids).tolist() == [CACHE, CACHE]
    with pytest.raises(KVAccountingError, match="foreign free: owner 1 tried to free page"):
        alloc.free(ids, 1)
    alloc.free(ids, CACHE)
    alloc.check_consistent()


def test_page_allocator_page_math():
    pages = PageAllocator(num_pages=4, page_size=16)
    assert pages.capacity == 4
    assert pages.pages_for(torch.tensor([0, 1, 16, 17, 32])).tolist() == [0, 1, 1, 2, 2]


class FakeEvent:
    """A device event the test fires by hand."""

    def __init__(self) -> None:
        self.fired = False
        self.waited = False

    def query(self) -> bool:
        return self.fired

    def synchronize(self) -> None:
        self.waited = True
        self.fired = True


def free_under_fence(alloc: OwnedIdAllocator, ids: torch.Tensor, owner: int, fired: bool = False) -> FakeEvent:
    """Free `ids` while a forward (the returned event) may still read them."""
    event = FakeEvent()
    event.fired = fired
    alloc.fence = event
    alloc.free(ids, owner)
    return event


def test_ids_freed_under_a_fence_are_not_reused_until_it_fires():
    alloc = OwnedIdAllocator(5, "page")
    first = alloc.alloc(owners(1, 2))
    alloc.alloc(owners(2, 2))
    event = free_under_fence(alloc, first, 1)
    assert alloc.num_free == 2 and alloc.num_fenced == 2  # available, but not on the free list yet
    alloc.check_consistent()
    with pytest.raises(KVAccountingError, match="double free.*waiting for a forward"):
        alloc.free(first, 1)
    event.fired = True
    again = alloc.alloc(owners(3, 1))  # the forward finished: reclaimed without waiting
    assert not event.waited and again.tolist()[0] in first.tolist() and alloc.num_fenced == 0
    alloc.check_consistent()


def test_alloc_that_needs_fenced_ids_waits_for_their_forward():
    alloc = OwnedIdAllocator(3, "row")
    event = free_under_fence(alloc, alloc.alloc(owners(1, 2)), 1)
    assert alloc.alloc(owners(2, 3)) is None  # more than free + fenced: nothing taken, nothing waited for
    assert not event.waited
    assert sorted(alloc.alloc(owners(2, 2)).tolist()) == [1, 2]
    assert event.waited  # the ids came back only after their forward had finished
    alloc.check_consistent()


def test_free_after_the_fence_fired_is_immediate():
    alloc = OwnedIdAllocator(3, "page")
    free_under_fence(alloc, alloc.alloc(owners(1, 1)), 1, fired=True)
    assert alloc.num_fenced == 0 and alloc.num_free == 2


def test_consistency_check_catches_a_free_list_holding_an_id_twice():
    """The free list names one id twice and leaves another out, counts intact: only a distinctness check sees it."""
    alloc = OwnedIdAllocator(6, "page")
    alloc.check_consistent()
    alloc._free[0] = alloc._free[1]
    with pytest.raises(KVAccountingError, match="free list disagrees"):
        alloc.check_consistent()
