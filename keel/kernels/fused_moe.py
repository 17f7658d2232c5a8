"""Fused mixture-of-experts: routing, tokens grouped by expert, and one grouped-GEMM launch per projection.

Each token goes to its top-k experts, so the batch is T * k (token, expert) pairs. `align_by_expert` sorts the
pairs by expert and pads each expert's group to a multiple of BLOCK_M, so every block of BLOCK_M sorted pairs
belongs to one expert; all of it runs on the device with buffers sized from T, k and the expert count alone (no
host sync, so it can be captured in a CUDA graph). Then two launches of `_expert_gemm_kernel`, each program one
block of pairs times one tile of output columns, reading its expert's weights:
  1. x[token] @ w13[e].T, gate and up columns of the tile in one program, storing silu(gate) * up;
  2. that @ w2[e].T, scaled by the pair's routing weight;
and the k weighted rows of each token are summed.

With few pairs (batch-1 decode: k pairs, each of a different expert) sorting costs more than it saves: a dozen
small launches per layer, and a tensor-core tile that is 1/16 used. There each pair runs directly as GEMV programs
streaming its expert's rows like keel's dense GEMV (`_moe_unsorted`); `fused_route` does the routing in one
launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keel.kernels.gemv import gemv_config

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


@triton.jit
def _expert_gemv_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, N, K, stride_a, stride_we, stride_wn,
                        stride_o, TOP_K: tl.constexpr, GATED: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One pair and one tile of n (K a multiple of BLOCK_K); pairs of an expert this rank does not hold (id
    NUM_EXPERTS) are skipped. GATED: out[pair, n] = silu(x[token] . gate[n]) * (x[token] . up[n]), gate and up rows
    loaded in the same iteration; else out[pair, n] = weight[pair] * (a[pair] . w2[expert, n]). As in keel's dense
    GEMV, products are summed over k once, at the end. (Summing a token's k pairs inside the down projection's
    programs was slower at top-8: each program then reads k experts' tiles, a few rows of short runs each.)"""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair)
    if expert >= NUM_EXPERTS:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = w_ptr + expert.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn
    a_row = a_ptr + ((pair // TOP_K) if GATED else pair).to(tl.int64) * stride_a
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_row + kk).to(tl.float32)
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * a[None, :]
        if GATED:
            w_up = tl.load(rows + N.to(tl.int64) * stride_wn + kk[None, :], mask=n_ok[:, None], other=0.0,
                           eviction_policy="evict_first")
            up += w_up.to(tl.float32) * a[None, :]
    out = tl.sum(acc, 1)
    if GATED:
        out = out * tl.sigmoid(out) * tl.sum(up, 1)
    else:
        out = out * tl.load(weights_ptr + pair)
    tl.store(out_ptr + pair.to(tl.int64) * stride_o + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """keel.models.layers.moe.route for one token in one program: softmax over the experts in float32, the top k
    (largest first, ties to the lower id), rescaled to sum to 1 when RENORMALIZE."""
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + t * stride_l + e, mask=e < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(logits - tl.max(logits, 0))
    p = p / tl.sum(p, 0)
    slot = tl.arange(0, K_PAD)
    chosen = tl.zeros([K_PAD], tl.float32)
    chosen_ids = tl.zeros([K_PAD], tl.int64)
    for j in range(TOP_K):
        best = tl.max(p, 0)
        best_id = tl.min(tl.where(p == best, e, BLOCK_E), 0)
        chosen = tl.where(slot == j, best, chosen)
        chosen_ids = tl.where(slot == j, best_id.to(tl.int64), chosen_ids)
        p = tl.where(e == best_id, -1.0, p)
    if RENORMALIZE:
        chosen = chosen / tl.sum(chosen, 0)
    tl.store(weights_ptr + t * TOP_K + slot, chosen, mask=slot < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slot, chosen_ids, mask=slot < TOP_K)


def fused_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """route() in one launch (it is five or six torch kernels, a cost every layer pays at batch 1)."""
    tokens, num_experts = router_logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens:
        _route_kernel[(tokens,)](router_logits, weights, ids, num_experts, router_logits.stride(0), TOP_K=top_k,
                                 K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
                                 BLOCK_E=triton.next_power_of_2(num_experts))
    return weights, ids


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
    pairs = tokens * top_k
    gated = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    flat_weights = weights.flatten().to(torch.float32).contiguous()
    if pairs <= max(top_k, num_experts // 4):  # few pairs, mostly of distinct experts: no sorting
        return _moe_unsorted(x, w13, w2, flat_weights, ids.flatten().contiguous(), gated)
    sorted_pairs, block_expert = align_by_expert(ids, num_experts + 1)  # blocks of expert E are skipped
    down = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)  # pairs of skipped experts stay 0
    ieee = x.dtype == torch.float32
    for a, w, out, n, k, first in ((x, w13, gated, inter, hidden, True), (gated, w2, down, hidden, inter, False)):
        block_n = min(64, max(16, triton.next_power_of_2(n)))
        block_k = min(64, max(16, triton.next_power_of_2(k)))
        grid = (block_expert.numel(), triton.cdiv(n, block_n))
        _expert_gemm_kernel[grid](a, w, out, sorted_pairs, block_expert, flat_weights, pairs, n, k, a.stride(0),
                                  w.stride(0), w.stride(1), out.stride(0), TOP_K=top_k, ROWS_ARE_TOKENS=first,
                                  GATED=first, SCALED=not first, NUM_EXPERTS=num_experts, BLOCK_M=BLOCK_M,
                                  BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee)
    return down.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _moe_unsorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  gated: torch.Tensor) -> torch.Tensor:
    """fused_moe for few pairs: each pair's gated MLP input, then its weighted down projection, as GEMV programs;
    the k rows of each token summed. weights and ids are flat [T * k]."""
    tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = ids.numel() // tokens
    inter = two_i // 2
    down = torch.zeros(ids.numel(), hidden, dtype=x.dtype, device=x.device)  # pairs of skipped experts stay 0
    for a, w, out, n, k, first in ((x, w13, gated, inter, hidden, True), (gated, w2, down, hidden, inter, False)):
        config = gemv_config(k, norm=False, gate_up=first)  # the dense GEMV's tiles: an expert's rows alike
        _expert_gemv_kernel[(ids.numel(), triton.cdiv(n, config.block_n))](
            a, w, out, ids, weights, n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0), TOP_K=top_k,
            GATED=first, NUM_EXPERTS=num_experts, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps, num_stages=config.num_stages)
    return down.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
