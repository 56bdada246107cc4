"""Producer side of streaming: take grants from trainer ranks, capture, push samples.

::

    trainer rank 0 control (ROUTER) <-- DEALER --+                      +-- PUSH --> rank 0 data (PULL)
    trainer rank 1 control (ROUTER) <-- DEALER --+-- StreamProducer  ---+-- PUSH --> rank 1 data (PULL)
                                                     grants -> work queue -> backend.capture()

Each ``--connect`` address is one trainer, reached through one of its ranks (rank 0's, normally):
that rank's ``Welcome`` lists every rank of the trainer, wherever it runs, and the producer greets
the others there (``producer.trainers``: which ranks exist and where). ``--num-ranks``, when given,
is checked against that list. A trainer that restarts is found again through the same address.

One thread: it polls the control sockets, keeps a FIFO of granted work, runs the target on a
batch of granted rows (across grants and ranks, up to the backend's token budget), pushes each
sample to the data endpoint of the rank that granted it, and reports ``LeaseDone``. Memory on
the trainer is bounded by its grants; here by the backend's batch, the samples granted but not
yet taken by their rank, and the share window.

Several trainers (jobs) at once: a row granted by several jobs is captured once per batch, and
the capture is kept in a byte-bounded ``producer.window.CaptureWindow`` for the other jobs (those
that have not ended the stream, or not yet answered), which are answered from there (one capture, several trainings). Pushes never
block: a sample its rank cannot take yet waits in that rank's backlog while the producer serves
everyone else, so a job that is slow, restarting or gone never stalls another; a rank that takes
nothing for ``send_timeout_seconds`` is dropped (its leases die with it) and greeted again.

With a ``PushingBackend`` (vLLM) this process holds no tensors: it submits the granted rows with
their rank's data endpoint, and the engine's connector pushes the samples there. Submission does not
wait for the engine: up to ``max_batches_in_flight`` batches of granted rows are in the engine at
once (at least the backend's ``min_in_flight_rows``), so it runs the next rows while this loop takes
grants and results; a lease is done when every row's result is back. A row the engine refuses, or a
delivery the connector reports failed, goes back to its rank as ``LeaseFailed``.

A rank that restarts answers our messages with ``Error(unknown_producer)`` (or stays silent past
``trainer_timeout_seconds``): we drop its queued grants, whose leases died with it, and say hello
again; ZeroMQ reconnects the sockets by itself. The run ends when every rank sent ``EndOfStream``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import zmq

from producer.backend import CaptureBackend, CaptureRow, PushingBackend, PushJob
from producer.trainers import Rank, Ranks, welcome_problem
from producer.window import CaptureWindow
from protocol.codec import DEFAULT_CHUNK_BYTES, DTYPES
from protocol.messages import (
    EndOfStream,
    Error,
    Grant,
    Heartbeat,
    LeaseDone,
    LeaseFailed,
    ProtocolError,
    Sample,
    Welcome,
)
from protocol.sockets import SocketConfig, rank_endpoints, recv_message, send_message
from protocol.target import TargetSpec, sample_nbytes

logger = logging.getLogger(__name__)

HELLOS_BEFORE_RECONNECT = 3  # unanswered hellos (2 s apart) before the control socket is recreated


@dataclasses.dataclass(kw_only=True)
class StreamClientConfig:
    producer_id: str
    connect: list[
        str
    ]  # --connect: one address per trainer, its rank 0's stream endpoint (ipc://DIR or tcp://HOST:PORT)
    num_ranks: int | None = None  # --num-ranks: the ranks each trainer must have (None: whatever it lists)
    max_batch_tokens: int = 8192  # rows captured together, across grants
    max_batches_in_flight: int = 4  # pushing backends: granted rows submitted ahead, in batches of max_batch_tokens
    heartbeat_seconds: float = 2.0
    trainer_timeout_seconds: float = 30.0  # silent rank -> say hello again
    handshake_timeout_seconds: float = 600.0  # --handshake-timeout: no rank welcomed us by then -> exit
    send_timeout_seconds: float = 120.0  # a data push blocked this long -> the rank is gone
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    share_window_bytes: int = 2 << 30  # --share-window-bytes: captures kept for other jobs (0: none)
    socket: SocketConfig = dataclasses.field(default_factory=lambda: SocketConfig(sndhwm=8, rcvhwm=64))

    def __post_init__(self) -> None:
        if not self.connect:
            raise ValueError("--connect needs at least one trainer endpoint")
        if self.num_ranks is not None and self.num_ranks < 1:
            raise ValueError(f"--num-ranks must be >= 1, got {self.num_ranks}")
        if self.share_window_bytes < 0:
            raise ValueError(f"--share-window-bytes must be >= 0, got {self.share_window_bytes}")
        if self.max_batches_in_flight < 1:
            raise ValueError(f"max_batches_in_flight must be >= 1, got {self.max_batches_in_flight}")
        for base in self.connect:
            rank_endpoints(base, 0)


@dataclasses.dataclass
class _Work:
    rank: Rank
    grant: Grant
    remaining: collections.deque  # sample ids not yet captured
    sent: int = 0
    failed: int = 0  # given back with LeaseFailed (pushing backends)


@dataclasses.dataclass
class StreamReport:
    samples: int = 0  # pushed to a rank (each job's copy counts)
    bytes: int = 0
    leases: int = 0
    dropped_leases: int = 0
    failed_samples: int = 0
    forwards: int = 0  # rows the target ran for (holding backends)
    shared_in_batch: int = 0  # pushes served by a capture made in the same batch for another grant
    exit_code: int = 0


class StreamProducer:
    """Serve grants from one or several trainer ranks until they all say the run is over.

    ``spec`` is what the ``Hello`` announces: by default ``backend.describe()``; the ``produce``
    command adds the prepared dataset's fingerprint to it."""

    def __init__(
        self,
        config: StreamClientConfig,
        backend: CaptureBackend | PushingBackend,
        row: Callable[[int], CaptureRow],
        *,
        spec: TargetSpec | None = None,
        stop: threading.Event | None = None,
    ):
        self.config = config
        self.backend = backend
        self.row = row
        self.stop = stop or threading.Event()
        self.spec = spec or backend.describe()
        self.hello = self.spec.hello(config.producer_id)
        self.report = StreamReport()
        self._work: collections.deque[_Work] = collections.deque()
        self._pushing = isinstance(backend, PushingBackend)
        # ticket -> (rank, lease id, sample id) of samples the connector has not reported on yet;
        # bounded: a connector that cannot reach us never reports, and leases expire anyway.
        self._tickets: collections.OrderedDict[int, tuple[Rank, int, int]] = collections.OrderedDict()
        # ticket -> (work, row) submitted to a pushing backend, until its result is back
        self._in_flight: dict[int, tuple[_Work, CaptureRow]] = {}
        self._in_flight_tokens = 0
        self.window = CaptureWindow(0 if self._pushing else config.share_window_bytes)
        self._ranks: Ranks | None = None  # while run() runs

    def run(self) -> StreamReport:
        ctx = zmq.Context()
        self._ranks = ranks = Ranks(ctx, self.config.socket)
        try:
            for base in self.config.connect:
                ranks.add_trainer(base, door=rank_endpoints(base, 0)[0])
            self._serve()
        finally:
            ranks.close(linger=2000)  # flush what was pushed
            ctx.term()
        return self.report

    def _serve(self) -> None:
        ranks, poller = self._ranks.all, self._ranks.poller
        started = time.monotonic()
        last_beat = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            for rank in ranks:
                stale = rank.welcomed and now - rank.last_heard > self.config.trainer_timeout_seconds
                if stale:
                    logger.warning("rank %s silent for %.0fs; saying hello again", rank.name, now - rank.last_heard)
                    self._forget(rank)
                if not rank.welcomed and not rank.refused and not rank.done and now - rank.last_hello > 2.0:
                    if rank.hellos_unanswered >= HELLOS_BEFORE_RECONNECT:
                        self._ranks.reconnect(rank)
                    if _writable(rank.control):
                        send_message(rank.control, self.hello, flags=zmq.NOBLOCK)
                    rank.last_hello = now
                    rank.hellos_unanswered += 1
            if all(rank.done or rank.refused for rank in ranks):
                refused = [r for r in ranks if r.refused]
                if refused and len(refused) == len(ranks):
                    logger.error("every trainer rank refused this producer: %s", refused[0].refused)
                    self.report.exit_code = 2
                return
            if not any(r.welcomed for r in ranks) and now - started > self.config.handshake_timeout_seconds:
                raise TimeoutError(
                    f"no trainer rank answered within {self.config.handshake_timeout_seconds:.0f}s at "
                    f"{[r.control_endpoint for r in ranks]}; is the trainer running? (--handshake-timeout)"
                )
            if now - last_beat > self.config.heartbeat_seconds:
                last_beat = now
                for rank in ranks:
                    if rank.welcomed and _writable(rank.control):
                        send_message(
                            rank.control,
                            Heartbeat(sender=self.config.producer_id, time_s=time.time()),
                            flags=zmq.NOBLOCK,
                        )
            busy = self._in_flight or any(r.backlog for r in ranks)
            events = dict(poller.poll(0 if self._ready() else 10 if busy else 100))
            for rank in list(ranks):  # a Welcome may add or drop ranks
                while rank in ranks and rank.control in events:
                    try:
                        _, message = recv_message(rank.control, flags=zmq.NOBLOCK, max_message_bytes=1 << 20)
                    except zmq.Again:
                        break
                    except ProtocolError as e:
                        logger.warning("malformed message from rank %s: %s", rank.name, e)
                        continue
                    if isinstance(message, Welcome) and message.accepted:
                        self._on_welcome(rank, message)
                    else:
                        self._on_control(rank, message)
            if self._pushing:
                self._on_results()
                self._on_reports()
            for rank in ranks:
                if rank.backlog:
                    self._flush(rank)
            self._finish_leases()
            if self._ready():
                self._capture_some()

    def _ready(self) -> bool:
        """Granted rows wait, and (pushing) the backend has room for another batch."""
        if not any(w.remaining for w in self._work):
            return False
        if not self._pushing:
            return True
        depth = self.config.max_batches_in_flight
        return self._in_flight_tokens <= (depth - 1) * self.config.max_batch_tokens or len(self._in_flight) < getattr(
            self.backend, "min_in_flight_rows", 0
        )

    def _forget(self, rank: Rank) -> None:
        """The rank restarted or vanished: its leases are void; greet it again."""
        rank.backlog.clear()
        rank.stuck_since = None
        dropped = [w for w in self._work if w.rank is rank]
        self._work = collections.deque(w for w in self._work if w.rank is not rank)
        self.report.dropped_leases += len(dropped)
        rank.welcomed = False
        rank.last_hello = 0.0

    def _on_welcome(self, rank: Rank, message: Welcome) -> None:
        """Accepted: connect the data socket, and learn where the trainer's other ranks are."""
        rank.last_heard = time.monotonic()
        rank.hellos_unanswered = 0
        problem = welcome_problem(message, self.config.num_ranks)
        if problem:
            self._ranks.refuse(rank.trainer, problem)
            logger.error("trainer %s: %s; not serving it", rank.trainer.base, problem)
            return
        rank.index = message.trainer_rank
        self._ranks.connect_data(rank, message.data_endpoint, holding=not self._pushing)
        rank.welcomed = True
        logger.info("rank %s welcomed us; data -> %s", rank.name, message.data_endpoint)
        self._ranks.adopt(rank, list(message.trainer_endpoints) or [rank.control_endpoint], gone=self._forget)

    def _on_control(self, rank: Rank, message) -> None:
        rank.last_heard = time.monotonic()
        rank.hellos_unanswered = 0
        if isinstance(message, Welcome):  # a refusal (acceptances go to _on_welcome)
            rank.refused = message.reason
            logger.error("rank %s refused us: %s", rank.name, message.reason)
        elif isinstance(message, Grant):
            if rank.welcomed:
                self._work.append(_Work(rank=rank, grant=message, remaining=collections.deque(message.sample_ids)))
        elif isinstance(message, EndOfStream):
            logger.info("rank %s ended the stream: %s", rank.name, message.reason)
            rank.done = True
            rank.backlog.clear()
            self._work = collections.deque(w for w in self._work if w.rank is not rank)
            if rank.trainer not in self._ranks.expected_jobs():
                self.window.forget_job(rank.trainer)
        elif isinstance(message, Error):
            if message.code == "unknown_producer":
                self._forget(rank)  # the trainer restarted
            else:
                logger.error("rank %s reports %s: %s", rank.name, message.code, message.message)

    def _capture_some(self) -> None:
        """One backend batch of granted rows, pushed to their ranks; finished leases reported."""
        rows: list[tuple[_Work, CaptureRow]] = []
        tokens = 0
        for work in self._work:
            while work.remaining:
                row = self.row(work.remaining[0])
                if rows and tokens + len(row.input_ids) > self.config.max_batch_tokens:
                    break
                work.remaining.popleft()
                rows.append((work, row))
                tokens += len(row.input_ids)
            if work.remaining:
                break
        try:
            if self._pushing:
                self._submit(rows)
            else:
                self._capture_and_push(rows)
        except Exception as e:
            for work in {id(w): w for w, _ in rows}.values():
                self._fail(work, f"{type(e).__name__}: {e}")
            raise
        self._finish_leases()

    def _capture_and_push(self, rows: list[tuple[_Work, CaptureRow]]) -> None:
        """Answer each granted row from the share window, or capture it: once per batch, however
        many grants (jobs, or this job's next epoch) hold it. Fresh captures are kept for the other
        jobs still expected."""
        due: list[tuple[_Work, CaptureRow]] = []
        for work, row in rows:
            shared = self.window.take(int(row.sample_id), work.rank.trainer)
            if shared is not None:
                self._push(work, self._for_grant(shared, work.grant))
            else:
                due.append((work, row))
        # A row due under several grants (other jobs, or this job's next epoch) runs once.
        unique: dict[int, CaptureRow] = {}
        grants: dict[int, list[_Work]] = collections.defaultdict(list)
        for work, row in due:
            unique.setdefault(int(row.sample_id), row)
            grants[int(row.sample_id)].append(work)
        if not unique:
            return
        expected = self._ranks.expected_jobs()
        # Samples are pushed as the backend yields them (it may still be copying the next ones).
        for row, sample in zip(unique.values(), self.backend.capture(list(unique.values())), strict=True):
            if sample.sample_id != row.sample_id:
                raise RuntimeError(f"backend returned row {sample.sample_id} where row {row.sample_id} was due")
            self.report.forwards += 1
            works = grants[int(row.sample_id)]
            self.report.shared_in_batch += len(works) - 1
            for work in works:
                self._push(work, self._for_grant(sample, work.grant))
            if len(expected) > 1:
                self.window.keep(sample, expected - {work.rank.trainer for work in works})

    @staticmethod
    def _for_grant(sample: Sample, grant: Grant) -> Sample:
        """``sample`` answering ``grant``: its epoch, lease and token (the tensors are shared)."""
        return dataclasses.replace(sample, epoch=grant.epoch, lease_id=grant.lease_id, token=grant.token)

    def _finish_leases(self) -> None:
        """``LeaseDone`` for the grants whose every row is pushed (or failed)."""
        finished = [w for w in self._work if not w.remaining and w.sent + w.failed == len(w.grant.sample_ids)]
        if not finished:
            return
        done = {id(w) for w in finished}
        self._work = collections.deque(w for w in self._work if id(w) not in done)
        for work in finished:
            if work.rank.welcomed and _writable(work.rank.control):
                send_message(
                    work.rank.control, LeaseDone(lease_id=work.grant.lease_id, num_samples=work.sent), flags=zmq.NOBLOCK
                )
            self.report.leases += 1

    def _push(self, work: _Work, sample: Sample) -> None:
        """Queue ``sample`` for its rank and send what the rank can take now."""
        rank = work.rank
        if not rank.welcomed or rank.data is None:
            return
        rank.backlog.append((work, sample))
        self._flush(rank)

    def _flush(self, rank: Rank) -> None:
        """Send the rank's backlog in order, without blocking: a full pipe is back-pressure from a
        busy rank (the rest waits for the next pass); one that takes nothing for
        ``send_timeout_seconds`` is gone."""
        while rank.backlog:
            if rank.data is None:  # the rank went away meanwhile: its leases died with it
                rank.backlog.clear()
                return
            work, sample = rank.backlog[0]
            try:
                send_message(rank.data, sample, chunk_bytes=self.config.chunk_bytes, flags=zmq.NOBLOCK)
            except zmq.Again:
                now = time.monotonic()
                if rank.stuck_since is None:
                    rank.stuck_since = now
                elif now - rank.stuck_since >= self.config.send_timeout_seconds:
                    logger.warning(
                        "rank %s took no data for %.0fs; dropping its work", rank.name, self.config.send_timeout_seconds
                    )
                    self._forget(rank)
                return
            rank.backlog.popleft()
            rank.stuck_since = None
            work.sent += 1
            self.report.samples += 1
            self.report.bytes += sample.nbytes

    def _fail(self, work: _Work, reason: str) -> None:
        self._fail_ids(work.rank, work.grant.lease_id, list(work.grant.sample_ids), reason)

    def _fail_ids(self, rank: Rank, lease_id: int, sample_ids: list[int], reason: str) -> None:
        if rank.welcomed and _writable(rank.control):
            send_message(
                rank.control, LeaseFailed(lease_id=lease_id, sample_ids=sample_ids, reason=reason), flags=zmq.NOBLOCK
            )

    # ---- pushing backends (vLLM): the engine's connector sends the samples -----------------

    _MAX_TICKETS = 100_000

    def _submit(self, rows: list[tuple[_Work, CaptureRow]]) -> None:
        """Hand rows to the engine; their results come back through ``_on_results``."""
        jobs = [
            PushJob(
                row=row,
                destination=work.rank.data_endpoint,
                epoch=work.grant.epoch,
                lease_id=work.grant.lease_id,
                token=work.grant.token,
            )
            for work, row in rows
        ]
        for ticket, (work, row) in zip(self.backend.submit(jobs), rows, strict=True):
            self._in_flight[ticket] = (work, row)
            self._in_flight_tokens += len(row.input_ids)

    def _on_results(self) -> None:
        if not self._in_flight:
            return
        try:
            results = self.backend.poll_results()
        except Exception as e:  # the engine failed: every lease with rows in it fails
            for work in {id(w): w for w, _ in self._in_flight.values()}.values():
                self._fail(work, f"{type(e).__name__}: {e}")
            raise
        dtype = DTYPES[self.spec.dtype]
        for result in results:
            entry = self._in_flight.pop(result.ticket, None)
            if entry is None:
                continue
            work, row = entry
            self._in_flight_tokens -= len(row.input_ids)
            if result.error:
                logger.warning("rank %s sample %d not captured: %s", work.rank.name, row.sample_id, result.error)
                self._fail_ids(work.rank, work.grant.lease_id, [int(row.sample_id)], result.error)
                work.failed += 1
                self.report.failed_samples += 1
                continue
            work.sent += 1
            self.report.samples += 1
            self.report.bytes += sample_nbytes(
                len(row.input_ids), len(self.spec.layer_ids), self.spec.hidden_size, dtype
            )
            self._tickets[result.ticket] = (work.rank, work.grant.lease_id, int(row.sample_id))
            while len(self._tickets) > self._MAX_TICKETS:
                self._tickets.popitem(last=False)
        if results:
            self._finish_leases()

    def _on_reports(self) -> None:
        for report in self.backend.poll_reports():
            entry = self._tickets.pop(report.ticket, None)
            if entry is None or report.ok:
                continue
            rank, lease_id, sample_id = entry
            logger.warning("rank %s sample %d not delivered: %s", rank.name, sample_id, report.reason)
            self.report.failed_samples += 1
            self._fail_ids(rank, lease_id, [sample_id], report.reason)


def _writable(sock: zmq.Socket) -> bool:
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)
