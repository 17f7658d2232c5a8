"""`keel bench capacity`: how many requests of a given length the KV pools hold at once, from the pool sizes keel
plans for the model (the same plan `keel serve` reports at start), without running any.

A request of L tokens holds L tokens of the full pool; on a hybrid pool it also holds the window before its
newest token in the sliding-window pool (the window rounded up to pages, and one page more for the token being
written). Run it twice, with and without --disable-hybrid-swa-memory, to compare the two layouts.
"""

from __future__ import annotations

import argparse

import keel
from keel.bench.common import append_result, environment
from keel.config import EngineConfig, add_dataclass_arguments, dataclass_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context-lens", type=int, nargs="+", default=[32768],
                        help="request lengths (prompt + output tokens) to count")
    parser.add_argument("--result-file", default="bench_results.jsonl")
    add_dataclass_arguments(parser.add_argument_group("engine options"), EngineConfig)


def requests_that_fit(full_tokens: int, swa_tokens: int, window: int | None, page_size: int, length: int) -> int:
    """Requests of `length` tokens the pools hold at once (`window` None: no sliding-window pool)."""
    fit = full_tokens // length
    if window is None:
        return fit
    window_pages = -(-min(window, length) // page_size) + 1
    return min(fit, swa_tokens // (window_pages * page_size))


def run(args: argparse.Namespace) -> list[dict]:
    options = dataclass_kwargs(args, EngineConfig)
    engine = keel.Engine(options.pop("model"), **options)
    kv, runner = engine.core.kv_cache, engine.core.runner
    ps = kv.page_size
    full_tokens = kv.pages.capacity * ps
    swa_tokens = kv.swa.allocator.capacity * ps if kv.swa is not None else 0
    results = []
    for length in args.context_lens:
        record = {**environment(runner.device), "bench": "capacity", "model": engine.config.model,
                  "hybrid": kv.swa is not None, "window": kv.window, "page_size": ps,
                  "swa_full_tokens_ratio": engine.config.swa_full_tokens_ratio, "full_pool_tokens": full_tokens,
                  "swa_pool_tokens": swa_tokens, "kv_bytes": runner.kv_pool.bytes_allocated, "context_len": length,
                  "requests_that_fit": requests_that_fit(full_tokens, swa_tokens, kv.window, ps, length)}
        append_result(args.result_file, record)
        results.append(record)
        layout = (f"hybrid (full pool {full_tokens} tokens, sliding-window pool {swa_tokens} tokens, window "
                  f"{kv.window})" if kv.swa is not None else f"full KV ({full_tokens} tokens)")
        print(f"{record['model']} {layout}, {record['kv_bytes'] / 2**30:.1f} GiB of KV: "
              f"{record['requests_that_fit']} requests of {length} tokens at once")
    return results
