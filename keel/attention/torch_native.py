"""Torch-native attention: gathers each request's paged K/V and runs scaled_dot_product_attention.

Runs on CPU and GPU, one SDPA call per request, and calls SDPA the way transformers does: no
mask and `is_causal` for a fresh prompt, no mask for a single new token, an explicit mask only
when new tokens follow a cached prefix or a sliding window cuts the context. So it is also a
numerical reference: its bfloat16 results track transformers' closely. The fast path on GPUs
is a Triton backend; this one favours clarity.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from keel.attention.base import AttentionLayer, Rotation
from keel.cache.kv_pool import KVPool
from keel.cache.req_table import ReqToTokenTable
from keel.cache.swa_pages import SwaPageMap
from keel.runner.forward_batch import ForwardBatch, HostInts

Window = Optional[int]


@dataclass(frozen=True)
class TorchNativeMetadata:
    out_cache_loc: torch.Tensor  # [tokens] slots for this forward's new K/V
    kv_slots: torch.Tensor  # [batch, max_seq_len] int64 slot of each key position (0 past the end)
    seq_lens: HostInts
    token_starts: HostInts  # where each request's tokens begin in the flat token array
    extend_lens: HostInts
    # {window: per request, a [extend, seq] visibility mask, or None where none is needed}
    masks: dict[Window, list[Optional[torch.Tensor]]]
    # the same two slot tensors in the sliding-window group of a hybrid pool; None without one
    swa_out_cache_loc: Optional[torch.Tensor] = None
    swa_kv_slots: Optional[torch.Tensor] = None


class TorchNativeBackend:
    def __init__(self, req_table: ReqToTokenTable, windows: tuple[Window, ...],
                 swa_map: Optional[SwaPageMap] = None) -> None:
        self.req_table = req_table
        self.windows = tuple(set(windows))
        self.swa_map = swa_map

    def build_metadata(self, batch: ForwardBatch) -> TorchNativeMetadata:
        # lengths known only on the device are read back: this backend loops over requests on the host anyway
        seq_lens = batch.seq_lens_cpu if batch.seq_lens_cpu is not None else tuple(batch.seq_lens.tolist())
        max_len = max(seq_lens, default=0)
        kv_slots = self.req_table.slots[batch.req_rows, :max_len].to(torch.int64)
        starts = tuple(itertools.accumulate(batch.extend_lens_cpu, initial=0))[:-1]
        if batch.tree is not None:
            tree = _tree_masks(batch, seq_lens)
            masks = {w: tree for w in self.windows}
        else:
            masks = {w: [_mask(e, s, w, batch.device) for e, s in zip(batch.extend_lens_cpu, seq_lens)]
                     for w in self.windows}
        swa = self.swa_map
        return TorchNativeMetadata(batch.out_cache_loc, kv_slots, seq_lens, starts, batch.extend_lens_cpu, masks,
                                   swa.slots(batch.out_cache_loc) if swa else None,
                                   swa.slots(kv_slots) if swa else None)

    def forward(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_pool: KVPool, metadata: TorchNativeMetadata, rotation: Optional[Rotation]) -> torch.Tensor:
        if rotation is not None:
            if rotation.q_norm is not None and rotation.k_norm is not None:
                q, k = rotation.q_norm(q), rotation.k_norm(k)
            q, k = rotation.rotary(rotation.positions, q, k)
        out_cache_loc, kv_slots = metadata.out_cache_loc, metadata.kv_slots
        if kv_pool.is_swa(layer.layer_id):
            if metadata.swa_out_cache_loc is None or metadata.swa_kv_slots is None:
                raise ValueError(f"layer {layer.layer_id} lives in a sliding-window pool, but the backend was built "
                                 "without its page map")
            out_cache_loc, kv_slots = metadata.swa_out_cache_loc, metadata.swa_kv_slots
        kv_pool.write(layer.layer_id, out_cache_loc, k, v)
        out = q.new_empty(q.shape[0], layer.num_heads * layer.head_dim)
        k_cache, v_cache = kv_pool.layer(layer.layer_id)
        masks = metadata.masks[layer.sliding_window]
        for i, (start, length, seq_len) in enumerate(zip(metadata.token_starts, metadata.extend_lens,
                                                         metadata.seq_lens)):
            slots = kv_slots[i, :seq_len]
            keys = k_cache[slots].transpose(0, 1)[None]  # [1, kv_heads, seq, head_dim]
            values = v_cache[slots].transpose(0, 1)[None]
            query = q[start:start + length].transpose(0, 1)[None]  # [1, heads, extend, head_dim]
            mask = masks[i]
            if layer.softcap is not None:
                attn = _softcapped_attention(query, keys, values, mask, layer)
            else:
                attn = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=mask, is_causal=mask is None and length > 1, scale=layer.scale,
                    enable_gqa=layer.num_heads != layer.num_kv_heads)
            out[start:start + length] = attn[0].transpose(0, 1).reshape(length, -1)
        return out


def _softcapped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: Optional[torch.Tensor], layer: AttentionLayer) -> torch.Tensor:
    """Attention with Gemma 2's capped scores (SDPA has no soft-capping), as transformers computes it: scores in
    the input dtype, capped, masked, softmax in float32. query [1, heads, n, d], keys/values [1, kv_heads, s, d]."""
    group = layer.num_heads // layer.num_kv_heads
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (query @ keys.transpose(-1, -2)) * layer.scale
    assert layer.softcap is not None
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    n, s = scores.shape[-2:]
    if mask is None:  # as SDPA's is_causal: the n new tokens are the last n of the s keys
        mask = torch.ones(n, s, dtype=torch.bool, device=scores.device).tril(s - n)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ values


def _tree_masks(batch: ForwardBatch, seq_lens: HostInts) -> list[Optional[torch.Tensor]]:
    """Per request, which keys each new token sees when some tokens belong to draft trees (see TreeMask): keys up
    to its own table position, those inside its tree only if they are its ancestors or itself."""
    assert batch.tree is not None
    masks: list[Optional[torch.Tensor]] = []
    start = 0
    for extend, seq in zip(batch.extend_lens_cpu, seq_lens):
        tokens = slice(start, start + extend)
        start += extend
        query_pos = torch.arange(seq - extend, seq, device=batch.device)[:, None]
        key_pos = torch.arange(seq, device=batch.device)[None]
        rel = key_pos - batch.tree.starts[tokens, None]
        in_tree = rel >= 0
        bit = (batch.tree.bits[tokens, None] >> rel.clamp(0, 63)) & 1
        masks.append((key_pos <= query_pos) & (~in_tree | (bit != 0)))
    return masks


def _mask(extend: int, seq: int, window: Window, device: torch.device) -> Optional[torch.Tensor]:
    """Which keys each new token sees (key j visible to position i iff i - window < j <= i), or None
    when SDPA's own causal flag (fresh prompt) or no mask at all (one new token) already says it."""
    windowed = window is not None and seq > window
    if not windowed and (extend == seq or extend == 1):
        return None
    query_pos = torch.arange(seq - extend, seq, device=device)[:, None]
    key_pos = torch.arange(seq, device=device)
    visible = key_pos <= query_pos
    if windowed:
        visible &= key_pos > query_pos - window
    return visible
