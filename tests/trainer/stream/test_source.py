"""One trainer rank's stream source fed by real producers (threads here, real sockets and the real
HF capture backend): plan order, handshake checks, the byte bound, garbage, lost producers."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import torch
import zmq

from producer.backend import CaptureRow
from producer.capture import CaptureConfig, HFCapture
from producer.stream_client import StreamClientConfig, StreamProducer
from protocol.codec import FramedTensor
from protocol.messages import Grant, Hello
from protocol.sockets import SocketConfig, make_socket, recv_message, send_message
from protocol.target import TargetSpec, sample_nbytes
from trainer.data.batch import pack
from trainer.stream.config import StreamConfig
from trainer.stream.source import StreamSampleSource

NUM_ROWS = 12


@pytest.fixture(scope="module")
def rows():
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i in range(NUM_ROWS):
        n = int(torch.randint(8, 40, (1,), generator=gen))
        ids = torch.randint(5, 700, (n,), generator=gen)
        out[i] = CaptureRow(sample_id=i, input_ids=ids, loss_mask=(torch.arange(n) % 2).to(torch.uint8))
    return out


@pytest.fixture(scope="module")
def backend(tiny_llama):
    return HFCapture(CaptureConfig(model=str(tiny_llama), device="cpu", max_batch_tokens=64))


def spec_of(backend, **override):
    info = backend.describe()
    fields = dict(
        target_model=info.target_model,
        layer_ids=list(info.layer_ids),
        hidden_size=info.hidden_size,
        dtype=info.dtype,
        vocab_size=info.vocab_size,
    )
    fields.update(override)
    return TargetSpec(**fields)


def make_source(tmp_path, backend, rows, **config):
    config.setdefault("lease_seconds", 5.0)
    source = StreamSampleSource(
        StreamConfig(endpoint=f"ipc://{tmp_path}/stream", **{"batch_tokens": 256, "buffer_bytes": 2 << 30, **config}),
        spec_of(backend),
        lengths=lambda sid: rows[sid].input_ids.shape[0],
        expected_row=lambda sid: (rows[sid].input_ids, rows[sid].loss_mask),
    )
    return source.start()


def start_producer(tmp_path, backend, rows, name="producer-0", **config):
    producer = StreamProducer(
        StreamClientConfig(
            producer_id=name,
            handshake_timeout_seconds=20,
            **{"max_batch_tokens": 64, "connect": [f"ipc://{tmp_path}/stream"], **config},
        ),
        backend,
        lambda sid: rows[sid],
    )
    thread = threading.Thread(target=producer.run, name=name, daemon=True)
    thread.start()
    return producer, thread


def reference(backend, rows, ids):
    return {s.sample_id: s for s in backend.capture([rows[i] for i in ids])}


def test_samples_arrive_in_plan_order_and_equal_a_direct_capture(tmp_path, backend, rows):
    source = make_source(tmp_path, backend, rows)
    producer, thread = start_producer(tmp_path, backend, rows)
    order = [7, 2, 9, 0, 11, 4, 1, 3, 10, 5, 8, 6]
    source.schedule(0, order)
    got = []
    for i in range(0, len(order), 3):
        result = source.fetch(order[i : i + 3])
        assert [s.sample_id for s in result.samples] == order[i : i + 3] and not result.skipped
        got += result.samples
    source.close()
    thread.join(20)
    assert not thread.is_alive() and producer.report.exit_code == 0
    expected = reference(backend, rows, order)
    for s in got:
        # The producer's first grant is one row (probation), so its batches differ from the direct
        # capture's: equal up to float rounding of padded vs unpadded matmuls.
        torch.testing.assert_close(s.hidden_states, expected[s.sample_id].hidden_states, rtol=1e-5, atol=1e-4)
        assert torch.equal(s.token_ids, rows[s.sample_id].input_ids)
        assert s.loss_mask.dtype == torch.bool and torch.equal(s.loss_mask, rows[s.sample_id].loss_mask.bool())
    assert producer.report.samples == NUM_ROWS and source.snapshot()["duplicates"] == 0


def test_samples_stay_in_their_frames_until_packed(tmp_path, backend, rows):
    """The stream source does not copy what it receives: hidden states sent in several frames
    arrive as FramedTensors over those frames, and pack() copies them into the batch exactly."""
    chunk = 16 << 10  # frames of at least ZeroMQ's 8 KiB receive batch get buffers of their own
    source = make_source(tmp_path, backend, rows)
    _, thread = start_producer(tmp_path, backend, rows, chunk_bytes=chunk)
    order = list(range(NUM_ROWS))
    source.schedule(0, order)
    got = source.fetch(order).samples
    source.close()
    thread.join(20)
    expected = reference(backend, rows, order)
    framed = [s for s in got if isinstance(s.hidden_states, FramedTensor)]
    assert len(framed) == sum(1 for s in got if s.hidden_states.nbytes > chunk) > 0
    for s in framed:
        assert len(s.hidden_states.parts) == -(-s.hidden_states.nbytes // chunk)
        torch.testing.assert_close(
            pack([s], 64).hidden_states[0, : s.token_ids.shape[0]], expected[s.sample_id].hidden_states, rtol=0, atol=0
        )


def test_a_row_granted_for_two_epochs_at_once_reaches_both(tmp_path, backend, rows):
    """Epoch e+1 is granted while epoch e is still in flight, so one producer batch can hold the
    same row twice, once per epoch: each copy must go out under its own epoch and lease."""
    source = make_source(tmp_path, backend, rows, samples_per_lease=4)
    ids = [0, 1, 2, 3]
    source.schedule(0, ids)
    source.schedule(1, ids[::-1])
    _, thread = start_producer(tmp_path, backend, rows, max_batch_tokens=4096)  # both leases in one batch
    got = source.fetch(ids).samples + source.fetch(ids[::-1]).samples
    stats = source.snapshot()
    source.close()
    thread.join(20)
    assert stats["leases_expired"] == 0 and stats["duplicates"] == 0, stats
    expected = reference(backend, rows, ids)
    assert all(torch.equal(s.hidden_states, expected[s.sample_id].hidden_states) for s in got)


def test_mismatched_handshake_is_refused_on_both_sides(tmp_path, backend, rows, caplog):
    info = backend.describe()
    source = StreamSampleSource(
        StreamConfig(endpoint=f"ipc://{tmp_path}/stream", batch_tokens=256, buffer_bytes=2 << 30),
        spec_of(backend, hidden_size=info.hidden_size * 2, layer_ids=[1, 2, 3, 4]),
        lengths=lambda sid: rows[sid].input_ids.shape[0],
    ).start()
    producer, thread = start_producer(tmp_path, backend, rows)
    thread.join(20)
    source.close()
    assert producer.report.exit_code == 2 and producer.report.samples == 0
    assert "hidden size" in caplog.text and "layer ids" in caplog.text


def test_buffered_bytes_never_exceed_the_budget_and_producers_wait(tmp_path, backend, rows):
    largest = max(
        sample_nbytes(r.input_ids.shape[0], 4, backend.describe().hidden_size, torch.float32) for r in rows.values()
    )
    budget = 2 * largest
    source = make_source(tmp_path, backend, rows, buffer_bytes=budget, samples_per_lease=1)
    _, thread = start_producer(tmp_path, backend, rows)
    order = list(range(NUM_ROWS))
    source.schedule(0, order)
    used = []
    for sid in order:
        time.sleep(0.05)  # a slow trainer
        used.append(source.buffer.ledger.used_bytes)
        assert [s.sample_id for s in source.fetch([sid]).samples] == [sid]
    source.close()
    thread.join(20)
    assert max(used) <= budget and source.buffer.peak_bytes <= budget
    assert max(used) > 0  # producers ran ahead as far as the budget allowed


def test_garbage_and_strangers_do_not_disturb_the_stream(tmp_path, backend, rows):
    source = make_source(tmp_path, backend, rows)
    ctx = zmq.Context()
    data = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=source.data_endpoint)
    control = make_socket(ctx, zmq.DEALER, SocketConfig(), connect=source.control_endpoint, identity=b"stranger")
    for frames in ([b"\x04", b"\xc1"], [b"junk"], [b"\x04", b"\x80", b"x" * 100]):
        data.send_multipart(frames)
        control.send_multipart(frames)
    assert control.poll(5000)  # the header without a version reads as a version mismatch: refused
    version_refusal = recv_message(control)[1]
    assert not version_refusal.accepted and "protocol version" in version_refusal.reason
    grant = Grant(lease_id=1, epoch=0, sample_ids=[1], deadline_s=1.0)
    send_message(control, grant)  # not a hello: the trainer says "unknown producer"
    assert control.poll(5000)
    assert recv_message(control)[1].code == "unknown_producer"
    wrong = Hello(
        producer_id="x", target_model="other-model", layer_ids=[1], hidden_size=3, dtype="float32", vocab_size=5
    )
    send_message(control, wrong)
    assert control.poll(5000)
    refusal = recv_message(control)[1]
    # Without CURVE the stranger learns what differs, not the trainer's settings.
    assert not refusal.accepted and "target model" in refusal.reason and "fake" not in refusal.reason
    _, thread = start_producer(tmp_path, backend, rows)
    source.schedule(0, list(range(4)))
    assert [s.sample_id for s in source.fetch([0, 1, 2, 3]).samples] == [0, 1, 2, 3]
    source.close()
    thread.join(20)
    assert source.snapshot()["bad_messages"] >= 6
    ctx.destroy(linger=0)


def test_work_of_a_producer_that_vanishes_is_granted_to_another(tmp_path, backend, rows):
    source = make_source(tmp_path, backend, rows, lease_seconds=1.0, samples_per_lease=2, heartbeat_seconds=0.5)
    ctx = zmq.Context()
    # A producer that says hello, takes grants and never delivers.
    zombie = make_socket(ctx, zmq.DEALER, SocketConfig(), connect=source.control_endpoint, identity=b"zombie")
    info = backend.describe()
    send_message(
        zombie,
        Hello(
            producer_id="zombie",
            target_model=info.target_model,
            layer_ids=list(info.layer_ids),
            hidden_size=info.hidden_size,
            dtype=info.dtype,
            vocab_size=info.vocab_size,
        ),
    )
    source.schedule(0, list(range(NUM_ROWS)))
    grants = []
    deadline = time.monotonic() + 5
    while len(grants) < 1 and time.monotonic() < deadline:
        if zombie.poll(200):
            message = recv_message(zombie)[1]
            if isinstance(message, Grant):
                grants.append(message)
    # On probation until it delivers: one sample, with a secret token its sample must carry.
    assert [g.sample_ids for g in grants] == [[0]] and len(grants[0].token) == 32
    _, thread = start_producer(tmp_path, backend, rows, name="healthy", heartbeat_seconds=0.3)
    samples = source.fetch(list(range(NUM_ROWS))).samples
    assert [s.sample_id for s in samples] == list(range(NUM_ROWS))
    assert source.snapshot()["leases_expired"] >= 1
    source.close()
    thread.join(20)
    ctx.destroy(linger=0)


def test_a_reuse_window_the_buffer_cannot_hold_is_refused_up_front(tmp_path, backend, rows):
    largest = max(
        sample_nbytes(r.input_ids.shape[0], 4, backend.describe().hidden_size, torch.float32) for r in rows.values()
    )
    source = make_source(tmp_path, backend, rows, buffer_bytes=3 * largest)
    try:
        source.schedule(0, [0, 1, 0, 1])  # two samples live at once: fits
        with pytest.raises(ValueError, match="--buffer-bytes"):
            source.schedule(1, [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])  # six live at once
    finally:
        source.close()


def test_an_abandoned_epoch_skips_to_its_validation_and_frees_the_rest(tmp_path, backend, rows):
    """--time-budget ends an epoch mid-way: its remaining training fetches never come, validation does."""
    largest = max(
        sample_nbytes(r.input_ids.shape[0], 4, backend.describe().hidden_size, torch.float32) for r in rows.values()
    )
    # Room for 4 samples: the abandoned ones must give theirs back, or validation waits forever.
    source = make_source(tmp_path, backend, rows, buffer_bytes=4 * largest, samples_per_lease=2)
    _, thread = start_producer(tmp_path, backend, rows)
    train, val = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1], [8, 9, 10, 11]
    source.schedule(0, train + val)
    assert [s.sample_id for s in source.fetch([0, 1]).samples] == [0, 1]
    time.sleep(1.0)  # producers fill the buffer with training samples that will never be fetched
    source.abandon(0)
    assert [s.sample_id for s in source.fetch(val).samples] == val
    with pytest.raises(RuntimeError, match="only 0 are scheduled"):
        source.fetch([2])
    source.close()
    thread.join(20)


def two_rank_trainer(tmp_path, backend, rows, bases):
    """Ranks 0 and 1 of one trainer, each binding under its own base (two hosts, as torchrun
    --nnodes 2 gives), each listing both ranks' control endpoints as the process group gathers them."""
    configs = [
        StreamConfig(endpoint=f"ipc://{tmp_path}/{base}", rank=r, batch_tokens=256, buffer_bytes=2 << 30)
        for r, base in enumerate(bases)
    ]
    controls = [c.advertised_endpoints()[0] for c in configs]
    return [
        StreamSampleSource(
            dataclasses.replace(c, trainer_endpoints=controls),
            spec_of(backend),
            lengths=lambda sid: rows[sid].input_ids.shape[0],
            expected_row=lambda sid: (rows[sid].input_ids, rows[sid].loss_mask),
        ).start()
        for c in configs
    ]


