"""Streaming from vLLM producers into a trainer rank, end to end with the real engine on CPU, checked
against the batch plan through the trainer's accounting record (as ``tests/trainer/test_launch.py``):

- ``draftstream run`` with a vLLM producer (``--producer-args "--backend vllm ..."``): every planned
  (epoch, step, rank) trained on exactly its planned ids;
- a vLLM producer SIGKILLed mid-epoch, a second one started afterwards joins: the killed producer's
  leases expire and go to the newcomer, and the record still equals the plan.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

from tests.trainer.test_launch import (  # noqa: E402
    TRAIN_ARGS,
    assert_record_matches_plan,
    expected_record,
    steps_recorded,
    wait_for,
)
from tests.vllm.engine.conftest import CLI, ENGINE_ARGS, NUM_ROWS, cli_env, record_engine_starts  # noqa: E402

VLLM_PRODUCER = ["--backend", "vllm", "--vllm-engine-args", ENGINE_ARGS]


def env():
    # The trainer and the engine share the cores: one thread each.
    return cli_env(OMP_NUM_THREADS="1")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (vLLM's engine core and workers below a producer)."""
    parents: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_draftstream_run_with_a_vllm_producer_trains_every_planned_sample_exactly_once(workloads, tmp_path):
    workload = workloads("llama")
    save = tmp_path / "save"
    cmd = [
        *CLI,
        "run",
        "--model",
        str(workload.model),
        "--data",
        str(workload.data),
        "--save-path",
        str(save),
        "--num-producers",
        "1",
        "--producer-args",
        shlex.join(VLLM_PRODUCER),
        "--",
        "--epochs",
        "2",
        *TRAIN_ARGS,
    ]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    log = (save / "logs" / "producer-0.log").read_text() if (save / "logs" / "producer-0.log").is_file() else ""
    assert record_engine_starts("draftstream run, 1 vLLM producer", log) == 1
    assert done.returncode == 0, done.stderr[-3000:] + "\n--- producer-0 ---\n" + log[-3000:]
    assert_record_matches_plan(save, expected_record(str(workload.data), epochs=2, world=1))
    assert (
        f"streamed {2 * NUM_ROWS} samples" in log and "; 0 samples failed" in log
    )  # train + validation rows, per epoch
    assert (save / "checkpoint_best").is_symlink() and (save / "1" / "model.safetensors").is_file()


def test_a_vllm_producer_killed_mid_epoch_and_a_new_one_joining_lose_no_sample(workloads, tmp_path):
    workload = workloads("llama")
    save, endpoint = tmp_path / "save", f"ipc://{tmp_path}/stream"
    expected = expected_record(str(workload.data), epochs=3, world=1)
    train = [
        *CLI,
        "train",
        "--verifier-name-or-path",
        str(workload.model),
        "--data-path",
        str(workload.data),
        "--save-path",
        str(save),
        "--stream-endpoint",
        endpoint,
        "--epochs",
        "3",
        "--lease-seconds",
        "5",
        *TRAIN_ARGS,
    ]

    def producer(name: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    *CLI,
                    "produce",
                    "--model",
                    str(workload.model),
                    "--data",
                    str(workload.data),
                    "--connect",
                    endpoint,
                    "--producer-id",
                    name,
                    "--max-batch-tokens",
                    "64",  # a row per request: leases stay small, so the kill finds some outstanding
                    *VLLM_PRODUCER,
                ],
                env=env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return process, log

    trainer_log = tmp_path / "trainer.log"
    started: list[subprocess.Popen] = []
    engine_processes: list[int] = []
    try:
        with open(trainer_log, "wb") as out:
            trainer = subprocess.Popen(train, env=env(), stdout=out, stderr=subprocess.STDOUT)
        started.append(trainer)
        first, first_log = producer("p0")
        started.append(first)
        wait_for(lambda: steps_recorded(save) >= 2 or trainer.poll() is not None, 240, "training to start")
        engine_processes = descendants(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        steps_at_kill = steps_recorded(save)
        assert steps_at_kill < len(expected), "the run ended before the producer was killed"

        second, second_log = producer("p1")
        started.append(second)
        assert trainer.wait(400) == 0, trainer_log.read_text()[-3000:]
        assert second.wait(60) == 0, second_log.read_text()[-3000:]  # told the run is over
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        # The killed producer's engine core and workers: they should follow their parent; never leave them.
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in engine_processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        orphans = [pid for pid in engine_processes if alive(pid)]
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)

    first_text, second_text, trainer_text = first_log.read_text(), second_log.read_text(), trainer_log.read_text()
    record_engine_starts("producer SIGKILL + join: p0", first_text)
    record_engine_starts("producer SIGKILL + join: p1", second_text)
    assert first.returncode == -signal.SIGKILL
    assert "producer p0 joined" in trainer_text and "producer p1 joined" in trainer_text
    assert "streamed" in second_text and "; 0 samples failed" in second_text
    assert_record_matches_plan(save, expected)
    # The connector ties the engine core's life to its producer's (PR_SET_PDEATHSIG), and the workers
    # follow the engine core: a SIGKILLed producer leaves nothing running (on a GPU, nothing holding memory).
    assert not orphans, f"vLLM processes of the SIGKILLed producer outlived it by 10 s (killed here): {orphans}"
