"""Sampler: penalties, greedy, temperature, top-k, top-p, min-p, and log-probs, batched on the device.

Random draws use the exponential race (argmax of p_i / E_i with E_i ~ Exp(1) samples i with
probability p_i) where E_i comes from a hash of (request seed, step, token id). A request's
draw therefore depends on its own seed and step only, never on the other rows of the batch,
and needs no per-request generator object. Log-probs are those of the model's raw
distribution (log_softmax of the logits), before penalties and temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from keel.kernels.argmax import greedy_ids
from keel.kernels.noise import keyed_uniform, race_argmax

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class PenaltyInputs:
    repetition: torch.Tensor  # [n] float32, 1.0 = off
    frequency: torch.Tensor  # [n] float32
    presence: torch.Tensor  # [n] float32
    output_counts: torch.Tensor  # [n, vocab] float32, occurrences of each token in the output so far
    seen: torch.Tensor  # [n, vocab] bool, token occurs in the prompt or the output


@dataclass(frozen=True)
class SamplingBatch:
    """Sampling parameters of the sampled rows of one forward, on the device (host flags marked)."""

    greedy: torch.Tensor  # [n] bool
    temperatures: torch.Tensor  # [n] float32 (1.0 on greedy rows)
    top_ks: torch.Tensor  # [n] int64 (vocab size when off)
    top_ps: torch.Tensor  # [n] float32
    min_ps: torch.Tensor  # [n] float32
    seeds: torch.Tensor  # [n] int64 in [0, 2**63)
    steps: torch.Tensor  # [n] int64, tokens the request has generated so far
    penalties: Optional[PenaltyInputs]  # None when no row uses a penalty
    all_greedy: bool  # host
    needs_filter: bool  # host: some row uses top-k, top-p or min-p
    num_top_logprobs: int  # host: the most alternatives any row asked for
    wants_logprobs: bool  # host


@dataclass(frozen=True)
class SampleOutput:
    token_ids: torch.Tensor  # [n] int64
    logprobs: Optional[torch.Tensor]  # [n] float32, of the chosen tokens
    top_ids: Optional[torch.Tensor]  # [n, k] int64
    top_logprobs: Optional[torch.Tensor]  # [n, k] float32


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
    """logits: [n, vocab] float32 for the n sampled rows."""
    raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.wants_logprobs else None
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    token_ids = greedy_ids(logits)
    if not batch.all_greedy:
        token_ids = torch.where(batch.greedy, token_ids, _sample_random(logits, batch))
    if raw_logprobs is None:
        return SampleOutput(token_ids, None, None, None)
    chosen = raw_logprobs.gather(1, token_ids[:, None])[:, 0]
    top = raw_logprobs.topk(batch.num_top_logprobs, dim=-1) if batch.num_top_logprobs else None
    return SampleOutput(token_ids, chosen, top.indices if top else None, top.values if top else None)


def apply_penalties(logits: torch.Tensor, p: PenaltyInputs) -> torch.Tensor:
    """Repetition penalty on seen tokens (as in transformers), then OpenAI frequency/presence penalties."""
    rep = p.repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(p.seen, penalized, logits)
    return logits - p.frequency[:, None] * p.output_counts - p.presence[:, None] * (p.output_counts > 0)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    probs = torch.softmax(logits / batch.temperatures[:, None], dim=-1)
    if not batch.needs_filter:
        return sample_from(probs, batch.seeds, batch.steps)
    sorted_probs, sorted_ids = _sorted_kept(probs, batch)
    choice = _race(sorted_probs, batch.seeds, batch.steps, sorted_ids)
    return sorted_ids.gather(1, choice[:, None])[:, 0]


def _sorted_kept(probs: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs` sorted descending with the tokens top-k, top-p and min-p cut set to 0, and their token ids."""
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    return sorted_probs.masked_fill(~_kept(sorted_probs, batch), 0.0), sorted_ids


def _kept(sorted_probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Which of the descending-sorted tokens survive top-k, top-p and min-p (the first always does)."""
    rank = torch.arange(sorted_probs.shape[1], device=sorted_probs.device)
    keep = rank[None, :] < batch.top_ks[:, None]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep &= mass_before <= batch.top_ps[:, None]
    keep &= sorted_probs >= batch.min_ps[:, None] * sorted_probs[:, :1]
    keep[:, 0] = True
    return keep


def filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each row samples from: softmax(logits / temperature), cut by top-k, top-p and min-p,
    renormalised. [n, vocab] float32 (greedy rows: their temperature-1 distribution, unused by the caller)."""
    probs = torch.softmax(logits / batch.temperatures[:, None], dim=-1)
    if not batch.needs_filter:
        return probs
    sorted_probs, sorted_ids = _sorted_kept(probs, batch)
    kept = torch.zeros_like(probs).scatter_(1, sorted_ids, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_from(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) `probs`, drawn by the exponential race keyed by (seed, step)."""
    return _race(probs, seeds, steps)


def _race(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
          token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each row's column maximising probs / Exp(1) noise keyed by the column's token id (default: the column)."""
    if probs.is_cuda:  # one pass over probs, where torch makes ~25 over [n, vocab] int64 tensors
        return race_argmax(probs, seeds, steps, token_ids)
    if token_ids is None:
        token_ids = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
    return (probs / exponential_noise(seeds, steps, token_ids)).argmax(dim=-1)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise, a pure function of (seed, step, token id) per element. token_ids: [n, m]."""
    return -torch.log(uniform_noise(seeds, steps, token_ids))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1), a pure function of (seed, step, token id) per element. token_ids: [n, m]."""
    if token_ids.is_cuda:
        return keyed_uniform(seeds, steps, token_ids)
    row_key = _mix32(_mix32(_mix32(seeds & _M32) ^ (seeds >> 32)) ^ (steps & _M32))
    bits = _mix32(row_key[:, None] ^ _mix32(token_ids))
    # 23 bits: x + 0.5 is exact in float32 (with 24, the top value rounded to u = 1, noise 0), and so the same
    # wherever and however it is computed (keel.kernels.noise)
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 values in [0, 2**32); products stay below 2**63."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x
