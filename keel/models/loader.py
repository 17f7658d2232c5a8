"""Building a model: config from the directory, class from `architectures`, weights from safetensors or dummy."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig

from keel.models.config import ModelConfig
from keel.models.eagle import EagleHead, EagleHeadConfig
from keel.models.registry import model_class
from keel.models.source import ModelSource
from keel.models.weights import init_random_weights, load_safetensors


def load_model_config(source: ModelSource) -> ModelConfig:
    try:
        hf_config = AutoConfig.from_pretrained(source.path)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot read the config of {source.path}: {e}") from e
    return ModelConfig.from_hf(hf_config, eos_token_ids=_generation_eos(source))


def load_model(source: ModelSource, config: ModelConfig, *, dtype: torch.dtype, device: torch.device,
               max_positions: int, load_format: str, seed: int, fused: bool = False) -> nn.Module:
    cls = model_class(config.architecture)
    if load_format == "safetensors" and not source.has_weights:
        raise ValueError(f"{source.name!r} is a preset without weights; use load_format='dummy'")
    head = {"head": EagleHeadConfig.read(source.path, config)} if issubclass(cls, EagleHead) else {}
    with _default_dtype(dtype), torch.device(device):
        model = cls(config, max_positions, fused, **head)
    if load_format == "dummy" or not source.has_weights:
        init_random_weights(model, seed)
        loaded = {name for name, _ in model.named_parameters()}
    else:
        loaded = load_safetensors(model, source.path, cls.FUSED_WEIGHTS, config.tie_word_embeddings, device,
                                  ignored=getattr(cls, "IGNORED_WEIGHTS", ()), optional=getattr(cls, "FROM_TARGET", ()),
                                  experts=getattr(cls, "EXPERT_WEIGHTS", None))
    if isinstance(model, EagleHead):
        model.loaded_from_checkpoint = loaded  # what share_target must not replace
    return model.eval()


def _generation_eos(source: ModelSource) -> Optional[tuple[int, ...]]:
    """EOS ids from generation_config.json, which overrides config.json (Llama 3 instruct lists several)."""
    path = source.path / "generation_config.json"
    if not path.is_file():
        return None
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return None
    return (eos,) if isinstance(eos, int) else tuple(eos)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
