"""One logging setup for every draftstream process: each line carries the process's role and
rank (``[trainer r1]``, ``[producer-0]``, ``[run]``), so the interleaved output of torchrun ranks,
producers and the launcher reads well. Other modules use ``logging.getLogger(__name__)``.

Ranks other than 0 log warnings and errors only (unless ``all_ranks``): the training log line is
the same on every rank after the all-reduce, so printing it once is enough.

Whatever a peer sends is untrusted, including what ends up in a log line: ``peer_text`` escapes and
caps it, and ``RateLimitedLog`` keeps a peer (or many) from flooding the log with refusals.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import reprlib
import sys
import threading
import time
from collections.abc import Callable, Hashable

_FORMAT = "%(asctime)s [{who}] %(levelname)s %(name)s: %(message)s"
_QUIET_LIBRARIES = ("httpx", "urllib3", "filelock", "datasets")


def setup_logging(
    role: str, *, rank: int | None = None, level: int | str = logging.INFO, all_ranks: bool = False
) -> None:
    """Configure the root logger for this process (idempotent: replaces our previous handler).
    ``rank``: this process's rank in a group of ranks (trainers), None for a single process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_draftstream", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._draftstream = True  # type: ignore[attr-defined]
    who = role if rank is None else f"{role} r{rank}"
    handler.setFormatter(logging.Formatter(_FORMAT.format(who=who), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if (not rank or all_ranks) else logging.WARNING)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


# ---- text from peers, and logs they cannot flood ----------------------------------------------


def peer_text(value: object, limit: int = 200) -> str:
    """``value`` (text, bytes or anything else, as it came from a peer) made safe for one log line:
    backslashes, newlines, control, format and other non-printable characters (ANSI escapes,
    bidi overrides, line separators) escaped, and at most ``limit`` characters of escaped text,
    then ``...(N more chars)`` for the rest."""
    extra = 0  # bytes past what is decoded, counted as chars in the suffix
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[: 4 * limit + 4])  # a char takes at most 4 bytes (and escapes to 4+ chars)
        extra = len(value) - len(raw)
        text = raw.decode("utf-8", "surrogateescape")  # bytes that are not utf-8: U+DC80..U+DCFF
    else:
        text = reprlib.repr(value)
    out: list[str] = []
    used = consumed = 0
    for char in text:
        if char.isprintable() and char != "\\":
            piece = char
        elif char == "\\":
            piece = "\\\\"
        elif "\udc80" <= char <= "\udcff":
            piece = f"\\x{ord(char) - 0xDC00:02x}"
        else:
            piece = char.encode("unicode_escape").decode("ascii")
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
        consumed += 1
    rest = len(text) - consumed + extra
    return "".join(out) + (f"...({rest} more chars)" if rest else "")


@dataclasses.dataclass
class _Window:
    start: float
    emitted: int = 0
    suppressed: int = 0
    level: int = logging.INFO


class RateLimitedLog:
    """A logger for events a peer can trigger at will (refused messages, say): at most ``burst``
    lines per ``interval_s`` per ``key`` (e.g. ``(peer, reason)``), and at most ``global_burst``
    lines per ``global_interval_s`` across all keys, so many distinct peers cannot flood the log
    either. When a key's window reopens, one line says how many of its lines were suppressed
    (``flush()`` says it for windows that closed with no later line). At most ``max_keys`` keys are
    tracked (least recently used dropped; their suppressed counts go into the global count).
    Arguments are formatted by ``logging`` as usual; pass peer text through ``peer_text``."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval_s: float = 60.0,
        global_burst: int = 50,
        global_interval_s: float = 10.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        if min(burst, global_burst, max_keys) < 1 or min(interval_s, global_interval_s) <= 0:
            raise ValueError("RateLimitedLog needs positive bursts, intervals and max_keys")
        self.logger = logger
        self.burst, self.interval_s = burst, interval_s
        self.global_burst, self.global_interval_s = global_burst, global_interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._keys: collections.OrderedDict[Hashable, _Window] = collections.OrderedDict()
        self._global = _Window(start=-math.inf)
        self._lock = threading.Lock()

    def log(self, level: int, key: Hashable, msg: str, *args: object, stacklevel: int = 1) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` or the whole log is over its rate;
        True if the line was written."""
        with self._lock:
            now = self._clock()
            window = self._keys.get(key)
            if window is not None and now - window.start >= self.interval_s:
                self._summarize(key, window, now)
                window = None
            if window is None:
                window = self._keys[key] = _Window(start=now)
                while len(self._keys) > self.max_keys:
                    _, evicted = self._keys.popitem(last=False)
                    self._global.suppressed += evicted.suppressed
            else:
                self._keys.move_to_end(key)
            window.level = level
            if window.emitted >= self.burst:
                window.suppressed += 1
                return False
            if not self._take_global(now):
                return False
            window.emitted += 1
        self.logger.log(level, msg, *args, stacklevel=stacklevel + 1)
        return True

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args, stacklevel=2)

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args, stacklevel=2)

    def error(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args, stacklevel=2)

    def flush(self) -> None:
        """Report the suppressed lines of every window that has closed (call it now and then)."""
        with self._lock:
            now = self._clock()
            for key, window in list(self._keys.items()):
                if now - window.start >= self.interval_s:
                    self._summarize(key, window, now)
                    del self._keys[key]
            self._take_global(now, lines=0)

    def _take_global(self, now: float, lines: int = 1) -> bool:
        """Open a new global window if the last one has closed (reporting what it suppressed),
        then take ``lines`` from it; False, and the lines counted as suppressed, if it is spent."""
        window = self._global
        if now - window.start >= self.global_interval_s:
            if window.suppressed:
                self.logger.warning(
                    "%d log lines suppressed in %.0fs (over %d lines per %.0fs, or their keys forgotten)",
                    window.suppressed,
                    min(now - window.start, self.global_interval_s),
                    self.global_burst,
                    self.global_interval_s,
                )
            self._global = window = _Window(start=now, emitted=int(window.suppressed > 0))
        if window.emitted + lines > self.global_burst:
            window.suppressed += lines
            return False
        window.emitted += lines
        return True

    def _summarize(self, key: Hashable, window: _Window, now: float) -> None:
        if not window.suppressed:
            return
        if not self._take_global(now):
            self._global.suppressed += window.suppressed - 1  # the summary stood for this many
            return
        self.logger.log(
            window.level,
            "%d similar lines suppressed in %.0fs (%s)",
            window.suppressed,
            now - window.start,
            peer_text(key),
        )
