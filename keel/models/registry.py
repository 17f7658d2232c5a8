"""Model classes by the `architectures` name in config.json."""

from __future__ import annotations

from torch import nn

from keel.models.eagle import LlamaForCausalLMEagle, LlamaForCausalLMEagle3
from keel.models.gemma3 import Gemma2ForCausalLM, Gemma3ForCausalLM
from keel.models.llama import LlamaForCausalLM
from keel.models.mistral import MistralForCausalLM
from keel.models.mixtral import MixtralForCausalLM
from keel.models.qwen2 import Qwen2ForCausalLM
from keel.models.qwen3 import Qwen3ForCausalLM
from keel.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "LlamaForCausalLMEagle": LlamaForCausalLMEagle,  # EAGLE draft heads (--speculative-algorithm EAGLE, EAGLE3)
    "LlamaForCausalLMEagle3": LlamaForCausalLMEagle3,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; keel supports {sorted(MODEL_CLASSES)}") from None
