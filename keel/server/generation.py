"""Generation: one engine request as the API process sees it.

It submits the request, turns the engine's token outputs into text (RequestState: incremental
detokenization and stop strings; a stop string finishes the request in the engine), records
latency metrics, and, if whoever consumes it goes away first (a client disconnects), aborts the
request so the engine releases its KV at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Optional

from transformers import PreTrainedTokenizerBase

from keel.engine.outputs import CoreOutput, FinishReason, RequestOutput, TokenLogprob
from keel.engine.request_state import RequestState
from keel.engine.stop_strings import StopAutomaton
from keel.sampling_params import SamplingParams
from keel.server.engine_client import EngineClient
from keel.server.metrics import ServerMetrics

# how a generation sends its request: (rid, prompt ids, params, response id) -> the queue its outputs arrive on
Submit = Callable[[int, list[int], SamplingParams, str], "asyncio.Queue[CoreOutput]"]


@dataclass(frozen=True)
class GenerationEvent:
    index: int  # which choice of the response
    text: str  # new text, safe to show (stop strings held back)
    token_ids: list[int]  # the tokens that arrived with this event
    logprobs: list[TokenLogprob]  # theirs, when asked for
    finish_reason: Optional[FinishReason]  # set on the last event only
    error: Optional[str]  # why the engine gave up on the request, on the last event
    num_tokens: int  # output tokens so far
    # The whole result, shared and still growing: a consumer that lags behind its generation sees later state
    # here, so per-event decisions use the fields above, taken when the event was made.
    output: RequestOutput

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Generation:
    def __init__(self, request_id: str, index: int, client: EngineClient, metrics: ServerMetrics,
                 tokenizer: PreTrainedTokenizerBase, prompt: Optional[str], prompt_ids: list[int],
                 params: SamplingParams, stops: StopAutomaton, submit: Optional[Submit] = None,
                 incremental_text: bool = True) -> None:
        self.request_id = request_id  # the response id: POST /abort/{request_id} stops it
        self.index = index
        self.client = client
        self.submit = submit or client.submit  # a decode server's: its prompt prefilled on a prefill server
        self.metrics = metrics
        self.prompt_ids = prompt_ids
        self.params = params
        self.rid = client.next_rid()
        self.state = RequestState(str(self.rid), prompt, prompt_ids, params, tokenizer, stops, incremental_text)

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """One event per batch of engine outputs: when the consumer falls behind the engine, the outputs waiting
        for it go out together (as vLLM merges them), so a busy API process spends its time per event, not per
        token, and keeps up with any engine."""
        queue = self.submit(self.rid, self.prompt_ids, self.params, self.request_id)
        output = self.state.output
        arrival = last_token = time.monotonic()
        try:
            while not output.finished:
                waiting = [await queue.get()]
                while not queue.empty():
                    waiting.append(queue.get_nowait())
                token_ids: list[int] = []
                logprobs: list[TokenLogprob] = []
                for out in waiting:
                    if output.finished:
                        break  # a stop string ended it: what follows is past the end
                    if self.state.update(out):  # a stop string ended it: the engine stops too, and may cache it
                        self.client.abort(self.rid, reason="stop")
                    self._observe(out)
                    token_ids += out.token_ids
                    logprobs += out.logprobs or []
                if token_ids:
                    now = time.monotonic()
                    first = len(output.token_ids) == len(token_ids)
                    (self.metrics.ttft if first else self.metrics.itl).observe(now - last_token)
                    last_token = now
                yield GenerationEvent(self.index, self.state.take_delta(), token_ids, logprobs, output.finish_reason,
                                      output.error, len(output.token_ids), output)
            self.metrics.e2e.observe(time.monotonic() - arrival)
            self.metrics.requests.labels(output.finish_reason).inc()
        finally:
            if output.finished:
                self.client.finished(self.rid)
            else:  # abandoned: the client went away, or the consumer failed
                self.client.abort(self.rid)
                self.metrics.requests.labels("abort").inc()

    def _observe(self, out: CoreOutput) -> None:
        self.metrics.generation_tokens.inc(len(out.token_ids))
        if out.num_draft_tokens:  # mean accept length = 1 + accepted / verify steps
            self.metrics.spec_verify_steps.inc()
            self.metrics.spec_draft_tokens.inc(out.num_draft_tokens)
            self.metrics.spec_accepted_tokens.inc(out.num_accepted_tokens)
        if out.num_cached_tokens is not None:
            self.metrics.prompt_tokens.inc(len(self.prompt_ids))
            self.metrics.cache_hit_tokens.inc(out.num_cached_tokens)

    async def result(self) -> RequestOutput:
        async for _ in self.events():
            pass
        return self.state.output


async def merged_events(generations: list[Generation]) -> AsyncIterator[GenerationEvent]:
    """Events of several generations as they come. If the consumer stops early, every generation is
    cancelled, which aborts those still running."""
    if len(generations) == 1:  # the common case, without a task and a queue between
        async with contextlib.aclosing(generations[0].events()) as events:  # closed (aborting) if we are
            async for event in events:
                yield event
        return
    queue: asyncio.Queue[Optional[GenerationEvent]] = asyncio.Queue()

    async def pump(generation: Generation) -> None:
        try:
            async for event in generation.events():
                queue.put_nowait(event)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        done = 0
        while done < len(tasks):
            event = await queue.get()
            if event is None:
                done += 1
            else:
                yield event
        for task in tasks:
            task.result()  # surface a failure in any of them
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
