"""Verification: which draft tokens the target accepts, and the one token it adds after them.

Each drafted request contributes 1 + d logits rows: its last token's and each draft token's. Greedy rows
accept the longest run of drafts equal to the target's argmax and add the argmax after it, so the output is
exactly the target's greedy output. Sampled rows use the speculative-sampling rule, which keeps the target's
distribution whatever the drafter proposes: draft x (drawn from q) is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from max(0, p - q), renormalised; when every
draft is accepted, one more is drawn from p. Deterministic drafters (n-grams) have q = one-hot. p and q are
the distributions the sampler would draw from (temperature, top-k, top-p, min-p applied), and every random
number is a pure function of (request seed, output position), as in the sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from keel.runner.sampler import SamplingBatch, apply_penalties, filtered_probs, sample_from, uniform_noise
from keel.spec import SIMULATE_ACCEPT_ENV

ACCEPT_KEY = 0xFFFFFFFF  # the "token id" that keys each position's accept draw (no real token has it)


def simulated_accept_len() -> Optional[float]:
    value = os.environ.get(SIMULATE_ACCEPT_ENV)
    if not value:
        return None
    length = float(value)
    if not length >= 1.0:
        raise ValueError(f"{SIMULATE_ACCEPT_ENV}={value}: a mean accept length is at least 1")
    return length


@dataclass(frozen=True)
class Verified:
    row_tokens: torch.Tensor  # [rows] int64: the token each verified row emits (rows past a part's count: junk)
    counts: torch.Tensor  # [parts] int64: tokens each part emits, its accepted drafts + 1


def verify(logits: torch.Tensor, rows: SamplingBatch, starts: torch.Tensor, num_draft: torch.Tensor,
           drafts: torch.Tensor, draft_probs: Optional[torch.Tensor]) -> Verified:
    """logits: [rows, vocab] float32, part i's rows at starts[i] .. starts[i] + num_draft[i]; rows: the sampling
    inputs of each row (steps = the output position it samples); drafts: [parts, K] (entries past num_draft[i]
    are ignored); draft_probs: [parts, K, vocab], the drafter's q, or None when its drafts are deterministic."""
    n, k = drafts.shape
    if rows.penalties is not None:  # only on rows of requests without drafts (the scheduler sees to that)
        logits = apply_penalties(logits, rows.penalties)
    offsets = torch.arange(k + 1, device=logits.device)
    position_rows = starts[:, None] + torch.minimum(offsets[None], num_draft[:, None])  # [n, k + 1]
    is_draft = offsets[None, :k] < num_draft[:, None]
    argmax = logits.argmax(dim=-1)
    accepted = _run_length((drafts == argmax[position_rows[:, :k]]) & is_draft)
    if (simulate := simulated_accept_len()) is not None:
        accepted = _simulated_accepts(simulate - 1.0, num_draft, rows.seeds[starts], rows.steps[starts])
    final = argmax[starts + accepted]
    if not rows.all_greedy and simulate is None:
        sampled_accepted, sampled_final = _speculative_sample(logits, rows, starts, num_draft, drafts, draft_probs,
                                                              position_rows[:, :k], is_draft)
        greedy = rows.greedy[starts]
        accepted = torch.where(greedy, accepted, sampled_accepted)
        final = torch.where(greedy, final, sampled_final)
    emitted = torch.cat([drafts, drafts.new_zeros(n, 1)], dim=1).scatter(1, accepted[:, None], final[:, None])
    row_tokens = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    used = offsets[None] <= num_draft[:, None]
    row_tokens[position_rows[used]] = emitted[used]
    return Verified(row_tokens, accepted + 1)


def _simulated_accepts(mean: float, num_draft: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """floor(mean) drafts, one more with probability frac(mean) (a draw keyed like the sampler's), at most all."""
    u = uniform_noise(seeds, steps, torch.full_like(seeds, ACCEPT_KEY)[:, None])[:, 0]
    return torch.minimum(num_draft, int(mean) + (u < mean - int(mean)).to(torch.int64))


def _run_length(accept: torch.Tensor) -> torch.Tensor:
    """Leading True entries of each row."""
    return torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)


def _speculative_sample(logits: torch.Tensor, rows: SamplingBatch, starts: torch.Tensor, num_draft: torch.Tensor,
                        drafts: torch.Tensor, draft_probs: Optional[torch.Tensor], draft_rows: torch.Tensor,
                        is_draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = drafts.shape
    p = filtered_probs(logits, rows)
    p_draft = p[draft_rows, drafts]  # [n, k]: the target's probability of each draft token
    q_draft = draft_probs.gather(2, drafts[..., None])[..., 0] if draft_probs is not None else torch.ones_like(p_draft)
    keys = torch.full((n * k, 1), ACCEPT_KEY, dtype=torch.int64, device=logits.device)
    u = uniform_noise(rows.seeds[draft_rows].reshape(-1), rows.steps[draft_rows].reshape(-1), keys).reshape(n, k)
    accepted = _run_length((u * q_draft < p_draft) & is_draft)
    final_rows = starts + accepted
    target = p[final_rows]
    rejected = accepted < num_draft
    at = accepted.clamp(max=k - 1)
    if draft_probs is not None:
        q = draft_probs[torch.arange(n, device=logits.device), at]
    else:
        q = torch.nn.functional.one_hot(drafts.gather(1, at[:, None])[:, 0], p.shape[1]).to(p.dtype)
    residual = (target - q).clamp(min=0.0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, target)  # rounding left no mass
    target = torch.where(rejected[:, None], residual, target)
    return accepted, sample_from(target, rows.seeds[final_rows], rows.steps[final_rows])
