"""Concurrency, disconnects, aborts, health and metrics of a running server."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

import keel

CLIENTS = 64
DISCONNECTING = CLIENTS // 4


def completion_body(i: int, max_tokens: int = 24) -> dict:
    return {"model": "keel-demo", "prompt": f"Request {i}: the", "max_tokens": max_tokens, "temperature": 0,
            "stream": True}


async def stream_one(client: httpx.AsyncClient, url: str, i: int, disconnect: bool) -> str:
    text = ""
    async with client.stream("POST", f"{url}/v1/completions", json=completion_body(i)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                break
            if line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
                if disconnect and text:
                    return text  # leave mid-stream: the connection is closed under the server
    return text


def wait_until_idle(server, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = server.info()
        engine = info["engine"]  # None until the engine's first stats arrive
        if info["pending_requests"] == 0 and engine and engine["running"] == 0 and engine["waiting"] == 0:
            return info
        time.sleep(0.1)
    raise AssertionError(f"server never went idle: {server.info()}")


def test_concurrent_streams_with_disconnects(server):
    async def run_all() -> list[str]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, server.url, i, i % 4 == 0) for i in range(CLIENTS)))

    texts = asyncio.run(run_all())
    offline = keel.Engine("keel-demo", device="cpu", dtype="float32")
    for i in range(CLIENTS):
        if i % 4:  # the three quarters that stayed got exactly their output
            expected = offline.generate(f"Request {i}: the", keel.SamplingParams(temperature=0, max_new_tokens=24))
            assert texts[i] == expected[0].text, f"client {i}"
    info = wait_until_idle(server)
    engine = info["engine"]
    # every page is free or in the evictable prefix cache: none held by a request, none locked
    assert engine["pages_held"] == 0 and engine["pages_cached_locked"] == 0, engine
    assert engine["pages_free"] + engine["pages_cached"] == engine["pages_total"], engine
    assert httpx.get(f"{server.url}/health").status_code == 200  # the engine's strict checks never failed


def test_abort_route_stops_a_running_request(server):
    body = {**completion_body(0, max_tokens=1500), "ignore_eos": True, "prompt": "abort me"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: {"))[6:])
        assert httpx.post(f"{server.url}/abort/{first['id']}").status_code == 200
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "abort"
    assert wait_until_idle(server)["engine"]["pages_held"] == 0


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_metrics_move(server):
    before = httpx.get(f"{server.url}/metrics").text
    body = {"model": "keel-demo", "prompt": "metrics", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "keel_generation_tokens_total") - metric(before, "keel_generation_tokens_total") == 5
    assert metric(after, "keel_prompt_tokens_total") > metric(before, "keel_prompt_tokens_total")
    for histogram in ("keel_time_to_first_token_seconds", "keel_inter_token_latency_seconds",
                      "keel_e2e_request_latency_seconds"):
        assert metric(after, f"{histogram}_count") > metric(before, f"{histogram}_count")
    assert metric(after, 'keel_requests_finished_total{finish_reason="length"}') >= 1
    assert metric(after, "keel_kv_pages_total") > 0
    for gauge in ("keel_requests_running", "keel_requests_waiting", "keel_kv_pages_used", "keel_kv_pages_cached",
                  "keel_prefix_cache_hit_tokens_total"):
        metric(after, gauge)


def test_bench_serve_reports_its_figures(server, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "keel.cli", "bench", "serve", "--url", server.url, "--num-prompts", "12",
         "--request-rate", "20", "--max-concurrency", "6", "--input-len", "4", "16", "--output-len", "4", "12",
         "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for label in ("request throughput", "output throughput", "TTFT", "ITL", "end-to-end latency"):
        assert label in result.stdout
    summary = json.loads(out.read_text())
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert "p90" in result.stdout and 0 < summary["ttft_s"]["median"] <= summary["e2e_latency_s"]["median"]
    assert summary["itl_s"]["median"] > 0
    assert 12 * 4 <= summary["total_output_tokens"] <= 12 * 12
    assert summary["ttft_s"]["median"] > 0 and summary["output_throughput"] > 0


def test_bench_serve_sweeps_rates_over_a_dataset_and_plots(server, tmp_path):
    import subprocess
    import sys

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "The scheduler", "output_len": 6}\n{"prompt": "A cache"}\n')
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "keel.cli", "bench", "serve", "--url", server.url, "--num-prompts", "6",
         "--request-rates", "10", "inf", "--dataset", str(dataset), "--output-len", "4", "8",
         "--output-json", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rates = json.loads(out.read_text())["rates"]
    assert [r["config"]["request_rate"] for r in rates] == [10.0, "inf"]
    assert all(r["completed"] == 6 and r["failed"] == 0 and r["total_input_tokens"] > 6 for r in rates)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = subprocess.run([sys.executable, "-m", "keel.cli", "bench", "serve", "--url", server.url, "--plot",
                              str(png)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--request-rates" in refused.stderr and "Traceback" not in refused.stderr
