"""Torch-native attention: gathers each request's paged K/V and runs scaled_dot_product_attention.

Runs on CPU and GPU. Decode batches run as one padded SDPA call; extend and mixed batches run
one SDPA call per request (no padding across requests of very different lengths). Masks for
every sliding-window size the model uses are built once per forward, in `build_metadata`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from keel.attention.base import AttentionLayer
from keel.cache.kv_pool import KVPool
from keel.cache.req_table import ReqToTokenTable
from keel.runner.forward_batch import ForwardBatch, ForwardMode, HostInts

Window = Optional[int]


@dataclass(frozen=True)
class TorchNativeMetadata:
    mode: ForwardMode
    out_cache_loc: torch.Tensor  # [tokens] slots for this forward's new K/V
    kv_slots: torch.Tensor  # [batch, max_seq_len] int64 slot of each key position (0 past the end)
    seq_lens: HostInts
    token_starts: HostInts  # where each request's tokens begin in the flat token array
    extend_lens: HostInts
    # Decode: {window: [batch, 1, 1, max_seq_len]}. Extend/mixed: {window: per request [extend, seq]}.
    decode_masks: dict[Window, torch.Tensor]
    extend_masks: dict[Window, list[torch.Tensor]]


class TorchNativeBackend:
    def __init__(self, req_table: ReqToTokenTable, windows: tuple[Window, ...]) -> None:
        self.req_table = req_table
        self.windows = tuple(sorted(set(windows), key=lambda w: -1 if w is None else w))

    def build_metadata(self, batch: ForwardBatch) -> TorchNativeMetadata:
        max_len = max(batch.seq_lens_cpu, default=0)
        kv_slots = self.req_table.slots[batch.req_rows, :max_len].to(torch.int64)
        key_pos = torch.arange(max_len, device=batch.device)
        starts = tuple(itertools.accumulate(batch.extend_lens_cpu, initial=0))[:-1]
        decode_masks: dict[Window, torch.Tensor] = {}
        extend_masks: dict[Window, list[torch.Tensor]] = {}
        if batch.mode == ForwardMode.DECODE:
            query_pos = (batch.seq_lens - 1)[:, None]
            decode_masks = {w: _mask(query_pos, key_pos, w)[:, None, None, :] for w in self.windows}
        elif batch.batch_size:
            query_pos = [torch.arange(p, s, device=batch.device)[:, None]
                         for p, s in zip(batch.prefix_lens_cpu, batch.seq_lens_cpu)]
            extend_masks = {w: [_mask(q, key_pos[:s], w) for q, s in zip(query_pos, batch.seq_lens_cpu)]
                            for w in self.windows}
        return TorchNativeMetadata(batch.mode, batch.out_cache_loc, kv_slots, batch.seq_lens_cpu, starts,
                                   batch.extend_lens_cpu, decode_masks, extend_masks)

    def forward(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_pool: KVPool, metadata: TorchNativeMetadata) -> torch.Tensor:
        kv_pool.write(layer.layer_id, metadata.out_cache_loc, k, v)
        if q.shape[0] == 0:
            return q.reshape(0, layer.num_heads * layer.head_dim)
        k_cache, v_cache = kv_pool.layer(layer.layer_id)
        if metadata.mode == ForwardMode.DECODE:
            out = self._decode(layer, q, k_cache, v_cache, metadata)
        else:
            out = self._extend(layer, q, k_cache, v_cache, metadata)
        return out.reshape(q.shape[0], layer.num_heads * layer.head_dim)

    def _decode(self, layer: AttentionLayer, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                md: TorchNativeMetadata) -> torch.Tensor:
        keys = k_cache[md.kv_slots].transpose(1, 2)  # [batch, kv_heads, max_seq, head_dim]
        values = v_cache[md.kv_slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :].to(keys.dtype), keys, values, attn_mask=md.decode_masks[layer.sliding_window],
            scale=layer.scale, enable_gqa=layer.num_heads != layer.num_kv_heads)
        return out[:, :, 0, :].to(q.dtype)

    def _extend(self, layer: AttentionLayer, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                md: TorchNativeMetadata) -> torch.Tensor:
        outputs = []
        masks = md.extend_masks[layer.sliding_window]
        for i, (start, length, seq_len) in enumerate(zip(md.token_starts, md.extend_lens, md.seq_lens)):
            slots = md.kv_slots[i, :seq_len]
            keys = k_cache[slots].transpose(0, 1)  # [kv_heads, seq, head_dim]
            values = v_cache[slots].transpose(0, 1)
            query = q[start:start + length].transpose(0, 1).to(keys.dtype)  # [heads, extend, head_dim]
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=masks[i], scale=layer.scale,
                                                 enable_gqa=layer.num_heads != layer.num_kv_heads)
            outputs.append(out.transpose(0, 1).to(q.dtype))
        return torch.cat(outputs)


def _mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: Window) -> torch.Tensor:
    """Causal (and sliding-window) visibility: key j is visible to query i iff i-window < j <= i."""
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    return visible
