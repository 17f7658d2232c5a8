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
from keel.engine.limits import RequestLimits, validate_request
from keel.engine.outputs import CoreOutput, TokenLogprob
from keel.models.loader import load_model_config, load_tokenizer
from keel.models.source import resolve_model
from keel.runner.model_runner import ModelRunner
from keel.runner.sampler import SampleOutput
from keel.sampling_params import SamplingParams
from keel.scheduler.batch import build_forward_batch, build_sampling_batch, prompt_logprob_rows
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
        self._live: set[int] = set()  # ids of requests not yet finished
        self._seeds = random.Random(config.seed)

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.model_config.vocab_size, self.context_length, self.kv_cache.capacity_tokens)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming the numbers, for a request the engine could never serve."""
        validate_request(prompt_ids, params, self.limits)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: Optional[int] = None) -> int:
        """Queue a request; returns its id (`rid` when the caller names it: a positive id not in use)."""
        self.validate(prompt_ids, params)
        rid = next(self._rids) if rid is None else rid
        if rid <= 0 or rid in self._live:
            raise ValueError(f"request id {rid} is not positive or already in use")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        self.scheduler.add(Req(rid, list(prompt_ids), params, seed, stop_ids))
        self._live.add(rid)
        return rid

    def abort(self, rid: int, reason: FinishReason = "abort") -> bool:
        """Finish a request now, releasing its KV; False if it is unknown or already finished."""
        aborted = rid in self._live and self.scheduler.abort(rid, reason) is not None
        self._live.discard(rid)
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
            num_sampled = len(batch.sampled)
            token_ids, logprobs = self._sample(batch, logits[:num_sampled])
            _score_prompts(batch, logits[num_sampled:])
            outputs += [self._token_output(appended, token_ids, logprobs)
                        for appended in self.scheduler.process(batch, token_ids)]
        elif self.has_work and not outputs:
            raise RuntimeError("the scheduler has requests but could schedule none of them")
        self._live.difference_update(out.rid for out in outputs if out.finish_reason is not None)
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
        prompt_logprobs = req.prompt_logprobs if first and req.params.prompt_logprobs is not None else None
        return CoreOutput(req.rid, [token_ids[appended.index]], wanted, appended.finish_reason,
                          req.num_cached_tokens if first else None, prompt_logprobs=prompt_logprobs)

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


@torch.inference_mode()
def _score_prompts(batch: ScheduledBatch, logits: torch.Tensor) -> None:
    """Append the log-probs of this step's scored prompt positions to their requests."""
    rows = prompt_logprob_rows(batch)
    if not rows:
        return
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = [req.prompt_ids[p + 1] for req, positions in rows for p in positions]
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    k = max(req.params.prompt_logprobs or 0 for req, _ in rows)
    top = logprobs.topk(k, dim=-1) if k else None
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    i = 0
    for req, positions in rows:
        n = req.params.prompt_logprobs or 0
        for _ in positions:
            alternatives = tuple(zip(top_ids[i][:n], top_values[i][:n])) if top is not None else ()
            req.prompt_logprobs.append(TokenLogprob(targets[i], chosen[i], alternatives))
            i += 1


def _host_logprobs(sampled: SampleOutput, token_ids: list[int]) -> Optional[list[TokenLogprob]]:
    if sampled.logprobs is None:
        return None
    chosen = sampled.logprobs.tolist()
    if sampled.top_ids is None or sampled.top_logprobs is None:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    top = [tuple(zip(ids, lps)) for ids, lps in zip(sampled.top_ids.tolist(), sampled.top_logprobs.tolist())]
    return [TokenLogprob(t, lp, alts) for t, lp, alts in zip(token_ids, chosen, top)]
