"""silu(gate) * up for a fused [gate | up] projection, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keel.kernels.interpreter import rows_per_program

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, rows, n, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    mask = (row < rows) & (cols < n)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, 2n] -> [rows, n]."""
    rows, width = x.shape
    n = width // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block_rows = rows_per_program(x.device.type, rows)
        block_cols = min(BLOCK, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(triton.cdiv(rows, block_rows), triton.cdiv(n, block_cols))](
            x, out, x.stride(0), out.stride(0), rows, n, BLOCK_C=block_cols, ROWS=block_rows)
    return out
