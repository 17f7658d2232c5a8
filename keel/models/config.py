"""ModelConfig: the architecture facts keel needs, read once from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import PretrainedConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: Optional[int] = None


@dataclass(frozen=True)
class MoeConfig:
    """A sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool  # the top-k routing weights are rescaled to sum to 1
    sparse_layers: tuple[bool, ...]  # per layer: experts (else a dense MLP of intermediate_size)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    # Per layer: the sliding-window size, or None for full attention.
    sliding_windows: tuple[Optional[int], ...]
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: torch.dtype
    # The RoPE of the sliding-window layers where the config gives one per layer type (Gemma 3);
    # None: every layer uses `rope`.
    sliding_rope: Optional[RopeConfig] = None
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma); None: head_dim ** -0.5.
    query_pre_attn_scalar: Optional[float] = None
    hidden_act: str = "silu"
    # Gemma 2: attention scores become cap * tanh(score / cap), and so do the final logits; None: no capping
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    moe: Optional[MoeConfig] = None

    @classmethod
    def from_hf(cls, hf: PretrainedConfig, eos_token_ids: Optional[tuple[int, ...]] = None) -> "ModelConfig":
        architectures = getattr(hf, "architectures", None) or []
        if not architectures:
            raise ValueError("config.json has no 'architectures' entry; cannot choose a model class")
        _check_supported(hf)
        rope, sliding_rope = _rope_configs(hf)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        return cls(
            architecture=architectures[0],
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            rope=rope,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            sliding_windows=_sliding_windows(hf),
            eos_token_ids=eos_token_ids if eos_token_ids is not None else _as_ids(hf.eos_token_id),
            checkpoint_dtype=_checkpoint_dtype(hf),
            sliding_rope=sliding_rope,
            query_pre_attn_scalar=_optional_float(getattr(hf, "query_pre_attn_scalar", None)),
            hidden_act=getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "silu",
            attn_logit_softcapping=_optional_float(getattr(hf, "attn_logit_softcapping", None)),
            final_logit_softcapping=_optional_float(getattr(hf, "final_logit_softcapping", None)),
            moe=_moe_config(hf),
        )


def _moe_config(hf: PretrainedConfig) -> Optional[MoeConfig]:
    """Qwen3-MoE (`num_experts`, sparse layers every `decoder_sparse_step` but `mlp_only_layers`) and Mixtral
    (`num_local_experts`, every layer sparse, expert size `intermediate_size`); None for a dense model."""
    layers = hf.num_hidden_layers
    if not getattr(hf, "num_local_experts", None):  # transformers names Qwen3-MoE's num_experts this way too
        return None
    if getattr(hf, "moe_intermediate_size", None) is None:  # Mixtral
        return MoeConfig(hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size, True, (True,) * layers)
    step, dense = getattr(hf, "decoder_sparse_step", 1) or 1, set(getattr(hf, "mlp_only_layers", None) or ())
    if getattr(hf, "shared_expert_intermediate_size", 0):
        raise ValueError("MoE models with shared experts (Qwen2-MoE) are not supported yet")
    return MoeConfig(hf.num_local_experts, hf.num_experts_per_tok, hf.moe_intermediate_size,
                     bool(getattr(hf, "norm_topk_prob", False)),
                     tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)))


def _check_supported(hf: PretrainedConfig) -> None:
    """Refuse configs whose features keel does not implement, rather than silently ignoring them."""
    if getattr(hf, "text_config", None) is not None:
        raise ValueError(f"{type(hf).__name__} (model_type {hf.model_type!r}) is a multimodal config; keel runs "
                         "text-only checkpoints (for Gemma 3: Gemma3ForCausalLM with model_type 'gemma3_text')")
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True is not supported; keel attends causally")


def _rope_configs(hf: PretrainedConfig) -> tuple[RopeConfig, Optional[RopeConfig]]:
    """(RoPE of the full-attention layers, RoPE of the sliding ones or None). transformers gives
    Gemma 3 `rope_parameters` per layer type, other families one set for all layers."""
    params: dict[str, Any] = dict(getattr(hf, "rope_parameters", None) or {})
    if "full_attention" in params:
        sliding = params.get("sliding_attention")
        return _rope_config(hf, params["full_attention"]), _rope_config(hf, sliding) if sliding else None
    legacy = getattr(hf, "rope_scaling", None)  # transformers 4.x layout
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    return _rope_config(hf, params), None


def _rope_config(hf: PretrainedConfig, params: dict[str, Any]) -> RopeConfig:
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {kind!r}; keel supports {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=params.get("original_max_position_embeddings"),
    )


def _sliding_windows(hf: PretrainedConfig) -> tuple[Optional[int], ...]:
    """Which layers use sliding-window attention, following transformers' rules.

    Configs with `layer_types` (Qwen2, Qwen3, ...) window only their "sliding_attention" layers;
    Mistral-style configs without it window every layer when `sliding_window` is set.
    """
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * hf.num_hidden_layers


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _checkpoint_dtype(hf: PretrainedConfig) -> torch.dtype:
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype
