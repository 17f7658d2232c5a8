"""SIGTERM with a request in flight: it finishes or ends with an error, and nothing is left running."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.server.conftest import start_server, stop_server


def test_sigterm_with_a_request_in_flight(tmp_path, keel_cache_dir):
    server = start_server(tmp_path / "serve.log", "--shutdown-timeout", "2")
    outcome: dict = {}

    def long_stream() -> None:
        body = {"model": "keel-demo", "prompt": "long", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
                outcome["lines"] = [line for line in response.iter_lines() if line]
        except httpx.HTTPError as e:
            outcome["error"] = e

    thread = threading.Thread(target=long_stream)
    thread.start()
    while server.info()["pending_requests"] == 0:  # the request is in the engine
        time.sleep(0.05)
    started = time.monotonic()
    stop_server(server)  # asserts a clean exit and no engine process left
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert time.monotonic() - started < 30
    lines = outcome["lines"]  # no torn connection: the stream was ended properly
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    finished = events[-1].get("choices") and events[-1]["choices"][0]["finish_reason"] == "length"
    assert finished or "shutting down" in events[-1]["error"]["message"], events[-1]


def test_a_second_interrupt_ends_requests_with_an_error_body(tmp_path, keel_cache_dir):
    """Ctrl-C twice: the first starts a graceful shutdown (long grace), the second ends the requests still
    running at once; each client gets OpenAI's error shape (JSON, or an error event and [DONE]), and the log
    has no traceback of cancelled tasks."""
    import signal

    server = start_server(tmp_path / "serve.log", "--shutdown-timeout", "120")
    body = {"model": "keel-demo", "prompt": "long", "max_tokens": 1900, "ignore_eos": True}
    outcome: dict = {}

    def plain() -> None:
        outcome["plain"] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)

    def streamed() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            outcome["lines"] = [line for line in r.iter_lines() if line]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for thread in threads:
        thread.start()
    while server.info()["pending_requests"] < 2:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGINT)
    for thread in threads:
        thread.join(timeout=30)
    assert server.process.wait(timeout=30) is not None
    plain_response = outcome["plain"]
    assert plain_response.status_code >= 500 and "shutting down" in plain_response.json()["error"]["message"]
    assert outcome["lines"][-1] == "data: [DONE]" and "shutting down" in outcome["lines"][-2]
    log = server.log.read_text()
    assert "CancelledError" not in log and "Traceback" not in log, log
