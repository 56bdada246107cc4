"""Fuzz: 100K random and mutated frame lists through the decoder, half of them decoded without a
copy; only ProtocolError may escape."""

from __future__ import annotations

import random

import msgpack
import torch

from protocol.codec import FramedTensor, decode, encode
from protocol.messages import MESSAGE_TYPES, Message, ProtocolError
from tests.protocol.test_codec import CONTROL_MESSAGES, make_sample

NUM_CASES = 100_000
MAX_BYTES = 1 << 20


def seeds() -> list[list[bytes]]:
    shapes = [(0, 8, torch.float32), (5, 8, torch.bfloat16), (40, 8, torch.float16), (40, 256, torch.float16)]
    samples = [
        make_sample(num_tokens=n, hidden=h, dtype=d) for n, h, d in shapes
    ]  # the last one is viewed by copy=False
    return [
        [bytes(f) for f in encode(m, chunk_bytes=16384 if getattr(m, "nbytes", 0) > 65536 else 4096)]
        for m in [*CONTROL_MESSAGES, *samples]
    ]


def random_msgpack(rng: random.Random):
    choices = [
        lambda: rng.randint(-(1 << 63), (1 << 64) - 1),
        lambda: rng.random() * 1e6,
        lambda: "".join(rng.choice("abcv ft_") for _ in range(rng.randint(0, 6))),
        lambda: [rng.randint(-3, 1 << 20) for _ in range(rng.randint(0, 4))],
        lambda: None,
        lambda: True,
        lambda: {"v": 1, "f": {}, "t": [["hidden_states", "float32", [rng.randint(0, 1 << 40)], 1]]},
    ]
    return rng.choice(choices)()


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = list(frames)
    op = rng.randrange(10)
    if op == 0 and frames:  # flip bytes anywhere
        i = rng.randrange(len(frames))
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        frames[i] = bytes(b)
    elif op == 1 and frames:  # truncate a frame
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randint(0, len(frames[i]))]
    elif op == 2 and frames:  # drop a frame
        frames.pop(rng.randrange(len(frames)))
    elif op == 3:  # duplicate a frame
        if frames:
            i = rng.randrange(len(frames))
            frames.insert(rng.randrange(len(frames) + 1), frames[i])
    elif op == 4 and len(frames) > 1:  # swap two frames
        i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    elif op == 5 and frames:  # another kind byte
        frames[0] = bytes((rng.randrange(256),))
    elif op == 6 and len(frames) > 1:  # a structurally mutated header
        try:
            header = msgpack.unpackb(frames[1])
            keys = [("f", k) for k in header["f"]] + [("t", i) for i in range(len(header["t"]))] + [("v", None)]
            where, key = rng.choice(keys)
            if where == "v":
                header["v"] = random_msgpack(rng)
            elif where == "f":
                header["f"][key] = random_msgpack(rng)
            else:
                d = header["t"][key]
                d[rng.randrange(4)] = random_msgpack(rng)
            frames[1] = msgpack.packb(header)
        except Exception:
            frames[1] = msgpack.packb(random_msgpack(rng))
    elif op == 7:  # entirely random frames
        frames = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 6))]
    elif op == 8 and len(frames) > 1:  # random msgpack header
        frames[1] = msgpack.packb(random_msgpack(rng))
    else:  # append junk
        frames.append(rng.randbytes(rng.randint(0, 64)))
    return frames


def test_fuzzed_frames_raise_only_protocol_errors():
    rng = random.Random(1234)
    corpus = seeds()
    outcomes = {"ok": 0, "protocol_error": 0}
    viewed = 0
    for _ in range(NUM_CASES):
        frames = rng.choice(corpus)
        for _ in range(rng.randint(1, 3)):
            frames = mutate(frames, rng)
        zero_copy = rng.random() < 0.5  # writable frames, as ZeroMQ gives them, are viewed in place
        if zero_copy:
            frames = [bytearray(f) for f in frames]
        try:
            message = decode(frames, max_message_bytes=MAX_BYTES, copy=not zero_copy)
        except ProtocolError:
            outcomes["protocol_error"] += 1
        else:
            assert isinstance(message, Message) and int(type(message).KIND) in MESSAGE_TYPES
            outcomes["ok"] += 1
            viewed += isinstance(getattr(message, "hidden_states", None), FramedTensor)
    assert sum(outcomes.values()) == NUM_CASES
    assert outcomes["protocol_error"] > NUM_CASES // 2, outcomes  # the mutations really do break things
    assert viewed > 100, viewed  # and the zero-copy path was taken
