"""Grammar-aware fuzz: start from a valid encoded message of every kind in MESSAGE_TYPES, built
from its schema, and break it one part at a time: every header field, every tensor descriptor
slot and dim, the header's own layout, and the frames. decode must return a message or raise
ProtocolError, nothing else; values no field can hold (NaN, ints beyond int64, ...) must fail."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import MAX_TENSOR_DIM, MAX_TEXT_CHARS, decode, encode
from protocol.messages import MESSAGE_TYPES, TENSOR, Message, ProtocolError, Sample, schema

MAX_BYTES = 1 << 20
CHUNK_BYTES = 4096
NAN, INF = math.nan, math.inf

# Values no header field can hold: decode must refuse them wherever they appear.
NEVER_VALID = [
    NAN,
    INF,
    -INF,
    1 << 63,
    (1 << 64) - 1,
    None,
    b"\x00\x01",
    "x" * (MAX_TEXT_CHARS + 1),
    [[1]],
    {"a": {"b": []}},
]
# Values some field can hold, or that a field of another type must refuse.
ODD = [0, -1, 1, 1 << 31, (1 << 63) - 1, -(1 << 63), 1.5, -0.0, 1e30, -1e30, "", "x", [], [1], [""], {}, {"a": 1.0}]
ODD += [True, False, b"", [None], [(1 << 64) - 1], {"a": NAN}]
DEEP = [[[[[[[[[[[[1]]]]]]]]]]]]
BAD_DIMS = [-1, 1 << 31, 1 << 40, 1 << 63, (1 << 64) - 1, 2.0, NAN, "3", None, [2], True]
BAD_FRAME_COUNTS = [-1, 0, 1, 2, 100, 1 << 31, 1 << 63, (1 << 64) - 1, 1.0, NAN, "1", None, [1], False]

EXAMPLE = {
    int: 3,
    float: 1.5,
    str: "s",
    bool: False,
    (list, int): [1, 2],
    (list, str): ["a"],
    (list, float): [0.5],
    (dict, str, float): {"rate": 1.0},
}


def sample_tensors(num_tokens: int, hidden: int) -> dict[str, torch.Tensor]:
    return {
        "token_ids": torch.arange(num_tokens, dtype=torch.int64),
        "loss_mask": torch.ones(num_tokens, dtype=torch.uint8),
        "hidden_states": torch.randn(num_tokens, 4, hidden, generator=torch.Generator().manual_seed(0)).bfloat16(),
    }


def valid_message(cls: type[Message], tensors: dict[str, torch.Tensor]) -> Message:
    """An instance of ``cls`` with every field set from its schema; fails loudly on a new spec."""
    fields = {name: tensors[name] if spec is TENSOR else EXAMPLE[spec] for name, spec in schema(cls).items()}
    message = cls(**fields)
    message.check()
    return message


def seeds() -> list[list[bytes]]:
    messages = [valid_message(cls, sample_tensors(3, 8)) for cls in MESSAGE_TYPES.values()]
    messages += [valid_message(Sample, sample_tensors(40, 32)), valid_message(Sample, sample_tensors(0, 8))]
    return [[bytes(f) for f in encode(m, chunk_bytes=CHUNK_BYTES)] for m in messages]


def with_header(frames: list[bytes], header: object) -> list[bytes]:
    return [frames[0], msgpack.packb(header, use_bin_type=True), *frames[2:]]


def header_mutations(frames: list[bytes]) -> Iterator[tuple[str, list[bytes], bool]]:
    """(label, frames, must_fail) for every header field, descriptor slot and dim."""
    header = msgpack.unpackb(frames[1])

    def put(path: tuple, value: object) -> list[bytes]:
        """The frames with the header's value at ``path`` replaced (or appended, for key None)."""
        h = copy.deepcopy(header)
        node = h
        for key in path[:-1]:
            node = node[key]
        if path[-1] is None:
            node.append(value)
        else:
            node[path[-1]] = value
        return with_header(frames, h)

    def drop(path: tuple) -> list[bytes]:
        h = copy.deepcopy(header)
        node = h
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1])
        return with_header(frames, h)

    for name, value in header["f"].items():
        for bad in NEVER_VALID:
            yield f"f.{name}={bad!r:.20}", put(("f", name), bad), True
            if isinstance(value, list):
                yield f"f.{name}[0]={bad!r:.20}", put(("f", name), [bad]), True
            if isinstance(value, dict):
                yield f"f.{name}.k={bad!r:.20}", put(("f", name), {"k": bad}), True
        for odd in [*ODD, DEEP]:
            yield f"f.{name}={odd!r:.20}", put(("f", name), odd), False
            if isinstance(value, list):
                yield f"f.{name}+={odd!r:.20}", put(("f", name, None), odd), False
            if isinstance(value, dict):
                yield f"f.{name}.k={odd!r:.20}", put(("f", name, "k"), odd), False
        yield f"f.{name} dropped", drop(("f", name)), True
    yield "f.extra", put(("f", "extra"), 1), True
    for key in ("v", "f", "t"):
        for bad in [*NEVER_VALID, *ODD, MAX_TENSOR_DIM]:
            must_fail = type(bad) is not type(header[key]) or bad != header[key]
            yield f"{key}={bad!r:.20}", put((key,), bad), must_fail
        yield f"{key} dropped", drop((key,)), True
    yield "extra key", put(("x",), 0), True

    descriptors = header["t"]
    for i, (_, _, shape, _) in enumerate(descriptors):
        for slot in range(4):
            for bad in [*NEVER_VALID, *ODD, "float64", "int8", "bfloat16", "int32", "token_ids", "secret"]:
                yield f"t[{i}][{slot}]={bad!r:.20}", put(("t", i, slot), bad), False
        for k in range(len(shape)):
            for bad in BAD_DIMS:
                yield f"t[{i}].shape[{k}]={bad!r:.20}", put(("t", i, 2, k), bad), True
            for odd in (0, 1, 3, 2 * shape[k], MAX_TENSOR_DIM):
                yield f"t[{i}].shape[{k}]={odd}", put(("t", i, 2, k), odd), False
        for absurd in ([0, (1 << 64) - 1, 5], [0, 1 << 63, 1 << 63], [0, *[MAX_TENSOR_DIM] * 4], [0] * 9, [1] * 9):
            yield f"t[{i}].shape={absurd!r:.30}", put(("t", i, 2), absurd), True
        yield f"t[{i}].shape=[]", put(("t", i, 2), []), False
        yield f"t[{i}].shape+1", put(("t", i, 2, None), 1), False
        for count in BAD_FRAME_COUNTS:
            yield f"t[{i}].n_frames={count!r:.20}", put(("t", i, 3), count), False
        yield f"t[{i}] short", drop(("t", i, 3)), True
        yield f"t[{i}] long", put(("t", i, None), 0), True
        yield f"t[{i}] dropped", drop(("t", i)), True
        yield f"t[{i}] twice", put(("t", None), descriptors[i]), True
    if len(descriptors) > 1:
        yield "t reversed", put(("t",), descriptors[::-1]), False
        yield "t names swapped", put(("t", 0, 0), descriptors[1][0]), True


