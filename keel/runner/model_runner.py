"""ModelRunner: one model (the target, or a draft model), its KV pool, attention backend and CUDA graphs; runs
one ForwardBatch at a time.

EngineCore owns memory (DESIGN, Seams): it loads every runner's model, sizes the KV pages for all of them
(`keel.cache.kv_plan`), builds the one request->token table, and hands it to each runner with `attach_kv`. A draft
model's pool has the same slots as the target's, so one page allocator and one release path cover both. On a
hybrid pool the target's sliding-window layers keep their K/V in a group of their own (`SwaGroup`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from keel.attention import choose_backend, create_backend
from keel.attention.base import AttentionBackend, AttentionContext
from keel.cache.kv_pool import KVPool
from keel.cache.req_table import ReqToTokenTable
from keel.cache.swa_pages import SwaPageMap
from keel.config import EngineConfig
from keel.debug.guards import guard_on
from keel.distributed.dp_attention import agree_round
from keel.distributed.parallel import attention_split, tensor_parallel
from keel.models.config import ModelConfig
from keel.models.loader import load_model
from keel.models.source import ModelSource
from keel.runner.cuda_graph import CudaGraphRunner, Hidden, RunnerOutput, capture_sizes
from keel.runner.forward_batch import ForwardBatch, ForwardMode
from keel.runner.sampler import SampleOutput, SamplingBatch, sample

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class SwaGroup:
    """A runner's share of a hybrid pool: which of its layers live in the sliding-window pool, its size, and the
    full->SWA page map that addresses it."""

    layers: frozenset[int]
    num_pages: int
    page_map: SwaPageMap


def resolve_device(name: str) -> torch.device:
    """The device to run on, with an explicit index for CUDA (cuda -> cuda:<current>)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`name` (auto or one of DTYPE_NAMES); auto: float32 on CPU, else the checkpoint's (float32 as bfloat16)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if checkpoint_dtype == torch.float32 else checkpoint_dtype


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, model_config: ModelConfig,
                 context_length: Optional[int] = None) -> None:
        """Load the model; `context_length` (default: config's, else the model's) bounds positions."""
        self.config = config
        self.device = resolve_device(config.device)
        self.model_config = model_config
        self.dtype = resolve_dtype(config.dtype, model_config.checkpoint_dtype, self.device)
        self.context_length = context_length or config.context_length or model_config.max_position_embeddings
        if self.context_length > model_config.max_position_embeddings:
            raise ValueError(f"{source.name}: context_length={self.context_length} exceeds the model's "
                             f"max_position_embeddings={model_config.max_position_embeddings}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.attention_backend = choose_backend(config.attention_backend, self.device, model_config.head_dim)
        start = time.perf_counter()
        self.model = load_model(source, model_config, dtype=self.dtype, device=self.device,
                                max_positions=self.context_length, load_format=config.load_format,
                                seed=config.seed, fused=self.attention_backend == "triton")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # dummy weights are drawn asynchronously: time all of it
        parameters = list(self.model.parameters())
        logger.info("Loaded %s (%s, %.1fM parameters, %.2f GiB of weights, attention %s, %s on %s) in %.1f s",
                    source.name, model_config.architecture, sum(p.numel() for p in parameters) / 1e6,
                    sum(p.numel() * p.element_size() for p in parameters) / 2**30, self.attention_backend,
                    self.dtype, self.device, time.perf_counter() - start)
        self.kv_pool: Optional[KVPool] = None
        self.req_table: Optional[ReqToTokenTable] = None
        self.attn_backend: Optional[AttentionBackend] = None
        self.cuda_graph: Optional[CudaGraphRunner] = None
        self.dp_rounds = 0  # data-parallel attention rounds this runner took part in
        self.graph_memory_measured = 0  # by measure_graph_memory, before the KV pool was sized
        self._previous_metadata: Any = None  # kept only with guard fresh-metadata off (seed 000's bug, for its test)

    def kv_bytes_per_token(self, num_layers: Optional[int] = None) -> int:
        """K/V bytes per token of `num_layers` of the model's layers (default: all)."""
        mc = self.model_config
        return KVPool.bytes_per_token(mc.num_layers if num_layers is None else num_layers, self.num_kv_heads,
                                      mc.head_dim, self.dtype)

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs. NCCL cannot tear down a communicator while a graph that holds its
        collectives is alive (its teardown waits for them), so this comes before leaving the group."""
        if self.cuda_graph is not None:
            torch.cuda.synchronize(self.device)
            self.cuda_graph = None
            gc.collect()

    @property
    def num_kv_heads(self) -> int:
        """The KV heads this rank holds (all of them without tensor parallelism)."""
        return attention_split(self.model_config.num_kv_heads, "KV heads")

    def attach_kv(self, num_pages: int, table: ReqToTokenTable, swa: Optional[SwaGroup] = None) -> None:
        """Give the model its KV pool (num_pages pages, slots addressed through `table`; `swa`: its sliding-window
        layers' group of a hybrid pool), then capture its CUDA graphs, which read both."""
        self._attach_pool(num_pages, table, swa)
        if self.graph_max_bs:
            self.cuda_graph = self._capture_graphs()

    @property
    def graph_max_bs(self) -> int:
        """The largest decode batch replayed from a CUDA graph; 0: this runner captures none."""
        config = self.config
        if self.device.type != "cuda" or self.attention_backend != "triton" or config.disable_cuda_graph:
            return 0
        return min(config.cuda_graph_max_bs, config.max_running_requests * config.rows_per_request)

    def measure_graph_memory(self) -> int:
        """The device bytes this runner's CUDA graphs will hold, measured before the KV pool is sized so that they
        come out of its budget: the largest size's graph captured on a one-page pool (the smaller sizes reuse its
        memory pool and write their logits into its buffer). An overestimate by what the first capture loads once
        (kernels, cuBLAS workspaces). 0 without graphs."""
        if not self.graph_max_bs:
            return 0
        gc.collect()
        torch.cuda.empty_cache()
        self._attach_pool(1, ReqToTokenTable(1, 1, self.device), None)
        probe = self._capture_graphs([self.graph_max_bs])
        used = probe.memory_bytes
        del probe
        self.kv_pool = self.req_table = self.attn_backend = None
        gc.collect()
        torch.cuda.empty_cache()
        self.graph_memory_measured = max(used, 0)
        return self.graph_memory_measured

    def _attach_pool(self, num_pages: int, table: ReqToTokenTable, swa: Optional[SwaGroup]) -> None:
        mc = self.model_config
        self.req_table = table
        self.kv_pool = KVPool(mc.num_layers, num_pages, self.config.page_size, self.num_kv_heads, mc.head_dim,
                              self.dtype, self.device, swa.layers if swa else frozenset(),
                              swa.num_pages if swa else 0, swa.page_map if swa else None)
        self.attn_backend = create_backend(self.attention_backend, table, self.model.attention_layers,
                                           swa.page_map if swa else None)

    def _capture_graphs(self, sizes: Optional[list[int]] = None) -> CudaGraphRunner:
        """Graphs for `sizes` (default: every capture size up to graph_max_bs)."""
        features = (self.model.input_feature_size, self.dtype) if self.model.needs_features else None
        return CudaGraphRunner(self.forward_hidden, self.model.compute_logits,
                               sizes or capture_sizes(self.graph_max_bs), self.device, features,
                               self.config.draft_tree)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [len(batch.logits_indices), vocab]; an IDLE or empty batch gives [0, vocab].
        From a CUDA graph, they stay valid until the next forward."""
        return self.forward_full(batch).logits

    @torch.inference_mode()
    def forward_full(self, batch: ForwardBatch) -> RunnerOutput:
        """The logits, and the per-token features the model emits (an EAGLE target's captured hidden states, an
        EAGLE head's own hidden states), if any."""
        if self.model.needs_features and batch.input_features is None and guard_on("optional-explicit"):
            raise ValueError(f"ForwardBatch.input_features is missing: {self.model_config.architecture} reads the "
                             "target's hidden states for every token")
        if tensor_parallel().dp_attention:
            self.dp_rounds += 1
            round_ = agree_round(batch.num_tokens, batch.mode.is_decode)
            if round_ is None:  # no rank has a token: no forward anywhere
                return RunnerOutput(torch.empty(0, self.model_config.vocab_size, device=self.device), None)
            batch = dataclasses.replace(batch, dp=round_)
        if self.cuda_graph is not None and self.cuda_graph.can_run(batch):
            return self.cuda_graph.replay(batch)
        if batch.dp is not None and batch.dp.decode and batch.batch_size < batch.dp.padded:
            batch = batch.padded_to(batch.dp.padded)  # the shape every rank runs this round
        return self.forward_eager(batch)

    def forward_idle(self) -> None:
        """This rank's part of a data-parallel round in which it has no requests: an IDLE forward (zero tokens;
        in a decode round, padding rows only), so the other ranks' gathers meet it."""
        self.forward_full(ForwardBatch.idle(self.device))

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch) -> RunnerOutput:
        """`forward_full` never through a captured graph: for capturing one (this runner's, or a caller's own)."""
        hidden, features = self.forward_hidden(batch)
        return RunnerOutput(self.model.compute_logits(hidden[batch.logits_indices]), features)

    @torch.inference_mode()
    def forward_hidden(self, batch: ForwardBatch) -> Hidden:
        """The model's final hidden states of every token of `batch` (before the LM head), and its features."""
        if self.attn_backend is None or self.kv_pool is None:
            raise RuntimeError("ModelRunner.forward before attach_kv: the runner has no KV pool")
        ctx = AttentionContext(self.attn_backend, self._metadata(batch), self.kv_pool, batch.dp)
        return self.model(batch.input_ids, batch.positions, ctx, batch.input_features)

    def _metadata(self, batch: ForwardBatch) -> Any:
        """The attention metadata of `batch`, built from it for every forward, IDLE included (guard fresh-metadata:
        with it off, an IDLE forward reuses the previous forward's metadata, seed 000's bug)."""
        if guard_on("fresh-metadata"):
            return self.attn_backend.build_metadata(batch)
        if batch.mode is not ForwardMode.IDLE or self._previous_metadata is None:
            self._previous_metadata = self.attn_backend.build_metadata(batch)
        return self._previous_metadata

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
        return sample(logits, batch)


def free_memory_bytes(device: torch.device) -> int:
    """Device memory free now (host memory on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
