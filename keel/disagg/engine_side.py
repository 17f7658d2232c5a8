"""The engine's side of disaggregation, for either role.

Decode server: `preallocate` admits a request with the KV of its whole prompt (its cached prefix, new pages for
the rest) and parks it (Scheduler.parked) until the prefill server's pages have landed; the `KVDestination` it
returns tells the prefill server where to write. NIXL's notification of the landed pages carries the first token,
so the request then joins the running ones like any prefilled request. On a hybrid sliding-window pool it holds
window KV (SWA pages) only for the prompt's pages the first decode step reads and its cache lacks (earlier pages'
window KV is never read there), and the prefill server writes its window KV of those pages with the full pages.

Prefill server: a request added with a `KVDestination` is prefilled as usual; once its first token is read back
it is parked with its KV instead of finishing, its pages are written into the decode server's, and it finishes
(its pages going into the prefix cache) when the transfer is done, or with an error when it failed.

Pages that a transfer may still write or read are not freed while it may: an aborted parked request keeps its KV
until its transfer has ended (prefill side: the transfer's state; decode side: the notification, or the sender
saying it is done with it). A prefill server therefore reports the end of an aborted request that had a
destination (finish "abort", no error) once nothing more will be written for it: the decode server may then free
the pages it held for it (`sender_done`). Nothing waits forever: past `transfer_timeout_s` a transfer still in
progress is given up on either side (its peer is taken for gone) and its request ends with an error.

Under tensor parallelism every rank holds its KV heads' share of each page and has its own transfer agent; rank r
of a prefill server writes to rank r of a decode server. The ranks run the same scheduler, so what they decide must
not depend on what only one of them saw: at each poll they exchange what their transfer agents reported and rank
0's clock (`gather_on_host`), then all apply the same outcome. A request's KV has arrived when every rank's has; a
transfer has ended when every rank's write has, and succeeded only if all did. Under data-parallel attention each
rank schedules its own requests with all KV heads: its side stands alone, and writes to whichever rank of the
decode server holds the request (every rank connects to all of them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, TypeVar

from keel.cache.kv_cache import KVCacheManager
from keel.disagg.kv_transfer import (KVDestination, KVTransferAgent, PagePlan, PeerInfo, Transfer, TransferError,
                                     TransferState)
from keel.distributed.parallel import gather_on_host, tensor_parallel
from keel.engine.outputs import CoreOutput
from keel.scheduler.req import Req
from keel.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
T = TypeVar("T")
# A decode server waits transfer_timeout_s for a request's KV; the prefill server must start writing within this
# share of it, so that the write ends before the decode server gives the pages up
SEND_WITHIN = 0.8


@dataclass
class TransferStats:
    """One server's KV transfers so far: sent (prefill) or received (decode)."""

    done: int = 0
    failed: int = 0  # failed to start, failed, or timed out
    bytes: int = 0  # of the done ones
    seconds: float = 0.0  # of the done ones: prefill, from the write's start; decode, from the preallocation


@dataclass
class Receiving:
    """A decode server's preallocated request, waiting for its KV."""

    deadline: float  # (rank 0's clock decides)
    since: float
    bytes: int  # every rank's share
    landed: dict[int, int] = field(default_factory=dict)  # rank -> the first token its notification carried


@dataclass
class Sending:
    """A prefill server's request whose KV this rank is writing."""

    transfer: Optional[Transfer]  # None: this rank's write failed to start
    error: str  # why it failed to start
    deadline: float  # when to give up on it (rank 0's clock decides)
    started: float


@dataclass(frozen=True)
class SendsSeen:
    """What one prefill rank saw at a poll: its writes' states, and by rank 0's clock which are overdue."""

    states: dict[int, tuple[TransferState, int, str]]  # rid -> (this rank's write: state, bytes moved, error)
    overdue: frozenset[int] = frozenset()  # writes still unfinished past their deadline: given up on


@dataclass(frozen=True)
class ArrivalsSeen:
    """What one decode rank saw at a poll: the notifications of KV that landed in its pool, and by rank 0's clock
    which requests waited too long."""

    notes: tuple[tuple[int, int], ...]  # (rid, first token)
    overdue: frozenset[int] = frozenset()


