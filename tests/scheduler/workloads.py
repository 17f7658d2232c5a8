"""Seeded random workloads for the scheduler: arrivals, shared prefixes, aborts, tiny pools, forced retraction."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import keel

VOCAB = 256
MAX_NEW = 12


@dataclass
class WorkloadRequest:
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int
    abort_step: Optional[int]  # step at which the client aborts, if it does
    penalty: float  # a repetition penalty (1.0 = none): penalties read the output, so they must survive retraction

    @property
    def params(self) -> keel.SamplingParams:
        return keel.SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens, ignore_eos=True,
                                   top_logprobs=2, repetition_penalty=self.penalty)


@dataclass
class Workload:
    seed: int
    options: dict = field(default_factory=dict)  # Engine options
    retract_every: int = 0  # KEEL_DEBUG_RETRACT_EVERY
    requests: list[WorkloadRequest] = field(default_factory=list)

    def describe(self) -> str:
        return (f"seed={self.seed} options={self.options} retract_every={self.retract_every} "
                f"requests={[(len(r.prompt), r.max_new_tokens, r.arrival_step, r.abort_step) for r in self.requests]}")


def make_workload(seed: int) -> Workload:
    rng = random.Random(seed)
    page_size = rng.choice([1, 4, 16])
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 3))]
    requests = []
    for _ in range(rng.randint(1, 10)):
        length = rng.choice([1, page_size, page_size + 1, rng.randint(2, 48)])
        shared = rng.choice(prefixes)[:length] if rng.random() < 0.6 else []
        prompt = shared + [rng.randrange(VOCAB) for _ in range(length - len(shared))]
        arrival = rng.randint(0, 10)
        abort = arrival + rng.randint(0, 8) if rng.random() < 0.15 else None
        requests.append(WorkloadRequest(prompt, rng.randint(1, MAX_NEW), arrival, abort,
                                        rng.choice([1.0, 1.0, 1.0, 1.3])))
    largest = max(len(r.prompt) + r.max_new_tokens - 1 for r in requests)
    pages = -(-largest // page_size) + rng.randint(0, 3)  # tiny: one request's worth and a few pages more
    chunk = rng.choice([None, page_size * rng.randint(1, 4), 64])
    options = dict(
        page_size=page_size,
        kv_cache_tokens=pages * page_size,
        max_running_requests=rng.randint(1, 8),
        chunked_prefill_size=chunk,
        max_prefill_tokens=rng.choice([64, 4096]) if chunk is None else max(chunk, page_size * rng.randint(1, 8)),
        enable_mixed_chunk=rng.random() < 0.3 and chunk is not None,
        schedule_policy=rng.choice(["fcfs", "lpm"]),
        disable_radix_cache=rng.random() < 0.2,
        disable_overlap=rng.random() < 0.25,
    )
    return Workload(seed, options, rng.choice([0, 0, 2, 3, 5]), requests)
