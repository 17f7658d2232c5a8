"""The KV invariant checker: recounts every page, row and lock from scratch and compares.

Invariants (any violation raises InvariantViolation listing everything found):
- pages: free + evictable-cached + locked-cached + held-by-requests == total; each page has
  exactly one owner; every page a request owns is in its row, past its cached prefix; the cache
  owns exactly the pages of its tree, each in one node; the cache's counters match its tree.
- rows: every request holding KV owns exactly its row; no other row is taken.
- requests: waiting requests hold nothing, running, chunked and parked ones hold KV, none is in two places.
- radix locks: each node's lock count equals the number of holding requests whose locked path
  passes through it; a request's cached prefix is exactly the pages of its locked path.
- device table (when asked): each held row's request->token slots agree with its host pages.
- hybrid pools, the SWA pool by the same count (free + cached + held == total), and the full->SWA map: every
  mapped SWA page is owned by its full page's owner and mapped once; no free full page is still mapped (a
  stale mapping, seed 002); a running request's own pages inside its window have their SWA pages; each radix
  node's SWA count is right; the device map equals the host map (with the device table).

The engine recounts after every step when KEEL_STRICT_CHECKS=1 (the tests); otherwise, whenever it drains, it
checks the counters alone (check_drained), which a leak or a lock left behind cannot pass.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from keel.cache.id_allocator import CACHE, FENCED, FREE, KVAccountingError, describe_owner
from keel.cache.kv_cache import KVCacheManager
from keel.cache.radix import RadixCache
from keel.cache.swa_pages import SwaPages
from keel.scheduler.req import ReqStatus
from keel.scheduler.scheduler import Scheduler

STRICT_ENV = "KEEL_STRICT_CHECKS"


class InvariantViolation(KVAccountingError):
    pass


def strict_checks_enabled() -> bool:
    return os.environ.get(STRICT_ENV, "0") == "1"


def check_invariants(scheduler: Scheduler, device_table: bool = True) -> None:
    problems = _request_problems(scheduler) + _page_problems(scheduler.kv) + _row_problems(scheduler.kv)
    if scheduler.kv.radix is not None:
        problems += _radix_problems(scheduler.kv, scheduler.kv.radix)
    if scheduler.kv.swa is not None:
        problems += _swa_problems(scheduler.kv, scheduler.kv.swa, device_table)
    if device_table:
        problems += _device_table_problems(scheduler.kv)
    if problems:
        raise InvariantViolation("KV invariants violated:\n- " + "\n- ".join(problems))


def check_drained(scheduler: Scheduler) -> None:
    """With nothing queued or running: nothing is held, locked or fenced, and every page and row is free or
    evictable cache. Counters only, so the engine runs it every time it drains at no cost to latency (the full
    recount over a pool of ~10^6 pages and a full prefix cache takes 20-150 ms of host time)."""
    problems = _drained_problems(scheduler)
    if problems:
        raise InvariantViolation("idle engine is not clean:\n- " + "\n- ".join(problems))


def check_idle(scheduler: Scheduler) -> None:
    """check_drained, then every invariant recounted from scratch."""
    check_drained(scheduler)
    check_invariants(scheduler)


def _drained_problems(scheduler: Scheduler) -> list[str]:
    problems = []
    kv, radix = scheduler.kv, scheduler.kv.radix
    if scheduler.has_work:
        problems.append("the engine drained while requests are queued or running")
    if kv.held:
        problems.append(f"no request is running, yet owners {sorted(kv.held)} hold KV")
    if radix is not None and radix.locked_pages:
        problems.append(f"{radix.locked_pages} cached pages are still locked")
    fenced = kv.pages.num_fenced + kv.rows.num_fenced + (kv.swa.allocator.num_fenced if kv.swa is not None else 0)
    if fenced:
        problems.append(f"{fenced} pages and rows are still fenced, though no forward is in flight")
    cached = radix.total_pages if radix is not None else 0
    if kv.pages.num_free + cached != kv.pages.capacity:
        problems.append(f"free {kv.pages.num_free} + cached {cached} != total {kv.pages.capacity} pages: "
                        f"{kv.pages.capacity - kv.pages.num_free - cached} leaked")
    if kv.rows.num_free != kv.rows.capacity:
        problems.append(f"{kv.rows.capacity - kv.rows.num_free} rows are taken with no request running")
    if kv.swa is not None:
        swa_cached = radix.evictable_swa_pages + radix.locked_swa_pages if radix is not None else 0
        if kv.swa.allocator.num_free + swa_cached != kv.swa.allocator.capacity:
            problems.append(f"SWA pool: free {kv.swa.allocator.num_free} + cached {swa_cached} != total "
                            f"{kv.swa.allocator.capacity} pages")
    return problems


def _request_problems(s: Scheduler) -> list[str]:
    problems = []
    holding = s.running + ([s.chunked] if s.chunked is not None else [])
    parked = list(s.parked.values())
    places = Counter(r.rid for r in [*s.waiting, *holding, *parked])
    problems += [f"request {rid} is in {n} places at once" for rid, n in places.items() if n > 1]
    for req in s.waiting:
        if req.rid in s.kv.held:
            problems.append(f"waiting request {req.rid} holds KV")
        if req.status != ReqStatus.WAITING:
            problems.append(f"request {req.rid} is queued with status {req.status.value}")
    for req in holding:
        if req.rid not in s.kv.held:
            problems.append(f"running request {req.rid} holds no KV")
        if req.status != ReqStatus.RUNNING:
            problems.append(f"request {req.rid} is running with status {req.status.value}")
    for rid, req in s.parked.items():
        if req.rid != rid or rid not in s.kv.held or req.status != ReqStatus.TRANSFERRING:
            problems.append(f"parked request {rid} holds no KV or has status {req.status.value}")
    strays = set(s.kv.held) - {r.rid for r in holding + parked}
    problems += [f"owner {rid} holds KV but is neither running, chunked nor parked" for rid in sorted(strays)]
    return problems


def _page_problems(kv: KVCacheManager) -> list[str]:
    problems = []
    pages = kv.pages
    try:
        pages.check_consistent()
    except KVAccountingError as e:
        problems.append(str(e))
    owned = pages.owned_counts()
    for owner, held in kv.held.items():
        row_pages = kv.row_pages(owner)
        own = row_pages[held.cached_pages:]
        cached = row_pages[:held.cached_pages]
        if bool((pages.owner_of(own) != owner).any()):
            problems.append(f"owner {owner}'s row lists pages it does not own")
        if bool((pages.owner_of(cached) != CACHE).any()):
            problems.append(f"owner {owner}'s cached prefix lists pages the cache does not own")
        if owned.pop(owner, 0) != own.numel():
            problems.append(f"owner {owner} owns pages outside its row")
    cache_pages = owned.pop(CACHE, 0)
    expected_cache = kv.radix.total_pages if kv.radix is not None else 0
    if cache_pages != expected_cache:
        problems.append(f"{cache_pages} pages are owned by the cache, its tree holds {expected_cache}")
    problems += [f"{n} pages owned by {owner}, who holds no KV (leaked)" for owner, n in owned.items()]
    held_pages = sum(kv.row_pages(o).numel() - h.cached_pages for o, h in kv.held.items())
    if pages.num_free + cache_pages + held_pages != pages.capacity:
        problems.append(f"free {pages.num_free} + cached {cache_pages} + held {held_pages} != "
                        f"total {pages.capacity} pages")
    return problems


def _row_problems(kv: KVCacheManager) -> list[str]:
    problems = []
    try:
        kv.rows.check_consistent()
    except KVAccountingError as e:
        problems.append(str(e))
    for owner, held in kv.held.items():
        if int(kv.rows.owner_of(torch.tensor([held.row]))[0]) != owner:
            problems.append(f"owner {owner}'s row {held.row} is not registered to it")
    if kv.rows.capacity - kv.rows.num_free != len(kv.held):
        problems.append(f"{kv.rows.capacity - kv.rows.num_free} rows taken by {len(kv.held)} requests")
    return problems


def _radix_problems(kv: KVCacheManager, radix: RadixCache) -> list[str]:
    problems = []
    expected_locks: Counter = Counter()
    for owner, held in kv.held.items():
        if held.lock is None:
            problems.append(f"owner {owner} holds no cache lock")
            continue
        node = held.lock
        while node is not None and node is not radix.root:
            expected_locks[id(node)] += 1
            node = node.parent
        if radix.path_pages(held.lock) != kv.row_pages(owner)[:held.cached_pages].tolist():
            problems.append(f"owner {owner}'s cached prefix differs from its locked path in the tree")
    seen: Counter = Counter()
    evictable = locked = 0
    for node in radix.nodes():
        seen.update(node.pages)
        if len(node.tokens) != len(node.pages) * radix.page_size or not node.pages:
            problems.append(f"a radix node holds {len(node.tokens)} tokens for {len(node.pages)} pages")
        if node.lock_ref != expected_locks[id(node)]:
            problems.append(f"a radix node has lock count {node.lock_ref}, its holders make "
                            f"{expected_locks[id(node)]}")
        if node.lock_ref:
            locked += len(node.pages)
        else:
            evictable += len(node.pages)
    problems += [f"page {p} is in {n} radix nodes" for p, n in seen.items() if n > 1]
    nodes = sum(1 for _ in radix.nodes())
    if nodes != radix.num_nodes:
        problems.append(f"the radix tree has {nodes} nodes, its count says {radix.num_nodes}")
    offered = radix.offered()
    unseen = sum(1 for n in radix.evictable_leaves() if id(n) not in offered)
    if unseen:  # evict() would not find their pages: the pool would look fuller than it is
        problems.append(f"{unseen} unlocked radix leaves have no live entry in the eviction heap")
    if (evictable, locked) != (radix.evictable_pages, radix.locked_pages):
        problems.append(f"radix counters say {radix.evictable_pages} evictable / {radix.locked_pages} locked, "
                        f"the tree has {evictable} / {locked}")
    cache_owned = kv.pages.owner_of(torch.tensor(list(seen), dtype=torch.int64))
    if bool((cache_owned != CACHE).any()):
        problems.append("the radix tree holds pages the cache does not own")
    return problems


def _swa_problems(kv: KVCacheManager, swa: SwaPages, device_table: bool) -> list[str]:
    problems = []
    try:
        swa.allocator.check_consistent()
    except KVAccountingError as e:
        problems.append(f"SWA pool: {e}")
    full_pages = torch.arange(swa.map.numel())
    mapped = swa.map != 0
    full_owners = kv.pages.owner_of(full_pages)
    stale = mapped & ((full_owners == FREE) | (full_owners == FENCED))
    if bool(stale.any()):
        page = int(stale.nonzero()[0])
        problems.append(f"free full page {page} is still mapped to SWA page {int(swa.map[page])} (stale mapping)")
    swa_pages = swa.map[mapped]
    if swa.allocator.distinct(swa_pages) != swa_pages.numel():
        problems.append("an SWA page is mapped from two full pages")
    wrong = swa.allocator.owner_of(swa_pages) != full_owners[mapped]
    if bool(wrong.any()):
        page = int(full_pages[mapped][wrong][0])
        swa_owner = int(swa.allocator.owner_of(swa.map[page:page + 1]))
        problems.append(f"full page {page} ({describe_owner(int(full_owners[page]))}) maps to SWA page "
                        f"{int(swa.map[page])}, which is {describe_owner(swa_owner)}")
    owned = swa.allocator.owned_counts()
    held_swa = 0
    for owner, held in kv.held.items():
        own = kv.row_pages(owner)[held.cached_pages:]
        held_swa += int(swa.present(own).sum())
        if not bool(swa.present(kv.window_pages(owner)).all()):
            problems.append(f"owner {owner} lacks SWA pages inside its window")
    cached_swa = owned.get(CACHE, 0)
    if kv.radix is not None:
        nodes = list(kv.radix.nodes())
        if any(n.swa_pages != int(swa.present(torch.tensor(n.pages, dtype=torch.int64)).sum()) for n in nodes):
            problems.append("a radix node's SWA page count is wrong")
        counted = (sum(n.swa_pages for n in nodes if not n.lock_ref), sum(n.swa_pages for n in nodes if n.lock_ref))
        if counted != (kv.radix.evictable_swa_pages, kv.radix.locked_swa_pages) or sum(counted) != cached_swa:
            problems.append(f"radix SWA counters say {kv.radix.evictable_swa_pages} evictable / "
                            f"{kv.radix.locked_swa_pages} locked, the tree has {counted[0]} / {counted[1]}, the "
                            f"allocator {cached_swa} cached")
    if swa.allocator.num_free + cached_swa + held_swa != swa.allocator.capacity:
        problems.append(f"SWA pool: free {swa.allocator.num_free} + cached {cached_swa} + held {held_swa} != "
                        f"total {swa.allocator.capacity} pages")
    if device_table and not torch.equal(swa.device_map.pages.to("cpu", torch.int64), swa.map):
        problems.append("the device's full->SWA map differs from the host's")
    return problems


def _device_table_problems(kv: KVCacheManager) -> list[str]:
    problems = []
    for owner, held in kv.held.items():
        length = kv.kv_len(owner)
        positions = torch.arange(length)
        expected = kv.row_pages(owner).repeat_interleave(kv.page_size)[:length] * kv.page_size + positions % kv.page_size
        actual = kv.table.slots[held.row, :length].to("cpu", torch.int64)
        if not torch.equal(actual, expected):
            first = int((actual != expected).nonzero()[0])
            problems.append(f"owner {owner}'s device table maps position {first} to slot {int(actual[first])}, "
                            f"its pages say {int(expected[first])}")
    return problems