def frame_mutations(frames: list[bytes]) -> Iterator[tuple[str, list[bytes], bool]]:
    for i in range(len(frames)):
        yield f"drop {i}", frames[:i] + frames[i + 1 :], i < 2 or len(frames[i]) > 0
        yield f"dup {i}", frames[: i + 1] + frames[i:], True
        yield f"empty {i}", frames[:i] + [b""] + frames[i + 1 :], len(frames[i]) > 0
        yield f"cut {i}", frames[:i] + [frames[i][:-1]] + frames[i + 1 :], len(frames[i]) > 0
        yield f"grow {i} by 1", frames[:i] + [frames[i] + b"\x00"] + frames[i + 1 :], True
        yield f"grow {i} by 8", frames[:i] + [frames[i] + bytes(8)] + frames[i + 1 :], True
        yield f"noise {i}", frames[:i] + [bytes(reversed(frames[i]))] + frames[i + 1 :], False
    yield "append empty", [*frames, b""], True
    yield "append junk", [*frames, b"\x01" * 64], True
    yield "prepend junk", [b"\x01", *frames], False
    yield "kind and header only", frames[:2], len(frames) > 2
    for kind in range(256):
        yield f"kind {kind}", [bytes((kind,)), *frames[1:]], kind not in MESSAGE_TYPES


def all_mutations() -> list[tuple[str, list[bytes], bool]]:
    return [m for frames in seeds() for m in (*header_mutations(frames), *frame_mutations(frames))]


def outcome(frames: list[bytes], *, zero_copy: bool) -> Message | ProtocolError:
    if zero_copy:  # writable frames, as ZeroMQ gives them, are viewed in place
        frames = [bytearray(f) for f in frames]
    try:
        return decode(frames, max_message_bytes=MAX_BYTES, copy=not zero_copy)
    except ProtocolError as e:
        return e


def test_seeds_cover_every_kind_and_decode():
    corpus = seeds()
    assert {f[0][0] for f in corpus} == set(MESSAGE_TYPES)
    for frames in corpus:
        assert isinstance(decode(frames), Message)


def test_every_field_descriptor_and_frame_mutation_decodes_or_raises_protocol_error():
    mutations = all_mutations()
    assert len(mutations) > 5000
    refused = 0
    for label, frames, must_fail in mutations:
        for zero_copy in (False, True):
            result = outcome(frames, zero_copy=zero_copy)  # anything but ProtocolError propagates
            assert not (must_fail and isinstance(result, Message)), f"{label}: decoded {result!r:.200}"
            refused += isinstance(result, ProtocolError)
    assert refused > len(mutations)  # most mutations break the message, in both modes


@pytest.mark.parametrize("shape", [[0, (1 << 64) - 1, 8], [0, 1 << 63, 1 << 63], [0, *[MAX_TENSOR_DIM] * 4]])
def test_empty_sample_with_absurd_dims_is_a_protocol_error(shape):
    """Zero elements pass any byte-size check; the dims themselves must be refused before torch sees them."""
    frames = [bytes(f) for f in encode(valid_message(Sample, sample_tensors(0, 8)))]
    header = msgpack.unpackb(frames[1])
    header["t"][2][2] = shape
    frames = with_header(frames, header)
    assert len(b"".join(frames)) < 200
    with pytest.raises(ProtocolError, match="shape"):
        decode(frames)


peer_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


def _paths(header: dict) -> list[tuple]:
    paths: list[tuple] = [("v",), ("f",), ("t",)]
    paths += [("f", name) for name in header["f"]]
    for i, descriptor in enumerate(header["t"]):
        paths += [("t", i, slot) for slot in range(4)] + [("t", i, 2, k) for k in range(len(descriptor[2]))]
    return paths


CORPUS = seeds()
TARGETS = [(n, path) for n, frames in enumerate(CORPUS) for path in _paths(msgpack.unpackb(frames[1]))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(TARGETS), value=peer_values, zero_copy=st.booleans())
def test_any_value_anywhere_in_a_header_decodes_or_raises_protocol_error(target, value, zero_copy):
    n, path = target
    header = msgpack.unpackb(CORPUS[n][1])
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    outcome(with_header(CORPUS[n], header), zero_copy=zero_copy)
