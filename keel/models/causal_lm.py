"""CausalLM: what every model family shares around its decoder: the attention layers, forward, logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from keel.attention.base import AttentionContext, AttentionLayer
from keel.models.layers.embedding import LMHead


@dataclass(frozen=True)
class FeatureCapture:
    """Hidden states an EAGLE drafter reads from the target, per token: the inputs of `layers` concatenated
    (EAGLE-3: a low, a middle and a high layer), or the final normed hidden state (`final`, EAGLE)."""

    layers: tuple[int, ...] = ()
    final: bool = False


class CausalLM(nn.Module):
    """A decoder `model` whose `layers` each hold their attention spec at `self_attn.layer`, and an LM head."""

    model: nn.Module
    lm_head: LMHead
    needs_features = False  # a drafter head that reads hidden states (ForwardBatch.input_features)
    capture: Optional[FeatureCapture] = None  # set on a target that feeds an EAGLE drafter

    @property
    def attention_layers(self) -> list[AttentionLayer]:
        return [layer.self_attn.layer for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                input_features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(final hidden states [tokens, hidden], the features `capture` asks for [tokens, dim] or None)."""
        if self.capture is None:
            return self.model(input_ids, positions, ctx), None
        hidden, captured = self.model.forward_capturing(input_ids, positions, ctx, self.capture.layers)
        return hidden, hidden if self.capture.final else torch.cat(captured, dim=-1)

    def compute_logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits for the given hidden states only (the sampled positions), written into `out` when
        given."""
        return self.lm_head(hidden, out)
