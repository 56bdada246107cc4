"""One factory for every ZeroMQ socket draftstream opens, plus message send/receive helpers.

All options (high-water marks, linger, maximum message size, CURVE keys) are set before
bind/connect, in one place. Binding anything reachable from other hosts is opt-in
(``allow_remote=True``); the default endpoints are ``ipc://`` or loopback TCP.

CURVE: the trainer side (the binding side) is the CURVE server and holds a secret key; producers
must know its public key and hold a key pair of their own. When ``authorized_keys_dir`` is given,
only clients whose public keys are in that directory get through (a ZAP authenticator thread).
Keys are ZeroMQ's plain-text certificate files, made with ``make_curve_keys``.

Receiving is bounded frame by frame (``recv_bounded``): a message is read one frame at a time and
refused, its remaining frames drained and dropped, as soon as it outgrows what its header announces,
its kind's cap (``KIND_CAPS``: control messages are small) or the message size limit. libzmq itself
has already assembled the whole message by then (only authentication bounds that: an ``ipc://``
directory of mode 0700, CURVE), but this process never holds a hostile message's frames, and gives
the memory back (``release_freed_memory``). ZMTP heartbeats detect dead peers on every socket.

A socket belongs to one thread: create it on the thread that will use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import ipaddress
import logging
import math
import os
import platform
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

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
    read_header,
)
from protocol.messages import MESSAGE_TYPES, Kind, Message, ProtocolError

logger = logging.getLogger(__name__)

# Every kind but Sample is a few hundred bytes; the largest is a Grant, whose sample ids take at
# most 9 bytes each: 64 KiB holds a grant of over 7000 ids.
CONTROL_MESSAGE_BYTES = 64 << 10
# Per-kind cap on a message's bytes after its kind frame (header plus data frames); kinds not
# listed (Sample) are bounded by max_message_bytes alone.
KIND_CAPS: Mapping[int, int] = MappingProxyType(
    {int(kind): CONTROL_MESSAGE_BYTES for kind in Kind if kind is not Kind.SAMPLE}
)
# Discarding a message at least this large gives freed memory back to the OS, at most once per
# TRIM_INTERVAL_S (malloc_trim walks every arena: cheap, but not per message).
TRIM_MIN_BYTES = 1 << 20
TRIM_INTERVAL_S = 1.0


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
    # ZMTP heartbeats (0 disables): a PING every ivl, the connection dropped if nothing comes back
    # within timeout; ttl tells the peer to drop us after that long without traffic.
    heartbeat_ivl_ms: int = 2000
    heartbeat_timeout_ms: int = 10000
    heartbeat_ttl_ms: int = 10000

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
        if min(self.heartbeat_ivl_ms, self.heartbeat_timeout_ms, self.heartbeat_ttl_ms) < 0:
            raise ValueError("socket heartbeat intervals must be >= 0 (0 disables)")
        if self.heartbeat_ttl_ms > 6553599:  # ZMTP carries the TTL in deciseconds, 16 bits
            raise ValueError(f"heartbeat_ttl_ms must be at most 6553599, got {self.heartbeat_ttl_ms}")


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


def rank_endpoints(base: str, rank: int, *, local_rank: int | None = None) -> tuple[str, str]:
    """Control and data endpoints of ``rank``: ``ipc://DIR`` -> ``ipc://DIR/rank{r}-{control,data}.sock``;
    ``tcp://HOST:PORT`` -> ports PORT+2l and PORT+2l+1, where l is the rank's ``local_rank`` on its
    host (default: ``rank``, all ranks on one host). So with ``torchrun --nnodes N`` every node's
    first rank answers at PORT on its own host."""
    scheme, _, rest = base.partition("://")
    if local_rank is not None and scheme == "tcp":
        rank = local_rank
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


WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "[::]")


def endpoint_host(endpoint: str) -> str:
    """The host of a ``tcp://HOST:PORT`` endpoint ("" for other schemes)."""
    scheme, _, rest = endpoint.partition("://")
    return rest.rsplit(":", 1)[0] if scheme == "tcp" else ""


