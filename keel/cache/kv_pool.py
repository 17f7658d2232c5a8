"""KVPool: the K and V cache of every layer, `[slots, kv_heads, head_dim]` per layer, in one or two groups.

Slots are addressed by page: slot = page * page_size + offset. Page 0 (slots 0..page_size-1)
is reserved; padded writes go to slot 0. The pool is zero-initialised so that a padded key
read from an unwritten slot is finite (a masked NaN would still poison softmax @ V).

A hybrid pool (DESIGN, Seams: one pool per layer group) keeps the sliding-window layers in a
group of its own with fewer slots, addressed through the full->SWA page map (`swa_map`); the
full-attention layers keep one slot per full-pool slot. Without `swa_layers` every layer is
in the full group.
"""

from __future__ import annotations

from typing import Optional

import torch

from keel.cache.swa_pages import SwaPageMap


class KVPool:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, swa_layers: frozenset[int] = frozenset(),
                 num_swa_pages: int = 0, swa_map: Optional[SwaPageMap] = None) -> None:
        if bool(swa_layers) != (swa_map is not None):
            raise ValueError("a pool has sliding-window layers of its own exactly when it has their page map")
        self.num_layers = num_layers
        self.page_size = page_size
        self.swa_layers = swa_layers
        self.swa_map = swa_map
        self.num_slots = (num_pages + 1) * page_size  # + the reserved page 0
        full_layers = [i for i in range(num_layers) if i not in swa_layers]
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self.k_cache, self.v_cache = self._group(  # the full group's
            full_layers, self.num_slots, num_kv_heads, head_dim, dtype, device)
        self.swa_k_cache, self.swa_v_cache = self._group(  # the sliding-window group's ([0, ...] without one)
            sorted(swa_layers), (num_swa_pages + 1) * page_size, num_kv_heads, head_dim, dtype, device)

    def _group(self, layers: list[int], num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (len(layers), num_slots, num_kv_heads, head_dim)
        k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        for index, layer_id in enumerate(layers):
            self._k[layer_id], self._v[layer_id] = k[index], v[index]
        return k, v

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def bytes_allocated(self) -> int:
        """Device bytes of every layer's K and V."""
        return sum(2 * k.numel() * k.element_size() for k in self._k.values())

    def is_swa(self, layer_id: int) -> bool:
        """Whether the layer's K/V live in the sliding-window group (slots through `swa_map`)."""
        return layer_id in self.swa_layers

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[layer_id], self._v[layer_id]

    def write(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new K/V ([tokens, kv_heads, head_dim]) at slots `loc` ([tokens]) of the layer's group."""
        k_cache, v_cache = self.layer(layer_id)
        k_cache.index_copy_(0, loc, k.to(k_cache.dtype))
        v_cache.index_copy_(0, loc, v.to(v_cache.dtype))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's K/V at slots `src` into slots `dst` (all sources are read before any write)."""
        if self.swa_layers:
            raise NotImplementedError("moving KV between slots of a hybrid pool (draft trees on sliding-window "
                                      "models are refused at start)")
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]
