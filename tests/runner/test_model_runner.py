"""The runner on rare inputs: idle and empty batches, and batches around them."""

from __future__ import annotations

import pytest
import torch

import keel
from keel.runner.forward_batch import ForwardBatch, ForwardMode
from keel.scheduler.batch import build_forward_batch
from tests.helpers import random_prompts

CPU = torch.device("cpu")


def empty_batch(mode: ForwardMode) -> ForwardBatch:
    idle = ForwardBatch.idle(CPU)
    return ForwardBatch(mode, CPU, (), (), idle.input_ids, idle.positions, idle.req_rows, idle.seq_lens,
                        idle.out_cache_loc, idle.logits_indices)


@pytest.mark.parametrize("mode", list(ForwardMode))
def test_idle_and_empty_batches_run_and_return_no_logits(tiny_model, make_engine, mode):
    directory, _ = tiny_model("qwen3")
    runner = make_engine(directory).core.runner
    before = runner.kv_pool.k_cache.clone()
    batch = ForwardBatch.idle(CPU) if mode == ForwardMode.IDLE else empty_batch(mode)
    logits = runner.forward(batch)
    assert logits.shape == (0, runner.model_config.vocab_size)
    assert torch.equal(runner.kv_pool.k_cache, before)


def test_idle_forwards_between_steps_change_nothing(tiny_model, make_engine):
    """Metadata is rebuilt per forward, so an idle forward cannot leak state into the next one."""
    directory, _ = tiny_model("mistral")
    prompts = random_prompts([5, 19, 11], seed=4)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, top_logprobs=2)
    reference = make_engine(directory).generate(prompts, params)

    engine = make_engine(directory)
    core = engine.core
    rids = [core.add_request(p, params) for p in prompts]
    tokens: dict[int, list[int]] = {r: [] for r in rids}
    while core.has_work:
        core.runner.forward(ForwardBatch.idle(CPU))
        for out in core.step():
            tokens[out.rid] += out.token_ids
        core.runner.forward(empty_batch(ForwardMode.DECODE))
    assert [tokens[r] for r in rids] == [o.token_ids for o in reference]


def test_forward_batch_rejects_inconsistent_fields():
    idle = ForwardBatch.idle(CPU)
    with pytest.raises(ValueError, match="batch size"):
        ForwardBatch(ForwardMode.DECODE, CPU, (3,), (1,), torch.tensor([1]), torch.tensor([2]), idle.req_rows,
                     torch.tensor([3]), torch.tensor([7]), torch.tensor([0]))
    with pytest.raises(ValueError, match="input_ids"):
        ForwardBatch(ForwardMode.DECODE, CPU, (3,), (1,), torch.tensor([1, 2]), torch.tensor([2]),
                     torch.tensor([1]), torch.tensor([3]), torch.tensor([7]), torch.tensor([0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_batch_rejects_host_tensor_in_a_device_field():
    idle = ForwardBatch.idle(torch.device("cuda"))
    with pytest.raises(ValueError, match="on cpu"):
        ForwardBatch(ForwardMode.IDLE, idle.device, (), (), torch.empty(0, dtype=torch.int64), idle.positions,
                     idle.req_rows, idle.seq_lens, idle.out_cache_loc, idle.logits_indices)


def test_logits_only_for_sampled_positions(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory)
    core = engine.core
    for p in random_prompts([7, 12], seed=2):
        core.add_request(p, keel.SamplingParams(max_new_tokens=1))
    batch = core.scheduler.schedule()
    fb = build_forward_batch(batch, CPU)
    assert fb.num_tokens == 19 and fb.logits_indices.tolist() == [6, 18]
    assert core.runner.forward(fb).shape == (2, core.model_config.vocab_size)
    for part in batch.parts:
        core.abort(part.req.rid)
