"""Programmatic dependent launch (PDL) for the decode-step kernels, on Hopper and later.

A kernel launched with PDL is launched while the kernel before it is still running: its programs
take the SMs the earlier kernel's tail leaves free and wait there, so the launch gap and most of
the ramp-up between two kernels disappear. On an H200 this took llama-3.1-8b's batch-1 decode
step from 4.135 to 4.065 ms (docs/benchmarks.md). Prefetching each projection's weights into L2
before the wait measured slower (4.41-4.44 ms): the waiting programs' prefetches crowd out the
running kernel's reads.

The rule that keeps this safe: every program of a PDL kernel calls `gdc_wait` before it touches
memory at all. The wait returns once the previous kernel has finished and its writes are
visible; that kernel waited on its own predecessor in turn, so all earlier kernels are finished
too. Kernels launched without PDL (torch's, cuBLAS) wait for the full completion as usual.

KEEL_DISABLE_PDL=1 turns it off (to compare, or to rule it out when chasing a bug).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

DISABLED = os.environ.get("KEEL_DISABLE_PDL") == "1"


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (never under TRITON_INTERPRET: its tensors are on the CPU)."""
    if DISABLED or device.type != "cuda":
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel with a `PDL: tl.constexpr` parameter."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """The first statement of a PDL kernel: let the next kernel launch now (it waits in turn before
    touching our results), then wait for the kernels before this one."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
