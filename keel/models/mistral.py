"""Mistral: the Llama decoder; its sliding window comes from the config (ModelConfig.sliding_windows)."""

from __future__ import annotations

from keel.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
