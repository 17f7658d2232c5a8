"""`keel bench latency` with speculative flags: the same cases without speculation first, then decode time per
output token, the accept length and the speed-up (CPU, tiny model: the figures mean nothing, their wiring does)."""

from __future__ import annotations

import json

from keel.bench import latency
from keel.cli import build_parser


def test_speculative_flags_report_accept_length_and_speed_up(tiny_model, tmp_path, capsys):
    target, _ = tiny_model("llama3")
    result_file = tmp_path / "results.jsonl"
    args = build_parser().parse_args(
        ["bench", "latency", "--model", str(target), "--device", "cpu", "--dtype", "float32", "--batch-sizes", "2",
         "--input-lens", "8", "--output-len", "17", "--runs", "1", "--result-file", str(result_file),
         "--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(target)])
    (record,) = latency.run(args)
    assert json.loads(result_file.read_text()) == record
    # the target drafting for itself: every draft accepted, 4 tokens per step until the last (16 = 4 x 4)
    assert record["accept_length"] == 4.0
    assert record["speedup_vs_no_speculation"] > 0 and record["baseline_decode_tok_s"] > 0
    assert "accept length 4.00" in capsys.readouterr().out
