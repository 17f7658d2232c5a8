"""SwaPages: the sliding-window pool's pages and the full->SWA page map of a hybrid KV pool.

A hybrid model's tokens are indexed by full pages (the request table, the prefix cache); its
sliding-window layers keep K/V in a smaller pool, reached through `map`: full page -> SWA page,
0 when the full page has none (never had one, or its window KV was freed). An SWA page has the
owner of its full page (a request, or the prefix cache) and moves with it.

DESIGN rule "one owner, one release path" (seed 002: a recycled full slot kept a stale mapping,
and a later free of it freed another request's SWA page): `map` is written in two places only.
`attach` hands out SWA pages and sets the entries, which must be empty; `detach` frees the SWA
pages of the given full pages and clears their entries in the same call. The `mapping-reset`
guard is that clearing (and the emptiness check); switched off, a stale entry survives a free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from keel.cache.id_allocator import KVAccountingError
from keel.cache.page_allocator import PageAllocator
from keel.debug.guards import guard_on
from keel.transfer import columns_to_device


@dataclass(frozen=True)
class SwaPageMap:
    """The device mirror of the map, for the attention backends: SWA slot of each full slot."""

    pages: torch.Tensor  # [full pages + 1] int32 on the device; entry 0 (the reserved page) maps to 0
    page_size: int

    def slots(self, full_slots: torch.Tensor) -> torch.Tensor:
        """SWA slots of `full_slots` (int64, on the device); a full page without an SWA page gives the
        reserved SWA page 0."""
        ps = self.page_size
        return self.pages[full_slots // ps].to(torch.int64) * ps + full_slots % ps


class SwaPages:
    def __init__(self, num_full_pages: int, num_swa_pages: int, page_size: int, device: torch.device) -> None:
        self.allocator = PageAllocator(num_swa_pages, page_size)
        self.map = torch.zeros(num_full_pages + 1, dtype=torch.int64)  # host; the source of truth
        self.device_map = SwaPageMap(torch.zeros(num_full_pages + 1, dtype=torch.int32, device=device), page_size)

    def attach(self, full_pages: torch.Tensor, owners: torch.Tensor, windowed: Optional[torch.Tensor] = None) -> bool:
        """Give each of `full_pages` (just handed out to `owners`), or each that `windowed` (bool) selects, an SWA
        page of the same owner (the others lie behind every window their owner will read); False, taking nothing,
        if too few are free."""
        if guard_on("mapping-reset") and bool((self.map[full_pages] != 0).any()):
            stale = int(full_pages[self.map[full_pages] != 0][0])
            raise KVAccountingError(f"full page {stale} was handed out still mapped to SWA page "
                                    f"{int(self.map[stale])}")
        if windowed is not None:
            full_pages, owners = full_pages[windowed], owners[windowed]
        if full_pages.numel() == 0:
            return True
        swa = self.allocator.alloc(owners)
        if swa is None:
            return False
        self._set(full_pages, swa)
        return True

    def detach(self, full_pages: torch.Tensor, owner: Union[int, torch.Tensor]) -> int:
        """Free the SWA pages of those of `full_pages` that have one (owned by `owner`, or each by its entry of an
        `owner` tensor) and clear their entries; returns how many were freed."""
        has = self.map[full_pages] != 0
        mapped = full_pages[has]
        if mapped.numel() == 0:
            return 0
        self.allocator.free(self.map[mapped], owner[has] if isinstance(owner, torch.Tensor) else owner)
        if guard_on("mapping-reset"):
            self._set(mapped, torch.zeros_like(mapped))
        return mapped.numel()

    def move(self, source: torch.Tensor, target: torch.Tensor, owner: int, new_owner: int) -> None:
        """Hand the SWA pages of full pages `source` (owner `owner`) to full pages `target` (which have none) and
        to `new_owner`: a request's window KV kept for the prefix cache's copy of the same tokens."""
        if source.numel() == 0:
            return
        if bool((self.map[target] != 0).any()):
            raise KVAccountingError(f"SWA pages moved onto full pages {target.tolist()}, some already mapped")
        swa = self.map[source]
        self.allocator.transfer(swa, owner, new_owner)
        self._set(target, swa)
        self._set(source, torch.zeros_like(source))

    def transfer(self, full_pages: torch.Tensor, owner: int, new_owner: int) -> None:
        """The SWA pages of `full_pages` that have one go from `owner` to `new_owner` with their full pages."""
        mapped = self.map[full_pages]
        self.allocator.transfer(mapped[mapped != 0], owner, new_owner)

    def present(self, full_pages: torch.Tensor) -> torch.Tensor:
        """Which of `full_pages` have their SWA page (bool)."""
        return self.map[full_pages] != 0

    def _set(self, full_pages: torch.Tensor, swa_pages: torch.Tensor) -> None:
        self.map[full_pages] = swa_pages
        index, values = columns_to_device([(full_pages, torch.int64), (swa_pages, torch.int32)],
                                          self.device_map.pages.device)
        self.device_map.pages[index] = values
