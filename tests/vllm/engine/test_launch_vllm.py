"""``draftstream launch-vllm`` (a real ``vllm serve`` on CPU, through ``producer.vllm.cli``) and
``draftstream produce --backend vllm --endpoint``, both at their dtype defaults: one server for the module.

- spill: every row written and validated; the files are the fp32 capture the HF backend makes
  (launch-vllm runs the checkpoint's dtype, which is what ``produce --dtype auto`` announces);
- stream: the server's connector pushes into a ``draftstream train --stream-endpoint`` rank; the
  accounting record equals the plan.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

import torch  # noqa: E402

from protocol.dataset import PreparedDataset  # noqa: E402
from protocol.hsfile import hs_path, list_hs_indices, read_hs_file  # noqa: E402
from tests.trainer.test_launch import TRAIN_ARGS, assert_record_matches_plan, expected_record  # noqa: E402
from tests.vllm.engine.conftest import CLI, NUM_ROWS, cli_env, record_engine_starts  # noqa: E402

SERVE_ARGS = ["--enforce-eager", "--max-model-len", "1024"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models_listed(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
            return bool(json.loads(response.read()).get("data"))
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(workloads, tmp_path_factory):
    """``launch-vllm MODEL --spill-dir DIR -- --port P --enforce-eager --max-model-len 1024``, up."""
    workload = workloads("llama")
    root = tmp_path_factory.mktemp("launch-vllm")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [
        *CLI,
        "launch-vllm",
        str(workload.model),
        "--spill-dir",
        str(root),
        "--",
        "--port",
        str(port),
        *SERVE_ARGS,
    ]
    with open(log, "wb") as out:
        # A session of its own: the server's engine core and workers stop with it (killpg below).
        process = subprocess.Popen(command, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not models_listed(url):
            assert process.poll() is None, f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the server did not come up in 300 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield {"url": url, "root": root, "log": log, "workload": workload}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(30)
        record_engine_starts("launch-vllm server (spill + stream)", log.read_text())


def test_spill_through_launch_vllm_at_dtype_defaults(server, hf_captures):
    workload, out = server["workload"], server["root"] / "hs"
    cmd = [
        *CLI,
        "produce",
        "--backend",
        "vllm",
        "--endpoint",
        server["url"],
        "--model",
        str(workload.model),
        "--data",
        str(workload.data),
        "--spill",
        str(out),
        "--validate",
    ]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"written                {NUM_ROWS}" in done.stdout
    assert f"validated              {NUM_ROWS} ok, 0 missing, 0 bad" in done.stdout
    assert list_hs_indices(out) == list(range(NUM_ROWS))
    data, ref = PreparedDataset(str(workload.data)), hf_captures("llama", "float32")
    for i in range(NUM_ROWS):
        token_ids, hidden_TLH = read_hs_file(hs_path(out, i), expected_token_ids=data.row(i)[0])
        assert hidden_TLH.dtype == torch.float32  # the checkpoint's dtype, not vLLM's auto (bf16 for fp32)
        assert float((hidden_TLH - ref[i]).norm() / ref[i].norm()) < 1e-4, f"row {i}"


def test_stream_through_launch_vllm_into_a_trainer_at_dtype_defaults(server, tmp_path):
    workload = server["workload"]
    save, endpoint = tmp_path / "save", f"ipc://{tmp_path}/stream"
    env = cli_env(OMP_NUM_THREADS="1")
    producer = subprocess.Popen(
        [
            *CLI,
            "produce",
            "--backend",
            "vllm",
            "--endpoint",
            server["url"],
            "--model",
            str(workload.model),
            "--data",
            str(workload.data),
            "--connect",
            endpoint,
            "--producer-id",
            "http-0",
            "--handshake-timeout",
            "120",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        trainer = subprocess.run(
            [
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
                "2",
                *TRAIN_ARGS,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out, _ = producer.communicate(timeout=60)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(30)
    assert trainer.returncode == 0, trainer.stderr[-3000:] + "\n--- producer ---\n" + (out or "")[-3000:]
    assert producer.returncode == 0, out[-3000:]
    assert "producer http-0 joined" in trainer.stderr
    assert f"streamed {2 * NUM_ROWS} samples" in out and "; 0 samples failed" in out
    assert_record_matches_plan(save, expected_record(str(workload.data), epochs=2, world=1))
