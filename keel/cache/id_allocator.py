"""OwnedIdAllocator: hands out integer ids (KV pages, request-table rows) and records who owns each.

DESIGN rule "one owner, one release path": every id is free, reserved, or owned by exactly one
owner. Freeing an id that is free, reserved, or owned by someone else raises, naming both
owners; freeing the same id twice in one call raises too. All operations are vectorized over
the ids (host tensors, no per-id Python loops). Id 0 is reserved: it is the harmless target of
padded writes.

Reuse fence (overlap scheduling): while a forward may still be running on the device, the host
already frees what finished requests held. Such ids are fenced, not free: they carry the event
recorded after the latest launched forward and go back on the free list only once it has fired,
so no id is handed out while a forward that reads it is unfinished. They count as available
(an allocation that needs them waits for the event).
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Protocol, Union

import torch

FREE = 0
RESERVED = -1
CACHE = -2  # the radix prefix cache, once a request hands its pages over
FENCED = -3  # freed while a forward that may read it was in flight


class FenceEvent(Protocol):
    """What the fence needs of a device event (torch.cuda.Event has both)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class KVAccountingError(RuntimeError):
    """A page or row was freed or handed out in a way that breaks single ownership."""


def describe_owner(owner: int) -> str:
    if owner == FREE:
        return "free"
    if owner == RESERVED:
        return "reserved"
    if owner == CACHE:
        return "the prefix cache"
    if owner == FENCED:
        return "freed, waiting for a forward in flight"
    return f"owner {owner}"


