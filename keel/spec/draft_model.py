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
from keel.scheduler.scheduler import BatchPart, ScheduledBatch
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
        tokens = torch.zeros(n, k, dtype=torch.int64, device=device)
        greedy = all(p.req.params.is_greedy for p in parts)
        probs = None if greedy else torch.zeros(n, k, self.vocab_size, dtype=torch.float32, device=device)
        last_tokens = columns_to_device([([p.req.token_ids(p.seq_len - p.extend_len, p.seq_len - p.num_draft)[0]
                                           for p in parts], torch.int64)], device)[0]
        for step in range(k):
            active = [i for i, p in enumerate(parts) if p.num_draft > step]
            if not active:
                break
            active_t = columns_to_device([(active, torch.int64)], device)[0]
            logits = self.runner.forward(self._decode_batch([parts[i] for i in active], step,
                                                            last_tokens if step == 0 else tokens[active_t, step - 1]))
            reqs = [parts[i].req for i in active]
            sampling = build_sampling_batch(reqs, self.vocab_size, device, [step] * len(active))
            drawn, q = _draw(logits, sampling)
            tokens[active_t, step] = drawn
            if probs is not None and q is not None:
                probs[active_t, step] = q
        return DraftTokens(tokens, {p.req.rid: i for i, p in enumerate(parts)}, random=not greedy, probs=probs)

    def _decode_batch(self, parts: list[BatchPart], step: int, input_ids: torch.Tensor) -> ForwardBatch:
        """Draft step `step`: each request's token at position last + step, written to that position's slot (one
        of those the scheduler allocated for its verify)."""
        lengths = [p.seq_len - p.num_draft + step for p in parts]  # its KV length after this step
        positions, rows, seq_lens, slots, logits_rows = columns_to_device(
            [([n - 1 for n in lengths], torch.int64), ([p.row for p in parts], torch.int64),
             (lengths, torch.int64), ([int(p.slots[step]) for p in parts], torch.int64),
             (list(range(len(parts))), torch.int64)], self.runner.device)
        return ForwardBatch(ForwardMode.DRAFT_DECODE, self.runner.device, tuple(lengths), (1,) * len(parts),
                            input_ids.contiguous(), positions, rows, seq_lens, slots, logits_rows)

    @torch.inference_mode()
    def observe(self, batch: ForwardBatch) -> None:
        empty = batch.logits_indices[:0]
        mode = ForwardMode.DRAFT_DECODE if batch.mode.is_decode else ForwardMode.DRAFT_EXTEND
        self.runner.forward(dataclasses.replace(batch, mode=mode, logits_indices=empty))


def _draw(logits: torch.Tensor, sampling: SamplingBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each row's draft token, and the distribution q it was drawn from (None when every row is greedy)."""
    argmax = logits.argmax(dim=-1)
    if sampling.all_greedy:
        return argmax, None
    q = filtered_probs(logits, sampling)
    drawn = sample_from(q, sampling.seeds ^ DRAFT_SEED_KEY, sampling.steps)
    return torch.where(sampling.greedy, argmax, drawn), q
