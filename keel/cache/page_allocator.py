"""PageAllocator: KV pages of `page_size` slots, each with exactly one owner."""

from __future__ import annotations

import torch

from keel.cache.id_allocator import OwnedIdAllocator


class PageAllocator(OwnedIdAllocator):
    def __init__(self, num_pages: int, page_size: int) -> None:
        super().__init__(num_pages + 1, "page")  # + the reserved page 0
        self.page_size = page_size

    def pages_for(self, num_tokens: torch.Tensor) -> torch.Tensor:
        """Pages needed to hold `num_tokens` tokens (elementwise ceil division)."""
        return (num_tokens + self.page_size - 1) // self.page_size
