"""Matrix-vector products for batch-1 decode, with the ops around them fused in.

At one row a projection is a pure weight read. cuBLAS's kernels for llama-3.1-8b's shapes reach
59-96 % of HBM bandwidth on an H200; this kernel gives each program a few whole output columns
(no split-K) and reaches 76-100 % on the same shapes (docs/benchmarks.md).
Owning whole columns also lets the epilogue finish the job: the RMSNorm of the input (its scale
is accumulated in the same pass over the input), the bias, silu(gate) * up for a fused gate/up
projection, and the residual add. A decoder layer's projections then need no norm, activation
or add kernels between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from keel.kernels.pdl import pdl_launch_args, pdl_wait


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, norm_ptr, out_ptr, ROWS, N, K, stride_x, stride_o,
                 eps, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATE_UP: tl.constexpr, ADD: tl.constexpr,
                 EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # One row per program; the programs of one column block are adjacent, so a second row mostly
    # finds the weight tile in L2 (still slower than cuBLAS from two rows on: see gemv_applies).
    pdl_wait(PDL)
    row = tl.program_id(0) % ROWS
    cols = tl.program_id(0) // ROWS * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    w_tile = w_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :]
    up_tile = w_tile + N * K  # GATE_UP: the up rows follow the gate rows
    x_row = x_ptr + row * stride_x + ks
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        x = tl.load(x_row + k).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k + ks).to(tl.float32)
        if EVEN_N:
            w = tl.load(w_tile + k, eviction_policy="evict_first")
        else:
            w = tl.load(w_tile + k, mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        if GATE_UP:
            if EVEN_N:
                up = tl.load(up_tile + k, eviction_policy="evict_first")
            else:
                up = tl.load(up_tile + k, mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
            acc_up += up.to(tl.float32) * x[None, :]
    out = tl.sum(acc, 1)
    if NORM:  # rms_norm(x) @ W == (x * norm_weight) @ W / rms(x): one scale per row
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
        out = out * inv_rms
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GATE_UP:
        up_out = tl.sum(acc_up, 1)
        if NORM:
            up_out = up_out * inv_rms
        out = out / (1.0 + tl.exp(-out)) * up_out
    if ADD:  # into out itself: each element is read and written by this program only
        out += tl.load(out_ptr + row * stride_o + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` is the faster path for x @ weight.T: a single row (from two rows on, cuBLAS
    was faster on an H200) and K in blocks of at least 16."""
    return x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] % 16 == 0


def gemv_config(k: int, norm: bool, gate_up: bool) -> GemvConfig:
    """The best tiles measured for each kind on an H200 at llama-3.1-8b sizes (docs/benchmarks.md)."""
    # k & -k, the largest power of two dividing k: the K loop needs no mask
    block_k = min(512 if norm or gate_up else 1024, k & -k)
    return GemvConfig(block_n=4, block_k=block_k, num_warps=4 if gate_up else 1 if norm else 2, num_stages=2)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0, add_to: Optional[torch.Tensor] = None,
         gate_up: bool = False, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """act(rms_norm(x) @ weight.T + bias) for x: [rows, K], weight: [N, K], as a new [rows, N]
    tensor of `out_dtype` (default x's dtype), or added into `add_to` in place and returned.

    Each part is optional: the norm when `norm_weight` is given (with `eps`), and with `gate_up`
    the weight is [gate; up] (2N rows) and act(g, u) = silu(g) * u. Correct for any rows, but
    each row reads the weight again: fast at one row only (`gemv_applies`).
    """
    rows, k = x.shape
    n = weight.shape[0] // 2 if gate_up else weight.shape[0]
    if weight.shape[1] != k or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"gemv needs a contiguous [N, {k}] weight and unit-stride rows; got {tuple(weight.shape)}")
    if add_to is not None and (add_to.shape != (rows, n) or add_to.stride(1) != 1):
        raise ValueError(f"add_to must be [{rows}, {n}] with unit-stride rows, got {tuple(add_to.shape)}")
    config = gemv_config(k, norm_weight is not None, gate_up)
    out = add_to if add_to is not None else torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    if rows:
        _gemv_kernel[(rows * triton.cdiv(n, config.block_n),)](
            x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
            out, rows, n, k, x.stride(0), out.stride(0), eps,
            HAS_BIAS=bias is not None, NORM=norm_weight is not None, GATE_UP=gate_up, ADD=add_to is not None,
            EVEN_N=n % config.block_n == 0, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_args(x.device))
    return out
