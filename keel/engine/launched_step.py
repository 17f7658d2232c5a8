"""LaunchedStep: a step whose forward and sampling are queued on the device, its results on their way.

Launching does all of a step's device work (forward, sampling, prompt log-probs) and starts copying
the results to pinned host buffers behind one event; reading them waits only for that event. In
between, the host is free to schedule and launch the next step (overlap scheduling), which takes
the sampled ids it needs from `pending` on the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Optional

import torch

from keel.debug.guards import guard_on
from keel.engine.outputs import TokenLogprob
from keel.engine.phases import step_phase
from keel.grammar import apply_bitmask, fill_bitmask
from keel.runner.model_runner import ModelRunner
from keel.runner.penalties import PenaltyCounts
from keel.runner.sampler import SamplingBatch
from keel.scheduler.batch import (DraftTokens, DraftTree, PendingTokens, build_forward_batch,
                                  build_sampling_batch, draft_roots, prompt_logprob_rows)
from keel.scheduler.req import Req
from keel.scheduler.scheduler import BatchPart, ScheduledBatch
from keel.runner.forward_batch import ForwardBatch
from keel.spec.drafter import Drafter, TargetStep
from keel.spec.verify import Verified, verify, verify_tree
from keel.transfer import columns_to_device, to_device, to_host


@dataclass(frozen=True)
class TopLogprobs:
    """Host copies (valid once the step's event fired) of chosen-token log-probs and the top alternatives."""

    chosen: torch.Tensor  # [n] float32
    top_ids: Optional[torch.Tensor]  # [n, k] int64
    top_values: Optional[torch.Tensor]  # [n, k] float32

    def to_list(self, token_ids: list[int]) -> list[TokenLogprob]:
        chosen = self.chosen.tolist()
        if self.top_ids is None or self.top_values is None:
            return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
        top = [tuple(zip(ids, lps)) for ids, lps in zip(self.top_ids.tolist(), self.top_values.tolist())]
        return [TokenLogprob(t, lp, alts) for t, lp, alts in zip(token_ids, chosen, top)]


@dataclass(frozen=True)
class PromptScores:
    rows: list[tuple[Req, range]]  # per request owed prompt log-probs, the positions this step scored
    targets: list[int]  # the prompt token each scored position predicts
    logprobs: TopLogprobs


@dataclass(frozen=True)
class StepResults:
    token_ids: list[list[int]]  # per sampled part: its token (speculative: accepted drafts, then one more)
    logprobs: Optional[list[list[TokenLogprob]]]  # per sampled part, one per token, when any request asked
    device_wait_s: float = 0.0  # how long the host waited for the device to finish the step


@dataclass(frozen=True)
class LaunchedStep:
    batch: ScheduledBatch
    pending: Optional[PendingTokens]  # the sampled ids, on the device; None when nothing was sampled or verified
    token_ids: Optional[torch.Tensor]  # host copy of the token of each sampled row
    counts: Optional[torch.Tensor]  # host copy of the tokens each sampled part keeps; None: one each
    logprobs: Optional[TopLogprobs]  # of each sampled row
    prompt_scores: Optional[PromptScores]
    done: Optional[torch.cuda.Event]  # fires when every result above is on the host; None off CUDA
    # The next step cannot be built before these tokens are known: a grammar's matcher must take them before
    # it can mask the next token (penalties count them on the device: keel.runner.penalties).
    needs_host_tokens: bool = False

    def read(self) -> StepResults:
        """Wait for the results and append prompt log-probs to their requests; returns the sampled tokens."""
        waited = 0.0
        if self.done is not None:
            start = time.perf_counter()
            self.done.synchronize()
            waited = time.perf_counter() - start
        if self.prompt_scores is not None:
            _append_prompt_logprobs(self.prompt_scores)
        if self.token_ids is None:
            return StepResults([], None, waited)
        rows = self.token_ids.tolist()
        logprobs = self.logprobs.to_list(rows) if self.logprobs is not None else None
        if self.counts is None:  # not a verify: one row, one token per sampled part
            return StepResults([[t] for t in rows], [[lp] for lp in logprobs] if logprobs is not None else None,
                               waited)
        starts, counts = _row_starts(self.batch.sampled), self.counts.tolist()
        token_ids = [rows[start:start + count] for start, count in zip(starts, counts)]
        if logprobs is None:
            return StepResults(token_ids, None, waited)
        return StepResults(token_ids, [logprobs[start:start + count] for start, count in zip(starts, counts)], waited)


@dataclass(frozen=True)
class _Drawn:
    """A step's sampled or verified tokens: on the device for the next step, on their way to the host."""

    pending: PendingTokens
    row_tokens: torch.Tensor  # each sampled row's token, on the device
    token_ids: torch.Tensor  # host copy of row_tokens
    counts_device: Optional[torch.Tensor]  # a verify's count of tokens each part keeps; None: one each
    counts: Optional[torch.Tensor]  # its host copy
    logprobs: Optional[TopLogprobs]
    verified: Optional[Verified]
    needs_host_tokens: bool


@torch.inference_mode()
def launch_step(runner: ModelRunner, batch: ScheduledBatch, vocab_size: int, previous: Optional[PendingTokens],
                penalties: PenaltyCounts, drafter: Optional[Drafter] = None) -> LaunchedStep:
    """Queue `batch`'s forward, sampling and prompt scoring; `previous` holds the ids of the step before it
    when the host has not read them yet. With a drafter, parts with num_draft > 0 get their draft tokens from it
    and are verified; the drafter also sees the target's forward (a draft model writes its KV for it)."""
    drafts = None
    if drafter is not None and any(p.num_draft for p in batch.sampled):
        with step_phase("draft"):
            drafts = drafter.propose(batch, draft_roots(batch, runner.device, previous))
    with step_phase("forward"):
        table = runner.req_table.slots if runner.req_table is not None else None
        forward_batch = build_forward_batch(batch, runner.device, previous, drafts, table)
        output = runner.forward_full(forward_batch)
    num_rows = sum(1 + p.num_draft for p in batch.sampled)
    drawn = None
    if batch.sampled:
        with step_phase("sample"):
            drawn = _draw(runner, batch, forward_batch, output.logits[:num_rows], vocab_size, previous, penalties,
                          drafts)
    if drafter is not None:
        with step_phase("observe"):
            path = drawn.verified.path if drawn is not None and drawn.verified is not None else None
            view, index = (forward_batch, None) if path is None else _committed_view(batch, forward_batch, path)
            drafter.observe(_target_step(batch, view, index, path, output.features,
                                         drawn.row_tokens if drawn else None, drawn.counts_device if drawn else None)
                            if drafter.reads_target_features else TargetStep(view))
    prompt_scores = _score_prompts(batch, output.logits[num_rows:])
    done = None
    if runner.device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    if drawn is None:
        return LaunchedStep(batch, None, None, None, None, prompt_scores, done)
    return LaunchedStep(batch, drawn.pending, drawn.token_ids, drawn.counts, drawn.logprobs, prompt_scores, done,
                        drawn.needs_host_tokens)


def _draw(runner: ModelRunner, batch: ScheduledBatch, forward_batch: ForwardBatch, logits: torch.Tensor,
          vocab_size: int, previous: Optional[PendingTokens], penalties: PenaltyCounts,
          drafts: Optional[DraftTokens]) -> _Drawn:
    """Sample the batch's sampled rows (`logits`), or verify their drafts."""
    parts = batch.sampled
    reqs = [p.req for p in parts for _ in range(1 + p.num_draft)]
    offsets = [i for p in parts for i in range(1 + p.num_draft)]
    sampling = build_sampling_batch(reqs, vocab_size, runner.device, offsets)
    counted = None
    if any(r.params.has_penalties for r in reqs):
        penalty_inputs, counted = penalties.inputs(reqs)
        sampling = dataclasses.replace(sampling, penalties=penalty_inputs)
    grammars = [r.grammar for r in reqs]
    needs_host_tokens = any(g is not None for g in grammars)
    if previous is not None and previous.shifts is not None:  # a verify in flight: fewer generated than counted
        sampling = dataclasses.replace(sampling, steps=sampling.steps - _row_shifts(parts, previous))
    if drafts is None:
        bitmask = fill_bitmask(grammars, logits.shape[-1])  # while the forward runs
        if bitmask is not None:
            apply_bitmask(logits, bitmask)
        sampled = runner.sample(logits, sampling)
        logprobs = None
        if sampled.logprobs is not None:
            logprobs = _host_top(sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
        drawn = _Drawn(PendingTokens(sampled.token_ids, {r.rid: i for i, r in enumerate(reqs)}), sampled.token_ids,
                       to_host(sampled.token_ids), None, None, logprobs, None, needs_host_tokens)
    else:
        verified = _verify(logits, sampling, parts, drafts)
        if verified.path is not None:
            _move_accepted_kv(runner, batch, forward_batch, verified.path)
        logprobs = None
        if sampling.wants_logprobs:
            rows = logits if verified.source_rows is None else logits[verified.source_rows]
            logprobs = _row_logprobs(rows, verified.row_tokens, sampling.num_top_logprobs)
        drawn = _Drawn(_pending_after_verify(parts, verified, runner.device), verified.row_tokens,
                       to_host(verified.row_tokens), verified.counts, to_host(verified.counts), logprobs, verified,
                       needs_host_tokens)
    if counted is not None:
        penalties.count(counted, drawn.row_tokens)
    return drawn


def _row_shifts(parts: list[BatchPart], previous: PendingTokens) -> torch.Tensor:
    """Per sampling row of `parts`, how many tokens the verify in flight emitted less than its request counts."""
    assert previous.shifts is not None
    rows = [previous.rows.get(p.req.rid, -1) for p in parts for _ in range(1 + p.num_draft)]  # (-1: none)
    rows_t = to_device(rows, torch.int64, previous.shifts.device)  # (a device repeat count would make the host wait)
    return torch.where(rows_t >= 0, previous.shifts[rows_t.clamp(min=0)], 0)


def _pending_after_verify(parts: list[BatchPart], verified: Verified, device: torch.device) -> PendingTokens:
    """A verify step's results as the next step reads them before the host does: each part's last token, and how
    many fewer tokens than counted (1 + its drafts) it emitted."""
    starts, launched = columns_to_device([(_row_starts(parts), torch.int64),
                                          ([1 + p.num_draft for p in parts], torch.int64)], device)
    last = verified.row_tokens[starts + verified.counts - 1]
    return PendingTokens(last, {p.req.rid: i for i, p in enumerate(parts)}, launched - verified.counts)


def _row_starts(sampled: list[BatchPart]) -> list[int]:
    """Where each sampled part's logits rows begin: its last token's, then one per draft token."""
    return list(itertools.accumulate((1 + p.num_draft for p in sampled), initial=0))[:-1]


def _target_step(batch: ScheduledBatch, view: ForwardBatch, index: Optional[torch.Tensor],
                 path: Optional[torch.Tensor], features: Optional[torch.Tensor], row_tokens: Optional[torch.Tensor],
                 counts: Optional[torch.Tensor]) -> TargetStep:
    """The target's step as an EAGLE head reads it, over `view` (the forward's tokens, or with trees the accepted
    paths', `index` giving their tokens in the forward): each token's successor (the next input token within a
    part, the drawn token after a sampled row, the next prompt token after a chunk) and each sampled part's last
    committed token (its accepted drafts' last, or its last input token)."""
    device = view.device
    lengths = _view_lengths(batch, path)
    ends = list(itertools.accumulate(lengths))
    chunk_ends = [(end - 1, p.req.token_ids(p.seq_len, p.seq_len + 1)[0]) for p, end in zip(batch.parts, ends)
                  if not p.samples]
    sampled = [(p, end, n) for p, end, n in zip(batch.parts, ends, lengths) if p.samples]
    emitted = [n if p.num_draft else 1 for p, _, n in sampled]  # each sampled part's rows in the view
    view_rows = [end - e + i for (_, end, _), e in zip(sampled, emitted) for i in range(e)]
    token_rows = [start + i for start, e in zip(_row_starts(batch.sampled), emitted) for i in range(e)]
    chunk_rows, chunk_tokens, view_rows_t, token_rows_t, first_t, req_rows = columns_to_device(
        [([r for r, _ in chunk_ends], torch.int64), ([t for _, t in chunk_ends], torch.int64),
         (view_rows, torch.int64), (token_rows, torch.int64),
         (list(itertools.accumulate(emitted, initial=0))[:-1], torch.int64),
         ([p.row for p in batch.sampled], torch.int64)], device)
    last = first_t + (counts - 1 if counts is not None else 0)
    if features is not None and index is not None:
        features = features[index]
    reqs = tuple(p.req for p in batch.sampled)
    if (row_tokens is not None and row_tokens.shape[0] == view.num_tokens
            and view_rows == token_rows == list(range(view.num_tokens))):
        # every token is the sampled row of the same index (a verify of drafted chains only): its successor is its
        # draw
        return TargetStep(view, features, row_tokens, last, req_rows, reqs)
    next_ids = torch.roll(view.input_ids, -1)
    if row_tokens is not None:
        next_ids[view_rows_t] = row_tokens[token_rows_t]
    next_ids[chunk_rows] = chunk_tokens
    return TargetStep(view, features, next_ids, view_rows_t[last], req_rows, reqs)


def _view_lengths(batch: ScheduledBatch, path: Optional[torch.Tensor]) -> list[int]:
    """Tokens of each part in the committed view: a drafted tree's accepted path is at most its depth + 1."""
    if path is None:
        return [p.extend_len for p in batch.parts]
    return [path.shape[1] if p.num_draft else p.extend_len for p in batch.parts]


def _root_tokens(batch: ScheduledBatch) -> list[int]:
    """Each sampled part's last committed token (its drafts' root), as a token index of the forward."""
    ends = itertools.accumulate(p.extend_len for p in batch.parts)
    return [end - 1 - p.num_draft for p, end in zip(batch.parts, ends) if p.samples]


def _move_accepted_kv(runner: ModelRunner, batch: ScheduledBatch, forward_batch: ForwardBatch,
                      path: torch.Tensor) -> None:
    """Trees: the target's KV of each accepted path, written where its nodes sat, moved to the positions after the
    root, where the next steps read it (the slots of the other nodes go back with the rejected drafts)."""
    drafted = [(i, root) for i, (p, root) in enumerate(zip(batch.sampled, _root_tokens(batch))) if p.num_draft]
    if not drafted or runner.kv_pool is None:
        return
    parts, roots = columns_to_device([([i for i, _ in drafted], torch.int64), ([r for _, r in drafted], torch.int64)],
                                     runner.device)
    depth = torch.arange(1, path.shape[1], device=runner.device)
    slots = forward_batch.out_cache_loc
    runner.kv_pool.copy_slots(slots[roots[:, None] + path[parts, 1:]], slots[roots[:, None] + depth])


def _committed_view(batch: ScheduledBatch, forward_batch: ForwardBatch,
                    path: torch.Tensor) -> tuple[ForwardBatch, torch.Tensor]:
    """The forward as if it had run only what it committed: each drafted tree's root and accepted path, at the
    positions and slots after the root (the KV a drafter must mirror), with the path's tokens (junk past its end,
    in slots freed with the rejected drafts). Returns it and, per token, its token index in the forward."""
    lengths = _view_lengths(batch, path)
    base: list[int] = []  # each view token's positional token index in the forward (a path: its root's and after)
    tree_rows: list[int] = []  # view rows of drafted paths
    token_start = 0
    for part, length in zip(batch.parts, lengths):
        if part.num_draft:
            tree_rows += range(len(base), len(base) + length)
        base += range(token_start, token_start + length)  # a drafted part's root is its first token
        token_start += part.extend_len
    device = forward_batch.device
    drafted = [i for i, p in enumerate(batch.sampled) if p.num_draft]
    roots = [r for r, p in zip(_root_tokens(batch), batch.sampled) if p.num_draft]
    cuts = [p.extend_len - n for p, n in zip(batch.parts, lengths)]  # rejected nodes past each part's path
    base_t, tree_rows_t, drafted_t, roots_t, cut_t = columns_to_device(
        [(base, torch.int64), (tree_rows, torch.int64), (drafted, torch.int64), (roots, torch.int64),
         (cuts, torch.int64)], device)
    index = base_t.clone()
    index[tree_rows_t] = (roots_t[:, None] + path[drafted_t]).reshape(-1)
    positions = forward_batch.positions[base_t]  # a path's: its root's and the next ones (not its nodes' depths)
    positions[tree_rows_t] = (forward_batch.positions[roots_t][:, None] + torch.arange(path.shape[1], device=device)
                              ).reshape(-1)
    if forward_batch.mode.is_decode:  # a row per token, each seeing the keys up to itself
        seq_lens = None if forward_batch.seq_lens_cpu is None else tuple(forward_batch.seq_lens_cpu[i] for i in base)
        extend_lens, req_rows, seq_lens_t = (1,) * len(base), forward_batch.req_rows[base_t], positions + 1
    else:
        seq_lens = None if forward_batch.seq_lens_cpu is None else tuple(
            s - c for s, c in zip(forward_batch.seq_lens_cpu, cuts))
        extend_lens, req_rows, seq_lens_t = tuple(lengths), forward_batch.req_rows, forward_batch.seq_lens - cut_t
    view = ForwardBatch(forward_batch.mode, device, seq_lens, extend_lens, forward_batch.input_ids[index],
                        positions, req_rows, seq_lens_t, forward_batch.out_cache_loc[base_t],
                        forward_batch.logits_indices[:0])
    return view, index


def _verify(logits: torch.Tensor, sampling: SamplingBatch, parts: list[BatchPart], drafts: DraftTokens) -> Verified:
    if drafts.random and drafts.probs is None and not sampling.all_greedy and guard_on("optional-explicit"):
        raise ValueError("DraftTokens.probs is missing: the drafts were drawn at random, and verifying a sampled "
                         "request needs the distribution they were drawn from")
    device = logits.device
    starts = _row_starts(parts)
    draft_rows = [drafts.rows.get(p.req.rid, 0) for p in parts]  # parts without drafts: any row, all masked
    starts_t, num_draft_t, draft_rows_t = columns_to_device(
        [(starts, torch.int64), ([p.num_draft for p in parts], torch.int64), (draft_rows, torch.int64)], device)
    if drafts.tree is not None:
        tree = drafts.tree
        return verify_tree(logits, sampling, starts_t, num_draft_t, drafts.token_ids[draft_rows_t],
                           DraftTree(tree.parents[draft_rows_t], tree.depths[draft_rows_t], tree.bits[draft_rows_t],
                                     tree.max_depth))
    if draft_rows == list(range(drafts.token_ids.shape[0])):  # every part drafted, in order: no gather
        return verify(logits, sampling, starts_t, num_draft_t, drafts.token_ids, drafts.probs)
    probs = drafts.probs[draft_rows_t] if drafts.probs is not None else None
    return verify(logits, sampling, starts_t, num_draft_t, drafts.token_ids[draft_rows_t], probs)


def _row_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> TopLogprobs:
    """Raw log-probs of each row's token (`tokens`, one per row) and the row's top k, on their way to the host."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = logprobs.topk(k, dim=-1) if k else None
    return _host_top(logprobs.gather(1, tokens[:, None])[:, 0], top.indices if top is not None else None,
                     top.values if top is not None else None)


def _host_top(chosen: torch.Tensor, top_ids: Optional[torch.Tensor],
              top_values: Optional[torch.Tensor]) -> TopLogprobs:
    return TopLogprobs(to_host(chosen), to_host(top_ids) if top_ids is not None else None,
                       to_host(top_values) if top_values is not None else None)


def _score_prompts(batch: ScheduledBatch, logits: torch.Tensor) -> Optional[PromptScores]:
    """Log-probs of this step's scored prompt positions (logits rows after the sampled ones), on their way."""
    rows = prompt_logprob_rows(batch)
    if not rows:
        return None
    targets = [req.prompt_ids[p + 1] for req, positions in rows for p in positions]
    k = max(req.params.prompt_logprobs or 0 for req, _ in rows)
    return PromptScores(rows, targets, _row_logprobs(logits, to_device(targets, torch.int64, logits.device), k))


def _append_prompt_logprobs(scores: PromptScores) -> None:
    scored = scores.logprobs.to_list(scores.targets)
    i = 0
    for req, positions in scores.rows:
        n = req.params.prompt_logprobs or 0
        for _ in positions:
            lp = scored[i]
            req.prompt_logprobs.append(TokenLogprob(lp.token_id, lp.logprob, lp.top[:n]))
            i += 1
