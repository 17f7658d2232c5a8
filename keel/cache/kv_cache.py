"""KVCacheManager: the single owner of per-request KV bookkeeping.

A request (an owner id) is admitted with a row of the request->token table and, when the
prefix cache has some of its tokens, those cached pages, locked. It grows page by page, and
gives everything back in one call, `release`, on every exit path: on finish its KV goes into
the prefix cache first; on abort, retraction or error it is simply freed. Per row, the host
keeps the KV length and the page of each page-sized block of positions; the device
request->token table mirrors them per token for the attention kernels. Releasing twice, or
releasing pages owned by someone else, raises.

A hybrid model (sliding-window and full layers) also holds SWA pages (`swa`): one per full page
while the page is inside some window still needed. Every path that hands out, frees or moves
full pages does the same to their SWA pages here; `free_out_of_window` returns the SWA pages a
running request has left behind its window, and a cached prefix is used only as far as the
window KV before its end is still there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from keel.cache.id_allocator import CACHE, FenceEvent, KVAccountingError, OwnedIdAllocator
from keel.cache.page_allocator import PageAllocator
from keel.cache.radix import PrefixMatch, RadixCache, RadixNode
from keel.cache.req_table import ReqToTokenTable
from keel.cache.swa_pages import SwaPages
from keel.transfer import host_tensor


@dataclass
class HeldKV:
    """What one admitted request holds."""

    row: int
    lock: Optional[RadixNode]  # deepest prefix-cache node it has locked
    cached_pages: int  # leading pages of its row that belong to the prefix cache (the rest are its own)
    matched_pages: int  # leading pages it reused from the prefix cache when admitted
    cached_window_floor: int = 0  # hybrid pools: cached pages before this one are behind its window, dealt with


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, max_requests: int, context_length: int,
                 device: torch.device, prefix_cache: bool = True, num_swa_pages: int = 0,
                 window: Optional[int] = None) -> None:
        """`window` (the widest sliding window) makes the pool hybrid, with `num_swa_pages` SWA pages."""
        self.page_size = page_size
        self.context_length = context_length
        self.window = window
        self.pages = PageAllocator(num_pages, page_size)
        self.swa = SwaPages(num_pages, num_swa_pages, page_size, device) if window is not None else None
        self.rows = OwnedIdAllocator(max_requests + 1, "request row")  # + the padding row 0
        self.table = ReqToTokenTable(max_requests, context_length, device)
        self.radix: Optional[RadixCache] = RadixCache(self.pages, self.swa) if prefix_cache else None
        self.held: dict[int, HeldKV] = {}
        max_pages_per_row = (context_length + page_size - 1) // page_size
        self._page_table = torch.zeros(max_requests + 1, max_pages_per_row, dtype=torch.int64)
        self._kv_lens = torch.zeros(max_requests + 1, dtype=torch.int64)
        # hybrid: per row, the first page whose SWA page the request may still free (those before it are the
        # cache's, already freed, or never had one)
        self._swa_floor = torch.zeros(max_requests + 1, dtype=torch.int64)
        # The same memory as numpy arrays, for the index arithmetic of grow / truncate, which run every step: on
        # arrays of a few requests a numpy op costs ~1 us against ~5-20 us for a torch one (grow for one request
        # took 0.57 ms in ~25 torch ops).
        self._page_table_view = self._page_table.numpy()
        self._kv_lens_view = self._kv_lens.numpy()
        self._swa_floor_view = self._swa_floor.numpy()

    @property
    def capacity_tokens(self) -> int:
        return self.pages.capacity * self.page_size

    def available_pages(self) -> int:
        """Pages that can be had now: free ones plus those the cache would give up."""
        return self.pages.num_free + (self.radix.evictable_pages if self.radix else 0)

    def available_swa_pages(self) -> int:
        """SWA pages that can be had now (hybrid pools): free ones plus those the cache would give up."""
        assert self.swa is not None
        return self.swa.allocator.num_free + (self.radix.evictable_swa_pages if self.radix else 0)

    def match_prefix(self, tokens: list[int]) -> PrefixMatch:
        """The longest usable cached prefix of `tokens`: on a hybrid pool, as far as the window KV before its end
        is cached too."""
        if self.radix is None:
            return PrefixMatch([], None)
        match = self.radix.match_prefix(tokens)
        if self.swa is None or not match.pages:
            return match
        usable = self._window_complete(host_tensor(match.pages, torch.int64))
        if usable == len(match.pages):
            return match
        return self.radix.match_prefix(tokens[:usable * self.page_size])

    def _window_complete(self, pages: torch.Tensor) -> int:
        """The most leading `pages` a request may reuse: those whose last `window` tokens all have SWA pages (the
        first new token, at position e * page_size, sees keys from e * page_size - window + 1 on)."""
        assert self.swa is not None and self.window is not None
        index = torch.arange(pages.numel())
        last_missing = torch.cummax(torch.where(self.swa.present(pages), -1, index), 0).values
        ends = index + 1  # candidate prefix lengths in pages
        usable = ends[last_missing < self._first_window_page(ends * self.page_size)]
        return int(usable.max()) if usable.numel() else 0

    def admit(self, owner: int, match: PrefixMatch) -> bool:
        """Give `owner` a row holding the matched cached prefix (locked); False if every row is taken."""
        if owner in self.held:
            raise KVAccountingError(f"owner {owner} admitted twice")
        rows = self.rows.alloc(torch.tensor([owner]))
        if rows is None:
            return False
        row = int(rows[0])
        self._page_table[row] = 0  # a recycled row starts with no mapping at all
        num_cached = len(match.pages)
        self._set_pages(row, 0, host_tensor(match.pages, torch.int64))
        self._kv_lens[row] = num_cached * self.page_size
        self._swa_floor[row] = num_cached
        if match.node is not None and self.radix is not None:
            self.radix.lock(match.node)
        self.held[owner] = HeldKV(row, match.node, num_cached, num_cached)
        return True

    def row(self, owner: int) -> int:
        return self._held(owner).row

    def cached_pages(self, owner: int) -> int:
        """Leading pages of `owner`'s row that belong to the prefix cache."""
        return self._held(owner).cached_pages

    def kv_len(self, owner: int) -> int:
        return int(self._kv_lens_view[self._held(owner).row])

    def kv_lens(self, owners: list[int]) -> list[int]:
        """kv_len of each owner, in one read (the scheduler asks for every running request's on every step)."""
        return self._kv_lens_view[self._rows_of(owners)].tolist()

    def grow(self, owners: list[int], new_lens: list[int]) -> Optional[torch.Tensor]:
        """Extend each owner's KV to `new_lens` tokens, evicting cached pages if needed; returns the new
        positions' slots, owner by owner, positions ascending. None, allocating nothing, if short."""
        rows = self._rows_of(owners)
        new = np.array(new_lens, dtype=np.int64)
        old = self._kv_lens_view[rows]
        if (new < old).any():
            raise ValueError("grow() cannot shrink a request's KV")
        if rows.size and int(new.max()) > self.context_length:
            raise ValueError(f"a request would hold {int(new.max())} tokens, more than the context "
                             f"length {self.context_length}")
        have = self.pages.pages_for(old)
        extra = self.pages.pages_for(new) - have
        page_rows, page_index = np.repeat(rows, extra), np.repeat(have, extra) + _ranges(extra)
        page_owners = np.repeat(np.array(owners, dtype=np.int64), extra)
        new_pages = self._alloc_pages(torch.from_numpy(page_owners),
                                      torch.from_numpy(page_index >= self._swa_floor_view[page_rows]))
        if new_pages is None:
            return None
        self._page_table_view[page_rows, page_index] = new_pages.numpy()
        self._kv_lens_view[rows] = new
        token_rows, positions, slots = (torch.from_numpy(a) for a in self._slots_of(rows, old, new))
        self.table.write(token_rows, positions, slots)
        return slots

    def _alloc_pages(self, owners: torch.Tensor, windowed: torch.Tensor) -> Optional[torch.Tensor]:
        """One full page per entry of `owners`, with its SWA page on a hybrid pool where `windowed` (bool) says
        so, evicting cached pages as needed; None, taking nothing, if short."""
        need = owners.numel()
        if self.radix is not None and need > self.pages.num_free:
            self.radix.evict(need - self.pages.num_free)
        need_swa = int(windowed.sum())
        if self.swa is not None and self.radix is not None and need_swa > self.swa.allocator.num_free:
            self.radix.evict_swa(need_swa - self.swa.allocator.num_free)
        if self.swa is not None and need_swa > self.swa.allocator.num_free:
            return None
        new_pages = self.pages.alloc(owners)
        if new_pages is not None and self.swa is not None and not self.swa.attach(new_pages, owners, windowed):
            raise KVAccountingError("the sliding-window pool ran short after its free pages were counted")
        return new_pages

    def free_out_of_window(self, owners: list[int], first_positions: list[int]) -> None:
        """Hybrid pools: return the SWA pages of each owner's own pages that lie wholly before the window of its
        earliest query to come (at position `first_positions[i]`, which sees keys from there - window + 1 on).
        Pages it gets later that lie before that window get no SWA page (a decode server's preallocated prompt:
        only its last window's KV is ever read, and only that is sent to it)."""
        if self.swa is None or not owners:
            return
        assert self.window is not None
        held = [self._held(o) for o in owners]
        rows = host_tensor([h.row for h in held], torch.int64)
        firsts = host_tensor(first_positions, torch.int64)
        floors = self._first_window_page(firsts)
        if self.radix is not None:
            for h, floor in zip(held, floors.tolist()):
                self._free_cached_window(h, floor)
        starts = self._swa_floor[rows]
        counts = torch.clamp(torch.minimum(floors, self.pages.pages_for(self._kv_lens[rows])) - starts, min=0)
        self._swa_floor[rows] = torch.maximum(starts, floors)  # may lie past its pages: grow() gives those none
        if int(counts.sum()) == 0:
            return
        counts_np = counts.numpy()
        pages = self._page_table_view[np.repeat(rows.numpy(), counts_np),
                                      np.repeat(starts.numpy(), counts_np) + _ranges(counts_np)]
        self.swa.detach(torch.from_numpy(pages), host_tensor(owners, torch.int64).repeat_interleave(counts))

    def _free_cached_window(self, held: HeldKV, floor: int) -> None:
        """The SWA pages of `held`'s cached prefix before page `floor` (behind its window), where no other request
        holds them; except the window before the end of the prefix it reused when admitted (where the conversation
        it continues ended: another's next turn would reuse it too). Chunks it cached itself keep none."""
        assert self.radix is not None
        matched_end = torch.tensor(held.matched_pages * self.page_size)
        kept = (int(self._first_window_page(matched_end)), held.matched_pages)
        for start, end in ((0, kept[0]), (kept[1], held.cached_pages)):
            first, last = max(start, held.cached_window_floor), min(end, floor)
            if first < last:
                assert held.lock is not None
                self.radix.free_window_kv(held.lock, first, last)
        held.cached_window_floor = max(held.cached_window_floor, min(floor, held.cached_pages))

    def _first_window_page(self, positions: torch.Tensor) -> torch.Tensor:
        """The first page a query at each of `positions` reads in a sliding-window layer (it sees keys from
        position - window + 1 on)."""
        assert self.window is not None
        return torch.clamp(positions - self.window + 1, min=0) // self.page_size

    def truncate(self, owners: list[int], committed_lens: list[int]) -> None:
        """Shrink each owner's KV to its first committed_lens tokens, freeing the pages wholly past them: the one
        way back for slots allocated beyond what a step committed (rejected draft tokens)."""
        held = [self._held(o) for o in owners]
        rows = np.array([h.row for h in held], dtype=np.int64)
        new_lens = np.array(committed_lens, dtype=np.int64)
        old_lens = self._kv_lens_view[rows]
        cached = np.array([h.cached_pages * self.page_size for h in held], dtype=np.int64)
        if ((new_lens < cached) | (new_lens > old_lens)).any():
            raise KVAccountingError(f"truncate of owners {owners} to {committed_lens} tokens, outside their cached "
                                    f"prefix {cached.tolist()} and KV held {old_lens.tolist()}")
        keep, have = self.pages.pages_for(new_lens), self.pages.pages_for(old_lens)
        extra = have - keep
        if int(extra.sum()):
            page_rows, page_index = np.repeat(rows, extra), np.repeat(keep, extra) + _ranges(extra)
            self._free_pages(torch.from_numpy(self._page_table_view[page_rows, page_index]),
                             torch.from_numpy(np.repeat(np.array(owners, dtype=np.int64), extra)))
            self._page_table_view[page_rows, page_index] = 0
        self._kv_lens_view[rows] = new_lens

    def cache_prefix(self, owner: int, tokens: list[int]) -> None:
        """Put the whole pages of `tokens` (the first tokens of `owner`'s KV) into the prefix cache; it keeps
        running, now on the cached pages (a chunked prompt shares its finished chunks this way)."""
        held = self._held(owner)
        if self.radix is not None:
            self._insert(owner, held, tokens)
            self.free_out_of_window([owner], [len(tokens)])  # the next chunk's queries start after them

    def release(self, owner: int, tokens: Optional[list[int]] = None) -> None:
        """Everything `owner` holds goes back: with `tokens` (its KV's tokens), whole pages go into the prefix
        cache first; the rest is freed. The one release path for a request's KV."""
        held = self.held.get(owner)
        if held is None:
            raise KVAccountingError(f"release of owner {owner}, which holds no KV (released twice?)")
        if tokens is not None and self.radix is not None:
            self._insert(owner, held, tokens)
        row = held.row
        self._free_pages(self.row_pages(owner)[held.cached_pages:], owner)
        self.rows.free(torch.tensor([row]), owner)
        if held.lock is not None and self.radix is not None:
            self.radix.unlock(held.lock)
        del self.held[owner]
        self._kv_lens[row] = 0

    def _free_pages(self, pages: torch.Tensor, owner: Union[int, torch.Tensor]) -> None:
        """Free full pages (and their SWA pages) of `owner`, or each of its entry of an `owner` tensor."""
        if self.swa is not None:
            self.swa.detach(pages, owner)
        self.pages.free(pages, owner)

    def slots(self, owners: list[int], starts: list[int], ends: list[int]) -> torch.Tensor:
        """Host int64 slots of positions [starts[i], ends[i]) of each owner's held KV, owner by owner."""
        rows = self._rows_of(owners)
        starts_a, ends_a = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        if ((starts_a < 0) | (starts_a > ends_a) | (ends_a > self._kv_lens_view[rows])).any():
            raise ValueError(f"positions {list(zip(starts, ends))} of owners {owners}, which hold "
                             f"{self._kv_lens_view[rows].tolist()}")
        return torch.from_numpy(self._slots_of(rows, starts_a, ends_a)[2])

    def _rows_of(self, owners: list[int]) -> np.ndarray:
        return np.array([self._held(o).row for o in owners], dtype=np.int64)

    def _slots_of(self, rows: np.ndarray, starts: np.ndarray,
                  ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, position, slot) of every position [starts[i], ends[i]) of table rows `rows`, from the page table."""
        counts = ends - starts
        token_rows = np.repeat(rows, counts)
        positions = np.repeat(starts, counts) + _ranges(counts)
        pages = self._page_table_view[token_rows, positions // self.page_size]
        return token_rows, positions, pages * self.page_size + positions % self.page_size

    def row_pages(self, owner: int) -> torch.Tensor:
        """The pages of `owner`'s row covering its KV (cached prefix first, then its own)."""
        row = self._held(owner).row
        return self._page_table[row, :int(self.pages.pages_for(self._kv_lens[row]))].clone()

    def window_pages(self, owner: int) -> torch.Tensor:
        """Hybrid pools: `owner`'s own pages that may still be inside its window (each has its SWA page)."""
        return self.row_pages(owner)[self.window_start(owner):]

    def window_start(self, owner: int) -> int:
        """Hybrid pools: the index in `owner`'s row of the first of its own pages that may still be inside its
        window."""
        held = self._held(owner)
        return max(held.cached_pages, int(self._swa_floor[held.row]))

    def window_floor(self, position: int) -> int:
        """Hybrid pools: the first page a query at `position` reads in a sliding-window layer."""
        return int(self._first_window_page(torch.tensor(position)))

    def swa_pages(self, owner: int, first_page: int) -> torch.Tensor:
        """Hybrid pools: the SWA pages of `owner`'s pages from index `first_page` of its row on (its own or the
        cache's); raises if one has none (its window KV was freed)."""
        assert self.swa is not None
        full = self.row_pages(owner)[first_page:]
        missing = full[~self.swa.present(full)]
        if missing.numel():
            raise KVAccountingError(f"owner {owner}'s pages {missing.tolist()} have no window KV")
        return self.swa.map[full]

    def set_fence(self, event: Optional[FenceEvent]) -> None:
        """Pages and rows freed from now on wait for `event` (recorded after the latest launched forward)
        before reuse; None: no forward is in flight, so everything fenced is reclaimed now."""
        for allocator in (self.pages, self.rows) + ((self.swa.allocator,) if self.swa is not None else ()):
            allocator.fence = event
            if event is None:
                allocator.reclaim(wait=True)

    def flush_cache(self) -> int:
        """Evict every unlocked cached page; returns how many were freed."""
        return self.radix.evict(self.radix.evictable_pages) if self.radix else 0

    def _insert(self, owner: int, held: HeldKV, tokens: list[int]) -> None:
        assert self.radix is not None
        row = held.row
        if len(tokens) > int(self._kv_lens[row]):
            raise ValueError(f"cache insert of {len(tokens)} tokens, but owner {owner} holds only "
                             f"{int(self._kv_lens[row])} tokens of KV")
        whole_pages = len(tokens) // self.page_size
        if whole_pages <= held.cached_pages:
            return
        ours = self._page_table[row, :whole_pages].clone()
        node, tree_pages = self.radix.insert(tokens[:whole_pages * self.page_size], ours.tolist(), owner)
        tree = host_tensor(tree_pages, torch.int64)
        # Where another request cached the same tokens first, the tree kept its pages: free ours and
        # point this row at the tree's, so the row never reads a page it no longer owns.
        duplicate = (tree != ours).nonzero().flatten()
        if duplicate.numel():
            if self.swa is not None:  # the tree's copy lacks window KV that ours has: it keeps ours
                revive = duplicate[~self.swa.present(tree[duplicate]) & self.swa.present(ours[duplicate])]
                self.swa.move(ours[revive], tree[revive], owner, CACHE)
                self.radix.recount_swa(node)
            self._free_pages(ours[duplicate], owner)
            self._set_pages(row, int(duplicate[0]), tree[int(duplicate[0]):])
        self.radix.lock(node)
        if held.lock is not None:
            self.radix.unlock(held.lock)
        held.lock, held.cached_pages = node, whole_pages
        self._swa_floor[row] = torch.clamp(self._swa_floor[row], min=whole_pages)

    def _set_pages(self, row: int, first_page: int, pages: torch.Tensor) -> None:
        """Map pages [first_page, first_page + len(pages)) of `row` on the host and in the device table."""
        if pages.numel() == 0:
            return
        self._page_table[row, first_page:first_page + pages.numel()] = pages
        positions = torch.arange(first_page * self.page_size, (first_page + pages.numel()) * self.page_size)
        slots = pages.repeat_interleave(self.page_size) * self.page_size + positions % self.page_size
        self.table.write(torch.full_like(positions, row), positions, slots)

    def _held(self, owner: int) -> HeldKV:
        held = self.held.get(owner)
        if held is None:
            raise KVAccountingError(f"owner {owner} holds no KV")
        return held


def _ranges(counts: np.ndarray) -> np.ndarray:
    """concat(arange(c) for c in counts), vectorized."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
