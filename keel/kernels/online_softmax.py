"""One step of the online (streaming) softmax that both Triton attention kernels run per key block, and the
draft-tree visibility rule both apply.

Decode and extend attention differ only in which (query, key) pairs are visible and in how they find
their keys; the update of the running max, running sum and accumulator is this one function.
"""

from __future__ import annotations

import triton
import triton.language as tl


LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def online_softmax_step(q, k_ptrs, v_ptrs, key_ok, visible, m_i, l_i, acc, scale, softcap, IEEE: tl.constexpr,
                        SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """Fold one block of keys into the running state and return the new (m_i, l_i, acc), all float32.

    q: [rows, head_dim]; k_ptrs / v_ptrs: [keys, head_dim] addresses of the block's K and V; key_ok: [keys],
    which keys exist (the others load as zeros); visible: [rows, keys], which scores count (the others are
    -inf). m_i / l_i: [rows] running max and sum of exp; acc: [rows, head_dim] running sum of p @ v. Scores are
    kept in base 2 (times log2 e: exp2 is the hardware's instruction), m_i too, so a row's log-sum-exp is
    m_i + log2(l_i). A row that has seen no visible key keeps m_i == -inf, l_i == 0 and acc == 0 (its
    exponentials are taken against 0).
    IEEE: float32 caches, dot products in full float32 precision rather than TF32. SOFTCAP: scores become
    softcap * tanh(score / softcap) (Gemma 2), before the mask. MASKED False: every key exists and every score
    counts (key_ok and visible are not read), as for the keys before a prefill block's first query.
    """
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        qk = qk * scale
        qk = softcap * (2.0 * tl.sigmoid(2.0 * qk / softcap) - 1.0)  # tanh, in terms every Triton version has
        qk = qk * LOG2E
    else:
        qk = qk * (scale * LOG2E)
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    # the loop-carried state stays float32 whatever the cache dtype (a no-op cast where it already is)
    return m_new.to(tl.float32), l_i.to(tl.float32), acc.to(tl.float32)


@triton.jit
def in_tree_path(key_pos, tree_start, tree_bits):
    """Which keys (table positions `key_pos`) a draft-tree token sees: all before its tree's root (`tree_start`),
    and within the tree those whose bit is set in `tree_bits` (its ancestors and itself). Shapes broadcast."""
    rel = key_pos - tree_start
    in_tree = rel >= 0
    bit = (tree_bits >> tl.where(in_tree, rel, 0).to(tl.int64)) & 1
    return (~in_tree) | (bit != 0)


@triton.jit
def mapped_slots(page_map_ptr, slots, valid, PAGE_SIZE: tl.constexpr):
    """Sliding-window pool slots of request-table (full pool) `slots`, through the full->SWA page map; a page
    without an SWA page reads the pool's reserved page 0."""
    pages = tl.load(page_map_ptr + slots // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    return pages * PAGE_SIZE + slots % PAGE_SIZE
