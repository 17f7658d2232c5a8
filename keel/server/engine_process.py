"""The engine process: EngineCore behind two ZMQ sockets.

It loads the model, reports EngineReady, then loops: take every pending message without
blocking while there is work (waiting up to a heartbeat interval when idle), run one step, send
its outputs with the engine's stats. It never touches HTTP, ignores Ctrl-C (the API process
orchestrates shutdown), and exits when the API process is gone.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import zmq

from keel.config import EngineConfig
from keel.engine.core import EngineCore
from keel.engine.outputs import CoreOutput
from keel.server.messages import (AbortRequest, AddRequest, EngineFailed, EngineOutputs, EngineReady, EngineStats,
                                  Shutdown)

HEARTBEAT_S = 0.5


def run_engine_process(config: EngineConfig, requests_address: str, outputs_address: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    context = zmq.Context()
    requests = context.socket(zmq.PULL)
    requests.connect(requests_address)
    outputs = context.socket(zmq.PUSH)
    outputs.connect(outputs_address)
    try:
        core = EngineCore(config)
        outputs.send_pyobj(EngineReady(core.limits, core.kv_cache.page_size))
        EngineLoop(core, requests, outputs).run()
    except Exception:
        outputs.send_pyobj(EngineFailed(traceback.format_exc()))
        raise
    finally:
        outputs.close(linger=1000)
        requests.close(linger=0)
        context.term()


class EngineLoop:
    def __init__(self, core: EngineCore, requests: zmq.Socket, outputs: zmq.Socket) -> None:
        self.core = core
        self.requests = requests
        self.outputs = outputs
        self.parent = os.getppid()

    def run(self) -> None:
        last_sent = 0.0
        while True:
            timeout_ms = 0 if self.core.has_work else int(HEARTBEAT_S * 1000)
            if self.requests.poll(timeout_ms) and not self._handle_messages():
                return
            step_outputs = self.core.step() if self.core.has_work else []
            if step_outputs or time.monotonic() - last_sent >= HEARTBEAT_S:
                self.outputs.send_pyobj(EngineOutputs(step_outputs, self.stats()))
                last_sent = time.monotonic()
            if os.getppid() != self.parent:  # the API process died: nobody is left to serve
                return

    def _handle_messages(self) -> bool:
        """Apply every pending message; False on Shutdown."""
        rejected = []
        while True:
            try:
                message = self.requests.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            if isinstance(message, AddRequest):
                try:
                    self.core.add_request(message.prompt_ids, message.params, rid=message.rid)
                except ValueError as e:  # the API process validates first; this is the last line of defence
                    rejected.append(CoreOutput(message.rid, [], None, "abort", error=str(e)))
            elif isinstance(message, AbortRequest):
                self.core.abort(message.rid, message.reason)
            elif isinstance(message, Shutdown):
                return False
        if rejected:
            self.outputs.send_pyobj(EngineOutputs(rejected, self.stats()))
        return True

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
        )
