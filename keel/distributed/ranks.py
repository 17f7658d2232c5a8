"""The ranks of a multi-process engine: rank 0 (the engine core clients talk to) starts the other ranks of its
machine and sends every rank its commands; each other rank is an engine core that executes them.

Commands travel over torch.distributed (a gloo group on the host, `TensorParallel.control`), so ranks on other
machines (`--nnodes`) receive them like local ones. Two modes:
- tensor parallelism: every command goes to every rank (add a request with the seed rank 0 drew, abort, step,
  flush the cache). keel's scheduler is deterministic in its inputs (queue order, lengths, page counts; never
  timing), so the ranks build the same batches without exchanging them, and sample the same tokens from the same
  all-gathered logits. Only rank 0 returns outputs.
- data-parallel attention: a request goes to one rank (`to`), which schedules it alone; every step goes to all,
  and each rank answers with its outputs and load (`reply`).
A rank that dies leaves the others at their next collective, which fails after COLLECTIVE_TIMEOUT.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from keel.config import EngineConfig
from keel.distributed.parallel import shutdown_tensor_parallel, tensor_parallel


@dataclass(frozen=True)
class RankSetup:
    """What one rank's engine core needs to join the group."""

    rank: int
    size: int
    init_method: str


@dataclass(frozen=True)
class Command:
    method: str  # an EngineCore method
    args: tuple
    to: Optional[int] = None  # the one rank that executes it; None: every rank
    reply: bool = False  # every rank sends back what the method returned


def ranks_per_node(config: EngineConfig) -> int:
    return config.tp_size // config.nnodes


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """`config` for `rank`: on GPUs, a machine's i-th rank runs on the i-th device from the configured one."""
    if config.device == "auto" and torch.cuda.is_available():
        config = dataclasses.replace(config, device="cuda")  # else every rank would pick the current device
    if config.device.startswith("cuda"):
        first = int(config.device.split(":")[1]) if ":" in config.device else 0
        return dataclasses.replace(config, device=f"cuda:{first + rank % ranks_per_node(config)}")
    return config


def init_method(config: EngineConfig) -> str:
    """Where the ranks meet: --dist-init-addr across machines, else a free port of this one."""
    if config.dist_init_addr is not None:
        return f"tcp://{config.dist_init_addr}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class RankProcesses:
    """Rank 0's handle on the other ranks: it starts those of its machine and sends commands to all of them."""

    def __init__(self, config: EngineConfig) -> None:
        if multiprocessing.current_process().daemon:
            raise ValueError(f"--tp-size {config.tp_size}: a daemon process cannot start the other ranks; build the "
                             "engine in a process that may have children")
        self.setup = RankSetup(0, config.tp_size, init_method(config))
        self._processes = _start_ranks(config, self.setup, range(1, ranks_per_node(config)))
        self._killed = False
        atexit.register(self.close)  # an engine nobody closed still stops its ranks when the interpreter exits

    def send(self, method: str, *args: Any, to: Optional[int] = None, reply: bool = False) -> None:
        """Have the other ranks (or rank `to` alone) call their engine core's `method(*args)`; with `reply`, every
        rank then answers through gather()."""
        for process in self._processes:
            if not process.is_alive():
                raise RuntimeError(f"rank {process.name} exited (code {process.exitcode})")
        dist.broadcast_object_list([Command(method, args, to, reply)], src=0, group=tensor_parallel().control)

    @staticmethod
    def gather(mine: Any) -> list[Any]:
        """Every rank's answer to the last command sent with `reply` (rank 0's is `mine`), in rank order."""
        answers: list[Any] = [None] * tensor_parallel().size
        dist.gather_object(mine, answers, dst=0, group=tensor_parallel().control)
        return answers

    def kill(self) -> None:
        """End the other ranks of this machine now (rank 0 failed mid-step; they may be waiting for it)."""
        for process in self._processes:
            process.kill()
            process.join()
        self._processes, self._killed = [], True

    def close(self) -> None:
        """Stop the other ranks and leave the group with them (once; later calls do nothing). Every rank leaves
        at the same time: NCCL's teardown waits for its peers, so rank 0 must not wait for them to exit first."""
        atexit.unregister(self.close)
        if tensor_parallel().control is not None and not self._killed:
            dist.broadcast_object_list([None], src=0, group=tensor_parallel().control)
        shutdown_tensor_parallel()
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        self._processes = []


def run_node(config: EngineConfig) -> None:
    """A machine other than node 0 (--node-rank > 0): run its ranks until rank 0 closes the engine."""
    assert config.node_rank > 0
    per_node = ranks_per_node(config)
    first = config.node_rank * per_node
    setup = RankSetup(first, config.tp_size, init_method(config))
    processes = _start_ranks(config, setup, range(first + 1, first + per_node))
    _run_rank(config, setup)
    for process in processes:
        process.join()


def _start_ranks(config: EngineConfig, setup: RankSetup, ranks: range) -> list[Any]:
    context = multiprocessing.get_context("spawn")  # CUDA and torch.distributed need a fresh interpreter
    processes = [context.Process(target=_run_rank, args=(config, dataclasses.replace(setup, rank=rank)),
                                 name=f"keel-rank-{rank}", daemon=True) for rank in ranks]
    for process in processes:
        process.start()
    return processes


def _run_rank(config: EngineConfig, setup: RankSetup) -> None:
    """One rank > 0: execute rank 0's commands until it sends None."""
    from keel.engine.core import EngineCore

    core = EngineCore(rank_config(config, setup.rank), setup)
    control = tensor_parallel().control
    while True:
        box: list[Optional[Command]] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        command = box[0]
        if command is None:
            break
        result = getattr(core, command.method)(*command.args) if command.to in (None, setup.rank) else None
        if command.reply:
            dist.gather_object(result, None, dst=0, group=control)
    core.close()
