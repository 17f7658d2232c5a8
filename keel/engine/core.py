"""EngineCore: the scheduler and the model runner, stepped one batch at a time.

It takes token ids in and gives token ids out; text (tokenization, detokenization, stop
strings) belongs to the front end (the offline Engine, or the API server process).
"""

from __future__ import annotations

import itertools
import random
from typing import Optional

from keel.cache.id_allocator import KVAccountingError
from keel.config import EngineConfig
from keel.engine.outputs import CoreOutput, TokenLogprob
from keel.models.loader import load_model_config, load_tokenizer
from keel.models.source import resolve_model
from keel.runner.model_runner import ModelRunner
from keel.runner.sampler import SampleOutput
from keel.sampling_params import SamplingParams
from keel.scheduler.batch import build_forward_batch, build_sampling_batch
from keel.scheduler.req import FinishReason, Req
from keel.scheduler.scheduler import Scheduler


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model)
        self.model_config = load_model_config(source)
        self.tokenizer = load_tokenizer(source)
        self.runner = ModelRunner(config, source, self.model_config)
        self.kv_cache = self.runner.kv_cache
        self.scheduler = Scheduler(self.kv_cache, config.max_prefill_tokens)
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
        if aborted and not self.has_work:
            self.check_idle()
        return aborted

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[CoreOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        device = self.runner.device
        logits = self.runner.forward(build_forward_batch(batch, device))
        sampled = self.runner.sample(logits, build_sampling_batch(batch.reqs, self.model_config.vocab_size, device))
        token_ids = sampled.token_ids.tolist()
        logprobs = _host_logprobs(sampled, token_ids)
        outputs = []
        for step in self.scheduler.process(batch, token_ids):
            req, wanted = step.req, None
            if logprobs is not None and req.params.wants_logprobs:
                lp = logprobs[step.index]
                wanted = [TokenLogprob(lp.token_id, lp.logprob, lp.top[:req.params.top_logprobs])]
            outputs.append(CoreOutput(req.rid, [token_ids[step.index]], wanted, step.finish_reason))
        if not self.has_work:
            self.check_idle()  # always on: cheap when idle, and a leak is caught where it happens
        return outputs

    def check_idle(self) -> None:
        """With no request left, every page and row must be free; raises KVAccountingError otherwise."""
        if self.has_work:
            raise KVAccountingError("check_idle() called while requests are still queued or running")
        self.kv_cache.check_consistent()
        pages, rows = self.kv_cache.pages, self.kv_cache.rows
        if pages.num_free != pages.capacity or rows.num_free != rows.capacity:
            raise KVAccountingError(f"idle engine holds {pages.capacity - pages.num_free} pages and "
                                    f"{rows.capacity - rows.num_free} rows: {pages.owned_counts()}")


def _host_logprobs(sampled: SampleOutput, token_ids: list[int]) -> Optional[list[TokenLogprob]]:
    if sampled.logprobs is None:
        return None
    chosen = sampled.logprobs.tolist()
    if sampled.top_ids is None or sampled.top_logprobs is None:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    top = [tuple(zip(ids, lps)) for ids, lps in zip(sampled.top_ids.tolist(), sampled.top_logprobs.tolist())]
    return [TokenLogprob(t, lp, alts) for t, lp, alts in zip(token_ids, chosen, top)]
