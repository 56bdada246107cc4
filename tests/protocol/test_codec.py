"""Codec round trips: every message kind, edge-case tensors, and exact frame counts."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from protocol.codec import DEFAULT_CHUNK_BYTES, VIEW_MIN_BYTES, FramedTensor, all_finite, decode, encode
from protocol.messages import (
    PROTOCOL_VERSION,
    Delivered,
    EndOfStream,
    Error,
    Grant,
    Heartbeat,
    Hello,
    LeaseDone,
    LeaseFailed,
    ProtocolError,
    Sample,
    Welcome,
    schema,
)
from tests.protocol.probe import Probe


def make_sample(num_tokens=16, num_layers=4, hidden=32, dtype=torch.bfloat16, sample_id=7):
    return Sample(
        sample_id=sample_id,
        epoch=2,
        lease_id=11,
        token_ids=torch.arange(num_tokens, dtype=torch.int64),
        loss_mask=(torch.arange(num_tokens) % 2).to(torch.uint8),
        hidden_states=torch.randn(
            num_tokens, num_layers, hidden, generator=torch.Generator().manual_seed(sample_id)
        ).to(dtype),
    )


# Grants carry a lease token from protocol version 2 on; these tests run with or without it.
GRANT_TOKEN = {"token": "lease-secret"} if "token" in schema(Grant) else {}

CONTROL_MESSAGES = [
    Hello(
        producer_id="producer-0",
        target_model="tiny",
        layer_ids=[2, 4, 7, 10],
        hidden_size=64,
        dtype="bfloat16",
        vocab_size=1000,
    ),
    Welcome(accepted=False, reason="layer ids differ", trainer_rank=1, data_endpoint="ipc:///tmp/x"),
    Grant(lease_id=3, epoch=1, sample_ids=[5, 9, 2], deadline_s=30.0, **GRANT_TOKEN),
    LeaseDone(lease_id=3, num_samples=3),
    LeaseFailed(lease_id=3, sample_ids=[9], reason="OOM"),
    Heartbeat(sender="producer-0", time_s=12.5, stats={"samples_per_s": 3.0, "gbps": 1}),
    EndOfStream(reason="done"),
    Error(code="bad_frame", message="truncated"),
    Delivered(ticket=41, sample_id=9, ok=True),
    Delivered(ticket=42, sample_id=10, ok=False, reason="trainer took no data for 60s"),
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
    sample = Sample(
        sample_id=1,
        epoch=0,
        lease_id=0,
        token_ids=torch.arange(20)[::2],
        loss_mask=torch.ones(10, dtype=torch.bool),
        hidden_states=hidden,
    )
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


def _writable(frames):
    """Frames as ZeroMQ hands them over: writable buffers (bytes objects are read-only)."""
    return [bytearray(bytes(f)) for f in frames]


def test_zero_copy_decode_leaves_a_chunked_tensor_in_its_frames():
    sample = make_sample(num_tokens=64, hidden=256, dtype=torch.bfloat16)  # 128 KiB of hidden states
    frames = _writable(encode(sample, chunk_bytes=16 << 10))
    decoded = decode(frames, copy=False)
    hidden = decoded.hidden_states
    assert isinstance(hidden, FramedTensor) and len(hidden.parts) == 8 == len(frames) - 4
    assert (hidden.shape, hidden.dtype, hidden.dim(), hidden.nbytes) == (
        sample.hidden_states.shape,
        torch.bfloat16,
        3,
        128 << 10,
    )
    assert decoded == sample and decoded.nbytes == sample.nbytes
    assert isinstance(decoded.token_ids, torch.Tensor)  # small tensors are copied regardless
    # Viewed, not copied: a byte changed in the last frame shows in the decoded tensor.
    frames[-1][-2:] = torch.tensor([7.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert hidden.contiguous()[-1, -1, -1].item() == 7.0
    # copy_to copies the leading rows into a slice of a batch, across frame boundaries.
    batch = torch.zeros(100, 4, 256, dtype=torch.bfloat16)
    hidden.copy_to(batch[10:50])
    assert torch.equal(batch[10:50], sample.hidden_states[:40]) and not batch[:10].any() and not batch[50:].any()
    with pytest.raises(ValueError, match="cannot copy"):
        hidden.copy_to(torch.zeros(65, 4, 256, dtype=torch.bfloat16))


def test_zero_copy_decode_of_a_one_frame_tensor_is_a_plain_view():
    sample = make_sample(num_tokens=64, hidden=256, dtype=torch.float32)  # 256 KiB in one frame
    frames = _writable(encode(sample, chunk_bytes=1 << 20))
    decoded = decode(frames, copy=False)
    assert isinstance(decoded.hidden_states, torch.Tensor) and decoded == sample
    assert decoded.hidden_states.data_ptr() == torch.frombuffer(frames[-1], dtype=torch.uint8).data_ptr()


def test_zero_copy_decode_copies_what_it_cannot_view():
    sample = make_sample(num_tokens=64, hidden=256, dtype=torch.float32)
    frames = _writable(encode(sample, chunk_bytes=16 << 10))
    # Frames under ZeroMQ's 8 KiB receive batch may share a buffer: never viewed.
    small_frames = decode(_writable(encode(sample, chunk_bytes=4096)), copy=False)
    assert isinstance(small_frames.hidden_states, torch.Tensor) and small_frames == sample
    # Read-only buffers cannot back a tensor.
    read_only = decode([bytes(f) for f in frames], copy=False)
    assert isinstance(read_only.hidden_states, torch.Tensor) and read_only == sample
    # One frame that cannot be viewed (here read-only; in ZeroMQ a small remainder at an odd
    # address) is copied on its own, the others are still viewed.
    mixed = decode([*frames[:-1], bytes(frames[-1])], copy=False).hidden_states
    assert isinstance(mixed, FramedTensor) and mixed.contiguous().equal(sample.hidden_states)
    assert mixed.parts[0].data_ptr() == torch.frombuffer(frames[4], dtype=torch.uint8).data_ptr()
    assert mixed.parts[-1].data_ptr() != torch.frombuffer(frames[-1], dtype=torch.uint8).data_ptr()
    # A peer may cut frames anywhere: frames that split a float32 are copied, not viewed.
    data = b"".join(frames[4:])
    odd = [data[i : i + 16386] for i in range(0, len(data), 16386)]
    header = msgpack.unpackb(frames[1])
    header["t"][2][3] = len(odd)
    recut = decode(_writable([frames[0], msgpack.packb(header), *frames[2:4], *odd]), copy=False)
    assert isinstance(recut.hidden_states, torch.Tensor) and recut == sample
    # Below VIEW_MIN_BYTES everything is copied.
    small = make_sample(num_tokens=4, hidden=32)
    assert small.hidden_states.nbytes < VIEW_MIN_BYTES
    small_frames = _writable(encode(small))
    decoded = decode(small_frames, copy=False)
    small_frames[-1][:] = bytes(len(small_frames[-1]))
    assert decoded == small
    with pytest.raises(ValueError, match="contradict"):
        decode(frames, copy=False, alloc=lambda name, dtype, shape: torch.empty(shape, dtype=dtype))


def test_zero_copy_decode_still_refuses_bad_bool_bytes(probe_kind):
    frames = _writable(encode(Probe(label="b", tensor=torch.ones(1 << 17, dtype=torch.bool)), chunk_bytes=1 << 16))
    frames[3][5] = 2
    with pytest.raises(ProtocolError, match="bool"):
        decode(frames, copy=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_nan_and_inf_in_any_part(bad):
    sample = make_sample(num_tokens=64, hidden=256, dtype=torch.bfloat16)
    assert all_finite(sample.hidden_states)
    sample.hidden_states[50, 3, 17] = bad
    assert not all_finite(sample.hidden_states)
    framed = decode(_writable(encode(sample, chunk_bytes=16 << 10)), copy=False).hidden_states
    assert isinstance(framed, FramedTensor) and not all_finite(framed)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))


def test_encoder_refuses_unknown_types_and_dtypes():
    with pytest.raises(TypeError, match="not a registered"):
        encode(object())  # type: ignore[arg-type]
    bad = make_sample()
    bad.hidden_states = bad.hidden_states.double()
    with pytest.raises(TypeError, match="dtype"):
        encode(bad)
    with pytest.raises(TypeError, match="does not fit"):
        encode(Grant(lease_id="7", epoch=0, sample_ids=[1], deadline_s=1.0, **GRANT_TOKEN))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="does not fit"):
        # bool is not an int on the wire
        encode(Grant(lease_id=True, epoch=0, sample_ids=[1], deadline_s=1.0, **GRANT_TOKEN))


def test_header_is_plain_msgpack_with_version_fields_and_descriptors():
    header = msgpack.unpackb(encode(make_sample(num_tokens=3, hidden=8))[1])
    assert header["v"] == PROTOCOL_VERSION
    assert {k: v for k, v in header["f"].items() if k != "token"} == {"sample_id": 7, "epoch": 2, "lease_id": 11}
    assert [d[0] for d in header["t"]] == ["token_ids", "loss_mask", "hidden_states"]
    assert header["t"][2][1:] == ["bfloat16", [3, 4, 8], 1]


def test_default_chunk_size_is_in_the_fast_range():
    assert 1 << 20 <= DEFAULT_CHUNK_BYTES <= 4 << 20
