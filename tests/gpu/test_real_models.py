"""The real models on a GPU: bfloat16 through the Triton path with CUDA graphs, against float32.

Each model is its packaged name, or a GGUF path from KEEL_GGUF_SMOLLM2 / KEEL_GGUF_GEMMA3 (on a
machine where the packages are not installed). Prints the mean NLL of the license text for keel
bf16, keel float32 and transformers float32 (docs/accuracy.md records them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import keel

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

MODELS = {"smollm2-135m-instruct": "KEEL_GGUF_SMOLLM2", "gemma-3-270m": "KEEL_GGUF_GEMMA3"}
LICENSE = Path(os.path.dirname(os.__file__)) / "LICENSE.txt"


def model_arg(name: str) -> str:
    return os.environ.get(MODELS[name], name)


def keel_nll(engine: keel.Engine, ids: list[int]) -> float:
    out = engine.generate([ids], keel.SamplingParams(max_new_tokens=1, prompt_logprobs=0))[0]
    return -sum(entry.logprob for entry in out.prompt_logprobs) / len(out.prompt_logprobs)


def hf_nll(path: str, ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    from keel.models.source import resolve_model

    source = resolve_model(path)  # the converted directory: transformers reads the same weights as keel
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
    targets = torch.tensor(ids[1:], device="cuda")[:, None]
    return -torch.log_softmax(logits, dim=-1).gather(1, targets).mean().item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_nll_is_within_1_percent_of_float32(name):
    path = model_arg(name)
    bf16 = keel.Engine(path, dtype="bfloat16")  # triton attention, fused ops, CUDA-graph decode
    ids = bf16.tokenizer(LICENSE.read_text(encoding="utf-8")[:9000]).input_ids
    text = bf16.generate(["The capital of France is"], keel.SamplingParams(max_new_tokens=16, temperature=0))[0]
    nll_bf16 = keel_nll(bf16, ids)
    del bf16
    nll_fp32 = keel_nll(keel.Engine(path, dtype="float32"), ids)
    nll_hf = hf_nll(path, ids)
    print(f"\n{name}: {len(ids)} tokens, mean NLL keel bf16 {nll_bf16:.5f}, keel fp32 {nll_fp32:.5f}, "
          f"transformers fp32 {nll_hf:.5f}; bf16 greedy: {text.text!r}")
    assert abs(nll_bf16 - nll_fp32) / nll_fp32 < 0.01
    assert nll_fp32 == pytest.approx(nll_hf, rel=1e-3)
