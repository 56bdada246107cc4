"""Stop signals, handled one way in every draftstream process.

SIGINT and SIGTERM only record themselves (a handler does nothing else); the process's main loop
checks ``StopSignals`` at a safe point: the trainer at a step boundary (then it checkpoints), a
producer after a batch (then it says goodbye), the launcher each tick (then it forwards the stop to
its children). A second SIGINT raises ``KeyboardInterrupt`` at once, for a user who means it.
Handlers are installed only on the main thread (Python allows nothing else) and restored on exit.

Waits that can last (the trainer waiting for samples, on any thread) poll ``stop_requested()``
and give up with ``StopRequested``, so a stop never waits for data that may not come. A process
whose work cannot be cut short where it blocks (a producer loading its target, a send to a
trainer that is gone) passes ``deadline_s``: if it is still inside the ``with`` block that many
seconds after the signal, it exits with 128 + the signal number.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: list[StopSignals] = []  # entered and not yet exited, in this process


class StopRequested(Exception):
    """A wait was cut short because a stop signal arrived (see ``stop_requested``)."""


def stop_requested() -> bool:
    """Whether a stop signal reached this process while a ``StopSignals`` block is active; for
    waits on any thread, which should then raise ``StopRequested``."""
    return any(s.requested for s in _active)


class StopSignals:
    """``with StopSignals("stopping after this step") as stop: ... if stop.requested: ...``;
    ``stop.event`` is a ``threading.Event`` for threads that wait on it. ``deadline_s``: exit the
    process (128 + signal) if the block is still running that long after the first signal."""

    def __init__(self, action: str = "stopping", *, deadline_s: float | None = None):
        self.action = action
        self.deadline_s = deadline_s
        self.signum: int | None = None
        self.event = threading.Event()
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._watchdog: threading.Thread | None = None

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

    def _watch(self) -> None:
        """Wait for a stop; then give the block ``deadline_s`` to end before ending the process."""
        while not self._done.is_set():
            if self.event.wait(0.5):
                break
        else:
            return
        if self._done.wait(self.deadline_s):
            return
        signum = self.signum or signal.SIGTERM
        logger.warning(
            "still busy %.0fs after %s (blocked where a stop cannot reach); exiting now. Where each thread was:",
            self.deadline_s,
            signal.Signals(signum).name,
        )
        try:
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stdout.flush()
        except (OSError, ValueError):  # a closed stream must not keep the process alive
            pass
        os._exit(128 + int(signum))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        self._done.clear()
        _active.append(self)
        if self.deadline_s is not None:
            self._watchdog = threading.Thread(target=self._watch, name="StopDeadline", daemon=True)
            self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self in _active:
            _active.remove(self)
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
