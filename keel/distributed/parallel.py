"""The tensor-parallel group of this process, and the collectives the model layers call.

One engine process per rank, each running the same deterministic engine core on the same requests (see
keel/distributed/mirror.py): the ranks agree on every batch without exchanging one, and sample the same tokens
from the same all-gathered logits. The group is process state, set once before the model is built; with one
rank (the default) every collective is the identity and torch.distributed is never initialised. A process holds
one tensor-parallel engine at a time (close it before building another).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

# a rank waits this long for the others at a collective before failing (a dead peer must not hang it forever)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: Optional[dist.ProcessGroup]  # None with one rank
    whole_experts: bool = False  # expert parallelism: each rank holds whole experts, not a slice of each


_TP = TensorParallel(0, 1, None)


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device,
                         whole_experts: bool = False) -> None:
    """Join the group of `size` ranks at `init_method` (a tcp:// or file:// address) as `rank`."""
    global _TP
    if size == 1:
        _TP = TensorParallel(0, 1, None)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    _TP = TensorParallel(rank, size, dist.group.WORLD, whole_experts)


def shutdown_tensor_parallel() -> None:
    """Leave the group (a process holds one tensor-parallel engine at a time)."""
    global _TP
    if _TP.group is not None:
        dist.destroy_process_group()
    _TP = TensorParallel(0, 1, None)


def tensor_parallel() -> TensorParallel:
    return _TP


def split(size: int, what: str) -> int:
    """This rank's share of `size` (e.g. attention heads), which must divide evenly."""
    tp = _TP.size
    if size % tp:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {tp}")
    return size // tp


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks, in place."""
    if _TP.size > 1:
        dist.all_reduce(x, group=_TP.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' `x` concatenated along the last dimension, in rank order."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=-1)
