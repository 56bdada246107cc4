"""Trainer-side streaming: one rank's sockets, handshake, grants and replay buffer, as a sample
source the training loop reads from exactly like it reads hidden-state files.

::

      producers (DEALER + PUSH)                      trainer rank r
    +--------------------------+   control (ROUTER)   +------------------------------------------+
    | Hello, LeaseDone/Failed, | <------------------> | StreamIO thread                 wire.py  |
    | Heartbeat                |   Welcome, Grant,    |   handshake check          handshake.py  |
    |                          |   Heartbeat, EOS     |   LeaseTable: grants only     leases.py  |
    |                          |                      |   what the buffer's credit holds,        |
    |                          |                      |   expiry -> grant again                  |
    | Sample frames  ----------+--- data (PULL) ----> |   decode, verify, first copy wins  ------+--> ReplayBuffer
    +--------------------------+                      +------------------------------------------+    replay.py, credit.py
                                                                                                          |
                                                       training loop: fetch(ids) blocks until  <----------+
                                                       present: StreamSampleSource, source.py

Modules, in the order a sample passes them: ``config`` (``StreamConfig``: every knob's default and
check, the buffer budget), ``handshake`` (a producer's ``Hello`` against this rank's
``protocol.target.TargetSpec``), ``leases`` (who owes which samples), ``wire`` (the IO thread:
frames -> verify -> buffer), ``credit`` and ``replay`` (the byte-bounded buffer), and this one
(``StreamSampleSource``: what the loop calls).

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
import threading
from collections.abc import Callable, Sequence

import torch

from protocol.codec import DTYPES
from protocol.signals import StopRequested, stop_requested
from protocol.target import TargetSpec, sample_nbytes
from trainer.data.sources import FetchResult, SampleSource
from trainer.stream.config import StreamConfig, peak_live_bytes
from trainer.stream.replay import BufferTimeout, Nonfinite, ReplayBuffer
from trainer.stream.wire import StreamIO


def largest_sample_bytes(num_tokens: int, target: TargetSpec) -> int:
    """Bytes of the largest Sample message of ``num_tokens`` tokens: hidden states, int64 token ids
    and loss mask (the widest the protocol allows), and room for the header."""
    hidden = sample_nbytes(num_tokens, len(target.layer_ids), target.hidden_size, DTYPES[target.dtype])
    return hidden + 16 * num_tokens + (64 << 10)


class StreamSampleSource(SampleSource):
    """A ``trainer.data.sources.SampleSource`` fed by producers over ZeroMQ. Start it, ``schedule`` each
    epoch's needs, ``fetch`` per step, ``close`` at the end."""

    def __init__(
        self,
        config: StreamConfig,
        target: TargetSpec,
        *,
        lengths: Callable[[int], int],
        expected_row: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
        max_tokens: int | None = None,
    ):
        """``lengths(sample_id)``: the prepared row's length; ``expected_row(sample_id)``: its token ids
        and loss mask, which every received sample must equal (None: only lengths are checked);
        ``max_tokens``: the longest row (default: a batch's tokens), which bounds a message's size."""
        if target.dtype not in DTYPES:
            raise ValueError(f"target dtype {target.dtype!r} is not one the protocol carries")
        # A message (and so each frame, ZMQ_MAXMSGSIZE) larger than the largest possible sample is
        # refused; a frame over that size by libzmq itself, before it is assembled.
        largest = largest_sample_bytes(max(max_tokens or 0, config.batch_tokens), target)
        if config.socket.max_message_bytes > largest:
            config = dataclasses.replace(config, socket=dataclasses.replace(config.socket, max_message_bytes=largest))
        self.config = config
        self.target = target
        self._length_of = lengths
        self._dtype = DTYPES[target.dtype]
        self.buffer = ReplayBuffer(config.buffer_budget(target))
        self._io = StreamIO(
            config, target, self.buffer, lengths=lengths, nbytes=self._nbytes, expected_row=expected_row
        )
        self.control_endpoint, self.data_endpoint = self._io.control_endpoint, self._io.data_endpoint
        self._fetch_order: collections.deque[tuple[int, int]] = collections.deque()
        self._abandoned: set[int] = set()  # epochs whose remaining training fetches were dropped
        self._order_lock = threading.Lock()

    def start(self, timeout: float = 30.0) -> StreamSampleSource:
        self._io.start(timeout)
        self._check()
        return self

    def schedule(self, epoch: int, sample_ids: Sequence[int]) -> None:
        """This rank will fetch these samples of ``epoch`` next, in this order (repeats = reuse)."""
        ids = [int(s) for s in sample_ids]
        peak = self.peak_live_bytes(ids)
        if peak > self.buffer.budget_bytes:
            raise ValueError(
                f"rank {self.config.rank}: samples waiting for their next use need {peak / 1e6:.1f} MB at once but "
                f"--buffer-bytes is {self.buffer.budget_bytes / 1e6:.1f} MB; raise --buffer-bytes (or leave it out: the "
                "default fits the flags), or lower --reuse / --reuse-window / --total-seq-len"
            )
        with self._order_lock:
            self._fetch_order.extend((epoch, sid) for sid in ids)
        self._io.need(epoch, ids)

    def lengths(self, sample_ids: Sequence[int]) -> list[int]:
        return [self._length_of(s) for s in sample_ids]

    def _nbytes(self, sample_id: int) -> int:
        return sample_nbytes(
            self._length_of(sample_id), len(self.target.layer_ids), self.target.hidden_size, self._dtype
        )

    def peak_live_bytes(self, sample_ids: Sequence[int]) -> int:
        """Most bytes held at once when fetching ``sample_ids`` in order (``config.peak_live_bytes``)."""
        return peak_live_bytes(sample_ids, self._nbytes)

    def abandon(self, epoch: int) -> None:
        """The loop stops training ``epoch`` early (``--time-budget``): the rest of its training
        fetches will not come, only its validation. ``fetch`` skips them, and producers stop being
        asked for them."""
        with self._order_lock:
            self._abandoned.add(epoch)

    def _skip_abandoned(self, wanted: list[int]) -> list[tuple[int, int]]:
        """Pop the abandoned training fetches ahead of ``wanted`` (validation ids, never training
        ones, so their first match is where validation starts)."""
        order = self._fetch_order
        if not self._abandoned or not order or order[0][0] not in self._abandoned:
            return []
        epoch, items = order[0][0], list(order)
        want = [(epoch, sid) for sid in wanted]
        for start in range(len(items) - len(want) + 1):
            if items[start][0] != epoch:
                break
            if items[start] == want[0] and items[start : start + len(want)] == want:
                return [order.popleft() for _ in range(start)]
        return []

    def fetch(self, sample_ids: Sequence[int]) -> FetchResult:
        with self._order_lock:
            if len(self._fetch_order) < len(sample_ids):
                raise RuntimeError(
                    f"fetch of {len(sample_ids)} samples but only {len(self._fetch_order)} are scheduled"
                )
            wanted = [int(s) for s in sample_ids]
            skipped = self._skip_abandoned(wanted)
            keys = [self._fetch_order.popleft() for _ in sample_ids]
        if skipped:
            self._io.abandoned(skipped)
        if [sid for _, sid in keys] != wanted:
            raise RuntimeError(
                f"fetch order diverged from the schedule: asked {list(sample_ids)[:8]}, scheduled {keys[:8]}"
            )

        def check() -> None:
            self._check()
            if stop_requested():  # a stop signal: the loop checkpoints instead of waiting on
                raise StopRequested(f"rank {self.config.rank}: a stop signal ended the wait for samples")

        try:
            got = self.buffer.take(keys, timeout=self.config.stall_timeout_seconds, check=check)
        except BufferTimeout as e:
            raise BufferTimeout(
                f"rank {self.config.rank}: {e} within --stall-timeout={self.config.stall_timeout_seconds}s; "
                f"{len(self._io.producers)} producers connected"
            ) from None
        self._io.consumed(keys)
        samples = [s for s in got if not isinstance(s, Nonfinite)]
        skipped = [sid for sid, s in zip(sample_ids, got) if isinstance(s, Nonfinite)]
        return FetchResult(samples=samples, skipped=skipped)

    def snapshot(self) -> dict[str, float]:
        """Figures for the progress line and trackers."""
        return self._io.snapshot()

    def close(self, reason: str = "training finished") -> None:
        self._io.stop(reason)

    def _check(self) -> None:
        if self._io.error is not None:
            raise RuntimeError(f"stream IO on rank {self.config.rank} failed: {self._io.error}") from self._io.error
