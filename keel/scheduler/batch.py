"""From a scheduled step to the runner's inputs: the ForwardBatch and the SamplingBatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from keel.runner.forward_batch import NOT_IN_TREE, ForwardBatch, ForwardMode, TreeMask
from keel.runner.sampler import SamplingBatch
from keel.scheduler.req import Req
from keel.scheduler.scheduler import BatchPart, ScheduledBatch
from keel.transfer import columns_to_device


@dataclass(frozen=True)
class PendingTokens:
    """The sampled ids of a launched step the host has not read yet: still on the device."""

    token_ids: torch.Tensor  # [number of sampled parts] int64, on the device: each part's last token
    rows: dict[int, int]  # request id -> its row in token_ids
    # A verify step: [sampled parts] int64, the tokens each part may have emitted (counted in Req.pending) minus
    # those it did, by which the next step's positions shift back. None: one token each, as counted.
    shifts: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class DraftRoots:
    """Where the drafts of a step's drafted parts start (in the order of batch.sampled), on the device: the last
    token, its position, and how far the host's count of generated tokens is ahead (see PendingTokens.shifts)."""

    token_ids: torch.Tensor  # [drafted parts] int64
    positions: torch.Tensor  # [drafted parts] int64
    shifts: torch.Tensor  # [drafted parts] int64


def draft_roots(batch: ScheduledBatch, device: torch.device, pending: Optional[PendingTokens]) -> DraftRoots:
    parts = [p for p in batch.sampled if p.num_draft]
    known, pending_rows, roots = [], [], []
    for i, part in enumerate(parts):
        root = part.seq_len - part.num_draft - 1
        roots.append(root)
        if part.req.known_len > root:
            known.append((i, part.req.token_ids(root, root + 1)[0]))
        else:
            pending_rows.append((i, _pending_row(part, pending)))
    if not known and pending is not None:  # overlap scheduling's usual step: every root is a token in flight
        from_t, roots_t = columns_to_device([([r for _, r in pending_rows], torch.int64), (roots, torch.int64)],
                                            device)
        tokens = pending.token_ids[from_t]
        if pending.shifts is None:
            return DraftRoots(tokens, roots_t, torch.zeros_like(tokens))
        shifts = pending.shifts[from_t]
        return DraftRoots(tokens, roots_t - shifts, shifts)
    known_t, known_ids, at_t, from_t, roots_t = columns_to_device(
        [([i for i, _ in known], torch.int64), ([t for _, t in known], torch.int64),
         ([i for i, _ in pending_rows], torch.int64), ([r for _, r in pending_rows], torch.int64),
         (roots, torch.int64)], device)
    tokens = torch.zeros(len(parts), dtype=torch.int64, device=device)
    shifts = torch.zeros_like(tokens)
    tokens[known_t] = known_ids
    if pending_rows:
        assert pending is not None  # _pending_row checked it
        tokens[at_t] = pending.token_ids[from_t]
        if pending.shifts is not None:
            shifts[at_t] = pending.shifts[from_t]
    return DraftRoots(tokens, roots_t - shifts, shifts)


@dataclass(frozen=True)
class DraftTree:
    """The shape of each drafted part's tree of T tokens, on the device. Node 0 is the root (the part's last token),
    node i > 0 is draft token i - 1; a parent comes before its children, siblings hold distinct tokens."""

    parents: torch.Tensor  # [drafted parts, T] int64 (the root is its own parent)
    depths: torch.Tensor  # [drafted parts, T] int64 (the root's is 0)
    bits: torch.Tensor  # [drafted parts, T] int64: bit j of node i is set iff node j is i or an ancestor of it
    max_depth: int  # no node is deeper (known on the host: the draft steps)


@dataclass(frozen=True)
class DraftTokens:
    """Draft tokens proposed for a step's parts with num_draft > 0, on the device: a chain each, or a tree."""

    token_ids: torch.Tensor  # [number of drafted parts, drafts per part] int64
    rows: dict[int, int]  # request id -> its row in token_ids
    # Whether some drafts were drawn at random (a draft model sampling for a sampled request); then `probs`
    # must hold the distributions they were drawn from: [drafted parts, drafts per part, vocab] float32.
    random: bool = False
    probs: Optional[torch.Tensor] = None
    # Drafted as a tree (topk > 1): every drafted part has all the tree's tokens, each a deterministic candidate
    tree: Optional[DraftTree] = None


