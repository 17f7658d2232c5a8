"""The hybrid sliding-window pool on a GPU: CUDA-graph decode against eager decode, and against full KV.

gemma-3-1b (the published config, dummy weights, float32 so that rounding cannot hide a wrong read): 26 layers,
every sixth global, the rest a 512-token window; prompts up to three windows long, a sliding-window pool smaller
than the largest batch's prompts (but large enough that every batch runs as it does on full KV), so window pages
are freed and reused while the graphs replay.
"""

from __future__ import annotations

import pytest
import torch

import keel
from tests.helpers import assert_same_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
OPTIONS = dict(dtype="float32", device="cuda", kv_cache_tokens=32768, page_size=16, max_running_requests=8,
               chunked_prefill_size=1024, max_prefill_tokens=1024, swa_full_tokens_ratio=0.25,
               attention_backend="triton")


@pytest.fixture(scope="module")
def engines():
    graphs = keel.Engine("gemma-3-1b", cuda_graph_max_bs=8, **OPTIONS)
    eager = keel.Engine("gemma-3-1b", disable_cuda_graph=True, **OPTIONS)
    full = keel.Engine("gemma-3-1b", cuda_graph_max_bs=8, disable_hybrid_swa_memory=True, **OPTIONS)
    assert graphs.core.runner.cuda_graph is not None and eager.core.runner.cuda_graph is None
    swa = graphs.core.kv_cache.swa
    assert swa is not None and full.core.kv_cache.swa is None
    assert swa.allocator.capacity * 16 < 8 * 1500  # less than the largest batch's prompts hold
    return graphs, eager, full


@pytest.mark.parametrize("batch_size", [1, 2, 8, 3])
def test_cuda_graph_decode_on_the_hybrid_pool_gives_eager_tokens(engines, batch_size):
    graphs, eager, full = engines
    prompts = random_prompts([600 + 131 * i for i in range(batch_size)], vocab=262144, seed=batch_size)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True, top_logprobs=2)
    ours, reference, full_kv = graphs.generate(prompts, params), eager.generate(prompts, params), \
        full.generate(prompts, params)
    # Chunked prefill staggers the requests, so decode batches pass through sizes without a graph of their own
    # (padded to the next: other GEMM shapes, other rounding); in float32 the tokens agree up to a near-tie.
    for i, (a, b, c) in enumerate(zip(ours, reference, full_kv)):
        assert_same_greedy(a, b, f"request {i}: graphs and eager", tie=1e-3)
        assert_same_greedy(a, c, f"request {i}: hybrid and full KV", tie=1e-3)
    for engine in engines:
        engine.core.check_idle()
        engine.core.flush_cache()
    swa = graphs.core.kv_cache.swa
    assert swa.allocator.num_free == swa.allocator.capacity
