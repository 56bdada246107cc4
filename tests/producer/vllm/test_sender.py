"""The vLLM connector's machinery that needs no vLLM: request params, the hidden-state cache
gather, and the sender thread over real ZeroMQ sockets and real files."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import zmq
from hypothesis import given
from hypothesis import strategies as st

from producer.vllm.params import PARAMS_KEY, SampleRoute, loss_mask_spans, spans_to_loss_mask
from producer.vllm.sender import HostCopier, HostCopy, HSSender, SenderConfig, SendJob, gather_rows
from protocol.hsfile import hs_path, read_hs_file
from protocol.messages import Delivered, Sample
from protocol.sockets import SocketConfig, make_socket, recv_message

L, H = 3, 8


@given(st.lists(st.booleans(), max_size=200))
def test_loss_mask_spans_round_trip(bits):
    mask = torch.tensor(bits, dtype=torch.uint8)
    spans = loss_mask_spans(mask)
    assert all(0 <= s < e <= len(bits) for s, e in spans)
    assert torch.equal(spans_to_loss_mask(spans, len(bits)), mask)


def route(**kw) -> SampleRoute:
    fields = dict(
        sample_id=3,
        epoch=1,
        lease_id=4,
        destination="tcp://127.0.0.1:5601",
        num_tokens=10,
        loss_mask_spans=[[2, 5], [7, 10]],
    )
    fields.update(kw)
    return SampleRoute(**fields)


def test_route_survives_json_as_kv_transfer_params():
    original = route(report="ipc:///tmp/r.sock", ticket=9)
    params = json.loads(json.dumps(original.to_params()))
    assert SampleRoute.from_params(params) == original
    assert SampleRoute.from_params(None) is None
    assert SampleRoute.from_params({"do_remote_decode": True}) is None  # another connector's params


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"destination": "http://host:1"}, "destination must be"),
        ({"destination": "file://relative/dir"}, "absolute directory"),
        ({"sample_id": -1}, "non-negative int"),
        ({"epoch": True}, "non-negative int"),
        ({"loss_mask_spans": [[5, 3]]}, "loss_mask_spans"),
        ({"loss_mask_spans": [[0, 11]]}, "loss_mask_spans"),
        ({"loss_mask_spans": [[0, 5], [4, 6]]}, "loss_mask_spans"),
        ({"report": "file:///tmp"}, "report endpoint"),
        ({"colour": "red"}, "unknown fields"),
    ],
)
def test_malformed_params_are_refused(fields, message):
    params = route().to_params()
    params[PARAMS_KEY].update(fields)
    with pytest.raises(ValueError, match=message):
        SampleRoute.from_params(params)


def test_missing_field_is_refused():
    params = route().to_params()
    del params[PARAMS_KEY]["destination"]
    with pytest.raises(ValueError, match="destination"):
        SampleRoute.from_params(params)


def fill_cache(num_blocks: int, block_size: int, block_ids: list[int], hidden_TLH: torch.Tensor) -> torch.Tensor:
    """A cache [blocks, L, block size, H] with token t of the request in block block_ids[t // B] at
    offset t % B, written slot by slot (the way vLLM's cache-only layer scatters)."""
    cache_NLBH = torch.full((num_blocks, L, block_size, H), float("nan"))
    for t in range(hidden_TLH.shape[0]):
        cache_NLBH[block_ids[t // block_size], :, t % block_size] = hidden_TLH[t]
    return cache_NLBH


@pytest.mark.parametrize("num_tokens", [1, 4, 5, 11, 12])
def test_gather_rows_reads_a_requests_tokens_from_its_blocks_in_order(num_tokens):
    hidden_TLH = torch.randn(num_tokens, L, H)
    block_ids = [6, 1, 4, 9]  # scattered, and more than needed (vLLM allocates the output slot too)
    cache_NLBH = fill_cache(10, 4, block_ids, hidden_TLH)
    assert torch.equal(gather_rows(cache_NLBH, block_ids, num_tokens), hidden_TLH)
    copy = HostCopier().copy(cache_NLBH, block_ids, num_tokens)
    assert copy.done() and copy.event is None  # the CPU fallback: a plain copy, done on return
    assert torch.equal(copy.hidden_TLH, hidden_TLH)
    cache_NLBH.zero_()
    assert torch.equal(copy.hidden_TLH, hidden_TLH)  # a copy, not a view of the cache


def test_gather_rows_refuses_too_few_blocks():
    with pytest.raises(ValueError, match="need 3 blocks"):
        gather_rows(torch.zeros(4, L, 4, H), [0, 1], 9)


@pytest.fixture
def zmq_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def pull(ctx, endpoint):
    return make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=64), bind=endpoint)


def job(r: SampleRoute, seed: int = 0, copy: HostCopy | None = None) -> SendJob:
    hidden_TLH = torch.randn((r.num_tokens, L, H), generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return SendJob(route=r, token_ids=torch.arange(100, 100 + r.num_tokens), copy=copy or HostCopy(hidden_TLH))


def receive(sock, timeout_ms=10_000):
    assert sock.poll(timeout_ms), "nothing arrived"
    return recv_message(sock)[1]


def test_sender_pushes_a_sample_the_trainer_decodes_and_reports_done(zmq_ctx, tmp_path):
    data, reports = pull(zmq_ctx, f"ipc://{tmp_path}/data.sock"), pull(zmq_ctx, f"ipc://{tmp_path}/report.sock")
    sender = HSSender(SenderConfig(chunk_bytes=4096))
    r = route(
        destination=f"ipc://{tmp_path}/data.sock",
        num_tokens=300,
        loss_mask_spans=[[1, 299]],
        report=f"ipc://{tmp_path}/report.sock",
        ticket=12,
    )
    sent = job(r)
    sender.submit(sent)
    sample = receive(data)
    assert isinstance(sample, Sample)
    assert (sample.sample_id, sample.epoch, sample.lease_id) == (3, 1, 4)
    assert torch.equal(sample.token_ids, sent.token_ids)
    assert torch.equal(sample.loss_mask, r.loss_mask())
    assert torch.equal(sample.hidden_states, sent.copy.hidden_TLH)
    report = receive(reports)
    assert isinstance(report, Delivered) and (report.ticket, report.sample_id, report.ok, report.reason) == (
        12,
        3,
        True,
        "",
    )
    sender.close()
    sender.close()  # idempotent
    assert (sender.stats.sent, sender.stats.failed) == (1, 0)


def test_spill_writes_hs_files_only_under_the_allowed_directories(zmq_ctx, tmp_path):
    reports = pull(zmq_ctx, f"ipc://{tmp_path}/report.sock")
    sender = HSSender(SenderConfig(spill_dirs=[str(tmp_path / "allowed")], fsync=False))
    good = job(
        route(
            destination=f"file://{tmp_path}/allowed/run", sample_id=21, report=f"ipc://{tmp_path}/report.sock", ticket=1
        )
    )
    sender.submit(good)
    sender.submit(
        job(
            route(
                destination=f"file://{tmp_path}/allowed/../elsewhere", report=f"ipc://{tmp_path}/report.sock", ticket=2
            )
        )
    )
    nan = job(
        route(
            destination=f"file://{tmp_path}/allowed/run", sample_id=22, report=f"ipc://{tmp_path}/report.sock", ticket=3
        )
    )
    nan.copy.hidden_TLH[1, 0, 0] = float("nan")
    sender.submit(nan)
    outcomes = {}
    for _ in range(3):
        report = receive(reports)
        outcomes[report.ticket] = report
    assert isinstance(outcomes[1], Delivered) and outcomes[1].ok and outcomes[1].sample_id == 21
    assert isinstance(outcomes[2], Delivered) and not outcomes[2].ok and "spill_dirs" in outcomes[2].reason
    assert (
        isinstance(outcomes[3], Delivered)
        and not outcomes[3].ok
        and outcomes[3].sample_id == 22
        and "NaN or Inf" in outcomes[3].reason
    )
    token_ids, hidden_TLH = read_hs_file(hs_path(tmp_path / "allowed" / "run", 21), expected_token_ids=good.token_ids)
    assert torch.equal(hidden_TLH, good.copy.hidden_TLH)
    assert not (tmp_path / "elsewhere").exists() and not hs_path(tmp_path / "allowed" / "run", 22).exists()
    sender.close()


def test_a_trainer_that_takes_no_data_is_reported_failed_not_waited_for(zmq_ctx, tmp_path):
    reports = pull(zmq_ctx, f"ipc://{tmp_path}/report.sock")
    config = SenderConfig(send_timeout_seconds=0.2, data_socket=SocketConfig(sndhwm=1, rcvhwm=1))
    sender = HSSender(config)
    for i in range(3):  # nobody listens: one message fits the pipe, the next ones time out
        sender.submit(
            job(
                route(
                    destination=f"ipc://{tmp_path}/nobody.sock",
                    sample_id=i,
                    report=f"ipc://{tmp_path}/report.sock",
                    ticket=i,
                )
            )
        )
    failed = [r for r in (receive(reports) for _ in range(3)) if isinstance(r, Delivered) and not r.ok]
    assert failed and all("took no data" in r.reason for r in failed)
    sender.close(timeout=5)
    assert sender.stats.failed == len(failed)


class GatedEvent:
    """Stands in for a CUDA event: the copy is 'in flight' until the test opens the gate."""

    def __init__(self):
        self.gate = threading.Event()

    def query(self):
        return self.gate.is_set()

    def synchronize(self):
        self.gate.wait()


def test_queue_is_bounded_by_samples_and_bytes_but_never_blocks_the_caller(tmp_path):
    sender = HSSender(
        SenderConfig(max_pending_samples=2, max_pending_bytes=10_000, spill_dirs=[str(tmp_path)], fsync=False)
    )
    gate = GatedEvent()
    first = job(route(destination=f"file://{tmp_path}", sample_id=1, num_tokens=10, loss_mask_spans=[]))
    first = SendJob(route=first.route, token_ids=first.token_ids, copy=HostCopy(first.copy.hidden_TLH, gate))
    big = job(route(destination=f"file://{tmp_path}", sample_id=2, num_tokens=400, loss_mask_spans=[]))
    assert sender.has_room(big.nbytes)  # an empty queue takes even a sample above the byte bound
    sender.submit(first)
    assert not sender.has_room(big.nbytes)  # 10 tokens queued + 400 would pass 10 000 bytes
    small = job(route(destination=f"file://{tmp_path}", sample_id=3, num_tokens=10, loss_mask_spans=[]))
    assert sender.has_room(small.nbytes)
    sender.submit(small)
    assert not sender.has_room(small.nbytes)  # two samples pending
    assert not first.copy.done()
    gate.gate.set()
    sender.close()
    assert sender.num_pending == 0 and sender.stats.spilled == 2
    assert sender.has_room(big.nbytes)
