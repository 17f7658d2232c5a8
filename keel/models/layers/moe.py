"""A sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router, and experts that are gated SiLU MLPs.

The experts' weights are stacked per projection (w13: [experts, 2 * intermediate, hidden], gate rows then up
rows; w2: [experts, hidden, intermediate]); checkpoints store each expert's projections apart, so each stacked
parameter records `expert_shards` for the loader. With `fused`, the experts run as keel's fused MoE Triton
kernels; otherwise each expert runs on the tokens routed to it, in plain torch, as transformers does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from keel.distributed.parallel import all_reduce, all_to_all_rows, exchange_counts, split, tensor_parallel
from keel.models.layers.linear import Linear
from keel.models.layers.norm import RMSNorm


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64): softmax over the experts in float32, the top k, rescaled
    to sum to 1 when `renormalize` (Mixtral, and Qwen3-MoE with norm_topk_prob)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        """Under tensor parallelism each rank holds every expert's slice of the intermediate features (its gate
        and up rows, its down columns), as a column- then row-parallel MLP; with expert parallelism it holds
        whole experts instead, experts [first, first + count) of them."""
        super().__init__()
        tp = tensor_parallel()
        count = split(num_experts, "the experts") if tp.whole_experts else num_experts
        inter = intermediate_size if tp.whole_experts else split(intermediate_size, "the experts' intermediate size")
        self.first = tp.rank * count if tp.whole_experts else 0
        self.w13 = nn.Parameter(torch.empty(count, 2 * inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(count, hidden_size, inter), requires_grad=False)
        self.w13.expert_shards = (inter, inter)  # gate, up
        self.w2.expert_shards = (hidden_size,)
        for param in (self.w13, self.w2):
            param.first_expert = self.first
        if not tp.whole_experts:
            self.w13.tp_dim, self.w2.tp_dim = 0, 1  # of each expert's checkpoint tensors

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Routed expert ids as indices of this rank's experts; those of other ranks' experts become `count`, an
        expert no kernel runs."""
        count = self.w13.shape[0]
        if not tensor_parallel().whole_experts:
            return ids  # every rank holds (a slice of) every expert
        local = ids - self.first
        return torch.where((local >= 0) & (local < count), local, count)


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
                 fused: bool) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, fused=fused)  # the router
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.top_k, self.renormalize, self.fused = top_k, renormalize, fused

    def forward(self, hidden: torch.Tensor, norm: RMSNorm, partial: bool = False) -> torch.Tensor:
        """hidden += moe(norm(hidden)), in place; with `partial`, this rank's share of moe(norm(hidden)) instead, not
        yet summed over the ranks (LlamaMLP)."""
        if self.fused:
            return self._fused(hidden, norm, partial)
        x = norm(hidden)
        weights, ids = self._route(x)
        out = self._experts(x, weights, self.experts.local_ids(ids))
        # the ranks' slices of every expert (or their experts) sum to the output
        return out if partial else hidden.add_(all_reduce(out))

    def _fused(self, hidden: torch.Tensor, norm: RMSNorm, partial: bool) -> torch.Tensor:
        from keel.kernels.fused_moe import few_pairs, fused_moe  # Triton only when asked for

        w13, w2 = self.experts.w13, self.experts.w2
        # Batch-1 decode: the norm folds into the router's GEMV and the experts' gate/up GEMV, one kernel fewer.
        fold = few_pairs(hidden.shape[0], self.top_k, w13.shape[0])
        x = hidden if fold else norm(hidden)
        weights, ids = self._route(x, norm if fold else None)
        norm_args = (norm.weight, norm.eps) if fold else (None, 0.0)
        ids = self.experts.local_ids(ids)
        if tensor_parallel().size == 1 and not partial:  # nothing to sum over ranks: the k-sum goes into the stream
            return fused_moe(x, w13, w2, weights, ids, *norm_args, add_to=hidden)
        out = fused_moe(x, w13, w2, weights, ids, *norm_args)
        return out if partial else hidden.add_(all_reduce(out))

    def dispatched(self, hidden: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """moe(norm(hidden)) for this rank's own tokens under expert parallelism: each token's row goes (all-to-all)
        only to the ranks holding one of its experts, they run those experts on the rows they receive, and send
        the results back, summed here over the ranks. For data-parallel attention's eager rounds (their token
        counts differ by rank and step; decode rounds gather instead, in one shape a CUDA graph can hold)."""
        x = norm(hidden)
        weights, ids = self._route(x)
        count, ranks = self.experts.w13.shape[0], tensor_parallel().size
        owner = ids // count  # the rank holding each chosen expert
        rows = [(owner == rank).any(dim=1).nonzero()[:, 0] for rank in range(ranks)]  # tokens each rank gets
        send = [len(r) for r in rows]
        receive = exchange_counts(send, x.device)
        order = torch.cat(rows)
        destination = torch.repeat_interleave(torch.arange(ranks, device=x.device),
                                              torch.tensor(send, device=x.device))
        # each sent row carries its k choices as that rank's expert indices; choices of other ranks' experts get
        # `count`, an expert no kernel runs
        local = torch.where(owner[order] == destination[:, None], ids[order] - destination[:, None] * count, count)
        out = self._experts(all_to_all_rows(x[order], send, receive),
                            all_to_all_rows(weights[order], send, receive),
                            all_to_all_rows(local, send, receive))
        back = all_to_all_rows(out, receive, send)
        per_rank = x.new_zeros((ranks,) + tuple(x.shape))
        per_rank[destination, order] = back
        return per_rank.sum(dim=0)

    def _route(self, x: torch.Tensor, norm: Optional[RMSNorm] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids) of the router on x (on norm(x), folded into the router's GEMV, when given)."""
        logits = self.gate(x, norm=norm)
        if self.fused:
            from keel.kernels.fused_moe import fused_route
            return fused_route(logits, self.top_k, self.renormalize)
        return route(logits, self.top_k, self.renormalize)

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) over this rank's experts (an id of `count`: none)."""
        if self.fused:
            from keel.kernels.fused_moe import fused_moe
            return fused_moe(x, self.experts.w13, self.experts.w2, weights, ids)
        return self._experts_one_by_one(x, weights.to(x.dtype), ids)

    def _experts_one_by_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        w13, w2 = self.experts.w13, self.experts.w2
        inter = w2.shape[2]
        for expert in ids.unique().tolist():
            if expert == w13.shape[0]:
                continue  # another rank's
            tokens, slot = (ids == expert).nonzero(as_tuple=True)
            gate_up = F.linear(x[tokens], w13[expert])
            y = F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[expert])
            out.index_add_(0, tokens, y * weights[tokens, slot, None])
        return out
