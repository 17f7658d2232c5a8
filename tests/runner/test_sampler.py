"""The sampler against reference implementations and the distributions it should draw from."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from keel.runner.penalties import PenaltyCounts
from keel.runner.sampler import SamplingBatch, apply_penalties, exponential_noise, sample
from keel.sampling_params import SamplingParams
from keel.scheduler.batch import build_sampling_batch
from keel.scheduler.req import Req

CPU = torch.device("cpu")
VOCAB = 12


def reqs_for(params: list[SamplingParams], seeds: list[int], prompts=None, outputs=None) -> list[Req]:
    reqs = []
    for i, (p, seed) in enumerate(zip(params, seeds)):
        req = Req(i + 1, prompts[i] if prompts else [0], p, seed, frozenset())
        req.output_ids = list(outputs[i]) if outputs else []
        reqs.append(req)
    return reqs


def sampling_batch(reqs: list[Req]) -> SamplingBatch:
    """build_sampling_batch, with the penalty inputs launch_step adds from the device counts (here on the CPU)."""
    batch = build_sampling_batch(reqs, VOCAB, CPU)
    if any(r.params.has_penalties for r in reqs):
        batch = dataclasses.replace(batch, penalties=PenaltyCounts(VOCAB, CPU).inputs(reqs)[0])
    return batch


def draw(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n independent draws from one row of logits (n rows, n different seeds)."""
    reqs = reqs_for([params] * n, list(range(n)))
    return sample(logits.expand(n, -1).contiguous(), sampling_batch(reqs)).token_ids


def reference_kept(probs: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """Token-by-token reference of which tokens top-k, top-p and min-p keep."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    kept, mass = set(), 0.0
    for rank, i in enumerate(order):
        if rank and (top_k is not None and rank >= top_k or mass > top_p or probs[i] < min_p * probs[order[0]]):
            continue
        kept.add(i)
        mass += probs[i].item()
    return torch.tensor([i in kept for i in range(len(probs))])


LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, 0.0, -0.5, -1.0, -1.2, -2.0, -3.0, -4.0])


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, None, 1.0, 0.0), (0.7, None, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.0, None, 0.6, 0.0),
    (1.0, None, 1.0, 0.2), (1.3, 5, 0.8, 0.05),
])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = torch.softmax(LOGITS / temperature, -1)
    kept = reference_kept(probs, top_k, top_p, min_p)
    target = torch.where(kept, probs, 0.0)
    target /= target.sum()
    n = 40000
    counts = torch.bincount(draw(LOGITS, params, n), minlength=VOCAB).float()
    assert (counts[~kept] == 0).all(), "a filtered-out token was sampled"
    # 5 standard deviations of a binomial count: deterministic seeds, so this never flakes
    tolerance = 5 * torch.sqrt(n * target * (1 - target)) + 1
    assert ((counts - n * target).abs() <= tolerance).all(), (counts / n, target)


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    reqs = reqs_for([SamplingParams(temperature=0.0)] * 6, [1, 2, 3, 4, 5, 6])
    out = sample(logits, sampling_batch(reqs))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_seeded_draw_does_not_depend_on_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, VOCAB, generator=g)
    mixed = [SamplingParams(temperature=0.9, seed=42), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.0, top_k=4), SamplingParams(temperature=0.9, seed=42),
             SamplingParams(temperature=0.5, top_p=0.5)]
    batch = sample(logits, sampling_batch(reqs_for(mixed, [42, 0, 7, 42, 9]))).token_ids
    for i in (0, 3):
        alone = sample(logits[i:i + 1], sampling_batch(reqs_for([mixed[i]], [42]))).token_ids
        assert alone.item() == batch[i].item()


def test_noise_depends_on_seed_step_and_token_only():
    tokens = torch.arange(100).expand(3, -1)
    a = exponential_noise(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), tokens)
    b = exponential_noise(torch.tensor([5]), torch.tensor([0]), tokens[:1])
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert (a > 0).all() and torch.isfinite(a).all()
    # Exp(1): mean 1
    big = exponential_noise(torch.tensor([11]), torch.tensor([3]), torch.arange(200000)[None, :])
    assert big.mean().item() == pytest.approx(1.0, abs=0.01)


def test_repetition_penalty_matches_transformers():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, VOCAB, generator=g)
    prompts, outputs = [[1, 2, 3], [4]], [[3, 5], [4, 4, 7]]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7)] * 2
    out = sample(logits, sampling_batch(reqs_for(params, [0, 0], prompts, outputs)))
    expected = torch.stack([
        RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([p + o]), logits[i:i + 1].clone())[0]
        for i, (p, o) in enumerate(zip(prompts, outputs))])
    assert out.token_ids.tolist() == expected.argmax(-1).tolist()
    penalties = sampling_batch(reqs_for(params, [0, 0], prompts, outputs)).penalties
    torch.testing.assert_close(apply_penalties(logits, penalties), expected)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25)
    batch = sampling_batch(reqs_for([params], [0], [[9, 9, 9]], [[3, 3, 5]]))
    penalized = apply_penalties(logits, batch.penalties)[0]
    assert penalized[3].item() == pytest.approx(-(2 * 0.5 + 0.25))
    assert penalized[5].item() == pytest.approx(-(0.5 + 0.25))
    assert penalized[9].item() == 0.0  # prompt tokens are not penalised by these two


def test_rows_without_penalties_are_untouched_in_a_penalised_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, VOCAB, generator=g)
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.0)]
    batch = sampling_batch(reqs_for(params, [0, 0], [[1], [1]], [[2], [2]]))
    torch.testing.assert_close(apply_penalties(logits, batch.penalties)[1], logits[1])


def test_logprobs_are_the_raw_model_distribution():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, VOCAB, generator=g)
    params = [SamplingParams(temperature=0.8, top_k=2, logprobs=True, top_logprobs=3, repetition_penalty=1.5)] * 3
    out = sample(logits, sampling_batch(reqs_for(params, [1, 2, 3], [[0]] * 3, [[1]] * 3)))
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs, raw.topk(3, dim=-1).values)
    assert out.top_ids.tolist() == raw.topk(3, dim=-1).indices.tolist()


def test_no_logprobs_unless_asked():
    out = sample(torch.zeros(1, VOCAB), sampling_batch(reqs_for([SamplingParams()], [0])))
    assert out.logprobs is None and out.top_ids is None
