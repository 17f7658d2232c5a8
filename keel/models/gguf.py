"""GGUF checkpoints, converted once into a Hugging Face directory that keel then loads like any other.

transformers knows each architecture's GGUF conventions (llama.cpp permutes the rows of the Q and
K projections of Llama models; Gemma stores its norm weights as 1 + w): it turns the metadata into a
config, the vocabulary into a tokenizer with its chat template, and dequantizes every tensor with
ggml's own `gguf` package (vectorised numpy, block by block). keel checks the file first, so a file
that is not GGUF, is cut short, or holds a tensor type keel does not take fails with one line naming
the problem, then saves the float32 weights as safetensors; the caller caches that directory by the
file's SHA-256, so only the first start pays for the conversion.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Tensor types keel converts: plain floats and ggml's classic and k-quant blocks (the i-quants and
# the ternary / fp4 formats are refused by name).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")


def check_gguf(path: Path) -> Any:
    """Parse `path` and return gguf's reader of it; raise ValueError, in one line, unless it is a complete GGUF
    file of tensor types keel converts."""
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, not {GGUF_MAGIC!r}")
    try:
        reader = _reader_class()(path)
    except Exception as e:  # gguf raises whatever numpy does on a short read
        raise ValueError(f"{path} is not a readable GGUF file (cut short or corrupt): "
                         f"{type(e).__name__}: {e}") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ValueError(f"tensor {tensor.name!r} of {path.name} has type {kind}, which keel cannot "
                             f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path} is cut short: tensor {tensor.name!r} ends at byte "
                             f"{tensor.data_offset + tensor.n_bytes}, the file has {size}")
    return reader


@lru_cache(maxsize=None)
def _reader_class() -> type:
    """gguf's reader, parsing through a plain ndarray view of its memory map: each slice of a numpy memmap is
    another memmap object, whose construction was most of the parse of a large vocabulary (Gemma 3's 262k
    tokens: about 2.6x faster as a view)."""
    import numpy as np
    from gguf import GGUFReader

    class PlainViewReader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Optional[str] = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            values = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            return values.view(values.dtype.newbyteorder(override_order or self.byte_order))

    return PlainViewReader


@contextmanager
def parsed_once(path: Path, reader: Any) -> Iterator[None]:
    """Inside the block, whoever opens `path` with gguf's reader gets `reader`, parsed already: transformers
    parses the file anew for the config, the tokenizer and the weights it loads from it (three parses that
    took ~20 s each for Gemma 3 on two CPU cores). Not thread-safe: one conversion at a time in a process."""
    import gguf

    opened = gguf.GGUFReader
    target = path.resolve()

    def reuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        return reader if not args and not kwargs and Path(file).resolve() == target else opened(file, *args, **kwargs)

    gguf.GGUFReader = reuse
    try:
        yield
    finally:
        gguf.GGUFReader = opened


def _check_tokenizer(tokenizer: object, path: Path) -> None:
    """Some transformers releases build a one-token-per-character tokenizer from some GGUF vocabularies (5.17
    does for Gemma 3): a model fed that reads garbage, so refuse it rather than serve nonsense."""
    import transformers

    sample = "The capital of France is Paris, and the river that runs through it is the Seine."
    if len(tokenizer(sample, add_special_tokens=False).input_ids) > len(sample) // 2:
        raise ValueError(f"transformers {transformers.__version__} built a character-level tokenizer from "
                         f"{path.name}; a newer transformers reads its vocabulary correctly")


def _name_generic_tokenizer(directory: Path) -> None:
    """Point the saved tokenizer_config.json at transformers' generic tokenizer class, with the added tokens
    listed. A model-specific class (GemmaTokenizer) would rebuild the vocabulary from tokenizer.json in Python
    (2.2 s for Gemma 3's 262k tokens and 515k merges, on every start); the saved tokenizer.json already is
    the whole tokenizer, which the generic class reads in Rust (1.0 s). The tests check the result against
    the tokenizer transformers builds from the GGUF file itself."""
    tokenizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"
    config["added_tokens_decoder"] = {str(token["id"]): {key: value for key, value in token.items() if key != "id"}
                                      for token in tokenizer["added_tokens"]}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def convert_gguf(path: Path, directory: Path) -> None:
    """Write `path` as a Hugging Face directory (config, tokenizer, float32 safetensors) into `directory`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = check_gguf(path)
    logger.info("converting %s into a Hugging Face checkpoint (once; later starts read it from %s)",
                   path.name, directory.parent)
    folder, name = path.parent, path.name
    with parsed_once(path, reader):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _check_tokenizer(tokenizer, path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    config.architectures = [type(model).__name__]
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _name_generic_tokenizer(directory)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {key: tensor.contiguous() for key, tensor in model.state_dict().items()
               if not (tied and key == "lm_head.weight")}  # a tied head is the embedding, stored once
    save_file(weights, str(directory / "model.safetensors"))
