"""Training on live traffic: ``draftstream run --data <traffic log>`` trains chunk by chunk as rows
are appended (``protocol.trafficlog``, ``trainer.data.live``), with real producers and sockets.

The log is written here the way ``draftstream serve --capture-dir`` writes it (``log_id``, then
``rows/traffic-NNNNN.jsonl`` appended line by line); its rows are a tiny target's prepared rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from protocol.dataset import PreparedDataset
from protocol.trafficlog import TrafficLog, create_log_id
from tests.trainer.test_launch import CLI, TRAIN_ARGS, assert_record_matches_plan, env, pids_with, wait_for, workload
from trainer.data.live import LivePlans

__all__ = ["workload"]  # the module fixture, shared with test_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHUNK, VAL_EVERY, CHUNKS, REUSE = 8, 4, 3, 2
# A traffic log has no token_freq.pt to prune the vocabulary with (a live run usually starts
# --from-pretrained the serving draft, which keeps its own): the tiny target's full 761 here.
_i = TRAIN_ARGS.index("--draft-vocab-size")
LIVE_TRAIN_ARGS = TRAIN_ARGS[:_i] + TRAIN_ARGS[_i + 2 :]


def _append(log_dir: Path, lines: list[str]) -> None:
    with (log_dir / "rows" / "traffic-00000.jsonl").open("a") as f:
        for line in lines:
            f.write(line + "\n")


def _row_line(dataset: PreparedDataset, i: int) -> str:
    ids, mask = dataset.row(i)
    return json.dumps({"input_ids": ids.tolist(), "loss_mask": mask.int().tolist(), "request_id": f"req-{i}"})


def _expected(log_dir: Path) -> dict:
    plans = LivePlans(
        TrafficLog(log_dir, max_tokens=2048),
        chunk_rows=CHUNK,
        val_every=VAL_EVERY,
        epochs=CHUNKS,
        seed=7,
        world_size=1,
        logical_world_size=1,
        total_seq_len=384,
        reuse=REUSE,
    )
    return {
        (epoch, step, 0): plans[epoch].batches_for(0, step)
        for epoch in range(CHUNKS)
        for step in range(plans[epoch].num_steps)
    }


def test_live_training_follows_the_log_and_a_killed_trainer_resumes_without_losing_a_row(workload, tmp_path):
    """Chunks 0-1 are in the log when ``run`` starts; the trainer is SIGKILLed after chunk 0's
    checkpoint; chunk 2 (one malformed line among its rows) is appended; the same command resumes.
    Every trained row is in the record exactly as the chunk plans put it (each non-held-out row
    twice, --reuse 2), each chunk holds out every 4th row, the malformed line is counted as
    dropped, and each chunk left a checkpoint vLLM could serve."""
    dataset = PreparedDataset(workload["data"])
    log_dir = tmp_path / "traffic"
    (log_dir / "rows").mkdir(parents=True)
    create_log_id(log_dir)
    _append(log_dir, [_row_line(dataset, i) for i in range(2 * CHUNK)])
    save = tmp_path / "save"
    cmd = [
        *CLI,
        "run",
        "--model",
        workload["model"],
        "--data",
        str(log_dir),
        "--save-path",
        str(save),
        "--stream-endpoint",
        f"ipc://{tmp_path}/ep",
        "--num-producers",
        "1",
        "--",
        *LIVE_TRAIN_ARGS,
        "--epochs",
        str(CHUNKS),
        "--reuse",
        str(REUSE),
        "--live-chunk-rows",
        str(CHUNK),
        "--live-val-every",
        str(VAL_EVERY),
    ]
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (save / "1" / "model.safetensors").is_file(), 240, "chunk 1's checkpoint")
        [trainer] = pids_with("trainer.train", str(save)) or pids_with(" train ", str(save))
        os.kill(trainer, signal.SIGKILL)  # waiting for chunk 2's traffic, after chunk 1's checkpoint
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0, out[-2000:]
    assert not (save / "2").exists()

    lines = [_row_line(dataset, i) for i in range(2 * CHUNK, 3 * CHUNK)]
    lines[3] = '{"input_ids": [1, 2, "x"], "loss_mask": [0, 1, 1]}'  # a malformed row: dropped, counted
    _append(log_dir, lines)
    start = time.monotonic()
    second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr

    assert_record_matches_plan(save, _expected(log_dir))
    chunks = {}
    for line in (save / "live_chunks.jsonl").read_text().splitlines():
        record = json.loads(line)
        chunks[record["chunk"]] = record  # a chunk validated again after a resume: the last line counts
    assert [(c["trained"], c["held_out"], c["dropped"]) for _, c in sorted(chunks.items())] == [
        (6, 2, {}),
        (6, 2, {}),
        (6, 1, {"malformed": 1}),  # the malformed line took a held-out slot (every 4th row)
    ]
    for chunk in range(CHUNKS):
        config = json.loads((save / str(chunk) / "config.json").read_text())
        assert config["speculators_model_type"] == "eagle3" and (save / str(chunk) / "model.safetensors").is_file()
    print(f"live: resumed run trained chunks 1-2 in {time.monotonic() - start:.1f} s")
