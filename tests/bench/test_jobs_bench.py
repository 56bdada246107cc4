"""The several-jobs benchmark runs its quick points (1 and 2 aligned jobs, 2 jobs of different seeds),
writes its plot and ends with a JSON line whose figures make physical sense."""

from __future__ import annotations

import json

import pytest

from bench import jobs

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_jobs_bench_shares_captures_finishes_every_job_and_prints_a_json_line_last(capsys, tmp_path):
    assert jobs.main(["--quick", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["bench"] == "jobs"
    assert any(line.startswith("aligned") for line in lines[:-1])
    assert any(line.startswith("seeds") for line in lines[:-1])

    regime = result["regime"]
    dataset = regime["dataset"]
    assert dataset["rows"] == regime["num_conversations"] and dataset["bytes"] > 0
    assert 0 < regime["window_bytes"] < dataset["bytes"]  # the budget matters for the seeds runs

    aligned, seeds = result["series"]["aligned"], result["series"]["seeds"]
    assert [p["jobs"] for p in aligned] == [1, 2]
    assert [p["jobs"] for p in seeds] == [2]
    assert result["series"]["no_window"] == []  # the memory control is not run with --quick
    assert seeds[0]["producer_rss_over_no_window"] is None
    assert [p["seeds"] for p in aligned] == [[0], [0, 0]]
    assert seeds[0]["seeds"] == [1, 2]
    for point in aligned + seeds:
        n = point["jobs"]
        assert point["all_finished"], point
        assert len(point["per_job"]) == n
        for name, job in point["per_job"].items():
            assert job["finished"] and job["trained"] == job["planned"] > 0 and job["skipped"] == 0, (name, job)
            assert job["samples_per_s"] is not None and job["samples_per_s"] > 0, (name, job)
        # Every job is sent every row of every epoch (training and validation splits together).
        assert point["samples_sent"] >= n * regime["epochs"] * dataset["rows"], point
        # The target runs at least once per row and epoch, at most once per sample sent.
        assert regime["epochs"] * dataset["rows"] <= point["forwards"] <= point["samples_sent"], point
        assert point["window_peak_mb"] <= point["window_budget_mb"], point
        assert point["producer_peak_rss"] > point["window_peak_mb"] * 1e6, point

    single, pair = aligned
    assert single["forwards_per_sample"] == pytest.approx(1.0, abs=0.05)
    assert single["window_hits"] == 0 and single["window_peak_mb"] == 0
    assert pair["forwards_per_sample"] <= 0.55, pair  # same seed: the target runs about once for both jobs
    assert seeds[0]["window_budget_mb"] == pytest.approx(regime["window_bytes"] / 1e6, abs=0.05)
    assert single["vs_single"] == 1.0

    png = tmp_path / "jobs.png"
    assert result["plot"] == str(png)
    assert png.is_file() and png.stat().st_size > 0
