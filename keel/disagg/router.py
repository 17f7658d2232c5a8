"""`keel router`: the OpenAI-compatible front of a disaggregated deployment.

Each generation request goes to the least-loaded decode server (fewest requests this router has in flight there),
with the least-loaded prefill server named in a header: the decode server tokenizes it, holds its KV, has the
prefill server compute the prompt into those pages (keel/server/disagg.py) and streams the answer, which the router
passes through unchanged. A client that disconnects closes the router's connection to the decode server, which
aborts the request there and on the prefill server: while the answer streams, and before its first byte (a
non-streamed answer comes whole, so a client may give up long before it). A server that cannot be reached gets the
request an OpenAI error (502) instead of a torn connection. Each request's hold on its two servers' counts and on
the upstream connection is let go exactly once, however it ends (`Relay.close`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Optional

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from keel.config import RouterConfig
from keel.server.app import read_body
from keel.server.disagg import PREFILL_HEADER
from keel.server.errors import APIError, api_error_handler

logger = logging.getLogger(__name__)

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")
HEALTH_TIMEOUT_S = 2.0
# hop-by-hop and framing headers the router sets itself
_DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}


@dataclass
class Upstream:
    url: str
    in_flight: int = 0
    routed: int = 0


@dataclass
class Relay:
    """One routed request's hold on its prefill and decode servers' counts and on the decode server's answer."""

    prefill: Upstream
    decode: Upstream
    upstream: Optional[aiohttp.ClientResponse] = None
    closed: bool = False

    def __post_init__(self) -> None:
        for server in (self.prefill, self.decode):
            server.in_flight += 1
            server.routed += 1

    def close(self) -> None:
        """Let go (once, whatever called it first): closing an unfinished answer drops the connection, which aborts
        the request on the decode server and, through it, on the prefill server."""
        if self.closed:
            return
        self.closed = True
        if self.upstream is not None:
            self.upstream.close()
        for server in (self.prefill, self.decode):
            server.in_flight -= 1


class RelayResponse(StreamingResponse):
    """The decode server's answer, streamed; its relay is closed when the response ends, however it ends (a client
    that left before the first chunk means the body iterator never starts, so its own `finally` cannot do it)."""

    def __init__(self, relay: Relay) -> None:
        assert relay.upstream is not None
        self.relay = relay
        headers = {k: v for k, v in relay.upstream.headers.items() if k.lower() not in _DROPPED_HEADERS}
        super().__init__(self._chunks(), status_code=relay.upstream.status, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self.relay.upstream is not None
        try:
            async for chunk in self.relay.upstream.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the decode server died mid-answer
            logger.warning("the decode server %s broke off an answer: %s", self.relay.decode.url, e)

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]  # (Starlette's)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.close()


@dataclass
class Router:
    config: RouterConfig
    prefill: list[Upstream] = field(init=False)
    decode: list[Upstream] = field(init=False)
    session: Optional[aiohttp.ClientSession] = None

    def __post_init__(self) -> None:
        self.prefill = [Upstream(url.rstrip("/")) for url in self.config.prefill]
        self.decode = [Upstream(url.rstrip("/")) for url in self.config.decode]

    @staticmethod
    def least_loaded(servers: list[Upstream]) -> Upstream:
        return min(servers, key=lambda s: (s.in_flight, s.routed))

    async def forward(self, request: Request) -> Response:
        """Send a generation request to a decode server (naming a prefill server) and relay its answer."""
        assert self.session is not None
        prefill, decode = self.least_loaded(self.prefill), self.least_loaded(self.decode)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS}
        headers[PREFILL_HEADER] = prefill.url
        body = await read_body(request, int(self.config.max_request_body_mb * 2**20))
        relay = Relay(prefill, decode)
        try:
            relay.upstream = await self._first_answer(request, decode.url + request.url.path, body, headers)
        except BaseException:
            relay.close()
            raise
        if relay.upstream is None:  # the client left first: nobody to answer
            relay.close()
            return Response(status_code=499)
        return RelayResponse(relay)

    async def _first_answer(self, request: Request, url: str, body: bytes,
                            headers: dict[str, str]) -> Optional[aiohttp.ClientResponse]:
        """The decode server's response (status and headers), or None if the client disconnects before it comes
        (the request is then cancelled, and its connection dropped)."""
        assert self.session is not None
        post = asyncio.ensure_future(self.session.post(url, data=body, headers=headers))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((post, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not post.done():  # the client left first (or this coroutine was cancelled)
                post.cancel()
                await asyncio.gather(post, return_exceptions=True)  # the connection is dropped once this returns
        if post.cancelled():
            return None
        try:
            return post.result()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise APIError(502, f"the decode server {url} cannot be reached: {type(e).__name__}",
                           type="bad_gateway") from e

    async def health(self) -> dict[str, bool]:
        assert self.session is not None

        async def ok(url: str) -> bool:
            try:
                async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(HEALTH_TIMEOUT_S)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        servers = self.prefill + self.decode
        return dict(zip((s.url for s in servers), await asyncio.gather(*(ok(s.url) for s in servers))))


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected (its body has been read: nothing else comes before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_router_app(config: RouterConfig) -> FastAPI:
    router = Router(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        router.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.request_timeout))
        try:
            yield
        finally:
            await router.session.close()

    app = FastAPI(title="keel router", lifespan=lifespan, redirect_slashes=False)
    app.add_exception_handler(APIError, api_error_handler)
    for path in GENERATION_ROUTES:
        app.add_api_route(path, router.forward, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        assert router.session is not None
        try:
            async with router.session.get(router.decode[0].url + "/v1/models") as upstream:
                return Response(await upstream.read(), status_code=upstream.status, media_type="application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise APIError(502, f"the decode server {router.decode[0].url} cannot be reached", type="bad_gateway") \
                from e

    @app.get("/health")
    async def health() -> Response:
        servers = await router.health()
        return JSONResponse({"status": "ok" if all(servers.values()) else "degraded", "servers": servers},
                            status_code=200 if all(servers.values()) else 503)

    @app.get("/server_info")
    async def server_info() -> dict:
        return {role: [{"url": s.url, "in_flight": s.in_flight, "routed": s.routed} for s in servers]
                for role, servers in (("prefill", router.prefill), ("decode", router.decode))}

    return app


def serve_router(config: RouterConfig) -> None:
    import uvicorn

    uvicorn.run(create_router_app(config), host=config.host, port=config.port, log_level="info")
