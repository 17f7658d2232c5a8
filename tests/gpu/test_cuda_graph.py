"""CUDA-graph decode against eager decode, and randomized scheduler workloads with Triton and CUDA graphs on."""

from __future__ import annotations

import pytest
import torch

import keel
from tests.helpers import assert_same_greedy, random_prompts
from tests.scheduler.test_random_workloads import run_workload
from tests.scheduler.workloads import make_workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def engines():
    options = dict(dtype="bfloat16", device="cuda", kv_cache_tokens=16384, page_size=16, max_running_requests=8,
                   attention_backend="triton")
    graphs = keel.Engine("llama-3.2-1b", cuda_graph_max_bs=8, **options)
    eager = keel.Engine("llama-3.2-1b", disable_cuda_graph=True, **options)
    assert graphs.core.runner.cuda_graph is not None and eager.core.runner.cuda_graph is None
    return graphs, eager


@pytest.mark.parametrize("batch_size", [1, 2, 4, 8, 3, 7])
def test_cuda_graph_decode_gives_eager_tokens(engines, batch_size):
    graphs, eager = engines
    prompts = random_prompts([5 + 37 * i for i in range(batch_size)], vocab=128000, seed=batch_size)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, top_logprobs=2)
    ours, reference = graphs.generate(prompts, params), eager.generate(prompts, params)
    for i, (a, b) in enumerate(zip(ours, reference)):
        if batch_size in graphs.core.runner.cuda_graph.sizes:  # same shapes, same kernels: identical
            assert a.token_ids == b.token_ids, f"request {i}"
        else:  # padded to the next captured size: GEMM shapes differ, rounding may too
            assert_same_greedy(a, b, f"request {i}", tie=2e-2)
    for engine in engines:
        engine.core.check_idle()


@pytest.fixture(scope="module")
def solo_cuda(tiny_model):
    directory, _ = tiny_model("llama3")
    return keel.Engine(str(directory), device="cuda", dtype="float32", chunked_prefill_size=None,
                       attention_backend="triton", disable_cuda_graph=True, kv_cache_tokens=4096)


@pytest.mark.parametrize("seed", range(30))
def test_random_workload_with_triton_cuda_graphs_and_overlap(seed, tiny_model, solo_cuda, monkeypatch):
    workload = make_workload(seed)
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", str(workload.retract_every))
    directory, _ = tiny_model("llama3")
    options = {**workload.options, "disable_overlap": False}
    engine = keel.Engine(str(directory), device="cuda", dtype="float32", attention_backend="triton",
                         cuda_graph_max_bs=options["max_running_requests"], **options)
    assert engine.core.runner.cuda_graph is not None and engine.core.overlap
    outputs, aborted = run_workload(engine.core, workload)
    for i, req in enumerate(workload.requests):
        if i not in aborted:
            assert_same_greedy(outputs[i], solo_cuda.generate([req.prompt], req.params)[0],
                               f"request {i}\n{workload.describe()}")
    engine.core.check_idle()


def test_graph_memory_is_measured_before_the_kv_pool_and_taken_from_its_budget():
    engine = keel.Engine("qwen3-0.6b", dtype="bfloat16", device="cuda", attention_backend="triton", mem_fraction=0.1,
                         max_running_requests=256, cuda_graph_max_bs=256)
    runner = engine.core.runner
    graphs = runner.cuda_graph
    assert len(graphs.sizes) == 40 and runner.graph_memory_measured > 0
    # the 40 graphs hold little more than the largest alone (they share its pool and write into its logits)
    assert graphs.memory_bytes <= 1.25 * runner.graph_memory_measured + 64 * 2**20, \
        (graphs.memory_bytes, runner.graph_memory_measured)
    prompts = random_prompts([50 + 7 * i for i in range(130)], vocab=151000, seed=0)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    assert all(len(out.token_ids) == 4 for out in engine.generate(prompts, params))  # 130 rows: the 136 graph
    engine.core.check_idle()
