"""When kernels launch with programmatic dependent launch (the kernels' results are checked with it
on in tests/gpu)."""

from __future__ import annotations

import torch

from keel.kernels import pdl


def test_off_without_a_cuda_device():
    # TRITON_INTERPRET runs the kernels on CPU tensors, and the interpreter has no grid dependencies
    assert pdl.pdl_launch_args(torch.device("cpu")) == {"PDL": False}


def test_keel_disable_pdl_turns_it_off(monkeypatch):
    monkeypatch.setattr(pdl, "DISABLED", True)
    assert pdl.pdl_launch_args(torch.device("cuda", 0)) == {"PDL": False}
