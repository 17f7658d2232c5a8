"""CausalLM: what every model family shares around its decoder: the attention layers, forward, logits."""

from __future__ import annotations

import torch
from torch import nn

from keel.attention.base import AttentionContext, AttentionLayer
from keel.models.layers.embedding import LMHead


class CausalLM(nn.Module):
    """A decoder `model` whose `layers` each hold their attention spec at `self_attn.layer`, and an LM head."""

    model: nn.Module
    lm_head: LMHead

    @property
    def attention_layers(self) -> list[AttentionLayer]:
        return [layer.self_attn.layer for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Final hidden states, [tokens, hidden]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the given hidden states only (the sampled positions)."""
        return self.lm_head(hidden)
