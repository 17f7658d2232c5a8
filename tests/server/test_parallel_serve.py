"""`keel serve` with several ranks (CPU, gloo): the engine process starts the other ranks, answers as one rank
would, and stops them all at shutdown."""

from __future__ import annotations

import httpx
import pytest

import keel
from tests.server.conftest import start_server, stop_server


@pytest.mark.parametrize("flags", [["--tp-size", "2"], ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"]],
                         ids=["tp", "dp-attention"])
def test_served_by_two_ranks_as_by_one(flags, tiny_model, tmp_path, keel_cache_dir):
    directory, _ = tiny_model("qwen3-moe")  # the demo model's 259-token vocabulary does not split in two
    server = start_server(tmp_path / "serve.log", "--model", str(directory), "--device", "cpu", "--dtype", "float32",
                          *flags)
    try:
        name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        prompts = ["The quick brown fox", "Once upon a time", "1, 2, 3,"]
        texts = [httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": p, "max_tokens": 8,
                                                                   "temperature": 0}, timeout=60).json()
                 for p in prompts]
    finally:
        stop_server(server)
    solo = keel.Engine(str(directory), device="cpu", dtype="float32", kv_cache_tokens=4096, page_size=4)
    params = keel.SamplingParams(max_new_tokens=8, temperature=0.0)
    for prompt, body in zip(prompts, texts):
        assert body["choices"][0]["text"] == solo.generate([prompt], params)[0].text, body
