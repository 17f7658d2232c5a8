"""Matrix-vector products for batch-1 decode, with the ops around them fused in.

At one row a projection is a pure weight read. cuBLAS's kernels for llama-3.1-8b's shapes reach
59-96 % of HBM bandwidth on an H200; this kernel gives each program a few whole output columns
(no split-K) and reaches 76-100 % on the same shapes (docs/benchmarks.md).
Owning whole columns also lets the epilogue finish the job: the RMSNorm of the input (its scale
is accumulated in the same pass over the input), the bias, silu(gate) * up for a fused gate/up
projection, and the residual add. A decoder layer's projections then need no norm, activation
or add kernels between them.

A few rows (a speculative verify of 4 tokens, a small decode batch) take a second kernel: each
weight tile is read once for all rows and multiplied on the tensor cores, with the same fusions.
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
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, norm_ptr, out_ptr, N, K, eps,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATE_UP: tl.constexpr, ADD: tl.constexpr,
                 EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # One row: each program owns BLOCK_N whole output columns.
    pdl_wait(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    w_tile = w_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :]
    up_tile = w_tile + N * K  # GATE_UP: the up rows follow the gate rows
    x_row = x_ptr + ks
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
        out += tl.load(out_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, bias_ptr, norm_ptr, out_ptr, ROWS, N, K, stride_x, stride_o, eps,
                      HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATE_UP: tl.constexpr, ADD: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr):
    # A few rows: each weight tile is read once for all of them and multiplied on the tensor cores as
    # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_R], the rows padded with zeros to the smallest tile. The norm as in
    # the one-row kernel: x * norm weight goes into the product, each row's scale multiplies the result.
    pdl_wait(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    row_ok = rows < ROWS
    w_tile = w_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :]
    up_tile = w_tile + N * K  # GATE_UP: the up rows follow the gate rows
    x_tile = x_ptr + rows[None, :] * stride_x + ks[:, None]  # x transposed: [BLOCK_K, BLOCK_R]
    acc = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_R], tl.float32)
    squares = tl.zeros([BLOCK_K, BLOCK_R], tl.float32)
    for k in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K
        x = tl.load(x_tile + k, mask=row_ok[None, :], other=0.0)
        if NORM:
            x32 = x.to(tl.float32)
            squares += x32 * x32
            x = (x32 * tl.load(norm_ptr + k + ks).to(tl.float32)[:, None]).to(x_ptr.dtype.element_ty)
        w = tl.load(w_tile + k, mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
        if GATE_UP:
            up = tl.load(up_tile + k, mask=col_ok[:, None], other=0.0, eviction_policy="evict_first")
            acc_up = tl.dot(up, x, acc_up, input_precision=PRECISION)
    if NORM:
        scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)[None, :]
        acc *= scale
        acc_up *= scale
    out = acc
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if GATE_UP:
        out = out / (1.0 + tl.exp(-out)) * acc_up
    out_tile = out_ptr + rows[None, :] * stride_o + cols[:, None]
    ok = col_ok[:, None] & row_ok[None, :]
    if ADD:  # into out itself: each element is read and written by this program only
        out += tl.load(out_tile, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=ok)


ROWS_TILE = 16  # rows per program of the several-row kernel: the smallest tensor-core tile


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` is the faster path for x @ weight.T: up to ROWS_TILE rows (a speculative verify, a
    small decode batch; from 2 rows on the several-row kernel, measured against cuBLAS in
    docs/benchmarks.md) and K in blocks of at least 16."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= ROWS_TILE and x.stride(1) == 1 and weight.is_contiguous()
            and weight.shape[1] % 16 == 0)


FEW_COLUMNS = 512  # at most this many output columns: four a program would leave most SMs idle


def gemv_config(k: int, norm: bool, gate_up: bool, n: int) -> GemvConfig:
    """The one-row kernel's best tiles measured for each kind on an H200 at llama-3.1-8b sizes (docs/benchmarks.md).
    Few columns (a MoE router: 128) take two a program and longer K blocks: qwen3-30b-a3b's router 2.97 -> 1.82 us."""
    # k & -k, the largest power of two dividing k: the K loop needs no mask
    if n <= FEW_COLUMNS and not gate_up:
        return GemvConfig(block_n=2, block_k=min(1024, k & -k), num_warps=4, num_stages=2)
    block_k = min(512 if norm or gate_up else 1024, k & -k)
    return GemvConfig(block_n=4, block_k=block_k, num_warps=4 if gate_up else 1 if norm else 2, num_stages=2)


