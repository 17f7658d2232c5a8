"""Test helpers: tiny random-weight Hugging Face checkpoints and random prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from keel.models.byte_tokenizer import PAD_ID, save_byte_tokenizer
from keel.models.weights import init_random_weights

# Where Triton kernels run in the tests: the GPU when there is one, else the CPU under TRITON_INTERPRET=1.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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
    # Qwen2's own switch: layers from max_window_layers on slide (here the second), the first attends fully.
    "qwen2-window": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=8,
                                                         max_window_layers=1, tie_word_embeddings=False)),
    # Mixtures of experts: Qwen3-MoE with its second layer dense (mlp_only_layers), 8 experts, top 2 renormalised;
    # Mixtral with 4 experts, top 2, in every layer.
    "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        head_dim=16, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2,
                                                        tie_word_embeddings=False)),
}


def build_tiny_hf_model(kind: str, directory: Path, seed: int = 0, max_shard_size: str | None = None,
                        **overrides):
    """A tiny random checkpoint of `kind` in `directory`; `overrides`: config fields to change."""
    config_cls, model_cls, extra = TINY_MODELS[kind]
    config = config_cls(**{**_COMMON, **extra, **overrides})
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


def assert_same_greedy(ours, solo, label: str, tie: float = 1e-4) -> None:
    """Greedy outputs (with top_logprobs >= 2) agree: same tokens, chosen log-probs within `tie`.

    Batched and solo runs differ in float rounding (~1e-6 here), so the two may part ways at a
    step where the solo run's top two candidates are within `tie` of each other; that is the one
    divergence accepted, and the comparison stops there. A KV bookkeeping error shows up as a
    large difference long before that.
    """
    for step, (a, b) in enumerate(zip(ours.token_ids, solo.token_ids)):
        top = solo.logprobs[step].top
        if a != b:
            gap = top[0][1] - top[1][1]
            assert gap < tie, f"{label}: token {step} is {a}, alone {b} (top-2 gap {gap:.2e}, not a tie)"
            return
        ours_lp, solo_lp = ours.logprobs[step].logprob, solo.logprobs[step].logprob
        assert abs(ours_lp - solo_lp) < tie, f"{label}: token {step} log-prob {ours_lp} vs {solo_lp} alone"
    assert len(ours.token_ids) == len(solo.token_ids), f"{label}: {len(ours.token_ids)} tokens, alone " \
                                                       f"{len(solo.token_ids)}"
    assert ours.finish_reason == solo.finish_reason, f"{label}: {ours.finish_reason} vs {solo.finish_reason}"


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and its per-step log-softmax, [steps, vocab]."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD_ID, output_logits=True, return_dict_in_generate=True)
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
    return out.sequences[0, len(prompt):].tolist(), logprobs


def assert_prompt_logprobs_match(hf_model: torch.nn.Module, prompts: list[list[int]], outputs: list,
                                 top: int) -> None:
    """Each output's prompt log-probs (and their top-`top` alternatives) equal transformers' within 1e-4."""
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert len(out.prompt_logprobs) == len(prompt) - 1
        for position, entry in enumerate(out.prompt_logprobs):
            assert entry.token_id == prompt[position + 1]
            assert abs(entry.logprob - ref[position, entry.token_id].item()) <= 1e-4
            top_values = torch.tensor([lp for _, lp in entry.top])
            torch.testing.assert_close(top_values, ref[position].topk(top).values, atol=1e-4, rtol=0)
