"""EngineClient: the API process's handle on the engine process.

It starts the engine process, sends it requests and aborts, and routes the outputs coming back
to one asyncio queue per request. A thread of its own receives the engine's heartbeats, so /health
reflects the engine and not how busy the event loop is. If the engine process dies or reports a
failure, every pending request gets an error output and `on_fatal` is called once (the server then
exits non-zero, for a supervisor to restart it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import zmq
import zmq.asyncio

from keel.config import EngineConfig
from keel.disagg.kv_transfer import KVDestination, PeerInfo
from keel.engine.limits import RequestLimits
from keel.engine.outputs import CoreOutput, FinishReason
from keel.sampling_params import SamplingParams
from keel.server.engine_process import run_engine_process
from keel.server.messages import (AbortRequests, AddRequest, ConnectPeer, EngineFailed, EngineOutputs, EngineReady,
                                  EngineStats, PeerConnected, Preallocate, Preallocated, SenderDone, Shutdown, ToEngine,
                                  from_engine_decoder, heartbeat_decoder, ipc_addresses, pack)

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine process failed or is gone; `details`: its traceback, when it sent one."""

    def __init__(self, message: str, details: Optional[str] = None) -> None:
        super().__init__(message)
        self.details = details


@dataclass
class Preallocation:
    """A decode server's request whose prompt a prefill server computes, as the API process follows it."""

    destination: asyncio.Future[KVDestination]  # the pages its KV goes into, once held (cancelled if it ends first)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # it has ended here: finished, aborted or failed

    def end(self) -> None:
        self.destination.cancel()
        self.ended.set()


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.limits: Optional[RequestLimits] = None
        self.page_size: Optional[int] = None
        self.stats: Optional[EngineStats] = None
        self.peer: Optional[PeerInfo] = None  # a disaggregated server's KV transfer agent
        self.last_heard = 0.0  # time.monotonic() of the engine's last heartbeat (set from the heartbeat thread)
        self.failure: Optional[str] = None
        self.on_fatal: Callable[[str], None] = lambda error: None  # called once when the engine is lost
        self._queues: dict[int, asyncio.Queue[CoreOutput]] = {}
        self._request_ids: dict[int, str] = {}  # engine request -> the response id a client can abort by
        self._aborts: dict[FinishReason, list[int]] = {}  # sent together at the end of this loop iteration
        self._rids = itertools.count(1)
        # disaggregated servers: preallocations awaited (decode), bootstrap exchanges awaited (prefill), and
        # requests whose end the engine reports even when aborted (prefill: once nothing more is sent for them)
        self._preallocations: dict[int, Preallocation] = {}
        self._connecting: dict[str, asyncio.Future[Optional[str]]] = {}
        self._engine_ends: set[int] = set()
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._dispatcher: Optional[asyncio.Task] = None
        self._context = zmq.asyncio.Context()
        self._ipc_dir = tempfile.mkdtemp(prefix="keel-ipc-")  # mode 0700: no other user reaches the sockets
        os.chmod(self._ipc_dir, 0o700)
        self._addresses = ipc_addresses(self._ipc_dir)
        # Every message carries this secret as its first frame: it reaches the engine through the spawn pipe,
        # not the command line, so a process that can open the sockets still cannot speak for the engine.
        self._secret = secrets.token_bytes(16)
        self._decoder = from_engine_decoder(self._secret)
        self._requests = self._context.socket(zmq.PUSH)
        self._outputs = self._context.socket(zmq.PULL)
        self._stop_heartbeats = threading.Event()
        self._heartbeats: Optional[threading.Thread] = None

    @property
    def ipc_dir(self) -> str:
        return self._ipc_dir

    def spawn(self) -> None:
        """Start the engine process (it loads the model while this process does its own start-up)."""
        self._requests.bind(self._addresses["requests"])
        self._outputs.bind(self._addresses["outputs"])
        ready = threading.Event()
        self._heartbeats = threading.Thread(target=self._receive_heartbeats, args=(ready,), daemon=True,
                                            name="keel-heartbeats")
        self._heartbeats.start()
        ready.wait()
        spawn = multiprocessing.get_context("spawn")
        # several ranks: the engine process starts the others, which a daemon process may not; it still ends with
        # this one (shutdown() stops it, and it exits by itself once orphaned)
        self._process = spawn.Process(target=run_engine_process, name="keel-engine", daemon=self.config.tp_size == 1,
                                      args=(self.config, self._ipc_dir, self._secret))
        self._process.start()

    async def start(self, timeout_s: float = 1800.0) -> None:
        """Wait until the engine process (spawned now unless it was already) has loaded the model and answered."""
        if self._process is None:
            self.spawn()
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._process.is_alive():
                raise EngineError(f"the engine process exited (code {self._process.exitcode}) while starting")
            if await self._outputs.poll(500):
                message = self._decoder.receive(await self._outputs.recv_multipart())
                if isinstance(message, EngineFailed):
                    why = message.error.strip().splitlines()[-1]
                    raise EngineError(f"the engine failed to start: {why}", message.error)
                if isinstance(message, EngineReady):
                    self.limits, self.page_size, self.peer = message.limits, message.page_size, message.peer
                    break
            if time.monotonic() > deadline:
                raise EngineError(f"the engine did not start within {timeout_s:.0f} s")
        self.last_heard = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._process.sentinel, self._engine_exited)
        self._dispatcher = asyncio.create_task(self._dispatch())

    def _receive_heartbeats(self, ready: threading.Event) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PULL)
        socket.bind(self._addresses["heartbeat"])
        ready.set()
        decoder = heartbeat_decoder(self._secret)
        try:
            while not self._stop_heartbeats.is_set():
                if socket.poll(100) and decoder.receive(socket.recv_multipart()) is not None:
                    self.last_heard = time.monotonic()
        finally:
            socket.close(linger=0)
            context.term()

    def _send(self, message: ToEngine) -> None:
        self._requests.send_multipart(pack(self._secret, message))

    def next_rid(self) -> int:
        return next(self._rids)

    def has_room(self, count: int, max_pending: int) -> bool:
        """Whether `count` more engine requests fit under the cap on pending ones."""
        return len(self._queues) + count <= max_pending

    def submit(self, rid: int, prompt_ids: list[int], params: SamplingParams, request_id: str,
               kv_destination: Optional[KVDestination] = None) -> asyncio.Queue[CoreOutput]:
        """Send a request; its outputs arrive on the returned queue, the last one with a finish_reason. One with a
        `kv_destination` (prefill server) gets its last output from the engine even when aborted: once nothing
        more is sent into the destination."""
        queue = self._track(rid, request_id)
        if self.failure is None:
            if kv_destination is not None:
                self._engine_ends.add(rid)
            self._send(AddRequest(rid, prompt_ids, params, kv_destination))
        return queue

    def preallocate(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                    request_id: str) -> tuple[asyncio.Queue[CoreOutput], Preallocation]:
        """Decode server: a request whose prompt a prefill server computes; its outputs arrive on the queue."""
        queue = self._track(rid, request_id)
        preallocation = Preallocation(asyncio.get_running_loop().create_future())
        if self.failure is None:
            self._preallocations[rid] = preallocation
            self._send(Preallocate(rid, prompt_ids, params))
        else:
            preallocation.end()
        return queue, preallocation

    def _track(self, rid: int, request_id: str) -> asyncio.Queue[CoreOutput]:
        queue: asyncio.Queue[CoreOutput] = asyncio.Queue()
        if self.failure is not None:
            queue.put_nowait(_failed(rid, self.failure))
        else:
            self._queues[rid] = queue
            self._request_ids[rid] = request_id
        return queue

    async def connect_peer(self, peer: PeerInfo) -> Optional[str]:
        """Prefill server: the bootstrap exchange with a decode server's agent; why it failed, or None."""
        if self.failure is not None:
            return self.failure
        answer = self._connecting.get(peer.name)
        if answer is None:
            answer = self._connecting[peer.name] = asyncio.get_running_loop().create_future()
            self._send(ConnectPeer(peer))
        return await asyncio.shield(answer)

    def sender_done(self, rid: int) -> None:
        """Decode server: nothing more will be written into this aborted request's pages; free them now. Sent
        after this turn's aborts, so the engine has seen the abort first."""
        if self.failure is None:
            asyncio.get_running_loop().call_soon(self._send_if_alive, SenderDone([rid]))

    def _send_if_alive(self, message: ToEngine) -> None:
        if self.failure is None:
            self._send(message)

    def abort(self, rid: int, reason: FinishReason = "abort", error: Optional[str] = None) -> None:
        """Finish a request in the engine (its KV is released there). Whoever waits on its queue gets a last
        output with this finish reason (and `error`, if given). Aborts made in one turn of the event loop (every
        choice of a response whose client left) reach the engine as one message."""
        if rid in self._engine_ends:  # its last output comes from the engine
            self._queue_abort(rid, reason)
            return
        queue = self._queues.pop(rid, None)
        self._request_ids.pop(rid, None)
        self._end_preallocation(rid)
        if queue is None:
            return
        queue.put_nowait(CoreOutput(rid, [], None, reason, error=error))
        self._queue_abort(rid, reason)

    def _queue_abort(self, rid: int, reason: FinishReason) -> None:
        if self.failure is None:
            if not self._aborts:
                asyncio.get_running_loop().call_soon(self._send_aborts)
            self._aborts.setdefault(reason, []).append(rid)

    def _end_preallocation(self, rid: int) -> None:
        preallocation = self._preallocations.pop(rid, None)
        if preallocation is not None:
            preallocation.end()

    def _send_aborts(self) -> None:
        aborts, self._aborts = self._aborts, {}
        if self.failure is None:
            for reason, rids in aborts.items():
                self._send((AbortRequests(rids, reason)))

    def abort_request(self, request_id: str) -> bool:
        """Abort every engine request of a response id (all its choices); False if none is running."""
        rids = [rid for rid, rid_request in self._request_ids.items() if rid_request == request_id]
        for rid in rids:
            self.abort(rid)
        return bool(rids)

    def finished(self, rid: int) -> None:
        """The front end is done with a request that finished on its own."""
        self._queues.pop(rid, None)
        self._request_ids.pop(rid, None)
        self._engine_ends.discard(rid)
        self._end_preallocation(rid)

    def healthy(self, timeout_s: float) -> bool:
        alive = self._process is not None and self._process.is_alive()
        return alive and self.failure is None and time.monotonic() - self.last_heard < timeout_s

    @property
    def engine_pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def num_pending(self) -> int:
        return len(self._queues)

    async def _dispatch(self) -> None:
        while True:
            message = self._decoder.receive(await self._outputs.recv_multipart())
            if isinstance(message, EngineFailed):
                self._lose_engine(f"the engine failed: {message.error.strip().splitlines()[-1]}", message.error)
                return
            if isinstance(message, EngineOutputs):
                if message.stats is not None:
                    self.stats = message.stats
                for out in message.outputs:
                    queue = self._queues.get(out.rid)
                    if queue is not None:
                        queue.put_nowait(out)
                        if out.finish_reason is not None:
                            del self._queues[out.rid]
                            self._request_ids.pop(out.rid, None)
                            self._engine_ends.discard(out.rid)
                            self._end_preallocation(out.rid)
            elif isinstance(message, Preallocated):
                preallocation = self._preallocations.get(message.rid)
                if preallocation is not None and not preallocation.destination.done():
                    preallocation.destination.set_result(message.destination)
            elif isinstance(message, PeerConnected):
                answer = self._connecting.pop(message.name, None)
                if answer is not None and not answer.done():
                    answer.set_result(message.error)

    def _engine_exited(self) -> None:
        assert self._loop is not None and self._process is not None
        self._loop.remove_reader(self._process.sentinel)
        self._process.join(1)
        self._lose_engine(f"the engine process exited with code {self._process.exitcode}")

    def _lose_engine(self, error: str, details: Optional[str] = None) -> None:
        """The engine is gone or going: fail every pending request and tell the server, once."""
        if self.failure is not None:
            return
        if details is not None:
            logger.error("%s", details.rstrip())  # the engine's own traceback: a real server fault
        logger.error("%s; failing %d pending requests and stopping the server", error, len(self._queues))
        self._fail_all(error)
        self.on_fatal(error)

    def fail_pending_after(self, delay_s: float, error: str) -> None:
        """From any thread (a signal handler): in `delay_s`, end every pending request with `error` and abort it
        in the engine, so its client gets an error instead of a torn connection."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay_s, self._abort_all, error)

    def _abort_all(self, error: str) -> None:
        if self.failure is None and self._queues:
            self._send((AbortRequests(list(self._queues))))
        self._fail_all(error)

    def _fail_all(self, error: str) -> None:
        self.failure = error  # and no new requests
        for rid, queue in self._queues.items():
            queue.put_nowait(_failed(rid, error))
        self._queues.clear()
        self._request_ids.clear()
        self._engine_ends.clear()
        for rid in list(self._preallocations):
            self._end_preallocation(rid)
        for answer in self._connecting.values():
            if not answer.done():
                answer.set_result(error)
        self._connecting.clear()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine process (pending requests get an error), and clean up."""
        if self._loop is not None and self._process is not None:
            self._loop.remove_reader(self._process.sentinel)
        if self._process is not None and self._process.is_alive():
            self._send((Shutdown()))
            await asyncio.get_running_loop().run_in_executor(None, self._process.join, timeout_s)
            if self._process.is_alive():
                logger.warning("engine process did not stop in %.0f s; terminating it", timeout_s)
                self._process.kill()  # also ends a stopped (SIGSTOP) process
                self._process.join(5)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self._fail_all(self.failure or "the server is shutting down")
        self.close()

    def stop_if_unstarted(self) -> None:
        """After a failure before the server started (a tokenizer that does not load, a port in use): stop the
        spawned engine and clean up. A no-op once start() ran, since shutdown() then owns that."""
        if self._loop is None and self._process is not None:
            self._process.kill()
            self._process.join(5)
            self.close()

    def close(self) -> None:
        """Release the sockets and remove the IPC folder (also when start() failed); once."""
        if self._context.closed:
            return
        self._stop_heartbeats.set()
        if self._heartbeats is not None:
            self._heartbeats.join(2)
        self._requests.close(linger=0)
        self._outputs.close(linger=0)
        self._context.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _failed(rid: int, error: str) -> CoreOutput:
    return CoreOutput(rid, [], None, "abort", error=error)
