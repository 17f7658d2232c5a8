"""Llama (2, 3, 3.1, 3.2) and the decoder family built on it (Mistral, Qwen2, Qwen3, and with experts in place of
the MLP, Qwen3-MoE and Mixtral).

One file for the shared decoder; the family files switch on QKV bias or Q/K norm. Module names
follow the Hugging Face checkpoints, so the loader maps names one to one, except for the fused
projections listed in `FUSED_WEIGHTS`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from keel.attention.base import AttentionContext, AttentionLayer, Rotation
from keel.distributed.parallel import attention_parallel, attention_split, tensor_parallel
from keel.models.causal_lm import CausalLM
from keel.models.config import ModelConfig
from keel.models.layers.embedding import LMHead, VocabEmbedding
from keel.models.layers.linear import FusedLinear, GateUpLinear, Linear
from keel.models.layers.moe import SparseMoE
from keel.models.layers.norm import RMSNorm
from keel.models.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool, fused: bool, input_size: Optional[int] = None) -> None:
        """`input_size`: of q/k/v's input when it is not the hidden size (EAGLE-3's layer reads two states)."""
        super().__init__()
        # under tensor parallelism this rank's heads: q/k/v column-parallel, o_proj row-parallel (all heads, whole
        # projections under data-parallel attention)
        heads, kv_heads, head_dim = attention_split(config.num_heads, "attention heads"), \
            attention_split(config.num_kv_heads, "KV heads"), config.head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.layer = AttentionLayer(layer_id, heads, kv_heads, head_dim, head_dim ** -0.5,
                                    config.sliding_windows[layer_id])
        q_all, kv_all = config.num_heads * head_dim, config.num_kv_heads * head_dim
        self.qkv_proj = FusedLinear(input_size or config.hidden_size, (q_all, kv_all, kv_all), bias=qkv_bias,
                                    fused=fused, parallel=attention_parallel("column"))
        self.o_proj = Linear(q_all, config.hidden_size, bias=False, fused=fused, parallel=attention_parallel("row"))
        # Qwen3 normalises each head of q and k before the rotation.
        self.q_norm: Optional[RMSNorm] = RMSNorm(head_dim, config.rms_norm_eps, fused) if qk_norm else None
        self.k_norm: Optional[RMSNorm] = RMSNorm(head_dim, config.rms_norm_eps, fused) if qk_norm else None
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, norm: Optional[RMSNorm],
                ctx: AttentionContext, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden += attention(norm(hidden)), in place (into `residual` instead, when given)."""
        q, k, v = self.qkv_proj(hidden, norm=norm).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        spec = self.layer
        q = q.reshape(-1, spec.num_heads, spec.head_dim)
        k = k.reshape(-1, spec.num_kv_heads, spec.head_dim)
        v = v.reshape(-1, spec.num_kv_heads, spec.head_dim)
        rotation = Rotation(self.rotary, positions, self.q_norm, self.k_norm)  # the backend applies the norms
        return self.o_proj(ctx.attend(spec, q, k, v, rotation),
                           add_to=hidden if residual is None else residual)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, fused: bool) -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size, fused=fused, parallel="column")
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, fused=fused, parallel="row")

    def forward(self, hidden: torch.Tensor, norm: RMSNorm, partial: bool = False) -> torch.Tensor:
        """hidden += mlp(norm(hidden)), in place; with `partial`, this rank's share of mlp(norm(hidden)) instead,
        not yet summed over the ranks (data-parallel attention sums it with a reduce-scatter)."""
        x = self.gate_up_proj(hidden, norm=norm)
        return self.down_proj(x, reduce=False) if partial else self.down_proj(x, add_to=hidden)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding, qkv_bias: bool,
                 qk_norm: bool, fused: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.self_attn = LlamaAttention(config, layer_id, rotary, qkv_bias, qk_norm, fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        moe = config.moe
        self.mlp: nn.Module = LlamaMLP(config, fused)
        if moe is not None and moe.sparse_layers[layer_id]:
            self.mlp = SparseMoE(config.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
                                 moe.renormalize, fused)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Updates the residual stream `hidden` in place and returns it. Each norm is applied by the projection that
        follows it and each residual add by the projection that precedes it, so a one-row step needs no norm or add
        kernels."""
        hidden = self.self_attn(positions, hidden, self.input_layernorm, ctx)
        if ctx.dp is None:
            return self.mlp(hidden, self.post_attention_layernorm)
        dispatch = isinstance(self.mlp, SparseMoE) and tensor_parallel().whole_experts and not ctx.dp.decode
        if dispatch:  # each token to the ranks of its experts only (all-to-all)
            return hidden.add_(self.mlp.dispatched(hidden, self.post_attention_layernorm))
        # data-parallel attention: the split MLP runs on every rank's tokens; this rank sums its own over the ranks
        partial = self.mlp(ctx.dp.gather(hidden), self.post_attention_layernorm, partial=True)
        return hidden.add_(ctx.dp.scatter_sum(partial))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int, qkv_bias: bool, qk_norm: bool, fused: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.head_dim, config.rope, max_positions)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary, qkv_bias, qk_norm, fused) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.forward_capturing(input_ids, positions, ctx, ())[0]

    def forward_capturing(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                          layers: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final hidden states, and copies of the inputs of `layers` (the residual stream before them; index
        len(self.layers) is the stream after the last layer, before the final norm), in the order asked."""
        hidden = self.embed_tokens(input_ids)  # a new tensor: the layers may update it in place
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in layers:
                captured[i] = hidden.clone()  # the next layers update `hidden` in place
            hidden = layer(positions, hidden, ctx)
        if len(self.layers) in layers:
            captured[len(self.layers)] = hidden.clone()
        return self.norm(hidden), [captured[i] for i in layers]


class LlamaForCausalLM(CausalLM):
    # HF checkpoint name part -> (keel module name part, shard index in the fused layer)
    FUSED_WEIGHTS: dict[str, tuple[str, Optional[int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False
    qk_norm = False
    tensor_parallel = True  # its layers split over ranks (--tp-size)

    def __init__(self, config: ModelConfig, max_positions: int, fused: bool = False) -> None:
        """`fused`: run norms, the activation and one-row projections as Triton kernels (with the
        Triton attention backend, which also rotates q and k in its own kernel)."""
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions, self.qkv_bias or config.attention_bias, self.qk_norm, fused)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied, fused=fused)
