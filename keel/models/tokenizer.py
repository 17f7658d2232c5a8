"""A model directory's tokenizer, through transformers; apart from the model loader, which the API process
never needs."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from keel.models.source import ModelSource


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {source.path}: {e}") from e
