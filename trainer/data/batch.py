"""Packed training batch: the contract between the data side (plan, files, stream) and the drafts.

Several documents (samples) are concatenated into one row of at most ``total_seq_len`` tokens;
``document_ids`` keeps them apart in the attention mask and ``position_ids`` restarts at 0 for
each document. Padding (document id -1) never carries loss and never attends or is attended to.
The drafts do the Eagle alignment (position i sees token i+1 and predicts the verifier at i+1)
inside a document, so a batch holds rows exactly as captured.

Shape letters: B rows (1 when packing), N packed tokens, L captured layers (aux..., last), H hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from protocol.codec import FramedTensor


@dataclasses.dataclass(kw_only=True)
class TrainSample:
    """One sample as the trainer holds it: a captured row from a file or the wire (a packed
    batch holds several)."""

    sample_id: int
    token_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool/int
    hidden_states: torch.Tensor | FramedTensor  # [T, L, H]; streamed samples stay in their frames


@dataclasses.dataclass(kw_only=True)
class PackedBatch:
    input_ids: torch.Tensor  # [B, N] int64
    hidden_states: torch.Tensor  # [B, N, L, H] target dtype
    loss_mask: torch.Tensor  # [B, N] bool
    position_ids: torch.Tensor  # [B, N] int64
    document_ids: torch.Tensor  # [B, N] int64, -1 = padding
    sample_ids: list[int]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.document_ids >= 0).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return PackedBatch(**moved, sample_ids=list(self.sample_ids))


def pack(samples: Sequence[TrainSample], total_seq_len: int, *, pad_to: int | None = None) -> PackedBatch:
    """Concatenate ``samples`` into one row; each is truncated to ``total_seq_len`` tokens, and the
    row must fit in ``total_seq_len`` (the batch plan guarantees it). ``pad_to`` pads the row to a
    fixed length (static shapes for compiled kernels)."""
    if not samples:
        raise ValueError("cannot pack an empty batch")
    pieces = [(s, min(s.token_ids.shape[0], total_seq_len)) for s in samples]
    num_tokens = sum(n for _, n in pieces)
    if num_tokens > total_seq_len:
        raise ValueError(f"{num_tokens} tokens do not fit in total_seq_len={total_seq_len}")
    length = max(num_tokens, pad_to or 0)
    first = samples[0].hidden_states
    _, num_layers, hidden = first.shape
    input_ids = torch.zeros(length, dtype=torch.int64)
    hidden_states = torch.zeros(length, num_layers, hidden, dtype=first.dtype)
    loss_mask = torch.zeros(length, dtype=torch.bool)
    position_ids = torch.zeros(length, dtype=torch.int64)
    document_ids = torch.full((length,), -1, dtype=torch.int64)
    offset = 0
    for doc, (s, n) in enumerate(pieces):
        if s.hidden_states.shape[1:] != first.shape[1:] or s.hidden_states.dtype != first.dtype:
            raise ValueError(
                f"sample {s.sample_id} has hidden states {s.hidden_states.dtype} {tuple(s.hidden_states.shape[1:])}, "
                f"batch has {first.dtype} {tuple(first.shape[1:])}"
            )
        window = slice(offset, offset + n)
        input_ids[window] = s.token_ids[:n]
        if isinstance(s.hidden_states, FramedTensor):
            s.hidden_states.copy_to(hidden_states[window])
        else:
            hidden_states[window] = s.hidden_states[:n]
        loss_mask[window] = s.loss_mask[:n].bool()
        position_ids[window] = torch.arange(n)
        document_ids[window] = doc
        offset += n
    return PackedBatch(
        input_ids=input_ids[None],
        hidden_states=hidden_states[None],
        loss_mask=loss_mask[None],
        position_ids=position_ids[None],
        document_ids=document_ids[None],
        sample_ids=[s.sample_id for s, _ in pieces],
    )


def make_filler_batch(*, num_layers: int, hidden_size: int, dtype: torch.dtype, length: int = 8) -> PackedBatch:
    """A small, well-conditioned synthetic batch (random states, every position supervised) for
    ranks whose plan slot is empty: its loss is multiplied by zero, it exists to join collectives."""
    g = torch.Generator().manual_seed(0)
    return PackedBatch(
        input_ids=torch.arange(length, dtype=torch.int64)[None],
        hidden_states=torch.randn(1, length, num_layers, hidden_size, generator=g).to(dtype),
        loss_mask=torch.ones(1, length, dtype=torch.bool),
        position_ids=torch.arange(length, dtype=torch.int64)[None],
        document_ids=torch.zeros(1, length, dtype=torch.int64),
        sample_ids=[],
    )
