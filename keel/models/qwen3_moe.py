"""Qwen3-MoE: the Qwen3 decoder with a sparse mixture of experts in place of the MLP (in the layers the config
names; the others keep a dense MLP)."""

from __future__ import annotations

from keel.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    # checkpoint projection of expert e -> (stacked parameter, part): `mlp.experts.<e>.gate_proj.weight` -> w13
    EXPERT_WEIGHTS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}
