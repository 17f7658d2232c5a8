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
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Optional

from keel.cache.kv_cache import KVCacheManager
from keel.disagg.kv_transfer import (KVDestination, KVTransferAgent, PagePlan, PeerInfo, Transfer, TransferError,
                                     TransferState)
from keel.engine.outputs import CoreOutput
from keel.scheduler.req import Req
from keel.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
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

    deadline: float
    since: float
    bytes: int


class DisaggSide:
    def __init__(self, role: Role, scheduler: Scheduler, kv: KVCacheManager, agent: KVTransferAgent,
                 transfer_timeout_s: float) -> None:
        self.role = role
        self.scheduler = scheduler
        self.kv = kv
        self.agent = agent
        self.transfer_timeout_s = transfer_timeout_s
        self.sending: dict[int, tuple[Transfer, float]] = {}  # prefill: transfers in flight and when to give up
        self.receiving: dict[int, Receiving] = {}  # decode: preallocated requests, by id
        self.aborted: set[int] = set()  # parked requests already reported finished, waiting for their transfer
        self.ended: list[int] = []  # prefill: aborted requests no transfer touches any more, to report
        self.stats = TransferStats()

    # ---- both roles ----------------------------------------------------------------------------

    def peer_info(self) -> PeerInfo:
        return self.agent.peer_info()

    def connect(self, peer: PeerInfo) -> None:
        self.agent.connect(peer)

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
        self.receiving[req.rid] = Receiving(now + self.transfer_timeout_s, now, len(pages) * layout.page_bytes("full")
                                            + len(swa_pages) * layout.page_bytes("swa"))
        return KVDestination(self.agent.name, req.rid, req.seed, first, pages, window_page, swa_pages,
                             self.kv.row(req.rid), SEND_WITHIN * self.transfer_timeout_s)

    def sender_done(self, rid: int) -> None:
        """The prefill server will write nothing more into this request's pages (its transfer failed or it
        aborted it): a request still waiting for them can be dropped now instead of at its timeout."""
        if rid in self.receiving and rid in self.aborted:
            self._drop_received(rid)

    def _poll_arrivals(self) -> list[CoreOutput]:
        outputs = []
        for note in self.agent.arrived():
            rid, token = (int(field) for field in note.split(":"))
            if rid not in self.receiving:
                logger.warning("KV arrived for request %d, which is no longer waiting for it", rid)
                continue
            if rid in self.aborted:
                self._drop_received(rid)
                continue
            arrival = self.receiving.pop(rid)
            self._count(True, arrival.bytes, arrival.since)
            req, reason = self.scheduler.unpark(rid, token)
            outputs.append(CoreOutput(rid, [token], None, reason, req.num_cached_tokens, req.error))
        now = time.monotonic()
        for rid in [rid for rid, waiting in self.receiving.items() if waiting.deadline < now]:
            reported = rid in self.aborted
            self.stats.failed += 1
            req = self._drop_received(rid, f"request {rid}: its KV did not arrive within "
                                           f"{self.transfer_timeout_s:.0f} s")
            if not reported:
                outputs.append(CoreOutput(rid, [], None, "abort", req.num_cached_tokens, req.error))
        return outputs

    def _drop_received(self, rid: int, error: Optional[str] = None) -> Req:
        del self.receiving[rid]
        self.aborted.discard(rid)
        return self.scheduler.drop_parked(rid, error)

    # ---- prefill server ------------------------------------------------------------------------

    def _poll_sends(self) -> list[CoreOutput]:
        outputs = []
        for rid, req in list(self.scheduler.parked.items()):
            if rid not in self.sending:
                outputs += self._send(req)
        now = time.monotonic()
        for rid, (transfer, deadline) in list(self.sending.items()):
            state = self.agent.poll(transfer)
            error = f"request {rid}: the KV transfer to {transfer.peer!r} failed"
            if state is TransferState.IN_PROGRESS and now > deadline:  # a peer gone mid-transfer: stop waiting
                self.agent.release(transfer)
                state = TransferState.FAILED
                error = (f"request {rid}: the KV transfer to {transfer.peer!r} did not finish within "
                         f"{self.transfer_timeout_s:.0f} s")
            if state is TransferState.IN_PROGRESS:
                continue
            del self.sending[rid]
            self._count(state is TransferState.DONE, transfer.bytes, transfer.started)
            if rid in self.aborted:
                self.aborted.discard(rid)
                self.scheduler.drop_parked(rid, None)
                self.ended.append(rid)
            elif state is TransferState.DONE:
                req, reason = self.scheduler.unpark(rid, None)
                outputs.append(CoreOutput(rid, [], None, reason))
            else:
                req = self.scheduler.drop_parked(rid, error)
                outputs.append(CoreOutput(rid, [], None, "abort", error=req.error))
        return outputs

    def _send(self, req: Req) -> list[CoreOutput]:
        """Start writing `req`'s prompt KV into its destination; on failure it ends with the error."""
        dest: KVDestination = req.kv_destination
        pages = tuple(self.kv.row_pages(req.rid)[dest.first_page:].tolist())
        swa_pages = self._swa_pages(req.rid, dest.window_page)
        try:
            if time.monotonic() > req.kv_send_by:
                raise TransferError(f"request {req.rid}: its KV was ready after the decode server's deadline "
                                    f"({dest.send_within_s:.1f} s from the order); not sent")
            if (len(pages), len(swa_pages)) != (len(dest.pages), len(dest.swa_pages)):
                raise TransferError(f"request {req.rid}: {len(pages)} pages of KV and {len(swa_pages)} of window KV "
                                    f"to send, the decode server holds {len(dest.pages)} and "
                                    f"{len(dest.swa_pages)} for them")
            note = f"{dest.rid}:{req.output_ids[0]}"
            rows = ((self.kv.row(req.rid),), (dest.row,)) if self.agent.layout.group("feat") else ((), ())
            transfer = self.agent.write(dest.peer, note, PagePlan(pages, dest.pages, swa_pages, dest.swa_pages, *rows))
            self.sending[req.rid] = (transfer, time.monotonic() + self.transfer_timeout_s)
            return []
        except TransferError as e:
            self.stats.failed += 1
            self.scheduler.drop_parked(req.rid, str(e))
            return [CoreOutput(req.rid, [], None, "abort", error=str(e))]

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
