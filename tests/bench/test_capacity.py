"""`keel bench capacity`: requests of a length that the planned pools hold (CPU, tiny models)."""

from __future__ import annotations

from keel.bench import capacity
from keel.bench.capacity import requests_that_fit
from keel.cli import build_parser


def test_a_request_holds_its_tokens_in_the_full_pool_and_a_window_and_a_page_in_the_window_pool():
    assert requests_that_fit(100_000, 0, None, 16, 30_000) == 3
    assert requests_that_fit(1_000_000, 10_400, 1024, 16, 32768) == 10  # 1,024 + 16 tokens each
    assert requests_that_fit(100_000, 10_400, 1024, 16, 32768) == 3  # the full pool binds
    assert requests_that_fit(100_000, 10_400, 1024, 16, 100) == 81  # a short request's window: itself and a page


def test_hybrid_and_full_layouts_of_one_model(tiny_model, tmp_path, capsys):
    directory, _ = tiny_model("qwen2-window")  # window 8
    base = ["bench", "capacity", "--model", str(directory), "--device", "cpu", "--dtype", "float32",
            "--page-size", "4", "--kv-cache-tokens", "4096", "--chunked-prefill-size", "64", "--context-lens", "256",
            "--result-file",
            str(tmp_path / "r.jsonl")]
    (hybrid,) = capacity.run(build_parser().parse_args(base + ["--swa-full-tokens-ratio", "0.05"]))
    (full,) = capacity.run(build_parser().parse_args(base + ["--disable-hybrid-swa-memory"]))
    assert hybrid["hybrid"] and not full["hybrid"]
    assert full["requests_that_fit"] == 4096 // 256 == hybrid["requests_that_fit"]  # the same full pool
    assert hybrid["kv_bytes"] < full["kv_bytes"]  # the window layer's K/V in the smaller pool
    assert "requests of 256 tokens at once" in capsys.readouterr().out
