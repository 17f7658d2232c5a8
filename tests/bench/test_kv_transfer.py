"""The KV transfer benchmark at tiny sizes on the CPU (host memory over NIXL, both agents in this process, since a
decode-side process takes seconds to start): every size's pages arrive intact, the bytes are whole pages of every
layer's K and V, and both bandwidths come out positive."""

from __future__ import annotations

import json
import math

import pytest
import torch

from keel.bench import kv_transfer
from keel.bench.kv_transfer import PoolSpec, page_checksums
from keel.cli import build_parser


def test_the_checksums_tell_a_page_with_two_bytes_swapped_from_the_original():
    spec = PoolSpec(layers=2, kv_heads=2, head_dim=4, dtype=torch.bfloat16, page_size=4, pages=6)
    a, b = spec.make(torch.device("cpu")), spec.make(torch.device("cpu"))
    for cache in (a.k_cache, a.v_cache):
        cache.normal_(generator=torch.Generator().manual_seed(0))
    b.k_cache.copy_(a.k_cache)
    b.v_cache.copy_(a.v_cache)
    assert torch.equal(page_checksums(a, [3, 1]), page_checksums(b, [3, 1]))
    assert page_checksums(a, [3, 1]).shape == (2 * 2, 2)  # (K and V of each layer, page)
    page = b.v_cache[1, 12:16].view(-1)  # layer 1, page 3
    page[[0, 5]] = page[[5, 0]].clone()
    assert not torch.equal(page_checksums(a, [3]), page_checksums(b, [3]))
    assert torch.equal(page_checksums(a, [1]), page_checksums(b, [1]))


def test_the_benchmark_moves_every_size_intact_at_positive_bandwidth(tmp_path, capsys):
    pytest.importorskip("nixl_cu13")
    results = tmp_path / "r.jsonl"
    args = build_parser().parse_args([
        "bench", "kv-transfer", "--model", "llama-3.2-1b", "--layers", "2", "--tokens", "8", "30", "--page-size",
        "4", "--order", "shuffled", "contiguous", "--repeats", "2", "--warmup", "1", "--devices", "cpu", "cpu",
        "--same-process", "--result-file", str(results)])
    rows = kv_transfer.run(args)
    page_bytes = 4 * 2 * 2 * 8 * 64 * 2  # tokens x (K, V) x layers x KV heads x head_dim x bf16 bytes
    assert [(r.order, r.tokens) for r in rows] == [("shuffled", 8), ("shuffled", 30), ("contiguous", 8),
                                                   ("contiguous", 30)]
    for row in rows:
        assert row.correct
        assert row.bytes == math.ceil(row.tokens / 4) * page_bytes
        assert row.nixl_gbps > 0 and row.copy_gbps > 0 and 0 < row.setup_s <= row.nixl_s
    assert [json.loads(line)["correct"] for line in results.read_text().splitlines()] == [True] * 4
    assert "nixl GB/s" in capsys.readouterr().out
