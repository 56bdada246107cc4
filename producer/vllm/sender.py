"""Getting one request's hidden states out of a vLLM worker: gather its rows from the hidden-state
cache, copy them to host memory, then push them to a trainer rank (or spill them) on a thread of
their own, so the engine loop never waits on the network or the disk.

::

    engine loop (DraftstreamConnector.get_finished)             HSSender thread
      finished request                                          +----------------------------------+
        -> gather its blocks' rows [T, L, H] on the device      | wait for the copy's event        |
        -> async copy to pinned host memory (own CUDA stream)   | Sample -> PUSH to the rank's     |
        -> job  --------- bounded by samples and bytes -------> |   data endpoint (chunked frames) |
        <- copy done: blocks go back to vLLM                    | or hs_{i}.safetensors (file://)  |
                                                                | Delivered(ticket, ok, reason)    |
                                                                |   -> the producer's report PULL  |
                                                                +----------------------------------+

When the queue is full the connector simply starts no new copy: the finished requests keep their
blocks a little longer, vLLM admits fewer new requests, the trainer receives fewer samples and so
grants fewer. Nothing in the engine loop ever blocks on a send.

Hidden-state cache layout (vLLM's ``CacheOnlyAttentionLayer``; one "head" per captured layer, head
size = hidden size): ``cache_NLBH`` = [N blocks, L layers, B block size, H hidden]. Token t of a
request sits in block ``block_ids[t // B]`` at offset ``t % B``. T tokens of one request.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Sequence

import torch
import zmq

from producer.vllm.params import SampleRoute, spill_directory
from protocol.codec import DEFAULT_CHUNK_BYTES, all_finite
from protocol.hsfile import write_hs_file
from protocol.messages import Delivered, Sample
from protocol.sockets import SocketConfig, make_socket, send_message

logger = logging.getLogger(__name__)

_CLOSE_LINGER_S = 10.0


def gather_rows(cache_NLBH: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
    """The request's ``[T, L, H]`` rows, on the cache's device (a fresh tensor, not a view)."""
    if cache_NLBH.dim() != 4:
        raise ValueError(
            f"hidden-state cache must be [blocks, layers, block size, hidden], got {tuple(cache_NLBH.shape)}"
        )
    _, num_layers, block_size, hidden = cache_NLBH.shape
    num_blocks = math.ceil(num_tokens / block_size)
    if len(block_ids) < num_blocks:
        raise ValueError(
            f"{num_tokens} tokens need {num_blocks} blocks of {block_size}, the request holds {len(block_ids)}"
        )
    index = torch.as_tensor(list(block_ids[:num_blocks]), dtype=torch.long).to(cache_NLBH.device, non_blocking=True)
    rows_nLBH = cache_NLBH.index_select(0, index)
    return rows_nLBH.transpose(1, 2).reshape(num_blocks * block_size, num_layers, hidden)[:num_tokens]


@dataclasses.dataclass
class HostCopy:
    """A request's rows in host memory, valid once ``event`` (a CUDA event, if any) has fired."""

    hidden_TLH: torch.Tensor
    event: torch.cuda.Event | None = None

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class HostCopier:
    """Device -> host copies of cache rows. On CUDA: on a stream of its own, into pinned memory,
    ordered after the work already queued on the current stream (the forward that wrote the
    cache); the caller polls ``HostCopy.done``. On CPU: a plain copy, done on return."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def copy(self, cache_NLBH: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> HostCopy:
        device = cache_NLBH.device
        if device.type != "cuda":
            rows_TLH = gather_rows(cache_NLBH, block_ids, num_tokens)
            return HostCopy(rows_TLH if rows_TLH.device.type == "cpu" else rows_TLH.cpu())
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # Allocated on this stream and freed on it: the caching allocator reuses the memory only
            # after this stream's queued work, so no record_stream is needed.
            rows_TLH = gather_rows(cache_NLBH, block_ids, num_tokens)
            host_TLH = torch.empty(rows_TLH.shape, dtype=rows_TLH.dtype, pin_memory=True)
            host_TLH.copy_(rows_TLH, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return HostCopy(host_TLH, event)


@dataclasses.dataclass(kw_only=True)
class SenderConfig:
    """Bounds and options of the sender thread (``kv_connector_extra_config`` of the connector)."""

    max_pending_samples: int = 64  # copies queued or in flight
    max_pending_bytes: int = 4 << 30  # host memory they hold (a single larger sample still goes alone)
    send_timeout_seconds: float = 60.0  # a trainer taking no data this long: the sample is reported failed
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    spill_dirs: list[str] = dataclasses.field(default_factory=list)  # file:// destinations allowed under these
    fsync: bool = True
    data_socket: SocketConfig = dataclasses.field(default_factory=lambda: SocketConfig(sndhwm=4, rcvhwm=4))

    def __post_init__(self) -> None:
        if self.max_pending_samples < 1 or self.max_pending_bytes < 1:
            raise ValueError("max_pending_samples and max_pending_bytes must be >= 1")
        if self.send_timeout_seconds <= 0:
            raise ValueError(f"send_timeout_seconds must be positive, got {self.send_timeout_seconds}")
        self.spill_dirs = [os.path.realpath(d) for d in self.spill_dirs]


@dataclasses.dataclass
class SendJob:
    route: SampleRoute
    token_ids: torch.Tensor  # [T] int64, host: the request's prompt ids
    copy: HostCopy

    @property
    def nbytes(self) -> int:
        hidden = self.copy.hidden_TLH
        return hidden.numel() * hidden.element_size() + self.token_ids.numel() * 8


@dataclasses.dataclass
class _Failure:
    route: SampleRoute
    reason: str


@dataclasses.dataclass
class SenderStats:
    sent: int = 0
    spilled: int = 0
    failed: int = 0
    bytes: int = 0
    reports_dropped: int = 0


class HSSender:
    """Delivers ``SendJob``s in order on a thread named ``HSSender``; reports each outcome to the
    route's ``report`` endpoint as ``Delivered(ticket, sample id, ok, why)``.
    ``submit`` never blocks: callers check ``has_room`` first."""

    _CLOSE = object()

    def __init__(self, config: SenderConfig, *, name: str = "HSSender"):
        self.config = config
        self.stats = SenderStats()
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._pending_samples = 0
        self._pending_bytes = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- engine-loop side (never blocks) ---------------------------------------------------

    def has_room(self, nbytes: int) -> bool:
        with self._cond:
            if self._pending_samples == 0:
                return True
            return (
                self._pending_samples < self.config.max_pending_samples
                and self._pending_bytes + nbytes <= self.config.max_pending_bytes
            )

    def submit(self, job: SendJob) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("HSSender.submit after close")
            self._pending_samples += 1
            self._pending_bytes += job.nbytes
            self._items.append(job)
            self._cond.notify()

    def fail(self, route: SampleRoute, reason: str) -> None:
        """Report a request whose rows never made it into a job (bad params, copy error)."""
        logger.error(
            "sample %d (epoch %d, lease %d) not delivered: %s", route.sample_id, route.epoch, route.lease_id, reason
        )
        with self._cond:
            if not self._closed:
                self._items.append(_Failure(route, reason))
                self._cond.notify()

    @property
    def num_pending(self) -> int:
        with self._cond:
            return self._pending_samples

    def close(self, timeout: float = 60.0) -> None:
        """Deliver what is queued (up to ``timeout``), then close the sockets. Idempotent."""
        with self._cond:
            if not self._closed:
                self._closed = True
                self._items.append(self._CLOSE)
                self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "hidden-state sender still busy after %.0fs; %d samples undelivered", timeout, self.num_pending
            )

    # ---- sender thread ---------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context()  # our own: the engine process has ZeroMQ sockets of its own
        data: dict[str, zmq.Socket] = {}
        reports: dict[str, zmq.Socket] = {}
        try:
            while True:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    item = self._items.popleft()
                if item is self._CLOSE:
                    return
                if isinstance(item, _Failure):
                    self.stats.failed += 1
                    self._report(ctx, reports, item.route, item.reason)
                    continue
                try:
                    reason = self._deliver(ctx, data, item)
                finally:
                    with self._cond:
                        self._pending_samples -= 1
                        self._pending_bytes -= item.nbytes
                if reason:
                    self.stats.failed += 1
                    logger.error("sample %d to %s failed: %s", item.route.sample_id, item.route.destination, reason)
                self._report(ctx, reports, item.route, reason)
        finally:
            # Flush what was pushed, but do not hang on a trainer that is gone: its leases expire.
            linger_ms = int(min(self.config.send_timeout_seconds, _CLOSE_LINGER_S) * 1000)
            for sock in data.values():
                sock.close(linger=linger_ms)
            for sock in reports.values():
                sock.close(linger=1000)
            ctx.term()

    def _deliver(self, ctx: zmq.Context, data: dict[str, zmq.Socket], job: SendJob) -> str:
        """Send or spill one job; returns "" or why it failed."""
        route = job.route
        try:
            job.copy.wait()
            hidden_TLH = job.copy.hidden_TLH
            if route.is_spill:
                directory = self._spill_dir(route)
                if not all_finite(hidden_TLH):
                    return f"hidden states of row {route.sample_id} contain NaN or Inf"
                write_hs_file(directory, route.sample_id, job.token_ids, hidden_TLH, fsync=self.config.fsync)
                self.stats.spilled += 1
            else:
                sample = Sample(
                    sample_id=route.sample_id,
                    epoch=route.epoch,
                    lease_id=route.lease_id,
                    token=route.token,
                    token_ids=job.token_ids,
                    loss_mask=route.loss_mask(),
                    hidden_states=hidden_TLH,
                )
                sock = data.get(route.destination)
                if sock is None:
                    sock = data[route.destination] = make_socket(
                        ctx, zmq.PUSH, self.config.data_socket, connect=route.destination
                    )
                    sock.setsockopt(zmq.SNDTIMEO, int(self.config.send_timeout_seconds * 1000))
                try:
                    send_message(sock, sample, chunk_bytes=self.config.chunk_bytes)
                except zmq.Again:
                    # A fresh socket next time: what sits in this one's pipe is lost with the lease anyway.
                    data.pop(route.destination).close(linger=0)
                    return f"trainer at {route.destination} took no data for {self.config.send_timeout_seconds:.0f}s"
                self.stats.sent += 1
            self.stats.bytes += job.nbytes
            return ""
        except Exception as e:  # noqa: BLE001 - reported to the producer, the engine carries on
            return f"{type(e).__name__}: {e}"

    def _spill_dir(self, route: SampleRoute) -> str:
        directory = os.path.realpath(spill_directory(route.destination))
        if not any(directory == root or directory.startswith(root + os.sep) for root in self.config.spill_dirs):
            raise PermissionError(
                f"spill directory {directory} is not under the connector's spill_dirs {self.config.spill_dirs} "
                "(launch-vllm --spill-dir)"
            )
        os.makedirs(directory, exist_ok=True)
        return directory

    def _report(self, ctx: zmq.Context, reports: dict[str, zmq.Socket], route: SampleRoute, reason: str) -> None:
        if not route.report:
            return
        message = Delivered(ticket=route.ticket, sample_id=route.sample_id, ok=not reason, reason=reason)
        sock = reports.get(route.report)
        if sock is None:
            sock = reports[route.report] = make_socket(
                ctx, zmq.PUSH, SocketConfig(sndhwm=1000, rcvhwm=4), connect=route.report
            )
        try:
            send_message(sock, message, flags=zmq.NOBLOCK)
        except zmq.Again:  # the producer is gone or far behind: it falls back on its own timeout
            self.stats.reports_dropped += 1
