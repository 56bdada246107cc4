"""Bounded receive over real sockets: frame-by-frame caps, draining refused messages, the memory
they leave behind; ZMTP heartbeats and private ipc directories set up by the socket factory."""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys

import msgpack
import pytest
import zmq

import protocol.sockets as sockets
from protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from protocol.messages import Grant, Kind, Message, ProtocolError, ProtocolVersionError
from protocol.sockets import (
    CONTROL_MESSAGE_BYTES,
    KIND_CAPS,
    SocketConfig,
    make_socket,
    prepare_ipc_dir,
    recv_bounded,
    recv_message,
    release_freed_memory,
    send_message,
    stop_authenticators,
)
from tests.protocol.test_codec import GRANT_TOKEN, make_sample
from tests.protocol.test_fuzz_grammar import all_mutations

TIMEOUT_MS = 2000
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    stop_authenticators(context)
    context.destroy(linger=0)


@pytest.fixture(params=["push-pull", "dealer-router"])
def pair(request, ctx, tmp_path):
    """(sender, receiver, route frames on the receiver) over ipc://."""
    endpoint = f"ipc://{tmp_path}/s.sock"
    if request.param == "push-pull":
        receiver = make_socket(ctx, zmq.PULL, SocketConfig(), bind=endpoint)
        sender = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=endpoint)
        return sender, receiver, 0
    receiver = make_socket(ctx, zmq.ROUTER, SocketConfig(), bind=endpoint)
    sender = make_socket(ctx, zmq.DEALER, SocketConfig(), connect=endpoint, identity=b"peer\n\x1b")
    return sender, receiver, 1


def grant(**overrides) -> Grant:
    return Grant(**{"lease_id": 1, "epoch": 0, "sample_ids": [4, 5], "deadline_s": 5.0, **GRANT_TOKEN, **overrides})


def receive(receiver, route_frames, **kwargs) -> Message | ProtocolError:
    assert receiver.poll(TIMEOUT_MS)
    try:
        frames = recv_bounded(receiver, route_frames=route_frames, **kwargs)
        return decode(frames[route_frames:], max_message_bytes=kwargs.get("max_message_bytes", 1 << 30))
    except ProtocolError as e:
        return e


def test_mutated_messages_over_real_sockets_raise_only_protocol_errors(pair):
    sender, receiver, route_frames = pair
    mutations = [frames for _, frames, _ in all_mutations()[::25] if frames]
    oversized = [
        [bytes((Kind.GRANT,)), encode(grant())[1], *[b"\x00" * 4096] * 40],  # a control message with data
        [bytes((Kind.HEARTBEAT,)), b"\x00" * (CONTROL_MESSAGE_BYTES + 1)],
        [*(bytes(f) for f in encode(make_sample(num_tokens=64))), *[b"\x01" * 8192] * 8],
    ]
    outcomes = {"ok": 0, "refused": 0}
    for frames in [*mutations, *oversized]:
        sender.send_multipart(frames)
        result = receive(receiver, route_frames, max_message_bytes=1 << 20)
        outcomes["ok" if isinstance(result, Message) else "refused"] += 1
    assert len(mutations) > 300 and outcomes["refused"] > len(mutations) // 2, outcomes
    sample = make_sample(num_tokens=32)
    send_message(sender, sample)
    assert receive(receiver, route_frames) == sample
    assert not receiver.poll(0)


def test_control_message_with_data_frames_is_drained_and_refused_naming_its_size(pair):
    sender, receiver, route_frames = pair
    sender.send_multipart([bytes((Kind.GRANT,)), encode(grant())[1], *[b"\x00" * 65536] * 32])
    error = receive(receiver, route_frames)
    assert isinstance(error, ProtocolError)
    assert "header announces (0 frames, 0 bytes)" in str(error)
    assert "34 frames, " in " ".join(error.__notes__)
    assert error.route == ([b"peer\n\x1b"] if route_frames else [])
    send_message(sender, grant())
    assert receive(receiver, route_frames) == grant()


def test_control_header_over_its_kind_cap_is_refused(pair):
    sender, receiver, route_frames = pair
    big = grant(sample_ids=[1 << 40] * 8000)  # 72 KB of sample ids
    send_message(sender, big)
    error = receive(receiver, route_frames)
    assert isinstance(error, ProtocolError) and f"{CONTROL_MESSAGE_BYTES}-byte cap for Grant" in str(error)
    send_message(sender, big)
    assert receive(receiver, route_frames, kind_caps={}) == big  # caps are the caller's to choose


