"""What of the served traffic becomes training rows: the deployer's capture controls, and the bounded
queue the rows wait in until the capture engine takes them.

A served request yields one row per prompt: the prompt's token ids followed by the tokens the target
generated, supervised on the generated part (these are the sequences the draft must predict). The
controls, applied in this order, each counted under its own reason:

- ``off``: capture disabled (``--capture-rate 0``), nothing is looked at;
- ``opted_out``: the request carried ``"draftstream_capture": false`` (the field never reaches vLLM);
- ``sampled_out``: not drawn at ``--capture-rate`` (decided before the request is served, so an
  unsampled request is forwarded untouched);
- ``failed``: the request did not complete (an error status, a stream cut short);
- ``duplicate``: a prompt identical to a recent one (a bounded memory of prompt digests);
- ``too_long``: the prompt alone fills ``--capture-max-tokens`` (a longer row is cut to that many
  tokens: hidden states are causal, so its prefix is exact);
- ``shed``: the queue was full; the *oldest* waiting row goes (recent traffic matters most).

``offer`` never blocks and never raises on what a client sent: serving must not wait for capture. The
queue is bounded in rows and in tokens before anything is stored; a row's bytes are its token ids.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import random
import threading
import time

OPT_OUT_FIELD = "draftstream_capture"
REASONS = ("off", "opted_out", "sampled_out", "failed", "duplicate", "too_long", "shed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptureControls:
    rate: float = 1.0  # fraction of requests captured (0 turns capture off)
    max_tokens: int = 2048  # longest row kept (prompt + generated); longer rows are cut
    max_rows: int = 1024  # rows waiting at most
    max_queued_tokens: int = 1 << 20  # tokens waiting at most (8 bytes each)
    dedup_window: int = 65536  # prompt digests remembered
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"--capture-rate must be in [0, 1], got {self.rate}")
        for name in ("max_tokens", "max_rows", "max_queued_tokens"):
            if getattr(self, name) < 2:
                raise ValueError(f"--capture-{name.replace('_', '-')} must be at least 2, got {getattr(self, name)}")
        if self.max_tokens > self.max_queued_tokens:
            raise ValueError(
                f"--capture-max-tokens {self.max_tokens} exceeds the queue's --capture-max-queued-tokens "
                f"{self.max_queued_tokens}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LiveRow:
    """One captured sequence: ``token_ids`` = prompt + generated, ``num_prompt`` of them the prompt."""

    row_id: int  # the queue's sequence number, unique for the server's lifetime
    request_id: str  # the served request's id (and choice index), for the record
    token_ids: tuple[int, ...]
    num_prompt: int
    arrived_s: float

    @property
    def loss_mask(self) -> list[int]:
        return [0] * self.num_prompt + [1] * (len(self.token_ids) - self.num_prompt)


class TrafficQueue:
    """Capture controls and the bounded queue of rows waiting for the capture engine; thread-safe."""

    def __init__(self, controls: CaptureControls, *, clock=time.monotonic):
        self.controls = controls
        self._clock = clock
        self._random = random.Random(controls.seed)
        self._rows: collections.deque[LiveRow] = collections.deque()
        self._tokens = 0
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.counts: collections.Counter[str] = collections.Counter()
        self.peak_tokens = 0

    # ---- decisions on the serving path ----------------------------------------------------------

    def admit(self, body: dict) -> bool:
        """Whether to capture this request: pops the opt-out field from ``body`` (whatever its value,
        so it never reaches vLLM), then applies the switch, the opt-out and the sampling rate."""
        wants = body.pop(OPT_OUT_FIELD, True)
        with self._lock:
            if self.controls.rate == 0.0:
                self.counts["off"] += 1
                return False
            if wants is False:
                self.counts["opted_out"] += 1
                return False
            if self.controls.rate < 1.0 and self._random.random() >= self.controls.rate:
                self.counts["sampled_out"] += 1
                return False
        return True

    def failed(self, count: int = 1) -> None:
        with self._lock:
            self.counts["failed"] += count

    def offer(self, request_id: str, prompt: list[int], generated: list[int]) -> LiveRow | None:
        """Queue one served sequence; None when a control dropped it (counted). Never blocks."""
        digest = hashlib.blake2b(repr(prompt).encode(), digest_size=16).digest()
        with self._lock:
            if digest in self._seen:
                self._seen.move_to_end(digest)
                self.counts["duplicate"] += 1
                return None
            self._seen[digest] = None
            if len(self._seen) > self.controls.dedup_window:
                self._seen.popitem(last=False)
            if len(prompt) >= self.controls.max_tokens or not generated:
                self.counts["too_long"] += 1
                return None
            tokens = tuple(int(t) for t in (list(prompt) + list(generated))[: self.controls.max_tokens])
            row = LiveRow(
                row_id=next(self._ids),
                request_id=str(request_id)[:200],
                token_ids=tokens,
                num_prompt=len(prompt),
                arrived_s=self._clock(),
            )
            while self._rows and (
                len(self._rows) >= self.controls.max_rows
                or self._tokens + len(tokens) > self.controls.max_queued_tokens
            ):
                self._tokens -= len(self._rows.popleft().token_ids)
                self.counts["shed"] += 1
            self._rows.append(row)
            self._tokens += len(tokens)
            self.peak_tokens = max(self.peak_tokens, self._tokens)
            self.counts["queued"] += 1
            self._ready.notify_all()
            return row

    # ---- the capture engine's side -------------------------------------------------------------

    def take(self, limit: int, *, timeout: float = 0.0) -> list[LiveRow]:
        """Up to ``limit`` rows, oldest first, waiting up to ``timeout`` seconds for the first."""
        with self._ready:
            if not self._rows and timeout > 0:
                self._ready.wait(timeout)
            out = []
            while self._rows and len(out) < limit:
                row = self._rows.popleft()
                self._tokens -= len(row.token_ids)
                out.append(row)
            self.counts["taken"] += len(out)
            return out

    @property
    def queued_rows(self) -> int:
        with self._lock:
            return len(self._rows)

    @property
    def queued_tokens(self) -> int:
        with self._lock:
            return self._tokens

    def stats(self) -> dict[str, int]:
        """Counts by reason plus ``queued``/``taken`` totals and the queue's current and peak size.
        Every offered sequence is ``queued`` or dropped for one reason; every queued row is ``taken``,
        ``shed`` or still waiting."""
        with self._lock:
            return {
                **{reason: self.counts[reason] for reason in REASONS},
                "queued": self.counts["queued"],
                "taken": self.counts["taken"],
                "waiting_rows": len(self._rows),
                "waiting_tokens": self._tokens,
                "peak_tokens": self.peak_tokens,
            }
