"""A run's own roofline (keel/bench/roofline.py): the bytes and FLOPs of the steps it took, counted by hand for
one request on a tiny model, and reported by `keel bench offline` (CPU: the figures mean nothing, the sums do)."""

from __future__ import annotations

import math

import keel
from keel.bench import offline
from keel.bench.common import weight_bytes_read_per_step
from keel.bench.roofline import StepRoofline, active_matmul_params
from keel.cache.kv_pool import KVPool
from keel.cli import build_parser


def test_the_steps_of_one_request_counted_by_hand(tiny_model, make_engine):
    directory, _ = tiny_model("llama3")
    engine = make_engine(directory, disable_radix_cache=True)
    runner, mc = engine.core.runner, engine.core.model_config
    roofline = StepRoofline(runner, hbm=1e12, matmul=1e14)
    engine.core.on_schedule = roofline
    engine.generate([list(range(1, 11))], keel.SamplingParams(max_new_tokens=5, ignore_eos=True))
    # a 10-token prefill, then 4 decode steps at KV lengths 11..14
    totals, layers = roofline.totals, mc.num_layers
    assert totals.steps == 5
    pairs = 10 * 11 // 2 + sum(range(11, 15))  # causal (query, key) pairs per layer
    params = active_matmul_params(runner.model)
    assert math.isclose(totals.flops, 2 * params * 14 + 4 * mc.num_heads * mc.head_dim * layers * pairs)
    kv_token = KVPool.bytes_per_token(layers, mc.num_kv_heads, mc.head_dim, runner.dtype)
    weights = weight_bytes_read_per_step(runner.model, 10) + 4 * weight_bytes_read_per_step(runner.model, 1)
    assert math.isclose(totals.bytes, weights + kv_token * (sum([10, 11, 12, 13, 14]) + 14))
    assert totals.seconds >= max(totals.bytes / 1e12, totals.flops / 1e14)


def test_bench_offline_reports_its_roofline(tiny_model, tmp_path, capsys):
    directory, _ = tiny_model("llama3")
    args = build_parser().parse_args(
        ["bench", "offline", "--model", str(directory), "--device", "cpu", "--dtype", "float32", "--num-prompts", "4",
         "--input-len", "5", "9", "--output-len", "3", "6", "--result-file", str(tmp_path / "r.jsonl")])
    record = offline.run(args)
    assert record["roofline_steps"] > 0 and record["roofline_bytes"] > 0 and record["roofline_flops"] > 0
    assert "roofline:" in capsys.readouterr().out


def test_bench_latency_counts_its_prefill_flops(tiny_model, tmp_path):
    from keel.bench import latency
    from keel.bench.roofline import prefill_flops

    directory, _ = tiny_model("llama3")
    args = build_parser().parse_args(
        ["bench", "latency", "--model", str(directory), "--device", "cpu", "--dtype", "float32", "--batch-sizes", "2",
         "--input-lens", "10", "--output-len", "4", "--runs", "1", "--result-file", str(tmp_path / "r.jsonl")])
    (record,) = latency.run(args)
    engine = keel.Engine(str(directory), device="cpu", dtype="float32")
    runner, mc = engine.core.runner, engine.core.model_config
    by_hand = 2 * active_matmul_params(runner.model) * 20 + 4 * mc.num_heads * mc.head_dim * mc.num_layers * 2 * 55
    assert math.isclose(record["prefill_flops"], by_hand) and math.isclose(prefill_flops(runner, 2, 10), by_hand)
    assert "prefill_matmul_fraction" in record
