"""``produce --backend vllm`` against a stand-in server (tests/producer/vllm/fake_vllm.py): the producer's
side of the vLLM path without vLLM. The request body, prompt-id checks, spill waiting on delivery
reports, and streaming with grants from a real trainer-side stream source and failed deliveries
granted again. vLLM's own classes are exercised in tests/vllm (make test-vllm)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from producer.backend import CaptureRow
from producer.produce import main as produce_main
from producer.stream_client import StreamClientConfig, StreamProducer
from producer.vllm.backend import VLLMBackend, VLLMBackendConfig
from protocol.hsfile import hs_path, list_hs_indices, read_hs_file
from protocol.target import TargetSpec
from tests.producer.vllm.fake_vllm import FakeVLLMServer, fake_hidden
from trainer.stream.config import StreamConfig
from trainer.stream.source import StreamSampleSource

LAYER_IDS, HIDDEN = [2, 4, 5, 8], 64  # the tiny Llama's default capture


@pytest.fixture
def server(tmp_path):
    fake = FakeVLLMServer(layer_ids=LAYER_IDS, hidden_size=HIDDEN, dtype="float32", spill_dirs=[tmp_path])
    yield fake
    fake.close()


def spill_args(tiny_llama, prepared_llama, out, server, *extra):
    return [
        "--model",
        str(tiny_llama),
        "--data",
        str(prepared_llama),
        "--spill",
        str(out),
        "--backend",
        "vllm",
        "--endpoint",
        server.url,
        "--max-samples",
        "12",
        "--concurrency",
        "4",
        "--max-batch-tokens",
        "512",
        *extra,
    ]


def test_spill_through_a_vllm_server_writes_files_that_validate_and_resumes(
    tmp_path, server, tiny_llama, prepared_llama, capsys
):
    import datasets

    out = tmp_path / "hs"
    assert produce_main(spill_args(tiny_llama, prepared_llama, out, server, "--validate")) == 0
    report = capsys.readouterr().out
    assert "written                12" in report and "validated              12 ok, 0 missing, 0 bad" in report
    assert list_hs_indices(out) == list(range(12))
    dataset = datasets.load_from_disk(str(prepared_llama))
    for i in (0, 11):
        ids = list(dataset[i]["input_ids"])
        token_ids, hidden_TLH = read_hs_file(hs_path(out, i), expected_token_ids=torch.tensor(ids))
        assert torch.equal(hidden_TLH, fake_hidden(ids, len(LAYER_IDS), HIDDEN, torch.float32))

    assert produce_main(spill_args(tiny_llama, prepared_llama, out, server)) == 0  # resumable: nothing left to do
    assert "already on disk        12" in capsys.readouterr().out
    assert sum(server.requests.values()) == 12
    assert server.probes == 1  # --dtype auto: one dtype probe (the resumed run had nothing to send)


# ---- the dtype: --dtype auto announces what the server captures --------------------------------


def test_dtype_auto_announces_the_dtype_the_server_captures_not_the_checkpoints(
    tmp_path, tiny_llama, prepared_llama, capsys
):
    # A server whose vLLM runs the fp32 checkpoint in bf16 (vllm serve --dtype auto does that).
    server = FakeVLLMServer(layer_ids=LAYER_IDS, hidden_size=HIDDEN, dtype="bfloat16", spill_dirs=[tmp_path])
    try:
        backend = VLLMBackend(VLLMBackendConfig(model=str(tiny_llama), endpoint=server.url))
        try:
            assert backend.describe().dtype == "bfloat16"
            assert backend.num_unreported == 0  # the probe is no sample of ours
        finally:
            backend.close()
        assert server.probes == 1 and not server.requests

        out = tmp_path / "hs"
        assert produce_main(spill_args(tiny_llama, prepared_llama, out, server, "--validate")) == 0
        assert "validated              12 ok, 0 missing, 0 bad" in capsys.readouterr().out
        _, hidden_TLH = read_hs_file(hs_path(out, 0))
        assert hidden_TLH.dtype == torch.bfloat16

        # An explicit --dtype is announced as given, and the server's answers are checked against it.
        assert (
            produce_main(spill_args(tiny_llama, prepared_llama, tmp_path / "hs32", server, "--dtype", "float32")) == 1
        )
        assert "vLLM captures dtype 'bfloat16', this producer announced 'float32'" in capsys.readouterr().err
        assert server.probes == 2  # none for the explicit --dtype
    finally:
        server.close()


def test_a_server_without_our_connector_leaves_the_checkpoints_dtype(tiny_llama, server):
    server.no_connector = True
    backend = VLLMBackend(VLLMBackendConfig(model=str(tiny_llama), endpoint=server.url))
    try:
        assert backend.describe().dtype == "float32"  # and every row is then refused, as tested above
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("switch", "message"),
    [
        ("alter_prompt", "vLLM ran other prompt token ids than the row's"),
        ("no_connector", "is the server running DraftstreamConnector (draftstream launch-vllm)?"),
        ("layers", "vLLM captures layer_ids [1, 8], this producer announced [2, 4, 5, 8]"),
    ],
)
def test_answers_that_do_not_fit_the_row_or_the_capture_are_errors(
    tmp_path, server, tiny_llama, prepared_llama, capsys, switch, message
):
    if switch == "layers":
        server.layer_ids = [1, 8]
    else:
        setattr(server, switch, True)
    assert produce_main(spill_args(tiny_llama, prepared_llama, tmp_path / "hs", server)) == 1
    assert message in capsys.readouterr().err
    assert list_hs_indices(tmp_path / "hs") == []  # what the server wrote for refused rows is removed


def test_an_unreachable_server_is_named(tmp_path, tiny_llama, prepared_llama, capsys):
    argv = [
        "--model",
        str(tiny_llama),
        "--data",
        str(prepared_llama),
        "--spill",
        str(tmp_path),
        "--backend",
        "vllm",
        "--endpoint",
        "http://127.0.0.1:9",
    ]
    assert produce_main(argv) == 1
    assert "is the server up (draftstream launch-vllm)?" in capsys.readouterr().err


def test_submit_returns_at_once_and_the_server_runs_concurrency_requests_together(tmp_path, server, tiny_llama, rows):
    from producer.backend import PushingBackend, PushJob

    server.delay_seconds = 0.2
    backend = VLLMBackend(VLLMBackendConfig(model=str(tiny_llama), endpoint=server.url, concurrency=4))
    try:
        assert isinstance(backend, PushingBackend) and backend.min_in_flight_rows == 4
        destination = "file://" + str(tmp_path)
        start = time.monotonic()
        tickets = backend.submit([PushJob(row=rows[i], destination=destination) for i in range(8)])
        assert time.monotonic() - start < 0.15 and backend.num_in_flight == 8  # not waiting for the server
        results = []
        while len(results) < 8:
            results += backend.poll_results(timeout_seconds=5)
        assert sorted(r.ticket for r in results) == sorted(tickets) and not any(r.error for r in results)
        assert server.max_concurrent == 4 and backend.num_in_flight == 0
        reports = []
        while backend.num_unreported:
            reports += backend.poll_reports(timeout_seconds=5)
        assert sorted(r.sample_id for r in reports) == list(range(8)) and all(r.ok for r in reports)
    finally:
        backend.close()


# ---- streaming: grants from a trainer rank, samples pushed by the server's connector ------------


@pytest.fixture(scope="module")
def rows():
    gen = torch.Generator().manual_seed(1)
    out = {}
    for i in range(10):
        n = int(torch.randint(8, 40, (1,), generator=gen))
        out[i] = CaptureRow(i, torch.randint(5, 700, (n,), generator=gen), (torch.arange(n) % 3 == 0).to(torch.uint8))
    return out


def test_streaming_through_vllm_delivers_every_granted_sample_and_failed_ones_come_again(
    tmp_path, server, tiny_llama, rows
):
    backend = VLLMBackend(VLLMBackendConfig(model=str(tiny_llama), endpoint=server.url, concurrency=4))
    info = backend.describe()
    assert (info.layer_ids, info.hidden_size, info.dtype) == (LAYER_IDS, HIDDEN, "float32")
    source = StreamSampleSource(
        StreamConfig(
            endpoint=f"ipc://{tmp_path}/stream",
            batch_tokens=256,
            buffer_bytes=2 << 30,
            lease_seconds=30.0,
            stall_timeout_seconds=60.0,
        ),
        TargetSpec(
            target_model=info.target_model,
            layer_ids=info.layer_ids,
            hidden_size=info.hidden_size,
            dtype=info.dtype,
            vocab_size=info.vocab_size,
        ),
        lengths=lambda sid: rows[sid].input_ids.shape[0],
        expected_row=lambda sid: (rows[sid].input_ids, rows[sid].loss_mask),
    ).start()
    server.fail_once = {3, 6}
    stop = threading.Event()
    producer = StreamProducer(
        StreamClientConfig(
            producer_id="vllm-producer",
            connect=[f"ipc://{tmp_path}/stream"],
            max_batch_tokens=64,
            handshake_timeout_seconds=20,
        ),
        backend,
        lambda sid: rows[sid],
        stop=stop,
    )
    thread = threading.Thread(target=producer.run, name="vllm-producer", daemon=True)
    thread.start()
    try:
        order = [4, 3, 9, 0, 6, 1, 8, 2, 7, 5]
        source.schedule(0, order)
        got = []
        for i in range(0, len(order), 5):
            got += source.fetch(order[i : i + 5]).samples
        assert [s.sample_id for s in got] == order
        for sample in got:
            row = rows[sample.sample_id]
            assert torch.equal(sample.token_ids, row.input_ids)
            assert torch.equal(sample.loss_mask, row.loss_mask.to(torch.bool))
            assert torch.equal(
                sample.hidden_states, fake_hidden(row.input_ids.tolist(), len(LAYER_IDS), HIDDEN, torch.float32)
            )
        # The failed first deliveries went back as LeaseFailed and were granted again (not left to expire).
        assert server.requests[3] == 2 and server.requests[6] == 2
        assert producer.report.failed_samples == 2
    finally:
        source.close()
        thread.join(15)
        stop.set()
        backend.close()
    assert not thread.is_alive()
