"""EAGLE draft heads, in their published checkpoint layouts (SGLang's LlamaForCausalLMEagle / ...Eagle3).

A head drafts from the target's hidden states as well as tokens. Draft position p reads the token at p + 1 and
a hidden state for p: the target's (its features at p) when p's token was verified, else the head's own output
at p - 1 while it drafts ahead. Its KV has one layer and the target's slots (keel.spec.eagle does the driving).

- EAGLE-3 (`LlamaForCausalLMEagle3`): the target hands over the inputs of three of its layers (a low, a middle
  and a high one), which `fc` projects to one hidden state; one decoder layer attends over
  [norm(token embedding), norm(hidden)]; the head's vocabulary is a subset of the target's, mapped by `d2t`
  (target id = draft id + d2t[draft id]).
- EAGLE (`LlamaForCausalLMEagle`, EAGLE-1/2): the target hands over its final normed hidden state; `fc` mixes
  [token embedding, hidden]; decoder layers follow (the first without its input norm); the LM head is the
  target's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from keel.attention.base import AttentionContext, AttentionLayer
from keel.models.causal_lm import FeatureCapture
from keel.models.config import ModelConfig
from keel.models.layers.embedding import LMHead, VocabEmbedding
from keel.models.layers.linear import Linear
from keel.models.layers.norm import RMSNorm
from keel.models.layers.rotary import RotaryEmbedding
from keel.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


@dataclass(frozen=True)
class EagleHeadConfig:
    """What a head's config.json says beyond a Llama config."""

    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: Optional[tuple[int, ...]]  # EAGLE-3: target layers whose outputs it reads (default: its rule)

    @classmethod
    def read(cls, directory: Path, config: ModelConfig) -> "EagleHeadConfig":
        raw = json.loads((directory / "config.json").read_text())
        eagle = raw.get("eagle_config") or {}
        ids = eagle.get("eagle_aux_hidden_state_layer_ids")
        return cls(raw.get("draft_vocab_size") or config.vocab_size,
                   raw.get("target_hidden_size") or config.hidden_size, tuple(ids) if ids else None)


