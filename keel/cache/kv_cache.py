"""KVCacheManager: the single owner of per-request KV bookkeeping.

It hands out request rows, grows a request's KV page by page, and releases everything a
request holds in one call. Per row it keeps, on the host, the KV length and the page of each
page-sized block of positions; the device request->token table mirrors them at token
granularity for the attention kernels. Releasing twice, or releasing another owner's row or
pages, raises (see OwnedIdAllocator).
"""

from __future__ import annotations

from typing import Optional

import torch

from keel.cache.id_allocator import KVAccountingError, OwnedIdAllocator
from keel.cache.page_allocator import PageAllocator
from keel.cache.req_table import ReqToTokenTable


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, max_requests: int, context_length: int,
                 device: torch.device) -> None:
        self.page_size = page_size
        self.context_length = context_length
        self.pages = PageAllocator(num_pages, page_size)
        self.rows = OwnedIdAllocator(max_requests + 1, "request row")  # + the padding row 0
        self.table = ReqToTokenTable(max_requests, context_length, device)
        max_pages_per_row = (context_length + page_size - 1) // page_size
        self._page_table = torch.zeros(max_requests + 1, max_pages_per_row, dtype=torch.int64)
        self._kv_lens = torch.zeros(max_requests + 1, dtype=torch.int64)

    @property
    def capacity_tokens(self) -> int:
        return self.pages.capacity * self.page_size

    def assign_row(self, owner: int) -> Optional[int]:
        """A fresh row for `owner`, its mappings reset; None if every row is taken."""
        rows = self.rows.alloc(torch.tensor([owner]))
        if rows is None:
            return None
        row = int(rows[0])
        self._page_table[row] = 0
        self._kv_lens[row] = 0
        return row

    def kv_len(self, row: int) -> int:
        return int(self._kv_lens[row])

    def grow(self, rows: torch.Tensor, owners: torch.Tensor, new_lens: torch.Tensor) -> Optional[torch.Tensor]:
        """Extend each row's KV to `new_lens` tokens; returns the new positions' slots.

        Slots come back row by row, positions ascending (the order of the batch's new tokens).
        Returns None, allocating nothing, when the pool has too few free pages.
        """
        old_lens = self._kv_lens[rows]
        if torch.unique(rows).numel() != rows.numel():
            raise KVAccountingError(f"grow() got a row twice: {rows.tolist()}")
        if bool((self.rows.owner_of(rows) != owners).any()):
            raise KVAccountingError(f"grow() on rows {rows.tolist()} not owned by {owners.tolist()}")
        if bool((new_lens < old_lens).any()):
            raise ValueError("grow() cannot shrink a request's KV")
        if rows.numel() and int(new_lens.max()) > self.context_length:
            raise ValueError(f"a request would hold {int(new_lens.max())} tokens, more than the context "
                             f"length {self.context_length}")
        have = self.pages.pages_for(old_lens)
        extra = self.pages.pages_for(new_lens) - have
        new_pages = self.pages.alloc(owners.repeat_interleave(extra))
        if new_pages is None:
            return None
        self._page_table[rows.repeat_interleave(extra), have.repeat_interleave(extra) + _ranges(extra)] = new_pages
        counts = new_lens - old_lens
        token_rows = rows.repeat_interleave(counts)
        positions = old_lens.repeat_interleave(counts) + _ranges(counts)
        slots = self._page_table[token_rows, positions // self.page_size] * self.page_size + positions % self.page_size
        self._kv_lens[rows] = new_lens
        self.table.write(token_rows, positions, slots)
        return slots

    def release(self, row: int, owner: int) -> None:
        """Free the row and every page it holds. The one release path for a request's KV."""
        num_pages = int(self.pages.pages_for(self._kv_lens[row]))
        self.pages.free(self._page_table[row, :num_pages], owner)
        self.rows.free(torch.tensor([row]), owner)
        self._kv_lens[row] = 0

    def check_consistent(self) -> None:
        """Every page held by a row's owner appears in that row's page table, and nowhere else."""
        self.pages.check_consistent()
        self.rows.check_consistent()
        held = self.pages.owned_counts()
        row_owner = self.rows.owner_of(torch.arange(self.rows.size))
        for row in (row_owner > 0).nonzero().flatten().tolist():
            owner = int(row_owner[row])
            num_pages = int(self.pages.pages_for(self._kv_lens[row]))
            pages = self._page_table[row, :num_pages]
            if bool((self.pages.owner_of(pages) != owner).any()):
                raise KVAccountingError(f"row {row} lists pages not owned by its owner {owner}")
            if held.pop(owner, 0) != num_pages:
                raise KVAccountingError(f"owner {owner} holds pages beyond those in its row {row}")
        if held:
            raise KVAccountingError(f"pages held by owners with no request row: {held}")


def _ranges(counts: torch.Tensor) -> torch.Tensor:
    """concat(arange(c) for c in counts), vectorized."""
    total = int(counts.sum()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total, dtype=torch.int64) - starts.repeat_interleave(counts)
