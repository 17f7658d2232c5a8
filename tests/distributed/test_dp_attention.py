"""Data-parallel attention on CPUs: two ranks (gloo, one process each, float32), each scheduling its own requests
and holding their KV, the MLP / expert layers split over both; every request must get its solo output. The
invariant checker runs on every rank after every step (KEEL_STRICT_CHECKS, inherited by the rank processes)."""

from __future__ import annotations

import os

import pytest

import keel
from keel.config import EngineConfig
from keel.debug.guards import DISABLE_ENV
from keel.distributed.dp_controller import DpController, RankStep
from tests.distributed.test_tensor_parallel import check_workload_on_ranks
from tests.helpers import assert_same_greedy, random_prompts

DP = dict(tp_size=2, dp_size=2, enable_dp_attention=True)


def run(core, requests: list[tuple[list[int], keel.SamplingParams, int | None]]) -> list[keel.RequestOutput]:
    """Add `requests` (prompt, params, data-parallel rank or None: the controller's choice) and step until done."""
    outputs, rids = [], {}
    for i, (prompt, params, rank) in enumerate(requests):
        rids[core.add_request(prompt, params, dp_rank=rank)] = i
        outputs.append(keel.RequestOutput(str(i), None, prompt, logprobs=[]))
    by_rid: dict[int, keel.RequestOutput] = {rid: outputs[i] for rid, i in rids.items()}
    while core.has_work:
        _step_into(core, by_rid)
    return outputs


@pytest.mark.parametrize("kind,options", [("llama3", {}), ("qwen3-moe", {}), ("mixtral", dict(ep_size=2))])
def test_one_request_at_a_time_then_bursts_each_get_their_solo_output(kind, options, tiny_model, make_engine):
    """One rank is empty while single requests come and go (IDLE forwards in decode and prefill rounds), then
    bursts fill both; prefill rounds, decode rounds and mixed ones meet."""
    directory, _ = tiny_model(kind)
    params = keel.SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, top_logprobs=2)
    singles, burst = random_prompts([5, 30, 2], seed=3), random_prompts([1, 9, 17, 40, 3, 12, 25], seed=4)
    solo = make_engine(directory, page_size=4)
    engine = make_engine(directory, page_size=4, **DP, **options)
    try:
        ours = [run(engine.core, [(p, params, None)])[0] for p in singles]
        ours += run(engine.core, [(p, params, None) for p in burst])
        ours += [run(engine.core, [(p, params, None)])[0] for p in singles[:1]]  # the prefix cache, one rank
    finally:
        engine.core.close()
    for i, (a, prompt) in enumerate(zip(ours, singles + burst + singles[:1])):
        assert_same_greedy(a, solo.generate([prompt], params)[0], f"{kind}: request {i}")


def test_requests_go_to_the_least_loaded_rank():
    controller = DpController(2)
    assert [controller.assign(100), controller.assign(10), controller.assign(10)] == [0, 1, 1]
    controller.collect([RankStep([], 5, True), RankStep([], 500, True)])  # rank 1's requests grew
    assert controller.assign(10) == 0 and controller.assign(1, rank=1) == 1
    assert controller.others_busy
    controller.collect([RankStep([], 0, True), RankStep([], 0, False)])
    assert not controller.others_busy


@pytest.mark.parametrize("seed", range(int(os.environ.get("KEEL_DP_WORKLOADS", "3"))))  # more on demand
def test_data_parallel_ranks_through_random_workloads(seed, tiny_model, monkeypatch):
    """Arrivals between steps (one rank often empty), aborts, forced retraction, chunking, overlap and the
    prefix cache, on each rank separately."""
    check_workload_on_ranks(seed, tiny_model("qwen3-moe")[0], monkeypatch, **DP)


