"""The two server roles of prefill/decode disaggregation (`keel serve --disaggregation-mode`), around keel/disagg.

A request reaches a decode server from `keel router`, which names the prefill server to use in the
X-Keel-Prefill-Url header. The decode server tokenizes it as usual and holds its KV pages (Preallocate: requests
wait, in arrival order, until they fit), then orders the prefill server to compute the prompt's KV straight into
those pages (POST /disagg/prefill; once per prefill server before that, the bootstrap exchange: POST
/disagg/connect with the decode server's transfer agent). The prefill server answers when its request has ended:
"done" (the KV and the first token are on their way: NIXL's notification brings them to the decode engine), or
"aborted" / "failed", after which nothing more is written into those pages, so the decode server frees them at
once (SenderDone). A client that goes away aborts the request on the decode server, which aborts it on the prefill
server (POST /disagg/abort); a prefill server that cannot be reached, or dies, ends the request with an error.

The decode server trusts the header: decode and prefill servers belong on a private network behind the router.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Literal, Optional

import aiohttp
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response

from keel.disagg.kv_transfer import KVDestination, PeerInfo
from keel.engine.outputs import CoreOutput
from keel.sampling_params import SamplingParams
from keel.server.engine_client import EngineClient, Preallocation
from keel.server.errors import APIError
from keel.server.messages import EngineStats

logger = logging.getLogger(__name__)

PREFILL_HEADER = "X-Keel-Prefill-Url"
DISCONNECT_CHECK_S = 0.5  # how often a prefill server checks that the decode server still waits for an answer


class PrefillOrder(msgspec.Struct, frozen=True):
    """What a decode server asks of a prefill server: this prompt's KV, into these pages."""

    prompt_ids: list[int]
    params: SamplingParams
    destination: KVDestination


class PrefillResult(msgspec.Struct, frozen=True):
    status: Literal["done", "aborted", "failed"]  # anything but done: nothing more is written for it
    error: Optional[str] = None


class AbortOrder(msgspec.Struct, frozen=True):
    peer: str  # the decode server's transfer agent
    rid: int  # the request's id there


def prefill_url(client: EngineClient, request: Request) -> Optional[str]:
    """The prefill server a decode server's request goes to (None on other servers)."""
    if client.config.disaggregation_mode != "decode":
        return None
    url = request.headers.get(PREFILL_HEADER)
    if not url:
        raise APIError(400, f"this is a decode server: send requests through `keel router` (the {PREFILL_HEADER} "
                            "header names the prefill server)")
    return url.rstrip("/")


def disaggregation_info(mode: Optional[str], peer: Optional[PeerInfo], stats: Optional[EngineStats]) -> Optional[dict]:
    """/server_info's view of a disaggregated server: its role, transfer agent, and the mean transfer."""
    if mode is None:
        return None
    done = stats.transfers_done if stats is not None else 0
    return {"mode": mode, "transfer_agent": peer.name if peer is not None else None,
            "mean_transfer_bytes": stats.transfer_bytes / done if stats and done else None,
            "mean_transfer_ms": 1e3 * stats.transfer_seconds / done if stats and done else None}


# ---- decode server ------------------------------------------------------------------------------------


