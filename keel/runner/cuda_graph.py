"""CUDA-graph decode: one captured forward per batch size, replayed with the real rows written in.

Every graph writes its logits into the largest graph's ([max_bs, vocab] float32), and the smaller graphs reuse the
largest one's memory for their intermediates (one shared pool), so graphs for many sizes cost little more memory
than the largest alone: enough sizes to keep padding under MAX_PADDING of every batch. (Logits kept per graph took
about 1 GB for qwen3-0.6b's former 20 sizes up to 256.)

Every input of a captured forward lives in a static buffer sized for the largest batch. A replay
writes the real rows and neutralises the padded ones (request-table row 0, KV slot 0, length 1:
they read and write only the reserved padding slot), after checking that what it writes fits
(DESIGN rule "bounded writes"). Attention metadata is planned inside the graph from the static
sequence lengths, so every replay gets a fresh plan. Needs the Triton attention backend.

Under data-parallel attention the graphs hold the gathers around the MLP layers, so every rank replays the graph
of its round's size (the largest rank's batch, rounded up to a captured size); a rank with no requests replays it
with padding rows only (an IDLE forward).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
from tqdm import tqdm

from keel.debug.guards import guard_on
from keel.distributed.dp_attention import DpRound
from keel.distributed.parallel import tensor_parallel
from keel.runner.forward_batch import NOT_IN_TREE, PAD_ROW, PAD_SEQ_LEN, PAD_SLOT, ForwardBatch, ForwardMode, TreeMask

logger = logging.getLogger(__name__)

MAX_PADDING = 0.1  # the most of a replayed batch that may be padding rows
ROUND_SIZES_FROM = 64  # sizes from here are multiples of 8 (GEMM tiles)


def capture_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture up to max_bs: each the largest after the one before that keeps padding (rows of the
    graph beyond the batch's) under MAX_PADDING for every batch it serves: 1 to 9, then about 11% apart."""
    sizes = [1]
    while sizes[-1] < max_bs:
        prev = sizes[-1]
        size = math.ceil((prev + 1) / (1 - MAX_PADDING)) - 1  # the first batch it serves is prev + 1
        if size >= ROUND_SIZES_FROM:
            size = max(size // 8 * 8, prev + 1)
        sizes.append(min(size, max_bs))
    return sizes


T = TypeVar("T")


def capture_graphs(sizes: list[int], device: torch.device, run: Callable[[int], T], pool: tuple[int, int],
                   progress: bool = False) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, T]]:
    """One CUDA graph of `run(size)` per size, in the graph memory pool `pool`, largest first so that the smaller
    ones reuse its memory; each run twice before capture (Triton compiles, cuBLAS picks its kernels). Returns the
    graphs and what each captured run returned (its outputs, overwritten by every replay)."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, T] = {}
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for size in tqdm(sorted(sizes, reverse=True), desc="Capturing CUDA graphs", unit="size",
                         disable=None if progress else True):  # a bar on a terminal when asked
            for _ in range(2):
                run(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                outputs[size] = run(size)
            graphs[size] = graph
    torch.cuda.current_stream(device).wait_stream(stream)
    return graphs, outputs


@dataclass(frozen=True)
class RunnerOutput:
    logits: torch.Tensor  # [logits rows, vocab] float32
    features: Optional[torch.Tensor]  # [tokens, dim]: hidden states the model hands a drafter, when it does


Hidden = tuple[torch.Tensor, Optional[torch.Tensor]]  # a forward's final hidden states [tokens, dim] and features
Logits = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]  # (hidden, out) -> float32 logits


class CudaGraphRunner:
    def __init__(self, forward_hidden: Callable[[ForwardBatch], Hidden], compute_logits: Logits, sizes: list[int],
                 device: torch.device, input_features: Optional[tuple[int, torch.dtype]] = None,
                 tree: bool = False) -> None:
        """Capture `forward_hidden` and `compute_logits` for each of `sizes` (capture_sizes). The input buffers
        are sized from the largest, so no replay can write past them. `input_features`: (size, dtype) of
        ForwardBatch.input_features, for a model that reads them (an EAGLE head); `tree`: capture with a TreeMask
        input, so that draft trees replay too (rows outside a tree get the mask that hides nothing)."""
        self.device = device
        self.sizes = sorted(sizes)
        self.max_bs = max_bs = self.sizes[-1]

        def buffer() -> torch.Tensor:
            return torch.zeros(max_bs, dtype=torch.int64, device=device)

        self.input_ids, self.positions, self.req_rows, self.out_cache_loc = buffer(), buffer(), buffer(), buffer()
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        self.rows = torch.arange(max_bs, dtype=torch.int64, device=device)  # logits of every row are sampled
        self.features = (torch.zeros(max_bs, input_features[0], dtype=input_features[1], device=device)
                         if input_features is not None else None)
        self.tree = (TreeMask(torch.full((max_bs,), NOT_IN_TREE, dtype=torch.int64, device=device), buffer())
                     if tree else None)
        tp = tensor_parallel()
        # data-parallel attention: every rank replays the graph of the round's size, whose gathers are captured
        self.dp_rank_count = (tp.rank, tp.size) if tp.dp_attention else None
        self.pool = torch.cuda.graph_pool_handle()  # a drafter's chain graphs share it (keel.spec.draft_chain)
        self.logits: Optional[torch.Tensor] = None  # the largest graph's, which every graph writes

        def run(size: int) -> RunnerOutput:
            hidden, features = forward_hidden(self._batch(size))
            out = self.logits[:size] if self.logits is not None else None
            return RunnerOutput(compute_logits(hidden, out), features)

        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
        largest, rest = self.sizes[-1:], self.sizes[:-1]
        self.graphs, self.outputs = capture_graphs(largest, device, run, self.pool)
        self.logits = self.outputs[self.max_bs].logits
        graphs, outputs = capture_graphs(rest, device, run, self.pool, progress=tp.rank == 0)
        self.graphs.update(graphs)
        self.outputs.update(outputs)
        self.memory_bytes = free_before - torch.cuda.mem_get_info(device)[0]
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s, holding %.0f MiB", self.sizes,
                    time.perf_counter() - start, self.memory_bytes / 2**20)

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(ForwardMode.DECODE, self.device, (1,) * size, (1,) * size, self.input_ids[:size],
                            self.positions[:size], self.req_rows[:size], self.seq_lens[:size],
                            self.out_cache_loc[:size], self.rows[:size],
                            self.features[:size] if self.features is not None else None,
                            TreeMask(self.tree.starts[:size], self.tree.bits[:size]) if self.tree is not None else None,
                            DpRound(self.dp_rank_count[0], (size,) * self.dp_rank_count[1], True)
                            if self.dp_rank_count is not None else None)

    def can_run(self, batch: ForwardBatch) -> bool:
        if (batch.dp is not None) != (self.dp_rank_count is not None) or (batch.dp is not None and not batch.dp.decode):
            return False
        return batch.mode.is_decode and 0 < _rows(batch) <= self.max_bs and (batch.tree is None or
                                                                              self.tree is not None)

    def replay(self, batch: ForwardBatch) -> RunnerOutput:
        """The outputs of the real rows: views of the graph's outputs, overwritten by the next replay."""
        bs = batch.batch_size
        size = next(s for s in self.sizes if s >= _rows(batch))
        writes = [(self.input_ids, batch.input_ids, 0), (self.positions, batch.positions, 0)]
        if batch.mode is not ForwardMode.IDLE or guard_on("fresh-metadata"):  # off: seed 000's stale rows
            writes += [(self.req_rows, batch.req_rows, PAD_ROW), (self.seq_lens, batch.seq_lens, PAD_SEQ_LEN),
                       (self.out_cache_loc, batch.out_cache_loc, PAD_SLOT)]
        if self.features is not None and batch.input_features is not None:
            writes.append((self.features, batch.input_features, 0))
        if self.tree is not None:
            if batch.tree is None:
                self.tree.starts[:size].fill_(NOT_IN_TREE)
            else:
                writes += [(self.tree.starts, batch.tree.starts, NOT_IN_TREE), (self.tree.bits, batch.tree.bits, 0)]
        write_all_rows(writes, size)
        self.graphs[size].replay()
        out = self.outputs[size]
        logits = out.logits[:bs]  # the graph computes every row's logits
        if batch.logits_indices.shape[0] != bs:  # a caller that wants some rows' only (a drafter's pass)
            logits = logits[batch.logits_indices]
        return RunnerOutput(logits, out.features[:bs] if out.features is not None else None)


