"""What every target-model backend offers the producer loop, whichever engine runs the target.

A backend takes prepared rows (``CaptureRow``: row index, token ids, loss mask) and yields one
``protocol.messages.Sample`` per row, holding the residual stream at the configured layer ids.
``TargetInfo`` describes the target for the ``Hello`` handshake and for checks on spill files.

Layer-id semantics are vLLM's ``extract_hidden_states``: id ``k`` is the residual stream entering
decoder layer ``k`` (id 0 = embedding output), id ``N`` is the last decoder layer's output before
the final norm. The default ``[2, N//2, N-3, N]`` is three auxiliary layers plus the last.

The Hugging Face backend (``producer.capture.HFCapture``) is a ``CaptureBackend``: the producer
holds the tensors and sends them. The vLLM backend (``producer.vllm.backend.VLLMBackend``) is a
``PushingBackend``: the engine's KV connector holds the tensors, so the producer only submits rows
with a destination (``PushJob``), and the connector pushes each sample to it (a trainer rank's data
endpoint, or ``file:///DIR`` for spill) and reports the outcome (``DeliveryReport``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from protocol.messages import Sample


def default_layer_ids(num_layers: int) -> list[int]:
    """``[2, N//2, N-3, N]``: the three auxiliary ids EAGLE-3 uses, then the last layer."""
    return [2, num_layers // 2, num_layers - 3, num_layers]


def check_layer_ids(layer_ids: list[int], num_layers: int) -> None:
    """Ids must lie in ``[0, N]``; they are captured in the order given (aux..., last)."""
    if not layer_ids:
        raise ValueError("--target-layer-ids must name at least one layer")
    bad = [k for k in layer_ids if not 0 <= k <= num_layers]
    if bad:
        raise ValueError(
            f"--target-layer-ids {bad} out of range: the target has {num_layers} decoder layers, "
            f"so ids go from 0 (embeddings) to {num_layers} (last layer output, before the final norm)"
        )


class CaptureRow(NamedTuple):
    """One prepared row: ``sample_id`` is its index in the prepared dataset."""

    sample_id: int
    input_ids: torch.Tensor  # [T] integer
    loss_mask: torch.Tensor  # [T] 0/1


@dataclasses.dataclass(kw_only=True, frozen=True)
class TargetInfo:
    """What a producer announces about its target (the ``Hello`` fields, plus the layer count)."""

    target_model: str
    layer_ids: list[int]
    hidden_size: int
    dtype: str
    vocab_size: int
    num_layers: int


class CaptureBackend(Protocol):
    """Runs the target over rows and yields their hidden states, one ``Sample`` per row."""

    def describe(self) -> TargetInfo: ...

    def capture(self, rows: Iterable[CaptureRow], *, epoch: int = 0, lease_id: int = 0) -> Iterator[Sample]: ...

    def close(self) -> None: ...


class PushJob(NamedTuple):
    """One row for a pushing backend and where its sample goes (a data endpoint or ``file:///DIR``)."""

    row: CaptureRow
    destination: str
    epoch: int = 0
    lease_id: int = 0


class PushResult(NamedTuple):
    """The engine has run ``job`` (``error`` == "") and its sample is on its way, identified by
    ``ticket`` in later ``DeliveryReport``s; or it failed and nothing will be sent."""

    job: PushJob
    ticket: int
    error: str = ""


class DeliveryReport(NamedTuple):
    """The connector delivered (``ok``) or gave up on the sample of ``ticket``."""

    ticket: int
    sample_id: int
    ok: bool
    reason: str = ""


@runtime_checkable
class PushingBackend(Protocol):
    """A backend whose engine sends the samples itself (vLLM's KV connector)."""

    def describe(self) -> TargetInfo: ...

    def submit(self, jobs: list[PushJob]) -> list[PushResult]:
        """Run the rows' prefills; one result per job, in order. Returns once the engine is done
        with them; delivery follows asynchronously and is reported by ``poll_reports``."""
        ...

    def poll_reports(self, timeout_seconds: float = 0.0) -> list[DeliveryReport]: ...

    def close(self) -> None: ...
