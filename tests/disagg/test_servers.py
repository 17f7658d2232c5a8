"""Disaggregated serving end to end: `keel router` in front of a prefill and a decode `keel serve` (keel-demo,
float32 on CPU, KV moved by NIXL over UCX), against one plain server given the same requests. Both disaggregated
servers run the invariant checker after every step (KEEL_STRICT_CHECKS); after each test every page is free on
both (nothing held by requests, nothing waiting or in transfer)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keel.server.disagg import PREFILL_HEADER
from tests.server.conftest import Server, free_port, start_server, stop_server, wait_healthy

pytest.importorskip("nixl_cu13")

PROMPTS = ["The capital of France is", "Once upon a time", "keel is a fast engine and", "1 2 3 4 5 6 7 8",
           "the the the the the the the the the the the the the the the the the the the"]


@dataclass
class Deployment:
    router: Server
    prefill: Server
    decode: Server


def start_router(log: Path, prefill: list[str], decode: list[str]) -> Server:
    port = free_port()
    args = [a for url in prefill for a in ("--prefill", url)] + [a for url in decode for a in ("--decode", url)]
    process = subprocess.Popen([sys.executable, "-m", "keel.cli", "router", "--port", str(port), *args],
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    return wait_healthy(Server(f"http://127.0.0.1:{port}", process, log), "keel router", 60)


@contextmanager
def deployment(folder: Path, decode: Server | None = None, prefill_env: dict[str, str] | None = None,
               server_args: tuple[str, ...] = ()) -> Iterator[Deployment]:
    """A prefill server and a router in front of it and `decode` (a decode server of their own when None); the
    servers started here are stopped at the end, and get `server_args`."""
    prefill = start_server(folder / "prefill.log", "--disaggregation-mode", "prefill", *server_args, env=prefill_env)
    own_decode = decode is None
    if own_decode:
        decode = start_server(folder / "decode.log", "--disaggregation-mode", "decode",
                              "--disaggregation-transfer-timeout", "60", *server_args)
    router = start_router(folder / "router.log", [prefill.url], [decode.url])
    try:
        yield Deployment(router, prefill, decode)
    finally:
        router.process.send_signal(signal.SIGTERM)
        router.process.wait(timeout=30)
        for server in (decode,) * own_decode + (prefill,):
            if server.process.poll() is None:
                stop_server(server)


@pytest.fixture(scope="module")
def single(tmp_path_factory, keel_cache_dir) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("single") / "serve.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def disagg(tmp_path_factory, keel_cache_dir) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("disagg")) as running:
        yield running


def assert_drained(*servers: Server, timeout_s: float = 30.0) -> None:
    """Every request over and every page free on each server (its engine's stats, refreshed twice a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines = [server.info()["engine"] for server in servers]
        busy = [e for e in engines if e["running"] or e["waiting"] or e["pages_held"] or e["transferring"]
                or e["waiting_preallocation"]]
        if not busy:
            return
        assert time.monotonic() < deadline, f"still busy: {busy}"
        time.sleep(0.2)


def complete(url: str, prompt: str, **fields) -> dict:
    body = {"model": "keel-demo", "prompt": prompt, "max_tokens": 12, "temperature": 0, **fields}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    return {"status": response.status_code, **response.json()}


def stream_text(url: str, body: dict, stop_after: int | None = None) -> tuple[str, list[dict]]:
    """A streamed completion's text and its error events; `stop_after` events, the client hangs up."""
    text, errors = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for count, line in enumerate(response.iter_lines()):
            if stop_after is not None and count >= stop_after:
                return text, errors
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
            else:
                text += event["choices"][0]["text"]
    return text, errors


def test_each_request_gets_what_one_server_gives_it(disagg, single):
    for i, prompt in enumerate(PROMPTS):
        fields = {} if i % 2 else {"temperature": 0.8, "seed": 100 + i, "max_tokens": 16}
        routed, alone = complete(disagg.router.url, prompt, **fields), complete(single.url, prompt, **fields)
        assert routed["status"] == 200, routed
        assert routed["choices"][0]["text"] == alone["choices"][0]["text"]
        assert routed["usage"] == alone["usage"]
    body = {"model": "keel-demo", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "stream": True}
    assert stream_text(disagg.router.url, body) == stream_text(single.url, body)
    chat = {"model": "keel-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    answers = [httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json() for url in
               (disagg.router.url, single.url)]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]
    info = disagg.decode.info()
    assert info["disaggregation"]["mode"] == "decode" and info["engine"]["transfers_done"] >= len(PROMPTS) + 2
    assert disagg.prefill.info()["disaggregation"]["mean_transfer_bytes"] > 0
    metrics = httpx.get(f"{disagg.prefill.url}/metrics").text
    assert 'keel_kv_transfers{result="done"}' in metrics
    assert_drained(disagg.prefill, disagg.decode)


def test_clients_hanging_up_at_any_point_free_every_page(disagg, single):
    """Concurrent streams whose clients leave after 0..k events (queued, prefilling, transferring, decoding), mixed
    with ones that run to the end: those still get their solo answer, and afterwards every page is free."""
    rng = random.Random(5)
    work = []
    for i in range(24):
        prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(1, 6)))
        body = {"model": "keel-demo", "prompt": prompt, "max_tokens": rng.randint(4, 40), "temperature": 0,
                "stream": True, "ignore_eos": True}
        work.append((body, rng.choice([None, 0, 1, 3, 8])))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda w: stream_text(disagg.router.url, *w), work))
    for (body, stop_after), (text, errors) in zip(work, results):
        if stop_after is None:
            assert not errors and text == stream_text(single.url, body)[0]
    assert_drained(disagg.prefill, disagg.decode)