def _rows(batch: ForwardBatch) -> int:
    """Rows the graph must hold: the batch's, or in a data-parallel round the size every rank runs."""
    return batch.dp.padded if batch.dp is not None else batch.batch_size


def write_all_rows(writes: list[tuple[torch.Tensor, torch.Tensor, int]], size: int) -> None:
    """static[:n] = real, static[n:size] = pad for each (static, real, pad), the copies in one launch (one per
    dtype: a replay's inputs are a handful of tiny copies, each costing a launch more than its bytes); refuses,
    loudly, anything that would not fit (guard `bounded-write`: with it off, the rows are copied unchecked and
    padded rows keep the last replay's values)."""
    checked = guard_on("bounded-write")
    if checked:
        for static, real, _ in writes:
            if real.shape[0] > size or size > static.shape[0] or real.shape[1:] != static.shape[1:]:
                raise IndexError(f"CUDA-graph input of {list(real.shape)} into a buffer of {list(static.shape)} "
                                 f"(graph size {size})")
    by_dtype: dict[tuple[torch.dtype, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for static, real, _ in writes:  # torch fuses a list's copies only where they share one dtype
        by_dtype.setdefault((static.dtype, real.dtype), []).append((static[:real.shape[0]], real))
    for pairs in by_dtype.values():
        torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs])
    if checked:
        for static, real, pad in writes:
            if real.shape[0] < size:
                static[real.shape[0]:size].fill_(pad)
