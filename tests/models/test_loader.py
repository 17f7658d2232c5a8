"""Loading checkpoints: the happy paths, and a clear error for each way a directory can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import keel
from keel.models.loader import load_model_config
from keel.models.source import resolve_model
from tests.helpers import build_tiny_hf_model


@pytest.fixture
def checkpoint(tmp_path):
    build_tiny_hf_model("qwen2", tmp_path)
    return tmp_path


def rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_shape_mismatch_names_the_tensor(checkpoint):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(checkpoint, lambda t: t.__setitem__(name, torch.zeros(3, 64)))
    with pytest.raises(ValueError, match=rf"shape mismatch for tensor '{name}'.*\[3, 64\].*\[32, 64\]"):
        keel.Engine(str(checkpoint), device="cpu")


def test_missing_tensor_is_named(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model.layers.0.self_attn.qkv_proj.bias\[shard 0\]"):
        keel.Engine(str(checkpoint), device="cpu")


def test_unexpected_tensor_is_named(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        keel.Engine(str(checkpoint), device="cpu")


def test_unknown_architecture_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'FancyNewForCausalLM'.*LlamaForCausalLM"):
        keel.Engine(str(checkpoint), device="cpu")


def test_missing_weight_files(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights"):
        keel.Engine(str(checkpoint), device="cpu")


def test_missing_shard_listed_in_the_index_is_named(tiny_model, tmp_path):
    sharded, _ = tiny_model("llama3")
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (copy / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        keel.Engine(str(copy), device="cpu")


def test_not_a_model():
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        resolve_model("no/such/model")


def test_dummy_load_ignores_the_checkpoint(checkpoint, make_engine):
    prompt = [[5, 6, 7]]
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True, top_logprobs=1)
    real = make_engine(checkpoint).generate(prompt, params)[0]
    dummy = make_engine(checkpoint, load_format="dummy").generate(prompt, params)[0]
    assert [e.logprob for e in real.logprobs] != [e.logprob for e in dummy.logprobs]


@pytest.mark.parametrize("name,layers,heads,kv_heads,head_dim,vocab", [
    ("llama-3.1-8b", 32, 32, 8, 128, 128256), ("llama-3.2-1b", 16, 32, 8, 64, 128256),
    ("qwen3-0.6b", 28, 16, 8, 128, 151936), ("qwen3-8b", 36, 32, 8, 128, 151936),
    ("gemma-3-1b", 26, 4, 1, 256, 262144), ("gemma-3-27b", 62, 32, 16, 128, 262208),
    ("qwen3-30b-a3b", 48, 32, 4, 128, 151936), ("mixtral-8x7b", 32, 32, 8, 128, 32000),
])
def test_presets_carry_their_published_configs(name, layers, heads, kv_heads, head_dim, vocab):
    source = resolve_model(name)
    assert not source.has_weights
    config = load_model_config(source)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        layers, heads, kv_heads, head_dim, vocab)
    if name.startswith("llama"):
        assert config.rope.kind == "llama3"
    assert config.tie_word_embeddings == (name in ("llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b", "gemma-3-27b"))
    if name.startswith("gemma"):
        assert sum(w is None for w in config.sliding_windows) == layers // 6  # every sixth layer is global
    experts = {"qwen3-30b-a3b": (128, 8, 768), "mixtral-8x7b": (8, 2, 14336)}.get(name)
    assert (config.moe and (config.moe.num_experts, config.moe.top_k, config.moe.intermediate_size)) == experts


def test_preset_refuses_real_weight_loading():
    with pytest.raises(ValueError, match="preset without weights"):
        keel.Engine("qwen3-0.6b", device="cpu", load_format="safetensors")


def test_keel_demo_is_a_real_hf_checkpoint(make_engine):
    """transformers loads the demo directory and agrees with keel token for token."""
    engine = make_engine("keel-demo")
    directory = resolve_model("keel-demo").path
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = engine.tokenizer("The sky").input_ids
    out = engine.generate([ids], keel.SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True))[0]
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                      do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert out.token_ids == ref[0, len(ids):].tolist()
    assert out.text.isprintable()  # trained to write text, not random bytes


def test_checkpoint_names_map_to_fused_renamed_and_stacked_expert_parameters():
    from keel.models.mixtral import MixtralForCausalLM
    from keel.models.qwen3_moe import Qwen3MoeForCausalLM
    from keel.models.weights import keel_name

    qwen = Qwen3MoeForCausalLM
    assert keel_name("model.layers.0.self_attn.k_proj.weight", qwen.FUSED_WEIGHTS, qwen.EXPERT_WEIGHTS) == (
        "model.layers.0.self_attn.qkv_proj.weight", 1)
    assert keel_name("model.layers.3.mlp.experts.17.up_proj.weight", qwen.FUSED_WEIGHTS, qwen.EXPERT_WEIGHTS) == (
        "model.layers.3.mlp.experts.w13", (17, 1))
    # a dense layer of the same model keeps its fused gate/up projection
    assert keel_name("model.layers.1.mlp.gate_proj.weight", qwen.FUSED_WEIGHTS, qwen.EXPERT_WEIGHTS) == (
        "model.layers.1.mlp.gate_up_proj.weight", 0)
    assert keel_name("model.layers.1.mlp.gate.weight", qwen.FUSED_WEIGHTS, qwen.EXPERT_WEIGHTS) == (
        "model.layers.1.mlp.gate.weight", None)  # the router
    mix = MixtralForCausalLM
    assert keel_name("model.layers.2.block_sparse_moe.experts.3.w2.weight", mix.FUSED_WEIGHTS,
                     mix.EXPERT_WEIGHTS) == ("model.layers.2.mlp.experts.w2", (3, 0))
    assert keel_name("model.layers.2.block_sparse_moe.gate.weight", mix.FUSED_WEIGHTS, mix.EXPERT_WEIGHTS) == (
        "model.layers.2.mlp.gate.weight", None)


def test_a_checkpoint_missing_one_expert_is_refused_naming_it(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    directory, _ = tiny_model("mixtral")
    for path in directory.iterdir():
        shutil.copy(path, tmp_path / path.name)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\), e.g. model.layers.1.mlp.experts.w13\[shard \(2, 1\)\]"):
        keel.Engine(str(tmp_path), device="cpu", dtype="float32")
