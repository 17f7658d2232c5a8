"""Mixtral: the Mistral decoder with a sparse mixture of experts (`block_sparse_moe`) in every layer."""

from __future__ import annotations

from keel.models.mistral import MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    FUSED_WEIGHTS = {**MistralForCausalLM.FUSED_WEIGHTS, "block_sparse_moe": ("mlp", None)}
    # w1 is each expert's gate projection, w3 its up projection, w2 its down projection
    EXPERT_WEIGHTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}
