"""keel against transformers on tiny random-weight checkpoints of every supported family.

The checkpoints are written with `save_pretrained` and loaded by keel from the directory.
The reference is `transformers`' own `generate`, one prompt at a time; keel runs all prompts
together as one continuous batch.
"""

from __future__ import annotations

import pytest
import torch

import keel
from tests.helpers import KERNEL_DEVICE, TINY_MODELS, assert_prompt_logprobs_match, hf_greedy, random_prompts

# Lengths around page boundaries (16) and the Mistral window (8), and a single token.
PROMPT_LENGTHS = [1, 3, 7, 8, 15, 16, 17, 33, 40]
NEW_TOKENS = 12
TOP_LOGPROBS = 5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_greedy_tokens_and_logprobs_match_transformers(kind, page_size, device, tiny_model, make_engine):
    directory, hf_model = tiny_model(kind)
    prompts = random_prompts(PROMPT_LENGTHS, seed=len(kind))
    # on a GPU, through the Triton kernels, fused ops and CUDA-graph decode too
    backend = "triton" if device == "cuda" else "torch"
    engine = make_engine(directory, page_size=page_size, device=device, attention_backend=backend)
    params = keel.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                 top_logprobs=TOP_LOGPROBS)
    outputs = engine.generate(prompts, params)

    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert out.token_ids == ref_tokens, f"{kind}: prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length"
        for step, entry in enumerate(out.logprobs):
            ref = ref_logprobs[step]
            top_ids = torch.tensor([t for t, _ in entry.top])
            top_values = torch.tensor([lp for _, lp in entry.top])
            torch.testing.assert_close(top_values, ref.topk(TOP_LOGPROBS).values, atol=1e-4, rtol=0)
            torch.testing.assert_close(top_values, ref[top_ids], atol=1e-4, rtol=0)
            assert entry.logprob == pytest.approx(ref[entry.token_id].item(), abs=1e-4)


def test_single_shard_and_sharded_checkpoints_load_identically(tiny_model, make_engine, tmp_path):
    """The llama3 fixture is sharded with an index file; a single-file copy must give the same logits."""
    from tests.helpers import build_tiny_hf_model

    sharded_dir, _ = tiny_model("llama3")
    build_tiny_hf_model("llama3", tmp_path)
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors.index.json").is_file()
    prompt = random_prompts([9])[0]
    params = keel.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, top_logprobs=3)
    a = make_engine(sharded_dir).generate([prompt], params)[0]
    b = make_engine(tmp_path).generate([prompt], params)[0]
    assert a.token_ids == b.token_ids
    assert [e.top for e in a.logprobs] == [e.top for e in b.logprobs]


@pytest.mark.parametrize("page_size", [1, 16])
def test_prompt_logprobs_match_transformers(page_size, tiny_model, make_engine):
    directory, hf_model = tiny_model("qwen3")
    prompts = random_prompts([40, 2, 17], seed=50)
    engine = make_engine(directory, page_size=page_size, chunked_prefill_size=16)
    engine.generate(prompts, keel.SamplingParams(max_new_tokens=1))  # now cached: scoring must not use the cache
    outputs = engine.generate(prompts, keel.SamplingParams(max_new_tokens=1, prompt_logprobs=3))
    assert_prompt_logprobs_match(hf_model, prompts, outputs, top=3)


@pytest.mark.parametrize("kind,lengths", [("llama3", [1, 9, 20]), ("mistral", [1, 9, 20]), ("qwen2", [9]),
                                          ("qwen3-moe", [1, 9, 20]), ("mixtral", [9])])
def test_triton_backend_gives_the_same_tokens(kind, lengths, tiny_model, make_engine):
    """The whole model on the Triton backend (interpreted on a CPU) against the torch-native reference.
    A single request decodes one row per step, through the fused GEMV projections (with qwen2's QKV bias); the
    MoE models run their experts through the fused MoE kernels."""
    directory, _ = tiny_model(kind)
    prompts = random_prompts(lengths, seed=60)
    params = keel.SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, top_logprobs=2)
    reference = make_engine(directory, attention_backend="torch", page_size=4).generate(prompts, params)
    outputs = make_engine(directory, attention_backend="triton", page_size=4, device=KERNEL_DEVICE.type,
                          disable_cuda_graph=True).generate(prompts, params)
    for out, ref in zip(outputs, reference):
        assert out.token_ids == ref.token_ids
        assert [e.logprob for e in out.logprobs] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-4)
