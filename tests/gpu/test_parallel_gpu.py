"""Tensor parallelism, expert parallelism and data-parallel attention on two GPUs (NCCL, CUDA graphs with the
collectives inside, the symmetric-memory all-reduce), float32 on tiny checkpoints, against one GPU; and seeds 000
and 001 on the CUDA-graph path."""

from __future__ import annotations

import pytest
import torch

import keel
from tests.distributed import test_dp_attention as dp_tests
from tests.helpers import assert_same_greedy, random_prompts

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
GPU = dict(device="cuda", attention_backend="triton", kv_cache_tokens=8192)


@pytest.fixture
def cuda_engine(make_engine):
    def make(model, **options):
        return make_engine(model, **{**GPU, **options})
    return make


@pytest.mark.parametrize("kind,options", [("llama3", dict(tp_size=2)), ("qwen3-moe", dict(tp_size=2)),
                                          ("mixtral", dict(tp_size=2, ep_size=2)),
                                          ("qwen3-moe", dict(dp_size=2, enable_dp_attention=True, tp_size=2)),
                                          ("llama3", dict(dp_size=2, enable_dp_attention=True, tp_size=2))])
def test_two_gpus_give_the_tokens_of_one(kind, options, tiny_model, cuda_engine):
    directory, _ = tiny_model(kind)
    params = keel.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, top_logprobs=2)
    prompts = random_prompts([1, 9, 17, 40, 3, 60, 5], seed=21)
    single = cuda_engine(directory, page_size=16).generate(prompts, params)
    engine = cuda_engine(directory, page_size=16, **options)
    assert engine.core.runner.cuda_graph is not None
    try:
        split = engine.generate(prompts, params)
        one_at_a_time = [engine.generate([p], params)[0] for p in prompts[:3]]  # DP: rank 1 idles
    finally:
        engine.core.close()
    for i, (a, b) in enumerate(zip(split + one_at_a_time, single + single[:3])):
        assert_same_greedy(a, b, f"{kind} {options}: prompt {i}")


@pytest.mark.parametrize("guard", ["on", "off"])
def test_seed_000_on_the_graph_path(guard, tiny_model, cuda_engine, monkeypatch):
    """The idle rank replays the round's decode graph with padding rows; with the guard off the replay keeps the
    last decode's rows (request rows, lengths, KV slots) and writes padding K/V into the finished requests' KV."""
    dp_tests.test_seed_000_an_idle_rank_builds_metadata_for_its_own_forward(guard, tiny_model, cuda_engine,
                                                                            monkeypatch)


@pytest.mark.parametrize("guard", ["on", "off"])
def test_seed_001_on_the_graph_path(guard, tiny_model, cuda_engine, monkeypatch):
    dp_tests.test_seed_001_the_combine_step_reads_the_splits_the_planner_wrote(guard, tiny_model, cuda_engine,
                                                                             monkeypatch)
