"""One trainer rank's streaming settings: each knob's default and its validation live here, once.

The replay buffer's budget (``--buffer-bytes``) defaults to ``BATCHES_BUFFERED`` full batches of
this rank: ``buffer_budget`` resolves it from the target's sample size and ``batch_tokens`` (the
tokens one optimizer step of this rank trains on), so the CLI passes both through unchanged.
"""

from __future__ import annotations

import dataclasses

from protocol.codec import DTYPES
from protocol.sockets import SocketConfig, rank_endpoints
from protocol.target import TargetSpec, sample_nbytes

BATCHES_BUFFERED = 4  # --buffer-bytes default: this many full batches (batch_tokens each)


@dataclasses.dataclass(kw_only=True)
class StreamConfig:
    endpoint: str  # --stream-endpoint: base, see rank_endpoints
    batch_tokens: int  # tokens of one optimizer step on this rank: --total-seq-len x --grad-accum-steps
    rank: int = 0
    advertise_host: str | None = None  # host producers should push data to, when binding 0.0.0.0
    buffer_bytes: int | None = None  # --buffer-bytes; None: BATCHES_BUFFERED full batches, see buffer_budget
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
        if self.batch_tokens <= 0:
            raise ValueError(
                f"tokens per batch (--total-seq-len x --grad-accum-steps) must be positive, got {self.batch_tokens}"
            )
        if self.lease_seconds <= 0 or self.stall_timeout_seconds <= 0:
            raise ValueError("--lease-seconds and --stall-timeout must be positive")
        if self.samples_per_lease < 1 or self.leases_per_producer < 1:
            raise ValueError("samples per lease and leases per producer must be >= 1")
        rank_endpoints(self.endpoint, self.rank)  # validates the form

    def buffer_budget(self, target: TargetSpec) -> int:
        """Bytes this rank's replay buffer may hold: ``buffer_bytes`` if given, else
        ``BATCHES_BUFFERED`` batches of ``batch_tokens`` tokens of ``target``'s captures."""
        if self.buffer_bytes is not None:
            return self.buffer_bytes
        per_batch = sample_nbytes(self.batch_tokens, len(target.layer_ids), target.hidden_size, DTYPES[target.dtype])
        return BATCHES_BUFFERED * per_batch