def build_forward_batch(batch: ScheduledBatch, device: torch.device, pending: Optional[PendingTokens] = None,
                        drafts: Optional[DraftTokens] = None,
                        slot_table: Optional[torch.Tensor] = None) -> ForwardBatch:
    """Logits rows: first those of each sampled part in order (its last token's; with drafts, also each draft
    token's), then one per prompt position owed a prompt log-prob (in the order of `prompt_logprob_rows`). A
    request whose last token is still pending (overlap scheduling) gets it from `pending` on the device, with
    no host round trip; draft tokens come from `drafts`, also on the device. After a verify step in flight, a
    request's positions, lengths and slots (read from `slot_table`, the request->token table) shift back on
    the device by what the verify did not emit; the batch's host lengths are then unknown (None)."""
    if batch.mode == ForwardMode.DECODE and (pending is None or pending.shifts is None):
        return _plain_decode_batch(batch, device, pending)
    input_ids: list[int] = []
    positions: list[int] = []
    sampled_rows: list[int] = []
    prompt_rows: list[int] = []
    fill_rows: list[int] = []  # input positions whose id comes from `pending`
    fill_from: list[int] = []
    draft_rows: list[int] = []  # input positions whose id comes from `drafts`
    draft_from: list[int] = []
    tree_roots: list[int] = []  # input position of each drafted part's root (its last token), trees only
    tree_parts: list[BatchPart] = []
    shifted_rows: list[int] = []  # tokens (and parts) whose positions shift back by a verify's unused count
    shifted_from: list[int] = []
    shifted_parts: list[int] = []
    for index, part in enumerate(batch.parts):
        start = part.seq_len - part.extend_len
        first_index = len(input_ids)
        last = part.seq_len - part.num_draft  # the request's length without its drafts
        known_end = min(last, part.req.known_len)
        input_ids += part.req.token_ids(start, known_end)
        if known_end < last:
            row = _pending_row(part, pending)
            fill_rows.append(len(input_ids))
            fill_from.append(row)
            input_ids.append(0)
            if pending is not None and pending.shifts is not None:
                shifted_rows += range(first_index, first_index + part.extend_len)
                shifted_from += [row] * part.extend_len
                shifted_parts.append(index)
        if part.num_draft:
            row = _draft_row(part, drafts)
            if drafts is not None and drafts.tree is not None:
                tree_roots.append(len(input_ids) - 1)
                tree_parts.append(part)
            draft_rows += range(len(input_ids), len(input_ids) + part.num_draft)
            draft_from += range(row, row + part.num_draft)
            input_ids += [0] * part.num_draft
        positions += range(start, part.seq_len)
        if part.samples:  # logits only where a token is sampled: not for a chunk mid-prompt
            sampled_rows += range(len(input_ids) - 1 - part.num_draft, len(input_ids))
        prompt_rows += [first_index + p - start for p in _owed_positions(part)]

    decode_layout = batch.mode == ForwardMode.TARGET_VERIFY  # one row per token, seeing the KV up to itself
    if decode_layout:
        req_rows = [p.row for p in batch.parts for _ in range(p.extend_len)]
        seq_lens = [n for p in batch.parts for n in range(p.seq_len - p.extend_len + 1, p.seq_len + 1)]
        extend_lens = [1] * len(seq_lens)
    else:
        req_rows, seq_lens = [p.row for p in batch.parts], [p.seq_len for p in batch.parts]
        extend_lens = [p.extend_len for p in batch.parts]
    slots = batch.slots
    token_req_rows = [p.row for p in batch.parts for _ in range(p.extend_len)]
    (input_ids_t, positions_t, rows_t, seq_lens_t, slots_t, logits_t, fill_rows_t, fill_from_t, draft_rows_t,
     draft_from_t, shifted_rows_t, shifted_from_t, shifted_parts_t, token_rows_t) = columns_to_device(
        [(values, torch.int64) for values in (input_ids, positions, req_rows, seq_lens, slots,
                                              sampled_rows + prompt_rows, fill_rows, fill_from, draft_rows,
                                              draft_from, shifted_rows, shifted_from, shifted_parts,
                                              token_req_rows if shifted_rows else [])], device)
    if fill_rows:
        assert pending is not None  # _pending_row checked it
        input_ids_t[fill_rows_t] = pending.token_ids[fill_from_t]
    if shifted_rows:
        assert pending is not None and pending.shifts is not None and slot_table is not None
        shift = pending.shifts[shifted_from_t]
        positions_t[shifted_rows_t] -= shift
        if decode_layout:
            seq_lens_t[shifted_rows_t] -= shift
        else:
            seq_lens_t[shifted_parts_t] -= pending.shifts[fill_from_t]
        slots_t[shifted_rows_t] = slot_table[token_rows_t[shifted_rows_t], positions_t[shifted_rows_t]].to(torch.int64)
    if draft_rows:
        assert drafts is not None  # _draft_row checked it
        input_ids_t[draft_rows_t] = drafts.token_ids.reshape(-1)[draft_from_t]
    tree = None
    if tree_parts:
        assert drafts is not None and drafts.tree is not None
        tree = _tree_mask(tree_parts, tree_roots, drafts, positions_t, device)
    return ForwardBatch(
        mode=batch.mode,
        device=device,
        seq_lens_cpu=None if shifted_rows else tuple(seq_lens),
        extend_lens_cpu=tuple(extend_lens),
        input_ids=input_ids_t,
        positions=positions_t,
        req_rows=rows_t,
        seq_lens=seq_lens_t,
        out_cache_loc=slots_t,
        logits_indices=logits_t,
        tree=tree,
    )


