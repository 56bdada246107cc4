"""``draftstream produce --spill``: rank split, resume after a kill, validation, NaN/Inf policy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from producer.backend import CaptureRow
from producer.produce import main
from producer.run_config import ProduceConfig
from producer.spill_run import produce, run_producer, select_indices
from protocol.hsfile import HiddenStateFileError, hs_path, list_hs_indices, read_hs_file
from protocol.messages import Sample


def _config(model, data, spill, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("max_batch_tokens", 1024)
    return ProduceConfig(model=str(model), data=str(data), spill=str(spill), **kwargs)


def _inodes(directory):
    return {p.name: p.stat().st_ino for p in Path(directory).glob("hs_*.safetensors")}


def test_ranks_split_rows_and_leave_each_others_temporaries_alone(tiny_llama, prepared_llama, tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "hs_1.safetensors.tmp4242").write_bytes(b"rank 1 is writing this")
    (spill / "hs_2.safetensors.tmp4243").write_bytes(b"left by a killed rank 0")

    first = produce(_config(tiny_llama, prepared_llama, spill, max_samples=10, world_size=2, rank=0))
    assert first.num_partial_removed == 1 and (spill / "hs_1.safetensors.tmp4242").exists()
    assert list_hs_indices(spill) == [0, 2, 4, 6, 8] and first.num_written == 5
    second = produce(_config(tiny_llama, prepared_llama, spill, max_samples=10, world_size=2, rank=1))
    assert second.num_written == 5 and list_hs_indices(spill) == list(range(10))

    check = produce(_config(tiny_llama, prepared_llama, spill, max_samples=10, validate=True))
    assert check.num_already_done == 10 and check.num_captured == 0
    assert check.validation.passed and check.validation.num_ok == 10
    rows = datasets.load_from_disk(str(prepared_llama))
    token_ids, hidden_TLH = read_hs_file(hs_path(spill, 7))
    assert torch.equal(token_ids, rows[7]["input_ids"]) and hidden_TLH.shape == (token_ids.shape[0], 4, 64)


def test_rerun_skips_complete_files_and_captures_only_missing_ones(tiny_llama, prepared_llama, tmp_path):
    spill = tmp_path / "spill"
    produce(_config(tiny_llama, prepared_llama, spill, max_samples=8))
    hs_path(spill, 3).unlink()
    hs_path(spill, 6).unlink()
    before = _inodes(spill)

    report = produce(_config(tiny_llama, prepared_llama, spill, max_samples=8, validate=True))

    assert (report.num_already_done, report.num_captured, report.num_written) == (6, 2, 2)
    after = _inodes(spill)
    assert {name: after[name] for name in before} == before  # complete files were not rewritten
    assert report.validation.passed and report.validation.num_ok == 8


def test_validate_reports_truncated_and_mismatched_files(tiny_llama, prepared_llama, tmp_path, capsys):
    spill = tmp_path / "spill"
    produce(_config(tiny_llama, prepared_llama, spill, max_samples=6))
    data = hs_path(spill, 2).read_bytes()
    hs_path(spill, 2).write_bytes(data[: len(data) // 2])
    shutil.copy(hs_path(spill, 5), hs_path(spill, 4))

    argv = ["--model", str(tiny_llama), "--data", str(prepared_llama), "--spill", str(spill), "--device", "cpu"]
    code = main([*argv, "--max-samples", "6", "--validate"])

    out = capsys.readouterr().out
    assert code == 1
    assert "4 ok, 0 missing, 2 bad" in out and "hs_2:" in out and "hs_4:" in out and "differ" in out


def test_truncated_files_are_never_accepted(tiny_llama, prepared_llama, tmp_path):
    spill = tmp_path / "spill"
    produce(_config(tiny_llama, prepared_llama, spill, max_samples=1))
    data = hs_path(spill, 0).read_bytes()
    read_hs_file(hs_path(spill, 0))
    for cut in (0, 7, 8, 100, len(data) // 2, len(data) - 1):
        hs_path(tmp_path, cut).write_bytes(data[:cut])
        with pytest.raises(HiddenStateFileError):
            read_hs_file(hs_path(tmp_path, cut))


@pytest.fixture
def poisoned_llama(tiny_llama, prepared_llama, tmp_path):
    """The tiny Llama with one token's embedding set to inf, and the rows (of the first 12) containing it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = datasets.load_from_disk(str(prepared_llama))
    token = int(rows[3]["input_ids"][-5])
    poisoned_rows = [i for i in range(12) if token in rows[i]["input_ids"].tolist()]
    assert 0 < len(poisoned_rows) < 12
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    out = tmp_path / "poisoned"
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(str(out))
    return out, poisoned_rows