def test_sample_frames_beyond_its_header_are_refused_at_the_first_extra_frame(pair):
    sender, receiver, route_frames = pair
    frames = [bytes(f) for f in encode(make_sample(num_tokens=16))]
    sender.send_multipart([*frames, b"\x00" * 100, b"\x00" * 100])
    error = receive(receiver, route_frames)
    assert isinstance(error, ProtocolError) and "got 4 frames" in str(error)
    sender.send_multipart(frames)
    assert receive(receiver, route_frames) == make_sample(num_tokens=16)


def test_sample_announcing_more_than_the_message_limit_is_refused_before_its_data(ctx, tmp_path):
    pull = make_socket(ctx, zmq.PULL, SocketConfig(), bind=f"ipc://{tmp_path}/s.sock")
    push = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=f"ipc://{tmp_path}/s.sock")
    send_message(push, make_sample(num_tokens=512, num_layers=4, hidden=64), chunk_bytes=16 << 10)
    assert pull.poll(TIMEOUT_MS)
    with pytest.raises(ProtocolError, match="exceed the limit of 65536") as info:
        recv_message(pull, max_message_bytes=64 << 10)
    assert any("dropped the rest" in note for note in info.value.__notes__)


def test_unknown_kinds_short_messages_and_versions_are_refused_whole(pair):
    sender, receiver, route_frames = pair
    header = msgpack.unpackb(encode(grant())[1])
    header["v"] = 99
    for frames, expected in [
        ([b"\xee", b"x", b"y" * 100], "unknown message kind"),
        ([b"\x03\x03", b"x"], "unknown message kind"),
        ([bytes((Kind.GRANT,))], "at least"),
        ([bytes((Kind.GRANT,)), msgpack.packb(header), b"z"], "version"),
    ]:
        sender.send_multipart(frames)
        error = receive(receiver, route_frames)
        assert isinstance(error, ProtocolError) and expected in str(error), (frames, error)
    sender.send_multipart([bytes((Kind.GRANT,)), msgpack.packb(header)])
    assert isinstance(receive(receiver, route_frames), ProtocolVersionError)  # callers answer this one
    send_message(sender, grant())
    assert receive(receiver, route_frames) == grant()


def test_noblock_raises_again_only_when_nothing_waits(pair):
    sender, receiver, route_frames = pair
    with pytest.raises(zmq.Again):
        recv_bounded(receiver, route_frames=route_frames, flags=zmq.NOBLOCK)
    send_message(sender, make_sample(num_tokens=8))
    assert receiver.poll(TIMEOUT_MS)
    frames = recv_bounded(receiver, route_frames=route_frames, flags=zmq.NOBLOCK)
    assert len(frames) == route_frames + 5


def test_default_caps_cover_every_control_kind_and_fit_realistic_grants():
    assert set(KIND_CAPS) == {int(k) for k in Kind} - {int(Kind.SAMPLE)}
    token = {"token": "t" * 64} if GRANT_TOKEN else {}
    header = encode(grant(lease_id=(1 << 63) - 1, sample_ids=[(1 << 63) - 1] * 4096, **token))[1]
    assert len(header) < CONTROL_MESSAGE_BYTES
    assert DEFAULT_MAX_MESSAGE_BYTES > CONTROL_MESSAGE_BYTES


def test_discarding_a_large_message_releases_memory_once_per_interval(pair, monkeypatch):
    sender, receiver, route_frames = pair
    calls = []
    monkeypatch.setattr(sockets, "release_freed_memory", lambda: calls.append(1))
    sender.send_multipart([bytes((Kind.GRANT,)), encode(grant())[1], b"x"])
    assert isinstance(receive(receiver, route_frames), ProtocolError)
    assert calls == []  # small: nothing worth giving back
    sender.send_multipart([bytes((Kind.GRANT,)), encode(grant())[1], *[b"\x00" * (256 << 10)] * 8])
    assert isinstance(receive(receiver, route_frames), ProtocolError)
    assert calls == [1]


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_freed_memory_is_rate_limited_and_trims_at_the_end_of_a_burst(monkeypatch):
    if sockets._trim_timer is not None:  # left by an earlier test's discarded messages
        sockets._trim_timer.join(timeout=5)
    now = [100.0]
    monkeypatch.setattr(sockets, "_last_trim", -float("inf"))
    assert release_freed_memory(min_interval_s=0.2, clock=lambda: now[0])
    now[0] += 0.1
    assert not release_freed_memory(min_interval_s=0.2, clock=lambda: now[0])
    timer = sockets._trim_timer
    assert timer is not None and timer.name == "MallocTrim"
    assert not release_freed_memory(min_interval_s=0.2, clock=lambda: now[0])
    assert sockets._trim_timer is timer  # one trailing trim per interval, however many calls
    timer.join(timeout=5)
    assert sockets._trim_timer is None and sockets._last_trim == now[0]


