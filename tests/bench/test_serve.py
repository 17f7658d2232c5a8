"""keel bench serve's timing (keel/bench/serve.py) against scripted streams: tokens are timed whether or not they
decode to text, and a stream that carries no token is an error, not a TTFT of 0."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from keel.bench.serve import _one_request, _stats


def run(events: list[dict]):
    """_one_request against a server that streams `events` (then [DONE]) as SSE."""
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in body.split("\n\n")[:-1]:  # one write per event, as a server streams them
            await response.write(f"{part}\n\n".encode())
        return response

    async def go():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as client:
                return await _one_request(client, f"http://127.0.0.1:{port}", "m", [1, 2, 3], 4)
        finally:
            await runner.cleanup()
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


def test_bench_offline_draws_the_prompts_bench_serve_sends():
    """One seed, lengths and id range give both benchmarks the same requests, so their throughputs compare."""
    import argparse
    import random

    from keel.bench import offline, serve
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    serve_args = parser.parse_args(["--url", "http://x", "--num-prompts", "5", "--input-len", "3", "9",
                                    "--output-len", "2", "7", "--seed", "4", "--token-id-range", "1000"])
    config = serve.config_from_args(serve_args)
    sent = serve.make_work(config, random.Random(config.seed))
    offline_args = argparse.Namespace(bench_seed=4, num_prompts=5, input_len=(3, 9), output_len=(2, 7),
                                      token_id_range=1000)
    prompts, output_lens = offline.make_work(offline_args, vocab=32000)
    assert sent == list(zip(prompts, output_lens))
    assert len({len(p) for p in prompts}) > 1 and max(max(p) for p in prompts) < 1000
