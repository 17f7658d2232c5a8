"""Gemma 3, text only (`Gemma3ForCausalLM`, model_type "gemma3_text"), and Gemma 2 (`Gemma2ForCausalLM`).

Against the Llama decoder: Gemma's RMSNorm (scale 1 + weight, applied in float32) everywhere, also
on each head of q and k before the rotation; "sandwich" norms, so the attention and MLP outputs
are normalised before their residual adds; a GELU-tanh gated MLP; embeddings scaled by
sqrt(hidden_size); attention scale query_pre_attn_scalar ** -0.5; tied embeddings; and per layer
type (`layer_types`) a sliding window or full attention, each with its own RoPE. Gemma 2 is the same
decoder without the q/k norms, with one RoPE, and with soft-capping: attention scores and the final logits
become cap * tanh(x / cap) (the attention backends apply the first).

Keel's fused paths (llama.py) apply a norm inside the projection after it and the residual add
inside the projection before it. Here a norm sits between a projection and its residual add, and
Gemma's norm rounds differently from the fused norm kernel, so norms, activation and adds run in
plain torch even when `fused`; the projections still take `fused` (their one-row GEMV) and
attention goes through the selected backend, so the Triton kernels and CUDA graphs apply.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from keel.attention.base import AttentionContext, AttentionLayer, Rotation
from keel.distributed.parallel import attention_parallel, attention_split
from keel.models.causal_lm import CausalLM
from keel.models.config import ModelConfig
from keel.models.layers.activation import GeluTanhAndMul
from keel.models.layers.embedding import LMHead, VocabEmbedding
from keel.models.layers.linear import FusedLinear, Linear
from keel.models.layers.norm import GemmaRMSNorm
from keel.models.layers.rotary import RotaryEmbedding
from keel.models.llama import LlamaForCausalLM

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, fused: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        # this rank's heads under tensor parallelism (all of them under data-parallel attention)
        heads, kv_heads, head_dim = attention_split(config.num_heads, "attention heads"), \
            attention_split(config.num_kv_heads, "KV heads"), config.head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        q_all, kv_all = config.num_heads * head_dim, config.num_kv_heads * head_dim
        scale = (config.query_pre_attn_scalar or head_dim) ** -0.5
        self.layer = AttentionLayer(layer_id, heads, kv_heads, head_dim, scale, config.sliding_windows[layer_id],
                                    config.attn_logit_softcapping)
        self.qkv_proj = FusedLinear(config.hidden_size, (q_all, kv_all, kv_all), bias=config.attention_bias,
                                    fused=fused, parallel=attention_parallel("column"))
        self.o_proj = Linear(q_all, config.hidden_size, bias=config.attention_bias, fused=fused,
                             parallel=attention_parallel("row"))
        self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps) if qk_norm else nn.Identity()
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        spec = self.layer
        q = self.q_norm(q.reshape(-1, spec.num_heads, spec.head_dim))
        k = self.k_norm(k.reshape(-1, spec.num_kv_heads, spec.head_dim))
        v = v.reshape(-1, spec.num_kv_heads, spec.head_dim)
        return self.o_proj(ctx.attend(spec, q, k, v, Rotation(self.rotary, positions)))


class Gemma3MLP(nn.Module):
    def __init__(self, config: ModelConfig, fused: bool) -> None:
        super().__init__()
        if config.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported Gemma 3 activation {config.hidden_act!r}; keel supports "
                             f"{SUPPORTED_ACTIVATIONS}")
        size = config.intermediate_size
        self.gate_up_proj = FusedLinear(config.hidden_size, (size, size), fused=fused, parallel="column")
        self.act = GeluTanhAndMul()
        self.down_proj = Linear(size, config.hidden_size, fused=fused, parallel="row")

    def forward(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor:
        """The MLP of x; with `partial`, this rank's share, not yet summed over the ranks (LlamaMLP)."""
        return self.down_proj(self.act(self.gate_up_proj(x)), reduce=not partial)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, fused: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = Gemma3Attention(config, layer_id, rotary, fused, qk_norm)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = Gemma3MLP(config, fused)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), ctx)
        hidden = hidden + self.post_attention_layernorm(attn)
        x = self.pre_feedforward_layernorm(hidden)
        # data-parallel attention: the split MLP runs on every rank's tokens; this rank sums its own over the ranks
        mlp = self.mlp(x) if ctx.dp is None else ctx.dp.scatter_sum(self.mlp(ctx.dp.gather(x), partial=True))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, fused: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # In the weights' dtype, as transformers has it: sqrt(3072) is 55.5 in bfloat16, not 55.43.
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5,
                                                         dtype=self.embed_tokens.weight.dtype), persistent=False)
        full = RotaryEmbedding(config.head_dim, config.rope, max_positions)
        local = RotaryEmbedding(config.head_dim, config.sliding_rope, max_positions) if config.sliding_rope else full
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, full if window is None else local, fused, qk_norm)
            for i, window in enumerate(config.sliding_windows))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        for layer in self.layers:
            hidden = layer(positions, hidden, ctx)
        return self.norm(hidden)


class Gemma3ForCausalLM(CausalLM):
    FUSED_WEIGHTS = LlamaForCausalLM.FUSED_WEIGHTS  # the same q/k/v and gate/up checkpoint names
    QK_NORM = True
    tensor_parallel = True  # its layers split over ranks (--tp-size)

    def __init__(self, config: ModelConfig, max_positions: int, fused: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, max_positions, fused, self.QK_NORM)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied, fused=fused)

    def compute_logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = super().compute_logits(hidden, out)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)  # in place: into `out` too


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    QK_NORM = False
