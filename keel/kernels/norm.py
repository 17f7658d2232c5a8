"""RMSNorm: one row per program on a GPU, a block of rows under the CPU interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keel.kernels.interpreter import rows_per_program
from keel.kernels.pdl import pdl_launch_args, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, stride_x, stride_o, rows, n, eps, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    offs = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (offs < n)
    x32 = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, 1) / n + eps)[:, None]
    weight = tl.load(weight_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x32 * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(x) * weight for x: [rows, n]."""
    rows, n = x.shape
    out = torch.empty_like(x)
    if rows:
        block_rows = rows_per_program(x.device.type, rows)
        _rms_norm_kernel[(triton.cdiv(rows, block_rows),)](
            x, weight, out, x.stride(0), out.stride(0), rows, n, eps, BLOCK=triton.next_power_of_2(n), ROWS=block_rows,
            **pdl_launch_args(x.device))
    return out