def gemv_rows_config(k: int, gate_up: bool, itemsize: int = 2) -> GemvConfig:
    """The several-row kernel's tiles, the best of a sweep at llama-3.1-8b sizes (bfloat16) on an H200
    (docs/benchmarks.md). Wider elements take narrower K blocks: the same shared memory per stage, which the
    tuned stage counts fill (float32 at bfloat16's block_k asked for 261 KiB, beyond an H200's 227 KiB)."""
    block_k = max(16, min(256, k & -k) * 2 // max(itemsize, 2))
    if gate_up:  # two tiles in flight per stage
        return GemvConfig(block_n=64, block_k=block_k, num_warps=4, num_stages=3)
    # Measured at 2-16 rows: llama-3.1-8b's down projection (K 14336) 30.9-31.7 -> 29.7-30.6 us with half-width
    # tiles; EAGLE-3's fc (K 12288) lost with them (26.5 -> 31.7 us at 4 rows), so only longer K takes them.
    if k > 12288:
        return GemvConfig(block_n=32, block_k=block_k, num_warps=2, num_stages=6)
    return GemvConfig(block_n=64, block_k=block_k, num_warps=4, num_stages=4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0, add_to: Optional[torch.Tensor] = None,
         gate_up: bool = False, out_dtype: Optional[torch.dtype] = None,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(rms_norm(x) @ weight.T + bias) for x: [rows, K], weight: [N, K], as a new [rows, N]
    tensor of `out_dtype` (default x's dtype), or written into `out`, or added into `add_to` in place, and
    returned.

    Each part is optional: the norm when `norm_weight` is given (with `eps`), and with `gate_up`
    the weight is [gate; up] (2N rows) and act(g, u) = silu(g) * u. Correct for any rows, fast for
    up to ROWS_TILE (`gemv_applies`).
    """
    rows, k = x.shape
    n = weight.shape[0] // 2 if gate_up else weight.shape[0]
    if weight.shape[1] != k or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"gemv needs a contiguous [N, {k}] weight and unit-stride rows; got {tuple(weight.shape)}")
    for name, given in (("add_to", add_to), ("out", out)):
        if given is not None and (given.shape != (rows, n) or given.stride(1) != 1):
            raise ValueError(f"{name} must be [{rows}, {n}] with unit-stride rows, got {tuple(given.shape)}")
    if add_to is not None:
        out = add_to
    elif out is None:
        out = torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    bias_or_any = bias if bias is not None else weight
    parts = dict(HAS_BIAS=bias is not None, GATE_UP=gate_up, ADD=add_to is not None)
    if rows == 1:
        config = gemv_config(k, norm_weight is not None, gate_up, n)
        _gemv_kernel[(triton.cdiv(n, config.block_n),)](
            x, weight, bias_or_any, norm_weight if norm_weight is not None else weight, out, n, k, eps, **parts,
            NORM=norm_weight is not None, EVEN_N=n % config.block_n == 0, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
            **pdl_launch_args(x.device))
    elif rows:
        config = gemv_rows_config(k, gate_up, x.element_size())
        _gemv_rows_kernel[(triton.cdiv(n, config.block_n), triton.cdiv(rows, ROWS_TILE))](
            x, weight, bias_or_any, norm_weight if norm_weight is not None else weight, out, rows, n, k, x.stride(0),
            out.stride(0), eps, **parts, NORM=norm_weight is not None,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_R=ROWS_TILE, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
            **pdl_launch_args(x.device))
    return out
