"""Attention backends."""

from __future__ import annotations

from keel.attention.base import AttentionBackend, AttentionLayer
from keel.attention.torch_native import TorchNativeBackend
from keel.cache.req_table import ReqToTokenTable


def create_backend(name: str, req_table: ReqToTokenTable, layers: list[AttentionLayer]) -> AttentionBackend:
    windows = tuple(layer.sliding_window for layer in layers)
    if name == "torch":
        return TorchNativeBackend(req_table, windows)
    raise ValueError(f"unknown attention backend {name!r}")
