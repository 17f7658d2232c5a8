"""Tensor parallelism on CPUs: two ranks (gloo, one process each, float32) against one, on tiny checkpoints."""

from __future__ import annotations

import os

import pytest

import keel
from tests.helpers import assert_same_greedy, build_tiny_hf_model, random_prompts

KINDS = ["llama3", "qwen3", "qwen3-moe", "mixtral"]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_give_the_tokens_of_one(kind, tiny_model, make_engine):
    directory, _ = tiny_model(kind)
    prompts = random_prompts([1, 9, 17, 40], seed=7)
    params = keel.SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=2)
    single = make_engine(directory, page_size=4).generate(prompts, params)
    engine = make_engine(directory, page_size=4, tp_size=2)
    assert engine.core.runner.kv_pool.k_cache.shape[2] == 1  # one of the two KV heads on this rank
    split = engine.generate(prompts, params)
    engine.core.close()
    for i, (a, b) in enumerate(zip(split, single)):
        assert_same_greedy(a, b, f"{kind}: prompt {i}")  # sums in another order: equal up to rounding


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])  # the LM head tied to the embedding, and its own
def test_a_vocabulary_the_ranks_do_not_divide_splits_with_padding(kind, make_engine, tmp_path):
    """383 rows over two ranks: 192 each, the last rank's last row padding (zeros, its logit dropped); ids on both
    sides of the boundary."""
    build_tiny_hf_model(kind, tmp_path, vocab_size=383)
    prompts = random_prompts([5, 23], vocab=383, seed=3)
    params = keel.SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=2)
    single = make_engine(tmp_path, page_size=4).generate(prompts, params)
    engine = make_engine(tmp_path, page_size=4, tp_size=2)
    try:
        assert engine.core.runner.model.model.embed_tokens.weight.shape[0] == 192
        split = engine.generate(prompts, params)
    finally:
        engine.core.close()
    for i, (a, b) in enumerate(zip(split, single)):
        assert len(a.logprobs[0].top) == 2 and max(t for t, _ in a.logprobs[0].top) < 383
        assert_same_greedy(a, b, f"{kind}, vocabulary 383: prompt {i}")


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral"])
def test_two_ranks_holding_whole_experts_give_the_tokens_of_one(kind, tiny_model, make_engine):
    """--ep-size 2: each rank holds half of the experts whole (attention still split by heads)."""
    directory, _ = tiny_model(kind)
    prompts = random_prompts([5, 23, 40], seed=8)
    params = keel.SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=2)
    single = make_engine(directory, page_size=4).generate(prompts, params)
    engine = make_engine(directory, page_size=4, tp_size=2, ep_size=2)
    experts, moe = engine.core.runner.model.model.layers[0].mlp.experts, engine.core.model_config.moe
    assert tuple(experts.w2.shape) == (moe.num_experts // 2, 64, moe.intermediate_size)  # half of them, whole
    split = engine.generate(prompts, params)
    engine.core.close()
    for i, (a, b) in enumerate(zip(split, single)):
        assert_same_greedy(a, b, f"{kind}: prompt {i}")


@pytest.mark.parametrize("parallel", [dict(tp_size=2), dict(tp_size=2, ep_size=2),
                                      dict(tp_size=2, ep_size=2, dp_size=2, enable_dp_attention=True)],
                         ids=["tp", "ep", "dp-attention"])
def test_fused_moe_kernels_on_two_ranks_give_the_tokens_of_one(parallel, tiny_model, make_engine):
    """The Triton backend (interpreted on a CPU): each rank's fused MoE output is summed over the ranks before the
    residual add (one rank adds it inside the kernels instead); a single request decodes through the unsorted
    path, with the norm folded into the router and the experts' GEMVs (under DP attention, the other rank's
    forwards are IDLE: zero tokens through the same kernels)."""
    directory, _ = tiny_model("qwen3-moe")
    prompts = random_prompts([1, 20], seed=60)
    params = keel.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, top_logprobs=2)
    single = make_engine(directory, page_size=4).generate(prompts, params)
    engine = make_engine(directory, page_size=4, attention_backend="triton", disable_cuda_graph=True, **parallel)
    try:
        split = [engine.generate([prompt], params)[0] for prompt in prompts]  # one at a time: one DP rank idles
    finally:
        engine.core.close()
    for i, (a, b) in enumerate(zip(split, single)):
        assert_same_greedy(a, b, f"qwen3-moe {parallel}: prompt {i}")


