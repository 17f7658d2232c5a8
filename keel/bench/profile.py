"""`--profile PATH` of `keel bench offline` and `keel bench latency`: the benchmark's work once more under torch's
profiler, after the timed runs (so the figures they report carry no profiling overhead).

It writes a trace of a window of engine steps (chrome://tracing or ui.perfetto.dev; gzipped when PATH ends in .gz)
and prints the kernels that took the most device time in the window (on a CPU: the ops that took the most host
time), and how each traced step's time splits between its parts (draft, forward, sample, observe: the
ranges keel.engine.phases records; on the device's timeline on a GPU, the host's on a CPU). For the steps
outside the window (the profiler's per-op overhead would inflate the host's share) it prints
each kind of step's median wall time and how long the host waited in it for the device to finish the step before
(`EngineCore.device_wait_s`). A step that hardly waits is host-bound: the device idled while Python worked. (The
thread's CPU time cannot tell: CUDA spins while it waits.)
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from keel.engine.core import EngineCore
from keel.engine.phases import PHASES, PREFIX as PHASE_PREFIX
from keel.scheduler.scheduler import ScheduledBatch

HOST_BOUND = 0.1  # a step that waits for the device less than this share of its wall time counts as host-bound
TOP_OPS = 15


@dataclass(frozen=True)
class OpTime:
    name: str
    calls: int
    total_ms: float
    share: float  # of the window's total device time (host time on a CPU)


@dataclass(frozen=True)
class StepTimes:
    mode: str  # the batch's forward mode, or "none" for a step that launched nothing
    steps: int  # outside the traced window
    median_wall_ms: float
    median_wait_ms: float  # waiting for the device
    host_bound_share: float  # the share of these steps that waited less than HOST_BOUND x their wall time


@dataclass(frozen=True)
class PhaseTime:
    """A part of the traced steps (keel.engine.phases, or "other": the rest of each step), on the device's
    timeline (on a CPU: the host's), per step."""

    name: str
    ms_per_step: float
    share: float  # of the steps' time


@dataclass(frozen=True)
class ProfileReport:
    trace_path: str
    window_steps: int  # the steps the trace covers
    top_ops: list[OpTime]
    steps: list[StepTimes]
    phases: list[PhaseTime]


@dataclass(frozen=True)
class StepSample:
    mode: str
    wall_s: float
    wait_s: float


@contextmanager
def timed_steps(core: EngineCore, after_step: Callable[[], None]) -> Iterator[list[StepSample]]:
    """Times every core.step() inside the block (wall, and the host's wait for the device) and calls `after_step`
    after each; core.on_schedule, if set, still sees every batch."""
    samples: list[StepSample] = []
    step, on_schedule = core.step, core.on_schedule
    mode = ["none"]

    def seen(batch: ScheduledBatch) -> None:
        mode[0] = batch.mode.name.lower()
        if on_schedule is not None:
            on_schedule(batch)

    def timed_step():
        mode[0] = "none"
        waited, start = core.device_wait_s, time.perf_counter()
        outputs = step()
        samples.append(StepSample(mode[0], time.perf_counter() - start, core.device_wait_s - waited))
        after_step()
        return outputs

    wrapped = "step" in vars(core)
    core.step, core.on_schedule = timed_step, seen  # type: ignore[method-assign]
    try:
        yield samples
    finally:
        if wrapped:
            core.step = step  # type: ignore[method-assign]
        else:
            del core.step  # the class's method again
        core.on_schedule = on_schedule


def profile_steps(core: EngineCore, run: Callable[[], object], path: str, skip_steps: int,
                  window_steps: int) -> ProfileReport:
    """Runs `run` (which steps `core`), tracing steps [skip_steps + 1, skip_steps + 1 + window_steps) into `path`
    (the step before them warms the profiler up)."""
    on_device = core.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities, schedule=schedule(skip_first=skip_steps, wait=0, warmup=1,
                                                          active=window_steps, repeat=1)) as profiler:
        with timed_steps(core, profiler.step) as samples:
            run()
    _export(profiler, path)
    first = skip_steps + 1
    traced = samples[first:first + window_steps]
    untraced = samples[:first] + samples[first + window_steps:]
    events = profiler.events()
    return ProfileReport(path, len(traced), _top_ops(events, on_device), _step_times(untraced or samples),
                         _phases(events, on_device, len(traced)))