def crash(source):
    """Close a rank's sockets without telling producers, as a killed trainer does."""
    source._io._broadcast = lambda control, message: None
    source.close()


def test_a_producer_given_rank_0_finds_the_other_ranks_and_finds_them_again_after_a_restart(
    tmp_path, backend, rows, caplog
):
    caplog.set_level(logging.INFO, logger="producer")
    ranks = two_rank_trainer(tmp_path, backend, rows, ["host-a", "host-b"])
    producer, thread = start_producer(tmp_path, backend, rows, connect=[f"ipc://{tmp_path}/host-a"])
    for r, source in enumerate(ranks):
        source.schedule(0, [r, r + 2])
    for r, source in enumerate(ranks):
        assert [s.sample_id for s in source.fetch([r, r + 2]).samples] == [r, r + 2]
    for source in ranks:
        crash(source)
    # The trainer comes back: rank 0 at the same address, rank 1 on another host.
    ranks = two_rank_trainer(tmp_path, backend, rows, ["host-a", "host-c"])
    for r, source in enumerate(ranks):
        source.schedule(0, [r + 4])
    for r, source in enumerate(ranks):
        assert [s.sample_id for s in source.fetch([r + 4]).samples] == [r + 4]
    for source in ranks:
        source.close()
    thread.join(20)
    assert not thread.is_alive() and producer.report.exit_code == 0 and producer.report.samples == 6
    assert f"greeting rank 1 at ipc://{tmp_path}/host-b/rank1-control.sock" in caplog.text
    assert f"no longer at ipc://{tmp_path}/host-b/rank1-control.sock" in caplog.text
    assert f"greeting rank 1 at ipc://{tmp_path}/host-c/rank1-control.sock" in caplog.text


