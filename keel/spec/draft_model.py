"""Drafting with a model: STANDALONE (a smaller model of the target's vocabulary) or an EAGLE head.

The drafter's KV pool has the same slots as the target's and is addressed through the same request table, so
pages, ownership and release are the target's: nothing to allocate or free here. Two rules keep its KV complete:
- after every target forward the drafter runs the same positions (`observe`: DRAFT_EXTEND, or decode rows for a
  decode or verify batch), so every position whose target KV is committed has the drafter's KV too (prefill
  chunks, prefix-cache hits and retraction need no bookkeeping of their own);
- drafting (`propose`) is num_draft DRAFT_DECODE steps, each writing only into slots the scheduler allocated
  for this step's verify or already committed: step i runs only the requests with more than i drafts, so no
  write can land past a request's allocation.

An EAGLE head drafts one position behind: its position p reads the token at p + 1 and a hidden state for p,
the target's (captured by its forward) for verified positions, its own output of p - 1 while it drafts ahead.
So `observe` feeds it the tokens that follow each position (prompt tokens, accepted drafts, the new token) with
the target's features, and keeps each request's feature of its last committed position, on the device, for
the first draft step of the next round. That pass's row at the last committed position is the first draft step
itself (the same token, position, feature and KV slot), so it also keeps that row's logits and output, and the
next round drafts from them instead of running the step again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from keel.cache.req_table import ReqToTokenTable
from keel.kernels.argmax import greedy_ids
from keel.models.eagle import EagleHead
from keel.runner.cuda_graph import RunnerOutput
from keel.runner.forward_batch import ForwardBatch, ForwardMode, TreeMask
from keel.runner.model_runner import ModelRunner
from keel.runner.sampler import SamplingBatch, filtered_probs, sample_from
from keel.scheduler.batch import DraftRoots, DraftTokens, DraftTree, build_sampling_batch
from keel.scheduler.req import Req
from keel.scheduler.scheduler import BatchPart, ScheduledBatch
from keel.spec.draft_chain import DraftChain
from keel.spec.drafter import TargetStep
from keel.transfer import columns_to_device, to_device

DRAFT_SEED_KEY = 0x2545F4914F6CDD1D  # mixed into request seeds: the drafter's draws are not the verifier's


@dataclass(frozen=True)
class ObservedRoots:
    """An EAGLE head's output, in its pass over a target step (`observe`), at each sampled request's last committed
    position: the request's next first draft step, as long as no later target step ran the request."""

    rows: dict[int, tuple[Req, int]]  # request id -> (the request, its row below): a reused id is another request
    logits: torch.Tensor  # [n, head vocabulary] float32
    features: torch.Tensor  # [n, dim] the head's output hidden state: the second draft step's input


