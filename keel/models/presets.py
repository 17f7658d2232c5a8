"""Published architecture configs, run with dummy weights and the byte-level tokenizer (for benchmarks)."""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "attention_bias": False, "torch_dtype": "bfloat16",
}
_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "head_dim": 128,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "attention_bias": False,
    "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16",
}


def _gemma3(vocab: int, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
            query_pre_attn_scalar: int, window: int, max_positions: int, rope_scaling: Any) -> dict[str, Any]:
    """A Gemma 3 text model: every sixth layer global, the others a sliding window (their published pattern)."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar, "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "rope_scaling": rope_scaling, "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": [1, 106],
        "pad_token_id": 0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }


PRESETS: dict[str, dict[str, Any]] = {
    # google/gemma-3-1b-it and google/gemma-3-27b-it (text)
    "gemma-3-1b": _gemma3(262144, 26, 1152, 6912, 4, 1, 256, 256, 512, 32768, None),
    "gemma-3-27b": _gemma3(262208, 62, 5376, 21504, 32, 16, 128, 168, 1024, 131072,
                           {"rope_type": "linear", "factor": 8.0}),
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
                     "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
    # The EAGLE-3 head published for Llama-3.1-8B-Instruct (one layer, a 32,000-token draft vocabulary).
    "llama-3.1-8b-eagle3": {**_LLAMA3, "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 4096,
                            "intermediate_size": 14336, "num_hidden_layers": 1, "num_attention_heads": 32,
                            "num_key_value_heads": 8, "tie_word_embeddings": False, "draft_vocab_size": 32000,
                            "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    # Qwen/Qwen3-30B-A3B: 128 experts of 768, 8 per token, in all 48 layers
    "qwen3-30b-a3b": {**_QWEN3, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                      "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # mistralai/Mixtral-8x7B-v0.1: 8 experts of 14,336, 2 per token
    "mixtral-8x7b": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                     "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                     "rope_theta": 1000000.0, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
                     "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
}