def test_nonfinite_capture_stops_produce_naming_the_row(poisoned_llama, prepared_llama, tmp_path, capsys):
    model, poisoned_rows = poisoned_llama
    argv = ["--model", str(model), "--data", str(prepared_llama), "--spill", str(tmp_path / "spill"), "--device", "cpu"]
    assert main([*argv, "--max-samples", "12", "--max-batch-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert f"row {poisoned_rows[0]}: hidden states contain NaN or Inf" in err and "--skip-nonfinite" in err
    assert poisoned_rows[0] not in list_hs_indices(tmp_path / "spill")


def test_skip_nonfinite_counts_skipped_rows_and_validation_still_passes(poisoned_llama, prepared_llama, tmp_path):
    model, poisoned_rows = poisoned_llama
    report = produce(
        _config(model, prepared_llama, tmp_path / "spill", max_samples=12, skip_nonfinite=True, validate=True)
    )
    assert report.num_skipped_nonfinite == len(poisoned_rows) and report.num_written == 12 - len(poisoned_rows)
    assert sorted(set(range(12)) - set(list_hs_indices(tmp_path / "spill"))) == poisoned_rows
    assert report.validation.passed


def test_producer_loop_feeds_any_sink_and_stops_when_asked():
    class Echo:
        def describe(self):
            raise AssertionError("the loop does not need it")

        def capture(self, rows, *, epoch=0, lease_id=0):
            for row in rows:
                yield Sample(
                    sample_id=row.sample_id,
                    epoch=epoch,
                    lease_id=lease_id,
                    token_ids=row.input_ids,
                    loss_mask=row.loss_mask.to(torch.uint8),
                    hidden_states=torch.zeros(row.input_ids.shape[0], 1, 2),
                )

        def close(self):
            pass

    class ListSink:
        def __init__(self):
            self.samples = []

        def put(self, sample):
            self.samples.append(sample)
            if len(self.samples) == 3:
                stop.set()

        def close(self):
            pass

    import threading

    stop = threading.Event()
    sink = ListSink()
    rows = [CaptureRow(i, torch.arange(i + 1), torch.ones(i + 1, dtype=torch.long)) for i in range(6)]
    assert run_producer(Echo(), rows, sink, epoch=2, lease_id=5, stop=stop) == (3, 6)
    assert [(s.sample_id, s.epoch, s.lease_id) for s in sink.samples] == [(0, 2, 5), (1, 2, 5), (2, 2, 5)]


def test_vllm_flags_need_the_vllm_backend(capsys):
    ProduceConfig(model="m", data="d", spill="s", backend="vllm", endpoint="http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="--endpoint apply to --backend vllm only"):
        ProduceConfig(model="m", data="d", spill="s", endpoint="http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="--device applies to --backend hf"):
        ProduceConfig(model="m", data="d", spill="s", backend="vllm", device="cuda:1")
    assert main(["--model", "m", "--data", "d", "--spill", "s", "--report-endpoint", "ipc:///tmp/r"]) == 1
    assert "apply to --backend vllm only" in capsys.readouterr().err


def test_rank_selection_and_flag_errors():
    assert list(select_indices(10, max_samples=None, world_size=3, rank=1)) == [1, 4, 7]
    assert list(select_indices(10, max_samples=5, world_size=2, rank=0)) == [0, 2, 4]
    with pytest.raises(ValueError, match="--rank"):
        ProduceConfig(model="m", data="d", spill="s", world_size=2, rank=2)
    with pytest.raises(ValueError, match="--max-samples"):
        ProduceConfig(model="m", data="d", spill="s", max_samples=0)


@pytest.fixture(scope="module")
def prepared_long(tmp_path_factory, tiny_llama):
    """160 rows: enough files that a kill lands mid-run."""
    from producer.prepare import PrepareConfig, prepare_dataset
    from producer.tiny_target import write_conversations

    root = tmp_path_factory.mktemp("long")
    source = write_conversations(root / "c.jsonl", 160, seed=21)
    prepare_dataset(
        PrepareConfig(model=str(tiny_llama), data=[str(source)], output=str(root / "prepared"), num_workers=1)
    )
    return root / "prepared"


def _draftstream() -> list[str]:
    script = Path(sys.executable).parent / "draftstream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "protocol.cli"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_produce_killed_mid_run_resumes_and_every_file_validates(tiny_llama, prepared_long, tmp_path):
    spill = tmp_path / "spill"
    command = [
        *_draftstream(),
        "produce",
        "--model",
        str(tiny_llama),
        "--data",
        str(prepared_long),
        "--spill",
        str(spill),
        "--device",
        "cpu",
        "--max-batch-tokens",
        "256",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (spill.is_dir() and len(list_hs_indices(spill)) >= 10):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "producer wrote nothing within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()

    survivors = list_hs_indices(spill)
    assert 10 <= len(survivors) < 160, "the kill must land mid-run"
    rows = datasets.load_from_disk(str(prepared_long))
    for i in survivors:  # whatever carries a final name is complete
        read_hs_file(hs_path(spill, i), expected_token_ids=rows[i]["input_ids"])
    before = _inodes(spill)

    done = subprocess.run([*command, "--validate"], env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"already on disk        {len(survivors)}" in done.stdout
    assert "validated              160 ok, 0 missing, 0 bad" in done.stdout
    assert list_hs_indices(spill) == list(range(160)) and not list(spill.glob("*.tmp*"))
    after = _inodes(spill)
    assert {name: after[name] for name in before} == before
