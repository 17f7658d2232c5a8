"""The sampler's keyed random numbers, computed where they are used.

The sampler draws with the exponential race: the argmax over tokens of p / E, with E = -log(u) and u a hash of
(request seed, step, token id) (keel.runner.sampler). In torch the hash is ~25 elementwise kernels over [rows,
vocab] int64 tensors: 4.7 ms a step at batch 256 and a 152k vocabulary on an H200 (docs/benchmarks.md). Here the
race is one pass over the probabilities (per chunk of a row, then argmax_rows' pick of the chunks), and
`keyed_uniform` one elementwise kernel. The hash and u's float32 grid are the sampler's, so u is the same bit for
bit; E uses libdevice's logf, the log torch's CUDA kernels call.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from keel.kernels.argmax import CHUNK, pick_chunk
from keel.kernels.pdl import pdl_launch_args, pdl_wait


@triton.jit
def _mix32(x):
    # values in [0, 2**32) (int64): the products stay below 2**63
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@triton.jit
def _row_key(seed, step):
    return _mix32(_mix32(_mix32(seed & 0xFFFFFFFF) ^ (seed >> 32)) ^ (step & 0xFFFFFFFF))


@triton.jit
def _uniform(row_key, token_ids):
    bits = _mix32(row_key ^ _mix32(token_ids))
    return ((bits >> 9).to(tl.float32) + 0.5) * (2.0 ** -23)  # exact in float32, as the sampler's


@triton.jit
def _uniform_kernel(seeds_ptr, steps_ptr, ids_ptr, out_ptr, m, stride_i0, stride_i1, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < m
    ids = tl.load(ids_ptr + row * stride_i0 + cols * stride_i1, mask=ok, other=0).to(tl.int64)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    tl.store(out_ptr + row * m + cols, _uniform(key, ids), mask=ok)


@triton.jit
def _race_chunk_kernel(p_ptr, ids_ptr, seeds_ptr, steps_ptr, best_ptr, best_at_ptr, n, stride_p, stride_i, num_chunks,
                       HAS_IDS: tl.constexpr, CHUNK_C: tl.constexpr, COMPILED: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK_C + tl.arange(0, CHUNK_C)
    ok = cols < n
    p = tl.load(p_ptr + row * stride_p + cols, mask=ok, other=0.0)
    if HAS_IDS:
        ids = tl.load(ids_ptr + row * stride_i + cols, mask=ok, other=0).to(tl.int64)
    else:
        ids = cols.to(tl.int64)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    u = _uniform(key, ids)
    # the race is won where E is tiny (u near 1): an approximate log's absolute error there changes the winner
    noise = -libdevice.log(u) if COMPILED else -tl.log(u)  # (the interpreter's log is numpy's, precise)
    score = tl.where(ok, p / noise, float("-inf"))
    top = tl.max(score, 0)
    tl.store(best_ptr + row * num_chunks + chunk, top)
    tl.store(best_at_ptr + row * num_chunks + chunk, tl.min(tl.where(score == top, cols, n), 0))


def keyed_uniform(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[n, m] float32 uniform noise in (0, 1) of (seeds[i], steps[i], token_ids[i, j]), as the sampler's."""
    n, m = token_ids.shape
    out = torch.empty(n, m, dtype=torch.float32, device=token_ids.device)
    if n and m:
        block = min(1024, triton.next_power_of_2(m))
        _uniform_kernel[(n, triton.cdiv(m, block))](seeds.to(torch.int64).contiguous(),
                                                   steps.to(torch.int64).contiguous(), token_ids, out, m,
                                                   token_ids.stride(0), token_ids.stride(1), BLOCK=block)
    return out


def race_argmax(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[n] int64: each row's column c maximising probs[c] / -log(u(seed, step, token id of c)), the first on ties;
    the token id of column c is c, or token_ids[row, c] (probs sorted, with their ids)."""
    rows, n = probs.shape
    out = torch.empty(rows, dtype=torch.int64, device=probs.device)
    if rows == 0:
        return out
    if probs.stride(1) != 1 or (token_ids is not None and (token_ids.shape != probs.shape or token_ids.stride(1) != 1)):
        raise ValueError("race_argmax needs unit-stride rows, and token ids shaped like the probabilities")
    chunk = min(CHUNK, triton.next_power_of_2(n))
    num_chunks = triton.cdiv(n, chunk)
    best = torch.empty(rows, num_chunks, dtype=torch.float32, device=probs.device)
    best_at = torch.empty(rows, num_chunks, dtype=torch.int32, device=probs.device)
    ids = token_ids if token_ids is not None else probs
    _race_chunk_kernel[(rows, num_chunks)](
        probs, ids, seeds.to(torch.int64).contiguous(), steps.to(torch.int64).contiguous(), best, best_at, n,
        probs.stride(0), ids.stride(0), num_chunks, HAS_IDS=token_ids is not None, CHUNK_C=chunk,
        COMPILED=probs.is_cuda, num_warps=4, **pdl_launch_args(probs.device))
    return pick_chunk(best, best_at, out)
