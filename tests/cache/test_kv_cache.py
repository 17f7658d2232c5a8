import pytest
import torch

from keel.cache.id_allocator import KVAccountingError
from keel.cache.kv_cache import KVCacheManager

CPU = torch.device("cpu")


def grow(kv: KVCacheManager, rows: list[int], owners: list[int], new_lens: list[int]):
    return kv.grow(torch.tensor(rows), torch.tensor(owners), torch.tensor(new_lens))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_slots_follow_pages_and_table_mirrors_them(page_size):
    kv = KVCacheManager(num_pages=64, page_size=page_size, max_requests=4, context_length=128, device=CPU)
    r1, r2 = kv.assign_row(1), kv.assign_row(2)
    first = grow(kv, [r1, r2], [1, 2], [5, page_size + 1])
    second = grow(kv, [r1, r2], [1, 2], [6, page_size + 3])
    assert first.numel() == 5 + page_size + 1 and second.numel() == 1 + 2
    for row, owner, length in [(r1, 1, 6), (r2, 2, page_size + 3)]:
        slots = kv.table.slots[row, :length].long()
        pages = slots // page_size
        # consecutive positions share a page until a page boundary; offsets inside a page follow positions
        assert (slots % page_size == torch.arange(length) % page_size).all()
        assert (pages[::page_size].repeat_interleave(page_size)[:length] == pages).all()
        assert (kv.pages.owner_of(pages) == owner).all()
        assert (pages > 0).all()  # page 0 is never handed out
    all_slots = torch.cat([kv.table.slots[r1, :6], kv.table.slots[r2, :page_size + 3]])
    assert all_slots.unique().numel() == all_slots.numel()
    kv.check_consistent()
    kv.release(r1, 1)
    kv.release(r2, 2)
    assert kv.pages.num_free == kv.pages.capacity and kv.rows.num_free == kv.rows.capacity


def test_grow_returns_none_and_allocates_nothing_when_pool_is_short():
    kv = KVCacheManager(num_pages=3, page_size=4, max_requests=2, context_length=64, device=CPU)
    r1, r2 = kv.assign_row(1), kv.assign_row(2)
    assert grow(kv, [r1], [1], [8]) is not None
    assert grow(kv, [r1, r2], [1, 2], [9, 4]) is None  # needs 2 pages, 1 free
    assert kv.kv_len(r1) == 8 and kv.kv_len(r2) == 0
    assert kv.pages.num_free == 1
    kv.check_consistent()
    kv.release(r1, 1)
    kv.release(r2, 2)


def test_release_twice_raises():
    kv = KVCacheManager(num_pages=8, page_size=2, max_requests=2, context_length=16, device=CPU)
    row = kv.assign_row(5)
    grow(kv, [row], [5], [3])
    kv.release(row, 5)
    with pytest.raises(KVAccountingError):
        kv.release(row, 5)


def test_release_by_wrong_owner_raises_and_keeps_state():
    kv = KVCacheManager(num_pages=8, page_size=2, max_requests=2, context_length=16, device=CPU)
    row = kv.assign_row(5)
    grow(kv, [row], [5], [3])
    with pytest.raises(KVAccountingError, match="foreign free"):
        kv.release(row, 6)
    assert kv.kv_len(row) == 3
    kv.check_consistent()
    kv.release(row, 5)


def test_grow_on_someone_elses_row_raises():
    kv = KVCacheManager(num_pages=8, page_size=2, max_requests=2, context_length=16, device=CPU)
    row = kv.assign_row(5)
    with pytest.raises(KVAccountingError):
        grow(kv, [row], [6], [2])
    kv.release(row, 5)


def test_rows_run_out_and_recycled_rows_start_empty():
    kv = KVCacheManager(num_pages=8, page_size=2, max_requests=2, context_length=16, device=CPU)
    a, b = kv.assign_row(1), kv.assign_row(2)
    assert kv.assign_row(3) is None
    grow(kv, [a], [1], [5])
    kv.release(a, 1)
    c = kv.assign_row(3)
    assert c == a and kv.kv_len(c) == 0
    grow(kv, [c], [3], [2])
    assert (kv.pages.owner_of(kv.table.slots[c, :2].long() // 2) == 3).all()
    kv.release(c, 3)
    kv.release(b, 2)


def test_growth_past_context_length_is_refused():
    kv = KVCacheManager(num_pages=64, page_size=1, max_requests=1, context_length=8, device=CPU)
    row = kv.assign_row(1)
    with pytest.raises(ValueError, match="context length 8"):
        grow(kv, [row], [1], [9])
    kv.release(row, 1)


def test_table_write_checks_its_extent():
    kv = KVCacheManager(num_pages=4, page_size=1, max_requests=1, context_length=4, device=CPU)
    with pytest.raises(IndexError):
        kv.table.write(torch.tensor([1]), torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(IndexError):
        kv.table.write(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))  # row 0 is the padding row


def test_consistency_check_catches_a_leaked_page():
    kv = KVCacheManager(num_pages=8, page_size=1, max_requests=2, context_length=8, device=CPU)
    kv.pages.alloc(torch.tensor([9]))  # a page held by an owner with no request row
    with pytest.raises(KVAccountingError, match="no request row"):
        kv.check_consistent()
