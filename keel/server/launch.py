"""`keel serve`: the API process (this one) and the engine process it starts."""

from __future__ import annotations

import asyncio
import functools
import logging
import types
from typing import Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from keel.config import ServerConfig
from keel.models.tokenizer import load_tokenizer
from keel.models.source import ModelSource
from keel.server.app import create_app
from keel.server.engine_client import EngineClient
from keel.server.metrics import ServerMetrics
from keel.server.openai_api import ServerContext
from keel.server.tokenization import Tokenization


class EngineLost(SystemExit):
    """The engine process died or failed: the server has stopped, and exits non-zero for a supervisor."""


def serve(source: ModelSource, client: EngineClient, server_config: ServerConfig) -> None:
    """Serve `source` with `client`'s engine (already spawned) until Ctrl-C or SIGTERM: requests in flight then
    finish (or are cut off with an error after --shutdown-timeout), the engine process stops, and nothing is left
    running. If the engine is lost, every
    pending request fails at once, the server stops and this raises EngineLost (exit status 1)."""
    logging.getLogger("keel").setLevel(logging.INFO)
    url = f"http://{server_config.host}:{server_config.port}"
    tokenizer = load_tokenizer(source)
    ctx = ServerContext(client, tokenizer, Tokenization(tokenizer), ServerMetrics(),
                        server_config.served_model_name or client.config.model, server_config)
    app = create_app(ctx, url)
    http = functools.partial(HeaderTimeoutProtocol, header_timeout_s=server_config.timeout_header_read)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="info", http=http,
                            timeout_keep_alive=server_config.timeout_keep_alive,
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout) + 5)
    server = _Server(config, ctx.client, server_config.shutdown_timeout)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C once its graceful shutdown is done: nothing is left to do
    if server.engine_lost:
        raise EngineLost(1)


class _Server(uvicorn.Server):
    """uvicorn, plus: once a shutdown signal arrives, requests still running after the grace period are ended
    with an error by keel itself (before uvicorn would cut their connections); and when the engine is lost,
    the server stops on its own."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, grace_s: float) -> None:
        super().__init__(config)
        self.client = client
        self.grace_s = grace_s
        self.engine_lost = False
        client.on_fatal = self._engine_lost

    def handle_exit(self, sig: int, frame: Optional[types.FrameType]) -> None:
        if not self.should_exit:
            self.client.fail_pending_after(self.grace_s, "the server is shutting down")
        super().handle_exit(sig, frame)

    def _engine_lost(self, error: str) -> None:
        self.engine_lost = True
        self.should_exit = True


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a deadline for each request's headers: a connection that opens (or
    finishes a response) and then sends no complete request head within `header_timeout_s` is closed, so
    half-open connections cannot pile up. uvicorn itself only times out idle keep-alive connections."""

    def __init__(self, *args: object, header_timeout_s: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_headers()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_overdue, self.cycle)

    def _headers_overdue(self, cycle_before: object) -> None:
        if self.cycle is cycle_before and not self.transport.is_closing():  # no new request head arrived
            self.transport.close()
