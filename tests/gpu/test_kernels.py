"""The Triton attention kernels at real sizes, bfloat16, against float32 attention on the same values."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.argmax import argmax_rows
from keel.kernels.gemv import gemv
from keel.kernels.norm import rms_norm
from keel.runner.forward_batch import ForwardMode
from tests.attention.test_backends import run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
HEADS = 32


def lengths(page_size: int) -> list[int]:
    """1 token, exactly a page, a page and one, 32k, and something in between."""
    return [1, page_size, page_size + 1, 32768, 1000]


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_kernel(page_size, group):
    seqs = lengths(page_size)
    run_case([s - 1 for s in seqs], [1] * len(seqs), page_size, HEADS, HEADS // group, None, ForwardMode.DECODE,
             "triton", device=CUDA, dtype=torch.bfloat16, head_dim=128)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_kernel(page_size, group):
    # fresh prompts of 1 / a page / a page and one, a 32k context extended by 300, and decodes mixed in
    prefixes = [0, 0, 0, 32768 - 300, 999, page_size]
    extends = [1, page_size, page_size + 1, 300, 1, 1]
    run_case(prefixes, extends, page_size, HEADS, HEADS // group, None, ForwardMode.MIXED, "triton", device=CUDA,
             dtype=torch.bfloat16, head_dim=128)


@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND])
def test_sliding_window(mode):
    prefixes, extends = ([4095, 32767, 99], [1, 1, 1]) if mode == ForwardMode.DECODE else ([0, 30000, 99], [700, 500, 3])
    run_case(prefixes, extends, 16, HEADS, 8, 4096, mode, "triton", device=CUDA, dtype=torch.bfloat16, head_dim=128)


@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("window", [5, 100, 4096])
@pytest.mark.parametrize("softcap", [None, 1.0])
def test_sliding_window_through_the_swa_page_map(mode, page_size, window, softcap):
    """A hybrid pool's sliding-window layer (windows inside a page, across pages, and long) with and without
    Gemma 2's soft-capping: K/V read through the full->SWA page map after the pages behind each window went back."""
    prefixes, extends = (([4095, 32767, 99, 0, 700], [1, 1, 1, 1, 1]) if mode == ForwardMode.DECODE
                         else ([0, 30000, 99, 64, 0], [700, 500, 3, 1, 4200]))
    run_case(prefixes, extends, page_size, HEADS, 8, window, mode, "triton", device=CUDA, dtype=torch.bfloat16,
             head_dim=128, softcap=softcap, hybrid=True)


# llama-3.1-8b's one-row projections: qkv after the input norm, o_proj added into the residual, gate/up
# after the post-attention norm with silu, down added into the residual, and the LM head writing float32.
GEMV_CASES = {"qkv": (6144, 4096, dict(norm=True)), "o_proj": (4096, 4096, dict(residual=True)),
              "gate_up": (14336, 4096, dict(norm=True, gate_up=True)), "down": (4096, 14336, dict(residual=True)),
              "lm_head": (128256, 4096, dict(out_dtype=torch.float32))}


@pytest.mark.parametrize("case", GEMV_CASES)
def test_gemv_kernel_at_llama_8b_sizes(case):
    from tests.kernels.test_gemv import reference
    n, k, parts = GEMV_CASES[case]
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(1, k, device=CUDA, generator=g).to(torch.bfloat16)
    weight = (torch.randn(2 * n if parts.get("gate_up") else n, k, device=CUDA, generator=g) / k ** 0.5).to(torch.bfloat16)
    norm_weight = (torch.rand(k, device=CUDA, generator=g) + 0.5).to(torch.bfloat16) if parts.get("norm") else None
    residual = torch.randn(1, n, device=CUDA, generator=g).to(torch.bfloat16) if parts.get("residual") else None
    add_to = residual.clone() if residual is not None else None
    got = gemv(x, weight, None, norm_weight, 1e-5, add_to, parts.get("gate_up", False), parts.get("out_dtype"))
    want = reference(x, weight, None, norm_weight, residual, parts.get("gate_up", False), eps=1e-5)
    error = ((got.double() - want).norm() / want.norm()).item()
    assert error < 1e-2 if got.dtype == torch.bfloat16 else error < 1e-5, error


def test_dependent_kernels_in_a_cuda_graph_match_eager():
    """On Hopper the decode kernels launch with PDL, each starting before the previous one ends. A
    chain where every kernel reads the one before it (a residual stream updated in place, as a
    decoder layer does), replayed from a CUDA graph, must equal the same chain run eagerly."""
    k, layers = 4096, 16
    g = torch.Generator(device=CUDA).manual_seed(0)
    weights = [(torch.randn(k, k, device=CUDA, generator=g) / k ** 0.5).to(torch.bfloat16) for _ in range(2 * layers)]
    norm_weight = (torch.rand(k, device=CUDA, generator=g) + 0.5).to(torch.bfloat16)

    def chain(hidden: torch.Tensor) -> torch.Tensor:
        for up, down in zip(weights[::2], weights[1::2]):
            gemv(gemv(hidden, up, None, norm_weight, 1e-5), down, add_to=hidden)
        return argmax_rows(gemv(rms_norm(hidden, norm_weight, 1e-5), weights[0], out_dtype=torch.float32))

    start = torch.randn(1, k, device=CUDA, generator=g).to(torch.bfloat16)
    eager_hidden = start.clone()
    eager_token = chain(eager_hidden)
    hidden = start.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token = chain(hidden)
    for _ in range(3):
        hidden.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(hidden, eager_hidden) and torch.equal(token, eager_token)


@pytest.mark.parametrize("tokens", [1, 7, 64, 333, 4096])
@pytest.mark.parametrize("num_experts,top_k,hidden,inter", [(8, 2, 1024, 1792), (128, 8, 2048, 768)])
def test_fused_moe_at_model_sizes(tokens, num_experts, top_k, hidden, inter):
    """Mixtral-like (8 experts, top 2; sizes scaled down) and Qwen3-30B-A3B's (128, top 8, 2048 -> 768) experts,
    bfloat16, against the same bfloat16 weights run in float32."""
    from keel.kernels.fused_moe import fused_moe
    from keel.models.layers.moe import route

    g = torch.Generator(device=CUDA).manual_seed(tokens + num_experts)
    x = torch.randn(tokens, hidden, generator=g, device=CUDA).bfloat16()
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g, device=CUDA) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, generator=g, device=CUDA) / inter ** 0.5).bfloat16()
    weights, ids = route(torch.randn(tokens, num_experts, generator=g, device=CUDA), top_k, True)
    expected = torch.zeros(tokens, hidden, device=CUDA)
    for e in ids.unique().tolist():  # each expert on its tokens, float32
        rows, slot = (ids == e).nonzero(as_tuple=True)
        gate_up = x[rows].float() @ w13[e].float().t()
        y = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].float().t()
        expected.index_add_(0, rows, y * weights[rows, slot, None])
    out = fused_moe(x, w13, w2, weights, ids).float()
    scale = expected.abs().max()
    assert (out - expected).abs().max() <= 2e-2 * scale, f"max error {(out - expected).abs().max()} of {scale}"
