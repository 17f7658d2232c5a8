"""Rotary embedding (rotate-half layout) fused with the KV store, in float32: one token per program on a GPU, a
block of tokens under the CPU interpreter.

q is rotated in place; k is rotated on its way into the KV cache and v copied there, so a layer
spends one launch on what was a rotary launch and a store launch (2 and 1 us at batch 1 on an H200).
Models that normalise each head of q and k first (Qwen3) have that RMSNorm applied here too, before
the rotation: two launches fewer per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from keel.kernels.interpreter import rows_per_program
from keel.kernels.pdl import pdl_launch_args, pdl_wait


@triton.jit
def _rotate_heads(src, src_stride_h, dst, dst_stride_h, heads, tokens_ok, cos, sin, norm_ptr, eps,
                  HALF: tl.constexpr, HEADS_PAD: tl.constexpr, NORM: tl.constexpr):
    """src / dst: [TOKENS, 1, 1] pointers to each token's first head; cos / sin: [TOKENS, 1, HALF]."""
    h = tl.arange(0, HEADS_PAD)[None, :, None]
    d = tl.arange(0, HALF)[None, None, :]
    mask = tokens_ok & (h < heads)
    x1 = tl.load(src + h * src_stride_h + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * src_stride_h + d + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # RMSNorm over each head's 2 * HALF values, as keel.kernels.norm computes it
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, 2) + tl.sum(x2 * x2, 2)) / (2 * HALF) + eps)[:, :, None]
        x1 = x1 * inv_rms * tl.load(norm_ptr + d).to(tl.float32)
        x2 = x2 * inv_rms * tl.load(norm_ptr + d + HALF).to(tl.float32)
    tl.store(dst + h * dst_stride_h + d, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + h * dst_stride_h + d + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, loc_ptr, positions_ptr, cos_ptr, sin_ptr,
                         q_norm_ptr, k_norm_ptr, eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                         stride_vh, stride_ct, stride_ch, stride_c, tokens, num_q_heads, num_kv_heads,
                         HALF: tl.constexpr, HEADS_PAD: tl.constexpr, TOKENS: tl.constexpr, NORM: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    token = (tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS))[:, None, None]
    ok = token < tokens
    pos = tl.load(positions_ptr + token, mask=ok, other=0).to(tl.int64)
    slot = tl.load(loc_ptr + token, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, HALF)[None, None, :]
    cos = tl.load(cos_ptr + pos * stride_c + d, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_c + d, mask=ok, other=0.0)
    q = q_ptr + token * stride_qt
    _rotate_heads(q, stride_qh, q, stride_qh, num_q_heads, ok, cos, sin, q_norm_ptr, eps, HALF, HEADS_PAD, NORM)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, k_cache_ptr + slot * stride_ct, stride_ch, num_kv_heads,
                  ok, cos, sin, k_norm_ptr, eps, HALF, HEADS_PAD, NORM)
    h = tl.arange(0, HEADS_PAD)[None, :, None]
    dv = tl.arange(0, 2 * HALF)[None, None, :]
    mask = ok & (h < num_kv_heads)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + dv, mask=mask)
    tl.store(v_cache_ptr + slot * stride_ct + h * stride_ch + dv, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotate_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor,
                     head_norms: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None) -> None:
    """Rotate q [tokens, heads, dim] in place; write rotated k and v ([tokens, kv_heads, dim]) into
    the caches ([slots, kv_heads, dim]) at slots `loc`. cos/sin: [positions, dim] float32.
    `head_norms` (q weight, k weight, eps): RMSNorm each head of q and k before rotating it."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 0:
        return
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    q_norm, k_norm, eps = head_norms if head_norms is not None else (cos, cos, 0.0)  # unread without NORM
    block = rows_per_program(q.device.type, tokens)
    _rotary_store_kernel[(triton.cdiv(tokens, block),)](
        q, k, v, k_cache, v_cache, loc, positions, cos, sin, q_norm, k_norm, eps, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), cos.stride(0),
        tokens, heads, kv_heads, HALF=dim // 2, HEADS_PAD=triton.next_power_of_2(max(heads, kv_heads)), TOKENS=block,
        NORM=head_norms is not None, **pdl_launch_args(q.device))
