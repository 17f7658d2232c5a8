"""The server's listening socket (keel/server/listen.py)."""

from __future__ import annotations

import asyncio
import socket

from keel.config import ServerConfig
from keel.server.listen import bind
from tests.server.conftest import free_port


def test_connections_have_nagle_off():
    """A connection accepted on the bound socket sends small writes at once. With Nagle's algorithm on, a response's
    second write waited for the client's delayed ACK: 40 ms on every keep-alive request (seen as a 44 ms TTFT for a
    5 ms request)."""
    sock = bind(ServerConfig(host="127.0.0.1", port=free_port()))
    port = sock.getsockname()[1]

    async def go() -> int:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        def connected(reader, writer):
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        nodelay = await asyncio.wait_for(accepted, 10)
        writer.close()
        server.close()
        return nodelay

    assert asyncio.run(go()) != 0
