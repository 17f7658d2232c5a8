"""RMSNorm with an optional fused residual add, one row per program."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, stride_x, stride_r, stride_o, stride_s,
                     n, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the residual stream is kept in the model dtype, as the unfused layers do
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * stride_s + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x32 * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(norm(x + residual) * weight, x + residual); without a residual, (norm(x) * weight, None). x: [rows, n]."""
    rows, n = x.shape
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    if rows:
        _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out,
                                  summed if summed is not None else out, x.stride(0),
                                  residual.stride(0) if residual is not None else 0, out.stride(0),
                                  summed.stride(0) if summed is not None else 0, n, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out, summed