class EagleHead(nn.Module):
    """What both heads share: the contract keel's runner and drafter rely on."""

    FUSED_WEIGHTS = LlamaForCausalLM.FUSED_WEIGHTS
    IGNORED_WEIGHTS: tuple[str, ...] = ()
    FROM_TARGET: tuple[str, ...] = ()  # parameters a checkpoint may leave out: the target's are used
    needs_features = True
    capture: Optional[FeatureCapture] = None
    embed_tokens: VocabEmbedding
    lm_head: LMHead
    loaded_from_checkpoint: set[str] = set()  # set by the loader
    # the target's token id of each column of compute_logits' output; None: the same ids (a full-vocabulary head)
    target_ids: Optional[torch.Tensor] = None

    def __init__(self, config: ModelConfig, head: EagleHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.head = head
        self.input_feature_size = config.hidden_size

    def target_capture(self, target_layers: int) -> FeatureCapture:
        """The hidden states this head needs from a target of `target_layers` layers."""
        raise NotImplementedError

    def project_target_features(self, features: torch.Tensor) -> torch.Tensor:
        """The target's captured features as this head's input hidden state."""
        return features

    def share_target(self, target: nn.Module) -> None:
        """Use the target's weights for what the checkpoint left out."""
        if "embed_tokens.weight" not in self.loaded_from_checkpoint:
            self.embed_tokens.weight = target.model.embed_tokens.weight


class LlamaForCausalLMEagle3(EagleHead):
    IGNORED_WEIGHTS = ("t2d",)  # target -> draft membership; only d2t is needed to map drafts back
    FROM_TARGET = ("embed_tokens.weight",)

    def __init__(self, config: ModelConfig, max_positions: int, fused: bool = False,
                 head: Optional[EagleHeadConfig] = None) -> None:
        head = head or EagleHeadConfig(config.vocab_size, config.hidden_size, None)
        super().__init__(config, head)
        hidden = config.hidden_size
        self.embed_tokens = VocabEmbedding(config.vocab_size, hidden)
        self.fc = Linear(3 * head.target_hidden_size, hidden, fused=fused)
        rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions)
        self.midlayer = _Eagle3Layer(config, rotary, fused)
        self.norm = RMSNorm(hidden, config.rms_norm_eps, fused)
        self.lm_head = LMHead(head.draft_vocab_size, hidden, fused=fused)
        # target id = draft id + d2t[draft id]; zeros (the identity) until a checkpoint fills it
        self.d2t = nn.Parameter(torch.zeros(head.draft_vocab_size, dtype=torch.int64), requires_grad=False)

    @property
    def attention_layers(self) -> list[AttentionLayer]:
        return [self.midlayer.self_attn.layer]

    def target_capture(self, target_layers: int) -> FeatureCapture:
        ids = self.head.aux_layer_ids
        # the inputs of layers 2, n/2 and n-3 by default; explicit ids name layers whose outputs are read
        layers = tuple(i + 1 for i in ids) if ids else (2, target_layers // 2, target_layers - 3)
        return FeatureCapture(layers=layers)

    def project_target_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def share_target(self, target: nn.Module) -> None:
        super().share_target(target)
        if self.head.draft_vocab_size != self.config.vocab_size or bool(self.d2t.any()):  # d2t is loaded by now
            self.target_ids = torch.arange(self.head.draft_vocab_size, device=self.d2t.device) + self.d2t

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                input_features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed hidden states for the logits, the pre-norm ones: the next draft position's input)."""
        assert input_features is not None  # ModelRunner checks it (guard optional-explicit)
        hidden = self.midlayer(positions, self.embed_tokens(input_ids), input_features.clone(), ctx)
        return self.norm(hidden), hidden

    def compute_logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits over the draft vocabulary (`target_ids` maps its ids to the target's): the drafter picks
        its tokens among 32k columns rather than a 128k-column copy that is -inf outside them."""
        return self.lm_head(hidden, out)


class _Eagle3Layer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, fused: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps, fused)  # of the token embedding
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps, fused)  # of the incoming hidden state
        self.self_attn = LlamaAttention(config, 0, rotary, qkv_bias=False, qk_norm=False, fused=fused,
                                        input_size=2 * hidden)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps, fused)
        self.mlp = LlamaMLP(config, fused)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        """The residual stream `hidden` after the layer, updated in place."""
        both = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = self.self_attn(positions, both, None, ctx, residual=hidden)
        return self.mlp(hidden, self.post_attention_layernorm)


class LlamaForCausalLMEagle(EagleHead):
    IGNORED_WEIGHTS = ("lm_head.weight",)  # the target's LM head is used
    FROM_TARGET = ("embed_tokens.weight", "lm_head.weight")

    def __init__(self, config: ModelConfig, max_positions: int, fused: bool = False,
                 head: Optional[EagleHeadConfig] = None) -> None:
        super().__init__(config, head or EagleHeadConfig(config.vocab_size, config.hidden_size, None))
        hidden = config.hidden_size
        self.embed_tokens = VocabEmbedding(config.vocab_size, hidden)
        self.fc = Linear(2 * hidden, hidden, bias=True)
        rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, False, False, fused) for i in range(config.num_layers))
        self.layers[0].input_layernorm = None  # EAGLE's first layer reads fc's output as it is
        self.lm_head = LMHead(config.vocab_size, hidden, fused=fused)

    @property
    def attention_layers(self) -> list[AttentionLayer]:
        return [layer.self_attn.layer for layer in self.layers]

    def target_capture(self, target_layers: int) -> FeatureCapture:
        return FeatureCapture(final=True)

    def share_target(self, target: nn.Module) -> None:
        super().share_target(target)
        self.lm_head.weight = target.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                input_features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states for the logits, the same: the next draft position's input). EAGLE applies no final norm."""
        assert input_features is not None  # ModelRunner checks it (guard optional-explicit)
        hidden = self.fc(torch.cat([self.embed_tokens(input_ids), input_features], dim=-1))
        for layer in self.layers:
            hidden = layer(positions, hidden, ctx)
        return hidden, hidden

    def compute_logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(hidden, out)


# --speculative-algorithm -> the head architecture it loads
EAGLE_HEADS = {"EAGLE": "LlamaForCausalLMEagle", "EAGLE3": "LlamaForCausalLMEagle3"}