def _export(profiler: profile, path: str) -> None:
    if not path.endswith(".gz"):
        profiler.export_chrome_trace(path)
        return
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(suffix=".json", dir=directory, delete=False) as raw:
        name = raw.name
    try:
        profiler.export_chrome_trace(name)
        with open(name, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    finally:
        os.remove(name)


def _top_ops(events, on_device: bool) -> list[OpTime]:
    """Kernels by device time (each kernel counted once, not again under the op that launched it), or, on a CPU,
    ops by their own host time."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        ranged = e.name.startswith(("ProfilerStep", PHASE_PREFIX))  # a step's or a phase's range, not an op
        if on_device and e.device_type == DeviceType.CUDA:
            if ranged:  # its span on the device's timeline
                continue
            own = e.time_range.elapsed_us()
        elif not on_device and e.device_type == DeviceType.CPU:
            own = e.self_cpu_time_total
        else:
            continue
        # on a CPU the step's and phases' ranges own the Python time spent outside any op
        name = "(Python outside torch ops)" if ranged else e.name
        totals[name][0] += 1
        totals[name][1] += own
    total = sum(us for _, us in totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda item: -item[1][1])[:TOP_OPS]
    return [OpTime(name, int(calls), us / 1e3, us / total) for name, (calls, us) in top]


def _phases(events, on_device: bool, steps: int) -> list[PhaseTime]:
    """Each step phase's time in the traced steps, from its ranges: their spans on the device's timeline (from its
    first kernel's start to its last one's end, so a gap inside counts) or on the host's; "other" is the rest of
    the steps' wall time (their host ranges: a step's range on the device covers only the kernels it launched
    outside every phase). Empty when no range was recorded."""
    kind = DeviceType.CUDA if on_device else DeviceType.CPU
    spent: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in events:
        if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU:
            total += e.time_range.elapsed_us()
        elif e.name.startswith(PHASE_PREFIX) and e.device_type == kind:
            spent[e.name[len(PHASE_PREFIX):]] += e.time_range.elapsed_us()
    if not spent or not total or not steps:
        return []
    spent["other"] = max(0.0, total - sum(spent.values()))
    order = [name for name in (*PHASES, "other") if name in spent]
    return [PhaseTime(name, spent[name] / 1e3 / steps, spent[name] / total) for name in order]


def _step_times(samples: list[StepSample]) -> list[StepTimes]:
    by_mode: dict[str, list[StepSample]] = defaultdict(list)
    for s in samples:
        by_mode[s.mode].append(s)
    return [StepTimes(mode, len(steps), 1e3 * statistics.median(s.wall_s for s in steps),
                      1e3 * statistics.median(s.wait_s for s in steps),
                      sum(s.wait_s < HOST_BOUND * s.wall_s for s in steps) / len(steps))
            for mode, steps in sorted(by_mode.items(), key=lambda item: -len(item[1]))]


def format_report(report: ProfileReport, on_device: bool) -> str:
    pdl = " (a kernel launched with PDL counts the time it waits for the one before)" if on_device else ""
    lines = [f"profile: trace of {report.window_steps} steps written to {report.trace_path}",
             f"  top ops by {'device' if on_device else 'host'} time in those steps{pdl}:"]
    lines += [f"  {op.total_ms:10.2f} ms {100 * op.share:5.1f}% {op.calls:7d} calls  {_short(op.name)}"
              for op in report.top_ops]
    if report.phases:
        lines.append(f"  each step's parts ({'device' if on_device else 'host'} timeline, per step): " + ", ".join(
            f"{p.name} {p.ms_per_step:.2f} ms ({100 * p.share:.0f}%)" for p in report.phases))
    lines.append(f"  the other steps (medians; host-bound: waited for the device < {HOST_BOUND:.0%} of the step):")
    lines += [f"  {t.mode:14s} {t.steps:6d} steps {t.median_wall_ms:9.2f} ms, waiting for the device "
              f"{t.median_wait_ms:8.2f} ms, host-bound {100 * t.host_bound_share:5.1f}%" for t in report.steps]
    return "\n".join(lines)


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def add_profile_arguments(parser) -> None:
    parser.add_argument("--profile", metavar="PATH", default=None,
                        help="after the timed runs, run the work once more under torch's profiler: write a trace of "
                             "--profile-steps engine steps to PATH (gzipped if it ends in .gz), print the top kernels "
                             "and the host time per step")
    parser.add_argument("--profile-steps", type=_positive, default=20, help="engine steps the --profile trace covers")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
