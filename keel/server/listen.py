"""The server's listening socket, bound by `keel serve` before anything slow happens (no web stack, no torch)."""

from __future__ import annotations

import socket

from keel.config import ServerConfig


def bind(server_config: ServerConfig) -> socket.socket:
    """The server's socket, bound now (before the model loads): a busy port or a bad host fails at once, in one
    line. uvicorn listens on it once the engine is ready."""
    host, port = server_config.host, server_config.port
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0][:3]
        # proto named (not 0): asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and with it
        # on, a response's second write waited for the client's delayed ACK: 40 ms on every keep-alive request
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