class DraftModelDrafter:
    def __init__(self, runner: ModelRunner, num_draft: int, table: ReqToTokenTable, steps: int, topk: int) -> None:
        """num_draft: draft tokens per drafted request (a chain: one per step; a tree: its best candidates)."""
        self.runner = runner
        self.num_draft = num_draft
        self.steps, self.topk = steps, topk
        self.vocab_size = runner.model_config.vocab_size  # the target's: EngineCore checks they are equal
        self.table = table
        self.head: Optional[EagleHead] = runner.model if isinstance(runner.model, EagleHead) else None
        self.reads_target_features = self.head is not None
        # EAGLE: per request-table row, the head's input hidden state for the request's last committed position
        self.features = (torch.zeros(table.slots.shape[0], self.head.input_feature_size, dtype=runner.dtype,
                                     device=runner.device) if self.head is not None else None)
        # the last two observe passes, newest first: a round may run its verify and its prefills as two steps
        self._observed: tuple[ObservedRoots, ...] = ()
        # greedy chains' steps after the first (CUDA-graph captured where the runner's are)
        chained = topk == 1 and num_draft > 1
        self.chain = DraftChain(runner, table, num_draft - 1, self._column_ids) if chained else None

    @torch.inference_mode()
    def propose(self, batch: ScheduledBatch, roots: DraftRoots) -> Optional[DraftTokens]:
        parts = [p for p in batch.sampled if p.num_draft]
        if not parts:
            return None
        if self.topk > 1:
            return self._propose_tree(parts, roots)
        if self.chain is not None and all(p.req.params.is_greedy and p.num_draft == self.num_draft for p in parts):
            return self._propose_chain(parts, roots, self.chain)
        device = self.runner.device
        n, k = len(parts), self.num_draft
        behind = 1 if self.head is not None else 0  # an EAGLE head drafts one position behind the tokens
        # Step s drafts for the requests with more than s drafts; every step's inputs go over in one copy.
        active = [[i for i, p in enumerate(parts) if p.num_draft > step] for step in range(k)]
        active = [rows for rows in active if rows]
        entries = [(step, i) for step, rows in enumerate(active) for i in rows]
        index, offsets, rows = columns_to_device(
            [([i for _, i in entries], torch.int64), ([step - behind for step, _ in entries], torch.int64),
             ([parts[i].row for _, i in entries], torch.int64)], device)
        positions = roots.positions[index] + offsets  # step s writes the position s after the root (EAGLE: s - 1)
        slots = self.table.slots[rows, positions].to(torch.int64)
        features = self.features[rows[:n]] if self.features is not None else None
        greedy = all(p.req.params.is_greedy for p in parts)
        sampling = None
        if not greedy:
            sampling = build_sampling_batch([p.req for p in parts], self.vocab_size, device)
            sampling = dataclasses.replace(sampling, steps=sampling.steps - roots.shifts)
        tokens = torch.zeros(n, k, dtype=torch.int64, device=device)
        probs = None if greedy else torch.zeros(n, k, self.vocab_size, dtype=torch.float32, device=device)
        observed = self._observed_roots(parts)
        start = 0
        for step, rows_of_step in enumerate(active):
            m = len(rows_of_step)
            at = slice(start, start + m)
            start += m
            who = index[at]
            out = observed if step == 0 and observed is not None else self._forward_rows(
                roots.token_ids[who] if step == 0 else tokens[who, step - 1], positions[at], rows[at],
                features[who] if features is not None else None, None, slots[at])
            if features is not None and out.features is not None:
                features[who] = out.features  # the next step's input hidden states
            if sampling is None:
                tokens[who, step] = self._target_ids(greedy_ids(out.logits))
                continue
            drawn, q = _draw(out.logits, _rows_of(sampling, who, step))
            tokens[who, step] = self._target_ids(drawn)
            if probs is not None and q is not None:
                probs[who, step] = self._target_probs(q)
        return DraftTokens(tokens, {p.req.rid: i for i, p in enumerate(parts)}, random=not greedy, probs=probs)

    def _propose_chain(self, parts: list[BatchPart], roots: DraftRoots, chain: DraftChain) -> DraftTokens:
        """Greedy drafts, num_draft for every part: the first step (kept from `observe` when it ran it), then the
        rest of the chain in one go."""
        rows = to_device([p.row for p in parts], torch.int64, self.runner.device)
        out = self._observed_roots(parts)
        if out is None:  # the first step's table position: an EAGLE head's is one behind the root token's
            positions = roots.positions - 1 if self.head is not None else roots.positions
            out = self._forward_rows(roots.token_ids, positions, rows,
                                     self.features[rows] if self.features is not None else None, None)
        after = roots.positions if self.head is not None else roots.positions + 1  # the second step's
        first = self._target_ids(greedy_ids(out.logits))
        tokens = torch.cat([first[:, None], chain.run(first, after, rows, out.features)], dim=1)
        return DraftTokens(tokens, {p.req.rid: i for i, p in enumerate(parts)}, random=False)

    def _propose_tree(self, parts: list[BatchPart], roots: DraftRoots) -> DraftTokens:
        """EAGLE-2's dynamic tree. Step 0 runs each root and keeps its top-k tokens as candidates; each later step
        runs the k best candidates so far (the frontier, by cumulative log-probability), each seeing its own
        ancestors through a tree mask, and adds their top-k children as candidates. The tree verified is the
        num_draft best candidates: scores fall along every path, so it holds each chosen node's parent.

        Frontier tokens write the draft model's KV at the table positions after the root's, in step order (the
        scheduler holds config.draft_reserve slots there), so no write leaves the request's own allocation."""
        device = self.runner.device
        n, k, size = len(parts), self.topk, self.num_draft + 1
        behind = 1 if self.head is not None else 0
        rows = to_device([p.row for p in parts], torch.int64, device)
        root_pos = roots.positions - behind  # the table position each root row writes
        features = self.features[rows] if self.features is not None else None
        out = self._observed_roots(parts) or self._forward_rows(roots.token_ids, root_pos, rows, features, None)
        top_tokens, top_scores = _top_log_probs(out.logits, k)
        top_tokens = self._target_ids(top_tokens)
        num_candidates = k + (self.steps - 1) * k * k
        tokens = torch.zeros(n, num_candidates, dtype=torch.int64, device=device)
        scores = torch.full((n, num_candidates), float("-inf"), dtype=torch.float64, device=device)
        parents = torch.full((n, num_candidates), -1, dtype=torch.int64, device=device)  # -1: the root
        tokens[:, :k], scores[:, :k] = top_tokens, top_scores
        frontier = torch.arange(k, device=device).repeat(n, 1)  # candidate ids
        above = torch.ones(n, k, dtype=torch.int64, device=device)  # mask bits of each frontier node's ancestors
        hidden = out.features[:, None].expand(n, k, -1) if out.features is not None else None
        branch = torch.arange(k, device=device)
        req_rows, frontier_roots = rows.repeat_interleave(k), root_pos.repeat_interleave(k)  # a row per frontier node
        for step in range(1, self.steps):
            first = 1 + (step - 1) * k  # the frontier's tree index (its offset from the root's table position)
            table_pos = (root_pos[:, None] + first + branch).reshape(-1)
            bits = above | (1 << (first + branch))
            out = self._forward_rows(
                tokens.gather(1, frontier).reshape(-1), frontier_roots + step, req_rows,
                hidden.reshape(n * k, -1) if hidden is not None else None, TreeMask(frontier_roots, bits.reshape(-1)),
                self.table.slots[req_rows, table_pos].to(torch.int64), table_pos + 1)
            top_tokens, top_scores = _top_log_probs(out.logits, k)
            top_tokens = self._target_ids(top_tokens)
            offset = k + (step - 1) * k * k
            children = slice(offset, offset + k * k)
            tokens[:, children] = top_tokens.reshape(n, k * k)
            scores[:, children] = (scores.gather(1, frontier)[:, :, None] + top_scores.reshape(n, k, k)).reshape(n, -1)
            parents[:, children] = frontier.repeat_interleave(k, dim=1)
            best = scores[:, children].topk(k, dim=1).indices
            parent = best // k  # the frontier node each new one descends from
            frontier, above = offset + best, bits.gather(1, parent)
            if out.features is not None:
                width = out.features.shape[-1]
                hidden = out.features.reshape(n, k, width).gather(1, parent[:, :, None].expand(n, k, width))
        chosen = scores.topk(size - 1, dim=1).indices.sort(dim=1).values
        node_of = torch.zeros(n, num_candidates + 1, dtype=torch.int64, device=device)  # column 0: the root
        node_of.scatter_(1, chosen + 1, torch.arange(1, size, device=device).repeat(n, 1))
        tree_parents = torch.cat([node_of.new_zeros(n, 1), node_of.gather(1, parents.gather(1, chosen) + 1)], dim=1)
        return DraftTokens(tokens.gather(1, chosen), {p.req.rid: i for i, p in enumerate(parts)},
                           tree=tree_shape(tree_parents, min(self.steps, size - 1)))

    def _observed_roots(self, parts: list[BatchPart]) -> Optional[RunnerOutput]:
        """The first draft step's output (the roots' rows) of every part, when the head's recent passes over the
        target's steps computed them all; None otherwise, and the step runs. A request's newest pass is the one
        after its last target step (every step that samples it observes it), so an older one is never read."""
        found = [self._observed_row(p.req) for p in parts]
        if not found or None in found:
            return None
        newest = self._observed[0]
        if found == [(0, i) for i in range(newest.logits.shape[0])]:  # that pass's rows, in order: no gather
            return RunnerOutput(newest.logits, newest.features)
        logits, features = None, None
        for k, source in enumerate(self._observed):
            at = [i for i, (s, _) in enumerate(found) if s == k]
            if not at:
                continue
            where, rows = columns_to_device([(at, torch.int64), ([found[i][1] for i in at], torch.int64)],
                                            self.runner.device)
            if len(at) == len(parts):
                return RunnerOutput(source.logits[rows], source.features[rows])
            if logits is None or features is None:
                logits = source.logits.new_empty(len(parts), source.logits.shape[1])
                features = source.features.new_empty(len(parts), source.features.shape[1])
            logits[where], features[where] = source.logits[rows], source.features[rows]
        return RunnerOutput(logits, features) if logits is not None else None

    def _observed_row(self, req: Req) -> Optional[tuple[int, int]]:
        """(pass, row) of the request's root in the newest kept pass that ran it; None when none did."""
        for k, source in enumerate(self._observed):
            entry = source.rows.get(req.rid)
            if entry is not None:
                return (k, entry[1]) if entry[0] is req else None
        return None

    @property
    def _column_ids(self) -> Optional[torch.Tensor]:
        """The target's id of each column of the drafter's logits; None: the column is the id."""
        return self.head.target_ids if self.head is not None else None

    def _target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's ids of the head's logits columns `ids`."""
        mapping = self._column_ids
        return ids if mapping is None else mapping[ids]

    def _target_probs(self, q: torch.Tensor) -> torch.Tensor:
        """A distribution over the head's columns as one over the target's vocabulary."""
        mapping = self._column_ids
        return q if mapping is None else q.new_zeros(q.shape[0], self.vocab_size).index_copy_(1, mapping, q)

    def _forward_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, req_rows: torch.Tensor,
                      features: Optional[torch.Tensor], tree: Optional[TreeMask], slots: Optional[torch.Tensor] = None,
                      seq_lens: Optional[torch.Tensor] = None) -> RunnerOutput:
        """One DRAFT_DECODE forward of single-token rows (lengths on the device only), each writing its KV at its
        own position's slot and seeing the keys before it, unless `slots` and `seq_lens` say otherwise."""
        if slots is None:
            slots = self.table.slots[req_rows, positions].to(torch.int64)
        return self.runner.forward_full(ForwardBatch.draft_rows(
            input_ids, positions, req_rows, positions + 1 if seq_lens is None else seq_lens, slots, features, tree))

    @torch.inference_mode()
    def observe(self, step: TargetStep) -> None:
        batch = step.batch
        mode = ForwardMode.DRAFT_DECODE if batch.mode.is_decode else ForwardMode.DRAFT_EXTEND
        draft_batch = dataclasses.replace(batch, mode=mode, logits_indices=batch.logits_indices[:0])
        if self.head is None or self.features is None:
            self.runner.forward_full(draft_batch)
            return
        if step.features is None or step.next_token_ids is None or step.last_tokens is None \
                or step.last_req_rows is None:
            raise ValueError("TargetStep lacks the target's features or next tokens, which an EAGLE head reads")
        features = self.head.project_target_features(step.features)
        out = self.runner.forward_full(dataclasses.replace(draft_batch, input_ids=step.next_token_ids,
                                                           input_features=features, logits_indices=step.last_tokens))
        self.features[step.last_req_rows] = features[step.last_tokens]
        if out.features is not None:
            newest = ObservedRoots({req.rid: (req, i) for i, req in enumerate(step.last_reqs)}, out.logits,
                                   out.features[step.last_tokens])
            self._observed = (newest,) + self._observed[:1]


