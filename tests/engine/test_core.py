"""EngineCore's process settings (keel/engine/core.py)."""

from __future__ import annotations

import pytest
import torch

from keel.engine.core import limit_host_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_a_gpu_engine_keeps_one_host_thread(threads, monkeypatch):
    """Small host tensors spread over every core made each step wait on descheduled threads under load."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit_host_threads(torch.device("cpu"))
    assert torch.get_num_threads() == 4  # a model on the CPU needs its threads
    limit_host_threads(torch.device("cuda", 0))
    assert torch.get_num_threads() == 1


def test_ranks_on_the_cpu_share_its_cores(threads, monkeypatch):
    """Two ranks each spinning threads over all the cores made a tiny model's TP 2 step 5x longer."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit_host_threads(torch.device("cpu"), ranks_here=2)
    assert torch.get_num_threads() == 2
    limit_host_threads(torch.device("cpu"), ranks_here=8)
    assert torch.get_num_threads() == 1


def test_omp_num_threads_overrides(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    limit_host_threads(torch.device("cuda", 0))
    limit_host_threads(torch.device("cpu"), ranks_here=2)
    assert torch.get_num_threads() == 4
