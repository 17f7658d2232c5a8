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
])
def test_presets_carry_their_published_configs(name, layers, heads, kv_heads, head_dim, vocab):
    source = resolve_model(name)
    assert not source.has_weights
    config = load_model_config(source)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (
        layers, heads, kv_heads, head_dim, vocab)
    if name.startswith("llama"):
        assert config.rope.kind == "llama3"
    assert config.tie_word_embeddings == (name in ("llama-3.2-1b", "qwen3-0.6b"))


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
