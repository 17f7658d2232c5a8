"""Attention backends."""

from __future__ import annotations

from keel.attention.base import AttentionBackend, AttentionLayer
from keel.attention.torch_native import TorchNativeBackend
from keel.cache.req_table import ReqToTokenTable


def create_backend(name: str, req_table: ReqToTokenTable, layers: list[AttentionLayer]) -> AttentionBackend:
    if name == "torch":
        return TorchNativeBackend(req_table, tuple(layer.sliding_window for layer in layers))
    if name == "triton":
        from keel.attention.triton import TritonBackend  # imports Triton only when asked for

        return TritonBackend(req_table, layers)
    raise ValueError(f"unknown attention backend {name!r}")
