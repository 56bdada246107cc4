"""The fan-out benchmark runs both series on tiny sizes, writes its plot and ends with a JSON line."""

from __future__ import annotations

import json

import pytest

from bench import fanout

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_fanout_bench_measures_both_series_plots_and_prints_a_json_line_last(capsys, tmp_path):
    assert fanout.main(["--quick", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "fanout"
    assert any(line.startswith("ranks") for line in lines[:-1])
    assert any(line.startswith("producers") for line in lines[:-1])

    series = result["series"]
    assert [p["ranks"] for p in series["ranks"]] == [1, 2]
    assert [p["producers"] for p in series["producers"]] == [1, 2]
    for name, points in series.items():
        assert points, name
        for point in points:
            assert point["samples_per_s"] is not None and point["samples_per_s"] > 0, (name, point)
            assert point["steady_samples"] > 0 and point["steady_s"] > 0, (name, point)

    png = tmp_path / "fanout.png"
    assert result["plot"] == str(png)
    assert png.is_file() and png.stat().st_size > 0
