"""The parallel group of this process, and the collectives the model layers call.

One engine process per rank (keel/distributed/ranks.py). The group is process state, set once before the model
is built; with one rank (the default) every collective is the identity and torch.distributed is never
initialised. A process holds one multi-rank engine at a time (close it before building another).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Optional, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")

# a rank waits this long for the others at a collective before failing (a dead peer must not hang it forever)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


# the host-side group (commands from rank 0, round sizes) waits this long: a server may sit idle for days
CONTROL_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: Optional[dist.ProcessGroup]  # None with one rank
    whole_experts: bool = False  # expert parallelism: each rank holds whole experts, not a slice of each
    # data-parallel attention: attention, embedding and LM head are whole on every rank (each attends over its
    # own requests); only the MLP / expert layers are split over the ranks
    dp_attention: bool = False
    control: Optional[dist.ProcessGroup] = None  # gloo, on the host: rank 0's commands and the ranks' round sizes


_TP = TensorParallel(0, 1, None)

# how a projection splits over the ranks: its output features (column), its input features (row), or not at all
Parallel = Optional[Literal["column", "row"]]


def init_tensor_parallel(rank: int, size: int, init_method: str, device: torch.device,
                         whole_experts: bool = False, dp_attention: bool = False,
                         symmetric_all_reduce: bool = False) -> None:
    """Join the group of `size` ranks at `init_method` (a tcp:// or file:// address) as `rank`. On GPUs small
    all-reduces take the symmetric-memory path when `symmetric_all_reduce`."""
    global _TP, _SYMMETRIC
    if size == 1:
        _TP = TensorParallel(0, 1, None)
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _TP = TensorParallel(rank, size, dist.group.WORLD, whole_experts, dp_attention, control)
    if device.type == "cuda" and symmetric_all_reduce:
        _SYMMETRIC = SymmetricAllReduce.create(dist.group.WORLD, device)


def shutdown_tensor_parallel() -> None:
    """Leave the group (a process holds one tensor-parallel engine at a time)."""
    global _TP, _SYMMETRIC
    _SYMMETRIC = None
    if _TP.group is not None:
        dist.destroy_process_group()
    _TP = TensorParallel(0, 1, None)


def tensor_parallel() -> TensorParallel:
    return _TP


def gather_on_host(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, over the host group; [value] with one rank. Every rank calls
    it at the same point of the same step: how ranks agree on what only some of them saw (a clock, a transfer)."""
    if _TP.control is None:
        return [value]
    values: list = [None] * _TP.size
    dist.all_gather_object(values, value, group=_TP.control)
    return values


def split(size: int, what: str) -> int:
    """This rank's share of `size` (e.g. attention heads), which must divide evenly."""
    tp = _TP.size
    if size % tp:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {tp}")
    return size // tp


def attention_split(size: int, what: str) -> int:
    """This rank's share of an attention-side size (heads, KV heads): all of it under data-parallel attention, else
    split()."""
    return size if _TP.dp_attention else split(size, what)


def vocab_rows(vocab_size: int) -> int:
    """Rows of the vocabulary this rank's embedding and LM head hold: all of them with one rank or under
    data-parallel attention, else an equal share rounded up, so that any vocabulary splits (the last rank's rows
    past the vocabulary are zeros, never looked up, and their logits are dropped)."""
    return vocab_size if _TP.dp_attention or _TP.size == 1 else -(-vocab_size // _TP.size)


def attention_parallel(kind: Parallel) -> Parallel:
    """The parallel kind ("column", "row") of an attention-side projection: none under data-parallel attention."""
    return None if _TP.dp_attention else kind


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the ranks, in place."""
    if _TP.size > 1:
        if _SYMMETRIC is not None and _SYMMETRIC.fits(x):
            return x.copy_(_SYMMETRIC(x))
        dist.all_reduce(x, group=_TP.group)
    return x


class SymmetricAllReduce:
    """A one-shot all-reduce through symmetric memory (torch.distributed._symmetric_memory): each GPU copies its
    tensor into a buffer every peer can address, and one kernel reads all peers' buffers over NVLink and sums them.
    Meant for decode sizes, where a layer makes two all-reduces per step (a batch-1 step of an 8B model makes 64);
    as built (a copy in, the kernel, a copy out) it measured slower than NCCL on two H200s (llama-3.1-8b TP 2
    batch 1: 3.121 vs 2.984 ms a step), so it is opt-in (--enable-torch-symm-mem). Only small bfloat16 tensors
    take it; the rest go to NCCL. No NVLink multicast."""

    MAX_BYTES = 512 * 1024  # one-shot reads every peer's whole buffer: past this NCCL's ring is cheaper

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffer = symm_mem.empty(self.MAX_BYTES // 2, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    @classmethod
    def create(cls, group: dist.ProcessGroup, device: torch.device) -> Optional["SymmetricAllReduce"]:
        """The path, or None (with a warning) where this torch or machine cannot build it: NCCL serves then."""
        try:
            return cls(group, device)
        except Exception as e:  # an older torch, no peer access between the GPUs
            logger.warning("symmetric-memory all-reduce unavailable (%s: %s); NCCL serves every all-reduce",
                           type(e).__name__, e)
            return None

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and x.numel() * 2 <= self.MAX_BYTES and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[:x.numel()]
        staged.copy_(x.view(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name).view_as(x)


_SYMMETRIC: Optional[SymmetricAllReduce] = None


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The ranks' `x` (the same shape on each) stacked along the first dimension, in rank order."""
    if _TP.size == 1:
        return x
    out = x.new_empty((_TP.size * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=_TP.group)
    return out


def reduce_scatter_rows(x: torch.Tensor) -> torch.Tensor:
    """Rank r's block of rows of the sum of `x` over the ranks: x is [size * rows, ...] on every rank; returns the
    sum's rows [r * rows, (r + 1) * rows)."""
    if _TP.size == 1:
        return x
    out = x.new_empty((x.shape[0] // _TP.size,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=_TP.group)
    return out


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of `x`, grouped by destination (send_counts[d] rows for rank d, in rank order), sent to their ranks;
    returns the rows received, grouped by source (recv_counts[s] from rank s)."""
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=_TP.group)
    return out


def exchange_counts(send_counts: list[int], device: torch.device) -> list[int]:
    """How many rows each rank will send this one, given how many this one sends each (all-to-all of the counts;
    the host waits for it: the receive buffers are sized from it)."""
    sent = torch.tensor(send_counts, dtype=torch.int64, device=device)
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=_TP.group)
    return received.tolist()


# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor (deprecated there); torch 2.11 has only the
# old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The ranks' `x` concatenated along the last dimension, in rank order."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    dist.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=-1)
