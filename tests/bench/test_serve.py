"""keel bench serve's timing (keel/bench/serve.py) against scripted streams: tokens are timed whether or not they
decode to text, and a stream that carries no token is an error, not a TTFT of 0."""

from __future__ import annotations

import asyncio
import json

import httpx

from keel.bench.serve import _one_request, _stats


def scripted(events: list[dict]) -> httpx.AsyncClient:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, text=body)))


def run(events: list[dict]):
    async def go():
        async with scripted(events) as client:
            return await _one_request(client, "http://bench", "m", [1, 2, 3], 4)
    return asyncio.run(go())


def chunk(text: str, tokens: int) -> dict:
    return {"choices": [{"index": 0, "text": text}], "usage": {"completion_tokens": tokens}}


def test_tokens_without_text_are_timed():
    result = run([chunk("", 1), chunk("", 2), chunk("a", 3), chunk("", 4), {"choices": [], "usage": {
        "completion_tokens": 4}}])
    assert result.ok and result.output_tokens == 4
    assert result.ttft > 0 and len(result.itls) == 3


def test_a_stream_without_tokens_is_an_error():
    result = run([{"choices": [], "usage": {"completion_tokens": 0}}])
    assert not result.ok and result.error == "the stream carried no token"
    errored = run([chunk("a", 1), {"error": {"message": "the server is shutting down"}}])
    assert not errored.ok and "shutting down" in errored.error


def test_text_chunks_count_where_the_server_reports_no_usage():
    result = run([{"choices": [{"index": 0, "text": t}]} for t in ("a", "", "b")])
    assert result.ok and len(result.itls) == 1


def test_percentiles():
    stats = _stats([float(v) for v in range(1, 101)])
    assert (stats["median"], stats["p90"], stats["p99"]) == (50.5, 90.0, 99.0)
