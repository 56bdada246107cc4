"""Trainer-side streaming: one rank's sockets, handshake, grants and replay buffer, as a sample
source the training loop reads from exactly like it reads hidden-state files.

::

      producers (DEALER + PUSH)                      trainer rank r
    +--------------------------+   control (ROUTER)   +------------------------------------------+
    | Hello, LeaseDone/Failed, | <------------------> | StreamIO thread                          |
    | Heartbeat                |   Welcome, Grant,    |   handshake check, LeaseTable,           |
    |                          |   Heartbeat, EOS     |   grants only what the buffer's credit   |
    |                          |                      |   holds, expiry -> grant again           |
    | Sample frames  ----------+--- data (PULL) ----> |   decode, verify, first copy wins  ------+--> ReplayBuffer
    +--------------------------+                      +------------------------------------------+        |
                                                       training loop: fetch(ids) blocks until present <---+

The IO thread owns both sockets; the loop talks to it through a command queue (``schedule``) and
the replay buffer (``fetch``). Errors on the IO thread are kept and re-raised in ``fetch``.

Keys are ``(epoch, sample_id)``. ``schedule(epoch, ids)`` says, in fetch order, which samples this
rank will need (an id listed k times is produced once and used k times); the loop schedules ahead
(validation, the next epoch) so producers never idle at epoch boundaries. ``fetch`` must then ask
for exactly the scheduled ids in that order, which it checks. Grants go out in that order, only as
far ahead as the buffer's byte budget allows, to whichever producer has room.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import zmq

from protocol.allocator import keep_freed_frames
from protocol.codec import DTYPES, all_finite, decode
from protocol.target import sample_nbytes
from protocol.hsfile import write_hs_file
from protocol.messages import (
    PROTOCOL_VERSION,
    EndOfStream,
    Error,
    Grant,
    Heartbeat,
    Hello,
    LeaseDone,
    LeaseFailed,
    Message,
    ProtocolError,
    ProtocolVersionError,
    Sample,
    Welcome,
)
from protocol.sockets import SocketConfig, make_socket, rank_endpoints, recv_frames, send_message
from trainer.data.batch import TrainSample
from trainer.data.sources import FetchResult, SampleSource
from trainer.stream.leases import LeaseTable
from trainer.stream.replay import BufferTimeout, ReplayBuffer

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_BYTES = 2 << 30


@dataclasses.dataclass(kw_only=True, frozen=True)
class TargetSpec:
    """What this trainer expects producers' captures to be; checked at handshake."""

    target_model: str
    layer_ids: list[int]  # all captured ids, last included
    hidden_size: int
    dtype: str
    vocab_size: int
    dataset_fingerprint: str = ""

    def mismatch(self, hello: Hello) -> str:
        """Why ``hello`` does not fit this trainer ("" if it does)."""
        problems = []
        if model_name(hello.target_model) != model_name(self.target_model):
            problems.append(f"target model {hello.target_model!r} != {self.target_model!r}")
        if list(hello.layer_ids) != list(self.layer_ids):
            problems.append(f"layer ids {hello.layer_ids} != {self.layer_ids} (--target-layer-ids)")
        if hello.hidden_size != self.hidden_size:
            problems.append(f"hidden size {hello.hidden_size} != {self.hidden_size}")
        if hello.dtype != self.dtype:
            problems.append(f"dtype {hello.dtype} != {self.dtype}")
        if hello.vocab_size != self.vocab_size:
            problems.append(f"vocab size {hello.vocab_size} != {self.vocab_size}")
        if hello.dataset_fingerprint and self.dataset_fingerprint and hello.dataset_fingerprint != self.dataset_fingerprint:
            problems.append(f"prepared dataset {hello.dataset_fingerprint} != {self.dataset_fingerprint} (--data)")
        return "; ".join(problems)


def model_name(name_or_path: str) -> str:
    """Hub id or local path -> the model's name, so `/models/Llama-3.1-8B` matches `meta-llama/Llama-3.1-8B`."""
    return Path(name_or_path.rstrip("/")).name


