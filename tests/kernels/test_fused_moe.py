"""The fused MoE kernels against a float32 torch reference (TRITON_INTERPRET=1 on a CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.fused_moe import align_by_expert, fused_moe
from keel.models.layers.moe import route
from tests.helpers import KERNEL_DEVICE


def reference(x, w13, w2, weights, ids):
    """Each token through each of its experts, in float32, weighted and summed."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w13[e].float() @ x[t].float()
            y = w2[e].float() @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:])
            out[t] += weights[t, j].float() * y
    return out


@pytest.mark.parametrize("tokens", [1, 5, 37, 80])  # 80 x 2 over 8 experts: the sorted path's larger blocks
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (16, 8), (128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_matches_float32_experts(tokens, num_experts, top_k, renormalize):
    g = torch.Generator().manual_seed(tokens * 100 + num_experts + top_k)
    hidden, inter = 48, 24  # not multiples of the tiles: the masks matter
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = route(torch.randn(tokens, num_experts, generator=g), top_k, renormalize)
    dev = KERNEL_DEVICE
    out = fused_moe(x.to(dev), w13.to(dev), w2.to(dev), weights.to(dev), ids.to(dev))
    torch.testing.assert_close(out.cpu(), reference(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 9])  # unsorted (the norm folded into the gate/up GEMV), sorted
def test_the_norm_before_and_the_residual_add_after(tokens):
    """fused_moe(x, norm, add_to=h) == h + moe(rms_norm(x))."""
    from keel.models.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(11 + tokens)
    hidden, inter, num_experts = 64, 32, 8
    x = torch.randn(tokens, hidden, generator=g) * 3
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = route(torch.randn(tokens, num_experts, generator=g), 2, True)
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = torch.rand(hidden, generator=g) + 0.5
    stream = torch.randn(tokens, hidden, generator=g)
    expected = stream + reference(norm(x), w13, w2, weights, ids)
    dev = KERNEL_DEVICE
    stream_dev = stream.to(dev)
    out = fused_moe(x.to(dev), w13.to(dev), w2.to(dev), weights.to(dev), ids.to(dev), norm.weight.to(dev), norm.eps,
                    add_to=stream_dev)
    assert out is stream_dev
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_m", [2, 16, 64])
def test_pairs_are_grouped_by_expert_in_padded_blocks(block_m):
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])  # expert 3 thrice, 0 twice, 1 once
    sorted_pairs, block_expert = align_by_expert(ids.to(KERNEL_DEVICE), num_experts=4, block_m=block_m)
    sorted_pairs, block_expert = sorted_pairs.cpu(), block_expert.cpu()
    pairs = ids.numel()
    assert sorted_pairs.numel() == block_expert.numel() * block_m >= pairs + 4 * (block_m - 1)
    blocks = sorted_pairs.view(-1, block_m)
    experts = block_expert.tolist()
    assert experts == sorted(experts) and experts[-1] == 4  # groups in expert order, then the unused blocks
    for block, expert in zip(blocks, experts):
        real = block[block < pairs]
        assert bool((ids.flatten()[real] == expert).all()) and (expert < 4 or real.numel() == 0)
    used = [e for e in experts if e < 4]
    assert {e: used.count(e) for e in used} == {e: -(-n // block_m) for e, n in ((0, 2), (1, 1), (3, 3))}
    assert sorted(sorted_pairs[sorted_pairs < pairs].tolist()) == list(range(pairs))  # each pair exactly once


@pytest.mark.parametrize("block_m,num_experts,tokens", [(16, 33, 700), (128, 33, 700), (16, 300, 100)])
def test_many_pairs_are_grouped_by_expert_across_programs(block_m, num_experts, tokens):
    """Thousands of pairs: the counting and placing kernels run many programs each (with 300 experts, fewer list
    positions a program)."""
    ids = torch.randint(0, num_experts, (tokens, 8), generator=torch.Generator().manual_seed(block_m))
    sorted_pairs, block_expert = align_by_expert(ids.to(KERNEL_DEVICE), num_experts, block_m)
    sorted_pairs, block_expert = sorted_pairs.cpu(), block_expert.cpu()
    pairs = ids.numel()
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    used = block_expert[block_expert < num_experts]
    assert torch.equal(used, torch.repeat_interleave(torch.arange(num_experts), (counts + block_m - 1) // block_m))
    assert bool((block_expert[used.numel():] == num_experts).all())
    group = sorted_pairs[:used.numel() * block_m]
    real = group < pairs
    assert torch.equal(flat[group[real]], torch.repeat_interleave(used, block_m)[real])
    ends = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)
    assert torch.equal(real.nonzero().flatten(), torch.cat([torch.arange(e - (c + block_m - 1) // block_m * block_m,
                                                                         e - (c + block_m - 1) // block_m * block_m + c)
                                                            for e, c in zip(ends.tolist(), counts.tolist())]))
    assert bool((sorted_pairs[used.numel() * block_m:] == pairs).all())
    assert sorted(sorted_pairs[sorted_pairs < pairs].tolist()) == list(range(pairs))  # each pair exactly once


def test_no_tokens_gives_no_rows():
    x = torch.zeros(0, 16, device=KERNEL_DEVICE)
    out = fused_moe(x, torch.zeros(4, 32, 16, device=KERNEL_DEVICE), torch.zeros(4, 16, 16, device=KERNEL_DEVICE),
                    torch.zeros(0, 2, device=KERNEL_DEVICE), torch.zeros(0, 2, dtype=torch.int64, device=KERNEL_DEVICE))
    assert out.shape == (0, 16)


@pytest.mark.parametrize("tokens", [9, 1])  # sorted, and unsorted (few pairs)
def test_pairs_routed_to_another_ranks_experts_contribute_nothing(tokens):
    """Expert parallelism: ids equal to the expert count name experts another rank holds."""
    g = torch.Generator().manual_seed(3)
    hidden, inter, num_experts = 32, 16, 4
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = route(torch.randn(tokens, 2 * num_experts, generator=g), 2, True)
    local = torch.where(ids < num_experts, ids, num_experts)  # experts 4..7 live elsewhere
    dev = KERNEL_DEVICE
    out = fused_moe(x.to(dev), w13.to(dev), w2.to(dev), weights.to(dev), local.to(dev))
    kept = torch.where(ids < num_experts, weights, 0.0)
    torch.testing.assert_close(out.cpu(), reference(x, w13, w2, kept, torch.where(ids < num_experts, ids, 0)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [0, 1, 6])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (128, 8), (60, 4)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_route_matches_route(tokens, num_experts, top_k, renormalize):
    from keel.kernels.fused_moe import fused_route

    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(tokens + num_experts))
    weights, ids = route(logits, top_k, renormalize)
    ours_weights, ours_ids = fused_route(logits.to(KERNEL_DEVICE), top_k, renormalize)
    assert torch.equal(ours_ids.cpu(), ids)
    torch.testing.assert_close(ours_weights.cpu(), weights, atol=1e-6, rtol=1e-5)
