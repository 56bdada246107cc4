"""The replay buffer: received samples held in memory until the trainer has used them, bounded in
bytes by construction.

Credit comes first: the stream source reserves a sample's bytes in the buffer's ``CreditLedger``
*before* it grants the sample to a producer, so a sample that arrives always has room, and the sum
of stored plus in-flight bytes never exceeds ``budget_bytes``. The loop's ``take`` removes samples
and releases their credit once their last planned use is handed out.

Reuse (``uses > 1``): a sample planned for K uses stays until the K-th ``take``; the target runs
once per K uses. The batch plan decides where the uses fall (a window of nearby steps), so the
bytes held by reuse are bounded by that window, which the credit budget must cover.

A sample whose hidden states held NaN/Inf (with --skip-nonfinite) is stored as a ``Nonfinite``
tombstone: it occupies no bytes, and ``fetch`` reports its id as skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence

import torch

from trainer.data.batch import TrainSample
from trainer.stream.credit import CreditLedger


class BufferTimeout(TimeoutError):
    """Samples the trainer needs did not arrive in time."""


class Nonfinite(TrainSample):
    """Tombstone stored for a sample whose hidden states held NaN/Inf (with --skip-nonfinite): it
    occupies no bytes and ``fetch`` reports its id as skipped."""

    def __init__(self, sample_id: int):
        empty = torch.empty(0)
        super().__init__(sample_id=sample_id, token_ids=empty, loss_mask=empty, hidden_states=empty)


class ReplayBuffer:
    """Thread-safe store of received samples keyed by (epoch, sample_id)."""

    def __init__(self, budget_bytes: int):
        self.ledger = CreditLedger(budget_bytes)
        self._samples: dict[Hashable, TrainSample] = {}
        self._uses_left: dict[Hashable, int] = {}
        self._cond = threading.Condition()
        self.peak_bytes = 0
        self.stored_bytes = 0

    @property
    def budget_bytes(self) -> int:
        return self.ledger.budget_bytes

    def reserve(self, key: Hashable, nbytes: int, *, uses: int = 1) -> bool:
        """Hold room for a sample about to be granted; False if it does not fit now."""
        if uses < 1:
            raise ValueError(f"a sample needs at least one use, got {uses}")
        if key in self.ledger:
            return True  # granted before and given back: its room is still held
        if not self.ledger.try_reserve(key, nbytes):
            return False
        with self._cond:
            self._uses_left[key] = uses
        return True

    def put(self, key: Hashable, sample: TrainSample) -> None:
        """Store an arrived sample whose room was reserved."""
        nbytes = sample_bytes(sample)
        with self._cond:
            if key not in self._uses_left:
                raise KeyError(f"sample {key} arrived without a reservation")
            if key in self._samples:
                raise KeyError(f"sample {key} is already stored")
            if nbytes > self.ledger.reserved(key):
                raise ValueError(
                    f"sample {key} holds {nbytes} bytes but only {self.ledger.reserved(key)} were reserved"
                )
            self._samples[key] = sample
            self.stored_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.stored_bytes)
            self._cond.notify_all()

    def take(
        self, keys: Sequence[Hashable], *, timeout: float | None = None, poll: float = 0.5, check=None
    ) -> list[TrainSample]:
        """Block until every key is stored, then hand them out in order; a key on its last use is
        removed and its credit released. ``check()`` runs between waits (to surface IO errors)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(k not in self._samples for k in keys):
                if check is not None:
                    check()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    missing = [k for k in keys if k not in self._samples]
                    raise BufferTimeout(f"{len(missing)} samples never arrived, e.g. {missing[:5]}")
                self._cond.wait(poll if remaining is None else min(poll, remaining))
            out = []
            for key in keys:
                sample = self._samples[key]
                out.append(sample)
                self._uses_left[key] -= 1
                if self._uses_left[key] == 0:
                    del self._samples[key], self._uses_left[key]
                    self.stored_bytes -= sample_bytes(sample)
                    self.ledger.release(key)
            return out

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` whatever uses it had left (the loop will never fetch it): its sample, if
        stored, and its room go."""
        with self._cond:
            sample = self._samples.pop(key, None)
            if sample is not None:
                self.stored_bytes -= sample_bytes(sample)
            self._uses_left.pop(key, None)
        if key in self.ledger:
            self.ledger.release(key)

    def wake(self) -> None:
        """Wake a blocked ``take`` so it re-runs its ``check``."""
        with self._cond:
            self._cond.notify_all()


def sample_bytes(sample: TrainSample) -> int:
    return sum(t.numel() * t.element_size() for t in (sample.token_ids, sample.loss_mask, sample.hidden_states))
