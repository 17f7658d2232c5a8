"""Fused mixture-of-experts: routing, tokens grouped by expert, and one grouped-GEMM launch per projection.

Each token goes to its top-k experts, so the batch is T * k (token, expert) pairs. `align_by_expert` sorts the
pairs by expert and pads each expert's group to a multiple of a block size, so every block of sorted pairs
belongs to one expert; all of it runs on the device with buffers sized from T, k and the expert count alone (no
host sync, so it can be captured in a CUDA graph). Then two launches of `_expert_gemm_kernel`, each program one
block of pairs times one tile of output columns, reading its expert's weights (blocks larger the more pairs each
expert gets, `expert_gemm_configs`):
  1. x[token] @ w13[e].T, gate and up columns of the tile in one program, storing silu(gate) * up;
  2. that @ w2[e].T, scaled by the pair's routing weight;
and one more launch sums the k weighted rows of each token (into the residual stream, when asked).

With few pairs (batch-1 decode: k pairs, each of a different expert) sorting costs more than it saves: a dozen
small launches per layer, and a tensor-core tile that is 1/16 used. There each pair runs directly as GEMV programs
streaming its expert's rows like keel's dense GEMV (`_moe_unsorted`), the RMSNorm before the MoE folded into the
gate/up programs; `fused_route` does the routing in one launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from keel.kernels.gemv import GemvConfig
from keel.kernels.norm import rms_norm
from keel.kernels.pdl import pdl_launch_args, pdl_wait

@dataclass(frozen=True)
class ExpertGemmConfig:
    block_m: int  # pairs per program; the groups are padded to a multiple of the larger of the two GEMMs' block_m
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, slots_ptr, num_pairs, BLOCK: tl.constexpr):
    """Each pair's count of its expert, and its slot in the expert's group (the count before it was added)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < num_pairs
    expert = tl.load(ids_ptr + i, mask=ok, other=0)
    slot = tl.atomic_add(counts_ptr + expert, 1, mask=ok)
    tl.store(slots_ptr + i, slot, mask=ok)


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, slots_ptr, sorted_pairs_ptr, block_expert_ptr, num_pairs, size, E,
                  ALIGN: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Each program: its chunk of pairs to their places in the sorted list, and the padding and block experts of its
    chunk of the list's positions. Every program derives the groups' starts from the counts itself (E is small; the
    [BLOCK, E_PAD] tiles stay in registers because BLOCK is small)."""
    experts = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    is_pair = i < num_pairs
    expert = tl.load(ids_ptr + i, mask=is_pair, other=0).to(tl.int32)
    start = tl.sum(tl.where(experts[None, :] == expert[:, None], starts[None, :], 0), 1)
    tl.store(sorted_pairs_ptr + start + tl.load(slots_ptr + i, mask=is_pair, other=0), i.to(tl.int64), mask=is_pair)
    # position i of the list: in group g = the number of groups ending at or before it (E past the last group)
    group = tl.sum(((ends[None, :] <= i[:, None]) & (experts < E)[None, :]).to(tl.int32), 1)
    filled = tl.sum(tl.where(experts[None, :] == group[:, None], starts[None, :] + counts[None, :], 0), 1)
    in_list = i < size
    tl.store(sorted_pairs_ptr + i, num_pairs, mask=in_list & ((group >= E) | (i >= filled)))
    tl.store(block_expert_ptr + i // ALIGN, group.to(tl.int64), mask=in_list & (i % ALIGN == 0))


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pairs [P] int64: pair index t * k + j, or T * k for padding; the expert of each block of block_m
    [P / block_m] int64, num_experts for blocks past the last group). P = T * k + num_experts * (block_m - 1),
    rounded up to block_m: the most any routing can need. Within a group the pairs' order is arbitrary (atomics):
    each pair's row is computed on its own, so results do not depend on it. Two launches and a fill: on an H200 in a
    CUDA graph, 12-58 us at 16-8,192 tokens of Qwen3-30B-A3B (129 groups), where the torch ops before took 41-141."""
    flat = ids.flatten()
    pairs = flat.numel()
    size = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    slots = torch.empty(pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs = torch.empty(size, dtype=torch.int64, device=ids.device)
    block_expert = torch.empty(size // block_m, dtype=torch.int64, device=ids.device)
    if pairs:
        _count_kernel[(triton.cdiv(pairs, 256),)](flat, counts, slots, pairs, BLOCK=256)
    # List positions a program: its [place, E_PAD] tiles must stay in registers. 32 at 129 groups (256 spilled: 136
    # us at 16 tokens on an H200, against 12); more groups take fewer positions.
    e_pad = triton.next_power_of_2(num_experts)
    place = max(4, min(32, 8192 // e_pad))
    _place_kernel[(triton.cdiv(size, place),)](flat, counts, slots, sorted_pairs, block_expert, pairs, size,
                                               num_experts, ALIGN=block_m, E_PAD=e_pad, BLOCK=place, num_warps=8)
    return sorted_pairs, block_expert


@triton.jit
def _expert_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_expert_ptr, weights_ptr,
                        num_pairs, N, K, stride_am, stride_we, stride_wn, stride_om,
                        TOP_K: tl.constexpr, ROWS_ARE_TOKENS: tl.constexpr, GATED: tl.constexpr,
                        SCALED: tl.constexpr, NUM_EXPERTS: tl.constexpr, EVEN_K: tl.constexpr, ALIGN_M: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """out[pair, n] = a[row] @ w[e, n].T for one block of BLOCK_M pairs (all of expert e) and one tile of n. The
    groups are aligned to ALIGN_M, a multiple of BLOCK_M. Rows of `a` are tokens (pair // TOP_K) or pairs. GATED: w
    holds [gate; up] rows (2N of them): out = silu(gate) * up. SCALED: out *= the pair's routing weight."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block * BLOCK_M // ALIGN_M)
    first_pair = tl.load(sorted_pairs_ptr + block * BLOCK_M)
    if expert >= NUM_EXPERTS or first_pair >= num_pairs:  # padding follows a group's pairs: a block of it only
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
        a_ok = valid[:, None]
        w_ok = n_ok[None, :]
        if not EVEN_K:  # K a multiple of BLOCK_K needs no mask along k
            a_ok = a_ok & (kk < K)[None, :]
            w_ok = w_ok & (kk < K)[:, None]
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + kk[None, :], mask=a_ok, other=0.0)
        w = tl.load(w_expert + n[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=w_ok, other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if GATED:
            w_up = tl.load(w_expert + (N + n[None, :]).to(tl.int64) * stride_wn + kk[:, None], mask=w_ok, other=0.0)
            if IEEE:
                up = tl.dot(a, w_up, up, input_precision="ieee")
            else:
                up = tl.dot(a, w_up, up)
    if GATED:
        acc = acc * tl.sigmoid(acc) * up
    if SCALED:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _expert_gemv_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, norm_ptr, N, K, stride_a, stride_we, stride_wn,
                        stride_o, eps, TOP_K: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                        NUM_EXPERTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One pair and one tile of n (K a multiple of BLOCK_K). GATED: out[pair, n] = silu(x[token] . gate[n]) *
    (x[token] . up[n]), gate and up rows loaded in the same iteration, with NORM x RMS-normalised on the way as in
    keel's dense GEMV (x * norm weight in the products, 1 / rms(x) on the two sums); else out[pair, n] = weight[pair]
    * (a[pair] . w2[expert, n]). Pairs of an expert this rank does not hold (id NUM_EXPERTS) store nothing. As in the
    dense GEMV, products are summed over k once, at the end. (Summing a token's k pairs inside the down
    projection's programs was slower at top-8: each program then reads k experts' tiles, a few rows of short runs
    each.)"""
    pdl_wait(PDL)
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
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_row + kk).to(tl.float32)
        if NORM:
            squares += a * a
            a = a * tl.load(norm_ptr + kk).to(tl.float32)
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * a[None, :]
        if GATED:
            w_up = tl.load(rows + N.to(tl.int64) * stride_wn + kk[None, :], mask=n_ok[:, None], other=0.0,
                           eviction_policy="evict_first")
            up += w_up.to(tl.float32) * a[None, :]
    out = tl.sum(acc, 1)
    if GATED:
        up_out = tl.sum(up, 1)
        if NORM:
            inv_rms = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
            out *= inv_rms
            up_out *= inv_rms
        out = out * tl.sigmoid(out) * up_out
    else:
        out = out * tl.load(weights_ptr + pair)
    tl.store(out_ptr + pair.to(tl.int64) * stride_o + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _sum_pairs_kernel(down_ptr, ids_ptr, out_ptr, N, stride_o, TOP_K: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                      ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum_j down[t * TOP_K + j] over the pairs of experts this rank holds (the others' rows were never
    written), in float32, rounded once; with ADD, out[t] += that sum (rounded first, as the sum and a separate add
    would)."""
    pdl_wait(PDL)
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        if tl.load(ids_ptr + t * TOP_K + j) < NUM_EXPERTS:
            acc += tl.load(down_ptr + (t * TOP_K + j).to(tl.int64) * N + n, mask=ok, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    target = out_ptr + t.to(tl.int64) * stride_o + n
    if ADD:
        out = (out.to(tl.float32) + tl.load(target, mask=ok, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(target, out, mask=ok)


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_l, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    """keel.models.layers.moe.route for one token in one program: softmax over the experts in float32, the top k
    (largest first, ties to the lower id), rescaled to sum to 1 when RENORMALIZE."""
    pdl_wait(PDL)
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
                                 BLOCK_E=triton.next_power_of_2(num_experts), **pdl_launch_args(router_logits.device))
    return weights, ids


def few_pairs(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether fused_moe runs the pairs unsorted, as GEMV programs (batch-1 decode): few pairs, mostly of distinct
    experts, where sorting costs more than it saves."""
    return tokens * top_k <= max(top_k, num_experts // 4)


def expert_gemv_config(k: int, gated: bool) -> GemvConfig:
    """The unsorted expert GEMV's tiles, the best of a sweep at Qwen3-30B-A3B's sizes (top-8 of 128 experts, hidden
    2048, intermediate 768) on an H200 (docs/benchmarks.md): gate/up 14.4 us (3.5 TB/s) against 17.0 with the dense
    GEMV's tiles, down 8.9 against 9.8."""
    if gated:
        return GemvConfig(block_n=2, block_k=min(1024, k & -k), num_warps=2, num_stages=3)
    return GemvConfig(block_n=4, block_k=min(256, k & -k), num_warps=1, num_stages=2)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
              add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for each token t, where expert e is the gated MLP
    w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x)). x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; weights and ids
    [T, k] (keel.models.layers.moe.route); an id of E (an expert another rank holds) contributes nothing. With
    `norm_weight`, x is RMS-normalised first (folded into the gate/up GEMV when `few_pairs`). Returns [T, H] in x's
    dtype, or, with `add_to`, adds it into that tensor in place and returns it."""
    tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = ids.shape[1]
    if add_to is not None and (add_to.shape != x.shape or add_to.stride(1) != 1):
        raise ValueError(f"add_to must be [{tokens}, {hidden}] with unit-stride rows, got {tuple(add_to.shape)}")
    out = add_to if add_to is not None else torch.empty_like(x)
    if tokens == 0:
        return out
    pairs = tokens * top_k
    gated = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    down = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    flat_weights = weights.flatten().to(torch.float32).contiguous()
    flat_ids = ids.flatten().contiguous()
    if few_pairs(tokens, top_k, num_experts):
        _moe_unsorted(x, w13, w2, flat_weights, flat_ids, gated, down, norm_weight, eps)
    else:
        if norm_weight is not None:
            x = rms_norm(x, norm_weight, eps)
        _moe_sorted(x, w13, w2, flat_weights, ids, gated, down)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_pairs_kernel[(tokens, triton.cdiv(hidden, block))](down, flat_ids, out, hidden, out.stride(0), TOP_K=top_k,
                                                            NUM_EXPERTS=num_experts, ADD=add_to is not None,
                                                            BLOCK=block, **pdl_launch_args(x.device))
    return out


def expert_gemm_configs(tokens: int, top_k: int, num_experts: int) -> tuple[ExpertGemmConfig, ExpertGemmConfig]:
    """The sorted grouped GEMMs' tiles (gate/up, down), the best of a sweep at Qwen3-30B-A3B's and Mixtral's sizes on
    an H200 (docs/benchmarks.md). Blocks grow with the pairs each expert gets: a block re-reads its expert's weight
    tiles, so 16-pair blocks at 8,192 tokens took 2.3-3.3x as long as these."""
    per_expert = tokens * top_k / num_experts
    if per_expert < 8:
        small = ExpertGemmConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
        return small, small
    if per_expert < 32:
        return (ExpertGemmConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
                ExpertGemmConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4))
    large = ExpertGemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    if per_expert < 1024:
        return ExpertGemmConfig(block_m=64, block_n=256, block_k=64, num_warps=8, num_stages=3), large
    return large, large


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _fit(config: ExpertGemmConfig, n: int, k: int, gated: bool, x: torch.Tensor) -> ExpertGemmConfig:
    """The config with tiles no wider than the problem, and fewer stages (then narrower tiles) where its pipeline
    would not fit the device's shared memory (the tuned tiles fill an H200's 227 KiB)."""
    block_n = min(config.block_n, max(16, triton.next_power_of_2(n)))
    block_k = min(config.block_k, max(16, triton.next_power_of_2(k)))
    stages = config.num_stages
    if x.is_cuda:
        limit = _shared_memory_per_block(x.device.index)  # a CUDA tensor's device always names its index
        b_tiles = 2 if gated else 1
        while stages * (config.block_m + b_tiles * block_n) * block_k * x.element_size() > limit and block_n > 16:
            if stages > 2:
                stages -= 1
            else:
                block_n //= 2
    return ExpertGemmConfig(config.block_m, block_n, block_k, config.num_warps, stages)


def _moe_sorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                gated: torch.Tensor, down: torch.Tensor) -> None:
    """Each pair's weighted expert output into `down` [T * k, H], the pairs grouped by expert: two grouped GEMMs."""
    num_experts, _, hidden = w13.shape
    inter = w2.shape[2]
    tokens, top_k = ids.shape
    configs = expert_gemm_configs(tokens, top_k, num_experts)
    align_m = max(c.block_m for c in configs)
    sorted_pairs, block_expert = align_by_expert(ids, num_experts + 1, align_m)  # blocks of expert E are skipped
    ieee = x.dtype == torch.float32
    for a, w, out, n, k, first, config in ((x, w13, gated, inter, hidden, True, configs[0]),
                                           (gated, w2, down, hidden, inter, False, configs[1])):
        config = _fit(config, n, k, first, x)
        grid = (sorted_pairs.numel() // config.block_m, triton.cdiv(n, config.block_n))
        _expert_gemm_kernel[grid](a, w, out, sorted_pairs, block_expert, weights, ids.numel(), n, k, a.stride(0),
                                  w.stride(0), w.stride(1), out.stride(0), TOP_K=top_k, ROWS_ARE_TOKENS=first,
                                  GATED=first, SCALED=not first, NUM_EXPERTS=num_experts, ALIGN_M=align_m,
                                  EVEN_K=k % config.block_k == 0, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                                  BLOCK_K=config.block_k, IEEE=ieee, num_warps=config.num_warps,
                                  num_stages=config.num_stages)


def _moe_unsorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  gated: torch.Tensor, down: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float) -> None:
    """Each pair's gated MLP input, then its weighted down projection into `down`, as GEMV programs. weights and ids
    are flat [T * k]."""
    num_experts, two_i, hidden = w13.shape
    top_k = ids.numel() // x.shape[0]
    inter = two_i // 2
    for a, w, out, n, k, first in ((x, w13, gated, inter, hidden, True), (gated, w2, down, hidden, inter, False)):
        config = expert_gemv_config(k, gated=first)
        _expert_gemv_kernel[(ids.numel(), triton.cdiv(n, config.block_n))](
            a, w, out, ids, weights, norm_weight if norm_weight is not None else w, n, k, a.stride(0), w.stride(0),
            w.stride(1), out.stride(0), eps, TOP_K=top_k, GATED=first, NORM=first and norm_weight is not None,
            NUM_EXPERTS=num_experts, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
            num_stages=config.num_stages, **pdl_launch_args(x.device))
