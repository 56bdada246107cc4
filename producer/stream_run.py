"""``draftstream produce --connect ENDPOINT...``: serve trainer ranks' grants from a prepared dataset, or
from a traffic log (``draftstream serve --capture-dir``) that grows while they train.

The target runs in the backend ``--backend`` names (``producer.run_config.make_backend``); the
``Hello`` announces its ``TargetSpec`` with the prepared dataset's fingerprint, so a trainer rank
refuses a producer that reads other rows; ``producer.stream_client.StreamProducer`` does the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from pathlib import Path

from producer.backend import CaptureRow
from producer.run_config import ProduceConfig, captured_layout, make_backend
from producer.stream_client import StreamClientConfig, StreamProducer
from protocol.dataset import open_rows
from protocol.sockets import CurveKeys, SocketConfig

log = logging.getLogger(__name__)


def stream(config: ProduceConfig, *, stop: threading.Event | None = None) -> int:
    """Streaming run: serve the trainer ranks' grants until they end the stream; returns an exit code."""
    if bool(config.curve_secret_key) != bool(config.curve_server_key):
        raise ValueError(
            "CURVE needs both --curve-secret-key (this producer's) and --curve-server-key (the trainer's public key)"
        )

    data = open_rows(config.data, flag="--data")  # a prepared dataset, or a traffic log that grows
    layer_ids, _ = captured_layout(config)
    if stop is not None and stop.is_set():  # stopped before the target was loaded: nothing to serve
        return 0
    backend = make_backend(config, layer_ids=layer_ids)
    spec = dataclasses.replace(backend.describe(), dataset_fingerprint=data.fingerprint)
    log.info("target: %s", spec)

    def row(sample_id: int) -> CaptureRow:
        if sample_id >= len(data) and hasattr(data, "refresh"):
            data.refresh()  # a traffic log: the trainer saw rows this producer has not read yet
        if not 0 <= sample_id < len(data):
            raise ValueError(f"granted sample {sample_id} is outside the prepared dataset of {len(data)} rows")
        return CaptureRow(sample_id, *data.row(sample_id))

    client = StreamProducer(
        StreamClientConfig(
            producer_id=config.producer_id or f"producer-{socket.gethostname()}-{os.getpid()}",
            connect=list(config.connect or []),
            num_ranks=config.num_ranks,
            max_batch_tokens=config.max_batch_tokens,
            share_window_bytes=config.share_window_bytes,
            handshake_timeout_seconds=config.handshake_timeout,
            socket=SocketConfig(
                sndhwm=8,
                rcvhwm=64,
                curve=CurveKeys(
                    secret_file=Path(config.curve_secret_key), server_public_file=Path(config.curve_server_key)
                )
                if config.curve_secret_key
                else None,
            ),
        ),
        backend,
        row,
        spec=spec,
        stop=stop,
    )
    try:
        report = client.run()
    finally:
        backend.close()
    log.info(
        "streamed %d samples (%.2f GB) in %d leases; %d samples failed",
        report.samples,
        report.bytes / 1e9,
        report.leases,
        report.failed_samples,
    )
    window = client.window.stats
    if report.forwards:
        log.info(
            "target forwards: %d for %d samples sent (%.3f per sample); shared in a batch %d, from the window %d "
            "(peak %.1f MB of %.1f MB, %d evicted)",
            report.forwards,
            report.samples,
            report.forwards / max(report.samples, 1),
            report.shared_in_batch,
            window.hits,
            window.peak_bytes / 1e6,
            client.window.budget_bytes / 1e6,
            window.evicted,
        )
    return report.exit_code
