"""`keel serve` with speculative decoding: the same text as the offline engine without it, the acceptance
in the responses and in /metrics, and the benchmark-only simulated acceptance refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

import keel
from tests.server.conftest import start_server, stop_server

PROMPT = "The engine keeps the keys and values"


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, keel_cache_dir):
    server = start_server(tmp_path_factory.mktemp("spec") / "serve.log", "--speculative-algorithm", "NGRAM",
                          "--speculative-num-steps", "4")
    yield server
    stop_server(server)


def test_completions_equal_the_engine_without_speculation_and_report_acceptance(spec_server, keel_cache_dir):
    expected = keel.Engine("keel-demo", device="cpu", dtype="float32", page_size=4).generate(
        [PROMPT], keel.SamplingParams(temperature=0.0, max_new_tokens=48))[0]
    body = {"model": "keel-demo", "prompt": PROMPT, "max_tokens": 48, "temperature": 0}
    response = httpx.post(f"{spec_server.url}/v1/completions", json=body, timeout=60).json()
    assert response["choices"][0]["text"] == expected.text
    speculative = response["usage"]["speculative"]
    assert speculative["verify_steps"] > 0 and speculative["accept_length"] >= 1.0
    with httpx.stream("POST", f"{spec_server.url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as stream:
        chunks = [line for line in stream.iter_lines() if line.startswith("data: {")]
    assert "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks) == expected.text
    generate = httpx.post(f"{spec_server.url}/generate", json={"text": PROMPT, "sampling_params": {
        "max_new_tokens": 48, "temperature": 0}}, timeout=60).json()
    assert generate["text"] == expected.text and generate["meta_info"]["spec_verify_ct"] > 0
    metrics = httpx.get(f"{spec_server.url}/metrics", timeout=10).text
    accepted = [line for line in metrics.splitlines() if line.startswith("keel_spec_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0


def test_simulated_acceptance_is_refused_by_serve():
    env = {**os.environ, "KEEL_SIMULATE_ACCEPT_LEN": "3"}
    result = subprocess.run([sys.executable, "-m", "keel.cli", "serve", "--model", "keel-demo"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert "KEEL_SIMULATE_ACCEPT_LEN" in result.stderr
