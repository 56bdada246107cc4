"""Stop signals, handled one way in every draftstream process.

SIGINT and SIGTERM only record themselves (a handler does nothing else); the process's main loop
checks ``StopSignals`` at a safe point: the trainer after a step (then it checkpoints), a producer
after a batch (then it says goodbye), the launcher each tick (then it forwards the stop to its
children). A second SIGINT raises ``KeyboardInterrupt`` at once, for a user who means it.
Handlers are installed only on the main thread (Python allows nothing else) and restored on exit.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals("stopping after this step") as stop: ... if stop.requested: ...``;
    ``stop.event`` is a ``threading.Event`` for threads that wait on it."""

    def __init__(self, action: str = "stopping"):
        self.action = action
        self.signum: int | None = None
        self.event = threading.Event()
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _handler(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()
        logger.warning("received %s: %s", signal.Signals(signum).name, self.action)

    def consume(self) -> int | None:
        """The signal received since the last call (None if none), for loops that act once per
        signal (the launcher forwards each)."""
        signum, self.signum = self.signum, None
        self.event.clear()
        return signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
