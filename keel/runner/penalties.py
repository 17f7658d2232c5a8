"""Penalty counts on the device: per running penalised request, how often each token occurs in its output and
which tokens it has seen (prompt or output).

The sampler's repetition, frequency and presence penalties read these every step. Built on the host from the
output ids, they needed the previous step's token read back before the next step could be built, which turned
overlap scheduling off for the whole batch (and copied [rows, vocab] tensors to the device every step). Kept here,
the step that samples a token adds it on the device, in stream order, and the next step reads the counts without
the host knowing the token yet. A request gets a slot the first time it samples and keeps it while it runs; the
slot is rebuilt from the host's output ids whenever it may not match them: a new request, a reused request id,
or a step that failed after counting its token (its requests are retracted and sample that token again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.runner.sampler import PenaltyInputs
from keel.scheduler.req import Req, ReqStatus
from keel.transfer import columns_to_device, to_device

_NEUTRAL = 0  # slot 0 stays all zeros: the rows of requests without penalties read it


@dataclass
class _Slot:
    req: Req
    index: int
    counted: int  # output tokens its counts hold


@dataclass(frozen=True)
class CountedRows:
    """One step's penalised sampling rows, as `inputs` put them on the device, for `count` to add their tokens."""

    rows: torch.Tensor  # [m] int64 sampling rows of penalised requests
    index: torch.Tensor  # [m] int64 their slots
    slots: tuple[_Slot, ...]


def initial_counts(req: Req, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host [vocab] int32 occurrences of each token in `req`'s output read so far, and [vocab] bool tokens seen in
    its prompt or output; raises IndexError for a token id outside the vocabulary."""
    output = torch.tensor(req.output_ids, dtype=torch.int64)
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[torch.tensor(req.prompt_ids, dtype=torch.int64)] = True
    seen[output] = True
    return torch.bincount(output, minlength=vocab_size).to(torch.int32), seen


class PenaltyCounts:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._slots: dict[int, _Slot] = {}  # by request id
        self._free: list[int] = []
        # grown by doubling as penalised requests arrive: a slot is 5 bytes per vocabulary entry
        self.counts = torch.zeros(1, vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        """Requests holding a slot."""
        return len(self._slots)

    def inputs(self, reqs: list[Req]) -> tuple[PenaltyInputs, CountedRows]:
        """The penalty inputs of a sampling batch with one row per entry of `reqs` (rows of requests without
        penalties get neutral ones), and its penalised rows for `count`; all in one copy to the device."""
        penalised = [(i, self._slot(r)) for i, r in enumerate(reqs) if r.params.has_penalties]
        index = [_NEUTRAL] * len(reqs)
        for i, slot in penalised:
            index[i] = slot.index
        params = [r.params for r in reqs]
        index_t, repetition, frequency, presence, rows_t, slots_t = columns_to_device(
            [(index, torch.int64), ([p.repetition_penalty for p in params], torch.float32),
             ([p.frequency_penalty for p in params], torch.float32),
             ([p.presence_penalty for p in params], torch.float32),
             ([i for i, _ in penalised], torch.int64), ([s.index for _, s in penalised], torch.int64)], self.device)
        inputs = PenaltyInputs(repetition=repetition, frequency=frequency, presence=presence,
                               output_counts=self.counts[index_t].to(torch.float32), seen=self.seen[index_t])
        return inputs, CountedRows(rows_t, slots_t, tuple(s for _, s in penalised))

    def count(self, counted: CountedRows, row_tokens: torch.Tensor) -> None:
        """Add the token each penalised row sampled (`row_tokens`: [rows], on the device) to its slot."""
        tokens = row_tokens[counted.rows]
        self.counts.index_put_((counted.index, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        self.seen[counted.index, tokens] = True
        for slot in counted.slots:
            slot.counted += 1

    def free_finished(self) -> None:
        """Free the slots of finished requests (a step still in flight may count into one: stream order puts
        that before whatever the slot's next request writes there)."""
        for rid in [rid for rid, slot in self._slots.items() if slot.req.status is ReqStatus.FINISHED]:
            self._free.append(self._slots.pop(rid).index)

    def _slot(self, req: Req) -> _Slot:
        slot = self._slots.get(req.rid)
        if slot is not None and slot.req is req and slot.counted == req.num_generated:
            return slot
        if req.pending:
            raise ValueError(f"request {req.rid} uses penalties and its counts do not match its output "
                             f"({slot.counted if slot else 'none'} counted of {req.num_generated}), which has "
                             "tokens still on the device")
        index = slot.index if slot is not None else self._take()
        counts, seen = initial_counts(req, self.vocab_size)
        self.counts[index] = to_device(counts, torch.int32, self.device)
        self.seen[index] = to_device(seen, torch.bool, self.device)
        slot = self._slots[req.rid] = _Slot(req, index, len(req.output_ids))
        return slot

    def _take(self) -> int:
        if not self._free:
            size = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
            self._free = list(range(2 * size - 1, size - 1, -1))
        return self._free.pop()
