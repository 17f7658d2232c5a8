"""Prefill/decode disaggregation: separate prefill and decode servers, the KV moved between them over NIXL."""
