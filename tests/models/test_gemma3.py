"""Gemma 3 (text) and Gemma 2 against transformers on tiny random-weight checkpoints.

The window (8) is much shorter than the longer prompts and generations, so sliding and full
layers see different keys; the two RoPE bases, the attention scale and the norm weights all
differ from their Llama defaults, so a mix-up of any of them changes the tokens. Gemma 2's
soft-capping is set low enough (scores capped at 1.5, logits at 4) to change the tokens if it were
skipped, in either attention backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM, Gemma3TextConfig

import keel
from keel.models.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, save_byte_tokenizer
from keel.models.config import ModelConfig, RopeConfig
from keel.models.weights import init_random_weights
from tests.helpers import KERNEL_DEVICE, WEIGHT_STD, assert_prompt_logprobs_match, hf_greedy, random_prompts

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
# Shorter than the window but not after 12 new tokens; just past it; past one 16-token chunk; past two.
PROMPT_LENGTHS = [1, 9, 17, 40]
NEW_TOKENS = 12
TOP_LOGPROBS = 5
BACKENDS = ["torch", "triton"]


def tiny_config(**overrides) -> Gemma3TextConfig:
    options = dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, query_pre_attn_scalar=24, rope_theta=1000.0, rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, architectures=["Gemma3ForCausalLM"])
    return Gemma3TextConfig(**{**options, **overrides})


def tiny_gemma2_config(**overrides) -> Gemma2Config:
    options = dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, sliding_window=WINDOW, query_pre_attn_scalar=24, rope_theta=1000.0,
        attn_logit_softcapping=1.5, final_logit_softcapping=4.0, architectures=["Gemma2ForCausalLM"])
    return Gemma2Config(**{**options, **overrides})


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """(checkpoint directory, the transformers model it holds)."""
    return write_gemma(tmp_path_factory.mktemp("hf-gemma3"), Gemma3ForCausalLM(tiny_config()))


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = Gemma2ForCausalLM(tiny_gemma2_config())
    model.set_attn_implementation("eager")  # the one that applies soft-capping
    return write_gemma(tmp_path_factory.mktemp("hf-gemma2"), model)


def write_gemma(directory: Path, model: torch.nn.Module) -> tuple[Path, torch.nn.Module]:
    model.eval()
    init_random_weights(model, seed=0, std=WEIGHT_STD)
    # Gemma stores norm scales as offsets from 1: random offsets, so (1 + w) vs w and per-channel
    # order both show.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5, generator=generator)
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory, model


@pytest.fixture(scope="module")
def hf_reference() -> Callable[[torch.nn.Module, tuple[int, ...]], tuple[list[int], torch.Tensor]]:
    """transformers' greedy tokens and per-step log-probs for a model and prompt, computed once each."""
    return functools.cache(lambda model, prompt: hf_greedy(model, list(prompt), NEW_TOKENS))


def make_gemma_engine(make_engine, directory: Path, backend: str, **options) -> keel.Engine:
    if backend == "triton":  # interpreted on a CPU; on a GPU with its CUDA-graph decode too
        options["device"] = KERNEL_DEVICE.type
    return make_engine(directory, attention_backend=backend, **options)


# Interpreted on a CPU, the Triton runs take ~40 s each: CI runs each model once and each page size once.
GREEDY_CASES = [pytest.param(kind, page_size, backend, marks=[pytest.mark.slow] * (
    backend == "triton" and (kind, page_size) in {("gemma3", 1), ("gemma2", 16)}))
    for kind in ("gemma3", "gemma2") for page_size in (1, 16) for backend in BACKENDS]


@pytest.mark.parametrize("kind,page_size,backend", GREEDY_CASES)
def test_greedy_tokens_and_logprobs_match_transformers(kind, page_size, backend, hf_reference, make_engine, request):
    directory, hf_model = request.getfixturevalue(kind)
    prompts = random_prompts(PROMPT_LENGTHS, seed=3)
    # chunks shorter than the longer prompts, so a chunk's window reaches into the previous chunk
    engine = make_gemma_engine(make_engine, directory, backend, page_size=page_size, chunked_prefill_size=16)
    params = keel.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                 top_logprobs=TOP_LOGPROBS)
    outputs = engine.generate(prompts, params)

    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_reference(hf_model, tuple(prompt))
        assert out.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged"
        for step, entry in enumerate(out.logprobs):
            ref = ref_logprobs[step]
            top_values = torch.tensor([lp for _, lp in entry.top])
            torch.testing.assert_close(top_values, ref.topk(TOP_LOGPROBS).values, atol=1e-4, rtol=0)
            torch.testing.assert_close(top_values, ref[[t for t, _ in entry.top]], atol=1e-4, rtol=0)
            assert entry.logprob == pytest.approx(ref[entry.token_id].item(), abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_prompt_logprobs_match_transformers(kind, backend, make_engine, request):
    directory, hf_model = request.getfixturevalue(kind)
    prompts = random_prompts([40, 2, 19], seed=4)
    engine = make_gemma_engine(make_engine, directory, backend, page_size=4, chunked_prefill_size=16)
    outputs = engine.generate(prompts, keel.SamplingParams(max_new_tokens=1, prompt_logprobs=3))
    assert_prompt_logprobs_match(hf_model, prompts, outputs, top=3)


def test_config_reads_windows_ropes_and_scale():
    config = ModelConfig.from_hf(tiny_config())
    assert config.sliding_windows == (WINDOW, WINDOW, None, WINDOW)
    assert config.rope == RopeConfig(theta=1000.0, kind="linear", factor=4.0)
    assert config.sliding_rope == RopeConfig(theta=100.0)
    assert config.query_pre_attn_scalar == 24
    assert config.hidden_act == "gelu_pytorch_tanh"


def test_gemma2_config_reads_alternating_windows_and_caps():
    config = ModelConfig.from_hf(tiny_gemma2_config())
    assert config.sliding_windows == (WINDOW, None, WINDOW, None)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (1.5, 4.0)
    assert config.sliding_rope is None and config.query_pre_attn_scalar == 24


def test_multimodal_config_is_refused():
    config = Gemma3Config(text_config=tiny_config().to_dict(), architectures=["Gemma3ForCausalLM"])
    with pytest.raises(ValueError, match="multimodal config.*gemma3_text"):
        ModelConfig.from_hf(config)
