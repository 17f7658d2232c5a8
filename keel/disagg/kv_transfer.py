"""KV transfer between a prefill and a decode server's pools, with NIXL (the transfer library vLLM's and SGLang's
disaggregation use): UCX over host memory on a CPU, GPU memory on GPUs.

Each side's agent registers its pool's K and V buffers once (under tensor parallelism each rank has an agent over
its own pool, and rank r of a prefill server writes to rank r of a decode server). The decode side hands the
prefill side a `PeerInfo` (each agent's metadata and its pool's `KVLayout`: where each layer's pages are) in the
bootstrap exchange; from then on the prefill side writes a request's pages straight into the decode side's pages
(a one-sided WRITE: the decode side's host does nothing), and NIXL tells the decode side when a transfer has
landed, by the notification the writer attached (the request's id).

A layout is the pool's geometry, not its contents: a page of layer l of a buffer lies at
address + l * layer_bytes + page * page_bytes. Both sides must agree on everything but the addresses and the
number of pages (each sizes its own pool); `connect` checks that.

`pip install --no-deps nixl-cu13` installs NIXL (its declared dependencies would pull a CUDA build of torch);
keel imports it only when an agent is made.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:  # the API process reads this module's messages without importing torch
    import torch

    from keel.cache.kv_pool import KVPool


# fault injection: every N-th transfer fails to start ("N"), or only on tensor-parallel rank R ("N:R")
FAIL_EVERY_ENV = "KEEL_DEBUG_FAIL_KV_TRANSFER_EVERY"


class TransferError(RuntimeError):
    """A KV transfer could not be set up or did not complete."""


@dataclass(frozen=True)
class BufferLayout:
    """One registered buffer: the K or the V of a layer group, [layers, slots, kv_heads, head_dim], or an EAGLE
    head's input features, [1, rows, dim] (a page per request-table row)."""

    name: str  # "full.k", "full.v", "swa.k", "swa.v", "draft.k", "draft.v", "feat.x"
    address: int
    layers: int
    pages: int  # per layer, the reserved page 0 included
    page_bytes: int
    device_id: int

    @property
    def layer_bytes(self) -> int:
        return self.pages * self.page_bytes


@dataclass(frozen=True)
class KVLayout:
    mem_type: str  # NIXL's: "DRAM" (host memory) or "VRAM"
    buffers: tuple[BufferLayout, ...]

    def page_bytes(self, group: str) -> int:
        """Bytes one page of a group spans over all its layers and buffers ("full", "swa", "draft", "feat")."""
        return sum(b.page_bytes * b.layers for b in self.group(group))

    def group(self, group: str) -> list[BufferLayout]:
        return [b for b in self.buffers if b.name.startswith(f"{group}.")]

    def buffer(self, name: str) -> BufferLayout:
        for buffer in self.buffers:
            if buffer.name == name:
                return buffer
        raise KeyError(name)


@dataclass(frozen=True)
class AgentInfo:
    """How to reach one transfer agent (one rank's KV pool) and where its pages are."""

    name: str
    metadata: bytes  # its NIXL metadata (how to reach it, its registered memory)
    layout: KVLayout


@dataclass(frozen=True)
class PeerInfo:
    """What a decode server hands a prefill server in the bootstrap exchange: its agents, one per tensor-parallel
    rank (rank r's pool holds the KV heads the prefill server's rank r computes)."""

    agents: tuple[AgentInfo, ...]

    @property
    def name(self) -> str:
        """The server's name among its peers (its rank 0 agent's); KVDestination.peer names it."""
        return self.agents[0].name


@dataclass(frozen=True)
class KVDestination:
    """Where a decode server wants a request's prompt KV (handed to the prefill server with the request)."""

    peer: str  # the decode server's transfer agent
    rid: int  # the request's id there
    seed: int  # its sampling seed there: the prefill server draws the first token with it
    first_page: int  # pages before this one come from the decode server's own prefix cache
    pages: tuple[int, ...]  # its pages for the rest of the prompt, in order
    # Hybrid pools: the window KV the first decode step reads and the decode server's cache lacks: that of the
    # prompt's pages from this one on (the prompt's page index, at least first_page), into these SWA pages in order
    window_page: int = 0
    swa_pages: tuple[int, ...] = ()
    row: int = 0  # its request-table row there: an EAGLE head's input features for it go there
    # seconds from the order's arrival within which the prefill server must start writing (0: no limit): past it,
    # the decode server may have given the pages up, and a late write would land in pages others now hold
    send_within_s: float = 0.0


@dataclass(frozen=True)
class PagePlan:
    """Which pages of one request move: full-pool pages (every full-attention layer, and a draft model's layers,
    which share the full pool's pages) and, on a hybrid pool, the sliding-window pages of its window (every
    sliding-window layer); with an EAGLE drafter, the request's row of the head's input features. Source and
    destination side by side."""

    src_full: tuple[int, ...]
    dst_full: tuple[int, ...]
    src_swa: tuple[int, ...] = ()
    dst_swa: tuple[int, ...] = ()
    src_rows: tuple[int, ...] = ()
    dst_rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        pairs = [(self.src_full, self.dst_full), (self.src_swa, self.dst_swa), (self.src_rows, self.dst_rows)]
        if any(len(src) != len(dst) for src, dst in pairs):
            raise ValueError(f"a page plan pairs pages one to one; got {[(len(a), len(b)) for a, b in pairs]} "
                             "(full pages, sliding-window pages, feature rows)")


