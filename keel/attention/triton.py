"""Triton attention backend: paged decode with split-KV, extend over the paged prefix, one-launch KV stores.

Selected with --attention-backend triton (it also turns on the fused small ops and, on a GPU,
CUDA-graph decode). Decode metadata is planned on the device (no host sequence lengths), so a
decode forward can be captured in a CUDA graph; extend metadata is laid out on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from keel.attention.base import AttentionLayer, Rotation
from keel.cache.kv_pool import KVPool
from keel.cache.req_table import ReqToTokenTable
from keel.cache.swa_pages import SwaPageMap
from keel.debug.invariants import strict_checks_enabled
from keel.kernels.decode_attention import DecodeSplits, decode_attention, plan_decode_splits
from keel.kernels.extend_attention import ExtendBlocks, extend_attention, plan_extend_blocks
from keel.kernels.kv_store import store_kv
from keel.kernels.rotary import rotate_and_store
from keel.runner.forward_batch import ForwardBatch, TreeMask

Window = Optional[int]
# Under strict checks the split-KV scratch starts as a split that dominates any combine reading it (log-sum-exp
# far above any real one, outputs far off), so a read of a split this forward did not write shows in the result
# instead of depending on what the allocator left there.
POISON_LSE, POISON_OUT = 1e4, 1e3


@dataclass(frozen=True)
class TritonDecodeMetadata:
    out_cache_loc: torch.Tensor
    req_rows: torch.Tensor
    seq_lens: torch.Tensor
    num_splits: dict[Window, DecodeSplits]  # the planner's decision, per sliding-window size
    partial_out: torch.Tensor  # [batch, heads, width, head_dim] float32 scratch (width: the widest plan's)
    partial_lse: torch.Tensor  # [batch, heads, width] float32 scratch
    tree: Optional[TreeMask]
    swa_out_cache_loc: Optional[torch.Tensor]  # out_cache_loc in the sliding-window group of a hybrid pool


@dataclass(frozen=True)
class TritonExtendMetadata:
    out_cache_loc: torch.Tensor
    req_rows: torch.Tensor
    seq_lens: torch.Tensor
    blocks: ExtendBlocks
    tree: Optional[TreeMask]
    swa_out_cache_loc: Optional[torch.Tensor]


TritonMetadata = Union[TritonDecodeMetadata, TritonExtendMetadata]


class TritonBackend:
    def __init__(self, req_table: ReqToTokenTable, layers: list[AttentionLayer],
                 swa_map: Optional[SwaPageMap] = None) -> None:
        self.req_table = req_table
        self.swa_map = swa_map
        self.windows = tuple(set(layer.sliding_window for layer in layers))
        self.num_heads = layers[0].num_heads
        self.num_kv_heads = layers[0].num_kv_heads
        self.head_dim = layers[0].head_dim
        self.poison_scratch = strict_checks_enabled()

    def build_metadata(self, batch: ForwardBatch) -> TritonMetadata:
        swa_loc = self.swa_map.slots(batch.out_cache_loc) if self.swa_map is not None else None
        if batch.mode.is_decode:
            bs = batch.batch_size
            plans = {w: plan_decode_splits(batch.seq_lens, self.num_kv_heads, w) for w in self.windows}
            width = max(plan.width for plan in plans.values())
            return TritonDecodeMetadata(
                batch.out_cache_loc, batch.req_rows, batch.seq_lens, plans,
                self._scratch((bs, self.num_heads, width, self.head_dim), POISON_OUT, batch.device),
                self._scratch((bs, self.num_heads, width), POISON_LSE, batch.device), batch.tree, swa_loc)
        return TritonExtendMetadata(batch.out_cache_loc, batch.req_rows, batch.seq_lens,
                                    plan_extend_blocks(batch.extend_lens_cpu, batch.device), batch.tree, swa_loc)

    def _scratch(self, shape: tuple[int, ...], poison: float, device: torch.device) -> torch.Tensor:
        if self.poison_scratch:
            return torch.full(shape, poison, dtype=torch.float32, device=device)
        return torch.empty(shape, dtype=torch.float32, device=device)

    def forward(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_pool: KVPool, metadata: TritonMetadata, rotation: Optional[Rotation]) -> torch.Tensor:
        k_cache, v_cache = kv_pool.layer(layer.layer_id)
        loc, page_map = metadata.out_cache_loc, None
        if kv_pool.is_swa(layer.layer_id):
            if metadata.swa_out_cache_loc is None or self.swa_map is None:
                raise ValueError(f"layer {layer.layer_id} lives in a sliding-window pool, but the backend was built "
                                 "without its page map")
            loc, page_map = metadata.swa_out_cache_loc, self.swa_map.pages
        if rotation is None:
            store_kv(k_cache, v_cache, loc, k, v)
        else:
            norms = rotation.q_norm, rotation.k_norm
            head_norms = None if norms[0] is None or norms[1] is None else \
                (norms[0].weight, norms[1].weight, norms[0].eps)
            rotate_and_store(q, k, v, rotation.positions, rotation.rotary.cos, rotation.rotary.sin, k_cache, v_cache,
                             loc, head_norms)
        table, page_size = self.req_table.slots, kv_pool.page_size if page_map is not None else 1
        if isinstance(metadata, TritonDecodeMetadata):
            out = decode_attention(q, k_cache, v_cache, table, metadata.req_rows, metadata.seq_lens,
                                   metadata.num_splits[layer.sliding_window], metadata.partial_out,
                                   metadata.partial_lse, layer.scale, layer.sliding_window, metadata.tree,
                                   layer.softcap, page_map, page_size)
        else:
            out = extend_attention(q, k_cache, v_cache, table, metadata.req_rows, metadata.seq_lens,
                                   metadata.blocks, layer.scale, layer.sliding_window, metadata.tree, layer.softcap,
                                   page_map, page_size)
        return out.reshape(q.shape[0], layer.num_heads * layer.head_dim)