@pytest.mark.parametrize("guard", ["on", "off"])
def test_seed_000_an_idle_rank_builds_metadata_for_its_own_forward(guard, tiny_model, make_engine, monkeypatch):
    """Rank 1 decodes four requests, which finish together; rank 0 goes on decoding four, so rank 1 runs IDLE
    forwards of four padding rows. Each must build its metadata from its own (padding) batch: with the guard off
    it reuses the metadata of rank 1's last decode, and its padding rows write their K/V into the slots that
    decode wrote, the last cached tokens of the finished requests. A follow-up of each (its prompt and output,
    and more), sent to rank 1 while rank 0 still decodes, then reads that KV from the prefix cache."""
    if guard == "off":
        monkeypatch.setenv(DISABLE_ENV, "fresh-metadata")
    directory, _ = tiny_model("llama3")
    short = keel.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, top_logprobs=2)
    long = keel.SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, top_logprobs=2)
    prompts = random_prompts([8] * 8, seed=11)
    solo = make_engine(directory)
    engine = make_engine(directory, disable_overlap=True, **DP)  # page size 1: the last decoded token is cached
    core, outputs = engine.core, {}
    try:
        firsts = [core.add_request(p, short, dp_rank=1) for p in prompts[:4]]
        for p in prompts[4:]:
            core.add_request(p, long, dp_rank=0)
        idle_rounds = 0
        while idle_rounds < 2:  # rank 1 idles two rounds after its requests finished
            idle_rounds += all(outputs.get(rid) and outputs[rid].finish_reason for rid in firsts)
            _step_into(core, outputs)
        follow_ups = [p + outputs[rid].token_ids + [7, 8] for p, rid in zip(prompts[:4], firsts)]
        seconds = [core.add_request(p, short, dp_rank=1) for p in follow_ups]
        while core.has_work:
            _step_into(core, outputs)
    finally:
        engine.core.close()
    ours = [outputs[rid] for rid in seconds]
    assert all(out.num_cached_tokens > 8 for out in ours)  # the follow-ups reused the finished requests' KV
    alone = [solo.generate([p], short)[0] for p in follow_ups]
    if guard == "on":
        for i, (a, b) in enumerate(zip(ours, alone)):
            assert_same_greedy(a, b, f"follow-up {i}")
    else:
        assert any(abs(a.logprobs[0].logprob - b.logprobs[0].logprob) > 1e-3 for a, b in zip(ours, alone))


def _step_into(core, outputs: dict[int, keel.RequestOutput]) -> None:
    for out in core.step():
        result = outputs.setdefault(out.rid, keel.RequestOutput(str(out.rid), None, [], logprobs=[]))
        result.token_ids += out.token_ids
        result.logprobs += out.logprobs or []
        result.finish_reason = out.finish_reason
        if out.num_cached_tokens is not None:
            result.num_cached_tokens = out.num_cached_tokens


@pytest.mark.parametrize("guard", ["on", "off"])
def test_seed_001_the_combine_step_reads_the_splits_the_planner_wrote(guard, tiny_model, make_engine, monkeypatch):
    """Rank 0 decodes 32 short requests, rank 1 one of 330 tokens: rank 1's batch is padded to the round's 32 rows,
    so the planner gives its long request 5 splits (ceil(264 programs / (32 rows * 2 KV heads))). The combine step
    must read those 5: with the guard off it counts its own from the live length (ceil(330 / 64) = 6) and folds in
    a split nobody wrote in this forward."""
    if guard == "off":
        monkeypatch.setenv(DISABLE_ENV, "one-plan")
    directory, _ = tiny_model("llama3")
    # One decode step shows it. The solo reference runs on the torch backend: the interpreted Triton prefill of
    # 330 tokens would double the test's time, and the two backends agree to ~1e-6.
    params = keel.SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True, top_logprobs=2)
    long_prompt, shorts = random_prompts([330], seed=12)[0], random_prompts([2] * 32, seed=13)
    solo = make_engine(directory, page_size=4)
    engine = make_engine(directory, page_size=4, attention_backend="triton", disable_overlap=True, **DP)
    try:
        ours = run(engine.core, [(long_prompt, params, 1)] + [(p, params, 0) for p in shorts])
    finally:
        engine.core.close()
    alone = solo.generate([long_prompt], params)[0]
    if guard == "on":
        assert_same_greedy(ours[0], alone, "the long request")
    else:
        assert any(abs(a.logprob - b.logprob) > 1e-3 for a, b in zip(ours[0].logprobs[1:], alone.logprobs[1:]))


def test_data_parallel_attention_options_are_checked_in_one_line(tiny_model, make_engine):
    with pytest.raises(ValueError, match="needs --enable-dp-attention"):
        EngineConfig(model="m", tp_size=2, dp_size=2)
    with pytest.raises(ValueError, match="needs --dp-size equal to --tp-size"):
        EngineConfig(model="m", tp_size=4, dp_size=2, enable_dp_attention=True)
    with pytest.raises(ValueError, match="data_parallel_rank 1: the engine has 1"):
        make_engine(tiny_model("llama3")[0]).core.add_request([1, 2], keel.SamplingParams(), dp_rank=1)
