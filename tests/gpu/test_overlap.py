"""Overlap scheduling on a GPU: a decode step never makes the host wait for the device."""

from __future__ import annotations

import pytest
import torch

import keel
from tests.helpers import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_overlapped_decode_steps_never_synchronize(tiny_model, monkeypatch):
    monkeypatch.setenv("KEEL_STRICT_CHECKS", "0")  # the checker reads the device table back: a sync by design
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), device="cuda", dtype="float32", attention_backend="triton")
    core = engine.core
    assert core.overlap
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9, seed=1, logprobs=True, top_logprobs=2)]
    for i, prompt in enumerate(random_prompts([5, 17, 33], seed=3)):
        core.add_request(prompt, keel.SamplingParams(max_new_tokens=40, ignore_eos=True, **kinds[i % 2]))
    for _ in range(3):  # prefill, first decodes
        core.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            assert core.step()  # each reads the previous step's tokens: one event wait, no stream sync
    finally:
        torch.cuda.set_sync_debug_mode(0)
    while core.has_work:
        core.step()
    core.check_idle()
