"""Generation (keel/server/generation.py): engine outputs to events, against a scripted engine client."""

from __future__ import annotations

import asyncio

from keel.engine.outputs import CoreOutput
from keel.engine.stop_strings import StopAutomaton
from keel.models.byte_tokenizer import byte_tokenizer
from keel.sampling_params import SamplingParams
from keel.server.generation import Generation, merged_events
from keel.server.metrics import ServerMetrics

TOKENIZER = byte_tokenizer()


class ScriptedClient:
    """Answers a submitted request with `outputs`, all waiting on its queue before the consumer looks."""

    def __init__(self, outputs: list[CoreOutput]) -> None:
        self.outputs = outputs
        self.aborted: list[int] = []

    def next_rid(self) -> int:
        return 1

    def submit(self, rid, prompt_ids, params, request_id) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        for out in self.outputs:
            queue.put_nowait(out)
        return queue

    def abort(self, rid: int, reason: str = "abort") -> None:
        self.aborted.append(rid)

    def finished(self, rid: int) -> None:
        pass


def events_of(outputs: list[CoreOutput], stop: list[str] = ()) -> tuple[list, ScriptedClient, ServerMetrics]:
    client, metrics = ScriptedClient(outputs), ServerMetrics()
    generation = Generation("cmpl-1", 0, client, metrics, TOKENIZER, None, [1, 2], SamplingParams(max_new_tokens=9),
                            StopAutomaton(list(stop)))

    async def go():
        return [event async for event in merged_events([generation])]
    return asyncio.run(go()), client, metrics


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


def test_outputs_waiting_together_go_out_as_one_event():
    """A consumer that fell behind gets what waits in one event: its cost is per event, not per token."""
    outputs = [CoreOutput(1, ids("a"), None, None), CoreOutput(1, ids("b"), None, None),
               CoreOutput(1, ids("c"), None, "length")]
    events, _, metrics = events_of(outputs)
    assert len(events) == 1
    assert (events[0].text, events[0].token_ids, events[0].finish_reason) == ("abc", ids("abc"), "length")
    assert metrics.generation_tokens._value.get() == 3


def test_a_stop_string_ends_the_merged_event_there():
    outputs = [CoreOutput(1, ids("ab"), None, None), CoreOutput(1, ids("STOP"), None, None),
               CoreOutput(1, ids("zz"), None, None)]
    events, client, _ = events_of(outputs, stop=["STOP"])
    assert [(e.text, e.finish_reason) for e in events] == [("ab", "stop")]
    assert client.aborted == [1]  # the engine is told to stop
