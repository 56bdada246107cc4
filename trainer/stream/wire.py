"""The stream IO thread of one trainer rank: it owns both sockets (control ROUTER, data PULL), the
producers table and the lease table, and is the only one that puts samples into the replay buffer.

Each pass of ``_loop``: the loop's commands (``need``, ``consumed``, ``close``) from the queue;
data frames (``_on_data``: decode -> ``_verify`` -> reserve room -> ``ReplayBuffer.put``); control
messages (``_on_control``: handshake, lease failures, goodbyes); then ``_tick`` (expired leases,
silent producers, heartbeats) and ``_grant`` (leases as far ahead as the buffer's credit allows).

The loop side (``trainer.stream.source``) calls only ``start``, ``need``, ``consumed``, ``stop`` and
``snapshot``, and reads ``error``: an exception on this thread is kept there, and the buffer is
woken so a waiting ``fetch`` re-raises it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import zmq

from protocol.allocator import keep_freed_frames
from protocol.codec import DTYPES, all_finite, decode
from protocol.hsfile import write_hs_file
from protocol.messages import (
    EndOfStream,
    Error,
    Grant,
    Heartbeat,
    Hello,
    LeaseFailed,
    Message,
    ProtocolError,
    ProtocolVersionError,
    Sample,
)
from protocol.sockets import make_socket, rank_endpoints, recv_frames, send_message
from protocol.target import TargetSpec
from trainer.data.batch import TrainSample
from trainer.stream.config import StreamConfig
from trainer.stream.handshake import advertised_data_endpoint, hello_mismatch, refusal, version_refusal, welcome
from trainer.stream.leases import Key, LeaseTable
from trainer.stream.replay import Nonfinite, ReplayBuffer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Producer:
    route: bytes
    producer_id: str
    last_seen: float


def _drain(sock: zmq.Socket, handle: Callable[[list], None], limit: int = 64) -> None:
    """Handle up to ``limit`` waiting messages, so neither socket starves the other."""
    for _ in range(limit):
        try:
            frames = recv_frames(sock, flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(frames)


class StreamIO:
    """One rank's sockets and everything only the IO thread touches; see the module docstring."""

    def __init__(
        self,
        config: StreamConfig,
        target: TargetSpec,
        buffer: ReplayBuffer,
        *,
        lengths: Callable[[int], int],
        nbytes: Callable[[int], int],
        expected_tokens: Callable[[int], torch.Tensor] | None = None,
    ):
        self.config = config
        self.target = target
        self.buffer = buffer
        self._length_of = lengths
        self._nbytes = nbytes
        self._expected_tokens = expected_tokens
        self._dtype = DTYPES[target.dtype]
        self.leases = LeaseTable(lease_seconds=config.lease_seconds)
        self.producers: dict[bytes, _Producer] = {}
        self.stats = collections.Counter()
        self.error: BaseException | None = None
        self.control_endpoint, self.data_endpoint = rank_endpoints(config.endpoint, config.rank)
        self._uses: dict[Key, int] = {}  # planned uses left of every scheduled key
        self._last_heartbeat = 0.0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"StreamIO-r{config.rank}", daemon=True)
        keep_freed_frames()  # the buffer holds received frames: let malloc reuse them, not re-fault them

    # ---- called from the loop's thread ----------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Bind both sockets on the IO thread; TimeoutError if they are not up in ``timeout``."""
        if self.control_endpoint.startswith("ipc://"):
            Path(self.control_endpoint[len("ipc://") :]).parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("stream sockets did not come up")

    def need(self, epoch: int, sample_ids: Sequence[int]) -> None:
        self._commands.put(("need", epoch, list(sample_ids)))

    def consumed(self, keys: Sequence[Key]) -> None:
        self._commands.put(("consumed", list(keys)))

    def stop(self, reason: str) -> None:
        """Tell every producer the stream ended, close the sockets and end the thread."""
        if self._thread.is_alive():
            self._commands.put(("close", reason))
            self._thread.join(10)

    def snapshot(self) -> dict[str, float]:
        """Figures for the progress line, trackers and heartbeats."""
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
            "producers": float(len(self.producers)),
        }

    # ---- the thread -------------------------------------------------------------------------------

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
        except BaseException as e:  # surfaced to the loop by StreamSampleSource._check()
            logger.exception("stream IO thread failed")
            self.error = e
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

    # ---- data: frames -> verify -> buffer -------------------------------------------------------

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
            self.buffer.put(key, Nonfinite(message.sample_id))
            return
        sample = TrainSample(
            sample_id=message.sample_id,
            token_ids=message.token_ids,
            loss_mask=message.loss_mask.to(torch.bool),
            hidden_states=message.hidden_states,
        )
        if self.config.spill_dir:
            write_hs_file(
                self.config.spill_dir, message.sample_id, message.token_ids, message.hidden_states.contiguous()
            )
        self.buffer.put(key, sample)
        self.stats["samples"] += 1
        self.stats["bytes"] += message.nbytes

    def _verify(self, message: Sample) -> str:
        """Why a sample does not fit its prepared row or this rank's target ("" if it does)."""
        _, num_layers, hidden = message.hidden_states.shape
        expected_len = self._length_of(message.sample_id)
        if message.token_ids.shape[0] != expected_len:
            return f"{message.token_ids.shape[0]} tokens, the prepared row has {expected_len}"
        if num_layers != len(self.target.layer_ids) or hidden != self.target.hidden_size:
            return f"hidden states [T, {num_layers}, {hidden}], expected [T, {len(self.target.layer_ids)}, {self.target.hidden_size}]"
        if message.hidden_states.dtype != self._dtype:
            return f"dtype {message.hidden_states.dtype}, expected {self.target.dtype}"
        if self._expected_tokens is not None and not torch.equal(
            message.token_ids, self._expected_tokens(message.sample_id)
        ):
            return "token ids differ from the prepared dataset's row (producer reads another dataset?)"
        return ""

    def _fits(self, key: Key) -> bool:
        """Reserve the key's room in the buffer (a no-op if it already holds some)."""
        return self.buffer.reserve(key, self._nbytes(key[1]), uses=self._uses.get(key, 1))

    # ---- control: handshake, lease failures, goodbyes -------------------------------------------

    def _on_control(self, control: zmq.Socket, frames: list) -> None:
        if len(frames) < 2:
            self.stats["bad_messages"] += 1
            return
        route = bytes(frames[0].buffer)
        try:
            message = decode(frames[1:], max_message_bytes=1 << 20)
        except ProtocolVersionError as e:
            self.stats["bad_messages"] += 1
            self._send_raw(control, route, version_refusal(self.config.rank, e))
            return
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            logger.warning("dropped a malformed control message: %s", e)
            return
        producer = self.producers.get(route)
        if isinstance(message, Hello):
            problem = hello_mismatch(self.target, message)
            if problem:
                logger.error("refused producer %s: %s", message.producer_id, problem)
                self._send_raw(control, route, refusal(self.config.rank, problem))
                return
            if producer is not None:  # a re-hello (it restarted or reconnected): its old leases are void
                self.leases.producer_lost(route)
            self.producers[route] = _Producer(route=route, producer_id=message.producer_id, last_seen=time.monotonic())
            data_endpoint = advertised_data_endpoint(self.data_endpoint, self.config.advertise_host)
            self._send(control, route, welcome(self.config.rank, data_endpoint))
            logger.info("producer %s joined rank %d", message.producer_id, self.config.rank)
            return
        if producer is None:
            self._send_raw(control, route, Error(code="unknown_producer", message="say hello first"))
            return
        producer.last_seen = time.monotonic()
        if isinstance(message, LeaseFailed):
            returned = self.leases.fail(message.lease_id, message.sample_ids)
            logger.warning(
                "producer %s failed lease %d (%s): %d samples go back",
                producer.producer_id,
                message.lease_id,
                message.reason,
                len(returned),
            )
        elif isinstance(message, EndOfStream):
            self._lost(route, f"left: {message.reason}")
        elif isinstance(message, Error):
            logger.error("producer %s reports %s: %s", producer.producer_id, message.code, message.message)
        # LeaseDone and Heartbeat only refresh last_seen: completion is counted on the data channel.

    def _send(self, control: zmq.Socket, route: bytes, message: Message) -> bool:
        try:
            send_message(control, message, route=[route], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:  # its pipe is full right now; try again next tick
            return False
        except zmq.ZMQError as e:  # EHOSTUNREACH under ROUTER_MANDATORY: it is gone
            self._lost(route, f"unreachable ({e})")
            return False

    def _send_raw(self, control: zmq.Socket, route: bytes, message: Message) -> None:
        """Send to a peer that is not (or not yet) a producer: failures are nobody's business."""
        try:
            send_message(control, message, route=[route], flags=zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            pass

    def _broadcast(self, control: zmq.Socket, message: Message) -> None:
        for route in list(self.producers):
            self._send(control, route, message)

    def _lost(self, route: bytes, why: str) -> None:
        producer = self.producers.pop(route, None)
        if producer is not None:
            returned = self.leases.producer_lost(route)
            logger.warning("producer %s lost (%s); %d samples go to others", producer.producer_id, why, len(returned))

    # ---- time and grants --------------------------------------------------------------------------

    def _tick(self, control: zmq.Socket, now: float) -> None:
        # A producer whose lease ran out and that has not even sent heartbeats is dead, not slow:
        # stop granting to it at once instead of waiting for the silence timeout.
        expiring = [lease for lease in self.leases.leases.values() if lease.deadline <= now]
        late = {lease.producer for lease in expiring}
        for lease in expiring:
            who = self.producers.get(lease.producer)
            logger.warning(
                "lease %d of %s expired with %d of %d samples undelivered; granting them again",
                lease.lease_id,
                who.producer_id if who else "a departed producer",
                len(lease.outstanding),
                len(lease.sample_ids),
            )
        self.leases.expire()
        for route, producer in list(self.producers.items()):
            silent = now - producer.last_seen
            if silent > self.config.producer_timeout_seconds or (
                route in late and silent > 3 * self.config.heartbeat_seconds
            ):
                self._lost(route, f"silent for {silent:.0f}s")
        if now - self._last_heartbeat > self.config.heartbeat_seconds:
            self._last_heartbeat = now
            self._broadcast(
                control, Heartbeat(sender=f"trainer-{self.config.rank}", time_s=time.time(), stats=self.snapshot())
            )
        self._grant(control)

    def _grant(self, control: zmq.Socket) -> None:
        granted = True
        while granted and self.leases.num_pending:
            granted = False
            for route in sorted(self.producers, key=lambda r: self.leases.outstanding_for(r)):
                open_leases = sum(1 for lease in self.leases.leases.values() if lease.producer == route)
                if open_leases >= self.config.leases_per_producer:
                    continue
                lease = self.leases.take(route, self.config.samples_per_lease, fits=self._fits)
                if lease is None:
                    return  # nothing pending, or no room in the buffer
                grant = Grant(
                    lease_id=lease.lease_id,
                    epoch=lease.epoch,
                    sample_ids=list(lease.sample_ids),
                    deadline_s=self.config.lease_seconds,
                )
                if self._send(control, route, grant):
                    granted = True
                else:  # never delivered: back to pending now rather than at the lease deadline
                    self.leases.fail(lease.lease_id)
