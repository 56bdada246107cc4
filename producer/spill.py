"""The spill sink: captured samples -> ``hs_{sample_id}.safetensors`` files on disk.

Files are written with ``protocol.hsfile.write_hs_file`` (exact format, atomic rename, fsync), on a
background ``SpillWriter`` thread fed by a bounded queue, so disk writes overlap the next forward
and at most ``max_pending_samples`` captured samples wait in memory; ``put`` blocks when it is full.

A capture holding NaN or Inf is an error by default (the message names the row); with
``skip_nonfinite`` the row is skipped, counted and listed instead. Errors of the writer thread
travel back as values and are raised by the next ``put`` or by ``close``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from pathlib import Path

import torch

from protocol.codec import all_finite
from protocol.hsfile import write_hs_file
from protocol.messages import Sample

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 600.0


class NonFiniteCaptureError(ValueError):
    """A captured row holds NaN or Inf hidden states."""


@dataclasses.dataclass(kw_only=True)
class SpillConfig:
    directory: str
    skip_nonfinite: bool = False
    max_pending_samples: int = 4
    fsync: bool = True

    def __post_init__(self) -> None:
        if self.max_pending_samples < 1:
            raise ValueError(f"max_pending_samples must be >= 1, got {self.max_pending_samples}")


@dataclasses.dataclass
class SpillStats:
    num_written: int = 0
    num_bytes: int = 0
    num_skipped_nonfinite: int = 0
    skipped_nonfinite_ids: list[int] = dataclasses.field(default_factory=list)


def check_finite(sample: Sample) -> None:
    """Raise ``NonFiniteCaptureError`` naming the row, positions and capture slots affected."""
    if all_finite(sample.hidden_states):  # one read pass; the detail below only for the bad rows
        return
    bad_TL = ~torch.isfinite(sample.hidden_states).all(dim=-1)
    if bool(bad_TL.any()):
        positions = int(bad_TL.any(dim=1).sum())
        slots = torch.nonzero(bad_TL.any(dim=0)).flatten().tolist()
        raise NonFiniteCaptureError(
            f"row {sample.sample_id}: hidden states contain NaN or Inf at {positions} of "
            f"{sample.hidden_states.shape[0]} token positions (capture slots {slots}); "
            f"pass --skip-nonfinite to skip and count such rows"
        )


class SpillSink:
    """Writes each sample to ``hs_{sample_id}.safetensors`` in ``config.directory``."""

    def __init__(self, config: SpillConfig):
        self.config = config
        self.directory = Path(config.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stats = SpillStats()
        self._queue: queue.Queue[Sample | None] = queue.Queue(maxsize=config.max_pending_samples)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="SpillWriter", daemon=True)
        self._thread.start()

    def put(self, sample: Sample) -> None:
        self._raise_error()
        if self._closed:
            raise RuntimeError("SpillSink.put after close")
        self._queue.put(sample)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(_CLOSE_TIMEOUT_S)
            if self._thread.is_alive():
                raise RuntimeError(f"spill writer did not finish within {_CLOSE_TIMEOUT_S:.0f} s ({self.directory})")
        self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None  # report once, to whichever call sees it first
        if error is not None:
            raise error

    def _run(self) -> None:
        failed = False
        while (sample := self._queue.get()) is not None:
            if failed:  # keep draining so a blocked put() wakes up and sees the error
                continue
            try:
                self._write(sample)
            except BaseException as e:  # noqa: BLE001 - crosses the thread as a value
                self._error, failed = e, True

    def _write(self, sample: Sample) -> None:
        try:
            check_finite(sample)
        except NonFiniteCaptureError as e:
            if not self.config.skip_nonfinite:
                raise
            log.warning("skipping %s", e)
            self.stats.num_skipped_nonfinite += 1
            self.stats.skipped_nonfinite_ids.append(sample.sample_id)
            return
        write_hs_file(self.directory, sample.sample_id, sample.token_ids, sample.hidden_states, fsync=self.config.fsync)
        self.stats.num_written += 1
        self.stats.num_bytes += (
            sample.hidden_states.numel() * sample.hidden_states.element_size() + sample.token_ids.numel() * 8
        )
