"""``bench.capture`` runs end to end on a tiny target and ends stdout with one JSON line."""

from __future__ import annotations

import json

from bench.capture import main


def test_capture_bench_prints_a_table_then_one_json_line(capsys):
    argv = ["--device", "cpu", "--hidden-size", "64", "--num-layers", "4", "--intermediate-size", "128"]
    argv += ["--num-rows", "6", "--min-len", "8", "--max-len", "40", "--max-batch-tokens", "64", "--repeats", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "capture" and result["layer_ids"] == [2, 2, 1, 4]
    assert result["num_pairs"] == 2 * result["num_batches"] > 2
    assert result["bare_pass_ms"] > 0 and result["capture_pass_ms"] > 0 and "overhead_pct" in result
    assert any(line.startswith("overhead") for line in lines[:-1])
