"""Tiny EAGLE and EAGLE-3 draft heads written in their published checkpoint layouts (config.json with the
LlamaForCausalLMEagle / ...Eagle3 architecture, safetensors with the published tensor names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from keel.models.byte_tokenizer import save_byte_tokenizer


def _target(target_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((target_dir / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(target_dir.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return config, weights


def write_eagle_head(directory: Path, target_dir: Path, eagle3: bool, identity: bool = False,
                     draft_vocab_size: int | None = None, with_embedding: bool = True, seed: int = 0) -> Path:
    """A one-layer head for the target in `target_dir`. Random weights (std 0.1), or with `identity` a head whose
    output is the target's own next-token prediction at the position it reads: attention and MLP outputs
    zeroed, fc passing the target's hidden state through, the target's final norm and LM head. Such a head
    drafts, from position p, the token at p + 1 (the last token again), which tests that it reads the right
    position's hidden state."""
    target_config, target = _target(target_dir)
    h, inter = target_config["hidden_size"], target_config["intermediate_size"]
    heads, kv_heads = target_config["num_attention_heads"], target_config["num_key_value_heads"]
    head_dim = target_config.get("head_dim") or h // heads
    vocab = target_config["vocab_size"]
    draft_vocab = draft_vocab_size or vocab
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    prefix = "midlayer." if eagle3 else "layers.0."
    qkv_in = 2 * h if eagle3 else h
    w = {prefix + "self_attn.q_proj.weight": rand(heads * head_dim, qkv_in),
         prefix + "self_attn.k_proj.weight": rand(kv_heads * head_dim, qkv_in),
         prefix + "self_attn.v_proj.weight": rand(kv_heads * head_dim, qkv_in),
         prefix + "self_attn.o_proj.weight": rand(h, heads * head_dim),
         prefix + "post_attention_layernorm.weight": torch.ones(h),
         prefix + "mlp.gate_proj.weight": rand(inter, h), prefix + "mlp.up_proj.weight": rand(inter, h),
         prefix + "mlp.down_proj.weight": rand(h, inter)}
    if with_embedding:
        w["embed_tokens.weight"] = target["model.embed_tokens.weight"].clone()
    lm_head = target.get("lm_head.weight", target["model.embed_tokens.weight"])
    if eagle3:
        keep = torch.randperm(vocab, generator=generator)[:draft_vocab].sort().values
        w.update({prefix + "input_layernorm.weight": torch.ones(h), prefix + "hidden_norm.weight": torch.ones(h),
                  "fc.weight": rand(h, 3 * h), "norm.weight": torch.ones(h), "lm_head.weight": rand(draft_vocab, h),
                  "d2t": keep - torch.arange(draft_vocab),
                  "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, keep, True)})
    else:
        w.update({"fc.weight": rand(h, 2 * h), "fc.bias": torch.zeros(h)})
    if identity:
        assert draft_vocab == vocab
        w[prefix + "self_attn.o_proj.weight"].zero_()
        w[prefix + "mlp.down_proj.weight"].zero_()
        passthrough = torch.zeros(h, (3 if eagle3 else 2) * h)
        passthrough[:, -h:] = torch.eye(h)  # the last input: the target's state (EAGLE-3: the final stream)
        w["fc.weight"] = passthrough
        if eagle3:
            w.update({"norm.weight": target["model.norm.weight"].clone(), "lm_head.weight": lm_head.clone(),
                      "d2t": torch.zeros(vocab, dtype=torch.int64)})
    config = {key: target_config[key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "vocab_size", "rms_norm_eps",
                                                  "max_position_embeddings", "bos_token_id", "eos_token_id")}
    config.update(architectures=["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLMEagle"],
                  model_type="llama", num_hidden_layers=1, tie_word_embeddings=False, head_dim=head_dim,
                  rope_theta=target_config.get("rope_theta", 10000.0), torch_dtype="float32")
    if eagle3:
        # the 2-layer test target has no layers 2 and n-3: read layer 0's output twice and the last layer's
        config.update(draft_vocab_size=draft_vocab, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 0, 1]})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in w.items()}, str(directory / "model.safetensors"))
    save_byte_tokenizer(directory)
    return directory
