"""`draftstream bench trainer` runs and ends with one JSON line."""

from __future__ import annotations

import json

from bench.trainer import main


def test_trainer_bench_prints_a_table_and_a_json_line(capsys):
    assert main(["--steps", "1", "--warmup", "0", "--algorithms", "eagle3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "trainer" and result["rows"][0]["train_tokens_per_s"] > 0
    assert any(line.startswith("eagle3") for line in lines[:-1])
