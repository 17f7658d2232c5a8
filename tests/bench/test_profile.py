"""`--profile` of `keel bench offline` and `keel bench latency` (CPU, tiny model): the trace is written, the top ops
and every step's wall and host time are reported, and the engine is left as it was."""

from __future__ import annotations

import gzip
import json

import pytest

import keel
from keel.bench import latency, offline
from keel.bench.profile import profile_steps, timed_steps
from keel.cli import build_parser


def _bench_args(bench: str, directory, tmp_path, trace, steps: int, *work: str):
    return build_parser().parse_args(
        ["bench", bench, "--model", str(directory), "--device", "cpu", "--dtype", "float32", *work,
         "--result-file", str(tmp_path / "r.jsonl"), "--profile", str(trace), "--profile-steps", str(steps)])


def test_bench_offline_profile_writes_a_trace_and_reports_steps(tiny_model, tmp_path, capsys):
    directory, _ = tiny_model("llama3")
    trace = tmp_path / "trace.json.gz"
    record = offline.run(_bench_args("offline", directory, tmp_path, trace, 3, "--num-prompts", "4",
                                     "--input-len", "5", "9", "--output-len", "10", "10"))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in events)
    profile = record["profile"]
    assert profile["window_steps"] == 3 and profile["top_ops"]
    modes = {t["mode"]: t for t in profile["steps"]}
    assert "decode" in modes and "extend" in modes
    # the profiled run repeats the timed one's work (every request decodes 9 tokens after its first); the 3 traced
    # steps and the one that warms the profiler up are not counted
    assert sum(t["steps"] for t in profile["steps"]) >= 5
    assert all(t["median_wall_ms"] > 0 for t in profile["steps"])
    # on a CPU nothing waits for a device: every step is host-bound
    assert all(t["median_wait_ms"] == 0 and t["host_bound_share"] == 1 for t in profile["steps"])
    phases = {p["name"]: p for p in profile["phases"]}
    assert set(phases) == {"forward", "sample", "other"}  # no drafter: nothing drafts or observes
    assert all(p["ms_per_step"] > 0 for p in phases.values())
    assert abs(sum(p["share"] for p in phases.values()) - 1) < 1e-6
    out = capsys.readouterr().out
    assert f"profile: trace of 3 steps written to {trace}" in out and "host-bound 100.0%" in out
    assert "each step's parts (host timeline, per step): forward" in out


def test_bench_offline_profile_splits_speculative_steps_into_their_parts(tiny_model, tmp_path):
    directory, _ = tiny_model("llama3")
    record = offline.run(_bench_args("offline", directory, tmp_path, tmp_path / "t.json", 3, "--num-prompts", "2",
                                     "--input-len", "8", "8", "--output-len", "16", "16",
                                     "--speculative-algorithm", "STANDALONE",
                                     "--speculative-draft-model-path", str(directory)))
    phases = {p["name"]: p["ms_per_step"] for p in record["profile"]["phases"]}
    assert set(phases) == {"draft", "forward", "sample", "observe", "other"} and min(phases.values()) > 0


def test_bench_latency_profile(tiny_model, tmp_path, capsys):
    directory, _ = tiny_model("llama3")
    trace = tmp_path / "trace.json"
    latency.run(_bench_args("latency", directory, tmp_path, trace, 4, "--batch-sizes", "2", "--input-lens", "6",
                            "--output-len", "8", "--runs", "1"))
    assert json.loads(trace.read_text())["traceEvents"]
    assert "profile: trace of 4 steps" in capsys.readouterr().out


def test_profile_steps_restores_the_engine(tiny_model, tmp_path):
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), device="cpu", dtype="float32")
    seen = []
    engine.core.on_schedule = seen.append
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    report = profile_steps(engine.core, lambda: engine.generate([[1, 2, 3]], params), str(tmp_path / "t.json"), 0, 2)
    assert seen and report.window_steps == 2  # the hook set before still saw every batch
    assert "step" not in vars(engine.core) and engine.core.on_schedule == seen.append
    assert engine.generate([[1, 2, 3]], params)[0].token_ids  # and the engine still runs


def test_timed_steps_times_steps_that_launch_nothing_too(tiny_model):
    directory, _ = tiny_model("llama3")
    engine = keel.Engine(str(directory), device="cpu", dtype="float32")
    with timed_steps(engine.core, lambda: None) as samples:
        engine.core.step()  # nothing to run
    assert [s.mode for s in samples] == ["none"]


def test_profile_steps_must_be_positive():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "offline", "--model", "m", "--profile", "t.json", "--profile-steps", "0"])


def test_a_step_that_hardly_waits_for_the_device_is_host_bound():
    from keel.bench.profile import StepSample, _step_times

    (decode,) = _step_times([StepSample("decode", 0.010, 0.005), StepSample("decode", 0.010, 0.0005),
                             StepSample("decode", 0.012, 0.0)])
    assert decode.steps == 3 and decode.median_wall_ms == 10.0 and decode.median_wait_ms == 0.5
    assert decode.host_bound_share == 2 / 3


def test_device_phases_are_shares_of_the_steps_wall_time():
    """On a GPU a step's own range on the device spans only the kernels it launched outside every phase: the
    phases' shares are of the steps' host ranges, the rest is "other"."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from keel.bench.profile import _phases

    def event(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("ProfilerStep#1", DeviceType.CPU, 5000.0), event("ProfilerStep#1", DeviceType.CUDA, 4.0),
              event("keel.forward", DeviceType.CUDA, 4000.0), event("keel.draft", DeviceType.CUDA, 500.0),
              event("keel.forward", DeviceType.CPU, 300.0)]
    phases = {p.name: (p.ms_per_step, p.share) for p in _phases(events, on_device=True, steps=1)}
    assert phases == {"draft": (0.5, 0.1), "forward": (4.0, 0.8), "other": (0.5, 0.1)}
