"""Verification: which draft tokens the target accepts, and the one token it adds after them (chains, and
trees with `verify_tree`).

Each drafted request contributes 1 + d logits rows: its last token's and each draft token's. Greedy rows
accept the longest run of drafts equal to the target's argmax and add the argmax after it, so the output is
exactly the target's greedy output. Sampled rows use the speculative-sampling rule, which keeps the target's
distribution whatever the drafter proposes: draft x (drawn from q) is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from max(0, p - q), renormalised; when every
draft is accepted, one more is drawn from p. Deterministic drafters (n-grams) have q = one-hot. p and q are
the distributions the sampler would draw from (temperature, top-k, top-p, min-p applied), and every random
number is a pure function of (request seed, output position), as in the sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from keel.kernels.accept import ACCEPT_KEY, accept_chains
from keel.kernels.argmax import greedy_ids
from keel.runner.sampler import SamplingBatch, apply_penalties, filtered_probs, sample_from, uniform_noise
from keel.scheduler.batch import DraftTree
from keel.spec import SIMULATE_ACCEPT_ENV


def simulated_accept_len() -> Optional[float]:
    value = os.environ.get(SIMULATE_ACCEPT_ENV)
    if not value:
        return None
    length = float(value)
    if not length >= 1.0:
        raise ValueError(f"{SIMULATE_ACCEPT_ENV}={value}: a mean accept length is at least 1")
    return length


@dataclass(frozen=True)
class Verified:
    row_tokens: torch.Tensor  # [rows] int64: part i emits row_tokens[starts[i] + j] for j < counts[i] (rest: junk)
    counts: torch.Tensor  # [parts] int64: tokens each part emits, its accepted drafts + 1
    # Trees: [parts, max depth + 1] the node at each depth of the accepted path (entries past it: their own
    # depth), and [rows] the logits row each entry of row_tokens was drawn from. None for chains, whose accepted
    # path is their first counts[i] rows.
    path: Optional[torch.Tensor] = None
    source_rows: Optional[torch.Tensor] = None


def verify(logits: torch.Tensor, rows: SamplingBatch, starts: torch.Tensor, num_draft: torch.Tensor,
           drafts: torch.Tensor, draft_probs: Optional[torch.Tensor]) -> Verified:
    """logits: [rows, vocab] float32, part i's rows at starts[i] .. starts[i] + num_draft[i]; rows: the sampling
    inputs of each row (steps = the output position it samples); drafts: [parts, K] (entries past num_draft[i]
    are ignored); draft_probs: [parts, K, vocab], the drafter's q, or None when its drafts are deterministic."""
    n, k = drafts.shape
    if rows.penalties is not None:  # only on rows of requests without drafts (the scheduler sees to that)
        logits = apply_penalties(logits, rows.penalties)
    simulate = simulated_accept_len()
    if logits.is_cuda and (rows.all_greedy or simulate is not None):  # one launch where torch takes ~30
        row_tokens, counts = accept_chains(greedy_ids(logits), starts, num_draft, drafts, rows.seeds, rows.steps,
                                           None if simulate is None else simulate - 1.0)
        return Verified(row_tokens, counts)
    offsets = torch.arange(k + 1, device=logits.device)
    position_rows = starts[:, None] + torch.minimum(offsets[None], num_draft[:, None])  # [n, k + 1]
    is_draft = offsets[None, :k] < num_draft[:, None]
    argmax = greedy_ids(logits)
    accepted = _run_length((drafts == argmax[position_rows[:, :k]]) & is_draft)
    if simulate is not None:
        accepted = _simulated_accepts(simulate - 1.0, num_draft, rows.seeds[starts], rows.steps[starts])
    final = argmax[starts + accepted]
    if not rows.all_greedy and simulate is None:
        sampled_accepted, sampled_final = _speculative_sample(logits, rows, starts, num_draft, drafts, draft_probs,
                                                              position_rows[:, :k], is_draft)
        greedy = rows.greedy[starts]
        accepted = torch.where(greedy, accepted, sampled_accepted)
        final = torch.where(greedy, final, sampled_final)
    emitted = torch.cat([drafts, drafts.new_zeros(n, 1)], dim=1).scatter(1, accepted[:, None], final[:, None])
    rows_of = _own_rows(starts[:, None] + offsets, offsets[None] <= num_draft[:, None], logits.shape[0])
    return Verified(_scatter_rows(emitted, rows_of, logits.shape[0]), accepted + 1)


