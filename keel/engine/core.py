"""EngineCore: the scheduler and the model runner, stepped one batch at a time.

It takes token ids in and gives token ids out; text (tokenization, detokenization, stop
strings) belongs to the front end (the offline Engine, or the API server process).
"""

from __future__ import annotations

import itertools
import random
from typing import Optional

import torch

from keel.config import EngineConfig
from keel.debug.invariants import check_idle, check_invariants, strict_checks_enabled
from keel.engine.outputs import CoreOutput, TokenLogprob
from keel.models.loader import load_model_config, load_tokenizer
from keel.models.source import resolve_model
from keel.runner.model_runner import ModelRunner
from keel.runner.sampler import SampleOutput
from keel.sampling_params import SamplingParams
from keel.scheduler.batch import build_forward_batch, build_sampling_batch
from keel.scheduler.req import FinishReason, Req
from keel.scheduler.scheduler import ScheduledBatch, Scheduler, TokenAppended


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model)
        self.model_config = load_model_config(source)
        self.tokenizer = load_tokenizer(source)
        self.runner = ModelRunner(config, source, self.model_config)
        self.kv_cache = self.runner.kv_cache
        self.scheduler = Scheduler(self.kv_cache, config)
        self.strict_checks = strict_checks_enabled()
        self._rids = itertools.count(1)
        self._seeds = random.Random(config.seed)

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming the numbers, for a request the engine could never serve."""
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            bad = next(t for t in prompt_ids if not 0 <= t < vocab)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids {params.stop_token_ids} reach outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.context_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} = "
                             f"{total} tokens exceeds the context length {self.context_length}")
        kv_tokens = total - 1
        if kv_tokens > self.kv_cache.capacity_tokens:
            raise ValueError(f"request needs {kv_tokens} KV tokens, more than the whole KV pool "
                             f"({self.kv_cache.capacity_tokens} tokens)")

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        self.validate(prompt_ids, params)
        rid = next(self._rids)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        self.scheduler.add(Req(rid, list(prompt_ids), params, seed, stop_ids))
        return rid

    def abort(self, rid: int, reason: FinishReason = "abort") -> bool:
        """Finish a request now, releasing its KV; False if it is unknown or already finished."""
        aborted = self.scheduler.abort(rid, reason) is not None
        self._after_step()
        return aborted

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[CoreOutput]:
        """Run one scheduled batch; returns what each request got from it (and requests that failed)."""
        batch = self.scheduler.schedule()
        outputs = [CoreOutput(r.rid, [], None, r.finish_reason, r.num_cached_tokens, r.error)
                   for r in self.scheduler.failed]
        self.scheduler.failed.clear()
        if batch is not None:
            logits = self.runner.forward(build_forward_batch(batch, self.runner.device))
            token_ids, logprobs = self._sample(batch, logits)
            outputs += [self._token_output(appended, token_ids, logprobs)
                        for appended in self.scheduler.process(batch, token_ids)]
        elif self.has_work and not outputs:
            raise RuntimeError("the scheduler has requests but could schedule none of them")
        self._after_step()
        return outputs

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> tuple[list[int], Optional[list[TokenLogprob]]]:
        reqs = [p.req for p in batch.sampled]
        if not reqs:  # only chunks of long prompts ran: nothing to sample
            return [], None
        sampled = self.runner.sample(logits, build_sampling_batch(reqs, self.model_config.vocab_size,
                                                                  self.runner.device))
        token_ids = sampled.token_ids.tolist()
        return token_ids, _host_logprobs(sampled, token_ids)

    @staticmethod
    def _token_output(appended: TokenAppended, token_ids: list[int],
                      logprobs: Optional[list[TokenLogprob]]) -> CoreOutput:
        req, wanted = appended.req, None
        if logprobs is not None and req.params.wants_logprobs:
            lp = logprobs[appended.index]
            wanted = [TokenLogprob(lp.token_id, lp.logprob, lp.top[:req.params.top_logprobs])]
        first = len(req.output_ids) == 1
        return CoreOutput(req.rid, [token_ids[appended.index]], wanted, appended.finish_reason,
                          req.num_cached_tokens if first else None)

    def _after_step(self) -> None:
        if not self.has_work:
            check_idle(self.scheduler)  # always on: cheap when idle, and a leak is caught where it happens
        elif self.strict_checks:
            check_invariants(self.scheduler)

    def check_idle(self) -> None:
        """Raise InvariantViolation unless the engine is drained and every page is free or evictable cache."""
        check_idle(self.scheduler)

    def flush_cache(self) -> int:
        """Evict the whole prefix cache (every page must be free afterwards); returns the pages freed."""
        return self.kv_cache.flush_cache()


def _host_logprobs(sampled: SampleOutput, token_ids: list[int]) -> Optional[list[TokenLogprob]]:
    if sampled.logprobs is None:
        return None
    chosen = sampled.logprobs.tolist()
    if sampled.top_ids is None or sampled.top_logprobs is None:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    top = [tuple(zip(ids, lps)) for ids, lps in zip(sampled.top_ids.tolist(), sampled.top_logprobs.tolist())]
    return [TokenLogprob(t, lp, alts) for t, lp, alts in zip(token_ids, chosen, top)]