def advertised_endpoint(endpoint: str, advertise_host: str | None) -> str:
    """``endpoint`` as peers on other hosts should dial it: a tcp endpoint bound on a wildcard
    address (0.0.0.0, ``*``, ``::``) is advertised under ``advertise_host`` (default: this host's
    name), same port. Other endpoints are dialled as they are bound."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, port = endpoint_host(endpoint), endpoint.rsplit(":", 1)[1]
    if advertise_host:
        return f"tcp://{advertise_host}:{port}"
    if host in WILDCARD_HOSTS:
        return f"tcp://{socket.gethostname()}:{port}"
    return endpoint


def check_dialable(endpoint: str) -> str:
    """``endpoint`` if a producer may dial it (``ipc://PATH`` or ``tcp://HOST:PORT``, no wildcard
    host); ValueError otherwise. Endpoints learnt from a peer pass here before anything dials them."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    ok = (scheme == "ipc" and bool(rest) and rest != "*") or (
        scheme == "tcp" and bool(host) and host not in WILDCARD_HOSTS and port.isdigit() and 0 < int(port) < 65536
    )
    if not ok or len(endpoint) > 512:
        raise ValueError(f"not an endpoint a producer can dial: {endpoint[:100]!r}")
    return endpoint


def prepare_ipc_dir(endpoint: str) -> Path | None:
    """Make the directory of an ``ipc://`` endpoint private before binding in it: created with
    mode 0700 if missing, tightened to 0700 if it is ours. Any local process that can reach the
    socket file can send to it, so a directory another user owns, or a shared one (world-writable,
    like /tmp), is refused with ValueError: bind in a private subdirectory instead. Returns the
    directory; None for endpoints that are not file paths (tcp, abstract ``ipc://@name``, ``ipc://*``)."""
    scheme, _, path = endpoint.partition("://")
    if scheme != "ipc" or path.startswith("@") or path == "*" or not path:
        return None
    directory = Path(path).parent.resolve()
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"cannot bind {endpoint}: {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise ValueError(
            f"refusing to bind {endpoint}: {directory} belongs to uid {info.st_uid}, not us; "
            "bind in a directory of your own (mode 0700)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWOTH | stat.S_ISVTX):
        raise ValueError(
            f"refusing to bind {endpoint}: {directory} is shared (mode {mode:o}); bind in a private subdirectory"
        )
    if mode & 0o077:
        logger.warning("tightening %s from mode %o to 0700: it holds the sockets of %s", directory, mode, endpoint)
        os.chmod(directory, 0o700)
    return directory


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
        if config.heartbeat_ivl_ms:
            sock.setsockopt(zmq.HEARTBEAT_IVL, config.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, config.heartbeat_timeout_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, config.heartbeat_ttl_ms)
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
            prepare_ipc_dir(bind)
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
    """All frames of one message, unbounded: only for trusted peers. Prefer ``recv_bounded``."""
    return sock.recv_multipart(flags=flags, copy=False)


_trim_lock = threading.Lock()
_last_trim = -math.inf
_trim_timer: threading.Timer | None = None
_malloc_trim: Any = None


def _load_malloc_trim() -> Any:
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError) as e:
                logger.debug("malloc_trim unavailable: %s", e)
    return _malloc_trim


def release_freed_memory(
    *, min_interval_s: float = TRIM_INTERVAL_S, clock: Callable[[], float] = time.monotonic
) -> bool:
    """Give the memory malloc holds free back to the OS (glibc ``malloc_trim(0)``), at most once
    per ``min_interval_s``: a call inside the interval schedules one trim at its end (a timer
    thread), so the last of a burst of discarded messages is given back too. The frames of a
    discarded message are free but kept (``allocator.keep_freed_frames`` asks malloc to keep
    them); this undoes that, once. True if it trimmed now; always False where there is no glibc."""
    global _last_trim, _trim_timer
    if not _load_malloc_trim():
        return False
    with _trim_lock:
        now = clock()
        wait = _last_trim + min_interval_s - now
        if wait > 0:
            if _trim_timer is None:
                _trim_timer = threading.Timer(wait, _trim_later, kwargs={"clock": clock})
                _trim_timer.name, _trim_timer.daemon = "MallocTrim", True
                _trim_timer.start()
            return False
        _last_trim = now
    _malloc_trim(0)
    return True


def _trim_later(clock: Callable[[], float]) -> None:
    global _last_trim, _trim_timer
    with _trim_lock:
        _last_trim, _trim_timer = clock(), None
    _malloc_trim(0)


def _drain(sock: zmq.Socket, more: bool) -> tuple[int, int]:
    """Receive and drop the rest of a message, one frame at a time; (frames, bytes) dropped."""
    num_frames = num_bytes = 0
    while more:
        frame = sock.recv(copy=False)
        num_frames += 1
        num_bytes += len(frame)
        more = frame.more
        del frame
    return num_frames, num_bytes