class TransferState(enum.Enum):
    IN_PROGRESS = "in_progress"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Transfer:
    note: str
    peer: str
    handle: Optional[Any]  # NIXL's transfer handle; None once released
    state: TransferState
    bytes: int  # what it moves, every layer
    started: float = field(default_factory=time.monotonic)


def _buffers(pool: KVPool, draft_pool: Optional[KVPool] = None,
             features: Optional[torch.Tensor] = None) -> list[tuple[str, torch.Tensor, int]]:
    """(name, tensor as [layers, slots, ...], slots per page) of every buffer a server registers: the target's K
    and V of each layer group that keeps any (a model whose layers all slide keeps no full K/V), a draft model's
    (on the full pool's pages), and an EAGLE head's input features (one "page" per request-table row)."""
    kv = [("full", pool.k_cache, pool.v_cache), ("swa", pool.swa_k_cache, pool.swa_v_cache)]
    if draft_pool is not None:
        kv.append(("draft", draft_pool.k_cache, draft_pool.v_cache))
    buffers = [(f"{group}.{part}", tensor, pool.page_size)
               for group, k, v in kv if k.shape[0] for part, tensor in (("k", k), ("v", v))]
    if features is not None:
        buffers.append(("feat.x", features.unsqueeze(0), 1))
    return buffers


def kv_layout(pool: KVPool, draft_pool: Optional[KVPool] = None,
              features: Optional[torch.Tensor] = None) -> KVLayout:
    """The geometry and addresses of the buffers a server registers (`_buffers`)."""
    layouts = []
    for name, tensor, page_size in _buffers(pool, draft_pool, features):
        layers, slots = tensor.shape[:2]
        slot_bytes = tensor[0, 0].numel() * tensor.element_size()
        layouts.append(BufferLayout(name, tensor.data_ptr(), layers, slots // page_size, page_size * slot_bytes,
                                    tensor.device.index or 0))
    return KVLayout("VRAM" if pool.k_cache.is_cuda else "DRAM", tuple(layouts))


def check_compatible(ours: KVLayout, theirs: KVLayout) -> None:
    """Both pools must hold the same buffers, layers and page size in bytes (pages counts may differ)."""
    mine = {b.name: (b.layers, b.page_bytes) for b in ours.buffers}
    other = {b.name: (b.layers, b.page_bytes) for b in theirs.buffers}
    if mine != other:
        raise TransferError(f"the peer's KV pool does not match ours: (layers, page bytes) per buffer {other}, "
                            f"ours {mine} (same model, dtype, page size and parallelism needed on both sides)")


