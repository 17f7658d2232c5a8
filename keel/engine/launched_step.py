"""LaunchedStep: a step whose forward and sampling are queued on the device, its results on their way.

Launching does all of a step's device work (forward, sampling, prompt log-probs) and starts copying
the results to pinned host buffers behind one event; reading them waits only for that event. In
between, the host is free to schedule and launch the next step (overlap scheduling), which takes
the sampled ids it needs from `pending` on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from keel.engine.outputs import TokenLogprob
from keel.runner.model_runner import ModelRunner
from keel.scheduler.batch import (PendingTokens, build_forward_batch, build_sampling_batch,
                                  prompt_logprob_rows)
from keel.scheduler.req import Req
from keel.scheduler.scheduler import ScheduledBatch
from keel.transfer import to_device, to_host


@dataclass(frozen=True)
class TopLogprobs:
    """Host copies (valid once the step's event fired) of chosen-token log-probs and the top alternatives."""

    chosen: torch.Tensor  # [n] float32
    top_ids: Optional[torch.Tensor]  # [n, k] int64
    top_values: Optional[torch.Tensor]  # [n, k] float32

    def to_list(self, token_ids: list[int]) -> list[TokenLogprob]:
        chosen = self.chosen.tolist()
        if self.top_ids is None or self.top_values is None:
            return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
        top = [tuple(zip(ids, lps)) for ids, lps in zip(self.top_ids.tolist(), self.top_values.tolist())]
        return [TokenLogprob(t, lp, alts) for t, lp, alts in zip(token_ids, chosen, top)]


@dataclass(frozen=True)
class PromptScores:
    rows: list[tuple[Req, range]]  # per request owed prompt log-probs, the positions this step scored
    targets: list[int]  # the prompt token each scored position predicts
    logprobs: TopLogprobs


@dataclass(frozen=True)
class StepResults:
    token_ids: list[int]  # one per sampled part
    logprobs: Optional[list[TokenLogprob]]  # one per sampled part, when any request asked


@dataclass(frozen=True)
class LaunchedStep:
    batch: ScheduledBatch
    pending: Optional[PendingTokens]  # the sampled ids, on the device; None when nothing was sampled
    token_ids: Optional[torch.Tensor]  # host copy of pending.token_ids
    logprobs: Optional[TopLogprobs]
    prompt_scores: Optional[PromptScores]
    done: Optional[torch.cuda.Event]  # fires when every result above is on the host; None off CUDA

    @property
    def needs_host_tokens(self) -> bool:
        """The next step cannot be built before these tokens are known: penalties count them on the host."""
        return any(p.req.params.has_penalties for p in self.batch.sampled)

    def read(self) -> StepResults:
        """Wait for the results and append prompt log-probs to their requests; returns the sampled tokens."""
        if self.done is not None:
            self.done.synchronize()
        if self.prompt_scores is not None:
            _append_prompt_logprobs(self.prompt_scores)
        if self.token_ids is None:
            return StepResults([], None)
        token_ids = self.token_ids.tolist()
        return StepResults(token_ids, self.logprobs.to_list(token_ids) if self.logprobs is not None else None)


@torch.inference_mode()
def launch_step(runner: ModelRunner, batch: ScheduledBatch, vocab_size: int,
                previous: Optional[PendingTokens]) -> LaunchedStep:
    """Queue `batch`'s forward, sampling and prompt scoring; `previous` holds the ids of the step before it
    when the host has not read them yet."""
    logits = runner.forward(build_forward_batch(batch, runner.device, previous))
    sampled_parts = batch.sampled
    n = len(sampled_parts)
    pending, token_ids, logprobs = None, None, None
    if n:
        reqs = [p.req for p in sampled_parts]
        sampled = runner.sample(logits[:n], build_sampling_batch(reqs, vocab_size, runner.device))
        pending = PendingTokens(sampled.token_ids, {r.rid: i for i, r in enumerate(reqs)})
        token_ids = to_host(sampled.token_ids)
        if sampled.logprobs is not None:
            logprobs = _host_top(sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
    prompt_scores = _score_prompts(batch, logits[n:])
    done = None
    if runner.device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    return LaunchedStep(batch, pending, token_ids, logprobs, prompt_scores, done)


def _host_top(chosen: torch.Tensor, top_ids: Optional[torch.Tensor],
              top_values: Optional[torch.Tensor]) -> TopLogprobs:
    return TopLogprobs(to_host(chosen), to_host(top_ids) if top_ids is not None else None,
                       to_host(top_values) if top_values is not None else None)


def _score_prompts(batch: ScheduledBatch, logits: torch.Tensor) -> Optional[PromptScores]:
    """Log-probs of this step's scored prompt positions (logits rows after the sampled ones), on their way."""
    rows = prompt_logprob_rows(batch)
    if not rows:
        return None
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = [req.prompt_ids[p + 1] for req, positions in rows for p in positions]
    chosen = logprobs.gather(1, to_device(targets, torch.int64, logits.device)[:, None])[:, 0]
    k = max(req.params.prompt_logprobs or 0 for req, _ in rows)
    top = logprobs.topk(k, dim=-1) if k else None
    return PromptScores(rows, targets, _host_top(chosen, top.indices if top is not None else None,
                                                 top.values if top is not None else None))


def _append_prompt_logprobs(scores: PromptScores) -> None:
    scored = scores.logprobs.to_list(scores.targets)
    i = 0
    for req, positions in scores.rows:
        n = req.params.prompt_logprobs or 0
        for _ in positions:
            lp = scored[i]
            req.prompt_logprobs.append(TokenLogprob(lp.token_id, lp.logprob, lp.top[:n]))
            i += 1
