"""What the benchmarks share: the machine's measured memory bandwidth, timing, and the results file."""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from keel.models.layers.moe import SparseMoE


def environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": gpu,
            "torch": torch.__version__}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_hbm_bandwidth(device: torch.device, gib: float = 4.0, repeats: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median of repeats)."""
    if device.type != "cuda":
        return float("nan")
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds


def weight_bytes_read_per_step(model: nn.Module, batch_size: int = 1) -> float:
    """Parameter bytes a decode step of `batch_size` rows reads on this rank: all of them, except an untied
    embedding table (only the batch's rows of it are read) and, in a mixture of experts, the experts no row
    selects (expected: each of E experts is missed by all rows with probability (1 - k/E) ** rows, routing
    taken as uniform)."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, SparseMoE):
            share = 1 - (1 - module.top_k / module.gate.out_features) ** batch_size  # gate: one logit per expert
            total -= (1 - share) * sum(p.numel() * p.element_size() for p in module.experts.parameters())
    total += sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    if not getattr(model.lm_head, "tied", False):
        total -= embed.numel() * embed.element_size()
    return total


def hf_model_like(engine) -> nn.Module:
    """A transformers model of the engine's architecture, dtype and device, with random weights: the
    `--compare hf` baseline on the same work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from keel.models.source import resolve_model

    runner = engine.core.runner
    config = AutoConfig.from_pretrained(resolve_model(engine.config.model).path)
    with torch.device(runner.device):
        return AutoModelForCausalLM.from_config(config, dtype=runner.dtype).eval()


def append_result(path: str, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
