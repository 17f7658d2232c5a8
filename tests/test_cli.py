"""`keel generate` as a user runs it, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest


def keel(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keel.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_on_keel_demo_prints_text():
    result = keel("generate", "--model", "keel-demo", "--max-new-tokens", "24", "--temperature", "0", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and len(result.stdout.strip()) > len("Hello") + 5


def test_generate_several_prompts():
    result = keel("generate", "--model", "keel-demo", "--max-new-tokens", "8", "A", "B")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- [length, 8 tokens]") == 2


def test_generate_runs_a_dummy_weight_preset():
    result = keel("generate", "--model", "llama-3.2-1b", "--max-new-tokens", "3", "--kv-cache-tokens", "256",
                  "--dtype", "bfloat16", "--ignore-eos", "--no-stream", "Hi")
    assert result.returncode == 0, result.stderr
    assert "--- [length, 3 tokens]" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "keel-demo", "--top-p", "2", "x"], "top_p"),
    (["--model", "nope", "x"], "not a local directory"),
])
def test_bad_input_is_a_clear_error(args, message):
    result = keel("generate", *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_help_lists_engine_and_sampling_flags():
    result = keel("generate", "--help")
    assert result.returncode == 0
    for flag in ("--page-size", "--kv-cache-tokens", "--mem-fraction", "--load-format", "--top-k",
                 "--repetition-penalty", "--stop"):
        assert flag in result.stdout


def test_serve_reaches_its_engine_spawn_without_importing_torch(keel_cache_dir):
    """`keel serve` spawns the engine right after resolving the model; on a 2-core machine every second of
    import before that delays the engine, so parsing flags and resolving a cached model must not need torch."""
    code = ("import sys, keel.cli, keel.server.engine_client\n"
            "from keel.models.source import resolve_model\n"
            "resolve_model('llama-3.2-1b')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", "from keel.models.source import resolve_model; "
                    "resolve_model('llama-3.2-1b')"], check=True)  # built once (that may import torch)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_version():
    result = keel("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"keel {__import__('keel').__version__}"


@pytest.mark.parametrize("args,message", [
    ([], "keel serve needs a model: keel serve MODEL"),
    (["keel-demo", "--model", "other"], "two models given: 'keel-demo' and --model 'other'"),
])
def test_serve_has_no_default_model(args, message):
    result = keel("serve", *args, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_serve_takes_the_model_positionally_or_by_either_flag():
    from keel.cli import _served_model, build_parser

    parser = build_parser()
    for argv in (["serve", "m"], ["serve", "--model", "m"], ["serve", "--model-path", "m"],
                 ["serve", "m", "--model", "m"]):
        assert _served_model(parser, parser.parse_args(argv)) == "m"


def test_a_list_option_does_not_swallow_the_prompt():
    """`--stop x "prompt"`: the prompt stays a prompt (a list flag takes one value per use)."""
    result = keel("generate", "--model", "keel-demo", "--max-new-tokens", "4", "--stop", "zzz", "--stop", "qq",
                  "--stop-token-ids", "1", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")


def test_generate_prints_the_log_probs_asked_for():
    result = keel("generate", "--model", "keel-demo", "--max-new-tokens", "3", "--temperature", "0",
                  "--top-logprobs", "2", "Hello")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "log-probs:" in lines and len(lines) - lines.index("log-probs:") - 1 == 3
    assert all(line.count("(top: ") == 1 for line in lines[lines.index("log-probs:") + 1:])


def test_a_refused_request_is_not_echoed_first():
    result = keel("generate", "--model", "keel-demo", "--max-new-tokens", "100000", "Hello")
    assert result.returncode != 0 and result.stdout == "" and "Traceback" not in result.stderr


def test_serve_fails_in_one_line_on_a_busy_port_before_loading():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = keel("serve", "keel-demo", "--port", port, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"keel: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "Loaded" not in result.stderr  # refused before the engine started loading


@pytest.mark.parametrize("args,message", [(("--port", "70000"), "port: must be in [1, 65535]"),
                                          (("--host", "no.such.host.invalid"), "cannot listen on no.such.host")])
def test_serve_checks_host_and_port(args, message):
    result = keel("serve", "keel-demo", *args, timeout=60)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_an_engine_start_up_failure_is_one_line():
    from tests.server.conftest import free_port

    args = ("serve", "keel-demo", "--port", str(free_port()), "--context-length", "100000")
    result = keel(*args, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("keel: error: the engine failed to start: ValueError: keel-demo: "
                                                      "context_length=100000 exceeds the model's "
                                                      "max_position_embeddings=2048")
    debug = keel(*args, "--log-level", "debug", timeout=120)  # the whole story, for a bug report
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_serving_line_comes_once_the_socket_listens(tmp_path):
    import httpx

    from tests.server.conftest import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "keel.cli", "serve", "keel-demo", "--port", str(port)],
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "keel is serving" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200  # no retry needed
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_generate_says_it_is_loading_before_the_model_loads():
    result = keel("generate", "--model", "keel-demo", "--max-new-tokens", "4", "Hi")
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and lines[0] == "keel: loading keel-demo" and lines[1].startswith("keel: loaded in")
