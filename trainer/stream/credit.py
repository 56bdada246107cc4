"""Byte-budgeted credit ledger: the trainer grants work only when its buffer can hold the result.

ZeroMQ high-water marks count messages, not bytes, and TCP's kernel buffers hold more than the HWM
anyway, so a strict memory bound needs credit at the application level. The trainer reserves the
bytes of every sample it grants *before* granting, and releases them when the sample has been
consumed (or its lease has been given up). The sum of reservations never exceeds the budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable


class CreditLedger:
    """Thread-safe reservations against a fixed byte budget, keyed by anything hashable."""

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"buffer budget must be positive, got {budget_bytes} bytes (--buffer-bytes)")
        self.budget_bytes = budget_bytes
        self._held: dict[Hashable, int] = {}
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self._used

    @property
    def available_bytes(self) -> int:
        with self._cond:
            return self.budget_bytes - self._used

    def __len__(self) -> int:
        with self._cond:
            return len(self._held)

    def __contains__(self, key: Hashable) -> bool:
        with self._cond:
            return key in self._held

    def reserved(self, key: Hashable) -> int:
        """Bytes held for ``key`` (KeyError if none)."""
        with self._cond:
            return self._held[key]

    def _check_request(self, key: Hashable, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative amount ({nbytes})")
        if nbytes > self.budget_bytes:
            raise ValueError(
                f"one item needs {nbytes} bytes but the whole budget is {self.budget_bytes}: "
                "raise --buffer-bytes or lower --total-seq-len"
            )
        if key in self._held:
            raise KeyError(f"{key!r} already holds a reservation")

    def try_reserve(self, key: Hashable, nbytes: int) -> bool:
        """Reserve ``nbytes`` for ``key`` if they fit now; never blocks."""
        with self._cond:
            self._check_request(key, nbytes)
            if self._used + nbytes > self.budget_bytes:
                return False
            self._held[key] = nbytes
            self._used += nbytes
            return True

    def reserve(self, key: Hashable, nbytes: int, timeout: float | None = None) -> bool:
        """Wait until ``nbytes`` fit, then reserve; False if ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._check_request(key, nbytes)
            while self._used + nbytes > self.budget_bytes:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._held[key] = nbytes
            self._used += nbytes
            return True

    def release(self, key: Hashable) -> int:
        """Give back ``key``'s reservation; returns its size. Releasing twice is an error."""
        with self._cond:
            nbytes = self._held.pop(key)
            self._used -= nbytes
            self._cond.notify_all()
            return nbytes
