"""Qwen2: the Llama decoder with a bias on the QKV projection."""

from __future__ import annotations

from keel.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
