"""A real `keel serve` on keel-demo, started once per test module, and stopped (and checked) at its end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest



@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    headers: dict[str, str] = field(default_factory=dict)  # the API key, when the server requires one

    def children(self) -> list[int]:
        """Processes whose parent is the server (the engine process)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                found.append(int(stat.parent.name))
        return found

    def info(self) -> dict:
        return httpx.get(f"{self.url}/server_info", headers=self.headers).json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """`keel serve keel-demo` with `args`, healthy; `env`: more environment variables for it."""
    port = free_port()
    env = {**os.environ, "KEEL_STRICT_CHECKS": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "keel.cli", "serve", "--model", "keel-demo", "--port", str(port),
         "--kv-cache-tokens", "4096", "--page-size", "4", *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    if "--api-key" in args:
        server.headers["Authorization"] = f"Bearer {args[args.index('--api-key') + 1]}"
    return wait_healthy(server, "keel serve", 180)


def wait_healthy(server: Server, what: str, timeout_s: float) -> Server:
    """`server` once its /health answers 200; killed, with its log in the error, if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.process.kill()
    raise RuntimeError(f"{what} did not become healthy:\n{server.log.read_text()}")


def stop_server(server: Server) -> None:
    """SIGTERM, as a service manager would: the server must exit cleanly and leave nothing running."""
    children = server.children()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=60)
    log = server.log.read_text()
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status reports SIGTERM
    assert code in (0, -signal.SIGTERM), f"keel serve exited with {code}:\n{log}"
    assert "Application shutdown complete" in log, log
    # the engine process, and Python's resource tracker (which exits once it sees the server gone)
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes {alive} of the server still running after shutdown"
    assert "Traceback" not in log, log


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory, keel_cache_dir) -> Server:
    running = start_server(tmp_path_factory.mktemp("server") / "serve.log")
    yield running
    stop_server(running)