class OwnedIdAllocator:
    def __init__(self, size: int, what: str) -> None:
        if size < 2:
            raise ValueError(f"{what} allocator needs at least 2 ids (id 0 is reserved), got {size}")
        self.what = what
        self.size = size
        self._owner = torch.zeros(size, dtype=torch.int64)
        self._owner[0] = RESERVED
        # Free ids as a stack; low ids are handed out first.
        self._free = torch.arange(size - 1, 0, -1, dtype=torch.int64)
        self._num_free = size - 1
        self.fence: Optional[FenceEvent] = None  # fires when the latest launched forward has finished
        self._fenced: deque[tuple[FenceEvent, torch.Tensor]] = deque()
        self._num_fenced = 0

    @property
    def num_free(self) -> int:
        """Ids that can be handed out: free ones, and fenced ones (after waiting for their forward)."""
        return self._num_free + self._num_fenced

    @property
    def num_fenced(self) -> int:
        return self._num_fenced

    def reclaim(self, wait: bool = False) -> None:
        """Return fenced ids whose forward has finished to the free list; with `wait`, all of them."""
        while self._fenced:
            event, ids = self._fenced[0]
            if not event.query():
                if not wait:
                    return
                event.synchronize()
            self._fenced.popleft()
            self._num_fenced -= ids.numel()
            self._push_free(ids)

    @property
    def capacity(self) -> int:
        return self.size - 1

    def alloc(self, owners: torch.Tensor) -> Optional[torch.Tensor]:
        """One id per entry of `owners` (int64, each > 0); None, with nothing taken, if too few are free."""
        n = owners.numel()
        if n > self.num_free:
            return None
        if n > self._num_free:
            self.reclaim()
        if n > self._num_free:
            self.reclaim(wait=True)  # the ids are there once the forward reading them is done
        if n and int(owners.min()) <= FREE:
            raise KVAccountingError(f"{self.what} owners must be positive ids, got {owners.min().item()}")
        # lowest first: ids freed by different owners meet again as consecutive runs, and a disaggregated server's
        # KV transfer sends one descriptor per run of pages (docs/disaggregation.md: a simulated churn of 4,096
        # pages handed out 1.5 pages a run in stack order, 9 sorted)
        ids = self._free[self._num_free - n:self._num_free].sort().values
        self._num_free -= n
        taken = self._owner[ids]
        if bool((taken != FREE).any()):
            bad = int(ids[taken != FREE][0])
            raise KVAccountingError(
                f"{self.what} {bad} was on the free list but is {describe_owner(int(self._owner[bad]))}")
        self._owner[ids] = owners
        return ids

    def free(self, ids: torch.Tensor, owner: Union[int, torch.Tensor]) -> None:
        """Return `ids` (owned by `owner`, or each by its entry of an `owner` tensor) to the free list; raises
        without freeing anything if any is not."""
        ids = self._check_owned(ids, owner, "free")
        if ids.numel() == 0:
            return
        if self.fence is not None and not self.fence.query():
            self._owner[ids] = FENCED
            self._fenced.append((self.fence, ids))
            self._num_fenced += ids.numel()
            return
        self._push_free(ids)

    def _push_free(self, ids: torch.Tensor) -> None:
        self._owner[ids] = FREE
        self._free[self._num_free:self._num_free + ids.numel()] = ids
        self._num_free += ids.numel()

    def transfer(self, ids: torch.Tensor, owner: int, new_owner: int) -> None:
        """Hand `ids` from `owner` to `new_owner` (e.g. a finished request's pages to the prefix cache)."""
        ids = self._check_owned(ids, owner, "transfer")
        self._owner[ids] = new_owner

    def _check_owned(self, ids: torch.Tensor, owner: Union[int, torch.Tensor], action: str) -> torch.Tensor:
        """`ids` as int64 after checking each is owned by `owner` (or by its entry of an owner tensor), once;
        raises naming the first that is not."""
        ids = ids.to(torch.int64)
        if ids.numel() == 0:
            return ids
        first_owner = int(owner[0]) if isinstance(owner, torch.Tensor) else owner
        if int(ids.min()) < 0 or int(ids.max()) >= self.size:
            raise KVAccountingError(f"{describe_owner(first_owner)} tried to {action} {self.what} ids outside "
                                    f"[0, {self.size}): {ids.tolist()}")
        actual = self._owner[ids]
        wrong = actual != owner
        if bool(wrong.any()):
            index = int(wrong.nonzero()[0])
            bad, holder = int(ids[index]), int(actual[index])
            claimant = int(owner[index]) if isinstance(owner, torch.Tensor) else owner
            kind = "double" if holder in (FREE, FENCED) else "foreign"
            raise KVAccountingError(f"{kind} {action}: {describe_owner(claimant)} tried to {action} {self.what} "
                                    f"{bad}, which is {describe_owner(holder)}")
        if torch.unique(ids).numel() != ids.numel():
            raise KVAccountingError(f"double {action}: {describe_owner(first_owner)} named a {self.what} twice in "
                                    "one call")
        return ids

    def owner_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self._owner[ids.to(torch.int64)]

    def owned_counts(self) -> dict[int, int]:
        """{owner: number of ids it holds}, reserved, free and fenced ids excluded."""
        owned = self._owner[(self._owner != FREE) & (self._owner != RESERVED) & (self._owner != FENCED)]
        values, counts = torch.unique(owned, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    def distinct(self, ids: torch.Tensor) -> int:
        """How many different ids `ids` holds: O(size) marks rather than a sort (a pool has ~10^6 ids, and an idle
        engine checks it every time it drains)."""
        marks = torch.zeros(self.size, dtype=torch.bool)
        marks[ids] = True
        return int(marks.sum())

    def check_consistent(self) -> None:
        """The free list and the owner table describe the same set of free ids."""
        free_ids = self._free[:self._num_free]
        if bool((self._owner[free_ids] != FREE).any()) or self.distinct(free_ids) != self._num_free:
            raise KVAccountingError(f"{self.what} free list disagrees with the owner table")
        if int((self._owner == FREE).sum()) != self._num_free:
            raise KVAccountingError(f"{self.what}: {int((self._owner == FREE).sum())} ids marked free, "
                                    f"{self._num_free} on the free list")
        fenced = torch.cat([ids for _, ids in self._fenced]) if self._fenced else torch.zeros(0, dtype=torch.int64)
        if (bool((self._owner[fenced] != FENCED).any()) or self.distinct(fenced) != self._num_fenced
                or int((self._owner == FENCED).sum()) != self._num_fenced):
            raise KVAccountingError(f"{self.what}: the fenced ids disagree with the owner table")
