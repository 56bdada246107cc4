"""Codec round trips: every message kind, edge-case tensors, and exact frame counts."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from protocol.codec import DEFAULT_CHUNK_BYTES, decode, encode
from protocol.messages import (
    EndOfStream,
    Error,
    Grant,
    Heartbeat,
    Hello,
    LeaseDone,
    LeaseFailed,
    Sample,
    Welcome,
)
from tests.protocol.probe import Probe, probe_kind  # noqa: F401  (fixture)


def make_sample(num_tokens=16, num_layers=4, hidden=32, dtype=torch.bfloat16, sample_id=7):
    return Sample(
        sample_id=sample_id,
        epoch=2,
        lease_id=11,
        token_ids=torch.arange(num_tokens, dtype=torch.int64),
        loss_mask=(torch.arange(num_tokens) % 2).to(torch.uint8),
        hidden_states=torch.randn(num_tokens, num_layers, hidden, generator=torch.Generator().manual_seed(sample_id)).to(dtype),
    )


CONTROL_MESSAGES = [
    Hello(producer_id="producer-0", target_model="tiny", layer_ids=[2, 4, 7, 10], hidden_size=64, dtype="bfloat16", vocab_size=1000),
    Welcome(accepted=False, reason="layer ids differ", trainer_rank=1, data_endpoint="ipc:///tmp/x"),
    Grant(lease_id=3, epoch=1, sample_ids=[5, 9, 2], deadline_s=30.0),
    LeaseDone(lease_id=3, num_samples=3),
    LeaseFailed(lease_id=3, sample_ids=[9], reason="OOM"),
    Heartbeat(sender="producer-0", time_s=12.5, stats={"samples_per_s": 3.0, "gbps": 1}),
    EndOfStream(reason="done"),
    Error(code="bad_frame", message="truncated"),
]


@pytest.mark.parametrize("message", CONTROL_MESSAGES, ids=lambda m: type(m).__name__)
def test_control_messages_round_trip_in_two_frames(message):
    frames = encode(message)
    assert len(frames) == 2
    assert decode(frames) == message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sample_round_trips_bit_exact(dtype):
    sample = make_sample(dtype=dtype)
    decoded = decode(encode(sample))
    assert decoded == sample
    assert decoded.hidden_states.dtype == dtype


def test_large_tensor_is_split_into_chunks_of_the_configured_size():
    sample = make_sample(num_tokens=300, num_layers=4, hidden=64, dtype=torch.float32)  # 307200 hidden bytes
    chunk = 64 << 10
    frames = encode(sample, chunk_bytes=chunk)
    hidden_frames = math.ceil(sample.hidden_states.numel() * 4 / chunk)
    assert len(frames) == 2 + 1 + 1 + hidden_frames  # kind, header, token_ids, loss_mask, hidden
    assert [f.nbytes for f in frames[4:-1]] == [chunk] * (hidden_frames - 1)
    assert decode(frames) == sample


def test_empty_sample_round_trips_with_no_data_frames():
    sample = make_sample(num_tokens=0)
    frames = encode(sample)
    assert len(frames) == 2
    decoded = decode(frames)
    assert decoded == sample and decoded.hidden_states.shape == (0, 4, 32)


def test_non_contiguous_tensors_round_trip_as_their_values():
    hidden = torch.randn(4, 32, 10).to(torch.bfloat16).permute(2, 0, 1)  # [10, 4, 32], non-contiguous
    assert not hidden.is_contiguous()
    sample = Sample(sample_id=1, epoch=0, lease_id=0, token_ids=torch.arange(20)[::2], loss_mask=torch.ones(10, dtype=torch.bool), hidden_states=hidden)
    decoded = decode(encode(sample))
    assert torch.equal(decoded.hidden_states, hidden) and decoded.hidden_states.is_contiguous()
    assert torch.equal(decoded.token_ids, torch.arange(0, 20, 2))


def test_inf_and_nan_values_travel_unchanged():
    sample = make_sample(num_tokens=4, dtype=torch.float32)
    sample.hidden_states[0, 0, 0] = float("inf")
    sample.hidden_states[1, 0, 0] = float("-inf")
    sample.hidden_states[2, 0, 0] = float("nan")
    decoded = decode(encode(sample))
    assert decoded.hidden_states[0, 0, 0] == float("inf") and decoded.hidden_states[1, 0, 0] == float("-inf")
    assert torch.isnan(decoded.hidden_states[2, 0, 0])
    assert torch.equal(decoded.hidden_states.view(torch.int32), sample.hidden_states.view(torch.int32))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5, dtype=torch.bfloat16),
        torch.tensor(True),
        torch.zeros(0, 3, dtype=torch.int32),
        torch.randint(0, 255, (2, 3, 4, 5, 6), dtype=torch.uint8),
        torch.tensor([True, False, True]),
    ],
    ids=["0-dim-bf16", "0-dim-bool", "empty-int32", "5d-uint8", "bool"],
)
def test_probe_tensors_round_trip(probe_kind, tensor):
    frames = encode(Probe(label="x", tensor=tensor))
    assert len(frames) == 2 + (1 if tensor.numel() else 0)
    out = decode(frames).tensor
    assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor)


def test_decode_into_caller_storage_copies_once_into_it():
    sample = make_sample(num_tokens=64, dtype=torch.bfloat16)
    storage = {}

    def alloc(name, dtype, shape):
        storage[name] = torch.empty(shape, dtype=dtype)
        return storage[name]

    decoded = decode(encode(sample, chunk_bytes=4096), alloc=alloc)
    assert decoded == sample
    assert decoded.hidden_states.data_ptr() == storage["hidden_states"].data_ptr()


def test_decoded_tensors_do_not_alias_the_received_frames():
    sample = make_sample(num_tokens=8, dtype=torch.float32)
    frames = [bytearray(bytes(f)) for f in encode(sample)]
    decoded = decode(frames)
    frames[-1][:] = b"\x00" * len(frames[-1])
    assert torch.equal(decoded.hidden_states, sample.hidden_states)


def test_encoder_refuses_unknown_types_and_dtypes():
    with pytest.raises(TypeError, match="not a registered"):
        encode(object())  # type: ignore[arg-type]
    bad = make_sample()
    bad.hidden_states = bad.hidden_states.double()
    with pytest.raises(TypeError, match="dtype"):
        encode(bad)
    with pytest.raises(TypeError, match="does not fit"):
        encode(Grant(lease_id="7", epoch=0, sample_ids=[1], deadline_s=1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="does not fit"):
        encode(Grant(lease_id=True, epoch=0, sample_ids=[1], deadline_s=1.0))  # bool is not an int on the wire


def test_header_is_plain_msgpack_with_version_fields_and_descriptors():
    header = msgpack.unpackb(encode(make_sample(num_tokens=3, hidden=8))[1])
    assert header["v"] == 1
    assert header["f"] == {"sample_id": 7, "epoch": 2, "lease_id": 11}
    assert [d[0] for d in header["t"]] == ["token_ids", "loss_mask", "hidden_states"]
    assert header["t"][2][1:] == ["bfloat16", [3, 4, 8], 1]


def test_default_chunk_size_is_in_the_fast_range():
    assert 1 << 20 <= DEFAULT_CHUNK_BYTES <= 4 << 20
