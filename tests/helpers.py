"""Test helpers: tiny random-weight Hugging Face checkpoints and random prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from keel.models.byte_tokenizer import save_byte_tokenizer
from keel.models.weights import init_random_weights

# Weights wider than transformers' 0.02 default give peaked next-token distributions, so greedy
# comparisons test the model rather than float rounding between near-equal logits.
WEIGHT_STD = 0.1

_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, bos_token_id=256, eos_token_id=257)

TINY_MODELS: dict[str, tuple[type, type, dict]] = {
    # Llama 3.1/3.2: llama3 RoPE scaling, tied embeddings.
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # Llama 2 style: plain RoPE, separate LM head, no GQA.
    "llama2": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=True)),
    # A window shorter than most test prompts, so the sliding-window mask matters.
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=8, tie_word_embeddings=False)),
}


def build_tiny_hf_model(kind: str, directory: Path, seed: int = 0, max_shard_size: str | None = None):
    config_cls, model_cls, extra = TINY_MODELS[kind]
    config = config_cls(**{**_COMMON, **extra})
    config.architectures = [model_cls.__name__]
    model = model_cls(config).eval()
    init_random_weights(model, seed, std=WEIGHT_STD)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    save_byte_tokenizer(directory)
    return model


def random_prompts(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