def test_a_trainer_with_other_than_num_ranks_ranks_is_not_served(tmp_path, backend, rows, caplog):
    ranks = two_rank_trainer(tmp_path, backend, rows, ["host-a", "host-b"])
    producer, thread = start_producer(tmp_path, backend, rows, connect=[f"ipc://{tmp_path}/host-a"], num_ranks=4)
    thread.join(20)
    for source in ranks:
        source.close()
    assert not thread.is_alive() and producer.report.exit_code == 2 and producer.report.samples == 0
    assert "the trainer has 2 ranks but --num-ranks is 4" in caplog.text


@pytest.mark.parametrize("aligned", [True, False])
def test_one_producer_feeds_two_jobs_capturing_shared_rows_once(tmp_path, backend, rows, aligned):
    """Two trainer jobs (one rank each) served by one producer. Aligned plans: every row is captured
    about once for both. Different plans and a window of 3 samples: sharing shrinks, but each job
    still gets exactly its planned samples, equal to a direct capture, and the window stays in budget."""
    jobs = [make_source(tmp_path / name, backend, rows, samples_per_lease=2) for name in ("a", "b")]
    orders = [list(range(NUM_ROWS)), list(range(NUM_ROWS)) if aligned else list(reversed(range(NUM_ROWS)))]
    window = (
        (1 << 30)
        if aligned
        else 3
        * max(
            sample_nbytes(r.input_ids.shape[0], 4, backend.describe().hidden_size, torch.float32) for r in rows.values()
        )
    )
    producer, thread = start_producer(
        tmp_path,
        backend,
        rows,
        connect=[f"ipc://{tmp_path}/{name}/stream" for name in ("a", "b")],
        share_window_bytes=window,
    )
    for source, order in zip(jobs, orders):
        source.schedule(0, order)
    got = [[], []]
    for i in range(0, NUM_ROWS, 2):  # the jobs step in turn, as two trainers on one host would
        for j, (source, order) in enumerate(zip(jobs, orders)):
            got[j] += source.fetch(order[i : i + 2]).samples
    for source in jobs:
        source.close()
    thread.join(20)
    assert not thread.is_alive() and producer.report.exit_code == 0
    expected = reference(backend, rows, list(range(NUM_ROWS)))
    for samples, order in zip(got, orders):
        assert [s.sample_id for s in samples] == order
        for s in samples:
            torch.testing.assert_close(s.hidden_states, expected[s.sample_id].hidden_states, rtol=1e-5, atol=1e-4)
    report, stats = producer.report, producer.window.stats
    assert report.samples == 2 * NUM_ROWS
    assert stats.peak_bytes <= window
    if aligned:
        assert report.forwards <= 0.55 * report.samples, (report, stats)
    else:
        assert report.forwards < report.samples and stats.hits > 0, (report, stats)
