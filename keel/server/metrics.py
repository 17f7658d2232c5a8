"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from keel.server.messages import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("keel_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("keel_generation_tokens", "Tokens generated", registry=r)
        self.cache_hit_tokens = Counter("keel_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache",
                                        registry=r)
        self.spec_verify_steps = Counter("keel_spec_verify_steps", "Target forwards that verified draft tokens, "
                                         "counted per request", registry=r)
        self.spec_draft_tokens = Counter("keel_spec_draft_tokens", "Draft tokens proposed and verified", registry=r)
        self.spec_accepted_tokens = Counter("keel_spec_accepted_tokens", "Draft tokens the target accepted",
                                            registry=r)
        self.requests = Counter("keel_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram("keel_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("keel_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("keel_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("keel_requests_running", "Requests holding KV in the engine", registry=r)
        self.waiting = Gauge("keel_requests_waiting", "Requests queued in the engine", registry=r)
        self.kv_pages_total = Gauge("keel_kv_pages_total", "KV pages in the pool", registry=r)
        self.kv_pages_used = Gauge("keel_kv_pages_used", "KV pages held: by requests, and cached pages requests "
                                   "share (not evictable)", registry=r)
        self.kv_pages_cached = Gauge("keel_kv_pages_cached", "KV pages held by the prefix cache", registry=r)
        self.kv_pages_evictable = Gauge("keel_kv_pages_evictable", "prefix-cache pages no request uses: free as "
                                        "soon as the pool needs them", registry=r)

        self.waiting_preallocation = Gauge("keel_disagg_waiting_preallocation", "Decode server: requests waiting "
                                           "for room to hold their KV", registry=r)
        self.transferring = Gauge("keel_disagg_transferring", "Requests holding KV while it moves between "
                                  "servers", registry=r)
        self.transfers = Gauge("keel_kv_transfers", "KV transfers so far (prefill: sent; decode: received)",
                               ["result"], registry=r)
        self.transfer_bytes = Gauge("keel_kv_transfer_bytes", "Bytes of the KV transfers done", registry=r)
        self.transfer_seconds = Gauge("keel_kv_transfer_seconds", "Time of the KV transfers done, summed (prefill: "
                                      "from the write's start; decode: from the preallocation)", registry=r)

    def render(self, stats: Optional[EngineStats]) -> bytes:
        if stats is not None:
            self.running.set(stats.running)
            self.waiting.set(stats.waiting)
            self.kv_pages_total.set(stats.pages_total)
            self.kv_pages_used.set(stats.pages_held + stats.pages_cached_locked)
            self.kv_pages_cached.set(stats.pages_cached)
            self.kv_pages_evictable.set(stats.pages_cached - stats.pages_cached_locked)
            self.waiting_preallocation.set(stats.waiting_preallocation)
            self.transferring.set(stats.transferring)
            self.transfers.labels("done").set(stats.transfers_done)
            self.transfers.labels("failed").set(stats.transfers_failed)
            self.transfer_bytes.set(stats.transfer_bytes)
            self.transfer_seconds.set(stats.transfer_seconds)
        return generate_latest(self.registry)
