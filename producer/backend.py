"""What every target-model backend offers the producer loop, whichever engine runs the target.

A backend takes prepared rows (``CaptureRow``: row index, token ids, loss mask) and yields one
``protocol.messages.Sample`` per row, holding the residual stream at the configured layer ids.
``TargetInfo`` describes the target for the ``Hello`` handshake and for checks on spill files.

Layer-id semantics are vLLM's ``extract_hidden_states``: id ``k`` is the residual stream entering
decoder layer ``k`` (id 0 = embedding output), id ``N`` is the last decoder layer's output before
the final norm. The default ``[2, N//2, N-3, N]`` is three auxiliary layers plus the last.

Today only the Hugging Face backend (``producer.capture.HFCapture``) exists; the vLLM connector
will implement the same protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

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
