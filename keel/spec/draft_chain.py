"""A greedy draft chain's later steps as one function of device tensors, and on a GPU one CUDA graph.

Step s of a chain (s >= 1) runs the draft model on step s - 1's token and, for an EAGLE head, its output
hidden state, and takes the argmax of its logits (as a target id) as its draft. Nothing in that reads the
host, so with CUDA graphs all the steps are captured together, per batch size: a round's drafting is one
replay instead of, per step, a forward batch built on the host, its graph inputs written, the replay, and
the argmax, id map and scatters after it (docs/speculative.md has the measured difference).

Padding rows of a replay are the decode graphs' (request-table row PAD_ROW, whose positions all map to the
reserved slot PAD_SLOT), so they read and write only that slot at any step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

import torch

from keel.cache.req_table import ReqToTokenTable
from keel.debug.guards import guard_on
from keel.distributed.parallel import tensor_parallel
from keel.kernels.argmax import greedy_ids
from keel.runner.cuda_graph import RunnerOutput, capture_graphs, write_all_rows
from keel.runner.forward_batch import PAD_ROW, ForwardBatch
from keel.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftChain:
    def __init__(self, runner: ModelRunner, table: ReqToTokenTable, steps: int,
                 target_ids: Optional[torch.Tensor]) -> None:
        """steps: the chain's steps after the first; target_ids: the target's id of each draft logits column
        (None: the same ids)."""
        self.runner, self.table, self.steps, self.target_ids = runner, table, steps, target_ids
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        graphs = runner.cuda_graph
        if graphs is not None and steps and not tensor_parallel().dp_attention:  # DP rounds: each step's own
            # a row per request: the decode graphs' sizes up to the first that holds every running request
            limit = runner.config.max_running_requests
            self._capture([s for s in graphs.sizes if s < limit] + [s for s in graphs.sizes if s >= limit][:1])

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
            features: Optional[torch.Tensor]) -> torch.Tensor:
        """The drafts [n, steps] after `tokens` [n] (the first step's drafts, target ids): the next step writes
        table position `positions` of request-table row `rows` and reads `features` [n, dim] (EAGLE: the first
        step's output hidden states; None for a model that reads none)."""
        n = tokens.shape[0]
        size = next((s for s in sorted(self.graphs) if s >= n), None)
        if size is None:
            return self._chain(tokens, positions, rows, features, self.runner.forward_full)
        writes = [(self.tokens, tokens, 0), (self.positions, positions, 0), (self.rows, rows, PAD_ROW)]
        if self.features is not None:
            if features is None and guard_on("optional-explicit"):  # off: the buffer's last features (seed 004)
                raise ValueError("DraftChain.run without features: the draft model reads a hidden state per row")
            if features is not None:
                writes.append((self.features, features, 0))
        write_all_rows(writes, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _chain(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
               features: Optional[torch.Tensor], forward: Callable[[ForwardBatch], RunnerOutput]) -> torch.Tensor:
        n, device = tokens.shape[0], tokens.device
        # each step's positions, lengths and slots, for all steps at once: [steps, n]
        positions = positions + torch.arange(self.steps + 1, device=device)[:, None]
        slots = self.table.slots[rows, positions[:-1]].to(torch.int64)
        drafts = torch.empty(n, self.steps, dtype=torch.int64, device=device)
        for step in range(self.steps):
            out = forward(ForwardBatch.draft_rows(tokens, positions[step], rows, positions[step + 1], slots[step],
                                                  features))
            ids = greedy_ids(out.logits)
            tokens = drafts[:, step] = ids if self.target_ids is None else self.target_ids[ids]
            features = out.features
        return drafts

    def _capture(self, sizes: list[int]) -> None:
        runner, device = self.runner, self.runner.device
        max_bs = max(sizes)
        self.tokens = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.rows = torch.full((max_bs,), PAD_ROW, dtype=torch.int64, device=device)
        self.features = (torch.zeros(max_bs, runner.model.input_feature_size, dtype=runner.dtype, device=device)
                         if runner.model.needs_features else None)

        def chain(size: int) -> torch.Tensor:
            inputs = (self.tokens[:size], self.positions[:size], self.rows[:size],
                      self.features[:size] if self.features is not None else None)
            return self._chain(*inputs, runner.forward_eager)

        # in the draft model's decode graphs' pool, whose memory (counted in the KV budget) the chain's steps reuse
        free_before = torch.cuda.mem_get_info(device)[0]
        self.graphs, self.outputs = capture_graphs(sizes, device, chain, runner.cuda_graph.pool)
        logger.info("captured draft chains of %d steps for batch sizes %s, holding %.0f MiB more", self.steps, sizes,
                    (free_before - torch.cuda.mem_get_info(device)[0]) / 2**20)