class KVTransferAgent:
    """One server's (one rank's) NIXL agent over its KV pool: the decode side hands out its `info()`, the prefill side
    `connect`s to it and `write`s requests' pages, the decode side collects `arrived()` request ids."""

    def __init__(self, name: str, pool: KVPool, draft_pool: Optional[KVPool] = None,
                 features: Optional[torch.Tensor] = None, rank: int = 0,
                 progress_thread: Optional[bool] = None) -> None:
        """`draft_pool`, `features`: a drafter's state that travels with the KV (a draft model's or EAGLE head's
        K/V, the head's input features per request-table row); `rank`: the tensor-parallel rank whose pool it is.
        `progress_thread`: whether NIXL runs its own thread to drive transfers (default: on GPUs only). It spins
        a core even when idle; without it UCX moves host memory only while both sides poll (`poll`, `arrived`),
        as the engines do at every step."""
        from nixl_cu13 import nixl_agent, nixl_agent_config

        self.name = name
        self.layout = kv_layout(pool, draft_pool, features)
        if progress_thread is None:  # CPU ranks keep their cores for the model
            progress_thread = self.layout.mem_type == "VRAM"
        self._agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"]))
        tensors = [tensor for _, tensor, _ in _buffers(pool, draft_pool, features)]
        self._registered = self._agent.register_memory(self._agent.get_reg_descs(tensors))
        self._peers: dict[str, KVLayout] = {}
        self._fail_every = _fail_every(rank)
        self._writes = itertools.count(1)

    def info(self) -> AgentInfo:
        return AgentInfo(self.name, self._agent.get_agent_metadata(), self.layout)

    def connect(self, peer: AgentInfo) -> None:
        """Learn how to reach `peer` and where its pages are (once per peer; again after it restarts)."""
        check_compatible(self.layout, peer.layout)
        if peer.name in self._peers:
            self._agent.remove_remote_agent(peer.name)
        self._agent.add_remote_agent(peer.metadata)
        self._peers[peer.name] = peer.layout

    def disconnect(self, peer: str) -> None:
        if self._peers.pop(peer, None) is not None:
            self._agent.remove_remote_agent(peer)

    def write(self, peer: str, note: str, plan: PagePlan) -> Transfer:
        """Start writing the plan's pages of every layer into `peer`'s pool; `peer` gets `note` (NIXL's
        notification: the request's id, and what else travels with its KV) once they have landed. Raises
        TransferError when it cannot even start."""
        theirs = self._peers.get(peer)
        if theirs is None:
            raise TransferError(f"no connection to KV peer {peer!r} (its bootstrap exchange has not happened)")
        if self._fail_every and next(self._writes) % self._fail_every == 0:
            raise TransferError(f"the KV transfer {note!r} to {peer!r} failed to start ({FAIL_EVERY_ENV})")
        local: list[np.ndarray] = []
        remote: list[np.ndarray] = []
        for group, src, dst in (("full", plan.src_full, plan.dst_full), ("swa", plan.src_swa, plan.dst_swa),
                                ("draft", plan.src_full, plan.dst_full), ("feat", plan.src_rows, plan.dst_rows)):
            if not src or not self.layout.page_bytes(group):  # no pages, or this server keeps no such buffer
                continue
            src_first, dst_first, lengths = _runs(src, dst)
            for buffer in self.layout.group(group):
                local.append(_run_descs(buffer, src_first, lengths))
                remote.append(_run_descs(theirs.buffer(buffer.name), dst_first, lengths))
        if not local:
            raise TransferError(f"{note}: nothing to transfer")
        mem = self.layout.mem_type
        try:
            handle = self._agent.initialize_xfer(
                "WRITE", self._agent.get_xfer_descs(np.concatenate(local), mem),
                self._agent.get_xfer_descs(np.concatenate(remote), theirs.mem_type), peer, note.encode())
            state = self._agent.transfer(handle)
        except Exception as e:  # NIXL raises its own errors (nixlBackendError, ...) for a peer it cannot reach
            raise TransferError(f"the KV transfer {note!r} to {peer!r} failed to start: {e}") from e
        return Transfer(note, peer, handle, _state(state), sum(int(descs[:, 1].sum()) for descs in local))

    def poll(self, transfer: Transfer) -> TransferState:
        """The transfer's state now (a finished one's handle is released here)."""
        if transfer.state is TransferState.IN_PROGRESS and transfer.handle is not None:
            try:
                transfer.state = _state(self._agent.check_xfer_state(transfer.handle))
            except Exception:
                transfer.state = TransferState.FAILED
        if transfer.state is not TransferState.IN_PROGRESS:
            self.release(transfer)
        return transfer.state

    def release(self, transfer: Transfer) -> None:
        """Give the handle back (an abort of one in progress stops waiting for it; NIXL may still finish it)."""
        if transfer.handle is not None:
            handle, transfer.handle = transfer.handle, None
            try:
                self._agent.release_xfer_handle(handle)
            except Exception:
                pass  # an in-flight handle NIXL will not release yet: its own finalizer retries

    def arrived(self) -> list[str]:
        """The notes of the transfers peers have finished writing into this pool since the last call."""
        notes = self._agent.get_new_notifs()
        return [message.decode() for messages in notes.values() for message in messages]

    def close(self) -> None:
        for peer in list(self._peers):
            self.disconnect(peer)
        self._agent.deregister_memory(self._registered)


def _fail_every(rank: int) -> int:
    """FAIL_EVERY_ENV's N for an agent of `rank` (0: no injected failures)."""
    every, _, only_rank = os.environ.get(FAIL_EVERY_ENV, "").partition(":")
    return int(every or 0) if not only_rank or int(only_rank) == rank else 0


def _runs(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plan's pages as runs consecutive on both sides: (first source page, first destination page, pages).
    One descriptor per run and layer instead of per page: NIXL's cost per transfer grows with its descriptors
    (about 7 us each over CUDA IPC on an H200), so a request's fresh, mostly consecutive pages move in few."""
    s, d = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1))
    return s[starts], d[starts], np.diff(np.append(starts, len(s)))


def _run_descs(buffer: BufferLayout, first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """NIXL descriptors (address, bytes, device id) of runs of pages in every layer of `buffer`, layer by layer."""
    if first.size and (first.min() <= 0 or (first + lengths).max() > buffer.pages):
        raise TransferError(f"pages outside 1..{buffer.pages - 1} of the {buffer.name} buffer "
                            f"(runs from {first.tolist()}, {lengths.tolist()} pages)")
    layers = np.arange(buffer.layers, dtype=np.int64)[:, None]
    addresses = buffer.address + layers * buffer.layer_bytes + first[None, :] * buffer.page_bytes
    descs = np.empty((addresses.size, 3), dtype=np.int64)
    descs[:, 0] = addresses.reshape(-1)
    descs[:, 1] = np.broadcast_to(lengths[None, :] * buffer.page_bytes, addresses.shape).reshape(-1)
    descs[:, 2] = buffer.device_id
    return descs


def _state(status: str) -> TransferState:
    return {"DONE": TransferState.DONE, "PROC": TransferState.IN_PROGRESS}.get(status, TransferState.FAILED)
