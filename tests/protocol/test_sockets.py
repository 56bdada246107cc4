"""Real ZeroMQ sockets over ipc:// and loopback tcp://: options, limits, CURVE, bind policy."""

from __future__ import annotations

import gc

import pytest
import torch
import zmq

from protocol.codec import FramedTensor
from protocol.messages import Grant, Hello, ProtocolError
from protocol.sockets import (
    CurveKeys,
    SocketConfig,
    is_loopback_endpoint,
    make_curve_keys,
    make_socket,
    recv_message,
    send_message,
    stop_authenticators,
)
from tests.protocol.test_codec import GRANT_TOKEN, make_sample

TIMEOUT_MS = 1500


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    stop_authenticators(context)
    context.destroy(linger=0)


def ipc(tmp_path, name="s"):
    return f"ipc://{tmp_path}/{name}.sock"


def test_sample_crosses_push_pull_in_chunks_and_decodes(ctx, tmp_path):
    pull = make_socket(ctx, zmq.PULL, SocketConfig(), bind=ipc(tmp_path))
    push = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=ipc(tmp_path))
    sample = make_sample(num_tokens=512, num_layers=4, hidden=64, dtype=torch.bfloat16)
    send_message(push, sample, chunk_bytes=16 << 10)
    assert pull.poll(TIMEOUT_MS)
    _, received = recv_message(pull)
    assert received == sample


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_zero_copy_samples_outlive_their_frames_and_later_traffic(ctx, tmp_path, transport):
    """Views of received frames stay valid after the frame objects are gone and more messages
    have arrived (their buffers are not recycled under them)."""
    endpoint = ipc(tmp_path) if transport == "ipc" else "tcp://127.0.0.1:0"
    pull = make_socket(ctx, zmq.PULL, SocketConfig(), bind=endpoint)
    push = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=pull.getsockopt(zmq.LAST_ENDPOINT).decode())
    sent = [make_sample(num_tokens=256, num_layers=4, hidden=64, sample_id=i) for i in range(6)]
    kept = []
    for sample in sent:
        send_message(push, sample, chunk_bytes=16 << 10)
        assert pull.poll(TIMEOUT_MS)
        kept.append(recv_message(pull, copy=False)[1])
    gc.collect()
    assert all(isinstance(m.hidden_states, FramedTensor) and len(m.hidden_states.parts) == 8 for m in kept)
    assert kept == sent


def test_router_dealer_round_trip_keeps_the_route(ctx, tmp_path):
    router = make_socket(ctx, zmq.ROUTER, SocketConfig(), bind=ipc(tmp_path))
    dealer = make_socket(ctx, zmq.DEALER, SocketConfig(), connect=ipc(tmp_path), identity=b"producer-0")
    hello = Hello(
        producer_id="producer-0", target_model="t", layer_ids=[1, 2], hidden_size=8, dtype="float32", vocab_size=10
    )
    send_message(dealer, hello)
    assert router.poll(TIMEOUT_MS)
    route, received = recv_message(router, num_route_frames=1)
    assert route == [b"producer-0"] and received == hello
    grant = Grant(lease_id=1, epoch=0, sample_ids=[4], deadline_s=5.0, **GRANT_TOKEN)
    send_message(router, grant, route=route)
    assert dealer.poll(TIMEOUT_MS)
    assert recv_message(dealer)[1] == grant


def test_frame_over_the_size_limit_never_reaches_the_receiver(ctx, tmp_path):
    limit = 64 << 10  # frames are capped at max(min(limit, MAX_CHUNK_BYTES), MAX_HEADER_BYTES) = 1 MiB
    pull = make_socket(ctx, zmq.PULL, SocketConfig(max_message_bytes=limit), bind=ipc(tmp_path))
    push = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=ipc(tmp_path))
    send_message(push, make_sample(num_tokens=4096, num_layers=4, hidden=64), chunk_bytes=8 << 20)  # one 2 MiB frame
    assert not pull.poll(500)
    # The receiver is unharmed: a fresh sender with a small message gets through.
    push2 = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=ipc(tmp_path))
    small = make_sample(num_tokens=4, hidden=8)
    send_message(push2, small)
    assert pull.poll(TIMEOUT_MS)
    assert recv_message(pull, max_message_bytes=limit)[1] == small


