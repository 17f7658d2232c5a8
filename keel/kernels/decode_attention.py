"""Paged decode attention, grouped for GQA, with split-KV.

One program handles one request, one KV head (all the query heads that share it) and one split
of that request's keys. `plan_decode_splits` decides, once per forward and on the device, how
many splits each request gets; the attention kernel and the combine kernel both read that one
tensor, and the partial-result buffers are sized from the plan's cap (DESIGN rule "one planner").
A request planned as one split is finished by the attention kernel itself and skipped by the
combine kernel (most requests at short contexts or large batches). Planning on the device needs
no host copy of the sequence lengths, so the same code runs inside a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from keel.debug.guards import guard_on
from keel.kernels.online_softmax import in_tree_path, mapped_slots, online_softmax_step
from keel.kernels.pdl import pdl_launch_args, pdl_wait
from keel.runner.forward_batch import TreeMask

# The most splits a request may get. A lone long request needs many: on an H200, llama-3.1-8b batch 1 at 32k
# keys, 16 splits read 2.1 TB/s, 33 3.0 TB/s, 66 (FEW_LANES_TARGET_PROGRAMS' share) 3.3 TB/s.
MAX_SPLITS = 128
# Shorter contexts get fewer splits. Small, because a lone request's decode is latency-bound: on an H200,
# llama-3.1-8b batch 1 at ~250 tokens runs 77.2 % of HBM bandwidth with 64, 75.5 % with 256.
MIN_KEYS_PER_SPLIT = 64
TARGET_PROGRAMS = 264  # enough programs to fill the GPU twice over (132 SMs on an H100/H200)
# A few long requests read faster as four programs per SM: on an H200, llama-3.1-8b at 32k keys, batch 1 took
# 41.1 us against 45.7 with 264, batch 2 71.1 against 78.4, batch 4 144.3 against 153.6; batch 8 lost (333 against
# 279), so only batches of at most FEW_LANES (request, KV head) pairs get the larger target.
FEW_LANES = 32
FEW_LANES_TARGET_PROGRAMS = 528
BLOCK_N = 64


def supports_head_dim(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def check_head_dim(head_dim: int) -> None:
    if not supports_head_dim(head_dim):
        raise ValueError(f"the Triton attention kernels need a power-of-two head_dim >= 16, got {head_dim}; "
                         "use --attention-backend torch")


@dataclass(frozen=True)
class DecodeSplits:
    """The planner's decision for one forward: what the attention kernel's grid, the kernel and the combine step
    all read."""

    counts: torch.Tensor  # [batch] int32 on the device: each request's splits, in [1, cap]
    # The most any request may get, known on the host: the kernel's grid has this many splits, not MAX_SPLITS (at
    # batch 256, 16x fewer programs, most of which would only exit), and with 1 the combine launch is skipped.
    cap: int

    @property
    def width(self) -> int:
        """Splits the partial-result scratch holds per (request, head): the cap, rounded up to a power of two."""
        return triton.next_power_of_2(self.cap)


def plan_decode_splits(seq_lens: torch.Tensor, num_kv_heads: int, window: Optional[int]) -> DecodeSplits:
    """Splits per request: enough to fill the GPU, none shorter than MIN_KEYS_PER_SPLIT keys."""
    keys = seq_lens if window is None else torch.clamp(seq_lens, max=window)
    lanes = max(1, seq_lens.numel() * num_kv_heads)
    target = FEW_LANES_TARGET_PROGRAMS if lanes <= FEW_LANES else TARGET_PROGRAMS
    cap = max(1, min(MAX_SPLITS, math.ceil(target / lanes)))
    splits = (keys + MIN_KEYS_PER_SPLIT - 1) // MIN_KEYS_PER_SPLIT
    return DecodeSplits(torch.clamp(splits, 1, cap).to(torch.int32), cap)


@triton.jit
def _decode_partial_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, req_to_token_ptr, req_rows_ptr, seq_lens_ptr, num_splits_ptr,
        part_out_ptr, part_lse_ptr, out_ptr, tree_starts_ptr, tree_bits_ptr, page_map_ptr,
        stride_qb, stride_qh, stride_ct, stride_ch, stride_rt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
        stride_ob, stride_oh, scale, window, softcap,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr, TREE: tl.constexpr,
        SOFTCAP: tl.constexpr, MAPPED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    pdl_wait(PDL)  # before the early exit: every program must wait
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.load(num_splits_ptr + b)
    if split >= num_splits:
        return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)  # positions are int32; addresses int64
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    first = 0
    if window > 0:
        first = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK) * BLOCK
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    head_ok = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if TREE:
        tree_start = tl.load(tree_starts_ptr + b).to(tl.int32)
        tree_bits = tl.load(tree_bits_ptr + b)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < hi
        slots = tl.load(req_to_token_ptr + row * stride_rt + offs, mask=valid, other=0).to(tl.int64)
        if MAPPED:
            slots = mapped_slots(page_map_ptr, slots, valid, PAGE_SIZE)
        kv_offs = slots[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        visible = valid
        if TREE:
            visible = visible & in_tree_path(offs, tree_start, tree_bits)
        m_i, l_i, acc = online_softmax_step(q, k_cache_ptr + kv_offs, v_cache_ptr + kv_offs, valid,
                                            visible[None, :], m_i, l_i, acc, scale, softcap, IEEE, SOFTCAP, True)
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if num_splits == 1:  # the whole answer: stored as is, and the combine kernel skips this request
        final = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(final, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))  # base 2
        part = part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + d[None, :]
        tl.store(part, out, mask=head_ok[:, None])
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _decode_combine_kernel(part_out_ptr, part_lse_ptr, num_splits_ptr, out_ptr, seq_lens_ptr,
                           stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, window,
                           HEAD_DIM: tl.constexpr, MAX_SPLITS_C: tl.constexpr, PDL: tl.constexpr,
                           DERIVED: tl.constexpr, MIN_KEYS: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    num_splits = tl.load(num_splits_ptr + b)
    if DERIVED:  # guard one-plan off (seed 001): the combine step counts the splits itself, from the live length
        keys = tl.load(seq_lens_ptr + b).to(tl.int32)
        if window > 0:
            keys = tl.minimum(keys, window)
        num_splits = tl.minimum(tl.maximum(tl.cdiv(keys, MIN_KEYS), 1), MAX_SPLITS_C)
    if num_splits == 1:  # the partial kernel wrote the output itself
        return
    s = tl.arange(0, MAX_SPLITS_C)
    used = s < num_splits
    lse = tl.load(part_lse_ptr + b * stride_lb + head * stride_lh + s, mask=used, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.where(used & (lse > float("-inf")), tl.exp2(lse - top), 0.0)
    weights = weights / tl.sum(weights, 0)
    d = tl.arange(0, HEAD_DIM)
    parts = tl.load(part_out_ptr + b * stride_pb + head * stride_ph + s[:, None] * stride_ps + d[None, :],
                    mask=used[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                     req_rows: torch.Tensor, seq_lens: torch.Tensor, splits: DecodeSplits,
                     partial_out: torch.Tensor, partial_lse: torch.Tensor, scale: float,
                     window: Optional[int], tree: Optional[TreeMask] = None,
                     softcap: Optional[float] = None, page_map: Optional[torch.Tensor] = None,
                     page_size: int = 1) -> torch.Tensor:
    """q: [batch, heads, head_dim]; caches: [slots, kv_heads, head_dim]; returns [batch, heads, head_dim].
    `page_map` (int32 [table pages]): the caches are a sliding-window pool whose page of table slot s is
    page_map[s // page_size].

    partial_out [batch, heads, width, head_dim] and partial_lse [batch, heads, width] (float32) are scratch sized
    from the planner's cap (`DecodeSplits.width`, or more); `splits` is the planner's decision. `tree`: one entry
    per row, the draft-tree keys each row sees (no sliding window then: a tree's positions are not its table
    positions).
    """
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    check_head_dim(head_dim)
    width = partial_out.shape[2]
    assert partial_out.shape == (batch, heads, width, head_dim) and partial_lse.shape == (batch, heads, width)
    assert splits.counts.shape == (batch,) and 1 <= splits.width <= width and width & (width - 1) == 0
    num_splits, cap = splits.counts, splits.cap
    assert tree is None or (window is None and tree.starts.shape == (batch,) and tree.bits.shape == (batch,))
    out = torch.empty_like(q)
    if batch == 0:
        return out
    ieee = k_cache.dtype == torch.float32
    pdl = pdl_launch_args(q.device)
    tree_starts, tree_bits = (tree.starts, tree.bits) if tree is not None else (seq_lens, seq_lens)  # unread then
    derived = not guard_on("one-plan")  # off (seed 001): the combine step counts splits itself, past the grid's
    _decode_partial_kernel[(batch, kv_heads, cap)](
        q, k_cache, v_cache, req_to_token, req_rows, seq_lens, num_splits, partial_out, partial_lse, out,
        tree_starts, tree_bits, page_map if page_map is not None else seq_lens, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_lse.stride(0),
        partial_lse.stride(1), out.stride(0), out.stride(1), scale, window or 0, softcap or 0.0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK=BLOCK_N, IEEE=ieee,
        TREE=tree is not None, SOFTCAP=softcap is not None, MAPPED=page_map is not None, PAGE_SIZE=page_size,
        **pdl)
    if cap == 1 and not derived:  # every request was one split: the partial kernel wrote the output itself
        return out
    _decode_combine_kernel[(batch, heads)](
        partial_out, partial_lse, num_splits, out, seq_lens, partial_out.stride(0), partial_out.stride(1),
        partial_out.stride(2), partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1), window or 0,
        HEAD_DIM=head_dim, MAX_SPLITS_C=width, DERIVED=derived, MIN_KEYS=MIN_KEYS_PER_SPLIT,
        **pdl)
    return out
