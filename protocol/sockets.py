"""One factory for every ZeroMQ socket draftstream opens, plus message send/receive helpers.

All options (high-water marks, linger, maximum message size, CURVE keys) are set before
bind/connect, in one place. Binding anything reachable from other hosts is opt-in
(``allow_remote=True``); the default endpoints are ``ipc://`` or loopback TCP.

CURVE: the trainer side (the binding side) is the CURVE server and holds a secret key; producers
must know its public key and hold a key pair of their own. When ``authorized_keys_dir`` is given,
only clients whose public keys are in that directory get through (a ZAP authenticator thread).
Keys are ZeroMQ's plain-text certificate files, made with ``make_curve_keys``.

A socket belongs to one thread: create it on the thread that will use it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.codec import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    Allocator,
    decode,
    encode,
)
from protocol.messages import Message


@dataclasses.dataclass(kw_only=True, frozen=True)
class CurveKeys:
    """Paths of ZeroMQ certificate files. Servers need ``secret_file``; clients need both."""

    secret_file: Path
    server_public_file: Path | None = None  # clients: the server's public certificate
    authorized_keys_dir: Path | None = None  # servers: accept only these client keys

    def __post_init__(self) -> None:
        for path in (self.secret_file, self.server_public_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"CURVE key file {path} does not exist (make keys with `draftstream keygen`)")
        if self.authorized_keys_dir is not None and not Path(self.authorized_keys_dir).is_dir():
            raise ValueError(f"--curve-authorized-keys {self.authorized_keys_dir} is not a directory")


@dataclasses.dataclass(kw_only=True, frozen=True)
class SocketConfig:
    """Options applied to a socket before bind/connect."""

    sndhwm: int = 4
    rcvhwm: int = 4
    linger_ms: int = 2000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    curve: CurveKeys | None = None
    allow_remote: bool = False

    @property
    def max_frame_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE caps each *frame* (ZeroMQ's "message part"); a peer sending a bigger
        frame is disconnected by libzmq. The total across frames is checked by the decoder."""
        return max(min(self.max_message_bytes, MAX_CHUNK_BYTES), MAX_HEADER_BYTES)

    def __post_init__(self) -> None:
        if self.sndhwm < 0 or self.rcvhwm < 0:
            raise ValueError("socket high-water marks must be >= 0")
        if self.max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")


def make_curve_keys(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` into ``directory``; return both paths."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    return Path(public), Path(secret)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or "*": reachable from elsewhere
        return False


def rank_endpoints(base: str, rank: int) -> tuple[str, str]:
    """Control and data endpoints of ``rank``: ``ipc://DIR`` -> ``ipc://DIR/rank{r}-{control,data}.sock``;
    ``tcp://HOST:PORT`` -> ports PORT+2r and PORT+2r+1."""
    scheme, _, rest = base.partition("://")
    if scheme == "ipc":
        return f"ipc://{rest}/rank{rank}-control.sock", f"ipc://{rest}/rank{rank}-data.sock"
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if not port.isdigit():
            raise ValueError(
                f"--stream-endpoint/--connect {base}: tcp endpoints need a base port, e.g. tcp://127.0.0.1:5600"
            )
        return f"tcp://{host}:{int(port) + 2 * rank}", f"tcp://{host}:{int(port) + 2 * rank + 1}"
    raise ValueError(f"--stream-endpoint/--connect must be ipc://DIR or tcp://HOST:PORT, got {base!r}")


_authenticators: dict[tuple[int, str], ThreadAuthenticator] = {}


def _start_authenticator(ctx: zmq.Context, keys_dir: Path) -> None:
    key = (id(ctx), str(keys_dir))
    if key not in _authenticators:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(keys_dir))
        _authenticators[key] = auth


def stop_authenticators(ctx: zmq.Context) -> None:
    for key in [k for k in _authenticators if k[0] == id(ctx)]:
        _authenticators.pop(key).stop()


def make_socket(
    ctx: zmq.Context,
    socket_type: int,
    config: SocketConfig,
    *,
    bind: str | None = None,
    connect: str | Sequence[str] | None = None,
    identity: bytes | None = None,
) -> zmq.Socket:
    """A socket with every option set, then bound or connected. Exactly one of bind/connect."""
    if (bind is None) == (connect is None):
        raise ValueError("give exactly one of bind= or connect=")
    if bind is not None and not config.allow_remote and not is_loopback_endpoint(bind):
        raise ValueError(
            f"refusing to bind {bind}: it is reachable from other hosts. Pass --allow-remote "
            "(and preferably CURVE keys) to opt in."
        )
    sock = ctx.socket(socket_type)
    try:
        sock.setsockopt(zmq.SNDHWM, config.sndhwm)
        sock.setsockopt(zmq.RCVHWM, config.rcvhwm)
        sock.setsockopt(zmq.LINGER, config.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, config.max_frame_bytes)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if config.curve is not None:
            public, secret = zmq.auth.load_certificate(str(config.curve.secret_file))
            if secret is None:
                raise ValueError(f"{config.curve.secret_file} holds no secret key")
            sock.curve_publickey, sock.curve_secretkey = public, secret
            if bind is not None:
                sock.curve_server = True
                if config.curve.authorized_keys_dir is not None:
                    _start_authenticator(ctx, Path(config.curve.authorized_keys_dir))
            else:
                if config.curve.server_public_file is None:
                    raise ValueError("a CURVE client needs the server's public key (--curve-server-key)")
                server_public, _ = zmq.auth.load_certificate(str(config.curve.server_public_file))
                sock.curve_serverkey = server_public
        if bind is not None:
            sock.bind(bind)
        else:
            for endpoint in [connect] if isinstance(connect, str) else connect:  # type: ignore[union-attr]
                sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def send_message(
    sock: zmq.Socket,
    message: Message,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    flags: int = 0,
    route: Sequence[bytes] = (),
) -> None:
    """Encode and send; ``route`` prefixes ROUTER identity frames. Large frames go zero-copy."""
    frames = encode(message, chunk_bytes=chunk_bytes)
    sock.send_multipart([*route, *frames], flags=flags, copy=False)


def recv_frames(sock: zmq.Socket, *, flags: int = 0) -> list[Any]:
    return sock.recv_multipart(flags=flags, copy=False)


def recv_message(
    sock: zmq.Socket,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    alloc: Allocator | None = None,
    copy: bool = True,
    flags: int = 0,
    num_route_frames: int = 0,
) -> tuple[list[bytes], Message]:
    """Receive and decode one message (``decode``'s ``alloc`` and ``copy`` apply); returns (route
    frames, message). Raises ProtocolError."""
    frames = recv_frames(sock, flags=flags)
    route = [bytes(f.buffer) for f in frames[:num_route_frames]]
    return route, decode(frames[num_route_frames:], max_message_bytes=max_message_bytes, alloc=alloc, copy=copy)
