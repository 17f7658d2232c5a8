"""The attention backend protocol.

DESIGN rule "metadata is a value": a backend turns a ForwardBatch into metadata with
`build_metadata`, once per forward; the runner passes that value down to every layer in an
AttentionContext that lives for that forward only. Backends keep no "current batch" state,
so an idle or empty forward cannot see the previous forward's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch

from keel.cache.kv_pool import KVPool
from keel.distributed.dp_attention import DpRound
from keel.runner.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from keel.models.layers.norm import RMSNorm
    from keel.models.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class AttentionLayer:
    """What a backend needs to know about one attention layer."""

    layer_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: Optional[int]  # None: full causal attention
    softcap: Optional[float] = None  # scores become softcap * tanh(score / softcap) (Gemma 2); None: as they are


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding this forward's q and k still need, and the RMSNorm of each of their heads
    before it (Qwen3's `q_norm` / `k_norm`, both or neither). The backend applies them, fused with its
    KV store where it can (Triton: one kernel normalises and rotates q and k and stores k and v)."""

    rotary: RotaryEmbedding
    positions: torch.Tensor
    q_norm: Optional[RMSNorm] = None
    k_norm: Optional[RMSNorm] = None


class AttentionBackend(Protocol):
    def build_metadata(self, batch: ForwardBatch) -> Any:
        """Everything the kernels need for this batch; computed once, read by every layer."""
        ...

    def forward(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_pool: KVPool, metadata: Any, rotation: Optional[Rotation]) -> torch.Tensor:
        """Rotate q and k (when `rotation` is given), store this forward's k/v in the pool, then
        attend. q: [tokens, heads, head_dim], k/v: [tokens, kv_heads, head_dim]; returns
        [tokens, heads * head_dim]. q and k may be changed in place."""
        ...


@dataclass(frozen=True)
class AttentionContext:
    """The state of one forward that every layer reads, handed to it explicitly: the attention metadata, and under
    data-parallel attention the round the MLP layers gather over."""

    backend: AttentionBackend
    metadata: Any
    kv_pool: KVPool
    dp: Optional[DpRound] = None

    def attend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rotation: Optional[Rotation] = None) -> torch.Tensor:
        return self.backend.forward(layer, q, k, v, self.kv_pool, self.metadata, rotation)
