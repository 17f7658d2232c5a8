"""keel router against a scripted decode server (aiohttp, in this process): however a client leaves, the router
drops its connection to the decode server (which aborts the request there and on the prefill server) and lets go
of both servers' in-flight counts exactly once. The whole deployment with real servers is tests/disagg/test_servers.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from aiohttp import web

from keel.config import RouterConfig
from keel.disagg.router import create_router_app
from tests.server.conftest import free_port

WAIT_S = 10.0


@dataclass
class FakeDecodeServer:
    """Answers /v1/completions as told by the body: {"hold": true} sends nothing until the router drops the
    connection; {"chunks": n} streams n chunks, 0.2 s apart. Records what it saw."""

    url: str = ""
    arrived: threading.Event = field(default_factory=threading.Event)
    dropped: threading.Event = field(default_factory=threading.Event)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived.set()
        if body.get("hold"):
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                if request.transport is None or request.transport.is_closing():
                    self.dropped.set()
                    break
                await asyncio.sleep(0.02)
            return web.json_response({"late": True})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(body["chunks"]):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.2)
        except (ConnectionError, RuntimeError):  # the router dropped the stream
            self.dropped.set()
            return response
        if request.transport is None or request.transport.is_closing():
            self.dropped.set()
        await response.write_eof()
        return response


@pytest.fixture
def deployment() -> Iterator[tuple[str, FakeDecodeServer]]:
    """(router URL, the fake decode server it routes to); the prefill URL is only named in a header."""
    fake = FakeDecodeServer()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", fake.completions)
    runner = web.AppRunner(app)
    port = free_port()
    fake.url = f"http://127.0.0.1:{port}"
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    upstream = threading.Thread(target=loop.run_forever, daemon=True)
    upstream.start()
    config = RouterConfig(prefill=["http://127.0.0.1:9"], decode=[fake.url], port=free_port())
    server = uvicorn.Server(uvicorn.Config(create_router_app(config), host="127.0.0.1", port=config.port,
                                           log_level="warning"))
    router = threading.Thread(target=server.run, daemon=True)
    router.start()
    url = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + WAIT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield url, fake
    finally:
        server.should_exit = True
        router.join(WAIT_S)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        upstream.join(WAIT_S)


def send_and_hang_up(url: str, body: dict, fake: FakeDecodeServer, read_bytes: int = 0) -> None:
    """POST `body` to the router's /v1/completions, wait until the decode server has it, read `read_bytes` of the
    answer, and close the socket."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        assert fake.arrived.wait(WAIT_S), "the request never reached the decode server"
        got = b""
        while len(got) < read_bytes:
            got += s.recv(read_bytes - len(got))


def in_flight(url: str) -> list[int]:
    info = httpx.get(url + "/server_info").json()
    return [s["in_flight"] for role in ("prefill", "decode") for s in info[role]]


def wait_for(what: str, check) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {WAIT_S} s")


def test_a_client_leaving_before_the_answer_starts_drops_the_request_upstream(deployment):
    """A non-streamed answer comes whole, so a client may give up long before its first byte: the router must
    not keep waiting for it (the decode server would compute all of it) nor keep counting it in flight."""
    url, fake = deployment
    send_and_hang_up(url, {"hold": True}, fake)
    assert fake.dropped.wait(WAIT_S), "the router kept its connection to the decode server open"
    wait_for("in-flight counts back to 0", lambda: in_flight(url) == [0, 0])


def test_a_client_leaving_mid_stream_drops_the_stream_upstream(deployment):
    url, fake = deployment
    send_and_hang_up(url, {"chunks": 50}, fake, read_bytes=1)
    assert fake.dropped.wait(WAIT_S), "the router kept relaying a stream nobody reads"
    wait_for("in-flight counts back to 0", lambda: in_flight(url) == [0, 0])


def test_answers_that_finish_let_go_of_their_counts(deployment):
    url, _ = deployment
    with httpx.stream("POST", url + "/v1/completions", json={"chunks": 3}) as response:
        assert response.status_code == 200
        assert b"".join(response.iter_bytes()) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    wait_for("in-flight counts back to 0", lambda: in_flight(url) == [0, 0])