@dataclasses.dataclass(kw_only=True)
class StreamConfig:
    rank: int = 0
    endpoint: str  # --stream-endpoint: base, see rank_endpoints
    advertise_host: str | None = None  # host producers should push data to, when binding 0.0.0.0
    buffer_bytes: int = DEFAULT_BUFFER_BYTES  # --buffer-bytes
    lease_seconds: float = 120.0  # --lease-seconds
    samples_per_lease: int = 8
    leases_per_producer: int = 2
    heartbeat_seconds: float = 2.0
    producer_timeout_seconds: float = 30.0  # silent this long -> its leases go to others
    stall_timeout_seconds: float = 1800.0  # --stall-timeout: the loop gives up waiting for data
    skip_nonfinite: bool = False  # --skip-nonfinite: NaN/Inf samples are skipped and counted
    spill_dir: str | None = None  # --spill-dir: tee every received sample to hs_{i}.safetensors
    socket: SocketConfig = dataclasses.field(default_factory=lambda: SocketConfig(sndhwm=64, rcvhwm=8))

    def __post_init__(self) -> None:
        if self.buffer_bytes <= 0:
            raise ValueError(f"--buffer-bytes must be positive, got {self.buffer_bytes}")
        if self.lease_seconds <= 0 or self.stall_timeout_seconds <= 0:
            raise ValueError("--lease-seconds and --stall-timeout must be positive")
        if self.samples_per_lease < 1 or self.leases_per_producer < 1:
            raise ValueError("samples per lease and leases per producer must be >= 1")
        rank_endpoints(self.endpoint, self.rank)  # validates the form


@dataclasses.dataclass
class _Producer:
    route: bytes
    producer_id: str
    last_seen: float
    samples: int = 0
    bytes: int = 0


def _drain(sock: zmq.Socket, handle: Callable[[list], None], limit: int = 64) -> None:
    """Handle up to ``limit`` waiting messages, so neither socket starves the other."""
    for _ in range(limit):
        try:
            frames = recv_frames(sock, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames)


class _Nonfinite(TrainSample):
    """Tombstone stored for a sample whose hidden states held NaN/Inf (with --skip-nonfinite): it
    occupies no bytes and ``fetch`` reports its id as skipped."""

    def __init__(self, sample_id: int):
        empty = torch.empty(0)
        super().__init__(sample_id=sample_id, token_ids=empty, loss_mask=empty, hidden_states=empty)


