"""Pool sizes: full KV alone, and the hybrid split between the full and the sliding-window pool."""

import pytest

from keel.cache.kv_plan import CPU_DEFAULT_KV_TOKENS, plan_kv
from keel.config import EngineConfig

GIB = 2**30


def test_full_kv_alone_takes_the_budget_or_the_tokens_asked_for():
    config = EngineConfig(page_size=16)
    plan = plan_kv(config, full_bytes=1000, swa_bytes=0, window=None, free_bytes=GIB, context_length=4096,
                   on_cpu=False)
    assert plan.window is None and plan.num_swa_pages == 0
    assert plan.num_pages == int(GIB * 0.8) // 1000 // 16
    assert plan_kv(EngineConfig(kv_cache_tokens=4096), 1000, 0, None, GIB, 4096, on_cpu=True).num_pages == 4096
    assert plan_kv(EngineConfig(), 10, 0, None, GIB, 4096, on_cpu=True).num_pages == CPU_DEFAULT_KV_TOKENS


def test_the_cuda_graphs_memory_comes_out_of_the_budget():
    config = EngineConfig(page_size=16)
    plain = plan_kv(config, 1000, 0, None, GIB, 4096, on_cpu=False)
    kept = plan_kv(config, 1000, 0, None, GIB, 4096, on_cpu=False, graph_bytes=GIB // 10)
    assert kept.num_pages == (int(GIB * 0.8) - GIB // 10) // 1000 // 16 < plain.num_pages
    hybrid = plan_kv(EngineConfig(page_size=16, swa_full_tokens_ratio=0.5), 1000, 1000, 64, GIB, 4096, False,
                     graph_bytes=GIB // 10)
    assert (hybrid.num_pages + hybrid.num_swa_pages) * 16 * 1000 <= int(GIB * 0.8) - GIB // 10
    with pytest.raises(ValueError, match="CUDA graphs"):  # nothing left: a clear error, not a pool of no pages
        plan_kv(config, 1000, 0, None, GIB, 4096, on_cpu=False, graph_bytes=GIB)
    assert plan_kv(EngineConfig(kv_cache_tokens=4096), 1000, 0, None, GIB, 4096, False, GIB).num_pages == 4096


def test_the_hybrid_split_spends_the_budget_on_both_pools_at_the_ratio():
    config = EngineConfig(page_size=16, swa_full_tokens_ratio=0.05, max_running_requests=1024)
    full_bytes, swa_bytes = 80_000, 400_000
    plan = plan_kv(config, full_bytes, swa_bytes, 1024, 100 * GIB, 131072, on_cpu=False)
    full, swa = plan.num_pages * 16, plan.num_swa_pages * 16
    assert swa == pytest.approx(0.05 * full, abs=16)
    assert full * full_bytes + swa * swa_bytes <= 0.8 * 100 * GIB
    assert full * full_bytes + swa * swa_bytes > 0.8 * 100 * GIB - (full_bytes + swa_bytes) * 32


def test_the_window_pool_never_drops_below_a_step_and_two_windows():
    config = EngineConfig(page_size=16, swa_full_tokens_ratio=0.01, chunked_prefill_size=2048)
    plan = plan_kv(config, 80_000, 400_000, 1024, 10 * GIB, 131072, on_cpu=False)
    least = 2048 + 2 * (1024 + 2 * 16)
    assert plan.num_swa_pages * 16 == least  # 1% of the full pool would be less
    assert plan.num_pages * 16 * 80_000 + least * 400_000 <= 0.8 * 10 * GIB  # the floor came out of the full share


def test_a_model_whose_layers_all_slide_spends_memory_on_the_window_pool_only():
    config = EngineConfig(page_size=4, max_running_requests=8)
    plan = plan_kv(config, 0, 1000, 512, GIB, 2048, on_cpu=False)
    assert plan.num_swa_pages * 4 == 8 * 2048  # every row full: more would never be used
    assert plan.num_pages * 4 == 8 * 2048  # index pages: as many as the rows can hold
    config = EngineConfig(page_size=4, kv_cache_tokens=4000, chunked_prefill_size=256)
    plan = plan_kv(config, 0, 1000, 512, GIB, 32768, on_cpu=False)
    assert plan.num_swa_pages * 4 == 4000  # --kv-cache-tokens sizes the only pool with memory
