"""How many KV pages each pool gets: the full pool, and on a hybrid model the sliding-window pool.

The memory budget is --kv-cache-tokens (full-pool tokens), or --mem-fraction of the memory free once every model
is loaded, less what the CUDA graphs will hold (measured before, see ModelRunner.measure_graph_memory). A hybrid
pool splits it so that the SWA pool holds `swa_full_tokens_ratio` tokens per full-pool token (SGLang's
--swa-full-tokens-ratio), but never fewer than one step's prefill and two windows (see `least_swa`), so a request
can always make progress. A model whose layers all slide keeps no full K/V at all: its full pages only
index tokens (the request table, the prefix cache), so they cost no device memory and are sized from the requests
they must cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from keel.config import EngineConfig

# Without a GPU the KV pool defaults to at most this many tokens: enough for tests and demos,
# and small enough not to claim the machine's memory.
CPU_DEFAULT_KV_TOKENS = 16384
# An all-sliding model's full pages are host-side indices only; this many per SWA page is plenty and bounds the
# host tables.
INDEX_PAGES_PER_SWA_PAGE = 4


@dataclass(frozen=True)
class KVPlan:
    num_pages: int  # full pages
    num_swa_pages: int  # sliding-window pages; 0 without a hybrid pool
    window: Optional[int]  # the widest sliding window of a hybrid pool; None: no hybrid pool

    def describe(self, page_size: int, full_bytes: int, swa_bytes: int) -> str:
        full = f"{self.num_pages * page_size} tokens in {self.num_pages} pages of {page_size} " \
               f"({self.num_pages * page_size * full_bytes / 2**30:.2f} GiB)"
        if self.window is None:
            return full
        return (f"full {full}; sliding window {self.num_swa_pages * page_size} tokens "
                f"({self.num_swa_pages * page_size * swa_bytes / 2**30:.2f} GiB, window {self.window})")


def plan_kv(config: EngineConfig, full_bytes: int, swa_bytes: int, window: Optional[int], free_bytes: int,
            context_length: int, on_cpu: bool, graph_bytes: int = 0) -> KVPlan:
    """Pages per pool: `full_bytes` / `swa_bytes` are the K/V bytes per token of the layers in each (every
    runner's; swa_bytes and window only for a hybrid pool), `free_bytes` the memory free for KV and the CUDA
    graphs, `graph_bytes` what the graphs will take of it."""
    ps = config.page_size
    most_tokens = config.max_running_requests * context_length  # every request row full
    budget = int(free_bytes * config.mem_fraction) - graph_bytes
    if budget <= 0 and config.kv_cache_tokens is None:
        raise ValueError(f"no memory left for the KV pool: mem_fraction {config.mem_fraction} of "
                         f"{free_bytes / 2**30:.2f} GiB free, less {graph_bytes / 2**30:.2f} GiB for CUDA graphs; "
                         "raise mem_fraction, lower cuda_graph_max_bs or set kv_cache_tokens")
    if window is None:
        tokens = config.kv_cache_tokens
        if tokens is None:
            tokens = min(budget // full_bytes, most_tokens)
            if on_cpu:
                tokens = min(tokens, CPU_DEFAULT_KV_TOKENS)
        return KVPlan(_pages(tokens, ps, "KV pool"), 0, None)
    ratio = config.swa_full_tokens_ratio
    step = min(config.max_prefill_tokens, config.chunked_prefill_size or context_length)
    # one step's prefill, the window before it, and the window before the end of a cached prefix the request
    # reuses (kept for later requests), each page-rounded
    least_swa = step + 2 * (window + 2 * ps)
    if full_bytes == 0:  # every layer slides
        swa = config.kv_cache_tokens  # the only pool with memory
        if swa is None:
            swa = min(budget // swa_bytes, most_tokens)
            if on_cpu:
                swa = min(swa, CPU_DEFAULT_KV_TOKENS)
        full = min(most_tokens, INDEX_PAGES_PER_SWA_PAGE * max(swa, least_swa))
    else:
        full = config.kv_cache_tokens
        if full is None:
            full = min(int(budget // (full_bytes + ratio * swa_bytes)), most_tokens)
            if on_cpu:
                full = min(full, CPU_DEFAULT_KV_TOKENS)
        swa = int(full * ratio)
        if swa < least_swa and config.kv_cache_tokens is None:  # the floor comes out of the full pool's share
            full = max(ps, min(full, (budget - least_swa * swa_bytes) // full_bytes))
    swa = min(max(swa, least_swa), full)
    return KVPlan(_pages(full, ps, "KV pool"), _pages(swa, ps, "sliding-window KV pool"), window)


def _pages(tokens: int, page_size: int, what: str) -> int:
    pages = tokens // page_size
    if pages < 1:
        raise ValueError(f"{what} of {tokens} tokens holds no page of {page_size} tokens; raise kv_cache_tokens or "
                         "mem_fraction")
    return pages