class RemotePrefill:
    """A decode server's requests, their prompts computed by prefill servers."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._session: Optional[aiohttp.ClientSession] = None
        self._connected: dict[str, asyncio.Task] = {}  # prefill server URL -> its bootstrap exchange
        self._tasks: set[asyncio.Task] = set()

    def submit(self, rid: int, prompt_ids: list[int], params: SamplingParams, request_id: str,
               url: str) -> asyncio.Queue[CoreOutput]:
        """Like EngineClient.submit, with the prompt prefilled on `url`."""
        queue, preallocation = self.client.preallocate(rid, prompt_ids, params, request_id)
        task = asyncio.create_task(self._prefill(rid, prompt_ids, params, url, preallocation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return queue

    async def _prefill(self, rid: int, prompt_ids: list[int], params: SamplingParams, url: str,
                       preallocation: Preallocation) -> None:
        try:
            destination = await preallocation.destination
        except asyncio.CancelledError:  # it ended before its pages were held: any it holds now, nobody writes
            self.client.sender_done(rid)
            return
        try:
            result = await self._order(url, PrefillOrder(prompt_ids, params, destination), preallocation)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            result = PrefillResult("failed", f"the prefill server {url} failed: {type(e).__name__}: {e}")
        if result.status != "done":
            if not preallocation.ended.is_set():
                self.client.abort(rid, error=result.error or "the prefill server aborted the request")
            self.client.sender_done(rid)

    async def _order(self, url: str, order: PrefillOrder, preallocation: Preallocation) -> PrefillResult:
        """Have `url` prefill the order; if the request ends here first, abort it there (its answer still comes:
        it says whether anything more is written)."""
        held_at = asyncio.get_running_loop().time()
        await self._connect(url)
        # the deadline counts from the preallocation: the bootstrap exchange's time comes off it
        waited = asyncio.get_running_loop().time() - held_at
        destination = order.destination
        if destination.send_within_s:
            order = PrefillOrder(order.prompt_ids, order.params, dataclasses.replace(
                destination, send_within_s=max(destination.send_within_s - waited, 1e-3)))
        answer = asyncio.ensure_future(self._post(url, "/disagg/prefill", order))
        ended = asyncio.ensure_future(preallocation.ended.wait())
        try:
            await asyncio.wait({answer, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                await self._post(url, "/disagg/abort", AbortOrder(order.destination.peer, order.destination.rid))
            status, body = await answer
        finally:
            ended.cancel()
        if status == 409:  # it does not know us (it restarted): the bootstrap exchange again
            self._connected.pop(url, None)
            return PrefillResult("failed", f"the prefill server {url} lost the connection to this server")
        if status != 200:
            return PrefillResult("failed", f"the prefill server {url} refused the request ({status}): "
                                           f"{body.decode(errors='replace')[:500]}")
        return msgspec.json.decode(body, type=PrefillResult)

    async def _connect(self, url: str) -> None:
        """The bootstrap exchange with `url`, once (again after it failed)."""
        task = self._connected.get(url)
        if task is None:
            assert self.client.peer is not None, "a decode server's engine has a transfer agent"
            task = self._connected[url] = asyncio.ensure_future(self._post(url, "/disagg/connect", self.client.peer))
        try:
            status, body = await asyncio.shield(task)
        except BaseException:
            self._connected.pop(url, None)
            raise
        if status != 200:
            self._connected.pop(url, None)
            raise aiohttp.ClientError(f"the bootstrap exchange failed ({status}): {body.decode(errors='replace')}")

    async def _post(self, url: str, path: str, message: msgspec.Struct | PeerInfo) -> tuple[int, bytes]:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.client.config.disaggregation_transfer_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        async with self._session.post(url + path, data=msgspec.json.encode(message),
                                      headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


# ---- prefill server -----------------------------------------------------------------------------------


def add_prefill_routes(app: FastAPI, client: EngineClient, read_body: Callable[[Request], Awaitable[bytes]]) -> None:
    """The routes decode servers call on a prefill server."""
    known_peers: set[str] = set()  # decode servers' agents this engine has connected to

    @app.post("/disagg/connect")
    async def connect(request: Request) -> dict:
        peer = _decode(await read_body(request), PeerInfo)
        error = await client.connect_peer(peer)
        if error is not None:
            raise APIError(400, f"cannot take KV destinations of {peer.name!r}: {error}")
        known_peers.update(agent.name for agent in peer.agents)  # (any of them may name a destination)
        return {"connected": peer.name}

    @app.post("/disagg/prefill")
    async def prefill(request: Request) -> Response:
        order = _decode(await read_body(request), PrefillOrder)
        if order.destination.peer not in known_peers:
            raise APIError(409, f"unknown decode server {order.destination.peer!r}: POST /disagg/connect first")
        rid = client.next_rid()
        queue = client.submit(rid, order.prompt_ids, order.params, _order_id(order.destination.peer,
                                                                             order.destination.rid),
                              kv_destination=order.destination)
        result = await _wait_for_end(client, rid, queue, request)
        return Response(msgspec.json.encode(result), media_type="application/json")

    @app.post("/disagg/abort")
    async def abort(request: Request) -> dict:
        order = _decode(await read_body(request), AbortOrder)
        return {"aborted": client.abort_request(_order_id(order.peer, order.rid))}


async def _wait_for_end(client: EngineClient, rid: int, queue: asyncio.Queue[CoreOutput],
                        request: Request) -> PrefillResult:
    """How the request ended; if the decode server stops waiting, the request is aborted (its end still comes)."""
    while True:
        try:
            out = await asyncio.wait_for(queue.get(), DISCONNECT_CHECK_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                client.abort(rid)
            continue
        if out.finish_reason is None:
            continue
        if out.finish_reason != "abort":
            return PrefillResult("done")
        return PrefillResult("failed" if out.error else "aborted", out.error)


def _order_id(peer: str, rid: int) -> str:
    return f"disagg-{peer}-{rid}"


def _decode(body: bytes, kind: type):
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, ValueError, TypeError) as e:
        raise APIError(400, f"malformed {kind.__name__}: {e}") from e