RSS_PROBE = r"""
import json, os, time
import zmq
import protocol.sockets as sockets
from protocol.allocator import keep_freed_frames
from protocol.codec import encode
from protocol.messages import Grant, ProtocolError, schema

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

keep_freed_frames()
release, sockets.release_freed_memory = sockets.release_freed_memory, lambda: False
ctx = zmq.Context()
pull = sockets.make_socket(ctx, zmq.PULL, sockets.SocketConfig(), bind=f"ipc://@draftstream-rss-{os.getpid()}")
push = sockets.make_socket(ctx, zmq.PUSH, sockets.SocketConfig(), connect=pull.getsockopt(zmq.LAST_ENDPOINT).decode())
fields = {"lease_id": 1, "epoch": 0, "sample_ids": [1], "deadline_s": 1.0}
fields.update({"token": "t"} if "token" in schema(Grant) else {})
before = rss()
push.send_multipart([b"\x03", encode(Grant(**fields))[1], *[b"\x01" * (2 << 20)] * 48], copy=False)  # 96 MiB
assert pull.poll(5000)
time.sleep(0.3)  # libzmq finishes assembling the message before the application sees frame 0
held = rss()
try:
    sockets.recv_bounded(pull)
except ProtocolError:
    pass
kept = rss()
assert release()
print(json.dumps({k: (v - before) / 2**20 for k, v in [("held", held), ("kept", kept), ("trimmed", rss())]}))
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_memory_of_a_discarded_message_goes_back_to_the_os():
    """With allocator.keep_freed_frames, a hostile message's freed frames stay resident until
    trimmed; malloc_trim gives back all but the top of the IO thread's arena heap (at most one
    heap, 64 MiB, which M_TOP_PAD keeps for the next frames anyway)."""
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=60, check=True)
    mib = json.loads(out.stdout)
    assert mib["held"] > 80 and mib["kept"] > 80, mib  # libzmq assembled it whole; malloc kept it
    assert mib["trimmed"] < min(mib["kept"] - 48, 64), mib


# ---- socket factory: heartbeats, private ipc directories ---------------------------------------


def test_sockets_send_zmtp_heartbeats(ctx, tmp_path):
    config = SocketConfig(heartbeat_ivl_ms=500, heartbeat_timeout_ms=3000, heartbeat_ttl_ms=4000)
    sock = make_socket(ctx, zmq.PULL, config, bind=f"ipc://{tmp_path}/s.sock")
    assert [sock.getsockopt(o) for o in (zmq.HEARTBEAT_IVL, zmq.HEARTBEAT_TIMEOUT, zmq.HEARTBEAT_TTL)] == [
        500,
        3000,
        4000,
    ]
    assert make_socket(ctx, zmq.PUSH, SocketConfig(), connect="tcp://127.0.0.1:1").getsockopt(zmq.HEARTBEAT_IVL) == 2000
    assert (
        make_socket(ctx, zmq.PUSH, SocketConfig(heartbeat_ivl_ms=0), connect="tcp://127.0.0.1:1").getsockopt(
            zmq.HEARTBEAT_IVL
        )
        == 0
    )
    with pytest.raises(ValueError, match="heartbeat"):
        SocketConfig(heartbeat_timeout_ms=-1)


def test_binding_ipc_creates_a_private_directory(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/a/b/s.sock"
    make_socket(ctx, zmq.PULL, SocketConfig(), bind=endpoint)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700


def test_an_open_ipc_directory_of_ours_is_tightened(tmp_path):
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o755)
    assert prepare_ipc_dir(f"ipc://{tmp_path}/open/s.sock") == (tmp_path / "open").resolve()
    assert stat.S_IMODE(os.stat(tmp_path / "open").st_mode) == 0o700


def test_shared_or_foreign_ipc_directories_are_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(ValueError, match="shared"):
        prepare_ipc_dir(f"ipc://{shared}/s.sock")
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
    else:
        foreign = next(p for p in (tmp_path.anchor, "/usr", "/etc") if os.stat(p).st_uid != os.geteuid())
    with pytest.raises(ValueError, match="belongs to uid"):
        prepare_ipc_dir(f"ipc://{foreign}/s.sock")


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "ipc://@abstract", "ipc://*", "inproc://x"])
def test_endpoints_without_a_directory_are_left_alone(endpoint):
    assert prepare_ipc_dir(endpoint) is None
