"""GPU checks at real sizes (skipped without CUDA). The float32 equality tests of
tests/models/test_hf_equality.py also run on CUDA when it is there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import keel
from keel.models.presets import PRESETS
from keel.models.weights import init_random_weights
from keel.scheduler.batch import build_forward_batch
from tests.helpers import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
DECODE_STEPS = 4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def llama_1b_dir(tmp_path_factory):
    """A Llama-3.2-1B-shaped checkpoint with random bf16 weights, saved by transformers."""
    directory = tmp_path_factory.mktemp("llama-3.2-1b-random")
    config = LlamaConfig(**{k: v for k, v in PRESETS["llama-3.2-1b"].items() if k != "torch_dtype"})
    with torch.device(CUDA):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    init_random_weights(model, seed=0)
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink(missing_ok=True)
    from keel.models.byte_tokenizer import save_byte_tokenizer
    save_byte_tokenizer(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def keel_logits(engine: keel.Engine, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Per prompt: [1 + DECODE_STEPS, vocab] logits from keel's prefill and greedy decode steps, and its tokens."""
    core = engine.core
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=DECODE_STEPS + 1, ignore_eos=True)
    rids = [core.add_request(p, params) for p in prompts]
    logits: dict[int, list[torch.Tensor]] = {r: [] for r in rids}
    while core.has_work:
        batch = core.scheduler.schedule()
        out = core.runner.forward(build_forward_batch(batch, CUDA))
        for req, row in zip(batch.reqs, out):
            logits[req.rid].append(row)
        core.scheduler.process(batch, out.argmax(-1).tolist())
    return [torch.stack(logits[r]) for r in rids], [req_tokens(logits[r]) for r in rids]


def req_tokens(rows: list[torch.Tensor]) -> list[int]:
    return [int(r.argmax()) for r in rows]


def test_bf16_llama_1b_logits_match_transformers(llama_1b_dir):
    prompts = random_prompts([1, 7, 16, 17, 40, 64, 100, 129], vocab=128000, seed=0)
    engine = keel.Engine(str(llama_1b_dir), dtype="bfloat16", device="cuda", page_size=16, kv_cache_tokens=8192)
    ours, tokens = keel_logits(engine, prompts)
    del engine
    hf = AutoModelForCausalLM.from_pretrained(llama_1b_dir, dtype=torch.bfloat16).to(CUDA).eval()
    errors = []
    with torch.no_grad():
        for prompt, our_logits, generated in zip(prompts, ours, tokens):
            # transformers on the prompt followed by keel's own greedy tokens: positions line up one to one
            ids = torch.tensor([prompt + generated[:DECODE_STEPS]], device=CUDA)
            ref = hf(ids).logits[0, len(prompt) - 1:]
            errors.append(relative_error(our_logits, ref))
    print("relative errors per prompt:", [f"{e:.2e}" for e in errors])
    assert max(errors) < 1e-2, errors


def test_generate_llama_8b_preset_runs():
    result = subprocess.run(
        [sys.executable, "-m", "keel.cli", "generate", "--model", "llama-3.1-8b", "--max-new-tokens", "32",
         "--ignore-eos", "--no-stream", "Hello"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "--- [length, 32 tokens]" in result.stdout