def recv_bounded(
    sock: zmq.Socket,
    *,
    route_frames: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    kind_caps: Mapping[int, int] | None = None,
    flags: int = 0,
) -> list[zmq.Frame]:
    """Receive one message frame by frame: ``route_frames`` (ROUTER identities), kind, header,
    then the data frames, refused as soon as they outgrow what the header announces. The header
    is validated first (``codec.read_header``), so its announced size is already within
    ``max_message_bytes`` and ``kind_caps[kind]`` (bytes after the kind frame; None means
    ``KIND_CAPS``, ``{}`` no per-kind caps). A refused message's remaining frames are received and
    dropped one by one, never held, and ProtocolError says which limit and how big the message
    was; the error's ``route`` attribute holds the route frames (bytes), for logs.

    Returns the frames, route frames first, for ``decode``. With ``flags=zmq.NOBLOCK``, zmq.Again
    comes only before the first frame (ZeroMQ delivers a message's frames together)."""
    caps = KIND_CAPS if kind_caps is None else kind_caps
    frames: list[zmq.Frame] = [sock.recv(flags=flags, copy=False)]
    route: list[bytes] = []

    def refuse(error: ProtocolError) -> NoReturn:
        more = frames[-1].more
        kept = frames[len(route) :]
        kept_frames, kept_bytes = len(kept), sum(len(f) for f in kept)
        del kept
        frames.clear()
        dropped_frames, dropped_bytes = _drain(sock, more)
        total_bytes = kept_bytes + dropped_bytes
        if total_bytes >= TRIM_MIN_BYTES:
            release_freed_memory()
        error.route = route  # type: ignore[attr-defined]
        if dropped_frames:
            error.add_note(f"dropped the rest: {kept_frames + dropped_frames} frames, {total_bytes} bytes in all")
        raise error

    while len(frames) < route_frames + 2:
        if len(frames) == route_frames + 1:
            route = [bytes(f.buffer) for f in frames[:route_frames]]
            kind = bytes(frames[-1].buffer[:8])  # a copy: a view would pin the frame past refuse()
            if len(frames[-1]) != 1 or kind[0] not in MESSAGE_TYPES:
                refuse(ProtocolError(f"unknown message kind {kind!r} ({len(frames[-1])} bytes)"))
        if not frames[-1].more:
            refuse(ProtocolError(f"a message has at least {route_frames + 2} frames, got {len(frames)}"))
        frames.append(sock.recv(copy=False))
    kind_number = frames[route_frames].buffer[0]
    name = MESSAGE_TYPES[kind_number].__name__
    cap = caps.get(kind_number)
    header_bytes = len(frames[-1])
    if cap is not None and header_bytes > cap:
        refuse(ProtocolError(f"{name}: header of {header_bytes} bytes exceeds the {cap}-byte cap for {name}"))
    try:
        header = read_header(frames[route_frames], frames[-1], max_message_bytes=max_message_bytes)
    except ProtocolError as e:
        refuse(e)
    if cap is not None and header_bytes + header.nbytes > cap:
        refuse(
            ProtocolError(
                f"{name}: header announces {header_bytes + header.nbytes} bytes, exceeding the {cap}-byte cap for {name}"
            )
        )
    data_frames = data_bytes = 0
    while frames[-1].more:
        frames.append(sock.recv(copy=False))
        data_frames += 1
        data_bytes += len(frames[-1])
        if data_frames > header.num_frames or data_bytes > header.nbytes:
            refuse(
                ProtocolError(
                    f"{name}: data frames exceed what the header announces ({header.num_frames} frames, "
                    f"{header.nbytes} bytes): got {data_frames} frames, {data_bytes} bytes so far"
                )
            )
    return frames


def recv_message(
    sock: zmq.Socket,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    alloc: Allocator | None = None,
    copy: bool = True,
    flags: int = 0,
    num_route_frames: int = 0,
    kind_caps: Mapping[int, int] | None = None,
) -> tuple[list[bytes], Message]:
    """Receive (``recv_bounded``) and decode one message (``decode``'s ``alloc`` and ``copy``
    apply); returns (route frames, message). Raises ProtocolError."""
    frames = recv_bounded(
        sock, route_frames=num_route_frames, max_message_bytes=max_message_bytes, kind_caps=kind_caps, flags=flags
    )
    route = [bytes(f.buffer) for f in frames[:num_route_frames]]
    try:
        message = decode(frames[num_route_frames:], max_message_bytes=max_message_bytes, alloc=alloc, copy=copy)
    except ProtocolError as e:
        e.route = route  # type: ignore[attr-defined]
        raise
    return route, message
