"""``draftstream bench producer --backend vllm`` on a tiny target with small sizes, as a user runs it
(a CLI subprocess: two engines, the producer's and plain vLLM's). Checks the table and the fields of
the JSON line, not the ratio's value (2 shared CPU cores say little about a GPU); the figures go to
the session summary."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

from tests.vllm.engine.conftest import CLI, FIGURES, cli_env, record_engine_starts  # noqa: E402

SMALL = ["--hidden-size", "64", "--intermediate-size", "128", "--num-layers", "8", "--num-rows", "8", "--min-len", "16"]
SMALL += ["--max-len", "64", "--repeats", "1", "--warmup", "1", "--sink", "push"]


def test_bench_producer_vllm_measures_both_paths_in_one_run_and_ends_with_a_json_line():
    start = time.perf_counter()
    done = subprocess.run(
        [*CLI, "bench", "producer", "--backend", "vllm", *SMALL],
        env=cli_env(VLLM_LOGGING_LEVEL="INFO"),
        capture_output=True,
        text=True,
        timeout=280,
    )
    seconds = time.perf_counter() - start
    assert record_engine_starts("bench producer --backend vllm", done.stdout + done.stderr) == 2
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert "plain vLLM prefill (max_tokens=1)" in done.stdout and "producer (capture + connector)" in done.stdout
    result = json.loads(lines[-1])
    assert result["bench"] == "producer-vllm" and result["sink"] == "push"
    assert result["num_rows"] == 8 and result["layer_ids"] == [2, 4, 5, 8] and result["repeats"] == 1
    assert len(result["round_ratios"]) == 1 and result["ratio"] > 0 and result["target_ratio"] == 0.9
    assert result["plain_tokens_per_s"] > 0 and result["producer_tokens_per_s"] > 0
    assert isinstance(result["within_target"], bool)
    FIGURES.append(f"bench producer --backend vllm (tiny, 8 rows, push): ratio {result['ratio']}, {seconds:.0f} s")
