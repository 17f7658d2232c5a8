"""Attention backends."""

from __future__ import annotations

from typing import Optional

import torch

from keel.attention.base import AttentionBackend, AttentionLayer
from keel.attention.torch_native import TorchNativeBackend
from keel.cache.req_table import ReqToTokenTable
from keel.cache.swa_pages import SwaPageMap


def create_backend(name: str, req_table: ReqToTokenTable, layers: list[AttentionLayer],
                   swa_map: Optional[SwaPageMap] = None) -> AttentionBackend:
    """`swa_map`: how the layers a hybrid pool keeps in its sliding-window group address their K/V."""
    if name == "torch":
        return TorchNativeBackend(req_table, tuple(layer.sliding_window for layer in layers), swa_map)
    if name == "triton":
        from keel.attention.triton import TritonBackend  # imports Triton only when asked for

        return TritonBackend(req_table, layers, swa_map)
    raise ValueError(f"unknown attention backend {name!r}")


def choose_backend(name: str, device: torch.device, head_dim: int) -> str:
    """The backend `name` asks for; "auto" is triton on a GPU where its kernels fit the head size, else torch."""
    if name != "auto":
        return name
    from keel.kernels.decode_attention import supports_head_dim

    return "triton" if device.type == "cuda" and supports_head_dim(head_dim) else "torch"
