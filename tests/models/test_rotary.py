import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from keel.models.config import ModelConfig
from keel.models.layers.rotary import inverse_frequencies


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_inverse_frequencies_match_transformers(rope_parameters):
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope_parameters,
                     architectures=["LlamaForCausalLM"])
    kind = rope_parameters["rope_type"]
    if kind == "default":
        expected = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours = inverse_frequencies(128, ModelConfig.from_hf(hf).rope)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_unsupported_rope_is_refused():
    hf = LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
                     architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        ModelConfig.from_hf(hf)