class StreamSampleSource(SampleSource):
    """A ``trainer.data.sources.SampleSource`` fed by producers over ZeroMQ. Start it, ``schedule`` each
    epoch's needs, ``fetch`` per step, ``close`` at the end."""

    def __init__(
        self,
        config: StreamConfig,
        target: TargetSpec,
        *,
        lengths: Callable[[int], int],
        expected_tokens: Callable[[int], torch.Tensor] | None = None,
    ):
        self.config = config
        self.target = target
        self._length_of = lengths
        self._expected_tokens = expected_tokens
        self.buffer = ReplayBuffer(config.buffer_bytes)
        self.leases = LeaseTable(lease_seconds=config.lease_seconds)
        if target.dtype not in DTYPES:
            raise ValueError(f"target dtype {target.dtype!r} is not one the protocol carries")
        self._dtype = DTYPES[target.dtype]
        self._last_heartbeat = 0.0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._fetch_order: collections.deque[tuple[int, int]] = collections.deque()
        self._order_lock = threading.Lock()
        self._uses: dict[tuple[int, int], int] = {}
        self._producers: dict[bytes, _Producer] = {}
        self.stats = collections.Counter()
        self.control_endpoint, self.data_endpoint = rank_endpoints(config.endpoint, config.rank)
        self._thread = threading.Thread(target=self._run, name=f"StreamIO-r{config.rank}", daemon=True)
        keep_freed_frames()  # the buffer holds received frames: let malloc reuse them, not re-fault them

    # ---- loop side ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> StreamSampleSource:
        if self.control_endpoint.startswith("ipc://"):
            Path(self.control_endpoint[len("ipc://") :]).parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("stream sockets did not come up")
        self._check()
        return self

    def schedule(self, epoch: int, sample_ids: Sequence[int]) -> None:
        """This rank will fetch these samples of ``epoch`` next, in this order (repeats = reuse)."""
        ids = [int(s) for s in sample_ids]
        peak = self.peak_live_bytes(ids)
        if peak > self.buffer.budget_bytes:
            raise ValueError(
                f"rank {self.config.rank}: samples waiting for their next use need {peak / 1e6:.1f} MB at once but "
                f"--buffer-bytes is {self.buffer.budget_bytes / 1e6:.1f} MB; raise it or lower --reuse-window / --total-seq-len"
            )
        with self._order_lock:
            self._fetch_order.extend((epoch, sid) for sid in ids)
        self._commands.put(("need", epoch, ids))

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        return [self._length_of(s) for s in sample_ids]

    def _nbytes(self, sample_id: int) -> int:
        return sample_nbytes(self._length_of(sample_id), len(self.target.layer_ids), self.target.hidden_size, self._dtype)

    def peak_live_bytes(self, sample_ids: Sequence[int]) -> int:
        """Most bytes held at once when fetching ``sample_ids`` in order: a sample occupies the
        buffer from just before its first use until its last. Above the budget, the rank would
        wait forever for room that only its own future uses can free."""
        last_use = {sid: i for i, sid in enumerate(sample_ids)}
        live: set[int] = set()
        held = peak = 0
        for i, sid in enumerate(sample_ids):
            if sid not in live:
                live.add(sid)
                held += self._nbytes(sid)
                peak = max(peak, held)
            if last_use[sid] == i:
                live.discard(sid)
                held -= self._nbytes(sid)
        return peak

    def fetch(self, sample_ids: Sequence[int]) -> FetchResult:
        with self._order_lock:
            if len(self._fetch_order) < len(sample_ids):
                raise RuntimeError(f"fetch of {len(sample_ids)} samples but only {len(self._fetch_order)} are scheduled")
            keys = [self._fetch_order.popleft() for _ in sample_ids]
        if [sid for _, sid in keys] != [int(s) for s in sample_ids]:
            raise RuntimeError(f"fetch order diverged from the schedule: asked {list(sample_ids)[:8]}, scheduled {keys[:8]}")
        start = time.monotonic()
        try:
            got = self.buffer.take(keys, timeout=self.config.stall_timeout_seconds, check=self._check)
        except BufferTimeout as e:
            raise BufferTimeout(
                f"rank {self.config.rank}: {e} within --stall-timeout={self.config.stall_timeout_seconds}s; "
                f"{len(self._producers)} producers connected"
            ) from None
        self.stats["wait_s_x1000"] += int(1000 * (time.monotonic() - start))
        self._commands.put(("consumed", keys))
        samples = [s for s in got if not isinstance(s, _Nonfinite)]
        skipped = [sid for sid, s in zip(sample_ids, got) if isinstance(s, _Nonfinite)]
        return FetchResult(samples=samples, skipped=skipped)

    def snapshot(self) -> dict[str, float]:
        """Figures for the progress line and trackers."""
        return {
            "buffer_bytes": float(self.buffer.ledger.used_bytes),
            "buffer_fill": self.buffer.ledger.used_bytes / self.buffer.budget_bytes,
            "stored_bytes": float(self.buffer.stored_bytes),
            "samples_in": float(self.stats["samples"]),
            "bytes_in": float(self.stats["bytes"]),
            "duplicates": float(self.leases.num_duplicates),
            "leases_outstanding": float(len(self.leases.leases)),
            "leases_expired": float(self.leases.num_expired),
            "bad_messages": float(self.stats["bad_messages"]),
            "producers": float(len(self._producers)),
        }

    def producer_rates(self) -> dict[str, int]:
        return {p.producer_id: p.samples for p in list(self._producers.values())}

    def close(self, reason: str = "training finished") -> None:
        if self._thread.is_alive():
            self._commands.put(("close", reason))
            self._stop.set()
            self._thread.join(10)

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"stream IO on rank {self.config.rank} failed: {self._error}") from self._error

    # ---- IO thread --------------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        control = data = None
        try:
            control = make_socket(ctx, zmq.ROUTER, self.config.socket, bind=self.control_endpoint)
            control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted producer takes over its identity
            control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished producer raises
            data = make_socket(ctx, zmq.PULL, self.config.socket, bind=self.data_endpoint)
            self._ready.set()
            self._loop(control, data)
        except BaseException as e:  # surfaced to the loop by _check()
            logger.exception("stream IO thread failed")
            self._error = e
            self.buffer.wake()
        finally:
            self._ready.set()
            for sock in (control, data):
                if sock is not None:
                    sock.close(linger=500)

    def _loop(self, control: zmq.Socket, data: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(data, zmq.POLLIN)
        last_tick = 0.0
        while True:
            events = dict(poller.poll(50))
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "close":
                    self._broadcast(control, EndOfStream(reason=command[1]))
                    return
                self._command(command)
            if data in events:
                _drain(data, self._on_data)
            if control in events:
                _drain(control, lambda frames: self._on_control(control, frames))
            now = time.monotonic()
            if now - last_tick > 0.1:
                last_tick = now
                self._tick(control, now)
            elif events:  # a delivery or a new producer may have freed room or made work: grant now
                self._grant(control)

    def _command(self, command: tuple) -> None:
        if command[0] == "need":
            _, epoch, ids = command
            fresh = []
            for sid in ids:
                key = (epoch, int(sid))
                if key not in self._uses:
                    fresh.append(key)
                    self._uses[key] = 0
                self._uses[key] += 1
            self.leases.need(fresh)
        elif command[0] == "consumed":
            done = []
            for key in command[1]:
                self._uses[key] -= 1
                if self._uses[key] == 0:
                    del self._uses[key]
                    done.append(key)
            self.leases.forget(done)

    def _send(self, control: zmq.Socket, route: bytes, message: Message) -> bool:
        try:
            send_message(control, message, route=[route], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # its pipe is full right now; try again next tick
            return False
        except zmq.ZMQError as e:  # EHOSTUNREACH under ROUTER_MANDATORY: it is gone
            self._lost(route, f"unreachable ({e})")
            return False

    def _broadcast(self, control: zmq.Socket, message: Message) -> None:
        for route in list(self._producers):
            self._send(control, route, message)

    def _lost(self, route: bytes, why: str) -> None:
        producer = self._producers.pop(route, None)
        if producer is not None:
            returned = self.leases.producer_lost(route)
            logger.warning("producer %s lost (%s); %d samples go to others", producer.producer_id, why, len(returned))

    def _on_control(self, control: zmq.Socket, frames: list) -> None:
        if len(frames) < 2:
            self.stats["bad_messages"] += 1
            return
        route = bytes(frames[0].buffer)
        try:
            message = decode(frames[1:], max_message_bytes=1 << 20)
        except ProtocolVersionError as e:
            self.stats["bad_messages"] += 1
            self._reply_refusal(control, route, f"{e}; upgrade draftstream so both sides speak {PROTOCOL_VERSION}")
            return
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            logger.warning("dropped a malformed control message: %s", e)
            return
        producer = self._producers.get(route)
        if isinstance(message, Hello):
            problem = self.target.mismatch(message)
            if problem:
                logger.error("refused producer %s: %s", message.producer_id, problem)
                self._reply_refusal(control, route, problem)
                return
            if producer is not None:  # a re-hello (it restarted or reconnected): its old leases are void
                self.leases.producer_lost(route)
            self._producers[route] = _Producer(route=route, producer_id=message.producer_id, last_seen=time.monotonic())
            self._send(control, route, Welcome(accepted=True, trainer_rank=self.config.rank, data_endpoint=self._advertised_data()))
            logger.info("producer %s joined rank %d", message.producer_id, self.config.rank)
            return
        if producer is None:
            self._send_raw(control, route, Error(code="unknown_producer", message="say hello first"))
            return
        producer.last_seen = time.monotonic()
        if isinstance(message, LeaseFailed):
            returned = self.leases.fail(message.lease_id, message.sample_ids)
            logger.warning("producer %s failed lease %d (%s): %d samples go back", producer.producer_id, message.lease_id, message.reason, len(returned))
        elif isinstance(message, EndOfStream):
            self._lost(route, f"left: {message.reason}")
        elif isinstance(message, Error):
            logger.error("producer %s reports %s: %s", producer.producer_id, message.code, message.message)
        # LeaseDone and Heartbeat only refresh last_seen: completion is counted on the data channel.

    def _send_raw(self, control: zmq.Socket, route: bytes, message: Message) -> None:
        try:
            send_message(control, message, route=[route], flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            pass

    def _reply_refusal(self, control: zmq.Socket, route: bytes, reason: str) -> None:
        self._send_raw(control, route, Welcome(accepted=False, reason=reason, trainer_rank=self.config.rank))

    def _advertised_data(self) -> str:
        if self.config.advertise_host and self.data_endpoint.startswith("tcp://"):
            port = self.data_endpoint.rsplit(":", 1)[1]
            return f"tcp://{self.config.advertise_host}:{port}"
        return self.data_endpoint

    def _on_data(self, frames: list) -> None:
        try:
            # No copy: the hidden states stay in their frames until pack() copies them into a batch.
            message = decode(frames, max_message_bytes=self.config.socket.max_message_bytes, copy=False)
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            logger.warning("dropped a malformed data message: %s", e)
            return
        if not isinstance(message, Sample):
            self.stats["bad_messages"] += 1
            return
        key = (message.epoch, message.sample_id)
        if not self.leases.is_needed(key):
            self.leases.num_duplicates += 1
            return
        problem = self._verify(message)
        if problem:
            self.stats["bad_messages"] += 1
            logger.error("rejected sample %s: %s", key, problem)
            return
        nonfinite = not all_finite(message.hidden_states)
        if nonfinite and not self.config.skip_nonfinite:
            raise ValueError(
                f"sample {message.sample_id} (epoch {message.epoch}) has NaN/Inf hidden states; "
                "check the target's dtype, or pass --skip-nonfinite to skip and count such samples"
            )
        if not self._fits(key):
            return  # arrived unasked (trainer restarted) and there is no room yet: it will be granted later
        self.leases.on_sample(*key)
        if nonfinite:
            self.stats["nonfinite"] += 1
            self.buffer.put(key, _Nonfinite(message.sample_id))
            return
        sample = TrainSample(
            sample_id=message.sample_id,
            token_ids=message.token_ids,
            loss_mask=message.loss_mask.to(torch.bool),
            hidden_states=message.hidden_states,
        )
        if self.config.spill_dir:
            write_hs_file(self.config.spill_dir, message.sample_id, message.token_ids, message.hidden_states.contiguous())
        self.buffer.put(key, sample)
        self.stats["samples"] += 1
        self.stats["bytes"] += message.nbytes

    def _verify(self, message: Sample) -> str:
        _, num_layers, hidden = message.hidden_states.shape
        expected_len = self._length_of(message.sample_id)
        if message.token_ids.shape[0] != expected_len:
            return f"{message.token_ids.shape[0]} tokens, the prepared row has {expected_len}"
        if num_layers != len(self.target.layer_ids) or hidden != self.target.hidden_size:
            return f"hidden states [T, {num_layers}, {hidden}], expected [T, {len(self.target.layer_ids)}, {self.target.hidden_size}]"
        if message.hidden_states.dtype != self._dtype:
            return f"dtype {message.hidden_states.dtype}, expected {self.target.dtype}"
        if self._expected_tokens is not None and not torch.equal(message.token_ids, self._expected_tokens(message.sample_id)):
            return "token ids differ from the prepared dataset's row (producer reads another dataset?)"
        return ""

    def _tick(self, control: zmq.Socket, now: float) -> None:
        # A producer whose lease ran out and that has not even sent heartbeats is dead, not slow:
        # stop granting to it at once instead of waiting for the silence timeout.
        expiring = [lease for lease in self.leases.leases.values() if lease.deadline <= now]
        late = {lease.producer for lease in expiring}
        for lease in expiring:
            who = self._producers.get(lease.producer)
            logger.warning("lease %d of %s expired with %d of %d samples undelivered; granting them again",
                           lease.lease_id, who.producer_id if who else "a departed producer", len(lease.outstanding), len(lease.sample_ids))
        self.leases.expire()
        for route, producer in list(self._producers.items()):
            silent = now - producer.last_seen
            if silent > self.config.producer_timeout_seconds or (route in late and silent > 3 * self.config.heartbeat_seconds):
                self._lost(route, f"silent for {silent:.0f}s")
        if now - self._last_heartbeat > self.config.heartbeat_seconds:
            self._last_heartbeat = now
            self._broadcast(control, Heartbeat(sender=f"trainer-{self.config.rank}", time_s=time.time(), stats=self.snapshot()))
        self._grant(control)

    def _fits(self, key: tuple[int, int]) -> bool:
        """Reserve the key's room in the buffer (a no-op if it already holds some)."""
        return self.buffer.reserve(key, self._nbytes(key[1]), uses=self._uses.get(key, 1))

    def _grant(self, control: zmq.Socket) -> None:
        granted = True
        while granted and self.leases.num_pending:
            granted = False
            for route in sorted(self._producers, key=lambda r: self.leases.outstanding_for(r)):
                open_leases = sum(1 for lease in self.leases.leases.values() if lease.producer == route)
                if open_leases >= self.config.leases_per_producer:
                    continue
                lease = self.leases.take(route, self.config.samples_per_lease, fits=self._fits)
                if lease is None:
                    return  # nothing pending, or no room in the buffer
                grant = Grant(lease_id=lease.lease_id, epoch=lease.epoch, sample_ids=list(lease.sample_ids), deadline_s=self.config.lease_seconds)
                if self._send(control, route, grant):
                    granted = True
                else:  # never delivered: back to pending now rather than at the lease deadline
                    self.leases.fail(lease.lease_id)
