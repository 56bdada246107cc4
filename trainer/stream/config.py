"""One trainer rank's streaming settings: each knob's default and its validation live here, once.

The replay buffer's budget (``--buffer-bytes``) must hold, at every point of this rank's fetch
order, the samples fetched already and still waiting for a later use (``--reuse``): their peak is
``planned_peak_bytes`` (``peak_live_bytes`` of the planned order, every epoch). By default the
budget sizes itself to the flags: ``BUFFER_HEADROOM`` times that peak, and at least
``BATCHES_BUFFERED`` full batches of this rank (``buffer_budget`` resolves it from the target's
sample size and ``batch_tokens``, the tokens one optimizer step of this rank trains on). A
``--buffer-bytes`` below the peak is refused when the config is made, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from protocol.codec import DTYPES
from protocol.sockets import SocketConfig, advertised_endpoint, rank_endpoints
from protocol.target import TargetSpec, sample_nbytes

BATCHES_BUFFERED = 4  # --buffer-bytes default: at least this many full batches (batch_tokens each)
BUFFER_HEADROOM = 1.25  # --buffer-bytes default: at least this times the planned peak, so grants run ahead


def peak_live_bytes(sample_ids: Sequence[int], nbytes: Callable[[int], int]) -> int:
    """Most bytes held at once when fetching ``sample_ids`` in order: a sample occupies the
    buffer from just before its first use until its last. Above the budget, a rank would wait
    forever for room that only its own future uses can free."""
    last_use = {sid: i for i, sid in enumerate(sample_ids)}
    live: set[int] = set()
    held = peak = 0
    for i, sid in enumerate(sample_ids):
        if sid not in live:
            live.add(sid)
            held += nbytes(sid)
            peak = max(peak, held)
        if last_use[sid] == i:
            live.discard(sid)
            held -= nbytes(sid)
    return peak


@dataclasses.dataclass(kw_only=True)
class StreamConfig:
    endpoint: str  # --stream-endpoint: base, see rank_endpoints
    batch_tokens: int  # tokens of one optimizer step on this rank: --total-seq-len x --grad-accum-steps
    rank: int = 0
    local_rank: int | None = None  # this rank's index on its host (tcp ports count from it); None: = rank
    advertise_host: str | None = (
        None  # --advertise-host: how producers reach this rank (default: as bound; hostname for 0.0.0.0)
    )
    # Advertised control endpoints of every rank (index = rank), gathered over the process group at
    # start-up: every Welcome lists them, so a producer needs only one rank's address. [] = this rank alone.
    trainer_endpoints: list[str] = dataclasses.field(default_factory=list)
    buffer_bytes: int | None = None  # --buffer-bytes; None: sized to the plan, see buffer_budget
    planned_peak_bytes: int = 0  # peak_live_bytes of this rank's planned fetch order, every epoch
    lease_seconds: float = 120.0  # --lease-seconds
    samples_per_lease: int = 8
    leases_per_producer: int = 2
    heartbeat_seconds: float = 2.0
    producer_timeout_seconds: float = 30.0  # silent this long -> its leases go to others
    stall_timeout_seconds: float = 1800.0  # --stall-timeout: the loop gives up waiting for data
    skip_nonfinite: bool = False  # --skip-nonfinite: NaN/Inf samples are skipped and counted
    spill_dir: str | None = None  # --spill-dir: tee every received sample to hs_{i}.safetensors
    socket: SocketConfig = dataclasses.field(default_factory=lambda: StreamConfig.default_socket())

    @staticmethod
    def default_socket() -> SocketConfig:
        """Grants and heartbeats may queue (64); received data stays shallow (8): the buffer's
        credit, not the high-water mark, bounds what producers send."""
        return SocketConfig(sndhwm=64, rcvhwm=8)

    def __post_init__(self) -> None:
        if self.buffer_bytes is not None and self.buffer_bytes <= 0:
            raise ValueError(f"--buffer-bytes must be positive, got {self.buffer_bytes}")
        if self.buffer_bytes is not None and self.buffer_bytes < self.planned_peak_bytes:
            raise ValueError(
                f"rank {self.rank}: samples waiting for their next use need {self.planned_peak_bytes / 1e6:.1f} MB "
                f"at once but --buffer-bytes is {self.buffer_bytes / 1e6:.1f} MB; raise --buffer-bytes (or leave "
                "it out: the default fits the flags), or lower --reuse / --reuse-window / --total-seq-len"
            )
        if self.batch_tokens <= 0:
            raise ValueError(
                f"tokens per batch (--total-seq-len x --grad-accum-steps) must be positive, got {self.batch_tokens}"
            )
        if self.lease_seconds <= 0 or self.stall_timeout_seconds <= 0:
            raise ValueError("--lease-seconds and --stall-timeout must be positive")
        if self.samples_per_lease < 1 or self.leases_per_producer < 1:
            raise ValueError("samples per lease and leases per producer must be >= 1")
        rank_endpoints(self.endpoint, self.rank)  # validates the form
        if self.trainer_endpoints and self.rank >= len(self.trainer_endpoints):
            raise ValueError(f"rank {self.rank} is missing from the {len(self.trainer_endpoints)} trainer endpoints")

    def bound_endpoints(self) -> tuple[str, str]:
        """This rank's control and data endpoints as it binds them."""
        return rank_endpoints(self.endpoint, self.rank, local_rank=self.local_rank)

    def advertised_endpoints(self) -> tuple[str, str]:
        """This rank's control and data endpoints as producers dial them (``--advertise-host``)."""
        control, data = self.bound_endpoints()
        return advertised_endpoint(control, self.advertise_host), advertised_endpoint(data, self.advertise_host)

    def buffer_budget(self, target: TargetSpec) -> int:
        """Bytes this rank's replay buffer may hold: ``buffer_bytes`` if given, else the larger of
        ``BUFFER_HEADROOM`` x ``planned_peak_bytes`` and ``BATCHES_BUFFERED`` batches of
        ``batch_tokens`` tokens of ``target``'s captures."""
        if self.buffer_bytes is not None:
            return self.buffer_bytes
        per_batch = sample_nbytes(self.batch_tokens, len(target.layer_ids), target.hidden_size, DTYPES[target.dtype])
        return max(BATCHES_BUFFERED * per_batch, math.ceil(BUFFER_HEADROOM * self.planned_peak_bytes))
