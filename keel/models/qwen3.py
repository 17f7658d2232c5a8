"""Qwen3: the Llama decoder with RMSNorm on each head of q and k (QKV bias from the config)."""

from __future__ import annotations

from keel.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
