"""Named ranges over the parts of an engine step (draft, forward, sample, observe), recorded only while torch's
profiler runs: `keel bench ... --profile` reports each part's time per step from them (keel.bench.profile)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.profiler import record_function

PREFIX = "keel."
PHASES = ("draft", "forward", "sample", "observe")


def step_phase(name: str) -> AbstractContextManager:
    """A profiler range `keel.<name>`; nothing when no profiler records (a range costs host time every step)."""
    return record_function(PREFIX + name) if torch.autograd._profiler_enabled() else nullcontext()