def _own_rows(rows: torch.Tensor, used: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`rows`, with entries past a part's own rows sent to row num_rows (a scratch row): a boolean selection would
    make the host wait for the device."""
    return torch.where(used, rows, num_rows)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, num_rows: int, base: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """[num_rows]: `base` (default zeros) with values written at `rows` (from _own_rows)."""
    out = torch.zeros(num_rows + 1, dtype=values.dtype, device=values.device)
    if base is not None:
        out[:num_rows] = base
    out[rows.reshape(-1)] = values.reshape(-1)
    return out[:num_rows]


def verify_tree(logits: torch.Tensor, rows: SamplingBatch, starts: torch.Tensor, num_draft: torch.Tensor,
                tokens: torch.Tensor, tree: DraftTree) -> Verified:
    """Trees: part i's rows at starts[i] are its root's and, when num_draft[i] > 0, its T - 1 nodes' (node
    order). Greedy rows accept the deepest node whose path matches the target's argmax at every step. Sampled rows
    walk down from the root: at a node, its children (deterministic candidates) are tried in turn, each accepted
    with its probability under the residual distribution, which loses each rejected candidate's mass; at the
    first node none of whose children is accepted, the token is drawn from that residual. This keeps the target's
    distribution exactly (recursive rejection sampling with one-hot proposals). tokens: [parts, T - 1]."""
    n, size = tree.parents.shape
    device = logits.device
    if rows.penalties is not None:  # only on rows of requests without drafts (the scheduler sees to that)
        logits = apply_penalties(logits, rows.penalties)
    nodes = torch.arange(size, device=device)
    valid = nodes[None] <= num_draft[:, None]  # a part without drafts has its root only
    node_rows = starts[:, None] + torch.minimum(nodes[None], num_draft[:, None])
    node_tokens = torch.cat([tokens.new_zeros(n, 1), tokens], dim=1)
    argmax = greedy_ids(logits)
    matches = (node_tokens == argmax[node_rows.gather(1, tree.parents)]) & valid
    accepted = torch.ones_like(matches)
    for _ in range(tree.max_depth):  # a node is accepted when it matches and its parent is accepted
        accepted = matches & accepted.gather(1, tree.parents)
        accepted[:, 0] = True
    end = torch.where(accepted, tree.depths, -1).argmax(dim=1)  # the deepest accepted node (siblings differ)
    if (simulate := simulated_accept_len()) is not None:
        depth = _simulated_accepts(simulate - 1.0, torch.full_like(starts, tree.max_depth), rows.seeds[starts],
                                   rows.steps[starts])
        end = _deepest_within(tree, valid, depth)
    final = argmax[starts + end]
    if not rows.all_greedy and simulate is None:
        sampled_end, sampled_final = _tree_sample(logits, rows, starts, valid, node_rows, node_tokens, tree)
        greedy = rows.greedy[starts]
        end = torch.where(greedy, end, sampled_end)
        final = torch.where(greedy, final, sampled_final)
    path = _path_to(end, tree)
    depth_of_end = tree.depths.gather(1, end[:, None])[:, 0]
    emitted = node_tokens.gather(1, torch.cat([path[:, 1:], path[:, :1]], dim=1))  # each path node's child's token
    emitted = emitted.scatter(1, depth_of_end[:, None], final[:, None])
    depth = torch.arange(path.shape[1], device=device)
    num_rows = logits.shape[0]
    rows_of = _own_rows(starts[:, None] + depth, depth[None] <= num_draft[:, None], num_rows)
    source_rows = _scatter_rows(starts[:, None] + path, rows_of, num_rows, torch.arange(num_rows, device=device))
    return Verified(_scatter_rows(emitted, rows_of, num_rows), depth_of_end + 1, path, source_rows)


def _deepest_within(tree: DraftTree, valid: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """The first of the deepest nodes no deeper than `depth` (a simulated acceptance: a tree may be too shallow
    to reach it, like a real one)."""
    size = tree.parents.shape[1]
    rank = tree.depths * size - torch.arange(size, device=depth.device)  # deeper first, then earlier
    return torch.where(valid & (tree.depths <= depth[:, None]), rank, -1).argmax(dim=1)


def _path_to(end: torch.Tensor, tree: DraftTree) -> torch.Tensor:
    """[parts, max depth + 1]: the ancestors of `end` by depth (its own at its depth); deeper entries: the depth."""
    n, size = tree.parents.shape
    width = tree.max_depth + 1
    device = end.device
    ancestors = ((tree.bits.gather(1, end[:, None]) >> torch.arange(size, device=device)) & 1).bool()
    column = torch.where(ancestors, tree.depths, width)  # non-ancestors land in a column dropped below
    path = torch.arange(width + 1, device=device).repeat(n, 1)
    path.scatter_(1, column, torch.arange(size, device=device).expand(n, size).contiguous())
    return path[:, :width]


def _tree_sample(logits: torch.Tensor, rows: SamplingBatch, starts: torch.Tensor, valid: torch.Tensor,
                 node_rows: torch.Tensor, node_tokens: torch.Tensor,
                 tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
    n, size = tree.parents.shape
    p = filtered_probs(logits, rows)
    seeds, steps = rows.seeds[starts], rows.steps[starts]
    node = torch.zeros(n, dtype=torch.int64, device=logits.device)
    residual = p[starts].clone()
    for i in range(1, size):  # children come after their parents, so one pass in node order walks the tree
        token = node_tokens[:, i]
        keys = (ACCEPT_KEY - i) + torch.zeros_like(token)  # one independent draw per node
        u = uniform_noise(seeds, steps + tree.depths[:, i] - 1, keys[:, None])[:, 0]
        mass = residual.gather(1, token[:, None])[:, 0]
        tried = valid[:, i] & (tree.parents[:, i] == node)
        accept = tried & (u * residual.sum(dim=1) < mass)
        residual = residual.scatter(1, token[:, None], torch.where(tried & ~accept, 0.0, mass)[:, None])
        residual = torch.where(accept[:, None], p[node_rows[:, i]], residual)
        node = torch.where(accept, i, node)
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p[starts + node])  # rounding
    return node, sample_from(residual, seeds, steps + tree.depths.gather(1, node[:, None])[:, 0])


def _simulated_accepts(mean: float, num_draft: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """floor(mean) drafts, one more with probability frac(mean) (a draw keyed like the sampler's), at most all."""
    u = uniform_noise(seeds, steps, torch.full_like(seeds, ACCEPT_KEY)[:, None])[:, 0]
    return torch.minimum(num_draft, int(mean) + (u < mean - int(mean)).to(torch.int64))


def _run_length(accept: torch.Tensor) -> torch.Tensor:
    """Leading True entries of each row."""
    return torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)


