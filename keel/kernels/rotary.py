"""Rotary embedding of q and k in place (rotate-half layout), one token per program, in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(base, stride_h, heads, cos, sin, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    first = base + h * stride_h + d
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, num_q_heads, num_k_heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_c + d)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + d)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, HEADS_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_k_heads, cos, sin, HALF, HEADS_PAD)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
    """Rotate q [tokens, heads, dim] and k [tokens, kv_heads, dim] in place; cos/sin: [positions, dim] float32."""
    tokens, heads, dim = q.shape
    if tokens:
        _rotary_kernel[(tokens,)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                  cos.stride(0), heads, k.shape[1], HALF=dim // 2,
                                  HEADS_PAD=triton.next_power_of_2(max(heads, k.shape[1])))
