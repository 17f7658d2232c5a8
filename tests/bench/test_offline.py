"""`keel bench offline --runs`: the median of repeated runs, the roofline of one (CPU, tiny model)."""

from __future__ import annotations

import statistics

import pytest

from keel.bench import offline
from keel.cli import build_parser


def _args(directory, tmp_path, *extra):
    return build_parser().parse_args(
        ["bench", "offline", "--model", str(directory), "--device", "cpu", "--dtype", "float32", "--num-prompts", "3",
         "--input-len", "5", "9", "--output-len", "4", "6", "--result-file", str(tmp_path / "r.jsonl"), *extra])


def test_runs_report_the_median_run_and_one_run_s_roofline(tiny_model, tmp_path, capsys):
    directory, _ = tiny_model("llama3")
    once = offline.run(_args(directory, tmp_path))
    thrice = offline.run(_args(directory, tmp_path, "--runs", "3"))
    assert len(once["run_seconds"]) == 1 and len(thrice["run_seconds"]) == 3
    assert thrice["seconds"] == statistics.median(thrice["run_seconds"])
    assert thrice["roofline_steps"] == once["roofline_steps"]  # summed over one run, not three
    assert thrice["output_tokens"] == once["output_tokens"]
    assert thrice["cached_tokens"] == 0  # no run reuses an earlier run's prompts from the prefix cache
    assert "median of 3 runs" in capsys.readouterr().out


def test_runs_must_be_positive(tiny_model, tmp_path):
    directory, _ = tiny_model("llama3")
    with pytest.raises(ValueError, match="--runs"):
        offline.run(_args(directory, tmp_path, "--runs", "0"))
