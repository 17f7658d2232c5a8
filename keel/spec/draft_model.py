"""Drafting with a model: STANDALONE (a smaller model of the target's vocabulary) or an EAGLE head.

The drafter's KV pool has the same slots as the target's and is addressed through the same request table, so
pages, ownership and release are the target's: nothing to allocate or free here. Two rules keep its KV complete:
- after every target forward the drafter runs the same positions (`observe`: DRAFT_EXTEND, or decode rows for a
  decode or verify batch), so every position whose target KV is committed has the drafter's KV too (prefill
  chunks, prefix-cache hits and retraction need no bookkeeping of their own);
- drafting (`propose`) is num_draft DRAFT_DECODE steps, each writing only into slots the scheduler allocated
  for this step's verify or already committed: step i runs only the requests with more than i drafts, so no
  write can land past a request's allocation.

An EAGLE head drafts one position behind: its position p reads the token at p + 1 and a hidden state for p,
the target's (captured by its forward) for verified positions, its own output of p - 1 while it drafts ahead.
So `observe` feeds it the tokens that follow each position (prompt tokens, accepted drafts, the new token) with
the target's features, and keeps each request's feature of its last committed position, on the device, for
the first draft step of the next round.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from keel.cache.req_table import ReqToTokenTable
from keel.models.eagle import EagleHead
from keel.runner.forward_batch import ForwardBatch, ForwardMode
from keel.runner.model_runner import ModelRunner
from keel.runner.sampler import SamplingBatch, filtered_probs, sample_from
from keel.scheduler.batch import DraftTokens, build_sampling_batch
from keel.scheduler.scheduler import ScheduledBatch
from keel.spec.drafter import TargetStep
from keel.transfer import columns_to_device

DRAFT_SEED_KEY = 0x2545F4914F6CDD1D  # mixed into request seeds: the drafter's draws are not the verifier's


class DraftModelDrafter:
    def __init__(self, runner: ModelRunner, num_draft: int, table: ReqToTokenTable) -> None:
        self.runner = runner
        self.num_draft = num_draft
        self.vocab_size = runner.model_config.vocab_size  # the target's: EngineCore checks they are equal
        self.table = table
        self.head: Optional[EagleHead] = runner.model if isinstance(runner.model, EagleHead) else None
        self.reads_target_features = self.head is not None
        # EAGLE: per request-table row, the head's input hidden state for the request's last committed position
        self.features = (torch.zeros(table.slots.shape[0], self.head.input_feature_size, dtype=runner.dtype,
                                     device=runner.device) if self.head is not None else None)

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch) -> Optional[DraftTokens]:
        parts = [p for p in batch.sampled if p.num_draft]
        if not parts:
            return None
        device = self.runner.device
        n, k = len(parts), self.num_draft
        behind = 1 if self.head is not None else 0  # an EAGLE head drafts one position behind the tokens
        # Step s drafts for the requests with more than s drafts; every step's inputs go over in one copy.
        active = [[i for i, p in enumerate(parts) if p.num_draft > step] for step in range(k)]
        active = [rows for rows in active if rows]
        entries = [(step, i) for step, rows in enumerate(active) for i in rows]
        lengths = [parts[i].seq_len - parts[i].num_draft + step - behind for step, i in entries]  # KV after it
        slot_of = [int(parts[i].slots[step - behind]) if step >= behind else 0 for step, i in entries]
        last_tokens, index, positions, rows, seq_lens, slots = columns_to_device(
            [([p.req.token_ids(p.seq_len - p.extend_len, p.seq_len - p.num_draft)[0] for p in parts], torch.int64),
             ([i for _, i in entries], torch.int64), ([m - 1 for m in lengths], torch.int64),
             ([parts[i].row for _, i in entries], torch.int64), (lengths, torch.int64), (slot_of, torch.int64)],
            device)
        features = None
        if self.features is not None:  # step 0 rewrites the last committed position: its slot is in the table
            slots[:n] = self.table.slots[rows[:n], positions[:n]].to(torch.int64)
            features = self.features[rows[:n]]
        greedy = all(p.req.params.is_greedy for p in parts)
        sampling = None if greedy else build_sampling_batch([p.req for p in parts], self.vocab_size, device)
        tokens = torch.zeros(n, k, dtype=torch.int64, device=device)
        probs = None if greedy else torch.zeros(n, k, self.vocab_size, dtype=torch.float32, device=device)
        start = 0
        for step, rows_of_step in enumerate(active):
            m = len(rows_of_step)
            at = slice(start, start + m)
            start += m
            who = index[at]
            out = self.runner.forward_full(ForwardBatch(
                ForwardMode.DRAFT_DECODE, device, tuple(lengths[at]), (1,) * m,
                last_tokens[who] if step == 0 else tokens[who, step - 1], positions[at], rows[at], seq_lens[at],
                slots[at], torch.arange(m, device=device), features[who] if features is not None else None))
            if features is not None and out.features is not None:
                features[who] = out.features  # the next step's input hidden states
            if sampling is None:
                tokens[who, step] = out.logits.argmax(dim=-1)
                continue
            drawn, q = _draw(out.logits, _rows_of(sampling, who, step))
            tokens[who, step] = drawn
            if probs is not None and q is not None:
                probs[who, step] = q
        return DraftTokens(tokens, {p.req.rid: i for i, p in enumerate(parts)}, random=not greedy, probs=probs)

    @torch.inference_mode()
    def observe(self, step: TargetStep) -> None:
        batch = step.batch
        mode = ForwardMode.DRAFT_DECODE if batch.mode.is_decode else ForwardMode.DRAFT_EXTEND
        draft_batch = dataclasses.replace(batch, mode=mode, logits_indices=batch.logits_indices[:0])
        if self.head is None or self.features is None:
            self.runner.forward_full(draft_batch)
            return
        if step.features is None or step.next_token_ids is None or step.last_tokens is None \
                or step.last_req_rows is None:
            raise ValueError("TargetStep lacks the target's features or next tokens, which an EAGLE head reads")
        features = self.head.project_target_features(step.features)
        self.runner.forward_full(dataclasses.replace(draft_batch, input_ids=step.next_token_ids,
                                                     input_features=features))
        self.features[step.last_req_rows] = features[step.last_tokens]


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
