"""From a scheduled step to the runner's inputs: the ForwardBatch and the SamplingBatch."""

from __future__ import annotations

import torch

from keel.runner.forward_batch import ForwardBatch
from keel.runner.sampler import PenaltyInputs, SamplingBatch
from keel.scheduler.req import Req
from keel.scheduler.scheduler import BatchPart, ScheduledBatch


def build_forward_batch(batch: ScheduledBatch, device: torch.device) -> ForwardBatch:
    """Logits rows: first one per sampled part (in order), then one per prompt position owed a prompt log-prob
    (in the order of `prompt_logprob_rows`)."""
    input_ids: list[int] = []
    positions: list[int] = []
    sampled_rows: list[int] = []
    prompt_rows: list[int] = []
    for part in batch.parts:
        start = part.seq_len - part.extend_len
        first_index = len(input_ids)
        input_ids += part.req.token_ids(start, part.seq_len)
        positions += range(start, part.seq_len)
        if part.samples:  # logits only where a token is sampled: not for a chunk mid-prompt
            sampled_rows.append(len(input_ids) - 1)
        prompt_rows += [first_index + p - start for p in _owed_positions(part)]

    def to_device(values: object) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return ForwardBatch(
        mode=batch.mode,
        device=device,
        seq_lens_cpu=tuple(p.seq_len for p in batch.parts),
        extend_lens_cpu=tuple(p.extend_len for p in batch.parts),
        input_ids=to_device(input_ids),
        positions=to_device(positions),
        req_rows=to_device([p.row for p in batch.parts]),
        seq_lens=to_device([p.seq_len for p in batch.parts]),
        out_cache_loc=to_device(torch.cat([p.slots for p in batch.parts])),
        logits_indices=to_device(sampled_rows + prompt_rows),
    )


def prompt_logprob_rows(batch: ScheduledBatch) -> list[tuple[Req, range]]:
    """For each part owed prompt log-probs: the request and the prompt positions this step scores."""
    return [(part.req, positions) for part in batch.parts if (positions := _owed_positions(part))]


def _owed_positions(part: BatchPart) -> range:
    owed = part.req.prompt_logprob_positions
    start = max(owed.start, part.seq_len - part.extend_len)
    return range(start, max(start, min(owed.stop, part.seq_len)))


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def build_sampling_batch(reqs: list[Req], vocab_size: int, device: torch.device) -> SamplingBatch:
    params = [r.params for r in reqs]

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return _column(values, dtype, device)

    greedy = [p.is_greedy for p in params]
    return SamplingBatch(
        greedy=column(greedy, torch.bool),
        temperatures=column([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
        top_ks=column([p.top_k or vocab_size for p in params], torch.int64),
        top_ps=column([p.top_p for p in params], torch.float32),
        min_ps=column([p.min_p for p in params], torch.float32),
        seeds=column([r.seed % 2**63 for r in reqs], torch.int64),
        steps=column([len(r.output_ids) for r in reqs], torch.int64),
        penalties=_penalty_inputs(reqs, vocab_size, device) if any(p.has_penalties for p in params) else None,
        all_greedy=all(greedy),
        needs_filter=any(p.top_k is not None or p.top_p < 1.0 or p.min_p > 0.0 for p in params),
        num_top_logprobs=max(p.top_logprobs for p in params),
        wants_logprobs=any(p.wants_logprobs for p in params),
    )


def _penalty_inputs(reqs: list[Req], vocab_size: int, device: torch.device) -> PenaltyInputs:
    """Token counts of each penalised request; other rows get neutral penalties and empty counts."""
    n = len(reqs)
    counts = torch.zeros(n, vocab_size, dtype=torch.float32)
    seen = torch.zeros(n, vocab_size, dtype=torch.bool)
    for i, req in enumerate(reqs):
        if not req.params.has_penalties:
            continue
        output = torch.tensor(req.output_ids, dtype=torch.int64)
        counts[i].index_add_(0, output, torch.ones(len(output)))
        seen[i, output] = True
        seen[i, torch.tensor(req.prompt_ids, dtype=torch.int64)] = True
    p = [r.params for r in reqs]
    return PenaltyInputs(
        repetition=_column([x.repetition_penalty for x in p], torch.float32, device),
        frequency=_column([x.frequency_penalty for x in p], torch.float32, device),
        presence=_column([x.presence_penalty for x in p], torch.float32, device),
        output_counts=counts.to(device),
        seen=seen.to(device),
    )