@pytest.mark.parametrize("drafter, topk", [("ngram", 1), ("self", 1), ("noisy", 4), ("eagle", 1), ("eagle3", 1)])
def test_speculative_decoding_on_two_ranks_gives_the_tokens_of_one_rank_without_it(drafter, topk, drafters,
                                                                                     tiny_model, make_engine):
    """The drafter splits over the ranks like the target (a draft model, an EAGLE head's layer) or runs on the host
    alike on each (n-grams); each rank verifies the same drafts and accepts the same tokens from the same
    gathered logits, so greedy speculation on two ranks gives one rank's plain tokens, and drafts as well as one
    rank does (the same drafts accepted)."""
    target, _ = tiny_model("llama3")
    prompts = [p * 3 for p in random_prompts([5, 9, 17], seed=3)]  # repeats, for the n-gram drafter
    params = keel.SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    plain = make_engine(target, page_size=4).generate(prompts, params)
    spec = {}
    for tp in (1, 2):
        engine = make_engine(target, page_size=4, tp_size=tp, speculative_eagle_topk=topk,
                             **({"speculative_num_draft_tokens": 6} if topk > 1 else {}), **drafters[drafter])
        try:
            spec[tp] = engine.generate(prompts, params)
        finally:
            engine.core.close()
    assert [o.token_ids for o in spec[2]] == [o.token_ids for o in plain]
    assert [o.spec_accepted_tokens for o in spec[2]] == [o.spec_accepted_tokens for o in spec[1]]
    assert sum(o.spec_draft_tokens for o in spec[2]) > 0
    if drafter in ("ngram", "self", "noisy", "eagle"):
        assert sum(o.spec_accepted_tokens for o in spec[2]) > 0


def test_what_does_not_split_yet_is_refused_in_one_line(tiny_model):
    directory, _ = tiny_model("llama3")
    with pytest.raises(ValueError, match="speculative_algorithm: is not supported with --enable-dp-attention yet"):
        keel.Engine(str(directory), device="cpu", tp_size=2, dp_size=2, enable_dp_attention=True,
                    speculative_algorithm="NGRAM")


@pytest.mark.parametrize("parallel", [dict(tp_size=2), dict(tp_size=2, dp_size=2, enable_dp_attention=True)],
                         ids=["tp", "dp-attention"])
def test_gemma3_on_two_ranks_gives_the_tokens_of_one(parallel, make_engine, tmp_path):
    """Gemma 3's attention heads and its GELU MLP split like Llama's, over a hybrid pool (sliding-window layers
    in a pool of their own on each rank)."""
    from transformers import Gemma3ForCausalLM

    from tests.models.test_gemma3 import tiny_config, write_gemma

    directory, _ = write_gemma(tmp_path, Gemma3ForCausalLM(tiny_config()))
    prompts = random_prompts([3, 20, 41], seed=9)
    params = keel.SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=2)
    single = make_engine(directory, page_size=4).generate(prompts, params)
    engine = make_engine(directory, page_size=4, **parallel)
    assert engine.core.kv_cache.swa is not None
    try:
        split = engine.generate(prompts, params)
    finally:
        engine.core.close()
    for i, (a, b) in enumerate(zip(split, single)):
        assert_same_greedy(a, b, f"gemma3 {parallel}: prompt {i}")


@pytest.mark.parametrize("seed", range(int(os.environ.get("KEEL_TP_WORKLOADS", "4"))))  # more on demand
def test_mirrored_ranks_stay_in_step_through_random_workloads(seed, tiny_model, monkeypatch):
    """The mirror's premise: ranks fed the same commands schedule the same batches, through arrivals between
    steps, aborts, forced retraction, chunking, overlap and the prefix cache (a rank that scheduled another batch
    would stall or fail at the next collective, or change the gathered logits)."""
    check_workload_on_ranks(seed, tiny_model("llama3")[0], monkeypatch, tp_size=2)


def check_workload_on_ranks(seed: int, directory, monkeypatch, **parallel) -> None:
    """Seeded random workload `seed` on an engine of several ranks (`parallel` options): every request that was not
    aborted gets its solo output, and the engine ends idle."""
    from tests.scheduler.test_random_workloads import run_workload
    from tests.scheduler.workloads import make_workload

    workload = make_workload(seed)
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", str(workload.retract_every))
    solo = keel.Engine(str(directory), device="cpu", dtype="float32", chunked_prefill_size=None)
    engine = keel.Engine(str(directory), device="cpu", dtype="float32", **parallel, **workload.options)
    try:
        outputs, aborted = run_workload(engine.core, workload)
        engine.core.check_idle()
    finally:
        engine.core.close()
    for i, req in enumerate(workload.requests):
        if i not in aborted:
            assert_same_greedy(outputs[i], solo.generate([req.prompt], req.params)[0], f"seed {seed} request {i}")
