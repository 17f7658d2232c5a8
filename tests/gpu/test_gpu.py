"""GPU checks at real sizes (skipped without CUDA). The float32 equality tests of
tests/models/test_hf_equality.py also run on CUDA when it is there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import keel
from keel.models.byte_tokenizer import PAD_ID, save_byte_tokenizer
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
    save_byte_tokenizer(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def keel_logits(engine: keel.Engine, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Per prompt, run together: [1 + DECODE_STEPS, vocab] logits of keel's prefill and greedy decode steps,
    and the greedy tokens."""
    core = engine.core
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=DECODE_STEPS + 1, ignore_eos=True)
    rids = [core.add_request(p, params) for p in prompts]
    logits: dict[int, list[torch.Tensor]] = {r: [] for r in rids}
    while core.has_work:
        batch = core.scheduler.schedule()
        out = core.runner.forward(build_forward_batch(batch, CUDA))
        for part, row in zip(batch.sampled, out):
            logits[part.req.rid].append(row.clone())  # a CUDA graph's output is overwritten by its next replay
        core.scheduler.launched(batch)
        core.scheduler.process(batch, [[t] for t in out.argmax(-1).tolist()])
    rows = [torch.stack(logits[r]) for r in rids]
    return rows, [r.argmax(-1).tolist() for r in rows]


PROMPT_LENGTHS = [1, 7, 16, 17, 40, 64, 100, 129]


def test_bf16_llama_1b_logits_match_transformers(llama_1b_dir):
    """Prefill and decode logits of each prompt against transformers' generate, both at bfloat16.

    Each prompt runs alone on both sides, so both do the same GEMM shapes: with random weights a
    one-ulp rounding difference (from a different batch size picking another cuBLAS kernel)
    grows to ~2% by the last of 16 layers, in transformers as much as in keel; the batched
    case is covered by the accuracy test below.
    """
    prompts = random_prompts(PROMPT_LENGTHS, vocab=128000, seed=0)
    # the torch backend is the reference path: it rounds where transformers rounds
    engine = keel.Engine(str(llama_1b_dir), dtype="bfloat16", device="cuda", page_size=16, kv_cache_tokens=8192,
                         attention_backend="torch")
    hf = AutoModelForCausalLM.from_pretrained(llama_1b_dir, dtype=torch.bfloat16).to(CUDA).eval()
    errors = []
    for prompt in prompts:
        ours, _ = keel_logits(engine, [prompt])
        ids = torch.tensor([prompt], device=CUDA)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=DECODE_STEPS + 1,
                          eos_token_id=None, pad_token_id=PAD_ID, output_logits=True, return_dict_in_generate=True)
        errors.append(relative_error(ours[0], torch.cat(ref.logits)))
    engine.core.check_idle()
    print("bf16 relative error vs transformers bf16, per prompt:", [f"{e:.2e}" for e in errors])
    assert max(errors) < 1e-2, errors


@pytest.mark.parametrize("backend,alone", [("torch", False), ("triton", False), ("triton", True)])
def test_bf16_logits_are_as_accurate_as_transformers(llama_1b_dir, backend, alone):
    """keel's bf16 logits are no further from float32 than transformers' own bf16: all 8 prompts
    batched, or (`alone`) each prompt on its own, so decode runs the one-row GEMV projections. On
    the Triton backend: with its kernels, fused ops and CUDA-graph decode."""
    prompts = random_prompts(PROMPT_LENGTHS, vocab=128000, seed=0)
    engine = keel.Engine(str(llama_1b_dir), dtype="bfloat16", device="cuda", page_size=16, kv_cache_tokens=8192,
                         attention_backend=backend, cuda_graph_max_bs=16)
    runs = [keel_logits(engine, [prompt]) for prompt in prompts] if alone else [keel_logits(engine, prompts)]
    ours = [logits for run in runs for logits in run[0]]
    tokens = [generated for run in runs for generated in run[1]]
    engine.core.check_idle()
    del engine
    ours_err, hf_err = [], []
    hf32 = AutoModelForCausalLM.from_pretrained(llama_1b_dir, dtype=torch.float32).to(CUDA).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(llama_1b_dir, dtype=torch.bfloat16).to(CUDA).eval()
    with torch.no_grad():
        for prompt, our_logits, generated in zip(prompts, ours, tokens):
            # the prompt followed by keel's greedy tokens: positions line up with keel's steps one to one
            ids = torch.tensor([prompt + generated[:DECODE_STEPS]], device=CUDA)
            exact = hf32(ids).logits[0, len(prompt) - 1:]
            ours_err.append(relative_error(our_logits, exact))
            hf_err.append(relative_error(hf16(ids).logits[0, len(prompt) - 1:], exact))
    print(f"bf16 relative error vs float32: keel {backend} ({'alone' if alone else 'batched'})",
          [f"{e:.2e}" for e in ours_err])
    print("bf16 relative error vs float32: transformers  ", [f"{e:.2e}" for e in hf_err])
    assert max(ours_err) <= 1.05 * max(hf_err), (ours_err, hf_err)


def test_generate_llama_8b_preset_runs():
    result = subprocess.run(
        [sys.executable, "-m", "keel.cli", "generate", "--model", "llama-3.1-8b", "--max-new-tokens", "32",
         "--ignore-eos", "--no-stream", "Hello"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "--- [length, 32 tokens]" in result.stdout
