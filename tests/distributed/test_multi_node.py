"""Two "machines" on one: node 0 is this process (rank 0, the engine clients talk to), node 1 a `keel generate
--node-rank 1` process (rank 1), meeting at --dist-init-addr over TCP, as ranks on two hosts would."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import keel
from tests.helpers import assert_same_greedy, random_prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("options", [{}, dict(dp_size=2, enable_dp_attention=True)], ids=["tp", "dp-attention"])
def test_two_nodes_give_the_tokens_of_one(options, tiny_model, make_engine):
    directory, _ = tiny_model("qwen3-moe")
    address = f"127.0.0.1:{free_port()}"
    flags = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", address, "--device", "cpu", "--dtype", "float32"]
    if options:
        flags += ["--dp-size", "2", "--enable-dp-attention"]
    node1 = subprocess.Popen([sys.executable, "-m", "keel.cli", "generate", "--model", str(directory), *flags,
                              "--node-rank", "1", "unused"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    params = keel.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, top_logprobs=2)
    prompts = random_prompts([4, 19, 33], seed=5)
    try:
        engine = make_engine(directory, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=address, **options)
        ours = engine.generate(prompts, params)
        engine.core.close()
        log, _ = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node1.returncode == 0 and "node 1 of 2 runs ranks 1..1" in log, log
    for i, (a, b) in enumerate(zip(ours, make_engine(directory).generate(prompts, params))):
        assert_same_greedy(a, b, f"prompt {i}")
