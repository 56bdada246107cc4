"""The stream IO thread of one trainer rank: it owns both sockets (control ROUTER, data PULL), the
producers table and the lease table, and is the only one that puts samples into the replay buffer.

Each pass of ``_loop``: the loop's commands (``need``, ``consumed``, ``close``) from the queue;
data frames (``_on_data``: bounded receive -> decode -> ``admit`` (the grant's token) ->
``_verify`` -> ``ReplayBuffer.put``); control messages (``_on_control``: handshake, lease
failures, goodbyes); then ``_tick`` (expired leases, silent producers, heartbeats) and ``_grant``
(leases as far ahead as the buffer's credit allows).

Every peer is assumed hostile until it proves otherwise:
- Receiving is bounded (``recv_bounded``): a message larger than its header says, than its kind
  allows, or than ``max_message_bytes`` is drained and dropped frame by frame.
- A sample counts only if it carries the token of the live lease holding its key. Everything else
  is dropped and counted by reason (``dropped_*`` in ``snapshot``), with rate-limited log lines.
- A lease holder that sends a sample that does not fit its row (tokens, loss mask, shape, dtype)
  or holds NaN/Inf loses that key, which is granted again; only a key that fails the same way
  again (the target itself produces NaN, say) meets the --skip-nonfinite policy or stops training.
- Producers earn their share: a new producer is on probation (one sample, a short deadline); one
  that lets a lease expire goes back on probation and waits, twice as long after each expiry,
  before its next grant. The rank serves at most ``MAX_PRODUCERS`` producers.
- Text from peers reaches the log escaped, length-capped and rate-limited.

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

import torch
import zmq

from protocol.allocator import keep_freed_frames
from protocol.codec import DTYPES, all_finite, decode
from protocol.hsfile import write_hs_file
from protocol.logs import RateLimitedLog, peer_text
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
from protocol.sockets import make_socket, recv_bounded, send_message
from protocol.target import TargetSpec
from trainer.data.batch import TrainSample
from trainer.stream.config import StreamConfig
from trainer.stream.handshake import (
    hello_problems,
    refusal,
    refusal_reason,
    version_refusal,
    welcome,
)
from trainer.stream.leases import Key, LeaseTable
from trainer.stream.replay import Nonfinite, ReplayBuffer

logger = logging.getLogger(__name__)

MAX_PRODUCERS = 256  # producers one rank serves at once; more are refused
PROBATION_SECONDS = 15.0  # deadline of a producer's leases until it has delivered (capped by --lease-seconds)
MAX_BACKOFF_SECONDS = 300.0  # longest wait imposed on a producer whose leases keep expiring
MAX_STRIKES_PER_KEY = 3  # a key refused this often from lease holders is a data problem, not a peer's
CONTROL_MESSAGE_BYTES = 1 << 20  # largest control message a rank reads


@dataclasses.dataclass
class _Producer:
    route: bytes
    producer_id: str
    last_seen: float
    delivered: int = 0  # samples accepted since its last expiry: 0 = on probation
    expiries: int = 0  # leases expired in a row
    backoff_until: float = 0.0  # no grants before this time
    last_granted: float = 0.0

    @property
    def on_probation(self) -> bool:
        return self.delivered == 0


def _drain(receive: Callable[[], list], handle: Callable[[list], None], limit: int = 64) -> None:
    """Handle up to ``limit`` waiting messages, so neither socket starves the other."""
    for _ in range(limit):
        try:
            frames = receive()
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
        expected_row: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.config = config
        self.target = target
        self.buffer = buffer
        self._length_of = lengths
        self._nbytes = nbytes
        self._expected_row = expected_row  # (token ids, loss mask) of a prepared row
        self._dtype = DTYPES[target.dtype]
        self.leases = LeaseTable(lease_seconds=config.lease_seconds)
        self.producers: dict[bytes, _Producer] = {}
        self.stats = collections.Counter()
        self._log = RateLimitedLog(logger)
        self._strikes: collections.Counter[Key] = collections.Counter()  # refusals per key from lease holders
        self.error: BaseException | None = None
        self.control_endpoint, self.data_endpoint = config.bound_endpoints()
        # How producers dial us, and every rank of the trainer (gathered at start-up; alone: just us).
        self.advertised_control, self.advertised_data = config.advertised_endpoints()
        self.trainer_endpoints = list(config.trainer_endpoints) or [self.advertised_control]
        self._uses: dict[Key, int] = {}  # planned uses left of every scheduled key
        self._last_heartbeat = 0.0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"StreamIO-r{config.rank}", daemon=True)
        keep_freed_frames()  # the buffer holds received frames: let malloc reuse them, not re-fault them

    # ---- called from the loop's thread ----------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Bind both sockets on the IO thread; TimeoutError if they are not up in ``timeout``."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("stream sockets did not come up")

    def need(self, epoch: int, sample_ids: Sequence[int]) -> None:
        self._commands.put(("need", epoch, list(sample_ids)))

    def consumed(self, keys: Sequence[Key]) -> None:
        self._commands.put(("consumed", list(keys)))

    def abandoned(self, keys: Sequence[Key]) -> None:
        """Scheduled uses the loop will never fetch (``--time-budget`` ended the epoch early)."""
        self._commands.put(("abandoned", list(keys)))

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
            "duplicates": float(self.stats["dropped_duplicate"]),
            "dropped_samples": float(sum(v for k, v in self.stats.items() if k.startswith("dropped_"))),
            "refused_samples": float(self.stats["refused_samples"]),
            "leases_outstanding": float(len(self.leases.leases)),
            "leases_expired": float(self.leases.num_expired),
            "bad_messages": float(self.stats["bad_messages"]),
            "producers": float(len(self.producers)),
            **{k: float(v) for k, v in self.stats.items() if k.startswith("dropped_")},
        }

    # ---- the thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        control = data = None
        try:
            control = make_socket(ctx, zmq.ROUTER, self.config.socket, bind=self.control_endpoint)
            # No ROUTER_HANDOVER: a route belongs to one connection, which nobody can take over.
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
                _drain(lambda: self._receive(data, route_frames=0), self._on_data)
            if control in events:
                _drain(lambda: self._receive(control, route_frames=1), lambda frames: self._on_control(control, frames))
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
        elif command[0] in ("consumed", "abandoned"):
            done = []
            for key in command[1]:
                self._uses[key] -= 1
                if self._uses[key] == 0:
                    del self._uses[key]
                    done.append(key)
            if command[0] == "consumed":
                self.leases.forget(done)
            else:  # never fetched: stop asking for them and free their room
                self.leases.cancel(done)
                for key in done:
                    self.buffer.discard(key)

    # ---- data: frames -> verify -> buffer -------------------------------------------------------

    def _receive(self, sock: zmq.Socket, *, route_frames: int) -> list:
        """One message's frames, or [] if it broke a bound (drained and counted); zmq.Again if none.
        A control message in another protocol version is answered with a refusal saying so."""
        limit = self.config.socket.max_message_bytes if route_frames == 0 else CONTROL_MESSAGE_BYTES
        try:
            return recv_bounded(sock, route_frames=route_frames, max_message_bytes=limit, flags=zmq.NOBLOCK)
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            socket_name = "control" if route_frames else "data"
            if isinstance(e, ProtocolVersionError) and route_frames and getattr(e, "route", None):
                self._send_raw(sock, e.route[0], version_refusal(self.config.rank, e))
            self._log.warning(
                ("refused", socket_name), "dropped a message on the %s socket: %s", socket_name, peer_text(str(e))
            )
            return []

    def _drop(self, reason: str, key: Key, detail: str = "") -> None:
        """Count (and log, rate-limited) a sample that is not kept."""
        self.stats["dropped_" + reason.replace(" ", "_")] += 1
        if reason != "duplicate":  # a late copy after a re-grant is normal; the rest is worth a line
            self._log.warning(
                ("drop", reason), "dropped sample %s: %s%s", key, reason, f" ({detail})" if detail else ""
            )

    def _on_data(self, frames: list) -> None:
        if not frames:
            return
        try:
            # No copy: the hidden states stay in their frames until pack() copies them into a batch.
            message = decode(frames, max_message_bytes=self.config.socket.max_message_bytes, copy=False)
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            self._log.warning("malformed data", "dropped a malformed data message: %s", peer_text(str(e)))
            return
        if not isinstance(message, Sample):
            self.stats["bad_messages"] += 1
            self._log.warning("not a sample", "dropped a %s on the data socket", type(message).__name__)
            return
        key = (message.epoch, message.sample_id)
        reason = self.leases.admit(key, message.lease_id, message.token)
        if reason:
            self._drop(reason, key, f"lease {message.lease_id}" if reason in ("bad token", "not its lease") else "")
            return
        problem = self._verify(message) or ("" if all_finite(message.hidden_states) else "nonfinite")
        if problem:
            self._refuse(message, problem)
            return
        self._fits(key)  # granted keys hold their room already; this is a no-op then
        lease = self.leases.on_sample(*key)
        self._strikes.pop(key, None)
        holder = self.producers.get(lease.producer)
        if holder is not None:
            holder.delivered += 1
            holder.expiries = 0
        self._keep(key, message)

    def _keep(self, key: Key, message: Sample) -> None:
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

    def _refuse(self, message: Sample, problem: str) -> None:
        """A lease holder sent a sample that does not fit (or holds NaN/Inf): the key goes back to
        be granted again. A key refused ``MAX_STRIKES_PER_KEY`` times (NaN: twice) is not a peer's
        fault but the data's or the target's: then the policy applies."""
        key = (message.epoch, message.sample_id)
        self.stats["refused_samples"] += 1
        self._strikes[key] += 1
        holder = self.producers.get(self.leases.leases[message.lease_id].producer)
        who = holder.producer_id if holder else "a departed producer"
        nonfinite = problem == "nonfinite"
        if self._strikes[key] >= (2 if nonfinite else MAX_STRIKES_PER_KEY):
            if nonfinite and self.config.skip_nonfinite:
                self.leases.on_sample(*key)
                self._fits(key)
                self.buffer.put(key, Nonfinite(message.sample_id))
                logger.warning(
                    "sample %d (epoch %d) has NaN/Inf hidden states again; skipped (--skip-nonfinite)", *key[::-1]
                )
                return
            if nonfinite:
                raise ValueError(
                    f"sample {message.sample_id} (epoch {message.epoch}) has NaN/Inf hidden states from "
                    f"{self._strikes[key]} captures; check the target's dtype, or pass --skip-nonfinite to skip and count such samples"
                )
            raise ValueError(
                f"sample {message.sample_id} (epoch {message.epoch}) was refused {self._strikes[key]} times: {problem}"
            )
        self.leases.fail(message.lease_id, [message.sample_id])
        self._log.error(
            ("refused", who),
            "refused sample %s from %s: %s; granting it again",
            key,
            peer_text(who),
            "NaN/Inf hidden states" if nonfinite else problem,
        )

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
        if self._expected_row is not None:
            token_ids, loss_mask = self._expected_row(message.sample_id)
            if not torch.equal(message.token_ids, token_ids):
                return "token ids differ from the prepared dataset's row (producer reads another dataset?)"
            if not torch.equal(message.loss_mask.to(torch.bool), loss_mask.to(torch.bool)):
                return "loss mask differs from the prepared dataset's row"
        return ""

    def _fits(self, key: Key) -> bool:
        """Reserve the key's room in the buffer (a no-op if it already holds some)."""
        return self.buffer.reserve(key, self._nbytes(key[1]), uses=self._uses.get(key, 1))

    # ---- control: handshake, lease failures, goodbyes -------------------------------------------

    def _on_control(self, control: zmq.Socket, frames: list) -> None:
        if not frames:
            return
        if len(frames) < 2:
            self.stats["bad_messages"] += 1
            return
        route = bytes(frames[0].buffer)
        try:
            message = decode(frames[1:], max_message_bytes=CONTROL_MESSAGE_BYTES)
        except ProtocolVersionError as e:
            self.stats["bad_messages"] += 1
            self._send_raw(control, route, version_refusal(self.config.rank, e))
            return
        except ProtocolError as e:
            self.stats["bad_messages"] += 1
            self._log.warning("malformed control", "dropped a malformed control message: %s", peer_text(str(e)))
            return
        producer = self.producers.get(route)
        if isinstance(message, Hello):
            self._on_hello(control, route, producer, message)
            return
        if producer is None:
            self._send_raw(control, route, Error(code="unknown_producer", message="say hello first"))
            return
        producer.last_seen = time.monotonic()
        who = peer_text(producer.producer_id, 64)
        if isinstance(message, LeaseFailed):
            returned = self.leases.fail(message.lease_id, message.sample_ids, producer=route)
            if returned is None:
                self.stats["bad_messages"] += 1
                self._log.warning(
                    ("foreign lease", route),
                    "producer %s tried to fail lease %d, which it does not hold",
                    who,
                    message.lease_id,
                )
                return
            self._log.warning(
                ("lease failed", route),
                "producer %s failed lease %d (%s): %d samples go back",
                who,
                message.lease_id,
                peer_text(message.reason),
                len(returned),
            )
        elif isinstance(message, EndOfStream):
            self._lost(route, f"left: {peer_text(message.reason)}")
        elif isinstance(message, Error):
            self._log.error(
                ("error", route),
                "producer %s reports %s: %s",
                who,
                peer_text(message.code, 64),
                peer_text(message.message),
            )
        # LeaseDone and Heartbeat only refresh last_seen: completion is counted on the data channel.

    def _on_hello(self, control: zmq.Socket, route: bytes, producer: _Producer | None, hello: Hello) -> None:
        who = peer_text(hello.producer_id, 64)
        problems = hello_problems(self.target, hello)
        if not problems and producer is None and len(self.producers) >= MAX_PRODUCERS:
            problems = [("producers", f"rank {self.config.rank} already serves {MAX_PRODUCERS} producers")]
        if problems:
            self.stats["refused_hellos"] += 1
            self._log.error(
                ("refused hello",), "refused producer %s: %s", who, peer_text("; ".join(w for _, w in problems), 500)
            )
            authenticated = (
                self.config.socket.curve is not None and self.config.socket.curve.authorized_keys_dir is not None
            )
            self._send_raw(
                control, route, refusal(self.config.rank, refusal_reason(problems, authenticated=authenticated))
            )
            return
        if producer is not None:  # a re-hello (it restarted or reconnected): its old leases are void
            self.leases.producer_lost(route)
        self.producers[route] = _Producer(route=route, producer_id=hello.producer_id, last_seen=time.monotonic())
        self._send(control, route, welcome(self.config.rank, self.advertised_data, self.trainer_endpoints))
        self._log.info(("joined",), "producer %s joined rank %d", who, self.config.rank)

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
        expiring = [(lease, len(lease.outstanding)) for lease in self.leases.leases.values() if lease.deadline <= now]
        self.leases.expire()
        late = set()
        for lease, undelivered in expiring:
            late.add(lease.producer)
            who = self.producers.get(lease.producer)
            if who is not None:
                self._penalize(who, now)
            self._log.warning(
                ("expired", lease.producer),
                "lease %d of %s expired with %d of %d samples undelivered; granting them again",
                lease.lease_id,
                peer_text(who.producer_id, 64) if who else "a departed producer",
                undelivered,
                len(lease.sample_ids),
            )
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

    def _penalize(self, producer: _Producer, now: float) -> None:
        """A lease expired: back on probation, and no grants for a while (doubling each time)."""
        producer.delivered = 0
        producer.expiries += 1
        wait = min(self._probation_seconds * 2 ** (producer.expiries - 1), MAX_BACKOFF_SECONDS)
        producer.backoff_until = now + wait

    @property
    def _probation_seconds(self) -> float:
        return min(PROBATION_SECONDS, self.config.lease_seconds)

    def _grant(self, control: zmq.Socket) -> None:
        """Grant pending work, head of the plan first, to producers that have room: producers that
        deliver first (up to ``leases_per_producer`` leases of ``samples_per_lease``); then those
        on probation, one sample each with a short deadline, at most ``samples_per_lease`` samples
        on probation at once, the longest-waiting first."""
        now = time.monotonic()
        granted = True
        while granted and self.leases.num_pending:
            granted = False
            ready = [p for p in self.producers.values() if p.backoff_until <= now]
            proven = sorted(
                (p for p in ready if not p.on_probation), key=lambda p: self.leases.outstanding_for(p.route)
            )
            trial = sorted((p for p in ready if p.on_probation), key=lambda p: p.last_granted)
            on_trial = sum(self.leases.outstanding_for(p.route) for p in self.producers.values() if p.on_probation)
            for producer in proven + trial:
                if producer.on_probation:
                    if on_trial >= self.config.samples_per_lease or self.leases.leases_of(producer.route) >= 1:
                        continue
                    limit, seconds = 1, self._probation_seconds
                else:
                    if self.leases.leases_of(producer.route) >= self.config.leases_per_producer:
                        continue
                    limit, seconds = self.config.samples_per_lease, self.config.lease_seconds
                lease = self.leases.take(producer.route, limit, fits=self._fits, seconds=seconds)
                if lease is None:
                    return  # nothing pending, or no room in the buffer
                grant = Grant(
                    lease_id=lease.lease_id,
                    epoch=lease.epoch,
                    sample_ids=list(lease.sample_ids),
                    deadline_s=seconds,
                    token=lease.token,
                )
                if self._send(control, producer.route, grant):
                    granted = True
                    producer.last_granted = now
                    on_trial += len(lease.sample_ids) if producer.on_probation else 0
                else:  # never delivered: back to pending now rather than at the lease deadline
                    self.leases.fail(lease.lease_id)
