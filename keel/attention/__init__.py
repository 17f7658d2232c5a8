"""Attention backends."""

from __future__ import annotations

import torch

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


def choose_backend(name: str, device: torch.device, head_dim: int) -> str:
    """The backend `name` asks for; "auto" is triton on a GPU where its kernels fit the head size, else torch."""
    if name != "auto":
        return name
    from keel.kernels.decode_attention import supports_head_dim

    return "triton" if device.type == "cuda" and supports_head_dim(head_dim) else "torch"
