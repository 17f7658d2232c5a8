"""A run's own roofline: what the steps it actually took had to do, and the time the hardware needs for that.

Each step reads its weights once (the experts its tokens select, in expectation, for a mixture of experts) and
every request's KV up to the tokens it adds, writes the new tokens' KV, and computes 2 x (active parameters) FLOPs
per token plus attention's 4 x heads x head_dim per (query, key) pair. Its roofline time is the larger of its
bytes over the HBM bandwidth and its FLOPs over the matmul rate, both measured in the same run; the run's roofline
is the sum over its steps. A benchmark reports its time against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.bench.common import median_time, weight_bytes_read_per_step
from keel.cache.kv_pool import KVPool
from keel.models.layers.moe import SparseMoE
from keel.scheduler.scheduler import BatchPart, ScheduledBatch


@dataclass
class RooflineTotals:
    steps: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0  # the sum of each step's max(bytes / HBM, FLOPs / matmul)

    def report(self, elapsed_s: float, hbm: float, matmul: float) -> dict:
        return {"roofline_steps": self.steps, "roofline_bytes": self.bytes, "roofline_flops": self.flops,
                "roofline_s": self.seconds, "hbm_bw": hbm, "matmul_flops": matmul,
                "roofline_fraction": self.seconds / elapsed_s if elapsed_s > 0 else float("nan")}


class StepRoofline:
    """Called with every batch the engine schedules (EngineCore.on_schedule); sums their roofline."""

    def __init__(self, runner, hbm: float, matmul: float) -> None:
        mc = runner.model_config
        self.model, self.hbm, self.matmul = runner.model, hbm, matmul
        self.windows = mc.sliding_windows
        self.kv_layer_bytes = KVPool.bytes_per_token(1, runner.num_kv_heads, mc.head_dim, runner.dtype)
        self.attention_flops = 4 * attention_heads(runner) * mc.head_dim  # per layer and (query, key) pair
        self.matmul_params = active_matmul_params(runner.model)
        self.totals = RooflineTotals()
        self._weights_by_tokens: dict[int, float] = {}  # a walk over every parameter: once per batch size

    def _weight_bytes(self, tokens: int) -> float:
        if tokens not in self._weights_by_tokens:
            self._weights_by_tokens[tokens] = weight_bytes_read_per_step(self.model, tokens)
        return self._weights_by_tokens[tokens]

    def __call__(self, batch: ScheduledBatch) -> None:
        tokens = sum(p.extend_len for p in batch.parts)
        if tokens == 0:
            return
        step_bytes = self._weight_bytes(tokens) + sum(self._kv_bytes(p) for p in batch.parts)
        step_flops = 2 * self.matmul_params * tokens + sum(self._attention_flops(p) for p in batch.parts)
        t = self.totals
        t.steps += 1
        t.bytes += step_bytes
        t.flops += step_flops
        t.seconds += max(step_bytes / self.hbm, step_flops / self.matmul)

    def _kv_bytes(self, part: BatchPart) -> float:
        """Its KV read once per layer (a sliding-window layer only its window), and the new tokens' KV written."""
        read = sum(min(part.seq_len, w or part.seq_len) for w in self.windows)
        return self.kv_layer_bytes * (read + part.extend_len * len(self.windows))

    def _attention_flops(self, part: BatchPart) -> float:
        return self.attention_flops * attention_pairs(part.extend_len, part.seq_len - part.extend_len, self.windows)


def attention_pairs(new_tokens: int, prefix: int, windows: tuple) -> int:
    """(query, key) pairs over the layers when `new_tokens` follow `prefix` cached ones: causal, the i-th new token
    attends to the prefix and the new tokens up to itself (at most its window)."""
    full = new_tokens * prefix + new_tokens * (new_tokens + 1) // 2
    return sum(full if w is None else min(full, new_tokens * w) for w in windows)


def prefill_flops(runner, batch_size: int, input_len: int) -> float:
    """Matmul FLOPs of prefilling `batch_size` prompts of `input_len` tokens, attention included."""
    mc = runner.model_config
    tokens = batch_size * input_len
    attention = 4 * attention_heads(runner) * mc.head_dim * batch_size * attention_pairs(input_len, 0,
                                                                                          mc.sliding_windows)
    return 2 * active_matmul_params(runner.model) * tokens + attention


def attention_heads(runner) -> int:
    """Query heads this rank computes."""
    from keel.distributed.parallel import attention_split

    return attention_split(runner.model_config.num_heads, "attention heads")


def active_matmul_params(model: torch.nn.Module) -> float:
    """Parameters a token multiplies by: all but the embedding table (a lookup), and of each mixture of experts
    only its top-k experts' share."""
    total = float(sum(p.numel() for p in model.parameters()))
    total -= model.model.embed_tokens.weight.numel()
    if getattr(model.lm_head, "tied", False):
        total += model.model.embed_tokens.weight.numel()  # the LM head multiplies by the shared table
    for module in model.modules():
        if isinstance(module, SparseMoE):
            experts = sum(p.numel() for p in module.experts.parameters())
            total -= experts * (1 - module.top_k / module.gate.out_features)
    return total


def measure_matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype` (median of repeats); NaN off the GPU, where it means little."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / median_time(lambda: a @ b, device, repeats)
