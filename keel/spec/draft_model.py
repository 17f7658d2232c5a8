"""STANDALONE drafting: a smaller model of the target's vocabulary proposes the draft tokens.

Its KV pool has the same slots as the target's and is addressed through the same request table, so pages,
ownership and release are the target's: nothing to allocate or free here. Two rules keep its KV complete:
- after every target forward, the draft model runs the same tokens (`observe`, a DRAFT_EXTEND), so every
  position whose target KV is committed has the draft's KV too (prefill chunks, prefix-cache hits and
  retraction need no bookkeeping of their own);
- drafting (`propose`) is num_draft DRAFT_DECODE steps from the request's last token, writing only into the
  slots the scheduler allocated for this step's verify: step i runs only the requests with more than i drafts,
  so no write can land past a request's allocation.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from keel.runner.forward_batch import ForwardBatch, ForwardMode
from keel.runner.model_runner import ModelRunner
from keel.runner.sampler import SamplingBatch, filtered_probs, sample_from
from keel.scheduler.batch import DraftTokens, build_sampling_batch
from keel.scheduler.scheduler import ScheduledBatch
from keel.transfer import columns_to_device

DRAFT_SEED_KEY = 0x2545F4914F6CDD1D  # mixed into request seeds: the drafter's draws are not the verifier's


class DraftModelDrafter:
    def __init__(self, runner: ModelRunner, num_draft: int, vocab_size: int) -> None:
        self.runner = runner
        self.num_draft = num_draft
        self.vocab_size = vocab_size

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch) -> Optional[DraftTokens]:
        parts = [p for p in batch.sampled if p.num_draft]
        if not parts:
            return None
        device = self.runner.device
        n, k = len(parts), self.num_draft
        # Step s drafts for the requests with more than s drafts; every step's inputs go over in one copy.
        active = [[i for i, p in enumerate(parts) if p.num_draft > step] for step in range(k)]
        active = [rows for rows in active if rows]
        entries = [(step, i) for step, rows in enumerate(active) for i in rows]
        lengths = [parts[i].seq_len - parts[i].num_draft + step for step, i in entries]  # KV length after the step
        last_tokens, index, positions, rows, seq_lens, slots = columns_to_device(
            [([p.req.token_ids(p.seq_len - p.extend_len, p.seq_len - p.num_draft)[0] for p in parts], torch.int64),
             ([i for _, i in entries], torch.int64), ([m - 1 for m in lengths], torch.int64),
             ([parts[i].row for _, i in entries], torch.int64), (lengths, torch.int64),
             ([int(parts[i].slots[step]) for step, i in entries], torch.int64)], device)
        greedy = all(p.req.params.is_greedy for p in parts)
        sampling = None if greedy else build_sampling_batch([p.req for p in parts], self.vocab_size, device)
        tokens = torch.zeros(n, k, dtype=torch.int64, device=device)
        probs = None if greedy else torch.zeros(n, k, self.vocab_size, dtype=torch.float32, device=device)
        start = 0
        for step, rows_of_step in enumerate(active):
            m = len(rows_of_step)
            at = slice(start, start + m)
            start += m
            input_ids = last_tokens[index[at]] if step == 0 else tokens[index[at], step - 1]
            logits = self.runner.forward(ForwardBatch(
                ForwardMode.DRAFT_DECODE, device, tuple(lengths[at]), (1,) * m, input_ids, positions[at], rows[at],
                seq_lens[at], slots[at], torch.arange(m, device=device)))
            if sampling is None:
                tokens[index[at], step] = logits.argmax(dim=-1)
                continue
            drawn, q = _draw(logits, _rows_of(sampling, index[at], step))
            tokens[index[at], step] = drawn
            if probs is not None and q is not None:
                probs[index[at], step] = q
        return DraftTokens(tokens, {p.req.rid: i for i, p in enumerate(parts)}, random=not greedy, probs=probs)

    @torch.inference_mode()
    def observe(self, batch: ForwardBatch) -> None:
        empty = batch.logits_indices[:0]
        mode = ForwardMode.DRAFT_DECODE if batch.mode.is_decode else ForwardMode.DRAFT_EXTEND
        self.runner.forward(dataclasses.replace(batch, mode=mode, logits_indices=empty))


def _rows_of(sampling: SamplingBatch, index: torch.Tensor, step: int) -> SamplingBatch:
    """The sampling inputs of rows `index`, drawing output position num_generated + step."""
    return dataclasses.replace(sampling, greedy=sampling.greedy[index], temperatures=sampling.temperatures[index],
                               top_ks=sampling.top_ks[index], top_ps=sampling.top_ps[index],
                               min_ps=sampling.min_ps[index], seeds=sampling.seeds[index],
                               steps=sampling.steps[index] + step)


def _draw(logits: torch.Tensor, sampling: SamplingBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each row's draft token, and the distribution q it was drawn from (None when every row is greedy)."""
    argmax = logits.argmax(dim=-1)
    if sampling.all_greedy:
        return argmax, None
    q = filtered_probs(logits, sampling)
    drawn = sample_from(q, sampling.seeds ^ DRAFT_SEED_KEY, sampling.steps)
    return torch.where(sampling.greedy, argmax, drawn), q
