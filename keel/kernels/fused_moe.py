"""Fused mixture-of-experts: routing, tokens grouped by expert, and one grouped-GEMM launch per projection.

Each token goes to its top-k experts, so the batch is T * k (token, expert) pairs. `align_by_expert` sorts the
pairs by expert and pads each expert's group to a multiple of BLOCK_M, so every block of BLOCK_M sorted pairs
belongs to one expert; all of it runs on the device with buffers sized from T, k and the expert count alone (no
host sync, so it can be captured in a CUDA graph). Then two launches of `_expert_gemm_kernel`, each program one
block of pairs times one tile of output columns, reading its expert's weights:
  1. x[token] @ w13[e].T, gate and up columns of the tile in one program, storing silu(gate) * up;
  2. that @ w2[e].T, scaled by the pair's routing weight;
and the k weighted rows of each token are summed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # pairs per block; each expert's group is padded to a multiple of it


def align_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pairs [P] int64: pair index t * k + j, or T * k for padding; the expert of each block of BLOCK_M
    [P / BLOCK_M] int64, num_experts for blocks past the last group). P = T * k + num_experts * (BLOCK_M - 1),
    rounded up to BLOCK_M: the most any routing can need."""
    flat = ids.flatten()
    pairs = flat.numel()
    # scatter_add, not bincount: bincount reads the largest id back to the host, which a CUDA graph cannot hold
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    group_ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(pairs, device=ids.device) - (torch.cumsum(counts, 0) - counts)[experts]
    size = triton.cdiv(pairs + num_experts * (BLOCK_M - 1), BLOCK_M) * BLOCK_M
    sorted_pairs = torch.full((size,), pairs, dtype=torch.int64, device=ids.device)
    sorted_pairs[group_ends[experts] - padded[experts] + rank] = order
    block_starts = torch.arange(0, size, BLOCK_M, device=ids.device)
    block_expert = torch.searchsorted(group_ends, block_starts, right=True)
    return sorted_pairs, block_expert


@triton.jit
def _expert_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, weights_ptr,
                        num_pairs, N, K, stride_am, stride_we, stride_wn, stride_om,
                        TOP_K: tl.constexpr, ROWS_ARE_TOKENS: tl.constexpr, GATED: tl.constexpr,
                        SCALED: tl.constexpr, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """out[pair, n] = a[row] @ w[e, n].T for one block of pairs (all of expert e) and one tile of n. Rows of `a`
    are tokens (pair // TOP_K) or pairs. GATED: w holds [gate; up] rows (2N of them): out = silu(gate) * up.
    SCALED: out *= the pair's routing weight."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= NUM_EXPERTS:
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = pairs // TOP_K if ROWS_ARE_TOKENS else pairs
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + kk[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_expert + n[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None],
                    other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
        if GATED:
            w_up = tl.load(w_expert + (N + n[None, :]).to(tl.int64) * stride_wn + kk[:, None],
                           mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if IEEE:
                up += tl.dot(a, w_up, input_precision="ieee")
            else:
                up += tl.dot(a, w_up)
    if GATED:
        acc = acc * tl.sigmoid(acc) * up
    if SCALED:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for each token t, where expert e is the gated MLP
    w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)). x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; weights and ids
    [T, k] (keel.models.layers.moe.route); an id of E (an expert another rank holds) contributes nothing. Returns
    [T, H] in x's dtype."""
    tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = ids.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    sorted_pairs, block_expert = align_by_expert(ids, num_experts + 1)  # blocks of expert E are skipped
    pairs = tokens * top_k
    gated = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    down = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)  # pairs of skipped experts stay 0
    ieee = x.dtype == torch.float32
    flat_weights = weights.flatten().to(torch.float32).contiguous()
    for a, w, out, n, k, first in ((x, w13, gated, inter, hidden, True), (gated, w2, down, hidden, inter, False)):
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        block_k = min(64, max(16, triton.next_power_of_2(k)))
        grid = (block_expert.numel(), triton.cdiv(n, block_n))
        _expert_gemm_kernel[grid](a, w, out, sorted_pairs, block_expert, flat_weights, pairs, n, k, a.stride(0),
                                  w.stride(0), w.stride(1), out.stride(0), TOP_K=top_k, ROWS_ARE_TOKENS=first,
                                  GATED=first, SCALED=not first, NUM_EXPERTS=num_experts, BLOCK_M=BLOCK_M,
                                  BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee)
    return down.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