class DisaggSide:
    def __init__(self, role: Role, scheduler: Scheduler, kv: KVCacheManager, agent: KVTransferAgent,
                 transfer_timeout_s: float) -> None:
        self.role = role
        self.scheduler = scheduler
        self.kv = kv
        self.agent = agent
        self.transfer_timeout_s = transfer_timeout_s
        tp = tensor_parallel()
        self.mirrored = not tp.dp_attention  # the ranks run one schedule (each a share of the heads)
        self.rank, self.ranks = (tp.rank, tp.size) if self.mirrored else (0, 1)
        self.peers: dict[str, str] = {}  # prefill: decode server's name -> its agent this rank writes to
        self.sending: dict[int, Sending] = {}  # prefill: transfers in flight
        self.receiving: dict[int, Receiving] = {}  # decode: preallocated requests, by id
        self.aborted: set[int] = set()  # parked requests already reported finished, waiting for their transfer
        self.ended: list[int] = []  # prefill: aborted requests no transfer touches any more, to report
        self.stats = TransferStats()

    # ---- both roles ----------------------------------------------------------------------------

    def connect(self, peer: PeerInfo) -> None:
        """Prefill: reach the decode server's agent of this rank (rank r writes the KV heads of rank r); under
        data-parallel attention, every agent of the decode server (each rank holds its own requests)."""
        if not self.mirrored:
            for agent in peer.agents:
                self.agent.connect(agent)
            return
        if len(peer.agents) != self.ranks:
            raise TransferError(f"the decode server {peer.name!r} runs {len(peer.agents)} tensor-parallel rank(s), "
                                f"this prefill server {self.ranks}: rank r sends its KV heads to rank r, so both "
                                "need the same --tp-size")
        agent = peer.agents[self.rank]
        self.agent.connect(agent)
        self.peers[peer.name] = agent.name

    def poll(self) -> list[CoreOutput]:
        """Start the transfers of requests parked since the last call, and end the requests whose transfers have
        ended; their outputs."""
        outputs = self._poll_sends() if self.role == "prefill" else self._poll_arrivals()
        ended, self.ended = self.ended, []
        return [CoreOutput(rid, [], None, "abort") for rid in ended] + outputs

    @property
    def in_flight(self) -> int:
        return len(self.sending) if self.role == "prefill" else len(self.receiving)

    def abort(self, rid: int) -> None:
        """A parked request is finished for its client: its KV is freed once no transfer touches it."""
        if self.role == "prefill" and rid not in self.sending:
            self.scheduler.drop_parked(rid, None)  # no transfer started for it
            self.ended.append(rid)
            return
        self.aborted.add(rid)

    def aborted_unparked(self, req: Req) -> None:
        """Prefill: `req` was aborted before its KV was ready to send (its KV is already freed)."""
        if req.kv_destination is not None:
            self.ended.append(req.rid)

    def close(self) -> None:
        self.agent.close()

    # ---- decode server -------------------------------------------------------------------------

    def preallocate(self, req: Req) -> Optional[KVDestination]:
        """Hold `req`'s prompt KV and park it; None (nothing held) if it does not fit now."""
        if not self.scheduler.preallocate(req):
            return None
        first = self.kv.cached_pages(req.rid)
        pages = tuple(self.kv.row_pages(req.rid)[first:].tolist())
        window_page = self.kv.window_start(req.rid) if self.kv.swa is not None else 0
        swa_pages = self._swa_pages(req.rid, window_page)
        now = time.monotonic()
        layout = self.agent.layout
        self.receiving[req.rid] = Receiving(now + self.transfer_timeout_s, now, self.ranks * (
            len(pages) * layout.page_bytes("full") + len(swa_pages) * layout.page_bytes("swa")))
        return KVDestination(self.agent.name, req.rid, req.seed, first, pages, window_page, swa_pages,
                             self.kv.row(req.rid), SEND_WITHIN * self.transfer_timeout_s)

    def sender_done(self, rid: int) -> None:
        """The prefill server will write nothing more into this request's pages (its transfer failed or it
        aborted it): a request still waiting for them can be dropped now instead of at its timeout."""
        if rid in self.receiving and rid in self.aborted:
            self._drop_received(rid)

    def _poll_arrivals(self) -> list[CoreOutput]:
        now = time.monotonic()
        notes = tuple((int(rid), int(token)) for rid, token in (note.split(":") for note in self.agent.arrived()))
        overdue = frozenset(rid for rid, waiting in self.receiving.items() if waiting.deadline < now)
        seen = self._agree(ArrivalsSeen(notes, overdue if self.rank == 0 else frozenset()))
        for rank, view in enumerate(seen):
            for rid, token in view.notes:
                if rid in self.receiving:
                    self.receiving[rid].landed[rank] = token
                elif self.rank == 0:
                    logger.warning("KV arrived for request %d, which is no longer waiting for it", rid)
        outputs = []
        for rid, waiting in list(self.receiving.items()):
            if len(waiting.landed) == self.ranks:  # every rank's share is here
                if rid in self.aborted:
                    self._drop_received(rid)
                    continue
                del self.receiving[rid]
                self._count(True, waiting.bytes, waiting.since)
                req, reason = self.scheduler.unpark(rid, waiting.landed[0])
                outputs.append(CoreOutput(rid, [waiting.landed[0]], None, reason, req.num_cached_tokens, req.error))
            elif rid in seen[0].overdue:
                reported = rid in self.aborted
                self.stats.failed += 1
                req = self._drop_received(rid, f"request {rid}: its KV did not arrive within "
                                               f"{self.transfer_timeout_s:.0f} s")
                if not reported:
                    outputs.append(CoreOutput(rid, [], None, "abort", req.num_cached_tokens, req.error))
        return outputs

    def _agree(self, seen: T) -> list[T]:
        """What every rank saw (`gather_on_host`), when the ranks mirror one schedule; this rank's alone else."""
        return gather_on_host(seen) if self.mirrored else [seen]

    def _drop_received(self, rid: int, error: Optional[str] = None) -> Req:
        del self.receiving[rid]
        self.aborted.discard(rid)
        return self.scheduler.drop_parked(rid, error)

    # ---- prefill server ------------------------------------------------------------------------

    def _poll_sends(self) -> list[CoreOutput]:
        outputs, lead = [], self.rank == 0
        ready = [req for rid, req in self.scheduler.parked.items() if rid not in self.sending]
        if ready:  # (the same on every rank) by rank 0's clock, which may no longer be sent
            now = time.monotonic()
            late = self._agree(frozenset(req.rid for req in ready if now > req.kv_send_by) if lead else None)[0]
            for req in ready:
                outputs += self._send(req, late=req.rid in late)
        now = time.monotonic()
        overdue = frozenset(rid for rid, sending in self.sending.items() if now > sending.deadline)
        mine = SendsSeen({rid: self._state(rid, sending) for rid, sending in self.sending.items()},
                         overdue if lead else frozenset())
        seen = self._agree(mine)
        for rid in list(self.sending):
            outputs += self._settle(rid, [view.states[rid] for view in seen], rid in seen[0].overdue)
        return outputs

    def _state(self, rid: int, sending: Sending) -> tuple[TransferState, int, str]:
        """This rank's write of `rid`'s KV now: its state, the bytes it moved, and its error."""
        if sending.transfer is None:
            return TransferState.FAILED, 0, sending.error
        transfer = sending.transfer
        state = self.agent.poll(transfer)
        return (state, transfer.bytes if state is TransferState.DONE else 0,
                f"request {rid}: the KV transfer to {transfer.peer!r} failed")

    def _settle(self, rid: int, states: list[tuple[TransferState, int, str]], overdue: bool) -> list[CoreOutput]:
        """End `rid`'s transfer once every rank's write has ended (or it is overdue); its outputs."""
        unfinished = any(state is TransferState.IN_PROGRESS for state, _, _ in states)
        if unfinished and not overdue:
            return []
        sending = self.sending.pop(rid)
        if unfinished:  # a peer gone mid-transfer: stop waiting
            if sending.transfer is not None:
                self.agent.release(sending.transfer)
            error = f"request {rid}: the KV transfer did not finish within {self.transfer_timeout_s:.0f} s"
        else:
            error = next((error for state, _, error in states if state is not TransferState.DONE), "")
        done = not error
        self._count(done, sum(size for _, size, _ in states), sending.started)
        if rid in self.aborted:
            self.aborted.discard(rid)
            self.scheduler.drop_parked(rid, None)
            self.ended.append(rid)
            return []
        if done:
            req, reason = self.scheduler.unpark(rid, None)
            return [CoreOutput(rid, [], None, reason)]
        req = self.scheduler.drop_parked(rid, error)
        return [CoreOutput(rid, [], None, "abort", error=req.error)]

    def _send(self, req: Req, late: bool) -> list[CoreOutput]:
        """Start this rank's write of `req`'s prompt KV into its destination. A request every rank refuses to send
        (late, or not matching its destination) ends here with the error; a write that fails to start on this
        rank ends it at the next poll, once the other ranks' writes have ended too."""
        dest: KVDestination = req.kv_destination
        pages = tuple(self.kv.row_pages(req.rid)[dest.first_page:].tolist())
        swa_pages = self._swa_pages(req.rid, dest.window_page)
        error = ""
        if late:
            error = (f"request {req.rid}: its KV was ready after the decode server's deadline "
                     f"({dest.send_within_s:.1f} s from the order); not sent")
        elif (len(pages), len(swa_pages)) != (len(dest.pages), len(dest.swa_pages)):
            error = (f"request {req.rid}: {len(pages)} pages of KV and {len(swa_pages)} of window KV to send, the "
                     f"decode server holds {len(dest.pages)} and {len(dest.swa_pages)} for them")
        if error:
            self.stats.failed += 1
            self.scheduler.drop_parked(req.rid, error)
            return [CoreOutput(req.rid, [], None, "abort", error=error)]
        note = f"{dest.rid}:{req.output_ids[0]}"
        rows = ((self.kv.row(req.rid),), (dest.row,)) if self.agent.layout.group("feat") else ((), ())
        plan = PagePlan(pages, dest.pages, swa_pages, dest.swa_pages, *rows)
        transfer, error = None, ""
        try:
            transfer = self.agent.write(self.peers.get(dest.peer, dest.peer), note, plan)
        except TransferError as e:
            error = str(e)
        now = time.monotonic()
        self.sending[req.rid] = Sending(transfer, error, now + self.transfer_timeout_s, now)
        return []

    def _swa_pages(self, rid: int, first_page: int) -> tuple[int, ...]:
        """The SWA pages of the request's pages from `first_page` on (none without a hybrid pool)."""
        return tuple(self.kv.swa_pages(rid, first_page).tolist()) if self.kv.swa is not None else ()

    def _count(self, done: bool, size: int, since: float) -> None:
        if done:
            self.stats.done += 1
            self.stats.bytes += size
            self.stats.seconds += time.monotonic() - since
        else:
            self.stats.failed += 1
