"""`keel serve`: the API process (this one) and the engine process it starts."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import types
from typing import Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from keel.config import ServerConfig
from keel.models.tokenizer import load_tokenizer
from keel.models.source import ModelSource
from keel.server.app import create_app
from keel.server.disagg import RemotePrefill
from keel.server.engine_client import EngineClient, EngineError
from keel.server.metrics import ServerMetrics
from keel.server.openai_api import ServerContext
from keel.server.tokenization import Tokenization

logger = logging.getLogger(__name__)


class EngineLost(SystemExit):
    """The engine process died or failed: the server has stopped, and exits non-zero for a supervisor."""


def serve(source: ModelSource, client: EngineClient, server_config: ServerConfig, sock: socket.socket) -> None:
    """Serve `source` with `client`'s engine (already spawned) on `sock` (bound) until Ctrl-C or SIGTERM: requests
    in flight then finish (or are cut off with an error after --shutdown-timeout), the engine process stops, and
    nothing is left running. If the engine fails to start this raises EngineError; if it is lost later, every
    pending request fails at once, the server stops and this raises EngineLost (exit status 1)."""
    logging.getLogger("keel").setLevel(logging.INFO)
    tokenizer = load_tokenizer(source)
    remote = RemotePrefill(client) if client.config.disaggregation_mode == "decode" else None
    ctx = ServerContext(client, tokenizer, Tokenization(tokenizer), ServerMetrics(),
                        server_config.served_model_name or client.config.model, server_config, remote)
    http = functools.partial(HeaderTimeoutProtocol, header_timeout_s=server_config.timeout_header_read)
    config = uvicorn.Config(create_app(ctx), log_level="info", http=http,
                            timeout_keep_alive=server_config.timeout_keep_alive,
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout) + 5)
    server = _Server(config, ctx, f"http://{server_config.host}:{server_config.port}")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C once its graceful shutdown is done: nothing is left to do
    if server.start_error is not None:
        raise server.start_error
    if server.engine_lost:
        raise EngineLost(1)


class _Server(uvicorn.Server):
    """uvicorn, plus: once a shutdown signal arrives, requests still running after the grace period are ended
    with an error by keel itself (before uvicorn would cut their connections); and when the engine is lost,
    the server stops on its own."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext, url: str) -> None:
        super().__init__(config)
        self.ctx, self.url = ctx, url
        self.client = ctx.client
        self.grace_s = ctx.config.shutdown_timeout
        self.engine_lost = False
        self.exit_signals = 0
        self.start_error: Optional[EngineError] = None
        self.client.on_fatal = self._engine_lost

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        """Wait for the engine (the model loads) before uvicorn starts the app and listens."""
        try:
            await self.client.start()
        except EngineError as e:
            self.start_error = e
            self.client.close()
            return
        await super().serve(sockets)

    async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:  # listening now
            logger.info("keel is serving %s at %s", self.ctx.model_name, self.url)

    def handle_exit(self, sig: int, frame: Optional[types.FrameType]) -> None:
        """First signal: a graceful shutdown (requests get --shutdown-timeout to finish). Second: every request
        still running ends now, with an error its client can read, and the shutdown goes on. Third: uvicorn's
        forced exit."""
        self.exit_signals += 1
        if self.exit_signals == 1:
            self.client.fail_pending_after(self.grace_s, "the server is shutting down")
        elif self.exit_signals == 2:
            logger.info("second interrupt: ending the requests still running")
            self.client.fail_pending_after(0.0, "the server is shutting down now")
            return  # not uvicorn's forced exit, which would cancel the requests' tasks mid-response
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
