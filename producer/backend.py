"""What every target-model backend offers the producer loop, whichever engine runs the target.

A backend takes prepared rows (``CaptureRow``: row index, token ids, loss mask) and yields one
``protocol.messages.Sample`` per row, holding the residual stream at the configured layer ids
(``protocol.target.capture_layer_ids``). ``describe()`` returns the ``protocol.target.TargetSpec``
the producer announces in its ``Hello`` and checks spill files against.

The Hugging Face backend (``producer.capture.HFCapture``) is a ``CaptureBackend``: the producer
holds the tensors and sends them. The vLLM backend (``producer.vllm.backend.VLLMBackend``) is a
``PushingBackend``: the engine's KV connector holds the tensors, so the producer only submits rows
with a destination (``PushJob``), and the connector pushes each sample to it (a trainer rank's data
endpoint, or ``file:///DIR`` for spill) and reports the outcome (``protocol.messages.Delivered``).

Both batch rows with ``plan_batches``: Hugging Face pads a batch to its longest row, vLLM packs
rows without padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from protocol.messages import Delivered, Sample
from protocol.target import TargetSpec

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")  # --dtype of every backend; auto: the checkpoint's


class CaptureRow(NamedTuple):
    """One prepared row: ``sample_id`` is its index in the prepared dataset."""

    sample_id: int
    input_ids: torch.Tensor  # [T] integer
    loss_mask: torch.Tensor  # [T] 0/1


def plan_batches(
    rows: Iterable[CaptureRow], max_batch_tokens: int, *, padded: bool = True
) -> Iterator[list[CaptureRow]]:
    """Greedy, order-preserving batches within ``max_batch_tokens``. ``padded``: a batch costs
    ``rows x longest row`` (right padding); else its real tokens (packed without padding). A row
    longer than the budget forms a batch of its own."""
    batch: list[CaptureRow] = []
    longest = tokens = 0
    for row in rows:
        length = row.input_ids.shape[0]
        cost = (len(batch) + 1) * max(longest, length) if padded else tokens + length
        if batch and cost > max_batch_tokens:
            yield batch
            batch, longest, tokens = [], 0, 0
        batch.append(row)
        longest = max(longest, length)
        tokens += length
    if batch:
        yield batch


class CaptureBackend(Protocol):
    """Runs the target over rows and yields their hidden states, one ``Sample`` per row."""

    def describe(self) -> TargetSpec: ...

    def capture(self, rows: Iterable[CaptureRow], *, epoch: int = 0, lease_id: int = 0) -> Iterator[Sample]: ...

    def close(self) -> None: ...


class PushJob(NamedTuple):
    """One row for a pushing backend and where its sample goes (a data endpoint or ``file:///DIR``)."""

    row: CaptureRow
    destination: str
    epoch: int = 0
    lease_id: int = 0
    token: str = ""  # the grant's token, echoed in the sample


class PushResult(NamedTuple):
    """The engine has run ``job`` (``error`` == "") and its sample is on its way, identified by
    ``ticket`` in later ``Delivered`` reports; or it failed and nothing will be sent."""

    job: PushJob
    ticket: int
    error: str = ""


@runtime_checkable
class PushingBackend(Protocol):
    """A backend whose engine sends the samples itself (vLLM's KV connector).

    Asynchronous, so the engine never idles between batches: ``submit`` hands rows to the engine
    and returns their tickets at once; the engine runs them while the caller submits more;
    ``poll_results`` returns a ``PushResult`` per row the engine has finished (in the order they
    finish, not the order submitted); ``poll_reports`` returns the connector's ``Delivered`` reports.
    For each ticket its result always comes before its report, and a report is due only for a
    result whose engine answer named our connector (``error`` == "", or an answer the backend
    refused after the connector had taken the row). The caller bounds what is in flight (the stream
    producer: granted rows, up to a few batches; spill: a fixed depth), keeping at least
    ``min_in_flight_rows`` there when it has them (a server's concurrency). One thread calls every
    method; ``poll_results`` raises once the engine itself has failed.
    """

    def describe(self) -> TargetSpec: ...

    @property
    def min_in_flight_rows(self) -> int: ...

    @property
    def num_in_flight(self) -> int:
        """Rows submitted whose result ``poll_results`` has not returned yet."""
        ...

    def submit(self, jobs: list[PushJob]) -> list[int]:
        """Start the rows' prefills; returns one ticket per job, in order, without waiting for the engine."""
        ...

    def poll_results(self, timeout_seconds: float = 0.0) -> list[PushResult]:
        """Results of rows the engine finished since the last call, waiting up to ``timeout_seconds`` for one."""
        ...

    def poll_reports(self, timeout_seconds: float = 0.0) -> list[Delivered]: ...

    def close(self) -> None: ...
