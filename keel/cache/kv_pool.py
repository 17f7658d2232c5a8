"""KVPool: the K and V cache of every layer, `[num_slots, kv_heads, head_dim]` per layer.

Slots are addressed by page: slot = page * page_size + offset. Page 0 (slots 0..page_size-1)
is reserved; padded writes go to slot 0. The pool is zero-initialised so that a padded key
read from an unwritten slot is finite (a masked NaN would still poison softmax @ V).
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = num_layers
        self.page_size = page_size
        self.num_slots = (num_pages + 1) * page_size  # + the reserved page 0
        shape = (num_layers, self.num_slots, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_cache[layer_id], self.v_cache[layer_id]

    def write(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V ([tokens, kv_heads, head_dim]) at slots `loc` ([tokens])."""
        self.k_cache[layer_id].index_copy_(0, loc, k.to(self.k_cache.dtype))
        self.v_cache[layer_id].index_copy_(0, loc, v.to(self.v_cache.dtype))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's K/V at slots `src` into slots `dst` (all sources are read before any write)."""
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]
