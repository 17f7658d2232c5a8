"""Tensor-parallel ranks as mirrors: rank 0's engine core sends every command it executes (add a request, abort,
step, flush the cache) to ranks 1..N-1, each an engine core in its own process executing the same commands in the
same order.

keel's scheduler is deterministic in its inputs (queue order, lengths, page counts; never timing), and every
rank samples the same tokens from the same all-gathered logits with the same per-request seeds, so the ranks
build the same batches step after step without exchanging them; the collectives inside the model keep them in
lockstep. Only rank 0 returns outputs. A rank that dies leaves the others at their next collective, which fails
after COLLECTIVE_TIMEOUT.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import socket
from typing import Any

from keel.config import EngineConfig


@dataclasses.dataclass(frozen=True)
class RankSetup:
    """What one rank's engine core needs to join the group."""

    rank: int
    size: int
    init_method: str


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """`config` for `rank`: on GPUs, rank r runs on the r-th device from the configured one."""
    if config.device.startswith("cuda"):
        first = int(config.device.split(":")[1]) if ":" in config.device else 0
        return dataclasses.replace(config, device=f"cuda:{first + rank}")
    return config


class MirrorRanks:
    """Rank 0's handle on the other ranks' processes."""

    def __init__(self, config: EngineConfig) -> None:
        if multiprocessing.current_process().daemon:
            raise ValueError(f"--tp-size {config.tp_size} runs in the offline engine (keel.Engine, keel generate, "
                             "keel bench) so far; keel serve's engine process cannot start the other ranks yet")
        self.size = config.tp_size
        self.init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = multiprocessing.get_context("spawn")  # CUDA and torch.distributed need a fresh interpreter
        self._queues = [context.Queue() for _ in range(1, self.size)]
        self._processes = [
            context.Process(target=_run_rank, args=(config, RankSetup(rank, self.size, self.init_method), queue),
                            name=f"keel-tp-rank-{rank}", daemon=True)
            for rank, queue in zip(range(1, self.size), self._queues)]
        for process in self._processes:
            process.start()
        atexit.register(self.close)  # an engine nobody closed still stops its ranks when the interpreter exits

    @property
    def setup(self) -> RankSetup:
        return RankSetup(0, self.size, self.init_method)

    def send(self, method: str, *args: Any) -> None:
        """Have every other rank call its engine core's `method(*args)`."""
        for process, queue in zip(self._processes, self._queues):
            if not process.is_alive():
                raise RuntimeError(f"tensor-parallel rank {process.name} exited (code {process.exitcode})")
            queue.put((method, args))

    def close(self) -> None:
        """Stop the other ranks (once; later calls do nothing)."""
        atexit.unregister(self.close)
        for queue in self._queues:
            queue.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        for queue in self._queues:
            queue.close()
            queue.join_thread()
        self._queues, self._processes = [], []


def _run_rank(config: EngineConfig, setup: RankSetup, queue: Any) -> None:
    from keel.engine.core import EngineCore

    core = EngineCore(rank_config(config, setup.rank), setup)
    while (command := queue.get()) is not None:
        method, args = command
        getattr(core, method)(*args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
