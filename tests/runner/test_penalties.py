"""Penalty counts kept on the device: what each step reads equals counts built from the output on the host."""

from __future__ import annotations

import pytest
import torch

from keel.runner.penalties import PenaltyCounts, initial_counts
from keel.sampling_params import SamplingParams
from keel.scheduler.req import Req, ReqStatus

VOCAB = 20
CPU = torch.device("cpu")
PENALISED = SamplingParams(temperature=0.0, frequency_penalty=0.5, repetition_penalty=1.2)


def _req(rid: int, prompt: list[int], params: SamplingParams = PENALISED) -> Req:
    return Req(rid, prompt, params, 0, frozenset())


def _step(counts: PenaltyCounts, reqs: list[Req], tokens: list[int]) -> torch.Tensor:
    """One sampling step as launch_step runs it: read the inputs, count the sampled tokens, the host reads them
    back later (here at once)."""
    inputs, counted = counts.inputs(reqs)
    counts.count(counted, torch.tensor(tokens))
    for req in reqs:
        req.pending += 1
    return inputs.output_counts


def _read(reqs: list[Req], tokens: list[int]) -> None:
    for req, token in zip(reqs, tokens):
        req.append_tokens([token])


def test_counts_follow_the_sampled_tokens_without_the_host_reading_them():
    counts = PenaltyCounts(VOCAB, CPU)
    a, b, plain = _req(1, [3, 4]), _req(2, [5]), _req(3, [6], SamplingParams(temperature=0.0))
    reqs = [a, b, plain]
    first = _step(counts, reqs, [7, 8, 9])  # nothing read back yet when the next step is built
    second = _step(counts, reqs, [7, 5, 9])
    assert first.sum().item() == 0
    assert second[0, 7].item() == 1 and second[1, 8].item() == 1 and second[2].sum().item() == 0
    _read(reqs, [7, 8, 9])
    _read(reqs, [7, 5, 9])
    third, _ = counts.inputs(reqs)
    for row, req in enumerate(reqs[:2]):  # the device counts are those built from the host's output ids
        want_counts, want_seen = initial_counts(req, VOCAB)
        assert torch.equal(third.output_counts[row], want_counts.float())
        assert torch.equal(third.seen[row], want_seen)
    assert third.output_counts[2].sum().item() == 0 and not third.seen[2].any()  # a row without penalties


def test_slots_are_reused_grown_and_rebuilt_when_they_may_not_match():
    counts = PenaltyCounts(VOCAB, CPU)
    reqs = [_req(rid, [rid]) for rid in range(1, 6)]  # more than the first allocation holds
    _step(counts, reqs, [1, 2, 3, 4, 5])
    _read(reqs, [1, 2, 3, 4, 5])
    assert counts.counts.shape[0] >= 6
    reqs[0].status = ReqStatus.FINISHED
    counts.free_finished()
    newcomer = _req(1, [9])  # the finished request's id, reused: its counts must not leak in
    row = counts.inputs([newcomer])[0].output_counts[0]
    assert row.sum().item() == 0
    stale = reqs[1]
    stale.output_ids.append(11)  # a token the device never counted (a step failed after counting another)
    rebuilt = counts.inputs([stale])[0].output_counts[0]
    assert rebuilt[11].item() == 1 and rebuilt[2].item() == 1
    stale.pending = 1  # ... and one that cannot be rebuilt: its tokens are still on the device
    stale.output_ids.append(12)
    with pytest.raises(ValueError, match="on the device"):
        counts.inputs([stale])


def test_a_token_outside_the_vocabulary_is_refused():
    with pytest.raises(IndexError):
        initial_counts(_req(1, [VOCAB + 3]), VOCAB)
