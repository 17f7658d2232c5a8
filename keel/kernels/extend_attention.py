"""Extend (prefill) attention over the paged KV cache.

New tokens attend to their request's cached prefix through the request->token table and
causally to each other (their own K/V are already stored in the pool, so all keys come from
one place), with an optional sliding window. One program handles a tile of queries of one
request and one head; `plan_extend_blocks` lays the query blocks out once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from keel.kernels.decode_attention import check_head_dim
from keel.kernels.online_softmax import in_tree_path, mapped_slots, online_softmax_step
from keel.runner.forward_batch import TreeMask
from keel.transfer import columns_to_device


@dataclass(frozen=True)
class ExtendTile:
    """The kernel's tile and launch shape: queries and keys per step, warps, pipeline stages."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


# Small tiles for short extends (draft verification, small prompts: more programs); long extends take the large one
# (H200, llama-3.1-8b geometry: 2.6x the small tile's rate at 8k-32k tokens, 2.5x at 512 new tokens after 2,000
# cached, slower at 128 new tokens; docs/benchmarks.md), as they do under the CPU interpreter, where fewer, larger
# programs are faster too (a 330-token extend: 1.70 s with the small tile, 0.64 s with the large).
SMALL_TILE = ExtendTile(32, 32, 4, 3)
LARGE_TILE = ExtendTile(64, 64, 4, 3)
LARGE_TILE_FROM = 256  # tokens: a batch whose longest extend reaches this takes the large tile


def extend_tile(extend_lens: tuple[int, ...]) -> ExtendTile:
    return LARGE_TILE if max(extend_lens, default=0) >= LARGE_TILE_FROM else SMALL_TILE


@dataclass(frozen=True)
class ExtendBlocks:
    """Where each program's query block lives: request index and first query within the request."""

    block_req: torch.Tensor  # [num_blocks] int32
    block_start: torch.Tensor  # [num_blocks] int32
    q_starts: torch.Tensor  # [batch] int32, each request's first token in the flat token array
    extend_lens: torch.Tensor  # [batch] int32
    tile: ExtendTile  # the tile the blocks were laid out for


def plan_extend_blocks(extend_lens: tuple[int, ...], device: torch.device,
                       tile: Optional[ExtendTile] = None) -> ExtendBlocks:
    """Query blocks, longest-running first (a request's last blocks see the most keys), so the tail of the
    launch is short blocks rather than long ones."""
    tile = tile or extend_tile(extend_lens)
    block_req, block_start, q_starts = [], [], []
    offset = 0
    for i, length in enumerate(extend_lens):
        q_starts.append(offset)
        for start in range(0, length, tile.block_q):
            block_req.append(i)
            block_start.append(start)
        offset += length
    block_req.reverse()
    block_start.reverse()
    return ExtendBlocks(*columns_to_device(
        [(values, torch.int32) for values in (block_req, block_start, q_starts, list(extend_lens))], device), tile)