def _speculative_sample(logits: torch.Tensor, rows: SamplingBatch, starts: torch.Tensor, num_draft: torch.Tensor,
                        drafts: torch.Tensor, draft_probs: Optional[torch.Tensor], draft_rows: torch.Tensor,
                        is_draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = drafts.shape
    p = filtered_probs(logits, rows)
    p_draft = p[draft_rows, drafts]  # [n, k]: the target's probability of each draft token
    q_draft = draft_probs.gather(2, drafts[..., None])[..., 0] if draft_probs is not None else torch.ones_like(p_draft)
    keys = torch.full((n * k, 1), ACCEPT_KEY, dtype=torch.int64, device=logits.device)
    u = uniform_noise(rows.seeds[draft_rows].reshape(-1), rows.steps[draft_rows].reshape(-1), keys).reshape(n, k)
    accepted = _run_length((u * q_draft < p_draft) & is_draft)
    final_rows = starts + accepted
    target = p[final_rows]
    rejected = accepted < num_draft
    at = accepted.clamp(max=k - 1)
    if draft_probs is not None:
        q = draft_probs[torch.arange(n, device=logits.device), at]
    else:
        q = torch.nn.functional.one_hot(drafts.gather(1, at[:, None])[:, 0], p.shape[1]).to(p.dtype)
    residual = (target - q).clamp(min=0.0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, target)  # rounding left no mass
    target = torch.where(rejected[:, None], residual, target)
    return accepted, sample_from(target, rows.seeds[final_rows], rows.steps[final_rows])