def test_a_decode_server_takes_requests_only_through_the_router_and_bad_input_is_refused(disagg):
    response = httpx.post(f"{disagg.decode.url}/v1/completions", json={"model": "keel-demo", "prompt": "hi"})
    assert response.status_code == 400 and PREFILL_HEADER in response.json()["error"]["message"]
    headers = {PREFILL_HEADER: "http://127.0.0.1:9"}  # nothing listens there
    answer = httpx.post(f"{disagg.decode.url}/v1/completions", headers=headers, timeout=60,
                        json={"model": "keel-demo", "prompt": "hi", "max_tokens": 4})
    assert answer.status_code == 500 and "prefill server" in answer.json()["error"]["message"]
    huge = httpx.post(f"{disagg.router.url}/v1/completions", content=b"x" * (17 * 2**20), timeout=60)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    for path, body in (("/disagg/prefill", b"{}"), ("/disagg/connect", b"not json"), ("/disagg/abort", b"[]")):
        response = httpx.post(f"{disagg.prefill.url}{path}", content=body)
        assert response.status_code == 400, (path, response.text)
    assert_drained(disagg.prefill, disagg.decode)


def test_failed_transfers_end_their_requests_with_errors(tmp_path, disagg, single):
    """A second prefill server, failing every third transfer, in front of the shared decode server."""
    with deployment(tmp_path, disagg.decode, {"KEEL_DEBUG_FAIL_KV_TRANSFER_EVERY": "3"}) as failing:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: complete(failing.router.url, p), PROMPTS * 3))
        failed = [a for a in answers if a["status"] != 200]
        assert len(failed) == len(answers) // 3
        assert all("KV transfer" in a["error"]["message"] for a in failed)
        for prompt, answer in zip(PROMPTS * 3, answers):
            if answer["status"] == 200:
                assert answer["choices"][0]["text"] == complete(single.url, prompt)["choices"][0]["text"]
        assert_drained(failing.prefill, failing.decode)


def test_a_prefill_server_dying_mid_request_fails_its_requests_and_frees_the_decode_side(tmp_path, disagg):
    """A second prefill server in front of the shared decode server, killed mid-request; the decode server then
    still serves through the first."""
    with deployment(tmp_path, disagg.decode) as doomed:
        long_prompt = " ".join(PROMPTS * 12)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(complete, doomed.router.url, f"{i} {long_prompt}", max_tokens=64) for i in range(8)]
            time.sleep(0.5)
            for pid in doomed.prefill.children() + [doomed.prefill.process.pid]:
                os.kill(pid, signal.SIGKILL)
            answers = [future.result(timeout=120) for future in pending]
        assert any(a["status"] != 200 for a in answers)
        for answer in answers:
            assert answer["status"] == 200 or "prefill server" in answer["error"]["message"], answer
        assert_drained(doomed.decode)
    assert complete(disagg.router.url, PROMPTS[0])["status"] == 200


def test_two_tensor_parallel_ranks_a_side_pair_rank_by_rank(tmp_path, single):
    """A prefill and a decode server of two ranks each (gloo): rank r writes its KV heads into rank r. The
    prefill server's rank 1 fails every fourth write while rank 0's succeed: those requests end with the transfer's
    error once both ranks' writes have ended; the others get the plain single-rank server's answer; afterwards
    every page is free on both (every rank runs the invariant checker after every step)."""
    with deployment(tmp_path, None, {"KEEL_DEBUG_FAIL_KV_TRANSFER_EVERY": "4:1"}, ("--tp-size", "2")) as tp:
        work = [(prompt, {} if i % 2 else {"temperature": 0.8, "seed": 7 + i}) for i, prompt in enumerate(PROMPTS * 2)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda w: complete(tp.router.url, w[0], **w[1]), work))
        failed = [a for a in answers if a["status"] != 200]
        assert len(failed) == len(work) // 4
        assert all("KV transfer" in a["error"]["message"] for a in failed)
        for (prompt, fields), answer in zip(work, answers):
            if answer["status"] == 200:
                assert answer["choices"][0]["text"] == complete(single.url, prompt, **fields)["choices"][0]["text"]
        assert tp.decode.info()["engine"]["transfers_done"] == len(work) - len(failed)
        assert_drained(tp.prefill, tp.decode)


def test_data_parallel_attention_servers_send_each_request_to_the_rank_holding_it(tmp_path, single):
    """A prefill and a decode server of two data-parallel attention ranks each: each rank schedules its own
    requests with all KV heads, and a prefill rank writes to whichever decode rank preallocated the request."""
    dp = ("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
    with deployment(tmp_path, server_args=dp) as running:
        work = [(prompt, {} if i % 2 else {"temperature": 0.8, "seed": 3 + i}) for i, prompt in enumerate(PROMPTS * 2)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda w: complete(running.router.url, w[0], **w[1]), work))
        for (prompt, fields), answer in zip(work, answers):
            assert answer["status"] == 200, answer
            assert answer["choices"][0]["text"] == complete(single.url, prompt, **fields)["choices"][0]["text"]
        for server in (running.prefill, running.decode):  # its counts are rank 0's: rank 1 took the others
            assert 0 < server.info()["engine"]["transfers_done"] < len(work)
        assert_drained(running.prefill, running.decode)