def _plain_decode_batch(batch: ScheduledBatch, device: torch.device, pending: Optional[PendingTokens]) -> ForwardBatch:
    """build_forward_batch for the most common step, in a few list passes: one token per part, each sampled, no
    drafts, no prompt positions owed, no shifts; a part's token comes from `pending` when the host lacks it."""
    parts = batch.parts
    seq_lens = [p.seq_len for p in parts]
    input_ids = [0] * len(parts)
    fill_rows, fill_from = [], []
    for i, part in enumerate(parts):
        if part.req.known_len >= part.seq_len:
            input_ids[i] = part.req.token_ids(part.seq_len - 1, part.seq_len)[0]
        else:
            fill_rows.append(i)
            fill_from.append(_pending_row(part, pending))
    input_ids_t, positions_t, rows_t, seq_lens_t, slots_t, logits_t, fill_rows_t, fill_from_t = columns_to_device(
        [(input_ids, torch.int64), ([n - 1 for n in seq_lens], torch.int64), ([p.row for p in parts], torch.int64),
         (seq_lens, torch.int64), (batch.slots, torch.int64), (range(len(parts)), torch.int64),
         (fill_rows, torch.int64), (fill_from, torch.int64)], device)
    if fill_rows:
        assert pending is not None  # _pending_row checked it
        input_ids_t[fill_rows_t] = pending.token_ids[fill_from_t]
    return ForwardBatch(mode=batch.mode, device=device, seq_lens_cpu=tuple(seq_lens),
                        extend_lens_cpu=(1,) * len(parts), input_ids=input_ids_t, positions=positions_t,
                        req_rows=rows_t, seq_lens=seq_lens_t, out_cache_loc=slots_t, logits_indices=logits_t,
                        tree=None)