def test_total_size_over_the_limit_is_refused_by_the_decoder(ctx, tmp_path):
    limit = 64 << 10
    pull = make_socket(ctx, zmq.PULL, SocketConfig(max_message_bytes=limit), bind=ipc(tmp_path))
    push = make_socket(ctx, zmq.PUSH, SocketConfig(), connect=ipc(tmp_path))
    send_message(
        push, make_sample(num_tokens=512, num_layers=4, hidden=64), chunk_bytes=16 << 10
    )  # 256 KiB in 16 KiB frames
    assert pull.poll(TIMEOUT_MS)
    with pytest.raises(ProtocolError, match="exceed"):
        recv_message(pull, max_message_bytes=limit)


def test_send_blocks_at_the_high_water_mark(ctx, tmp_path):
    make_socket(ctx, zmq.PULL, SocketConfig(rcvhwm=1), bind=ipc(tmp_path))  # never reads
    push = make_socket(ctx, zmq.PUSH, SocketConfig(sndhwm=1), connect=ipc(tmp_path))
    push.setsockopt(zmq.SNDTIMEO, 200)
    with pytest.raises(zmq.Again):
        for _ in range(64):
            send_message(push, make_sample(num_tokens=64, hidden=64))


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("ipc:///tmp/x.sock", True),
        ("inproc://x", True),
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.2.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.0.0.5:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_loopback_detection(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_binding_a_reachable_address_is_opt_in(ctx):
    with pytest.raises(ValueError, match="allow-remote"):
        make_socket(ctx, zmq.PULL, SocketConfig(), bind="tcp://0.0.0.0:0")
    sock = make_socket(ctx, zmq.PULL, SocketConfig(allow_remote=True), bind="tcp://0.0.0.0:0")
    sock.close(linger=0)


@pytest.fixture
def curve_keys(tmp_path):
    server_public, server_secret = make_curve_keys(tmp_path / "server", "trainer")
    client_public, client_secret = make_curve_keys(tmp_path / "client", "producer")
    _, stranger_secret = make_curve_keys(tmp_path / "stranger", "stranger")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "producer.key").write_bytes(client_public.read_bytes())
    return dict(
        server=CurveKeys(secret_file=server_secret),
        server_authorized=CurveKeys(secret_file=server_secret, authorized_keys_dir=authorized),
        client=CurveKeys(secret_file=client_secret, server_public_file=server_public),
        stranger=CurveKeys(secret_file=stranger_secret, server_public_file=server_public),
        wrong_server=CurveKeys(secret_file=client_secret, server_public_file=client_public),
    )


def _bound_tcp(ctx, keys):
    sock = make_socket(ctx, zmq.PULL, SocketConfig(curve=keys), bind="tcp://127.0.0.1:0")
    return sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _delivers(ctx, endpoint, keys) -> bool:
    push = make_socket(ctx, zmq.PUSH, SocketConfig(curve=keys), connect=endpoint)
    push.setsockopt(zmq.SNDTIMEO, 300)
    try:
        send_message(push, make_sample(num_tokens=4, hidden=8))
    except zmq.Again:
        return False
    finally:
        push.close(linger=500)  # let the CURVE handshake finish and the message flush
    return True


def test_curve_client_with_the_right_keys_gets_through(ctx, curve_keys):
    pull, endpoint = _bound_tcp(ctx, curve_keys["server"])
    assert _delivers(ctx, endpoint, curve_keys["client"])
    assert pull.poll(TIMEOUT_MS)
    assert recv_message(pull)[1] == make_sample(num_tokens=4, hidden=8)


@pytest.mark.parametrize("client", ["plain", "wrong_server"])
def test_curve_server_lets_nothing_through_from_clients_without_the_keys(ctx, curve_keys, client):
    pull, endpoint = _bound_tcp(ctx, curve_keys["server"])
    keys = None if client == "plain" else curve_keys[client]
    _delivers(ctx, endpoint, keys)
    assert not pull.poll(800)


def test_curve_authorized_keys_refuse_an_unknown_client(ctx, curve_keys):
    pull, endpoint = _bound_tcp(ctx, curve_keys["server_authorized"])
    _delivers(ctx, endpoint, curve_keys["stranger"])
    assert not pull.poll(800)
    assert _delivers(ctx, endpoint, curve_keys["client"])
    assert pull.poll(TIMEOUT_MS)


def test_curve_client_without_server_key_is_a_config_error(ctx, curve_keys, tmp_path):
    keys = CurveKeys(secret_file=curve_keys["client"].secret_file)
    with pytest.raises(ValueError, match="server's public key"):
        make_socket(ctx, zmq.PUSH, SocketConfig(curve=keys), connect="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="does not exist"):
        CurveKeys(secret_file=tmp_path / "nope")
