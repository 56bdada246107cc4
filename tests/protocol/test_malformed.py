"""Every malformed input raises ProtocolError, and nothing else, before allocating anything big."""

from __future__ import annotations

import msgpack
import pytest
import torch

from protocol.codec import decode, encode
from protocol.messages import Delivered, Grant, Heartbeat, Kind, ProtocolError, ProtocolVersionError
from tests.protocol.test_codec import GRANT_TOKEN, make_sample


def sample_frames(chunk_bytes=4096):
    return [
        bytes(f) for f in encode(make_sample(num_tokens=64, hidden=32, dtype=torch.float32), chunk_bytes=chunk_bytes)
    ]


def header_of(frames):
    return msgpack.unpackb(frames[1])


def with_header(frames, header):
    return [frames[0], msgpack.packb(header), *frames[2:]]


def raises(frames, match=None, **kwargs):
    with pytest.raises(ProtocolError, match=match):
        decode(frames, **kwargs)


def test_truncated_message_missing_its_last_frame():
    raises(sample_frames()[:-1], "data frames")


def test_truncated_frame_bytes():
    frames = sample_frames()
    frames[-1] = frames[-1][:-1]
    raises(frames, "bytes")


def test_too_few_frames():
    raises([], "at least 2")
    raises(sample_frames()[:1], "at least 2")


def test_extra_frame():
    raises([*sample_frames(), b"\x00" * 16], "data frames")


def test_reordered_kind_and_header():
    frames = sample_frames()
    raises([frames[1], frames[0], *frames[2:]])


def test_reordered_tensor_frames_of_different_sizes():
    frames = sample_frames()
    frames[2], frames[-1] = frames[-1], frames[2]  # token_ids frame swapped with the short last hidden chunk
    raises(frames, "bytes")


def test_unknown_kind():
    raises([b"\x63", *sample_frames()[1:]], "unknown message kind")
    raises([b"", *sample_frames()[1:]], "1 byte")
    raises([b"\x04\x04", *sample_frames()[1:]], "1 byte")


def test_bad_msgpack_header():
    frames = sample_frames()
    raises([frames[0], b"\xc1\xff\x00", *frames[2:]], "msgpack")
    raises([frames[0], frames[1][:-3], *frames[2:]], "msgpack")
    raises([frames[0], frames[1] + b"\x00", *frames[2:]], "msgpack")  # trailing bytes


def test_wrong_protocol_version_is_a_protocol_error_naming_both_versions():
    frames = sample_frames()
    header = header_of(frames)
    header["v"] = 99
    with pytest.raises(ProtocolVersionError, match="99") as info:
        decode(with_header(frames, header))
    assert isinstance(info.value, ProtocolError) and info.value.peer_version == 99


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.__setitem__("f", []),
        lambda h: h.__setitem__("t", {}),
        lambda h: h.__setitem__("x", 1),
        lambda h: h["f"].__setitem__("sample_id", "7"),
        lambda h: h["f"].__setitem__("sample_id", True),
        lambda h: h["f"].__setitem__("sample_id", 1.5),
        lambda h: h["f"].pop("epoch"),
        lambda h: h["f"].__setitem__("extra", 1),
        lambda h: h["t"][2].__setitem__(1, "float64"),
        lambda h: h["t"][2].__setitem__(1, 3),
        lambda h: h["t"][2].__setitem__(2, [64, 4, -32]),
        lambda h: h["t"][2].__setitem__(2, [64, 4, "32"]),
        lambda h: h["t"][2].__setitem__(2, [1] * 9),
        lambda h: h["t"][2].__setitem__(2, [64, 4, 16]),  # shape no longer matches the bytes
        lambda h: h["t"][2].__setitem__(3, -1),
        lambda h: h["t"][2].__setitem__(0, "token_ids"),  # duplicate tensor name
        lambda h: h["t"][2].__setitem__(0, "secret"),
        lambda h: h["t"].pop(),
        lambda h: h["t"][2].pop(),
        lambda h: h["t"][0].__setitem__(1, "int32"),  # token_ids must be int64 (message check)
    ],
)
def test_mislabelled_header_fields_raise(mutate):
    frames = sample_frames()
    header = header_of(frames)
    mutate(header)
    raises(with_header(frames, header))


def test_non_map_header():
    frames = sample_frames()
    raises([frames[0], msgpack.packb([1, 2, 3]), *frames[2:]], "map")


def test_oversize_message_is_refused_before_allocation():
    frames = sample_frames()
    raises(frames, "exceed", max_message_bytes=1000)
    header = header_of(frames)
    header["t"][2][2] = [1 << 30, 1 << 10, 1 << 10]  # 4 PiB claimed
    raises(with_header(frames, header), "exceed")


def test_oversize_header_is_refused():
    frames = sample_frames()
    raises([frames[0], b"\x00" * (2 << 20), *frames[2:]], "header")


def test_bool_tensor_with_non_boolean_bytes():
    sample = make_sample(num_tokens=8)
    sample.loss_mask = sample.loss_mask.bool()
    frames = [bytes(f) for f in encode(sample)]
    frames[3] = b"\x02" + frames[3][1:]
    raises(frames, "bool")


def test_semantic_checks_run_on_decode():
    frames = [bytes(f) for f in encode(Grant(lease_id=1, epoch=0, sample_ids=[1], deadline_s=1.0, **GRANT_TOKEN))]
    header = header_of(frames)
    header["f"]["sample_ids"] = []
    raises(with_header(frames, header), "no sample ids")
    header["f"]["sample_ids"] = [1, "2"]
    raises(with_header(frames, header))


def test_sample_with_mismatched_lengths_is_refused():
    sample = make_sample(num_tokens=8)
    sample.loss_mask = sample.loss_mask[:7]
    with pytest.raises(ProtocolError, match="T=8"):
        encode(sample)


def test_heartbeat_stats_must_be_a_str_to_number_map():
    frames = [bytes(f) for f in encode(Heartbeat(sender="a", time_s=1.0, stats={"x": 1.0}))]
    header = header_of(frames)
    header["f"]["stats"] = {"x": "fast"}
    raises(with_header(frames, header))


def test_delivery_report_fields_are_typed_and_consistent():
    frames = [bytes(f) for f in encode(Delivered(ticket=3, sample_id=7, ok=False, reason="gone"))]
    for field, value in (("ok", 1), ("ticket", "3"), ("sample_id", 7.5), ("reason", None)):
        header = header_of(frames)
        header["f"][field] = value
        raises(with_header(frames, header), field)
    header = header_of(frames)
    header["f"]["ok"] = True
    raises(with_header(frames, header), "ok but carries a reason")
    with pytest.raises(ProtocolError, match="ok but carries a reason"):
        encode(Delivered(ticket=3, sample_id=7, ok=True, reason="gone"))


def test_kind_of_another_message_with_this_header():
    frames = sample_frames()
    raises([bytes((int(Kind.GRANT),)), *frames[1:]], "fields")


def test_non_buffer_frame_objects():
    frames = sample_frames()
    raises([frames[0], 12345, *frames[2:]], "byte buffer")