def _tree_mask(parts: list[BatchPart], roots: list[int], drafts: DraftTokens, positions: torch.Tensor,
               device: torch.device) -> TreeMask:
    """The tree mask of a batch whose drafted parts carry trees; also sets each tree token's position (its root's
    plus its depth: the table positions of a tree's tokens are in node order, not depth order)."""
    assert drafts.tree is not None
    size = drafts.tree.depths.shape[1]
    if any(p.num_draft != size - 1 for p in parts):
        raise ValueError(f"a draft tree has {size} tokens, but a part was scheduled "
                         f"{[p.num_draft for p in parts]} drafts")
    tokens, tree_rows, roots_t = columns_to_device(
        [([r + i for r in roots for i in range(size)], torch.int64),
         ([drafts.rows[p.req.rid] for p in parts], torch.int64), (roots, torch.int64)], device)
    root_positions = positions[roots_t]  # on the device: shifted back after a verify in flight
    starts = torch.full_like(positions, NOT_IN_TREE)
    bits = torch.zeros_like(positions)
    starts[tokens] = root_positions.repeat_interleave(size)
    bits[tokens] = drafts.tree.bits[tree_rows].reshape(-1)
    positions[tokens] = (root_positions[:, None] + drafts.tree.depths[tree_rows]).reshape(-1)
    return TreeMask(starts, bits)


def _pending_row(part: BatchPart, pending: Optional[PendingTokens]) -> int:
    """The row in `pending` of the one token `part` needs that the host does not know yet: its last (a decode
    part's root, drafts aside), which the step in flight sampled."""
    rid = part.req.rid
    if part.extend_len != 1 + part.num_draft or pending is None or rid not in pending.rows:
        raise ValueError(f"request {rid} needs tokens [{part.req.known_len}, {part.seq_len - part.num_draft}) that "
                         "are neither known on the host nor pending from the step in flight")
    return pending.rows[rid]


def _draft_row(part: BatchPart, drafts: Optional[DraftTokens]) -> int:
    """Where `part`'s draft tokens start in drafts.token_ids, flattened."""
    if drafts is None or part.req.rid not in drafts.rows or part.num_draft > drafts.token_ids.shape[1]:
        raise ValueError(f"request {part.req.rid} was scheduled {part.num_draft} draft tokens that were not proposed")
    return drafts.rows[part.req.rid] * drafts.token_ids.shape[1]


def prompt_logprob_rows(batch: ScheduledBatch) -> list[tuple[Req, range]]:
    """For each part owed prompt log-probs: the request and the prompt positions this step scores."""
    return [(part.req, positions) for part in batch.parts if (positions := _owed_positions(part))]


def _owed_positions(part: BatchPart) -> range:
    if part.req.params.prompt_logprobs is None:  # most requests: no arithmetic per part and step
        return range(0)
    owed = part.req.prompt_logprob_positions
    start = max(owed.start, part.seq_len - part.extend_len)
    return range(start, max(start, min(owed.stop, part.seq_len)))


def build_sampling_batch(reqs: list[Req], vocab_size: int, device: torch.device,
                         step_offsets: Optional[list[int]] = None) -> SamplingBatch:
    """One row per entry of `reqs` (a request may fill several: a speculative step samples each drafted
    position); a row samples output token num_generated + its step offset (0 by default). Penalties are left
    out: their counts live on the device (keel.runner.penalties), and launch_step adds them."""
    params = [r.params for r in reqs]
    offsets = step_offsets if step_offsets is not None else [0] * len(reqs)

    greedy = [p.is_greedy for p in params]
    greedy_t, temperatures, top_ks, top_ps, min_ps, seeds, steps = columns_to_device([
        (greedy, torch.bool),
        ([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
        ([p.top_k or vocab_size for p in params], torch.int64),
        ([p.top_p for p in params], torch.float32),
        ([p.min_p for p in params], torch.float32),
        ([r.seed % 2**63 for r in reqs], torch.int64),
        ([r.num_generated + o for r, o in zip(reqs, offsets)], torch.int64)], device)
    return SamplingBatch(
        greedy=greedy_t, temperatures=temperatures, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps, seeds=seeds,
        steps=steps,
        penalties=None,
        all_greedy=all(greedy),
        needs_filter=any(p.top_k is not None or p.top_p < 1.0 or p.min_p > 0.0 for p in params),
        num_top_logprobs=max(p.top_logprobs for p in params),
        wants_logprobs=any(p.wants_logprobs for p in params),
    )

