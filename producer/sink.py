"""Where the producer loop hands captured samples: the one interface every destination implements.

The loop (``producer.produce.run_producer``) knows nothing about where samples go. Today the spill
writer (``producer.spill.SpillSink``) is the only sink; the network sink that pushes samples to
trainer ranks over ZeroMQ implements the same two methods.
"""

from __future__ import annotations

from typing import Protocol

from protocol.messages import Sample


class Sink(Protocol):
    """``put`` may block (backpressure) and raises the sink's own errors, including those of its
    background threads; ``close`` flushes what was put, is idempotent, and raises a failure that
    ``put`` has not reported yet."""

    def put(self, sample: Sample) -> None: ...

    def close(self) -> None: ...
