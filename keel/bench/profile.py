"""`--profile PATH` of `keel bench offline` and `keel bench latency`: the benchmark's work once more under torch's
profiler, after the timed runs (so the figures they report carry no profiling overhead).

It writes a trace of a window of engine steps (chrome://tracing or ui.perfetto.dev; gzipped when PATH ends in .gz),
prints the kernels that took the most device time in the window (on a CPU: the ops that took the most host time),
and, over every step of the run, each kind of step's wall time and host time: the CPU time of the thread that
runs the engine. A step whose host time is close to its wall time is host-bound: the device waited for Python.
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
from torch.profiler import ProfilerActivity, profile, schedule

from keel.engine.core import EngineCore
from keel.scheduler.scheduler import ScheduledBatch

HOST_BOUND = 0.9  # a step whose host time is at least this share of its wall time counts as host-bound
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
    steps: int
    median_wall_ms: float
    median_host_ms: float
    host_bound_share: float  # of these steps, the share whose host time is >= HOST_BOUND x wall


@dataclass(frozen=True)
class ProfileReport:
    trace_path: str
    window_steps: int  # the steps the trace covers
    top_ops: list[OpTime]
    steps: list[StepTimes]


@dataclass
class _Step:
    mode: str
    wall_s: float
    host_s: float


@contextmanager
def timed_steps(core: EngineCore, after_step: Callable[[], None]) -> Iterator[list[_Step]]:
    """Times every core.step() inside the block (wall, and the calling thread's CPU time) and calls `after_step`
    after each; core.on_schedule, if set, still sees every batch."""
    samples: list[_Step] = []
    step, on_schedule = core.step, core.on_schedule
    mode = ["none"]

    def seen(batch: ScheduledBatch) -> None:
        mode[0] = batch.mode.name.lower()
        if on_schedule is not None:
            on_schedule(batch)

    def timed_step():
        mode[0] = "none"
        wall, host = time.perf_counter(), time.thread_time()
        outputs = step()
        samples.append(_Step(mode[0], time.perf_counter() - wall, time.thread_time() - host))
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
    """Runs `run` (which steps `core`), tracing steps [skip_steps, skip_steps + window_steps) into `path`."""
    device = core.runner.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(skip_first=skip_steps, wait=0, warmup=1,
                                                          active=window_steps, repeat=1)) as profiler:
        with timed_steps(core, profiler.step) as samples:
            run()
    _export(profiler, path)
    events = profiler.key_averages()
    on_device = device.type == "cuda"
    return ProfileReport(path, min(window_steps, max(0, len(samples) - skip_steps - 1)), _top_ops(events, on_device),
                         _step_times(samples))


def _export(profiler: profile, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not path.endswith(".gz"):
        profiler.export_chrome_trace(path)
        return
    with tempfile.NamedTemporaryFile(suffix=".json", dir=directory, delete=False) as raw:
        name = raw.name
    try:
        profiler.export_chrome_trace(name)
        with open(name, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    finally:
        os.remove(name)


def _top_ops(events, on_device: bool) -> list[OpTime]:
    def own_us(event) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    timed = [e for e in events if own_us(e) > 0]
    total = sum(own_us(e) for e in timed)
    top = sorted(timed, key=own_us, reverse=True)[:TOP_OPS]
    # the profiler's own step ranges own the Python time spent outside any op
    return [OpTime("(Python outside torch ops)" if e.key.startswith("ProfilerStep") else e.key, e.count,
                   own_us(e) / 1e3, own_us(e) / total) for e in top]


def _step_times(samples: list[_Step]) -> list[StepTimes]:
    by_mode: dict[str, list[_Step]] = defaultdict(list)
    for s in samples:
        by_mode[s.mode].append(s)
    return [StepTimes(mode, len(steps), 1e3 * statistics.median(s.wall_s for s in steps),
                      1e3 * statistics.median(s.host_s for s in steps),
                      sum(s.host_s >= HOST_BOUND * s.wall_s for s in steps) / len(steps))
            for mode, steps in sorted(by_mode.items(), key=lambda item: -len(item[1]))]


def format_report(report: ProfileReport, on_device: bool) -> str:
    what = "device" if on_device else "host"
    lines = [f"profile: trace of {report.window_steps} steps written to {report.trace_path}",
             f"  top ops by {what} time in those steps:"]
    lines += [f"  {op.total_ms:10.2f} ms {100 * op.share:5.1f}% {op.calls:7d} calls  {_short(op.name)}"
              for op in report.top_ops]
    lines.append("  host time per step, over the whole run (wall / host CPU, medians; host-bound: host >= "
                 f"{HOST_BOUND:.0%} of wall):")
    lines += [f"  {t.mode:14s} {t.steps:6d} steps  {t.median_wall_ms:8.2f} / {t.median_host_ms:8.2f} ms  "
              f"host-bound {100 * t.host_bound_share:5.1f}%" for t in report.steps]
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
