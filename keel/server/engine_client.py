"""EngineClient: the API process's handle on the engine process.

It starts the engine process, sends it requests and aborts, and routes the outputs coming back
to one asyncio queue per request. It also remembers when the engine last answered, for
/health. If the engine process dies, every pending request gets an error output.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import time
from typing import Optional

import zmq
import zmq.asyncio

from keel.config import EngineConfig
from keel.engine.limits import RequestLimits
from keel.engine.outputs import CoreOutput, FinishReason
from keel.sampling_params import SamplingParams
from keel.server.engine_process import run_engine_process
from keel.server.messages import (AbortRequest, AddRequest, EngineFailed, EngineOutputs, EngineReady, EngineStats,
                                  Shutdown)

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    pass


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.limits: Optional[RequestLimits] = None
        self.page_size: Optional[int] = None
        self.stats: Optional[EngineStats] = None
        self.last_heard = 0.0  # time.monotonic() of the engine's last message
        self.failure: Optional[str] = None
        self._queues: dict[int, asyncio.Queue[CoreOutput]] = {}
        self._request_ids: dict[int, str] = {}  # engine request -> the response id a client can abort by
        self._rids = itertools.count(1)
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._dispatcher: Optional[asyncio.Task] = None
        self._context = zmq.asyncio.Context()
        self._ipc_dir = tempfile.mkdtemp(prefix="keel-ipc-")
        self._requests = self._context.socket(zmq.PUSH)
        self._outputs = self._context.socket(zmq.PULL)

    async def start(self, timeout_s: float = 1800.0) -> None:
        """Start the engine process and wait until it has loaded the model and answered."""
        requests_address, outputs_address = f"ipc://{self._ipc_dir}/requests", f"ipc://{self._ipc_dir}/outputs"
        self._requests.bind(requests_address)
        self._outputs.bind(outputs_address)
        spawn = multiprocessing.get_context("spawn")
        self._process = spawn.Process(target=run_engine_process, name="keel-engine", daemon=True,
                                      args=(self.config, requests_address, outputs_address))
        self._process.start()
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._process.is_alive():
                raise EngineError(f"the engine process exited (code {self._process.exitcode}) while starting")
            if await self._outputs.poll(500):
                message = await self._outputs.recv_pyobj()
                if isinstance(message, EngineFailed):
                    raise EngineError(f"the engine failed to start:\n{message.error}")
                if isinstance(message, EngineReady):
                    self.limits, self.page_size = message.limits, message.page_size
                    break
            if time.monotonic() > deadline:
                raise EngineError(f"the engine did not start within {timeout_s:.0f} s")
        self.last_heard = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._dispatcher = asyncio.create_task(self._dispatch())

    def next_rid(self) -> int:
        return next(self._rids)

    def submit(self, rid: int, prompt_ids: list[int], params: SamplingParams,
               request_id: str) -> asyncio.Queue[CoreOutput]:
        """Send a request; its outputs arrive on the returned queue, the last one with a finish_reason."""
        queue: asyncio.Queue[CoreOutput] = asyncio.Queue()
        if self.failure is not None:
            queue.put_nowait(_failed(rid, self.failure))
            return queue
        self._queues[rid] = queue
        self._request_ids[rid] = request_id
        self._requests.send_pyobj(AddRequest(rid, prompt_ids, params))
        return queue

    def abort(self, rid: int, reason: FinishReason = "abort") -> None:
        """Finish a request in the engine (its KV is released there). Whoever waits on its queue gets a last
        output with this finish reason."""
        queue = self._queues.pop(rid, None)
        self._request_ids.pop(rid, None)
        if queue is None:
            return
        queue.put_nowait(CoreOutput(rid, [], None, reason))
        if self.failure is None:
            self._requests.send_pyobj(AbortRequest(rid, reason))

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
        assert self._process is not None
        while True:
            if not await self._outputs.poll(1000):
                if not self._process.is_alive():
                    self._fail_all(f"the engine process exited with code {self._process.exitcode}")
                    return
                continue
            message = await self._outputs.recv_pyobj()
            self.last_heard = time.monotonic()
            if isinstance(message, EngineFailed):
                logger.error("engine failed:\n%s", message.error)
                self._fail_all(message.error.strip().splitlines()[-1])
                return
            if isinstance(message, EngineOutputs):
                self.stats = message.stats
                for out in message.outputs:
                    queue = self._queues.get(out.rid)
                    if queue is not None:
                        queue.put_nowait(out)
                        if out.finish_reason is not None:
                            del self._queues[out.rid]
                            self._request_ids.pop(out.rid, None)

    def fail_pending_after(self, delay_s: float, error: str) -> None:
        """From any thread (a signal handler): in `delay_s`, end every pending request with `error` and abort it
        in the engine, so its client gets an error instead of a torn connection."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay_s, self._abort_all, error)

    def _abort_all(self, error: str) -> None:
        self.failure = error  # and no new requests
        for rid in list(self._queues):
            self._requests.send_pyobj(AbortRequest(rid))
        self._fail_all(error)

    def _fail_all(self, error: str) -> None:
        self.failure = error
        for rid, queue in self._queues.items():
            queue.put_nowait(_failed(rid, error))
        self._queues.clear()
        self._request_ids.clear()

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine process (pending requests get an error), and clean up."""
        if self._process is not None and self._process.is_alive():
            self._requests.send_pyobj(Shutdown())
            await asyncio.get_running_loop().run_in_executor(None, self._process.join, timeout_s)
            if self._process.is_alive():
                logger.warning("engine process did not stop in %.0f s; terminating it", timeout_s)
                self._process.terminate()
                self._process.join(5)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self._fail_all("the server is shutting down")
        self._requests.close(linger=0)
        self._outputs.close(linger=0)
        self._context.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _failed(rid: int, error: str) -> CoreOutput:
    return CoreOutput(rid, [], None, "abort", error=error)
