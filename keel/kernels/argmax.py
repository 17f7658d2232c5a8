"""Row-wise argmax of float32 logits (greedy sampling).

torch's reduction runs a single [1, 128256] row in one block, 28 us on an H200, and so does a
one-program Triton loop (each chunk waits on the last one's load). Here many programs each take
a chunk of a row and a second launch picks the best of the chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keel.kernels.pdl import pdl_launch_args, pdl_wait

CHUNK = 2048


@triton.jit
def _chunk_argmax_kernel(x_ptr, best_ptr, best_at_ptr, n, stride_x, num_chunks, CHUNK_C: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK_C + tl.arange(0, CHUNK_C)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    top = tl.max(x, 0)
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(best_at_ptr + row * num_chunks + chunk, tl.min(tl.where(x == top, cols, n), 0))


@triton.jit
def _pick_chunk_kernel(best_ptr, best_at_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_PAD)
    used = c < num_chunks
    best = tl.load(best_ptr + row * num_chunks + c, mask=used, other=float("-inf"))
    best_at = tl.load(best_at_ptr + row * num_chunks + c, mask=used, other=0)
    top = tl.max(best, 0)
    # the first chunk holding the maximum holds its first index; an all -inf row gives chunk 0's 0
    first = tl.min(tl.where(used & (best == top), c, CHUNKS_PAD), 0)
    tl.store(out_ptr + row, tl.sum(tl.where(c == first, best_at, 0), 0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, n] float32 -> [rows] int64, the first index of each row's maximum, as torch.argmax
    (except that NaNs are skipped, where torch would pick them)."""
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    chunk = min(CHUNK, triton.next_power_of_2(n))
    num_chunks = triton.cdiv(n, chunk)
    best = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    best_at = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    _chunk_argmax_kernel[(rows, num_chunks)](x, best, best_at, n, x.stride(0), num_chunks, CHUNK_C=chunk, num_warps=4,
                                             **pdl_launch_args(x.device))
    return pick_chunk(best, best_at, out)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: `argmax_rows` for float32 logits on a GPU, torch's elsewhere."""
    if logits.is_cuda and logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1:
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def pick_chunk(best: torch.Tensor, best_at: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The second launch of a chunked argmax: `out[r]` = best_at[r, c] of the first chunk c holding row r's maximum
    (best, best_at: [rows, chunks] float32 and int32)."""
    rows, num_chunks = best.shape
    _pick_chunk_kernel[(rows,)](best, best_at, out, num_chunks, CHUNKS_PAD=triton.next_power_of_2(num_chunks),
                                **pdl_launch_args(out.device))
    return out