def tree_shape(parents: torch.Tensor, max_depth: int) -> DraftTree:
    """Depths and ancestor bits of trees given by their parents ([n, T], parents before children)."""
    nodes = torch.arange(parents.shape[1], device=parents.device)
    depths = torch.zeros_like(parents)
    bits = (1 << nodes).repeat(parents.shape[0], 1)
    own = bits.clone()
    for _ in range(max_depth):  # each round settles one more level
        depths = torch.where(nodes == 0, 0, depths.gather(1, parents) + 1)
        bits = own | bits.gather(1, parents)
    return DraftTree(parents, depths, bits, max_depth)


def _top_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k likeliest tokens and their log-probabilities (float64, finite and below 0, so that a child
    always scores strictly below its parent and the best candidates always include their ancestors)."""
    top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return top.indices, top.values.to(torch.float64).clamp(min=-1e4) - 1e-9


def _rows_of(sampling: SamplingBatch, index: torch.Tensor, step: int) -> SamplingBatch:
    """The sampling inputs of rows `index`, drawing output position num_generated + step."""
    return dataclasses.replace(sampling, greedy=sampling.greedy[index], temperatures=sampling.temperatures[index],
                               top_ks=sampling.top_ks[index], top_ps=sampling.top_ps[index],
                               min_ps=sampling.min_ps[index], seeds=sampling.seeds[index],
                               steps=sampling.steps[index] + step)


def _draw(logits: torch.Tensor, sampling: SamplingBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each row's draft token, and the distribution q it was drawn from (None when every row is greedy)."""
    argmax = greedy_ids(logits)
    if sampling.all_greedy:
        return argmax, None
    q = filtered_probs(logits, sampling)
    drawn = sample_from(q, sampling.seeds ^ DRAFT_SEED_KEY, sampling.steps)
    return torch.where(sampling.greedy, argmax, drawn), q
