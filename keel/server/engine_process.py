"""The engine process: EngineCore behind ZMQ sockets.

It loads the model, reports EngineReady, then loops: take every pending message without
blocking while there is work (waiting up to STATS_INTERVAL_S when idle), run one step, send its
outputs with the engine's stats. A thread of its own sends a heartbeat every HEARTBEAT_S on a
separate channel, so the API process sees a stopped or dead engine within a second or two even
while one step runs long. A disaggregated server's engine also takes preallocations (decode: held in
arrival order until they fit), the bootstrap exchange (prefill) and the ends of transfers; while all it has
left is KV moving, it checks for arrivals every TRANSFER_POLL_S instead of spinning. A request that cannot be
prepared fails alone (EngineCore contains it);
an error the core cannot attribute ends the process after an EngineFailed message. It never
touches HTTP, ignores Ctrl-C (the API process orchestrates shutdown), and exits when the API
process is gone.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from keel.config import EngineConfig
from keel.engine.outputs import CoreOutput
from keel.server.messages import (AbortRequests, AddRequest, ConnectPeer, Decoder, EngineFailed, EngineOutputs,
                                  EngineReady, EngineStats, FromEngine, Heartbeat, PeerConnected, Preallocate,
                                  Preallocated, SenderDone, Shutdown, ipc_addresses, pack, to_engine_decoder)

if TYPE_CHECKING:  # the API process imports this module only to name the spawn target: keep it light
    from keel.engine.core import EngineCore

STATS_INTERVAL_S = 0.5
HEARTBEAT_S = 0.25
TRANSFER_POLL_S = 0.001

logger = logging.getLogger(__name__)


def run_engine_process(config: EngineConfig, ipc_dir: str, secret: bytes) -> None:
    """Serve the sockets in `ipc_dir`; `secret` is the first frame of every message, both ways (see
    EngineClient). If the API process dies (even by SIGKILL), this process removes the folder and exits."""
    parent = os.getppid()
    addresses = ipc_addresses(ipc_dir)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("keel").setLevel(logging.INFO)  # the start-up log: model, weights, KV pool, CUDA graphs
    context = zmq.Context()
    requests = context.socket(zmq.PULL)
    requests.connect(addresses["requests"])
    outputs = context.socket(zmq.PUSH)
    outputs.connect(addresses["outputs"])
    stop_heartbeat = threading.Event()
    heartbeat = threading.Thread(target=_heartbeat, args=(context, addresses["heartbeat"], secret, stop_heartbeat),
                                 daemon=True, name="keel-heartbeat")
    heartbeat.start()
    send = functools.partial(_send, outputs, secret)
    try:
        from keel.engine.core import EngineCore

        core = EngineCore(config)
        send(EngineReady(core.limits, core.kv_cache.page_size,
                         core.kv_peer_info() if core.disagg is not None else None))
        try:
            EngineLoop(core, requests, send, to_engine_decoder(secret)).run()
        finally:
            core.close()  # the other ranks, if any
    except Exception:
        send(EngineFailed(traceback.format_exc()))  # the API process reports it, in one line while starting
        sys.exit(1)
    finally:
        stop_heartbeat.set()
        heartbeat.join(2 * HEARTBEAT_S)  # before the context ends: a beat being sent then raised ContextTerminated
        outputs.close(linger=1000)
        requests.close(linger=0)
        context.term()
        if os.getppid() != parent:  # orphaned: nobody else is left to clean up
            shutil.rmtree(ipc_dir, ignore_errors=True)


def _send(socket: zmq.Socket, secret: bytes, message: FromEngine) -> None:
    socket.send_multipart(pack(secret, message))


def _heartbeat(context: zmq.Context, address: str, secret: bytes, stop: threading.Event) -> None:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, 4)  # nobody reading: drop beats rather than queue them
    socket.connect(address)
    beat = pack(secret, Heartbeat(os.getpid()))
    try:
        while not stop.wait(HEARTBEAT_S):
            try:
                socket.send_multipart(beat, zmq.NOBLOCK)
            except zmq.Again:
                pass
    finally:
        socket.close(linger=0)


class EngineLoop:
    def __init__(self, core: EngineCore, requests: zmq.Socket, send: Callable[[FromEngine], None],
                 decoder: Decoder) -> None:
        self.core = core
        self.requests = requests
        self.send = send
        self.decoder = decoder
        self.parent = os.getppid()
        self.preallocations: deque[Preallocate] = deque()  # decode server: waiting for room, in arrival order

    def run(self) -> None:
        last_sent = 0.0
        while True:
            if self.requests.poll(self._wait_ms()) and not self._handle_messages():
                return
            outputs = self._preallocate()
            outputs += self.core.step() if self.core.has_work else []
            if outputs or time.monotonic() - last_sent >= STATS_INTERVAL_S:
                self.send(EngineOutputs(outputs, self.stats()))
                last_sent = time.monotonic()
            if os.getppid() != self.parent:  # the API process died: nobody is left to serve
                return

    def _wait_ms(self) -> int:
        """How long to wait for messages: not at all while there is a step to run, a little while KV moves."""
        if self.core.waiting_on_transfers or self.preallocations:
            return int(TRANSFER_POLL_S * 1000) or 1
        return 0 if self.core.has_work else int(STATS_INTERVAL_S * 1000)

    def _handle_messages(self) -> bool:
        """Apply every pending message; False on Shutdown."""
        rejected = []
        while True:
            try:
                frames = self.requests.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            message = self.decoder.receive(frames)  # None (logged) if it is not ours
            if isinstance(message, AddRequest):
                error = self._add(message)
                if error is not None:
                    rejected.append(CoreOutput(message.rid, [], None, "abort", error=error))
            elif isinstance(message, Preallocate):
                self.preallocations.append(message)
            elif isinstance(message, AbortRequests):
                aborted = set(message.rids)
                self.preallocations = deque(p for p in self.preallocations if p.rid not in aborted)
                self.core.abort_many(message.rids, message.reason)
            elif isinstance(message, ConnectPeer):
                self.send(self._connect(message))
            elif isinstance(message, SenderDone) and self.core.disagg is not None:
                self.core.kv_sender_done(message.rids)
            elif isinstance(message, Shutdown):
                return False
        if rejected:
            self.send(EngineOutputs(rejected, self.stats()))
        return True

    def _add(self, message: AddRequest) -> str | None:
        """Queue a request; the error that rejects it alone, if any."""
        try:
            self.core.add_request(message.prompt_ids, message.params, rid=message.rid,
                                  kv_destination=message.kv_destination)
        except Exception as e:
            return _rejection(message.rid, e)
        return None

    def _preallocate(self) -> list[CoreOutput]:
        """Decode server: hold the KV of waiting preallocations, in arrival order, while they fit; the outputs of
        those that cannot be served."""
        rejected = []
        while self.preallocations:
            message = self.preallocations[0]
            try:
                destination = self.core.preallocate(message.prompt_ids, message.params, rid=message.rid)
            except Exception as e:
                rejected.append(CoreOutput(message.rid, [], None, "abort", error=_rejection(message.rid, e)))
                self.preallocations.popleft()
                continue
            if destination is None:
                break  # no room yet
            self.preallocations.popleft()
            self.send(Preallocated(message.rid, destination))
        return rejected

    def _connect(self, message: ConnectPeer) -> PeerConnected:
        if self.core.disagg is None or self.core.disagg.role != "prefill":
            return PeerConnected(message.peer.name, "this server is not a prefill server (--disaggregation-mode)")
        try:
            self.core.connect_kv_peer(message.peer)
        except Exception as e:  # another pool geometry, or NIXL cannot reach it
            return PeerConnected(message.peer.name, str(e))
        return PeerConnected(message.peer.name, None)

    def stats(self) -> EngineStats:
        scheduler, kv = self.core.scheduler, self.core.kv_cache
        radix = kv.radix
        cached = radix.total_pages if radix else 0
        return EngineStats(
            running=len(scheduler.running) + (scheduler.chunked is not None),
            waiting=len(scheduler.waiting),
            pages_total=kv.pages.capacity,
            pages_free=kv.pages.num_free,
            pages_cached=cached,
            pages_cached_locked=radix.locked_pages if radix else 0,
            pages_held=kv.pages.capacity - kv.pages.num_free - cached,
            **self._transfer_stats(),
        )

    def _transfer_stats(self) -> dict:
        disagg = self.core.disagg
        if disagg is None:
            return {}
        done = disagg.stats
        return dict(waiting_preallocation=len(self.preallocations), transferring=len(self.core.scheduler.parked),
                    transfers_done=done.done, transfers_failed=done.failed, transfer_bytes=done.bytes,
                    transfer_seconds=done.seconds)


def _rejection(rid: int, error: Exception) -> str:
    """Why one request was refused. A ValueError is the request's own fault (the API process validates first:
    this is the last line of defence); anything else is the engine's, triggered by this request alone."""
    if isinstance(error, ValueError):
        return str(error)
    logger.exception("request %d could not be added", rid, exc_info=error)
    return f"internal error: {type(error).__name__}: {error}"