@triton.jit
def _extend_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, req_to_token_ptr, req_rows_ptr, seq_lens_ptr, extend_lens_ptr,
        q_starts_ptr, block_req_ptr, block_start_ptr, tree_starts_ptr, tree_bits_ptr, page_map_ptr,
        stride_qt, stride_qh, stride_ct, stride_ch, stride_rt, stride_ot, stride_oh,
        scale, window, softcap,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
        IEEE: tl.constexpr, TREE: tl.constexpr, SOFTCAP: tl.constexpr, MAPPED: tl.constexpr,
        PAGE_SIZE: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    r = tl.load(block_req_ptr + block)
    m0 = tl.load(block_start_ptr + block)
    seq_len = tl.load(seq_lens_ptr + r).to(tl.int32)  # positions are int32; addresses int64
    extend = tl.load(extend_lens_ptr + r).to(tl.int32)
    prefix = seq_len - extend
    row = tl.load(req_rows_ptr + r).to(tl.int64)
    first_token = tl.load(q_starts_ptr + r).to(tl.int64)

    m = m0 + tl.arange(0, BLOCK_Q)
    q_ok = m < extend
    q_pos = prefix + m
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (first_token + m)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=q_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    if TREE:
        tree_start = tl.load(tree_starts_ptr + first_token + m, mask=q_ok, other=0).to(tl.int32)
        tree_bits = tl.load(tree_bits_ptr + first_token + m, mask=q_ok, other=0)
    hi = prefix + tl.minimum(m0 + BLOCK_Q, extend)  # past the block's last query: nothing is visible
    lo = 0
    # Keys before the block's first query are visible to all its queries, unless a window or a tree hides
    # some: those key blocks skip the masks.
    whole = 0
    if window > 0:
        lo = tl.maximum(prefix + m0 - window + 1, 0) // BLOCK_K * BLOCK_K
    elif not (TREE or MAPPED):
        whole = (prefix + m0) // BLOCK_K * BLOCK_K
    for start in range(0, whole, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        slots = tl.load(req_to_token_ptr + row * stride_rt + offs).to(tl.int64)
        kv_offs = slots[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        m_i, l_i, acc = online_softmax_step(q, k_cache_ptr + kv_offs, v_cache_ptr + kv_offs, offs, offs, m_i, l_i,
                                            acc, scale, softcap, IEEE, SOFTCAP, False)
    for start in range(tl.maximum(lo, whole), hi, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        k_ok = offs < hi
        slots = tl.load(req_to_token_ptr + row * stride_rt + offs, mask=k_ok, other=0).to(tl.int64)
        if MAPPED:
            slots = mapped_slots(page_map_ptr, slots, k_ok, PAGE_SIZE)
        kv_offs = slots[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        visible = k_ok[None, :] & (offs[None, :] <= q_pos[:, None])
        if window > 0:
            visible = visible & (offs[None, :] > q_pos[:, None] - window)
        if TREE:
            visible = visible & in_tree_path(offs[None, :], tree_start[:, None], tree_bits[:, None])
        m_i, l_i, acc = online_softmax_step(q, k_cache_ptr + kv_offs, v_cache_ptr + kv_offs, k_ok, visible,
                                            m_i, l_i, acc, scale, softcap, IEEE, SOFTCAP, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (first_token + m)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok[:, None])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     req_rows: torch.Tensor, seq_lens: torch.Tensor, blocks: ExtendBlocks, scale: float,
                     window: Optional[int], tree: Optional[TreeMask] = None,
                     softcap: Optional[float] = None, page_map: Optional[torch.Tensor] = None,
                     page_size: int = 1) -> torch.Tensor:
    """q: [tokens, heads, head_dim] (the batch's new tokens back to back); returns the same shape. `tree`: per
    token, the draft-tree keys it sees (no sliding window then: a tree's positions are not its table positions).
    `page_map`: a sliding-window pool's pages, as in decode_attention."""
    tokens, heads, head_dim = q.shape
    check_head_dim(head_dim)
    assert tree is None or (window is None and tree.starts.shape == (tokens,) and tree.bits.shape == (tokens,))
    out = torch.empty_like(q)
    num_blocks = blocks.block_req.numel()
    if tokens == 0 or num_blocks == 0:
        return out
    tree_starts, tree_bits = (tree.starts, tree.bits) if tree is not None else (seq_lens, seq_lens)  # unread then
    tile = blocks.tile
    _extend_kernel[(num_blocks, heads)](
        q, k_cache, v_cache, out, req_to_token, req_rows, seq_lens, blocks.extend_lens, blocks.q_starts,
        blocks.block_req, blocks.block_start, tree_starts, tree_bits, page_map if page_map is not None else seq_lens,
        q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), req_to_token.stride(0),
        out.stride(0), out.stride(1), scale, window or 0, softcap or 0.0,
        GROUP=heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_Q=tile.block_q, BLOCK_K=tile.block_k,
        IEEE=k_cache.dtype == torch.float32, TREE=tree is not None,
        SOFTCAP=softcap is not None, MAPPED=page_map is not None, PAGE_SIZE=page_size,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    return out
