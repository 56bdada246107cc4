"""Fetching ahead: a thread that asks the sample source for the coming steps' samples (in the
order of ``trainer.data.order``) and packs them while the main loop computes, through a bounded queue (``depth`` steps), so file reads (or
waiting on the network) overlap the draft's forward/backward.

The thread owns nothing but the source calls; errors travel through the queue as values and are
raised where the main loop reads. ``close()`` is idempotent and joins with a timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from trainer.data.batch import PackedBatch, pack
from trainer.data.order import Slot, step_slots, train_steps
from trainer.data.plan import BatchPlan
from trainer.data.sources import FetchResult, SampleSource


@dataclasses.dataclass
class MicroBatch:
    """One logical rank's share of a step: what the source returned, packed (None: empty slot)."""

    logical_rank: int
    fetched: FetchResult
    batch: PackedBatch | None  # None: filler


def fetch_slots(
    source: SampleSource, slots: Sequence[Slot], *, total_seq_len: int, pin: bool = False
) -> list[MicroBatch]:
    """Fetch and pack one step's slots (synchronously), in order."""
    micros = []
    for lr, ids in slots:
        fetched = source.fetch(ids)
        batch = pack(fetched.samples, total_seq_len) if fetched.samples else None
        if batch is not None and pin:
            batch = pinned(batch)
        micros.append(MicroBatch(lr, fetched, batch))
    return micros


def fetch_micro_batches(
    plan: BatchPlan, source: SampleSource, logical_ranks: Sequence[int], step: int, *, pin: bool = False
) -> list[MicroBatch]:
    """Fetch and pack the batches of ``logical_ranks`` at ``step`` (synchronously)."""
    return fetch_slots(source, step_slots(plan, logical_ranks, step), total_seq_len=plan.total_seq_len, pin=pin)


class Prefetcher:
    """Fetches and packs the coming steps' micro-batches on a thread (file IO releases the GIL);
    errors travel through the queue and are raised in the main loop."""

    _DONE = object()

    def __init__(
        self,
        *,
        plan: BatchPlan,
        source: SampleSource,
        logical_ranks: Sequence[int],
        start_step: int,
        depth: int,
        pin: bool,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.wait_seconds = 0.0  # time the training loop spent waiting for data (stall)
        self._stop = threading.Event()
        self._args = (plan, source, list(logical_ranks), start_step, pin)
        self._thread = threading.Thread(target=self._run, name=f"Prefetch-e{plan.epoch}", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        plan, source, logical_ranks, start_step, pin = self._args
        try:
            for step, slots in train_steps(plan, logical_ranks, start_step):
                micros = fetch_slots(source, slots, total_seq_len=plan.total_seq_len, pin=pin)
                if not self._put((step, micros)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main loop
            self._put(e)

    def __iter__(self) -> Iterator[tuple[int, list[MicroBatch]]]:
        while True:
            start = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - start
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)


def pinned(batch: PackedBatch) -> PackedBatch:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return PackedBatch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
